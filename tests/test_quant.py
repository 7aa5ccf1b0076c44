"""Quantizer kernels against the GPTQ reference semantics."""

import pytest
import torch

from ptqcore.quant import (
    ActSpec, QuantSpec, dequantize, fake_quant, fake_quant_act, fake_quant_weight, find_params, group_bounds,
    parse_setting, quantize, quantize_weight, setting_name,
)


def reference_find_params(x, bits, sym):
    """Transcription of IST-DASLab/gptq quant.Quantizer.find_params (perchannel, weight=True, no mse)."""
    maxq = torch.tensor(2**bits - 1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_find_params_matches_reference(bits, sym):
    torch.manual_seed(bits)
    x = torch.randn(16, 40) * 3
    x[3] = 0.0  # all-zero row -> range [-1, 1]
    x[4] = x[4].abs() + 0.5  # positive row: zero forced into the range
    scale, zero = find_params(x, QuantSpec(bits=bits, sym=sym))
    ref_scale, ref_zero = reference_find_params(x.clone(), bits, sym)
    torch.testing.assert_close(scale, ref_scale)
    torch.testing.assert_close(zero, ref_zero)
    if sym:
        assert torch.all(zero == (2**bits) / 2)
    else:
        assert zero[4].item() == 0  # an all-positive row: min clamped to 0


def test_asymmetric_grid_contains_zero_and_extremes():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    spec = QuantSpec(bits=4)
    scale, zero = find_params(x, spec)
    q = quantize(x, scale, zero, spec.maxq)
    assert q.min() >= 0 and q.max() <= 15 and torch.all(q == q.round())
    # zero is exactly representable; min and max of each row map to codes 0 and maxq
    assert torch.all(dequantize(zero, scale, zero) == 0)
    deq = fake_quant(x, scale, zero, spec.maxq)
    assert torch.all((deq - x).abs() <= scale / 2 + 1e-6)


def test_fake_quant_is_idempotent():
    torch.manual_seed(1)
    w = torch.randn(32, 100)
    # Asymmetric min-max grids map a row's extremes onto codes 0 and maxq, so re-quantizing
    # finds the same grid. (The reference's symmetric grid is not idempotent: its top code
    # is clamped away, so max|x| shrinks on every pass; MSE search may pick another shrink.)
    for spec in [QuantSpec(3), QuantSpec(4, 32), QuantSpec(2, 64), QuantSpec(8, 16)]:
        once = fake_quant_weight(w, spec)
        twice = fake_quant_weight(once, spec)
        torch.testing.assert_close(once, twice, rtol=0, atol=1e-6)


def test_groups_with_partial_last_group():
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(100, None) == [(0, 100)]
    torch.manual_seed(2)
    w = torch.randn(4, 576)
    qw = quantize_weight(w, QuantSpec(3, 128))
    assert qw.scale.shape == (4, 5)
    assert qw.g_idx.tolist() == [i // 128 for i in range(576)]
    # the partial group's parameters come from its 64 columns only
    s, z = find_params(w[:, 512:], QuantSpec(3))
    torch.testing.assert_close(qw.scale[:, 4:5], s)
    torch.testing.assert_close(qw.zero[:, 4:5], z)
    # each group equals per-channel quantization of that slice
    for g, (a, b) in enumerate(group_bounds(576, 128)):
        torch.testing.assert_close(qw.dequantize()[:, a:b], fake_quant_weight(w[:, a:b], QuantSpec(3)))


def test_group_size_larger_than_input_names_the_layer():
    with pytest.raises(ValueError, match="larger than the input size 64 of layer weight"):
        quantize_weight(torch.randn(4, 64), QuantSpec(4, 128))


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(3)
    w = torch.randn(64, 256)
    w[:, 0] *= 20  # outliers make clipping worthwhile
    plain = (fake_quant_weight(w, QuantSpec(3)) - w).abs().pow(2.4).sum(1)
    mse = (fake_quant_weight(w, QuantSpec(3, mse=True)) - w).abs().pow(2.4).sum(1)
    assert torch.all(mse <= plain + 1e-4)
    assert mse.sum() < 0.9 * plain.sum()


def test_same_input_same_result():
    torch.manual_seed(4)
    w = torch.randn(16, 96)
    a = quantize_weight(w, QuantSpec(3, 32, mse=True))
    b = quantize_weight(w.clone(), QuantSpec(3, 32, mse=True))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_activation_fake_quant_per_token():
    torch.manual_seed(5)
    x = torch.randn(2, 7, 33)
    x[0, 0] *= 100  # one loud token must not change the others' scales
    y = fake_quant_act(x, ActSpec(8))
    qmax = 127
    scale = x.abs().amax(-1, keepdim=True) / qmax
    torch.testing.assert_close(y, torch.round(x / scale).clamp(-qmax, qmax) * scale)
    assert torch.all((y - x).abs() <= scale / 2 + 1e-6)
    y4 = fake_quant_act(x, ActSpec(4))
    assert (y4 - x).abs().mean() > (y - x).abs().mean()
    ya = fake_quant_act(x, ActSpec(8, sym=False))
    assert ya.shape == x.shape and (ya - x).abs().max() < x.abs().max() / 100


@pytest.mark.parametrize("bad", [1, 9, 0, 3.0, True])
def test_bits_validated(bad):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        QuantSpec(bits=bad)


@pytest.mark.parametrize("bad", [0, -128])
def test_group_size_validated(bad):
    with pytest.raises(ValueError, match="group size must be a positive integer"):
        QuantSpec(bits=4, group_size=bad)


def test_setting_names_round_trip():
    assert QuantSpec(4).name == "w4" and QuantSpec(3, 128).name == "w3g128"
    spec, act = parse_setting("w4a8")
    assert spec == QuantSpec(4) and act == ActSpec(8)
    assert setting_name(*parse_setting("w2g64")) == "w2g64"
    assert setting_name(None) == "fp"
    with pytest.raises(ValueError, match="bad setting name"):
        parse_setting("int4")
