"""Methods benchmark on SmolLM2-135M, `cpu` profile of PROTOCOL.md.

Runs FP32, then each method at each setting, each run in its own `ptq-bench run` process
(so peak RSS is that run's own), recording into the results store (default
`results/`; a config already recorded is not rerun unless --force). Then prints one table:
wiki perplexity, quantization seconds, peak RSS, eval throughput and its fraction of the
fp32 FLOP rate plain `torch.matmul` reaches on this machine, measured in this same run.

    python bench/methods.py                      # rtn and gptq at w4 w4g128 w3 w3g128 w2g64
    python bench/methods.py --methods gptq --settings w3g128 --threads 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqcore.quant import parse_setting  # noqa: E402
from ptqcore.results import ResultsStore  # noqa: E402

# Reference figures of the foundation issue (same protocol, 2 cores, fp32).
REFERENCE = {
    ("fp", "fp"): 17.82,
    ("rtn", "w4"): 33.49, ("rtn", "w4g128"): 25.21, ("rtn", "w3"): 604.7, ("rtn", "w3g128"): 100.8,
    ("rtn", "w2g64"): 7.8e5,
    ("gptq", "w4"): 27.41, ("gptq", "w4g128"): 23.67, ("gptq", "w3"): 98.86, ("gptq", "w3g128"): 52.03,
    ("gptq", "w2g64"): 1.86e4,
}
REFERENCE_GPTQ_SECONDS = {"w4": 471, "w4g128": 521, "w3": 487, "w3g128": 510, "w2g64": 473}


def matmul_gflops(threads: int) -> float:
    """Best fp32 GFLOP/s of plain torch.matmul over a square and the model's MLP shape."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (2048, 576, 1536), (2048, 1536, 576)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps = 10
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--settings", default="w4,w4g128,w3,w3g128,w2g64")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [("fp", None)] + [(m, s) for m in args.methods.split(",") for s in args.settings.split(",")]
    for method, setting in runs:
        cmd = [sys.executable, "-m", "ptqcore.cli", "run", "--model", args.model, "--method", method,
               "--out", args.out, "--threads", str(args.threads), "--quiet"]
        if setting:
            spec, _ = parse_setting(setting)
            cmd += ["--wbits", str(spec.bits)] + (["--group-size", str(spec.group_size)] if spec.group_size else [])
        if args.force:
            cmd.append("--force")
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, env=env)

    peak = matmul_gflops(args.threads)
    df = ResultsStore(args.out).table(latest=True)
    df = df[(df["model"] == args.model) & (df["dataset"] == "wiki") & (df["torch_threads"] == args.threads)]
    print(f"\nSmolLM2-135M, cpu profile (wiki 32x512 calibration; wiki test 16 x 2048), {args.threads} threads, "
          f"{df['device_name'].iloc[0] if len(df) else '?'}; torch.matmul fp32 peak {peak:.0f} GFLOP/s\n")
    header = (f"| {'setting':7s} | {'method':6s} | {'wiki ppl':>9s} | {'reference':>9s} | {'diff':>6s} | "
              f"{'quant s':>7s} | {'ref s':>5s} | {'peak RSS GB':>11s} | {'eval tok/s':>10s} | {'% matmul':>8s} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for method, setting in runs:
        setting = setting or "fp"
        row = df[(df["method"] == method) & (df["setting"] == setting)]
        if row.empty:
            continue
        r = row.iloc[-1]
        ref = REFERENCE.get((method, setting))
        diff = f"{100 * (r['value'] / ref - 1):+.1f}%" if ref else ""
        ref_s = REFERENCE_GPTQ_SECONDS.get(setting, "") if method == "gptq" else ""
        print(f"| {setting:7s} | {method:6s} | {r['value']:9.4g} | {ref if ref else '':>9} | {diff:>6s} | "
              f"{r['quant_seconds']:7.1f} | {ref_s:>5} | {r['peak_rss_bytes'] / 1e9:11.2f} | "
              f"{r['tokens_per_s']:10.0f} | {100 * r['flops_per_s'] / 1e9 / peak:7.0f}% |")


if __name__ == "__main__":
    main()
