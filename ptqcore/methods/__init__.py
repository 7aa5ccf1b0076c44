"""Method registry: a plain dict from names to method classes."""

from __future__ import annotations

from .base import Method, MethodConfig, MethodInfo
from .gptq import GPTQ, GPTQConfig, gptq_quantize
from .rtn import RTN

METHODS: dict[str, type[Method]] = {cls.info.name: cls for cls in (RTN, GPTQ)}
FP = MethodInfo("fp", "none", "full precision (no quantization)", "none", needs_calibration=False)


def method_names() -> list[str]:
    return sorted([FP.name, *METHODS])


def check_method_name(name: str) -> None:
    if name != FP.name and name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")


def get_method(name: str, **config) -> Method:
    """Instantiate a method with its typed config, e.g. `get_method("gptq", spec=..., act_order=False)`."""
    check_method_name(name)
    if name == FP.name:
        raise ValueError("method 'fp' quantizes nothing; there is no method object for it")
    cls = METHODS[name]
    unknown = set(config) - {"spec", *cls.Config.knobs()}
    if unknown:
        raise ValueError(f"method {name} has no option {', '.join(sorted(unknown))}; options: {', '.join(cls.Config.knobs())}")
    return cls(cls.Config(**config))


__all__ = ["FP", "GPTQ", "GPTQConfig", "METHODS", "Method", "MethodConfig", "MethodInfo", "RTN",
           "check_method_name", "get_method", "gptq_quantize", "method_names"]
