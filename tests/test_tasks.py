"""Zero-shot tasks: the offline pack builds from its packages, lm-eval scores in-memory models,
the CLI validates task names before any model loads, and rows carry plain metric columns."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_llama
from ptqcore.cli import main
from ptqcore.results import ResultsStore
from ptqcore.tasks import OFFLINE_TASKS
from ptqcore.tasks.build import load_items

TINY_RUN = ["--nsamples", "2", "--calib-seqlen", "32", "--eval-seqlen", "64", "--limit", "1", "--quiet"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- the offline pack

@pytest.mark.parametrize("name", list(OFFLINE_TASKS))
def test_offline_task_builds_with_its_card_count(name):
    items = load_items(name)
    card = OFFLINE_TASKS[name]
    assert len(items) == card.items
    if name == "lastword_wiki":
        for item in items:
            word = item["target"][1:]
            assert item["target"].startswith(" ") and word.isalpha() and word in item["context"]
            assert len(item["context"].split()) >= 39
        return
    key = "contexts" if name == "winogrande_bb" else "choices"
    n_options = [len(item[key]) for item in items]
    assert all(0 <= item["label"] < len(item[key]) for item in items)
    assert sum(1 / n for n in n_options) / len(items) == pytest.approx(card.chance, abs=1e-3)
    if name == "winogrande_bb":
        assert all(c.endswith(item["option1" if i == 0 else "option2"])
                   for item in items[:50] for i, c in enumerate(item["contexts"]))


def test_items_match_their_sources():
    """Spot checks against the source files (first items, as read by eye from the sdist/wheel)."""
    siqa = load_items("siqa_bb")[0]
    assert siqa["question"].startswith("Tracy didn't go home that evening") and siqa["label"] == 2
    assert siqa["choices"][2] == "Find somewhere to go"
    sciq = load_items("sciq_bb")[0]
    assert sciq["choices"] == ["the size of the guitar.", "the metal on the guitar.", "the wood on the guitar.",
                               "the vibrations of the string"] and sciq["label"] == 3
    wino = load_items("winogrande_bb")[:2]
    assert [w["label"] for w in wino] == [0, 1] and wino[0]["continuation"] == "were crowded for them."
    mmlu = load_items("mmlu_dev")
    assert mmlu[0]["subject"] == "abstract algebra" and mmlu[0]["label"] == 2  # "The answer is (C)"
    assert len({m["subject"] for m in mmlu}) == 57


def test_cache_is_reused_not_rebuilt(monkeypatch):
    from ptqcore.tasks import build

    monkeypatch.setattr(build, "_pip_download_bigbench", lambda *a, **k: pytest.fail("re-downloaded"))
    monkeypatch.setattr(build, "winogrande_items", lambda *a, **k: pytest.fail("rebuilt"))
    assert build.bigbench_files(progress=False)
    assert build.task_jsonl("winogrande_bb").exists()


# --------------------------------------------------------------------------- scoring with lm-eval

@pytest.fixture(scope="module")
def tiny_lm(smollm2):
    return make_tiny_llama(vocab_size=len(smollm2.tokenizer)), smollm2.tokenizer


@pytest.mark.parametrize("name", list(OFFLINE_TASKS))
def test_lm_eval_scores_a_tiny_random_model(tiny_lm, one_thread, name):
    from ptqcore.eval.zeroshot import zeroshot

    model, tokenizer = tiny_lm
    rows = zeroshot(model, tokenizer, [name], limit=16, batch_size=8, progress=False)
    metrics = {r["metric"]: r for r in rows}
    assert set(metrics) == set(OFFLINE_TASKS[name].metrics)
    for r in rows:
        assert r["dataset"] == name and r["limit"] == 16 and r["task_items"] == 16 and r["seed"] == 0
        assert 0.0 <= r["value"] <= 1.0 and r["stderr"] is not None and r["eval_seconds"] > 0
        # a random model guesses: within 4 standard errors (+ a margin for 16 items) of chance
        assert abs(r["value"] - OFFLINE_TASKS[name].chance) <= 4 * r["stderr"] + 0.15
    if name == "lastword_wiki":
        assert metrics["acc"]["value"] == 0.0  # a random 2-block model never greedily completes a word


@pytest.mark.slow
def test_smollm2_scores_above_chance(smollm2):
    """The real full-precision SmolLM2-135M beats chance by more than 3 standard errors on the
    first 200 items of siqa_bb (acc_norm 0.480 +- 0.035 vs 0.334: 4.2 SE) and of sciq_bb (acc
    0.420 +- 0.035 vs 0.252: 4.8 SE), and the first 40 of lastword_wiki (acc 0.675 +- 0.075 vs ~0:
    9 SE). Smaller limits are not enough: siqa_bb's first 100 give acc_norm 0.41 +- 0.05 (1.5 SE),
    sciq_bb's about 0.41 +- 0.05 (3.2 SE). Other figures (limit 200): siqa_bb acc 0.350 +- 0.034,
    winogrande_bb 0.620 +- 0.034 (chance 0.5), mmlu_dev 0.235 +- 0.030 (chance 0.25)."""
    from ptqcore.eval.zeroshot import zeroshot

    rows = zeroshot(smollm2.model, smollm2.tokenizer, ["siqa_bb", "sciq_bb"], limit=200, progress=False)
    rows += zeroshot(smollm2.model, smollm2.tokenizer, ["lastword_wiki"], limit=40, progress=False)
    wanted = {"siqa_bb": "acc_norm", "sciq_bb": "acc", "lastword_wiki": "acc"}
    got = {r["dataset"]: r for r in rows if r["metric"] == wanted[r["dataset"]]}
    assert set(got) == set(wanted)
    report = {name: (round(r["value"], 3), round(r["stderr"], 3)) for name, r in got.items()}
    print("SmolLM2 fp above chance:", report)
    for name, r in got.items():
        margin = r["value"] - OFFLINE_TASKS[name].chance
        assert margin > 3 * r["stderr"], report


# --------------------------------------------------------------------------- CLI and rows

@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "sicq_bb"], "unknown task 'sicq_bb' (did you mean"),
        (["--tasks", "no_such_task_at_all"], "offline: winogrande_bb, siqa_bb, sciq_bb, mmlu_dev, lastword_wiki"),
        (["--tasks", "winogrande"], "HF_HUB_OFFLINE is set; offline alternative: winogrande_bb"),
        (["--tasks", "lambada_openai"], "offline alternative: lastword_wiki"),
        (["--tasks", "siqa_bb,siqa_bb"], "a task is repeated"),
        (["--task-limit", "5"], "needs --tasks"),
        (["--tasks", "siqa_bb", "--task-limit", "0"], "task limit must be positive"),
        (["--method", "rtn", "--setting", "w4a8", "--export", "x"], "weight-only settings"),
        (["--method", "rtn", "--setting", "w5g32", "--export", "x"], "weight-only settings"),
    ],
)
def test_bad_task_input_one_line_exit_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PTQCORE_CACHE", str(tmp_path / "empty-cache"))  # nothing is loaded or built
    code, _, err = run_cli(capsys, "run", "--model", "smollm2-135m", *args, "--out", str(tmp_path / "res"))
    assert code == 2, err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists() and not (tmp_path / "empty-cache").exists()


def test_missing_lm_eval_says_what_to_install(capsys, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    code, _, err = run_cli(capsys, "run", "--model", "smollm2-135m", "--tasks", "siqa_bb", "--out", str(tmp_path))
    assert code == 2 and "pip install lm-eval" in err


def test_list_tasks(capsys):
    code, out, _ = run_cli(capsys, "list", "tasks")
    assert code == 0
    for word in (*OFFLINE_TASKS, "bigbench==1.0.0", "CC-BY-4.0", "piqa", "arc_easy", "hellaswag", "mmlu",
                 "offline alternative: winogrande_bb"):
        assert word in out


def test_run_records_task_rows_cost_and_export(capsys, tmp_path):
    out = tmp_path / "res"
    code, stdout, err = run_cli(capsys, "run", "--model", "tiny-llama", "--method", "rtn", "--setting", "w4g32",
                                "--tasks", "sciq_bb,lastword_wiki", "--task-limit", "4", "--export",
                                str(tmp_path / "packed"), "--out", str(out), *TINY_RUN)
    assert code == 0, err
    rows = ResultsStore(out).rows()
    by = {(r["dataset"], r["metric"]): r for r in rows}
    assert set(by) == {("wiki", "ppl"), ("sciq_bb", "acc"), ("sciq_bb", "acc_norm"), ("lastword_wiki", "acc")}
    acc = by[("sciq_bb", "acc")]
    assert acc["limit"] == 4 and acc["task_items"] == 4 and acc["seed"] == 0 and acc["stderr"] > 0
    assert acc["chance"] == pytest.approx(OFFLINE_TASKS["sciq_bb"].chance) and acc["num_fewshot"] == 0
    assert acc["lm_eval_version"] == "0.4.13" and acc["seqlen"] is None and acc["scored_tokens"] is None
    assert not any("," in k for r in rows for k in r)  # no "acc,none" composites anywhere
    for r in rows:  # the cost of the run is in every row
        assert 4.6 < r["bits_per_weight"] < 6.0 and r["model_bytes"] > 0
        assert r["export_bytes"] == (tmp_path / "packed" / "model.safetensors").stat().st_size
    assert by[("wiki", "ppl")]["limit"] == 1  # the perplexity limit stays the profile's/--limit
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    assert "sciq_bb acc" in stdout and "bits/weight" in stdout
    # the same config is recognised as recorded; a different task limit is a different config
    code, stdout, _ = run_cli(capsys, "run", "--model", "tiny-llama", "--method", "rtn", "--setting", "w4g32",
                              "--tasks", "sciq_bb,lastword_wiki", "--task-limit", "4", "--out", str(out), *TINY_RUN)
    assert code == 0 and stdout.startswith("skip:")


def test_unreachable_bigbench_fails_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import subprocess

    from ptqcore.tasks import build

    def no_network(work, progress):
        (work / "dl").mkdir()
        (work / "tmp").mkdir()
        return subprocess.CompletedProcess([], 1, "ERROR: No matching distribution found for bigbench==1.0.0\n", "")

    monkeypatch.setattr(build, "_pip_download_bigbench", no_network)
    monkeypatch.setenv("PTQCORE_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "run", "--model", "smollm2-135m", "--tasks", "siqa_bb",
                           "--out", str(tmp_path / "res"))
    assert code == 2 and "pip download bigbench==1.0.0 --no-deps --no-binary :all:" in err and err.count("\n") == 1
    assert not (tmp_path / "cache" / "models").exists() and not (tmp_path / "res").exists()
    assert [p.name for p in (tmp_path / "cache" / "tasks").iterdir()] == []  # no partial download left behind
