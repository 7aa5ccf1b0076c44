"""Calibration passes on a mixture of experts: what skipping the expert matmuls saves.

GPTQ (true-sequential) and QuIP collect their Hessians with passes through each block that only
need expert *inputs*: the gate/up inputs of every expert (`moe_in`), then the down inputs of
every expert (`moe_out`, one pass for all experts). `BlockContext` skips what those passes do not
need (`moe.SkipExpert`): the whole expert for `moe_in`, its down projection for `moe_out`. This
script quantizes the first blocks of an upcycled MoE with GPTQ twice, with the skip and with
every expert computed in full, checks the weights are identical and prints the seconds.

    python bench/moe_calib.py                                   # smollm2-moe, 2 blocks, 1 thread
    python bench/moe_calib.py --model smollm2-dsmoe --blocks 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptqcore.calib  # noqa: E402
from ptqcore import data  # noqa: E402
from ptqcore.calib import quantize_blockwise  # noqa: E402
from ptqcore.methods import get_method  # noqa: E402
from ptqcore.models.zoo import load_model  # noqa: E402
from ptqcore.profiles import get_profile  # noqa: E402
from ptqcore.quant import QuantSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--blocks", type=int, default=2, help="quantize this many leading blocks")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    profile = get_profile("cpu")
    train = data.tokenize_split(profile.calib_dataset, "train", loaded.tokenizer)
    calib = data.calibration_windows(train, profile.nsamples, profile.calib_seqlen, profile.seed)
    del loaded.adapter.get_blocks(loaded.model)[args.blocks:]  # quantize only the leading blocks
    method = get_method("gptq", spec=QuantSpec(4, 128))
    seconds, weights = {}, {}
    for variant in ("full", "skip"):
        model = copy.deepcopy(loaded.model)
        # "full": no linear counts as a routed expert's, so no pass skips anything
        full = mock.patch.object(ptqcore.calib, "routed_expert", lambda block, name: None)
        with full if variant == "full" else contextlib.nullcontext():
            start = time.perf_counter()
            quantize_blockwise(model, loaded.adapter, method.process_block, calib,
                               desc=variant, progress=True)
            seconds[variant] = time.perf_counter() - start
        weights[variant] = [p.detach().clone() for p in model.parameters()]
        del model
    same = all(torch.equal(a, b) for a, b in zip(weights["full"], weights["skip"]))
    print(f"\n{args.model}, GPTQ w4g128, first {args.blocks} block(s), {profile.nsamples} x {profile.calib_seqlen} "
          f"calibration, {args.threads} thread(s)\n")
    print("| passes                       | seconds |")
    print("|------------------------------|---------|")
    print(f"| every expert computed        | {seconds['full']:7.1f} |")
    print(f"| expert matmuls skipped       | {seconds['skip']:7.1f} |")
    print(f"\nsaved {1 - seconds['skip'] / seconds['full']:.0%}; weights identical: {same}")


if __name__ == "__main__":
    main()
