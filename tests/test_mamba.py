"""Mamba: the mixer exposed so every linear is a module call, every method and pipeline on a tiny
random Mamba, equivalence transforms exact (or skipped with a stated reason), and the mamba-wiki
recipe at a tiny size."""

import json
import types

import pytest
import torch

from ptqcore.calib import BlockContext, capture_block_inputs, quantize_blockwise
from ptqcore.methods import get_method
from ptqcore.methods.omniquant import OmniBlock
from ptqcore.models import adapter_for
from ptqcore.models.mamba import DeltaProjection, scan_for_training
from ptqcore.pipeline import build_pipeline, quantize_model
from ptqcore.quant import ActSpec, QuantSpec

from conftest import logits, quantize_and_check, rel_err, token_ids, quip_transform_only

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = QuantSpec(4, 32)
METHODS = ["rtn", "gptq", "awq", "smoothquant", "quarot+rtn", "quip", "omniquant"]
PIPELINES = ["quarot+gptq", "quip+gptq", "awq+gptq", "smoothquant+gptq", "awq+omniquant"]
LINEARS = {"mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"}
FULL_PRECISION = ("conv1d.weight", "conv1d.bias", "A_log", "mixer.D", "dt_proj.bias", "norm")


def make_mamba(seed: int = 0, **overrides):
    """A tiny random Mamba: hidden 64, inner 128, state 8, time-step rank 32, 2 blocks; norms and
    the skip D randomised so folding mistakes would show."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
               time_step_rank=32, use_cache=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("mixer.D"):
                p.uniform_(0.5, 1.5)
    return model


def ids(n=4, length=32):
    return token_ids(n, length)


def test_exposed_mixer_computes_the_same_function_and_calls_dt_proj():
    model = make_mamba()
    reference = make_mamba()  # transformers' own mixer
    ref = logits(reference, ids())
    adapter = adapter_for(model)
    blocks = adapter.get_blocks(model)
    adapter.get_blocks(model)  # idempotent
    assert type(blocks[0].mixer).__name__ == "ExposedMambaMixer" and isinstance(blocks[0].mixer.dt_proj, DeltaProjection)
    assert set(model.state_dict()) == set(reference.state_dict())
    assert rel_err(logits(model, ids()), ref) < 1e-6
    seen = []
    blocks[1].mixer.dt_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    logits(model, ids())
    assert seen == [(4, 32, 32)]  # [batch, length, time-step rank]: the hook fires
    # generation (conv and recurrent caches, one token at a time) is unchanged too
    prompt = ids(1, 8)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(out, reference.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True))


def test_adapter_data():
    model = make_mamba()
    adapter = adapter_for(model)
    assert adapter.name == "mamba" and [g.name for g in adapter.groups] == ["in", "x", "dt", "out"]
    assert set(adapter.linears(adapter.get_blocks(model)[0])) == LINEARS
    assert [g.name for g in adapter.norm_groups()] == ["in"] and adapter.residual_writers == ("mixer.out_proj",)
    dt = adapter.groups[2]
    assert dt.prev == "mixer.x_proj" and dt.prev_rows == (0, 32)
    assert adapter.value_out is None and "no attention" in adapter.note("rotate_heads")


def test_mamba2_is_refused_with_the_reason():
    from transformers import Mamba2Config

    with pytest.raises(ValueError, match="Mamba2ForCausalLM is not supported.*no x_proj / dt_proj.*supported: mamba"):
        adapter_for(types.SimpleNamespace(config=Mamba2Config()))


def test_group_wider_than_dt_proj_is_refused_naming_the_layer():
    model = make_mamba(time_step_rank=16)
    with pytest.raises(ValueError, match="group size 32 is larger than the input size 16 of layer mixer.dt_proj"):
        quantize_model(model, adapter_for(model), build_pipeline("rtn", SPEC), None, progress=False)


@pytest.mark.parametrize("name", METHODS + PIPELINES)
def test_every_method_and_pipeline_runs(name):
    model = make_mamba()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if any(k in n for k in FULL_PRECISION)}
    quantize_and_check(model, adapter_for(model), name, SPEC, ids())
    params = dict(model.named_parameters())
    for n, p in before.items():  # conv1d, A_log, D and dt's bias are never touched
        if not n.endswith("norm.weight") and "norm_f" not in n:  # norms absorb folds (AWQ, SmoothQuant, LET, QuaRot)
            assert torch.equal(params[n], p), n


def test_gptq_collects_a_hessian_for_every_linear():
    from ptqcore.methods.gptq import GPTQ

    model = make_mamba()
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, ids())
    assert hidden.shape == (4, 32, 64) and kwargs.get("cache") is None
    block = adapter.get_blocks(model)[0]
    ctx = BlockContext(0, block, adapter, hidden, kwargs)
    gptq = get_method("gptq", spec=SPEC)
    assert isinstance(gptq, GPTQ)
    for group in adapter.groups:
        (H,) = gptq._hessian(ctx, group)
        assert H.shape[0] == ctx.linear(group.linears[0]).in_features and H.diagonal().sum() > 0, group.name


def test_weight_activation_setting_hooks_every_linear():
    model = make_mamba()
    adapter = adapter_for(model)
    result = quantize_model(model, adapter, build_pipeline("quarot+rtn", SPEC), ids(), ActSpec(8), progress=False)
    assert len(result.act_hooks) == 2 * 4
    assert torch.isfinite(logits(model, ids())).all()


# --- equivalence transforms keep the logits (float32, < 1e-4 relative) ----------------------

def _transform_only(model, method, tokens, **knobs):
    step = get_method(method, spec=SPEC, **knobs)
    adapter = adapter_for(model)
    prepared = step.prepare(model, adapter)
    return prepared, quantize_blockwise(model, adapter, step.process_block, tokens, progress=False)


def test_awq_scales_norm_and_dt_rows_exactly():
    model = make_mamba()
    ref = logits(model, ids())
    x_proj = model.backbone.layers[0].mixer.x_proj.weight.detach().clone()
    _, result = _transform_only(model, "awq", ids(), clip=False)
    assert rel_err(logits(model, ids()), ref) < 1e-4
    state = result.states[0]
    assert set(state["scales"]) == {"in", "dt"} and state["scales"]["dt"]["scales"].shape == (32,)
    assert set(state["skipped"]) == {"x", "out"} and "no preceding op" in state["skipped"]["x"]
    new = model.backbone.layers[0].mixer.x_proj.weight
    assert not torch.allclose(new[:32], x_proj[:32]) and torch.equal(new[32:], x_proj[32:])  # B, C rows untouched


def test_smoothquant_keeps_the_logits_and_skips_the_inner_groups():
    model = make_mamba()
    ref = logits(model, ids())
    _, result = _transform_only(model, "smoothquant", ids())
    assert rel_err(logits(model, ids()), ref) < 1e-4
    assert set(result.states[0]["scales"]) == {"in"} and set(result.states[0]["skipped"]) == {"x", "dt", "out"}


@pytest.mark.parametrize("hidden, rank", [(64, 32), (48, 24)])  # 48 = 12 x 4, inner 96 = 12 x 8: Paley orders
def test_quarot_rotation_is_exact_and_states_what_it_skips(hidden, rank):
    model = make_mamba(hidden_size=hidden, time_step_rank=rank)
    ref = logits(model, ids())
    embed = model.backbone.embeddings.weight.detach().clone()
    state, _ = _transform_only(model, "quarot", ids())
    assert rel_err(logits(model, ids()), ref) < 1e-4
    assert not torch.allclose(model.backbone.embeddings.weight, embed)  # the residual stream was rotated
    assert state["rotate_heads"].startswith("skipped") and "no attention" in state["rotate_heads"]
    assert state["online_hadamard"] == {"mixer.out_proj": 2 * hidden}
    assert "x_proj" in state["not_rotated"] and "dt_proj" in state["not_rotated"]
    if hidden == 48:  # and the quantized pipeline runs at the non-power-of-two size
        model = make_mamba(hidden_size=hidden, time_step_rank=rank)
        quantize_model(model, adapter_for(model), build_pipeline("quarot+gptq", QuantSpec(4, 16)), ids(), progress=False)
        assert torch.isfinite(logits(model, ids())).all()


def test_quip_without_quantization_keeps_the_logits():
    model = make_mamba()
    ref = logits(model, ids())
    identity_quantizer = quip_transform_only()

    quantize_blockwise(model, adapter_for(model), identity_quantizer, ids(), progress=False)
    assert rel_err(logits(model, ids()), ref) < 1e-4


def test_omniquant_let_at_init_is_exact():
    model = make_mamba()
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, ids())
    block = adapter.get_blocks(model)[0]
    ctx = BlockContext(0, block, adapter, hidden, kwargs)
    ref = ctx.forward()
    omni_method = get_method("omniquant", spec=SPEC)
    _, act_max, _ = omni_method._fp_pass(ctx, hidden, kwargs, [g.input_module for g in adapter.norm_groups()])
    omni = OmniBlock(block, adapter, SPEC, lwc=True, let=True, act_max=act_max)
    assert set(omni.let) == {"in"} and set(omni.lwc) == LINEARS  # LET: norm -> in_proj only (no attention)
    with torch.no_grad():
        assert rel_err(torch.cat([omni(x, kwargs, quantize=False) for x in hidden.split(1)]), ref) < 1e-4
        assert rel_err(torch.cat([omni(x, kwargs, quantize=True) for x in hidden.split(1)]), ref) > 1e-3


# --- the mamba-wiki recipe at a tiny size ---------------------------------------------------

def test_training_scan_matches_transformers_scan():
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 8, 4, 12
    u, dt, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=g) for _ in range(2))
    A = -torch.rand(d, n, generator=g) - 0.5
    D, bias = torch.rand(d, generator=g), torch.randn(d, generator=g)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    ref = mamba_selective_scan(u, dt, A, B, C, **kw)
    assert rel_err(scan_for_training(u, dt, A, B, C, **kw), ref) < 1e-6


def test_exposed_mixer_trains_with_the_same_gradients():
    """Under autograd the exposed mixer scans with `scan_for_training`; its gradients are
    transformers' own."""
    model, reference = make_mamba(), make_mamba()
    adapter_for(model).get_blocks(model)
    grads = []
    for m in (model, reference):
        loss = m(input_ids=ids(2, 16), labels=ids(2, 16)).loss
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert rel_err(grads[0], grads[1]) < 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ptqcore.models.zoo import MODELS, cached_checkpoint

    return AutoTokenizer.from_pretrained(cached_checkpoint(MODELS["smollm2-135m"]))


def test_recipe_at_a_tiny_size_writes_its_card(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from ptqcore.models.mamba import build_mamba

    out = tmp_path / "mamba"
    out.mkdir()
    arch = dict(hidden_size=32, num_hidden_layers=1, state_size=4, time_step_rank=8)
    info = build_mamba(out, tokenizer, "tiny-mamba", arch=arch, train=dict(steps=3, batch=2, seqlen=16, warmup=1),
                       evaluation=dict(seqlen=64, limit=1), progress=False)
    assert info["train_tokens"] == 3 * 2 * 16 and len(info["train_losses"]) == 3
    assert info["train_loss_final"] < info["train_loss_first"] + 1 and info["wiki_test_ppl"] > 1
    assert info["scan_max_rel_diff"] < 1e-5 and info["threads"] == 1
    recorded = json.loads((out / "build.json").read_text())
    assert recorded["build_seconds"] > 0 and recorded["wiki_test_ppl"] == info["wiki_test_ppl"]
    card = (out / "README.md").read_text()
    assert "weak language model" in card and "wiki test perplexity" in card
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.model_type == "mamba" and loaded.config.time_step_rank == 8
    tokens = token_ids(1, 16, vocab=1000)
    assert torch.isfinite(logits(loaded, tokens)).all()


def test_runner_end_to_end_on_a_tiny_checkpoint(tmp_path, tokenizer):
    import math

    from ptqcore.runner import RunSpec, run

    folder = tmp_path / "tiny-mamba"
    make_mamba(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = RunSpec(str(folder), "gptq", SPEC, nsamples=2, calib_seqlen=32, eval_seqlen=64, limit=1)
    rows = run(spec, out=str(tmp_path / "results"), progress=False, log=lambda *a: None)
    assert rows and all(math.isfinite(r["value"]) for r in rows)
