"""Quantizer specs and pure kernels."""

from .kernels import (
    QuantizedWeight,
    check_group_size,
    dequantize,
    fake_quant,
    fake_quant_act,
    fake_quant_weight,
    find_params,
    group_bounds,
    quantize,
    quantize_weight,
)
from .spec import ActSpec, Granularity, QuantSpec, parse_setting, setting_name

__all__ = [
    "ActSpec", "Granularity", "QuantSpec", "QuantizedWeight", "check_group_size", "dequantize",
    "fake_quant", "fake_quant_act", "fake_quant_weight", "find_params", "group_bounds",
    "parse_setting", "quantize", "quantize_weight", "setting_name",
]
