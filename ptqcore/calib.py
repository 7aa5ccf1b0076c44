"""The one block-sequential calibration loop.

Capture the inputs of block 0 for the calibration windows, then for each block: let the
method update the block (it collects the statistics it needs through `BlockContext`), check
the quantized weights, and feed the block's (quantized) outputs to the next block. Peak
memory is about one block plus the calibration activations: the model is never copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .models.adapters import Adapter, LinearGroup


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared during calibration or in a quantized layer."""


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, once the wanted input was seen."""


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for each row of `input_ids` ([N, L] -> [N, L, H]), and
    the other keyword arguments the block receives (rotary embeddings, mask, ...).

    Those are captured from batches of one window, so their batch dimension is 1 and
    broadcasts over any batch of windows that share the length L.
    """
    block0 = adapter.get_blocks(model)[0]
    captured: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.setdefault("hidden", []).append(hidden.detach())
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in input_ids:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured["hidden"]), captured["kwargs"]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"NaN or Inf in {what}")


class BasisTransform:
    """A change of basis around a quantizer's per-layer problem (QuIP's incoherence processing).

    A transform step of a pipeline appends one to `BlockContext.basis`; the quantizer step
    then quantizes `forward(W, H)` instead of (W, H) and maps the result back with `inverse`,
    so the model keeps running unchanged code with the de-rotated weights.
    """

    def forward(self, W: torch.Tensor, H: torch.Tensor | None, layer: str) -> tuple[torch.Tensor, torch.Tensor | None, object]:
        raise NotImplementedError

    def inverse(self, Q: torch.Tensor, state: object) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class BlockContext:
    """What a method sees of one block during the calibration loop."""

    index: int
    block: nn.Module
    adapter: Adapter
    inputs: torch.Tensor | None  # [N, L, H] block inputs (None for methods without calibration)
    kwargs: dict
    batch_size: int = 1
    basis: list[BasisTransform] = field(default_factory=list)  # set by transform steps for the quantizer

    def to_basis(self, W: torch.Tensor, H: torch.Tensor | None, layer: str):
        """Apply every registered basis transform; returns (W', H', undo states)."""
        states = []
        for transform in self.basis:
            W, H, state = transform.forward(W, H, layer)
            states.append(state)
        return W, H, states

    def from_basis(self, Q: torch.Tensor, states: list) -> torch.Tensor:
        for transform, state in zip(reversed(self.basis), reversed(states)):
            Q = transform.inverse(Q, state)
        return Q

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.inputs.shape[0], self.batch_size):
            yield self.inputs[start : start + self.batch_size]

    @torch.inference_mode()
    def forward(self) -> torch.Tensor:
        """The block's outputs for all calibration inputs, with its current weights."""
        return torch.cat([_first_tensor(self.block(x, **self.kwargs)) for x in self.batches()])

    @torch.inference_mode()
    def feed_inputs(self, group: LinearGroup, consume: Callable[[torch.Tensor], None]) -> None:
        """Run the block on every batch only as far as `group`'s input, and hand that input
        to `consume` (e.g. a Hessian accumulator). Work after that point is skipped."""
        module = self.block.get_submodule(group.linears[0])

        def hook(mod, args):
            check_finite(args[0], f"block {self.index}, the input of {', '.join(group.linears)} during calibration")
            consume(args[0])
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            for x in self.batches():
                try:
                    self.block(x, **self.kwargs)
                except _Stop:
                    pass
        finally:
            handle.remove()


@dataclass
class BlockwiseResult:
    states: list  # what the method returned for each block
    weight_rel_change: float  # ||W_after - W_before|| / ||W_before|| over every adapter linear
    prepared: dict = field(default_factory=dict)  # what whole-model steps returned (pipelines)
    act_hooks: list = field(default_factory=list)  # activation fake-quant hook handles


def quantize_blockwise(
    model: nn.Module,
    adapter: Adapter,
    process_block: Callable[[BlockContext], dict | None],
    calib_ids: torch.Tensor | None,
    batch_size: int = 1,
    desc: str = "quantize",
    progress: bool = True,
) -> BlockwiseResult:
    """Run `process_block` on each block in order; collect its per-block state and measure
    how far the block's linear weights moved.

    With `calib_ids` ([N, L] token windows) each block sees the outputs of the already
    quantized blocks before it; without, blocks are processed with no activations.

    `batch_size` windows go through a block per forward. 1 reproduces the GPTQ reference's
    summation order; GPTQ at w3g128 on SmolLM2 moved from 51.65 to 59.11 wiki ppl with 8, from
    float rounding alone, so the default stays 1.
    """
    blocks = adapter.get_blocks(model)
    hidden, kwargs = (None, {})
    if calib_ids is not None:
        hidden, kwargs = capture_block_inputs(model, adapter, calib_ids)
        check_finite(hidden, "the calibration inputs of block 0")
    states = []
    moved = total = 0.0
    for index in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        block = blocks[index]
        before = {name: linear.weight.detach().clone() for name, linear in adapter.linears(block).items()}
        ctx = BlockContext(index, block, adapter, hidden, kwargs, batch_size)
        states.append(process_block(ctx))
        for name, linear in adapter.linears(block).items():
            check_finite(linear.weight, f"block {index}, layer {name} after quantization")
            moved += (linear.weight.detach().float() - before[name].float()).pow(2).sum().item()
            total += before[name].float().pow(2).sum().item()
        del before
        if hidden is not None:
            hidden = ctx.forward()
            check_finite(hidden, f"the outputs of block {index} during calibration")
    return BlockwiseResult(states, (moved / total) ** 0.5 if total else 0.0)
