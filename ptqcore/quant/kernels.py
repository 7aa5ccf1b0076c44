"""Pure quantizer kernels on tensors: no modules, no hooks, no model knowledge.

Weight semantics are those of the GPTQ reference `Quantizer` (IST-DASLab/gptq, quant.py):
per row, the range [min(x, 0), max(x, 0)] (zero always representable), an all-zero row
gets [-1, 1], `scale = (max - min) / maxq`, `zero = round(-min / scale)`; symmetric uses
max|x| on both sides and the midpoint zero `(maxq + 1) / 2`. Codes are
`clamp(round(x / scale) + zero, 0, maxq)`, values `scale * (code - zero)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import ActSpec, QuantSpec


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of `x` on the grid (`scale`, `zero`), broadcast."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize: what the quantized model computes with."""
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)


def _minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of a 2-D tensor `x` ([rows, cols] -> two [rows, 1]).

    With `spec.mse`, the GPTQ reference's clip search: shrink the range by `p = 1 - i/grid`
    for `i < maxshrink * grid` and keep, per row, the `p` with the least `sum |x - q(x)|^norm`.
    """
    if x.dim() != 2:
        raise ValueError(f"find_params expects a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.float()
    maxq = spec.maxq
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros) * spec.clip_ratio
    xmax = torch.maximum(x.max(dim=1).values, zeros) * spec.clip_ratio
    scale, zero = _minmax_params(xmin, xmax, maxq, spec.sym)
    if spec.mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(spec.maxshrink * spec.grid)):
            p = 1 - i / spec.grid
            scale1, zero1 = _minmax_params(p * xmin, p * xmax, maxq, spec.sym)
            err = (fake_quant(x, scale1[:, None], zero1[:, None], maxq) - x).abs_().pow_(spec.norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    return scale[:, None], zero[:, None]


def group_bounds(columns: int, group_size: int | None) -> list[tuple[int, int]]:
    """Column ranges of the groups of a row; the last group may be partial (GPTQ reference)."""
    if group_size is None:
        return [(0, columns)]
    return [(start, min(start + group_size, columns)) for start in range(0, columns, group_size)]


@dataclass
class QuantizedWeight:
    """A weight quantized on a grid: integer codes plus per-(row, group) scale and zero.

    `scale`/`zero` are [rows, groups]; `g_idx[c]` is the group of input column `c`
    (the layout of the GPTQ checkpoint format).
    """

    codes: torch.Tensor  # [rows, cols], integer values stored as float
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale[:, self.g_idx], self.zero[:, self.g_idx])


def check_group_size(columns: int, spec: QuantSpec, layer: str = "weight") -> None:
    if spec.group_size is not None and spec.group_size > columns:
        raise ValueError(
            f"group size {spec.group_size} is larger than the input size {columns} of layer {layer}"
        )


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a [out, in] weight, per channel or per group."""
    check_group_size(w.shape[1], spec)
    w = w.float()
    bounds = group_bounds(w.shape[1], spec.group_size)
    scales, zeros, codes = [], [], []
    for start, end in bounds:
        s, z = find_params(w[:, start:end], spec)
        scales.append(s)
        zeros.append(z)
        codes.append(quantize(w[:, start:end], s, z, spec.maxq))
    g_idx = torch.cat([torch.full((end - start,), i, dtype=torch.long) for i, (start, end) in enumerate(bounds)])
    return QuantizedWeight(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), g_idx.to(w.device), spec.bits)


def fake_quant_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN fake-quantized copy of `w` in its own dtype."""
    return quantize_weight(w, spec).dequantize().to(w.dtype)


def fake_quant_act(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """Dynamic per-token fake quantization of activations `[..., features]`.

    Symmetric: `scale = clip * max|x| / (2^(b-1) - 1)` per token, codes in
    [-(2^(b-1) - 1), 2^(b-1) - 1]; asymmetric: min-max per token on [0, 2^b - 1].
    """
    xf = x.float()
    if spec.sym:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = (xf.abs().amax(dim=-1, keepdim=True) * spec.clip_ratio).clamp(min=1e-8) / qmax
        out = torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale
    else:
        maxq = 2**spec.bits - 1
        xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * spec.clip_ratio
        xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * spec.clip_ratio
        scale = ((xmax - xmin) / maxq).clamp(min=1e-8)
        zero = torch.round(-xmin / scale)
        out = fake_quant(xf, scale, zero, maxq)
    return out.to(x.dtype)
