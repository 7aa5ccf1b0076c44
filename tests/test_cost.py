"""Cost of a quantized model (effective bits, packed size) and the packed GPTQ-format export."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import logits, make_tiny_llama, token_ids
from ptqcore.cost import linear_packed_bytes, model_cost
from ptqcore.export import export_packed, load_packed, pack_codes, unpack_codes, unpack_linear, pack_linear
from ptqcore.models.adapters import adapter_for
from ptqcore.pipeline import build_pipeline, quantize_model
from ptqcore.quant import QuantSpec, quantize_weight


def reference_unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Independent reader of the GPTQ bit layout: bit j of column c is bit (j % 32) of word j // 32."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, w.shape[1], dtype=torch.int64)
    for k in range(n):
        for b in range(bits):
            j = k * bits + b
            out[k] |= ((w[j // 32] >> (j % 32)) & 1) << b
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 5), generator=g)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert torch.equal(unpack_codes(words, bits, 64), codes)
    assert torch.equal(reference_unpack(words, bits, 64), codes)
    if bits == 4:  # the classic layout: 8 codes per word, the first in the lowest nibble
        first = int(words[0, 0]) & 0xFFFFFFFF
        assert [(first >> (4 * i)) & 15 for i in range(8)] == codes[:8, 0].tolist()


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(16, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="packs"):
        pack_codes(torch.zeros(32, 1, dtype=torch.long), 5)


@pytest.mark.parametrize("v2", [False, True])
def test_linear_round_trip_with_partial_group_and_zero_point_zero(v2):
    torch.manual_seed(0)
    w = torch.randn(32, 96)
    w[0, :40] = w[0, :40].abs()  # a group of non-negative weights: zero point 0 (v1 cannot store it)
    spec = QuantSpec(bits=4, group_size=40)  # groups 40 + 40 + 16: a partial last group
    qw = quantize_weight(w, spec)
    deq = qw.dequantize()
    assert (qw.zero == 0).any()
    packed = pack_linear(deq, qw.scale, qw.zero, qw.g_idx, 4, v2=v2)
    assert packed["qzeros"].shape == (3, 32 * 4 // 32) and packed["scales"].shape == (3, 32)
    back = unpack_linear(packed, 4, 96, 32, v2=v2)
    expect = packed["scales"].float().t()[:, qw.g_idx] * (qw.codes - qw.zero[:, qw.g_idx])
    if v2:
        assert torch.equal(back, expect)
    else:  # v1 stores zero - 1: a zero of 0 comes back as 2^bits (wrapped to 0 only in our reader)
        assert torch.equal(back, expect)
    assert sum(t.numel() * t.element_size() for t in packed.values()) == linear_packed_bytes(32, 96, spec)


def test_off_grid_weight_is_refused():
    w = torch.randn(8, 32)
    qw = quantize_weight(w, QuantSpec(bits=4, group_size=32))
    with pytest.raises(ValueError, match="not on its recorded grid"):
        pack_linear(qw.dequantize() + 0.01, qw.scale, qw.zero, qw.g_idx, 4, v2=True, layer="q_proj")


def test_effective_bits_formula(tiny_llama):
    adapter = adapter_for(tiny_llama)
    spec = QuantSpec(bits=4, group_size=32)
    cost = model_cost(tiny_llama, adapter, spec)
    # one block: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 96x64, down 64x96; g32 groups
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    bits = sum(o * i * 4 + o * (i // 32) * (16 + 4) + i * 32 for o, i in shapes) / sum(o * i for o, i in shapes)
    assert cost.bits_per_weight == pytest.approx(bits)
    assert cost.nominal_bits == pytest.approx(4 + 20 / 32)
    fp = model_cost(tiny_llama, adapter, None)
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert fp.model_bytes == total * 2 and fp.bits_per_weight == 16
    assert cost.model_bytes < fp.model_bytes


@pytest.mark.parametrize("method,setting", [("rtn", QuantSpec(bits=3, group_size=32)),
                                            ("gptq", QuantSpec(bits=4, group_size=32))])
def test_export_reload_gives_fake_quant_logits(tmp_path, one_thread, method, setting):
    model = make_tiny_llama(seed=1)
    adapter = adapter_for(model)
    pipeline = build_pipeline(method, setting, {})
    calib = token_ids(n=4, length=32, seed=1)
    result = quantize_model(model, adapter, pipeline, calib, progress=False)
    tokens = token_ids(n=2, length=16, seed=2)
    expect = logits(model, tokens)
    out = export_packed(model, adapter, result.states, setting, tmp_path / "packed", method_config=pipeline.config(),
                        dtype=torch.float32)
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == setting.bits and q["group_size"] == 32
    assert q["desc_act"] == (method == "gptq") and q["checkpoint_format"] == out["checkpoint_format"]
    reloaded = load_packed(tmp_path / "packed")
    assert torch.allclose(logits(reloaded, tokens), expect, atol=1e-5, rtol=0)
    # float16 storage (the format's default): scales and the other tensors rounded to fp16
    export_packed(model, adapter, result.states, setting, tmp_path / "fp16", method_config=pipeline.config())
    got = logits(load_packed(tmp_path / "fp16"), tokens)
    assert ((got - expect).norm() / expect.norm()).item() < 1e-2
    # the analytic cost is the size of the tensors written (float16 storage), within the file header
    cost = model_cost(model, adapter, setting)
    size = (tmp_path / "fp16" / "model.safetensors").stat().st_size
    assert cost.model_bytes <= size < cost.model_bytes + 16_384


def test_export_refuses_fp_and_unsupported_bits(tmp_path, tiny_llama):
    adapter = adapter_for(tiny_llama)
    with pytest.raises(ValueError, match="weight-only"):
        export_packed(tiny_llama, adapter, [], None, tmp_path)
    with pytest.raises(ValueError, match="weight-only"):
        export_packed(tiny_llama, adapter, [], QuantSpec(bits=5), tmp_path)
    with pytest.raises(ValueError, match="no recorded grid"):
        export_packed(tiny_llama, adapter, [{}, {}], QuantSpec(bits=4), tmp_path)


def test_export_refuses_online_transforms(tmp_path, one_thread):
    model = make_tiny_llama(seed=3)
    adapter = adapter_for(model)
    spec = QuantSpec(bits=4, group_size=32)
    result = quantize_model(model, adapter, build_pipeline("rtn", spec, {}), None, progress=False)
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, args: args)
    with pytest.raises(ValueError, match="online transform"):
        export_packed(model, adapter, result.states, spec, tmp_path)
    handle.remove()
    export_packed(model, adapter, result.states, spec, tmp_path)


def test_cli_export_refuses_a_basis_change(capsys, tmp_path):
    from ptqcore.cli import main

    code = main(["run", "--model", "smollm2-135m", "--method", "quip", "--setting", "w4g32", "--export",
                 str(tmp_path / "x"), "--out", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and "changed basis" in err and not (tmp_path / "res").exists()
