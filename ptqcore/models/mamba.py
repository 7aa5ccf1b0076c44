"""Mamba as data: the adapter of `MambaForCausalLM`, the mixer exposed so that every linear is
called as a module, and the `mamba-wiki` recipe (a small Mamba trained here from scratch).

**What is quantized.** Per block (`norm -> mixer -> + residual`), the mixer's four linears:

- `in_proj` [2 D, H] reads the block norm's output (the residual stream): group `in`, after
  `norm`, judged by the whole mixer. AWQ and SmoothQuant fold their scale into the block norm;
  OmniQuant's LET scales norm -> in_proj; QuaRot fuses the norm and rotates in_proj's columns.
- `x_proj` [r + 2 N, D] reads `SiLU(conv1d(x))`: group `x`, no `prev`. A per-channel scale
  or a rotation does not pass a depthwise convolution followed by SiLU, so nothing folds in
  front of it (AWQ: clip only; SmoothQuant, LET: nothing; QuaRot: not rotated).
- `dt_proj` [D, r] reads the first r outputs of x_proj (the low-rank time step): group `dt`,
  after `x_proj` rows [0, r) (`LinearGroup.prev_rows`). A scale on its r input channels folds
  exactly into those rows of x_proj (the B and C rows are left alone): AWQ searches it, as it
  does v -> o and up -> down on Llama. SmoothQuant and OmniQuant's LET have no linear-to-linear
  transform here (their references smooth norms only, LET adds v -> o and q/k), so they skip it.
- `out_proj` [H, D] reads `y * SiLU(z)` (the scan output, gated): group `out`, no `prev` (y is
  linear in the SiLU output x for fixed dt, B, C, but those depend on x, and neither x nor z's
  SiLU has a parameter to absorb a scale). It writes the residual stream.

**Full precision:** `conv1d` (a depthwise 4-tap filter, D x 4 weights: nothing a matrix
quantizer addresses), `A_log` and `D` (the SSM's state
matrix and skip, per channel: exponentiated into the recurrence, where rounding compounds over
the sequence), `dt_proj.bias` (the time-step offset, added before a softplus), the norms,
embeddings and head (the benchmark's scope).

**QuaRot on Mamba.** Exact: RMSNorm weights fused into in_proj (the final norm into the head),
the head untied, the residual stream rotated by a random Hadamard (embeddings, in_proj's
columns, out_proj's rows, the head), and an online Hadamard of size D at out_proj's input
(`W <- W H` offline, `x <- x H` in a pre-hook; exact because H is orthogonal and out_proj is a
plain linear of the gated scan output). Not applicable, recorded in the method state from
`Adapter.notes`: the per-head value -> output rotation (there is no attention), and rotating
the inputs of x_proj (behind the depthwise conv + SiLU: not exact) or dt_proj (exact in
principle: an r x r rotation between x_proj's dt rows and dt_proj, but QuaRot has no such step
and r is a low-rank bottleneck, not an outlier-carrying stream).

**Calibration and hooks.** transformers' slow path (CPU, or no `mamba_ssm`) calls in_proj,
x_proj and out_proj as modules but multiplies `dt_proj.weight` directly (the bias is added in
float32 inside the scan), so a hook on dt_proj would never fire. `expose_mixers` (run by
`MambaAdapter.get_blocks`, idempotent) therefore switches each mixer to `ExposedMambaMixer`,
whose forward is transformers' slow path line for line except that it calls `dt_proj` as a
module (`DeltaProjection`: `x @ W^T` without the bias, which the scan still adds in float32),
so Hessians, activation statistics, AWQ searches and activation fake-quantizers see dt_proj's
input; the function is the same up to float rounding. It never takes the fused training path:
with the CUDA kernels installed (`mamba_ssm`, `causal_conv1d`), transformers' `mamba_inner_fn`
runs in training mode and reads `x_proj.weight`, `dt_proj.weight` and `out_proj.weight`
directly (no hook fires, and an online Hadamard at out_proj would be skipped); here the conv
and the selective scan may still run as kernels (they take no quantized weight), while the
four linears are always module calls. Block inputs are captured as for any decoder: blocks
are called as `block(hidden, cache=None, attention_mask=None)` with `use_cache=False`, so no
cache object crosses blocks. The recurrence over the sequence runs in Python on CPU (slow:
~400-500 tokens/s for mamba-wiki at one thread).

`Mamba2ForCausalLM` is refused with the reason (`mamba2_adapter`): its mixer has no x_proj /
dt_proj (one in_proj emits z, x, B, C and dt) and a gated, grouped RMSNorm before out_proj, so
this adapter's groups do not exist there.

**mamba-wiki** (`build_mamba_wiki`): a 4-block Mamba (hidden 256, state 16, expand 2, conv 4,
time-step rank 128) with SmolLM2's tokenizer, trained from scratch with a fixed seed on
windows of the wiki train split (PROTOCOL.md), AdamW with warmup and cosine decay, then
scored on the wiki test split with the cpu profile's perplexity. Time-step rank 128 (Mamba's
default is ceil(H / 16) = 16) so that every quantized linear has >= 128 input columns and the
benchmark's g128 settings apply to dt_proj too (ptq-bench refuses a group wider than a layer).
Training uses `scan_for_training`, the same recurrence as transformers' reference scan written
so that its backward pass is linear in the sequence length (transformers' indexes one time step
of a [B, D, L, N] tensor per step, whose backward allocates the whole tensor at every step);
the exposed mixer switches to it whenever autograd records the scan on CPU (this recipe,
OmniQuant's training), and uses transformers' own otherwise (evaluation, calibration). The
card records how far the two scans' logits differ on the trained model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, LinearGroup


# --- the mixer with every linear called as a module -------------------------------------------

class DeltaProjection(nn.Linear):
    """Mamba's `dt_proj` called as a module: `x @ W^T` without the bias. transformers adds the
    bias (`delta_bias`) in float32 inside the selective scan, before the softplus; it still
    does. Quantizers and hooks see this linear like any other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _mixer_class():
    from transformers.models.mamba.modeling_mamba import MambaMixer

    return MambaMixer


_EXPOSED: dict[type, type] = {}


def _exposed_class(base: type) -> type:
    """`ExposedMambaMixer` for transformers' `MambaMixer` (built lazily: transformers is
    imported only when a Mamba model is used)."""
    if base in _EXPOSED:
        return _EXPOSED[base]
    from transformers.models.mamba import modeling_mamba as mm

    class ExposedMambaMixer(base):
        """transformers' `MambaMixer.forward`, slow path only, with `dt_proj` called as a module
        (see the module docstring). The full-sequence scan is transformers' `mamba_selective_scan`,
        or `scan_for_training` (the same recurrence) when autograd records it on CPU (training,
        OmniQuant): the former's backward is quadratic in the length there. `scan_fn` forces one."""

        scan_fn = None

        def forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
            cache = cache if cache is not None else cache_params
            seq_len = hidden_states.shape[1]
            dtype = hidden_states.dtype
            if cache is not None:
                conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
                recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)
            else:
                conv_state, recurrent_state = None, None
            # 1. gated projection
            hidden_states = mm.apply_mask_to_padding_states(hidden_states, attention_mask)
            projected_states = self.in_proj(hidden_states).transpose(1, 2)
            A = -torch.exp(self.A_log.float())
            x, gate = projected_states.chunk(2, dim=1)
            # 2. depthwise causal convolution (full precision)
            if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
                x = mm.causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                            activation=self.activation)
            else:
                if cache is not None:
                    x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
                x = mm.causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                        activation=self.activation, **kwargs)
                if cache is not None:
                    x = x[:, :, -seq_len:]
            # 3. selective SSM: x_proj -> (dt, B, C), dt_proj as a module call
            x = mm.apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)
            time_step, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size,
                                                          self.ssm_state_size], dim=-1)
            time_step = self.dt_proj(time_step).transpose(1, 2)
            dt_bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
            if recurrent_state is not None and seq_len == 1:
                scan_output = mm.mamba_selective_state_update(
                    recurrent_state, x.transpose(1, 2)[..., 0], time_step[..., 0], A, B[:, 0], C[:, 0], self.D,
                    z=gate[..., 0], dt_bias=dt_bias, dt_softplus=True,
                ).unsqueeze(-1)
            else:
                final = cache is not None
                scan = self.scan_fn or (scan_for_training if _records_grad(x, time_step) else mm.mamba_selective_scan)
                result = scan(
                    x.transpose(1, 2), time_step, A, B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=gate,
                    delta_bias=dt_bias, delta_softplus=True, return_last_state=final,
                    use_mambapy=self.use_mambapy, use_associative_scan=self.use_associative_scan,
                )
                if final:
                    scan_output, state = result
                    cache.update_recurrent_state(state, self.layer_idx)
                else:
                    scan_output = result
            # 4. output projection (writes the residual stream)
            return self.out_proj(scan_output.transpose(1, 2).to(dtype))

    _EXPOSED[base] = ExposedMambaMixer
    return ExposedMambaMixer


def _records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these (CPU) tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad and not t.is_cuda for t in tensors)


def expose_mixers(block: nn.Module, mixer: str = "mixer") -> None:
    """Switch `block.<mixer>` to `ExposedMambaMixer` and its dt_proj to `DeltaProjection`
    (idempotent; parameters, buffers and state dict unchanged)."""
    module = block.get_submodule(mixer)
    base = _mixer_class()
    if not isinstance(module, base):
        raise ValueError(f"{type(module).__name__} is not transformers' MambaMixer; the mamba adapter needs it")
    if type(module) is base:
        module.__class__ = _exposed_class(base)
    if type(module.dt_proj) is nn.Linear:
        module.dt_proj.__class__ = DeltaProjection


def scan_for_training(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, **kwargs):
    """transformers' reference selective scan (`mamba_selective_scan`, sequential branch): the same
    recurrence `h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t`, `y_t = C_t h_t + D x_t`, gated by SiLU(z),
    computed step by step on `unbind` views, so autograd's backward stays linear in the length."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(A[None, :, None, :] * dt[..., None])  # [b, d, l, n]
    dBx = (dt * hidden_states.float())[..., None] * B.float().transpose(1, 2)[:, None]
    state = torch.zeros_like(dA[:, :, 0])
    ys = []
    for a, bx, c in zip(dA.unbind(2), dBx.unbind(2), C.float().unbind(2)):
        state = a * state + bx
        ys.append(torch.einsum("bdn,bn->bd", state, c))
    y = torch.stack(ys, -1).to(hidden_states.dtype)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, state) if return_last_state else y


# --- the adapter ---------------------------------------------------------------------------

class MambaAdapter(Adapter):
    """An `Adapter` whose `get_blocks` first exposes every mixer (`expose_mixers`)."""

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = super().get_blocks(model)
        for block in blocks:
            expose_mixers(block)
        return blocks


MAMBA_NOTES = (
    ("rotate_heads", "Mamba has no attention: no per-head value -> output map to rotate"),
    ("not_rotated", "x_proj's input is SiLU(depthwise conv1d(...)): no rotation passes a per-channel convolution "
                    "and a SiLU exactly, so it is not rotated; dt_proj's r inputs could be rotated exactly against "
                    "x_proj's dt rows, but QuaRot has no such step (a low-rank bottleneck, not a residual stream)"),
)


def mamba_adapter(config) -> Adapter:
    """The adapter of `MambaForCausalLM` (see the module docstring): four groups per block."""
    rank = int(config.time_step_rank)
    groups = (
        LinearGroup("in", ("mixer.in_proj",), "norm", "mixer"),
        LinearGroup("x", ("mixer.x_proj",), None, "mixer.x_proj"),
        LinearGroup("dt", ("mixer.dt_proj",), "mixer.x_proj", "mixer.dt_proj", prev_rows=(0, rank)),
        LinearGroup("out", ("mixer.out_proj",), None, "mixer.out_proj"),
    )
    return MambaAdapter(
        name="mamba", model_types=("mamba",), blocks="backbone.layers", base="backbone",
        embeddings=("backbone.embeddings",), final_norm="backbone.norm_f", lm_head="lm_head", groups=groups,
        residual_writers=("mixer.out_proj",), value_out=None, query_key=None, notes=MAMBA_NOTES,
    )


def mamba2_adapter(config) -> Adapter:
    raise ValueError(
        "Mamba2ForCausalLM is not supported by the mamba adapter: its mixer has no x_proj / dt_proj (one in_proj "
        "emits z, x, B, C and dt together) and a gated, grouped RMSNorm (mixer.norm) sits before out_proj, so the "
        "groups in / x / dt / out do not exist; supported: mamba (MambaForCausalLM)"
    )


# name -> (model types, builder from the config)
MAMBA_ADAPTERS = {
    "mamba": (("mamba",), mamba_adapter),
    "mamba2": (("mamba2",), mamba2_adapter),
}


# --- the mamba-wiki recipe ------------------------------------------------------------------

MAMBA_WIKI = dict(hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4, time_step_rank=128)
TRAIN = dict(steps=100, batch=8, seqlen=128, lr=4e-3, warmup=10, min_lr_ratio=0.1, weight_decay=0.01,
             grad_clip=1.0, seed=0)
EVAL = dict(seqlen=2048, limit=16)  # the cpu profile's perplexity


def _lr(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_windows(tokens: torch.Tensor, steps: int, batch: int, seqlen: int, seed: int) -> torch.Tensor:
    """[steps, batch, seqlen + 1] windows of the token stream at offsets drawn from a seeded
    generator (inputs and next-token labels)."""
    if tokens.numel() <= seqlen + 1:
        raise ValueError(f"the training stream ({tokens.numel()} tokens) is shorter than a window of {seqlen + 1}")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, tokens.numel() - seqlen - 1, (steps, batch), generator=g)
    return tokens[offsets[..., None] + torch.arange(seqlen + 1)]


def build_mamba(out: Path, tokenizer, name: str = "mamba-wiki", arch: dict | None = None, train: dict | None = None,
                evaluation: dict | None = None, progress: bool = True) -> dict:
    """Train a Mamba on wiki train from scratch, score it on wiki test, save it with its card
    (`README.md`, `build.json`) into `out`. Deterministic for a given thread count. Returns the
    recorded facts."""
    from tqdm.auto import tqdm
    from transformers import MambaConfig, MambaForCausalLM

    from .. import data
    from ..eval import perplexity

    arch = {**MAMBA_WIKI, **(arch or {})}
    t = {**TRAIN, **(train or {})}
    ev = {**EVAL, **(evaluation or {})}
    start = time.perf_counter()
    tokens = data.tokenize_split("wiki", "train", tokenizer)
    windows = train_windows(tokens, t["steps"], t["batch"], t["seqlen"], t["seed"])
    config = MambaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, use_bias=False, use_conv_bias=True,
                         residual_in_fp32=True, use_cache=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    torch.manual_seed(t["seed"])
    model = MambaForCausalLM(config)
    adapter = mamba_adapter(config)
    blocks = adapter.get_blocks(model)  # trains with `scan_for_training` (autograd records)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "conv1d" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "conv1d" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
                            lr=t["lr"], betas=(0.9, 0.95))
    losses = []
    model.train()
    bar = tqdm(range(t["steps"]), desc=f"train {name}", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, t["steps"], t["lr"], t["warmup"], t["min_lr_ratio"])
        batch = windows[step]
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite training loss at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    model.eval()
    # The training scan against transformers' own, on one test window (the model is scored with the latter).
    test = data.tokenize_split("wiki", "test", tokenizer)
    probe = test[: min(ev["seqlen"], 256)][None]
    with torch.no_grad():
        for block in blocks:
            block.mixer.scan_fn = scan_for_training
        ours = model(input_ids=probe).logits
        for block in blocks:
            block.mixer.scan_fn = None
        ref = model(input_ids=probe).logits
    scan_diff = ((ours - ref).abs().max() / ref.abs().max()).item()
    result = perplexity(model, adapter, test, seqlen=ev["seqlen"], limit=ev["limit"], desc=f"wiki test ({name})",
                        progress=progress)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    block_params = sum(p.numel() for p in blocks.parameters())
    quantized = sum(m.weight.numel() for b in blocks for m in adapter.linears(b).values())
    tail = min(10, len(losses))
    info = {
        "name": name, "architecture": "MambaForCausalLM", **arch, "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size, "tokenizer": "SmolLM2-135M-Instruct (from the cached smollm2-135m)",
        "parameters": sum(p.numel() for p in model.parameters()), "block_parameters": block_params,
        "quantized_parameters": quantized, **{f"train_{k}": v for k, v in t.items()},
        "train_tokens": t["steps"] * t["batch"] * t["seqlen"], "train_split_tokens": int(tokens.numel()),
        "train_loss_first": losses[0], "train_loss_final": sum(losses[-tail:]) / tail, "train_loss_final_steps": tail,
        "train_losses": losses, "train_seconds": train_seconds, "scan_max_rel_diff": scan_diff,
        "wiki_test_ppl": result["value"], "eval_seqlen": ev["seqlen"], "eval_limit": ev["limit"],
        "eval_scored_tokens": result["scored_tokens"], "eval_seconds": result["eval_seconds"],
        "threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }
    info["build_seconds"] = time.perf_counter() - start  # everything but writing the card
    (out / "build.json").write_text(json.dumps(info, indent=1))
    (out / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    """The card of a trained Mamba (markdown), from the build's recorded facts."""
    frac = info["train_tokens"] / info["train_split_tokens"]
    return "\n".join([
        f"# {info['name']}",
        "",
        f"A small Mamba language model (`MambaForCausalLM`) trained from scratch here by `ptqcore.models.mamba` "
        f"in {info['build_seconds']:.0f} s ({info['threads']} torch thread(s); tokenization + training "
        f"{info['train_seconds']:.0f} s, evaluation {info['eval_seconds']:.0f} s), seed {info['train_seed']}.",
        "",
        f"**It is a weak language model**: {info['train_steps']} steps on {info['train_tokens']:,} tokens "
        f"({frac:.2f} of one pass over the wiki train split). What a benchmark measures on it is how quantization "
        "degrades a Mamba relative to its own full precision, not Mamba's quality.",
        "",
        f"- architecture: {info['num_hidden_layers']} block(s), hidden {info['hidden_size']}, inner "
        f"{info['intermediate_size']} (expand {info['expand']}), state {info['state_size']}, conv {info['conv_kernel']}, "
        f"time-step rank {info['time_step_rank']}" + (
            f" (Mamba's default would be ceil(hidden / 16) = {-(-info['hidden_size'] // 16)}; {info['time_step_rank']} "
            "keeps dt_proj at >= 128 inputs so g128 settings apply to every quantized linear)"
            if info["time_step_rank"] >= 128 else "") + ", tied embeddings, no biases in the projections",
        f"- parameters: {info['parameters']:,} ({info['block_parameters']:,} in the blocks, "
        f"{info['quantized_parameters']:,} in the quantized linears in_proj / x_proj / dt_proj / out_proj)",
        f"- tokenizer: {info['tokenizer']}, vocabulary {info['vocab_size']:,}",
        f"- data: wiki train split (PROTOCOL.md), {info['train_split_tokens']:,} tokens; {info['train_steps']} x "
        f"{info['train_batch']} windows of {info['train_seqlen']} + 1 tokens at offsets from a generator seeded "
        f"{info['train_seed']}",
        f"- optimisation: AdamW (betas 0.9, 0.95; weight decay {info['train_weight_decay']} on matrices), peak lr "
        f"{info['train_lr']}, {info['train_warmup']} warmup steps, cosine to {info['train_min_lr_ratio']} x peak, "
        f"gradient clip {info['train_grad_clip']}, float32",
        f"- train loss: {info['train_loss_first']:.3f} at step 1, {info['train_loss_final']:.3f} (mean of the last "
        f"{info['train_loss_final_steps']} steps)",
        f"- **wiki test perplexity: {info['wiki_test_ppl']:.2f}** (cpu profile: first {info['eval_limit']} windows of "
        f"{info['eval_seqlen']}, {info['eval_scored_tokens']:,} scored tokens; windows longer than the training "
        "windows)",
        f"- trained with `scan_for_training` (transformers' recurrence, backward linear in the length), scored with "
        f"transformers' own scan; max relative logit difference between the two: {info['scan_max_rel_diff']:.1e}",
        "",
    ])
