"""AWQ: the scaling transform alone preserves logits (tiny Llamas, SmolLM2), the searches on
bare tensors (salient channels, the reference's clip layout), plain cacheable state, pipelines
end to end, AWQ vs RTN on SmolLM2 at w3g128, determinism."""

import copy
import io

import pytest
import torch
from torch import nn

from ptqcore import data
from ptqcore.calib import BlockContext, capture_block_inputs, quantize_blockwise
from ptqcore.methods import get_method
from ptqcore.methods.awq import (
    activation_mean,
    apply_awq,
    apply_clip,
    candidate_scales,
    fake_quant_groups,
    search_clip,
    search_scales,
    search_window_indices,
    weight_mean,
)
from ptqcore.models import adapter_for
from ptqcore.pipeline import build_pipeline, quantize_model
from ptqcore.quant import ActSpec, QuantSpec, fake_quant, fake_quant_weight, find_params

from conftest import logits, make_tiny_llama, rel_err
from conftest import token_ids as ids


pytestmark = pytest.mark.usefixtures("one_thread")


def salient_llama(**overrides):
    """A tiny Llama whose norms make a few input channels ~10x larger (AWQ's salient channels)."""
    model = make_tiny_llama(**overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 10
            layer.post_attention_layernorm.weight[:3] *= 10
    return model


def awq_only(model, tokens, spec=QuantSpec(3, 32), **knobs):
    """AWQ's process_block alone, no quantizer after it; returns the per-block states."""
    awq = get_method("awq", spec=spec, **knobs)
    return quantize_blockwise(model, adapter_for(model), awq.process_block, tokens, progress=False).states


def assert_plain(value, where="state"):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), where
            assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, float, int, str, bool)), (where, type(value))


def test_candidate_scales_grid():
    x_mean = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(candidate_scales(x_mean, 0.0), torch.ones(4))  # ratio 0 is plain RTN
    s = candidate_scales(x_mean, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    raw = x_mean.pow(0.5).clamp(min=1e-4)
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    w_mean = torch.tensor([0.5, 0.25, 1.0, 0.5])
    duo = (x_mean.pow(0.5) / (w_mean.pow(0.5) + 1e-4)).clamp(min=1e-4)
    torch.testing.assert_close(candidate_scales(x_mean, 0.5, w_mean), duo / (duo.max() * duo.min()).sqrt())
    w = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, -1.0]])
    torch.testing.assert_close(weight_mean([w], 2), torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (1.0 + 1.0) / 2]),
                               rtol=1e-5, atol=1e-5)
    w = torch.randn(40, 100, generator=torch.Generator().manual_seed(0))
    for spec in (QuantSpec(3, 32), QuantSpec(4), QuantSpec(2, 64, sym=True)):
        assert torch.equal(fake_quant_groups(w, spec), fake_quant_weight(w, spec))
    assert search_window_indices(32, 512, 2048).tolist() == [0, 8, 16, 24]
    assert search_window_indices(4, 128, 2048).tolist() == [0, 1, 2, 3]
    assert search_window_indices(4, 128, None).tolist() == [0, 1, 2, 3]


def test_awq_beats_rtn_on_salient_channels():
    """A layer whose inputs have a few 10x channels: AWQ's scaled-and-quantized weights give a
    lower output error than RTN at w3g128; ratio 0 of the search is exactly RTN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, 512, generator=g)
    x[..., torch.randperm(512, generator=g)[:8]] *= 10
    linear = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(256, 512, generator=g) * 0.05)
    w = linear.weight.detach().clone()
    spec = QuantSpec(3, 128)
    found = search_scales(linear, [linear], x, activation_mean(x), spec)
    assert torch.equal(linear.weight, w)  # the search restored the weights
    assert isinstance(found.scales, torch.Tensor) and found.scales.shape == (512,) and len(found.losses) == 20
    y = x @ w.t()
    err_rtn = (x @ fake_quant_weight(w, spec).t() - y).pow(2).mean().item()
    s = found.scales
    err_awq = (x @ (fake_quant_weight(w * s, spec) / s).t() - y).pow(2).mean().item()
    assert found.losses[0] == pytest.approx(err_rtn, rel=1e-4)
    assert found.ratio > 0 and err_awq == pytest.approx(min(found.losses), rel=1e-4)
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


def reference_clip(w, x, group_size, bits, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """llm-awq's auto_clip_layer, broadcast layout, with our quantizer (the stated deviation)."""
    spec = QuantSpec(bits)
    x = x.reshape(-1, x.shape[-1]).reshape(1, -1, w.shape[1] // group_size, group_size)
    x = x[:, 0 :: x.shape[1] // n_sample_token]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    org_max = w.abs().amax(dim=-1, keepdim=True)
    best = org_max.clone()
    min_errs = torch.ones_like(org_max) * 1e9
    org_out = (x * w).sum(dim=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i_s / n_grid)
        cur = torch.clamp(w, -max_val, max_val)
        flat = cur.reshape(-1, group_size)
        scale, zero = find_params(flat, spec)
        q = fake_quant(flat, scale, zero, spec.maxq).reshape(cur.shape)
        err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        better = err < min_errs
        min_errs[better] = err[better]
        best[better] = max_val[better]
    return best.squeeze(1).squeeze(-1)


def test_search_clip_matches_the_reference_layout_and_partial_groups():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 256, generator=g)
    w[:, 5] *= 8  # outlier weights: clipping pays off
    x = torch.randn(4, 300, 256, generator=g)
    mine = search_clip(w, x, QuantSpec(3, 64))
    ref = reference_clip(w, x, 64, 3)
    assert mine.shape == (300, 4)
    assert (mine == ref).float().mean() > 0.99  # equal up to near-ties of float summation order
    assert (mine < w.abs().reshape(300, 4, 64).amax(-1)).any()  # some groups were clipped
    # A group size that does not divide the layer leaves a last, partial group.
    w576 = torch.randn(64, 576, generator=g)
    clip = search_clip(w576, torch.randn(2, 128, 576, generator=g), QuantSpec(3, 128))
    assert clip.shape == (64, 5)
    linear = nn.Linear(576, 64, bias=False)
    linear.weight.data = w576.clone()
    apply_clip(linear, clip, 128)
    assert (linear.weight[:, 512:].abs().amax(1) <= clip[:, 4] + 1e-7).all()
    assert torch.equal(linear.weight, torch.maximum(torch.minimum(w576, clip.repeat_interleave(128, 1)[:, :576]),
                                                    -clip.repeat_interleave(128, 1)[:, :576]))


@pytest.mark.parametrize("kv_heads, skipped", [(4, set()), (2, {"attn_out"})])
def test_awq_scaling_alone_preserves_logits(kv_heads, skipped):
    """The searched scales (no clip, no quantizer) are an exact equivalence; with MHA v -> o is
    scaled, with GQA it is skipped and the state says why."""
    model = salient_llama(num_key_value_heads=kv_heads)
    tokens = ids()
    ref = logits(model, tokens)
    states = awq_only(model, tokens, clip=False)
    for state in states:
        assert set(state["skipped"]) == skipped and not state["clip"]
        assert set(state["scales"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"} - skipped
    if skipped:
        assert "grouped-query" in states[0]["skipped"]["attn_out"]
    assert any(s["ratio"] > 0 for state in states for s in state["scales"].values())  # really rescaled
    assert rel_err(logits(model, tokens), ref) < 1e-5


def test_awq_scaling_alone_preserves_smollm2_logits(smollm2):
    model = copy.deepcopy(smollm2.model)
    tok = smollm2.tokenizer
    calib = data.calibration_windows(data.tokenize_split("wiki", "train", tok), 1, 32, 0)
    tokens = data.tokenize_split("wiki", "test", tok)[None, :32]
    ref = logits(smollm2.model, tokens)
    states = awq_only(model, calib, QuantSpec(3, 128), clip=False, n_grid=4)
    assert len(states) == 30 and all(set(s["skipped"]) == {"attn_out"} for s in states)  # GQA: 9 q / 3 kv heads
    assert any(s["ratio"] > 0 for state in states for s in state["scales"].values())
    assert rel_err(logits(model, tokens), ref) < 1e-4


def test_awq_state_is_plain_and_replays_exactly():
    """Search once, save the plain state, apply it to a fresh copy: the same weights (caching)."""
    tokens = ids()
    model = salient_llama()
    states = awq_only(model, tokens, QuantSpec(3, 48))  # 64 = 48 + 16: a partial last group
    assert_plain(states)
    assert set(states[0]["clip"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                      "mlp.down_proj"}  # q/k are not clipped, as the reference
    assert states[0]["clip"]["self_attn.v_proj"].shape == (32, 2)
    buffer = io.BytesIO()
    torch.save(states, buffer)
    buffer.seek(0)
    cached = torch.load(buffer, weights_only=True)
    fresh = salient_llama()
    apply_awq(fresh, adapter_for(fresh), cached)
    for (name, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), name
    # Clipping changed the weights, so the model is no longer exactly equivalent.
    assert rel_err(logits(model, tokens), logits(salient_llama(), tokens)) > 0


def test_clip_is_searched_on_the_scaled_block():
    """Block 0's clip maxima are those of `search_clip` on the scaled weights and the inputs
    of the scaled block (the reference's input_feat /= s), not the unscaled inputs."""
    tokens = ids()
    clipped = awq_only(salient_llama(), tokens, QuantSpec(3, 32))[0]
    scaled = salient_llama()
    adapter = adapter_for(scaled)
    scales_only = awq_only(scaled, tokens, QuantSpec(3, 32), clip=False)[0]
    for group in clipped["scales"]:
        assert torch.equal(clipped["scales"][group]["scales"], scales_only["scales"][group]["scales"])
    hidden, kwargs = capture_block_inputs(scaled, adapter, tokens)
    ctx = BlockContext(0, adapter.get_blocks(scaled)[0], adapter, hidden, kwargs)
    checked = 0
    for group in adapter.groups:
        inputs = []
        ctx.feed_inputs(group, inputs.append)
        for name in group.linears:
            if name in clipped["clip"]:
                expected = search_clip(ctx.linear(name).weight, torch.cat(inputs), QuantSpec(3, 32))
                assert (clipped["clip"][name] == expected).float().mean() > 0.99, name
                checked += 1
    assert checked == 5


@pytest.mark.parametrize("name, steps", [("awq", ["awq", "rtn"]), ("awq+gptq", ["awq", "gptq"])])
@pytest.mark.parametrize("act", [None, ActSpec(8)])
def test_awq_pipelines_end_to_end(name, steps, act):
    model = make_tiny_llama()
    tokens = ids()
    ref = logits(model, tokens)
    pipeline = build_pipeline(name, QuantSpec(4, 32), {"n_grid": 10, "duo_scaling": True})
    assert pipeline.step_names == steps and pipeline.config()["awq"]["n_grid"] == 10
    result = quantize_model(model, adapter_for(model), pipeline, tokens, act, progress=False)
    assert set(result.states[0]) == set(steps) and len(result.states[0]["awq"]["scales"]["attn_in"]["losses"]) == 10
    out = logits(model, tokens)
    assert torch.isfinite(out).all()
    assert 0 < rel_err(out, ref) < 0.5
    assert len(result.act_hooks) == (14 if act else 0)


def test_awq_beats_rtn_on_smollm2_w3g128(smollm2):
    """Short calibration (4 x 128 wiki train tokens), errors vs fp on 2 x 128 wiki test tokens.

    The logit error is measured after removing each token's mean logit (softmax ignores it):
    the raw logit MSE is dominated by such per-token shifts and ranks AWQ below RTN
    (38.7 vs 16.7 at the defaults) although AWQ's KL and NLL are clearly better (KL 0.93 vs
    1.31, NLL 4.10 vs 4.58; fp 3.04). For speed the scale search uses one window and a
    10-point grid (knobs), which gave about the same errors as the defaults."""
    tok = smollm2.tokenizer
    calib = data.calibration_windows(data.tokenize_split("wiki", "train", tok), 4, 128, 0)
    evals = data.eval_windows(data.tokenize_split("wiki", "test", tok), 128, limit=2)
    ref = logits(smollm2.model, evals)
    errors = {}
    for name, knobs in (("rtn", {}), ("awq", {"n_grid": 10, "search_tokens": 128})):
        model = copy.deepcopy(smollm2.model)
        quantize_model(model, smollm2.adapter, build_pipeline(name, QuantSpec(3, 128), knobs), calib, progress=False)
        out = logits(model, evals)
        del model
        centered = (out - out.mean(-1, keepdim=True)) - (ref - ref.mean(-1, keepdim=True))
        log_p, log_q = ref.log_softmax(-1), out.log_softmax(-1)
        errors[name] = {"logit_mse": centered.pow(2).mean().item(),
                        "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()}
    assert errors["awq"]["logit_mse"] < 0.9 * errors["rtn"]["logit_mse"], errors
    assert errors["awq"]["kl"] < 0.9 * errors["rtn"]["kl"], errors


def test_awq_config_and_determinism():
    for knobs, message in [({"n_grid": 0}, "n_grid"), ({"max_shrink": 1.0}, "max_shrink"),
                           ({"n_sample_token": -1}, "n_sample_token"), ({"clip": "yes"}, "clip"),
                           ({"search_tokens": 0}, "search_tokens")]:
        with pytest.raises(ValueError, match=message):
            get_method("awq", spec=QuantSpec(4), **knobs)
    with pytest.raises(ValueError, match="weight spec"):
        get_method("awq")
    tokens = ids()
    a, b = awq_only(salient_llama(), tokens), awq_only(salient_llama(), tokens)
    for sa, sb in zip(a, b):
        assert sa["scales"].keys() == sb["scales"].keys() and sa["clip"].keys() == sb["clip"].keys()
        for group in sa["scales"]:
            assert torch.equal(sa["scales"][group]["scales"], sb["scales"][group]["scales"])
            assert sa["scales"][group]["losses"] == sb["scales"][group]["losses"]
        for name in sa["clip"]:
            assert torch.equal(sa["clip"][name], sb["clip"][name])
