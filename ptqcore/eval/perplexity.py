"""Perplexity per PROTOCOL.md: non-overlapping windows of `seqlen` tokens over the test
stream (the first `limit`), labels = inputs shifted by one, ppl = exp(mean NLL over every
predicted token of every window).

The head and the cross-entropy run in chunks of positions, so a 49k-vocabulary model never
holds a full [seqlen, vocab] logit tensor per window twice; everything is float32 on CPU.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import eval_windows
from ..models.adapters import Adapter


def model_flops_per_token(model: torch.nn.Module, adapter: Adapter, seqlen: int) -> float:
    """Forward FLOPs per token of a causal LM: 2 x (block linears + head) parameters, plus
    causal attention (QK^T and AV over on average seqlen/2 keys) for every block."""
    blocks = adapter.get_blocks(model)
    linear_params = sum(
        linear.weight.numel() for block in blocks for linear in adapter.linears(block).values()
    )
    head = model.get_submodule(adapter.lm_head).weight.numel()
    cfg = model.config.get_text_config()  # a vision-language model: its language model's
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:  # no attention (Mamba): the scan's elementwise work is not counted
        return 2.0 * (linear_params + head)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn = len(blocks) * 2 * 2 * (seqlen / 2) * heads * head_dim
    return 2.0 * (linear_params + head) + attn


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    adapter: Adapter,
    tokens: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    chunk: int = 512,
    desc: str = "perplexity",
    progress: bool = True,
) -> dict:
    """Returns value (ppl), nll, scored_tokens, windows, eval_seconds, tokens_per_s, flops_per_s."""
    windows = eval_windows(tokens, seqlen, limit)
    device = next(model.parameters()).device
    base = model.get_submodule(adapter.base)
    head = model.get_submodule(adapter.lm_head)
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    start = time.perf_counter()
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        ids = window[None].to(device)
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0]
        labels = ids[0, 1:]
        for s in range(0, seqlen - 1, chunk):
            e = min(s + chunk, seqlen - 1)
            logits = head(hidden[s:e]).float()
            total_nll += F.cross_entropy(logits, labels[s:e], reduction="sum").double().cpu()
        scored += seqlen - 1
        if not torch.isfinite(total_nll):
            break
    seconds = time.perf_counter() - start
    nll = float(total_nll) / scored
    n_tokens = len(windows) * seqlen
    return {
        "value": math.exp(nll) if math.isfinite(nll) and nll < 700 else float("inf"),
        "nll": nll,
        "scored_tokens": scored,
        "windows": len(windows),
        "eval_seconds": seconds,
        "tokens_per_s": n_tokens / seconds,
        "flops_per_s": n_tokens * model_flops_per_token(model, adapter, seqlen) / seconds,
    }
