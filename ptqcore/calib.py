"""The one block-sequential calibration loop.

Capture the inputs of block 0 for the calibration windows, then for each block: let the
method update the block (it collects the statistics it needs through `BlockContext`), check
the quantized weights, and feed the block's (quantized) outputs to the next block. Peak
memory is about one block plus the calibration activations: the model is never copied.

Mixtures of experts: a group's `parts` are the linears that see the same tokens (one expert's
gate/up see exactly the tokens routed to that expert). `BlockContext.feed_parts` hands each part
its own inputs from one pass, so per-expert statistics (GPTQ/QuIP Hessians, AWQ clip inputs)
come from routed tokens only. An expert's part that received fewer than `min_expert_tokens`
calibration tokens falls back to RTN on the same grid (no data-driven step for it); methods ask
`BlockContext.fallback(part, tokens)`, which records it, and `BlockwiseResult.expert_fallbacks`
lists every such linear with its token count (the run's results count them in `notes`).
Passes that only collect expert inputs skip the expert matmuls after the last input they need
(`moe.SkipExpert`); the statistics are the same, bit for bit.

After each block the loop hands freed heap memory back to the OS (`release_freed_memory`):
glibc serves the many same-sized weight temporaries of a block from its heap and keeps what they
leave fragmented, so without it a process's memory grows block by block (smollm2-moe, QuIP, 4
blocks: 0.93 GiB more resident without, 0.33 GiB with; no slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .models.adapters import Adapter, LinearGroup
from .models.moe import ExpertMLP, SkipExpert, routed_expert


@lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """`malloc_trim(0)`: return the heap's free pages to the OS (glibc; elsewhere a no-op that
    returns False). Live tensors are untouched; it only lowers the resident size."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared during calibration or in a quantized layer."""


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, once the wanted input was seen."""


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor | list[dict]
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for each row of `input_ids` ([N, L] -> [N, L, H]), and
    the other keyword arguments the block receives (rotary embeddings, mask, ...).

    Those are captured from batches of one window, so their batch dimension is 1 and
    broadcasts over any batch of windows that share the length L.

    `input_ids` may instead be a list of model-input dicts of batch size 1 (a vision-language
    model's `input_ids` + `pixel_values`, all of one length): each is passed to `model(**batch)`,
    so block 0 of the language model sees the projected image features among its inputs, and a
    vision tower's block 0 the image patches.
    """
    block0 = adapter.get_blocks(model)[0]
    captured: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.setdefault("hidden", []).append(hidden.detach())
        if "kwargs" not in captured:  # positional extras by name (a CLIP encoder passes its mask so)
            names = list(inspect.signature(module.forward).parameters)[1 : len(args)]
            captured["kwargs"] = {**dict(zip(names, args[1:])),
                                  **{k: v for k, v in kwargs.items() if k != "hidden_states"}}
        raise _Stop

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in input_ids:
            batch = ({k: v.to(device) for k, v in row.items()} if isinstance(row, dict)
                     else {"input_ids": row[None].to(device)})
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured["hidden"]), captured["kwargs"]


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"NaN or Inf in {what}")


# An expert that saw fewer routed calibration tokens than this is quantized with RTN (its grid
# alone): a Hessian of so few tokens (rank < 32) would fit them rather than the expert's input.
MIN_EXPERT_TOKENS = 32


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


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
    min_expert_tokens: int = MIN_EXPERT_TOKENS
    fallbacks: dict = field(default_factory=dict)  # routed linear -> tokens it saw, when below the minimum

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
        module = self.block.get_submodule(group.input_module)

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            check_finite(x, f"block {self.index}, the input of {', '.join(group.linears)} during calibration")
            consume(x)
            raise _Stop

        self._run_hooked([module.register_forward_pre_hook(hook, with_kwargs=True)])

    @torch.inference_mode()
    def feed_parts(self, group: LinearGroup, consume: Callable[[int, torch.Tensor], None]) -> list[int]:
        """Hand the input of each token set of `group` (`group.token_sets()`: one per expert in an
        MoE group; one, all linears, in a dense group) to `consume(index, x)`, from one pass of the
        block per batch that stops after `group.inspect`. Returns the number of tokens each set saw
        (0 for an expert no token was routed to). Dense groups go through `feed_inputs`."""
        if not group.parts:
            counts = [0]

            def single(x: torch.Tensor) -> None:
                counts[0] += _rows(x)
                consume(0, x)

            self.feed_inputs(group, single)
            return counts

        def stop(mod, args, out):
            raise _Stop

        # an inspect module inside a routed expert must run for the stop to fire
        counts, handles = self._input_hooks([group], lambda gi, si, x: consume(si, x),
                                            skip_experts=routed_expert(self.block, group.inspect) is None)
        handles.append(self.block.get_submodule(group.inspect).register_forward_hook(stop))
        self._run_hooked(handles)
        return counts[0]

    @torch.inference_mode()
    def feed_stage(self, groups: list[LinearGroup], consume: Callable[[int, int, torch.Tensor], None]) -> list[list[int]]:
        """`feed_parts` for several groups whose inputs none of them changes (a stage of
        `Adapter.stages()`, or every group of a block not yet modified) at once: `consume(group
        index, token-set index, x)`, one full pass of the block per batch. A one-group stage is
        `feed_parts` (early stop). Returns the token counts per group and set."""
        if len(groups) == 1:
            return [self.feed_parts(groups[0], lambda i, x: consume(0, i, x))]
        counts, handles = self._input_hooks(groups, consume, skip_experts=True)
        self._run_hooked(handles)
        return counts

    def _input_hooks(self, groups: list[LinearGroup], consume: Callable[[int, int, torch.Tensor], None],
                     skip_experts: bool) -> tuple[list[list[int]], list]:
        """Forward pre-hooks on the first linear of every token set of `groups`, handing its input
        to `consume(group index, set index, x)` and counting its tokens. With `skip_experts`, the
        hook of the last hooked linear of each routed expert (in `ExpertMLP.ORDER`) then ends that
        expert's computation (`SkipExpert`): these passes only collect inputs, so an MoE expert's
        remaining matmuls are skipped (all three of them when only gate/up inputs are wanted)."""
        sets = [(gi, si, names) for gi, group in enumerate(groups) for si, names in enumerate(group.token_sets())]

        def rank(name: str) -> int:
            return ExpertMLP.ORDER.index(name.rpartition(".")[2])

        last: dict[str, str] = {}  # expert path -> its last hooked linear
        for _, _, names in sets if skip_experts else ():
            expert = routed_expert(self.block, names[0])
            if expert and (expert not in last or rank(names[0]) > rank(last[expert])):
                last[expert] = names[0]
        ends = set(last.values())
        counts = [[0] * len(group.token_sets()) for group in groups]

        def hook(gi: int, si: int, names: tuple[str, ...]):
            def record(mod, args):
                check_finite(args[0], f"block {self.index}, the input of {', '.join(names)} during calibration")
                counts[gi][si] += _rows(args[0])
                consume(gi, si, args[0])
                if names[0] in ends:
                    raise SkipExpert
            return record

        handles = [self.block.get_submodule(names[0]).register_forward_pre_hook(hook(gi, si, names))
                   for gi, si, names in sets]
        return counts, handles

    def _run_hooked(self, handles: list) -> None:
        """Run the block on every batch with the hooks of `handles` installed (a hook raising
        `_Stop` skips the rest of that batch's forward), then remove them."""
        try:
            for x in self.batches():
                try:
                    self.block(x, **self.kwargs)
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    def fallback(self, part: tuple[str, ...], tokens: int) -> bool:
        """Whether the routed linears of `part` saw too few tokens for a data-driven step; if so
        they are recorded (they get RTN). Linears that see every token never fall back."""
        routed = [name for name in part if self.adapter.is_routed(name)]
        if not routed or tokens >= self.min_expert_tokens:
            return False
        self.fallbacks.update({name: tokens for name in routed})
        return True


@dataclass
class BlockwiseResult:
    states: list  # what the method returned for each block
    weight_rel_change: float  # ||W_after - W_before|| / ||W_before|| over every adapter linear
    prepared: dict = field(default_factory=dict)  # what whole-model steps returned (pipelines)
    act_hooks: list = field(default_factory=list)  # activation fake-quant hook handles
    # "block.linear" -> routed calibration tokens, for experts that fell back to RTN (MoE only)
    expert_fallbacks: dict = field(default_factory=dict)


def expert_fallback_note(fallbacks: dict) -> str:
    """A line for a results row's `notes` ("" without fallbacks): how many expert linears fell
    back to RTN for want of routed calibration tokens."""
    if not fallbacks:
        return ""
    blocks = sorted({int(key.split(".", 1)[0]) for key in fallbacks})
    return (f"{len(fallbacks)} expert linears fell back to RTN (fewer than the minimum of routed calibration "
            f"tokens; blocks {', '.join(map(str, blocks))})")


def quantize_blockwise(
    model: nn.Module,
    adapter: Adapter,
    process_block: Callable[[BlockContext], dict | None],
    calib_ids: torch.Tensor | None,
    batch_size: int = 1,
    desc: str = "quantize",
    progress: bool = True,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
) -> BlockwiseResult:
    """Run `process_block` on each block in order; collect its per-block state and measure
    how far the block's linear weights moved.

    With `calib_ids` ([N, L] token windows) each block sees the outputs of the already
    quantized blocks before it; without, blocks are processed with no activations.

    `batch_size` windows go through a block per forward. 1 reproduces the GPTQ reference's
    summation order; GPTQ at w3g128 on SmolLM2 moved from 51.65 to 59.11 wiki ppl with 8, from
    float rounding alone, so the default stays 1.

    `min_expert_tokens`: a mixture-of-experts expert routed fewer calibration tokens than this
    is quantized with RTN (see the module docstring); the result lists them.
    """
    blocks = adapter.get_blocks(model)
    release_freed_memory()  # what unfusing mixture-of-experts weights left (`moe.expose_experts`)
    hidden, kwargs = (None, {})
    if calib_ids is not None:
        hidden, kwargs = capture_block_inputs(model, adapter, calib_ids)
        check_finite(hidden, "the calibration inputs of block 0")
    states = []
    fallbacks: dict = {}
    moved = total = 0.0
    for index in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        block = blocks[index]
        before = {name: linear.weight.detach().clone() for name, linear in adapter.linears(block).items()}
        ctx = BlockContext(index, block, adapter.for_block(block), hidden, kwargs, batch_size,
                           min_expert_tokens=min_expert_tokens)
        states.append(process_block(ctx))
        fallbacks.update({f"{index}.{name}": tokens for name, tokens in ctx.fallbacks.items()})
        for name, linear in adapter.linears(block).items():
            check_finite(linear.weight, f"block {index}, layer {name} after quantization")
            moved += (linear.weight.detach().float() - before[name].float()).pow(2).sum().item()
            total += before[name].float().pow(2).sum().item()
        del before
        if hidden is not None:
            hidden = ctx.forward()
            check_finite(hidden, f"the outputs of block {index} during calibration")
        del ctx
        release_freed_memory()
    return BlockwiseResult(states, (moved / total) ** 0.5 if total else 0.0, expert_fallbacks=fallbacks)
