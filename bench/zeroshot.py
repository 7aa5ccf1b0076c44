"""Zero-shot benchmark on SmolLM2-135M (issue 5): FP32, then RTN and GPTQ at w4g128, w3g128 and
w2g64, scored on the offline task pack through lm-eval, with the storage cost of each setting.

Each run is its own `ptq-bench run` process (peak RSS per run) recording into the results store
(default `results/`; recorded configs are skipped, so an interrupted benchmark resumes). The
table shows, per task, the headline metric (acc_norm for siqa_bb, where SmolLM2 is at chance on
acc; acc elsewhere) with its standard error and wall seconds, the chance level, and the
effective bits per weight and packed size of the setting.

    python bench/zeroshot.py                                   # the grid, first 200 items per task
    python bench/zeroshot.py --task-limit 0                    # every item (hours on 2 cores)
    python bench/zeroshot.py --table-only --out /tmp/zs        # print what is recorded there
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqcore.results import ResultsStore  # noqa: E402
from ptqcore.tasks import OFFLINE_TASKS  # noqa: E402

GRID = (("fp", "fp"), ("rtn", "w4g128"), ("rtn", "w3g128"), ("rtn", "w2g64"),
        ("gptq", "w4g128"), ("gptq", "w3g128"), ("gptq", "w2g64"))
TASKS = ("siqa_bb", "sciq_bb", "winogrande_bb", "lastword_wiki")
HEADLINE = {"siqa_bb": "acc_norm"}  # the metric shown per task (default acc)


def run_all(args) -> None:
    for method, setting in GRID:
        cmd = [sys.executable, "-m", "ptqcore.cli", "run", "--model", "smollm2-135m", "--method", method,
               "--tasks", args.tasks, "--out", args.out, "--quiet"]
        if method != "fp":
            cmd += ["--setting", setting]
        if args.task_limit:
            cmd += ["--task-limit", str(args.task_limit)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print("$", " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def table(out: str, tasks: list[str]) -> str:
    df = ResultsStore(out).table(latest=True)
    if df.empty:
        return "(no results)"
    df = df[df["model"] == "smollm2-135m"]
    head = "| setting | method | bits/w | MiB | " + " | ".join(
        f"{t} {HEADLINE.get(t, 'acc')} (chance {OFFLINE_TASKS[t].chance:.2f})" for t in tasks) + " | wiki ppl |"
    lines = [head, "|" + "---|" * (5 + len(tasks))]
    for method, setting in GRID:
        runs = df[(df["method"] == method) & (df["setting"] == setting)]
        if runs.empty:
            continue
        first = runs.iloc[0]
        cells = []
        for t in tasks:
            r = runs[(runs["dataset"] == t) & (runs["metric"] == HEADLINE.get(t, "acc"))]
            cells.append("" if r.empty else f"{r.iloc[0]['value']:.3f} +- {r.iloc[0]['stderr']:.3f} "
                                            f"({r.iloc[0]['eval_seconds']:.0f} s, n={int(r.iloc[0]['task_items'])})")
        ppl = runs[runs["metric"] == "ppl"]
        lines.append(f"| {setting} | {method} | {first['bits_per_weight']:.3f} | {first['model_bytes'] / 2**20:.1f} | "
                     + " | ".join(cells) + f" | {'' if ppl.empty else format(ppl.iloc[0]['value'], '.4g')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--task-limit", type=int, default=200, help="items per task (0: all)")
    parser.add_argument("--limit", type=int, help="perplexity windows (default: the profile's)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        run_all(args)
    print(table(args.out, args.tasks.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
