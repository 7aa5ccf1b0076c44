"""Quantization specs: small frozen dataclasses, validated on construction.

A `QuantSpec` describes how one weight tensor is quantized; an `ActSpec` how the
activations entering a linear are fake-quantized at run time. Both serialise to
plain dicts (`to_dict`) for the results store and have a canonical setting name
(`w4`, `w3g128`, `a8`, ...), the names of PROTOCOL.md.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass


class Granularity(str, enum.Enum):
    """Which elements share one scale/zero pair."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"  # one pair per output channel (weight row)
    PER_GROUP = "per_group"  # one pair per `group_size` consecutive input columns of a row
    PER_TOKEN = "per_token"  # activations: one pair per token (row of the input)


@dataclass(frozen=True)
class QuantSpec:
    """Weight quantization: uniform, `bits` wide, per channel or per group of input columns.

    Defaults follow the GPTQ reference `Quantizer`: asymmetric min-max with the zero point
    forced into the range (the range always contains 0), optional MSE clip search over
    `grid` shrink factors down to `1 - maxshrink`, error norm `norm` (2.4).
    `clip_ratio` < 1 shrinks the min-max range before rounding (a fixed clip).
    """

    bits: int = 4
    group_size: int | None = None  # None: per output channel
    sym: bool = False
    clip_ratio: float = 1.0
    mse: bool = False
    grid: int = 100
    maxshrink: float = 0.8
    norm: float = 2.4

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise ValueError(f"group size must be a positive integer (or None for per-channel), got {self.group_size!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.grid <= 0 or not 0.0 <= self.maxshrink < 1.0 or self.norm <= 0:
            raise ValueError("MSE search needs grid > 0, 0 <= maxshrink < 1 and norm > 0")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def granularity(self) -> Granularity:
        return Granularity.PER_CHANNEL if self.group_size is None else Granularity.PER_GROUP

    @property
    def name(self) -> str:
        """Setting name of PROTOCOL.md: `w4`, `w4g128`, ..."""
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size else "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ActSpec:
    """Activation fake-quantization: dynamic, per token, symmetric by default."""

    bits: int = 8
    sym: bool = True
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"activation bits must be an integer in 2..16, got {self.bits!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    @property
    def granularity(self) -> Granularity:
        return Granularity.PER_TOKEN

    @property
    def name(self) -> str:
        return f"a{self.bits}"

    def to_dict(self) -> dict:
        return asdict(self)


_SETTING = re.compile(r"^w(\d+)(?:g(\d+))?(?:a(\d+))?$")


def parse_setting(name: str) -> tuple[QuantSpec, ActSpec | None]:
    """`w3g128` -> (QuantSpec(bits=3, group_size=128), None); `w4a8` -> (.., ActSpec(8))."""
    m = _SETTING.match(name.strip().lower())
    if not m:
        raise ValueError(f"bad setting name {name!r}; expected e.g. w4, w4g128, w3g64, w4a8, w8a8")
    wbits, group, abits = m.groups()
    spec = QuantSpec(bits=int(wbits), group_size=int(group) if group else None)
    return spec, (ActSpec(bits=int(abits)) if abits else None)


def setting_name(spec: QuantSpec | None, act: ActSpec | None = None) -> str:
    if spec is None:
        return "fp" if act is None else f"w16{act.name}"
    return spec.name + (act.name if act else "")
