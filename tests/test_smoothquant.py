"""The fold helpers of ptqcore.transforms.smooth and SmoothQuant: equivalence on tiny Llamas and
the real SmolLM2, the reference formula, pipelines end to end, determinism."""

import copy

import pytest
import torch
from torch import nn

from ptqcore import data
from ptqcore.calib import capture_block_inputs, quantize_blockwise
from ptqcore.methods import get_method
from ptqcore.methods.smoothquant import apply_smoothquant_block, smooth_scales
from ptqcore.models import adapter_for
from ptqcore.pipeline import build_pipeline, quantize_model
from ptqcore.quant import ActSpec, QuantSpec
from ptqcore.transforms.smooth import fold_scale, fold_skip_reason, scale_linear_linear, scale_norm_linears

from conftest import logits, make_tiny_llama, rel_err
from conftest import token_ids as ids


pytestmark = pytest.mark.usefixtures("one_thread")


def wide_scales(n, seed):
    """Positive scales spanning ~3 orders of magnitude: a wrong fold would show."""
    return torch.exp(2 * torch.randn(n, generator=torch.Generator().manual_seed(seed)))


def test_scale_norm_linears_and_linear_linear_with_biases():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    norm, fc1, fc2, head = nn.LayerNorm(8), nn.Linear(8, 12), nn.Linear(8, 5), nn.Linear(12, 3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    before = head(fc1(norm(x))), fc2(norm(x))
    scale_norm_linears(norm, [fc1, fc2], wide_scales(8, 1))
    scale_linear_linear(fc1, [head], wide_scales(12, 2))
    after = head(fc1(norm(x))), fc2(norm(x))
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(norm.bias, nn.LayerNorm(8).bias)  # the bias was scaled too
    with pytest.raises(ValueError, match="finite and positive"):
        scale_norm_linears(norm, [fc1], -torch.ones(8))
    with pytest.raises(ValueError, match="8 scales for 12 channels"):
        scale_linear_linear(fc1, [head], torch.ones(8))


def test_fold_scale_every_group_preserves_logits_mha():
    """num_key_value_heads == num_attention_heads: all four groups fold, v -> o included."""
    model = make_tiny_llama(num_key_value_heads=4)
    adapter = adapter_for(model)
    tokens = ids()
    ref = logits(model, tokens)
    before = copy.deepcopy(model.state_dict())
    for b, block in enumerate(adapter.get_blocks(model)):
        for g, group in enumerate(adapter.groups):
            assert fold_skip_reason(block, group) is None
            fold_scale(block, group, wide_scales(block.get_submodule(group.linears[0]).in_features, 10 * b + g))
    after = model.state_dict()
    for name in ("self_attn.v_proj", "self_attn.o_proj", "input_layernorm", "mlp.up_proj", "mlp.down_proj"):
        key = f"model.layers.0.{name}.weight"
        assert not torch.allclose(after[key], before[key]), name
    assert rel_err(logits(model, tokens), ref) < 1e-5


def test_fold_scale_refuses_v_to_o_under_gqa():
    model = make_tiny_llama()  # 4 query heads, 2 kv heads: v_proj has 32 outputs, o_proj 64 inputs
    adapter = adapter_for(model)
    block = adapter.get_blocks(model)[0]
    reasons = {group.name: fold_skip_reason(block, group) for group in adapter.groups}
    assert reasons["attn_in"] is None and reasons["mlp_in"] is None and reasons["mlp_out"] is None
    assert "32 outputs" in reasons["attn_out"] and "64 inputs" in reasons["attn_out"]
    with pytest.raises(ValueError, match="cannot fold a scale in front of attn_out"):
        fold_scale(block, adapter.groups[1], torch.ones(64))


def smooth_only(model, tokens, alpha=0.5):
    """SmoothQuant's transform alone (no quantizer after it); returns the per-block states."""
    sq = get_method("smoothquant", alpha=alpha)
    return quantize_blockwise(model, adapter_for(model), sq.process_block, tokens, progress=False).states


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_smoothquant_transform_preserves_logits(kv_heads):
    model = make_tiny_llama(num_key_value_heads=kv_heads)
    tokens = ids()
    ref = logits(model, tokens)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    states = smooth_only(model, tokens)
    assert set(states[0]["scales"]) == {"attn_in", "mlp_in"}
    assert set(states[0]["skipped"]) == {"attn_out", "mlp_out"}
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)
    assert rel_err(logits(model, tokens), ref) < 1e-5


def test_smoothquant_scales_follow_the_reference_formula():
    """Block 0: s_j = max|X_j|^a / max|W_j|^(1-a) with X the input_layernorm output of the
    calibration tokens, computed here independently from the unmodified model."""
    alpha = 0.7
    ref_model = make_tiny_llama()
    model = make_tiny_llama()
    tokens = ids()
    block = ref_model.model.layers[0]
    hidden, _ = capture_block_inputs(ref_model, adapter_for(ref_model), tokens)
    with torch.no_grad():
        act_max = block.input_layernorm(hidden).abs().amax(dim=(0, 1))
    w_max = torch.cat([block.self_attn.q_proj.weight, block.self_attn.k_proj.weight,
                       block.self_attn.v_proj.weight]).abs().amax(0)
    expected = (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    states = smooth_only(model, tokens, alpha)
    state = states[0]["scales"]["attn_in"]
    torch.testing.assert_close(state["scales"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(state["act_max"], act_max)
    torch.testing.assert_close(smooth_scales(act_max, [block.self_attn.q_proj.weight, block.self_attn.k_proj.weight,
                                                       block.self_attn.v_proj.weight], alpha), expected)
    # Replaying the state on the original model gives the smoothed block exactly.
    apply_smoothquant_block(block, adapter_for(ref_model), states[0])
    for (name, p), q in zip(block.named_parameters(), model.model.layers[0].parameters()):
        assert torch.equal(p, q), name


def test_smoothquant_preserves_smollm2_logits(smollm2):
    model = copy.deepcopy(smollm2.model)
    tok = smollm2.tokenizer
    calib = data.calibration_windows(data.tokenize_split("wiki", "train", tok), 2, 64, 0)
    tokens = data.tokenize_split("wiki", "test", tok)[None, :32]
    ref = logits(smollm2.model, tokens)
    states = smooth_only(model, calib)
    assert len(states) == 30
    assert max(s["scales"]["attn_in"]["scales"].max().item() for s in states) > 2  # really rescaled
    assert rel_err(logits(model, tokens), ref) < 1e-4


@pytest.mark.parametrize("name, steps", [("smoothquant", ["smoothquant", "rtn"]),
                                         ("smoothquant+gptq", ["smoothquant", "gptq"])])
@pytest.mark.parametrize("act", [None, ActSpec(8)])
def test_smoothquant_pipelines_end_to_end(name, steps, act):
    model = make_tiny_llama()
    tokens = ids()
    ref = logits(model, tokens)
    pipeline = build_pipeline(name, QuantSpec(4, 32), {"alpha": 0.6})
    assert pipeline.step_names == steps and pipeline.config()["smoothquant"]["alpha"] == 0.6
    result = quantize_model(model, adapter_for(model), pipeline, tokens, act, progress=False)
    assert set(result.states[0]) == set(steps) and result.weight_rel_change > 0
    out = logits(model, tokens)
    assert torch.isfinite(out).all()
    assert 0 < rel_err(out, ref) < 0.5
    assert len(result.act_hooks) == (14 if act else 0)


def test_smoothquant_helps_w8a4_with_activation_outliers():
    """A model whose norms create a few outlier channels: smoothing before per-token 4-bit
    activation quantization gives a lower logit error than RTN alone (the paper's setting)."""
    def outlier_model():
        model = make_tiny_llama(num_key_value_heads=4)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[:4] *= 30
                layer.post_attention_layernorm.weight[:4] *= 30
        return model

    tokens = ids(8)
    ref = logits(outlier_model(), tokens)
    errors = {}
    for name in ("rtn", "smoothquant"):
        model = outlier_model()
        pipeline = build_pipeline(name, QuantSpec(8))
        quantize_model(model, adapter_for(model), pipeline, tokens, ActSpec(4), progress=False)
        errors[name] = rel_err(logits(model, tokens), ref)
    assert errors["smoothquant"] < 0.8 * errors["rtn"], errors


def test_smoothquant_config_and_determinism():
    with pytest.raises(ValueError, match="alpha must be in"):
        get_method("smoothquant", alpha=1.5)
    with pytest.raises(ValueError, match="has no option"):
        get_method("smoothquant", beta=0.5)
    tokens = ids()
    a, b = smooth_only(make_tiny_llama(), tokens), smooth_only(make_tiny_llama(), tokens)
    for sa, sb in zip(a, b):
        for group in sa["scales"]:
            assert torch.equal(sa["scales"][group]["scales"], sb["scales"][group]["scales"])
