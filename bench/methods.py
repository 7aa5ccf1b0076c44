"""Methods benchmark on SmolLM2-135M, `cpu` profile of PROTOCOL.md, evaluated on wiki and sotu.

Runs FP32, then each (method, setting) of the grid, each run in its own `ptq-bench run` process
(so peak RSS is that run's own), recording into the results store (default `results/`; a
config already recorded is skipped unless --force, so an interrupted benchmark resumes where it
stopped). Then prints one table: wiki and sotu perplexity, the change against RTN at the same
setting, quantization seconds (goal: under 10 minutes), peak RSS, eval throughput and its
fraction of the fp32 FLOP rate plain `torch.matmul` reaches on this machine, measured in this
same run. The default grid runs in priority order (w3g128 first, then w4a4, ...).

    python bench/methods.py                                  # the whole default grid (hours)
    python bench/methods.py --methods awq,rtn --settings w4g64,w3g64
    python bench/methods.py --table-only                     # print what is recorded
    python bench/methods.py --dry-run                        # list the runs and whether recorded
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

from ptqcore.runner import RunSpec  # noqa: E402
from ptqcore.quant import parse_setting  # noqa: E402
from ptqcore.pipeline import canonical_name  # noqa: E402
from ptqcore.results import ResultsStore  # noqa: E402

# The seven methods as their authors run them, QuaRot and QuIP also with plain rounding (each
# strategy alone, for the combinations study), and the five pipelines of the issue.
WEIGHT_METHODS = ("rtn", "gptq", "awq", "omniquant", "quip", "quarot+rtn", "smoothquant", "quip+rtn",
                  "quarot+gptq", "quip+gptq", "awq+gptq", "smoothquant+gptq", "awq+omniquant")
WA_METHODS = ("rtn", "gptq", "smoothquant", "quarot+gptq")
# (methods, settings) blocks, run in this order: the comparisons the goals rest on first,
# then the rest of the study the book shows (notebooks 10, 40 and 50 read these records).
GRID = (
    (WEIGHT_METHODS, ("w3g128",)),
    (WA_METHODS, ("w4a4",)),
    (("rtn", "awq"), ("w4g64", "w3g64")),
    (WA_METHODS, ("w4a8", "w8a8")),
    (WEIGHT_METHODS, ("w4g128", "w2g64", "w4")),
    (("rtn", "gptq", "awq", "omniquant", "quip", "quarot+gptq", "smoothquant"), ("w3",)),  # notebook 10's "all"
)
SETTING_ORDER = ("w4", "w4g128", "w4g64", "w3", "w3g128", "w3g64", "w2g64", "w8a8", "w4a8", "w4a4")

# Reference figures of the foundation issue (same protocol, 2 cores, fp32, wiki).
REFERENCE = {
    ("fp", "fp"): 17.82,
    ("rtn", "w4"): 33.49, ("rtn", "w4g128"): 25.21, ("rtn", "w3"): 604.7, ("rtn", "w3g128"): 100.8,
    ("rtn", "w2g64"): 7.8e5,
    ("gptq", "w4"): 27.41, ("gptq", "w4g128"): 23.67, ("gptq", "w3"): 98.86, ("gptq", "w3g128"): 52.03,
    ("gptq", "w2g64"): 1.86e4,
}
TIME_GOAL_S = 600


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


def run_spec(model: str, method: str, setting: str | None, datasets: tuple[str, ...]) -> RunSpec:
    if setting is None:
        return RunSpec(model, datasets=datasets)
    spec, act = parse_setting(setting)
    return RunSpec(model, method, spec, act, datasets=datasets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", help="comma-separated methods/pipelines (with --settings: replaces the grid)")
    parser.add_argument("--settings", help="comma-separated settings, e.g. w3g128,w4a4")
    parser.add_argument("--datasets", default="wiki,sotu")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is recorded")
    parser.add_argument("--table-only", action="store_true", help="run nothing; print the recorded table")
    args = parser.parse_args()
    if bool(args.methods) != bool(args.settings):
        parser.error("--methods and --settings go together")

    datasets = tuple(args.datasets.split(","))
    grid = ((tuple(args.methods.split(",")), tuple(args.settings.split(",")),),) if args.methods else GRID
    runs: list[tuple[str, str | None]] = [("fp", None)]
    for methods, settings in grid:
        runs += [(m, s) for s in settings for m in methods if (m, s) not in runs]

    store = ResultsStore(args.out)
    specs = [run_spec(args.model, m, s, datasets) for m, s in runs]
    for spec in specs:
        spec.validate()  # every name checked before the first (long) run
    if args.dry_run:
        done = store.hashes()
        for (m, s), spec in zip(runs, specs):
            recorded = store.first_recorded(spec.result_keys(), done) is not None
            print(f"{'recorded' if recorded else 'missing ':8s}  {s or 'fp':7s} {m}")
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not args.table_only:
        for method, setting in runs:
            cmd = [sys.executable, "-m", "ptqcore.cli", "run", "--model", args.model, "--method", method,
                   "--datasets", args.datasets, "--out", args.out, "--threads", str(args.threads), "--quiet"]
            cmd += ["--setting", setting] if setting else []
            cmd += ["--force"] if args.force else []
            print("$", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, env=env)

    peak = matmul_gflops(args.threads)
    df = store.table(latest=True)
    keys: dict[str, list] = {}  # aliases (quip, quip+gptq) share one record
    done = store.hashes()
    for run, spec in zip(runs, specs):
        key = store.first_recorded(spec.result_keys(), done)
        if key is not None:
            keys.setdefault(key, []).append(run)
    df = df[df["config_hash"].isin(keys)]
    device = df["device_name"].iloc[0] if len(df) else "?"
    print(f"\n{args.model}, cpu profile (wiki 32 x 512 calibration; {' and '.join(datasets)} test, 16 x 2048 "
          f"each), {device}; torch.matmul fp32 peak {peak:.0f} GFLOP/s here with {args.threads} threads\n")
    cols = [("setting", 7), ("method", 22)] + [(f"{d} ppl", 9) for d in datasets] + [
        ("vs rtn", 7), ("ref", 6), ("quant s", 7), ("threads", 7), ("peak RSS GB", 11), ("eval tok/s", 10), ("% matmul", 8)]
    print("| " + " | ".join(f"{c:>{w}s}" if i > 1 else f"{c:{w}s}" for i, (c, w) in enumerate(cols)) + " |")
    print("|" + "|".join("-" * (w + 2) for _, w in cols) + "|")
    value = {}
    for _, r in df.iterrows():
        for run in keys[r["config_hash"]]:
            value[(*run, r["dataset"])] = r
    order = {s: i for i, s in enumerate(SETTING_ORDER)}
    for method, setting in sorted(runs, key=lambda ms: (order.get(ms[1] or "", -1), runs.index(ms))):
        rows = [value.get((method, setting, d)) for d in datasets]
        if all(r is None for r in rows):
            continue
        r = next(r for r in rows if r is not None)
        name = setting or "fp"
        ppl = [f"{x['value']:9.4g}" if x is not None else f"{'-':>9s}" for x in rows]
        rtn = value.get(("rtn", setting, datasets[0]))
        vs = f"{100 * (rows[0]['value'] / rtn['value'] - 1):+6.0f}%" if rtn is not None and rows[0] is not None \
            and method != "rtn" else ""
        ref = REFERENCE.get((method, name))
        refd = f"{100 * (rows[0]['value'] / ref - 1):+5.1f}%" if ref and rows[0] is not None and datasets[0] == "wiki" \
            else ""
        slow = "!" if r["quant_seconds"] > TIME_GOAL_S else " "
        # the matmul peak was measured at --threads; other rows get no fraction
        share = f"{100 * r['flops_per_s'] / 1e9 / peak:7.0f}%" if r["torch_threads"] == args.threads else f"{'':>8s}"
        alias = canonical_name(method)
        label = method if alias == method else f"{method} (={alias})"  # one record serves both names
        print(f"| {name:7s} | {label:22s} | " + " | ".join(ppl) + f" | {vs:>7s} | {refd:>6s} | "
              f"{r['quant_seconds']:6.0f}{slow} | {int(r['torch_threads']):7d} | {r['peak_rss_bytes'] / 1e9:11.2f} | "
              f"{r['tokens_per_s']:10.0f} | {share} |")
    print(f"\nvs rtn: {datasets[0]} perplexity against RTN at the same setting; ref: against the foundation "
          f"issue's reference figure; '!' marks quantization slower than {TIME_GOAL_S // 60} minutes.")


if __name__ == "__main__":
    main()
