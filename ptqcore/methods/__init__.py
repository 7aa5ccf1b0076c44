"""Method registry: a plain dict from names to method classes.

Every module of this package that defines a `Method` subclass with its own `info` is
registered under `info.name`; adding a method is adding one file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import Method, MethodConfig, MethodInfo
from .gptq import GPTQ, GPTQConfig, gptq_quantize
from .rtn import RTN

FP = MethodInfo("fp", "none", "full precision (no quantization)", "none", needs_calibration=False)


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and "info" in cls.__dict__:
                if cls.info.name in found:
                    raise RuntimeError(f"two methods named {cls.info.name!r}")
                found[cls.info.name] = cls
    return dict(sorted(found.items()))


METHODS: dict[str, type[Method]] = _discover()


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
        raise ValueError(
            f"method {name} has no option {', '.join(sorted(unknown))}; options: {', '.join(cls.Config.knobs())}"
        )
    return cls(cls.Config(**config))


__all__ = ["FP", "GPTQ", "GPTQConfig", "METHODS", "Method", "MethodConfig", "MethodInfo", "RTN",
           "check_method_name", "get_method", "gptq_quantize", "method_names"]
