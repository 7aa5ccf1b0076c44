"""Pipelines: validation before loading, option routing, activation quantization."""

import re

import pytest
import torch

from ptqcore.methods import method_names
from ptqcore.models import adapter_for
from ptqcore.pipeline import build_pipeline, install_act_quant, quantize_model, validate_pipeline_name
from ptqcore.quant import ActSpec, QuantSpec

from conftest import make_tiny_llama


@pytest.mark.parametrize(
    "name, message",
    [
        ("gptq+rtn", "has 2 lossy quantizers (gptq, rtn); at most one"),
        ("gptq+bogus", "unknown method 'bogus'; available: " + ", ".join(method_names())),
        ("fp+gptq", "'fp' cannot be part of a pipeline"),
        ("gptq+gptq", "repeats a step"),
        ("quip+omniquant", "quip changes each layer's basis, which omniquant does not support; use one of: gptq, rtn"),
        ("omniquant+awq", "transform 'awq' comes after quantizer 'omniquant'"),
        ("smoothquant+awq+gptq+rtn", "has 2 lossy quantizers"),
    ],
)
def test_invalid_chains_refused(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_pipeline_name(name)


def test_option_routing():
    p = build_pipeline("gptq", QuantSpec(3, 32), {"gptq.act_order": False, "percdamp": 0.05})
    assert p.config()["gptq"]["act_order"] is False and p.config()["gptq"]["percdamp"] == 0.05
    with pytest.raises(ValueError, match="names step 'awq', not in the pipeline"):
        build_pipeline("gptq", QuantSpec(3), {"awq.grid": 10})


def test_transform_sets_quantizer_defaults_beneath_user_options():
    assert build_pipeline("quip", QuantSpec(3)).config()["gptq"]["act_order"] is False
    assert build_pipeline("quip+gptq", QuantSpec(3), {"gptq.act_order": True}).config()["gptq"]["act_order"] is True
    assert build_pipeline("gptq", QuantSpec(3)).config()["gptq"]["act_order"] is True
    quarot = build_pipeline("quarot", QuantSpec(3))  # QuaRot's reference: GPTQ, act_order off
    assert quarot.step_names == ["quarot", "gptq"] and quarot.config()["gptq"]["act_order"] is False
    assert "act_order" not in build_pipeline("quip+rtn", QuantSpec(3)).config()["rtn"]


def test_profile_method_defaults_apply_beneath_user_options():
    from ptqcore.runner import RunSpec

    def epochs(method="omniquant", profile="cpu", **options):
        return RunSpec("tiny-llama", method, QuantSpec(3, 128), profile=profile, options=options).config()[
            "method_config"]["omniquant"]["epochs"]

    assert epochs() == 2  # the cpu profile's reduced count
    assert epochs(profile="paper") == 20  # the reference's scripts
    assert epochs(epochs=5) == 5
    assert epochs("awq+omniquant") == 2
    assert "epochs" not in RunSpec("tiny-llama", "gptq", QuantSpec(3), profile="cpu").config()["method_config"]["gptq"]


def test_weight_activation_rtn_runs_and_hurts_more_at_4_bits():
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = make_tiny_llama()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    errors = {}
    for abits in (8, 4):
        model = make_tiny_llama()
        result = quantize_model(model, adapter_for(model), build_pipeline("rtn", QuantSpec(8)), None, ActSpec(abits),
                                progress=False)
        assert len(result.act_hooks) == 2 * 7
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        errors[abits] = (logits - ref_logits).pow(2).mean().item()
        for handle in result.act_hooks:
            handle.remove()
        with torch.no_grad():  # without the hooks only the (8-bit) weight error remains
            assert (model(ids).logits - ref_logits).pow(2).mean().item() < errors[abits]
    assert errors[4] > errors[8] > 0


def test_act_quant_hook_quantizes_linear_inputs():
    model = make_tiny_llama()
    adapter = adapter_for(model)
    seen = []
    q = adapter.get_blocks(model)[0].self_attn.q_proj
    install_act_quant(model, adapter, ActSpec(4))
    q.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # runs after the act-quant hook
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 16)))
    x = seen[0]
    levels = torch.unique((x / (x.abs().amax(-1, keepdim=True) / 7)).round())
    assert len(levels) <= 15  # symmetric 4-bit per token: at most 15 levels


def test_aliases_share_one_results_key():
    from ptqcore.pipeline import canonical_name
    from ptqcore.results import config_hash
    from ptqcore.runner import RunSpec

    assert [canonical_name(n) for n in ("quip+gptq", "quarot+gptq", "awq+rtn", "AWQ", "fp", "gptq")] == [
        "quip", "quarot", "awq", "awq", "fp", "gptq"]
    assert [canonical_name(n) for n in ("quarot+rtn", "awq+gptq", "awq+omniquant")] == [
        "quarot+rtn", "awq+gptq", "awq+omniquant"]  # a quantizer other than the default is kept

    def key(method):
        return config_hash(RunSpec("tiny-llama", method, QuantSpec(3, 128), profile="cpu").config())

    assert key("quip") == key("quip+gptq") and key("quarot") == key("quarot+gptq")
    assert key("quarot") != key("quarot+rtn")
    assert key("quip+gptq") != config_hash(
        RunSpec("tiny-llama", "quip+gptq", QuantSpec(3, 128), profile="cpu", options={"act_order": True}).config())


def test_rows_are_labelled_with_the_spec_name(tmp_path):
    """A record made as `quip` serves a spec named `quip+gptq`, labelled as the spec asks."""
    from ptqcore import report
    from ptqcore.results import ResultsStore, config_hash, make_rows
    from ptqcore.runner import RunSpec

    quip, alias = (RunSpec("tiny-llama", m, QuantSpec(3, 128), profile="cpu") for m in ("quip", "quip+gptq"))
    base = {"config_hash": config_hash(quip.config()), "model": "tiny-llama", "method": "quip", "setting": "w3g128",
            "wbits": 3, "abits": 16, "dataset": "wiki"}
    ResultsStore(tmp_path).write_run(make_rows(base, [{"metric": "ppl", "value": 12.0}]))
    assert report.missing([alias], tmp_path) == []
    assert list(report.rows_for([alias], tmp_path)["method"]) == ["quip+gptq"]
    assert sorted(report.rows_for([quip, alias], tmp_path)["method"]) == ["quip", "quip+gptq"]


def test_a_run_on_more_datasets_serves_a_spec_on_fewer(tmp_path):
    """Perplexity does not depend on what else a run evaluated: a wiki+sotu record answers a
    wiki-only spec (its wiki rows only), never the reverse, and an exact record comes first."""
    from ptqcore import report
    from ptqcore.results import ResultsStore, config_hash, make_rows
    from ptqcore.runner import RunSpec, run

    def spec(*datasets):
        return RunSpec("tiny-llama", "gptq", QuantSpec(3, 128), profile="cpu", datasets=datasets)

    wide, narrow, reordered, other = spec("wiki", "sotu"), spec("wiki"), spec("sotu", "wiki"), spec("wiki", "c4")
    assert narrow.result_keys()[0] == config_hash(narrow.config())
    assert config_hash(wide.config()) in narrow.result_keys()
    assert config_hash(narrow.config()) not in wide.result_keys()
    store = ResultsStore(tmp_path)
    base = {"config_hash": config_hash(wide.config()), "model": "tiny-llama", "method": "gptq", "setting": "w3g128",
            "wbits": 3, "abits": 16}
    store.write_run(make_rows(base, [{"dataset": "wiki", "metric": "ppl", "value": 12.0},
                                     {"dataset": "sotu", "metric": "ppl", "value": 30.0}]))
    assert report.missing([narrow, reordered, other], tmp_path) == [other]
    rows = report.rows_for([narrow], tmp_path)
    assert list(zip(rows["dataset"], rows["value"])) == [("wiki", 12.0)]
    assert sorted(report.rows_for([wide, narrow], tmp_path)["dataset"]) == ["sotu", "wiki", "wiki"]
    assert run(narrow, out=str(tmp_path), log=lambda *_: None) == []  # skipped: nothing loaded, nothing written
    assert len(store.run_files()) == 1
    store.write_run(make_rows({**base, "config_hash": config_hash(narrow.config())},
                              [{"dataset": "wiki", "metric": "ppl", "value": 11.0}]))
    assert list(report.rows_for([narrow], tmp_path)["value"]) == [11.0]  # its own record first
    assert report.missing([spec("sotu")], tmp_path) == []
