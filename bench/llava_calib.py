"""How much of a modality-table difference is calibration: smollm2-llava, one method, several
calibration seeds, and the vision side quantized after the language model instead of before.

Notebook 30 (and `ptq-bench run --quantize-vision`) quantizes the vision tower, the projector,
then the language model, each calibrated on the outputs of the parts quantized before it, so
the language model's calibration inputs change when the vision side is quantized. This script
separates the two effects, with the notebook's measurement (easy-vqa test, `--limit` questions
of the seeded shuffle, `cpu` profile):

- the language model alone, calibrated with each of `--seeds` (the images and text windows of
  the calibration draw change; the test questions do not): the spread is what calibration alone
  moves the accuracy;
- the language model quantized first (the profile's seed), then the vision tower and projector:
  what quantizing the vision side costs when the language model's calibration is unchanged.

    python bench/llava_calib.py --method awq --seeds 0,1,2          # ~35 min at one thread
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptqcore import data  # noqa: E402
from ptqcore.eval.vqa import vqa_accuracy  # noqa: E402
from ptqcore.models.llava import calibration_batches, llava_adapter, projector_adapter, quantize_parts, vision_adapter  # noqa: E402
from ptqcore.models.zoo import load_model  # noqa: E402
from ptqcore.pipeline import build_pipeline  # noqa: E402
from ptqcore.profiles import get_profile  # noqa: E402
from ptqcore.quant import parse_setting  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="awq")
    ap.add_argument("--setting", default="w4g128")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma-separated")
    ap.add_argument("--limit", type=int, default=1000, help="test questions (notebook 30: 1000)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        spec, act = parse_setting(args.setting)
        if act is not None:
            raise ValueError(f"weight-only settings only (e.g. w4g128), got {args.setting}")
        pipeline = build_pipeline(args.method, spec)  # validates the method name
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        sys.exit(f"error: {err}")
    torch.set_num_threads(args.threads)
    profile = get_profile("cpu")
    rows = []

    def measure(label: str, seed: int, vision_after: bool) -> None:
        loaded = load_model("smollm2-llava")
        model, processor = loaded.model, loaded.extra["processor"]
        train = data.tokenize_split(profile.calib_dataset, "train", loaded.tokenizer)
        calib = calibration_batches(processor, train, profile.nsamples, profile.calib_seqlen, seed)
        start = time.perf_counter()
        quantize_parts(model, [llava_adapter(model)], pipeline, calib, progress=False)
        if vision_after:
            quantize_parts(model, [vision_adapter(model), projector_adapter(model)], pipeline, calib, progress=False)
        seconds = time.perf_counter() - start
        res = vqa_accuracy(model, processor, args.limit, profile.seed, progress=False)
        rows.append((label, res["value"], res["stderr"], seconds))
        print(f"{label}: {res['value']:.3f} +- {res['stderr']:.3f} ({seconds:.0f} s)", flush=True)

    for seed in seeds:
        measure(f"LM, calibration seed {seed}", seed, vision_after=False)
    measure(f"LM (seed {profile.seed}), then vision tower + projector", profile.seed, vision_after=True)
    accs = [acc for label, acc, _, _ in rows[:len(seeds)]]
    print(f"\nsmollm2-llava, {args.method} {args.setting}, easy-vqa test {args.limit} questions, "
          f"{args.threads} thread(s)\n")
    print("| quantized | accuracy | quant s |\n|---|---|---|")
    for label, acc, se, seconds in rows:
        print(f"| {label} | {acc:.3f} ± {se:.3f} | {seconds:.0f} |")
    print(f"\nspread over calibration seeds: {min(accs):.3f} - {max(accs):.3f}")


if __name__ == "__main__":
    main()
