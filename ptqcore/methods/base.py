"""What a method is: a typed config, its place in the taxonomy, and two hooks.

- `prepare(model, adapter)`: whole-model work before the block loop (e.g. QuaRot's rotation
  of the residual stream); a no-op by default.
- `process_block(ctx)`: called for each block inside the one calibration loop
  (`ptqcore.calib.quantize_blockwise`); updates the block in place and returns plain per-block
  state (scales, zeros, group indices ...) that could be saved and re-applied.

`kind` places a method in a pipeline: equivalence-preserving transforms first, at most one
lossy quantizer, last (`ptqcore.pipeline`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from ..calib import BlockContext
from ..quant import QuantSpec


@dataclass(frozen=True)
class MethodInfo:
    name: str
    strategy: str  # compensation, rotation, salience, optimization, transformation, baseline, none
    paper: str
    kind: str  # "quantizer" (lossy, last), "transform" (equivalence-preserving), "none"
    needs_calibration: bool
    default_quantizer: str | None = None  # appended when a pipeline ends with this transform
    # Knobs this transform's reference sets on the quantizer after it (e.g. QuIP's LDLQ runs
    # without act-order); applied beneath the user's own options, where the quantizer has them.
    quantizer_defaults: tuple[tuple[str, object], ...] = ()
    # A transform that changes the basis of each layer's problem (`BlockContext.basis`) needs a
    # quantizer that honours it (`accepts_basis`).
    sets_basis: bool = False
    accepts_basis: bool = False


@dataclass(frozen=True)
class MethodConfig:
    """Base of method configs: a weight spec plus the method's own knobs."""

    spec: QuantSpec | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.spec is not None:
            out["spec"] = self.spec.to_dict()
        return out

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "spec"]


class Method(ABC):
    info: ClassVar[MethodInfo]
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.info.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        if self.info.kind == "quantizer" and config.spec is None:
            raise ValueError(f"method {self.info.name} needs a weight spec (bits, group size)")
        self.config = config

    def prepare(self, model, adapter) -> dict | None:
        """Whole-model work before the block loop; returns plain state."""
        return None

    @abstractmethod
    def process_block(self, ctx: BlockContext) -> dict | None:
        """Update `ctx.block` in place; return plain per-block state."""
