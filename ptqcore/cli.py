"""`ptq-bench`: run, list, results.

Bad input (unknown model/method/dataset/profile/task, bits outside 2..8, non-positive sizes, an
upstream task offline) prints one line naming the valid choices and exits with code 2, before
any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__

EXIT_USAGE = 2
EXIT_FAILED = 1


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"bad --option {text!r}; expected KEY=VALUE, e.g. act_order=false")
    key, value = text.split("=", 1)
    low = value.strip().lower()
    if low in ("true", "false", "yes", "no", "on", "off"):
        return key.strip(), low in ("true", "yes", "on")
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), value


def _csv(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptq-bench", description="Post-training quantization benchmark (ptqcore).")
    parser.add_argument("--version", action="version", version=f"ptqcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="quantize a model with a method and evaluate it")
    run.add_argument("--model", required=True, help="registered name (see `list models`), HF id or local path")
    run.add_argument("--method", default="fp",
                     help="a method (see `list methods`) or a pipeline of them, e.g. quarot+gptq")
    run.add_argument("--setting", help="setting name instead of --wbits/--group-size/--abits, e.g. w3g128, w4a8")
    run.add_argument("--wbits", type=int, help="weight bits, 2..8")
    run.add_argument("--group-size", type=int, help="columns per group (default: per output channel)")
    run.add_argument("--abits", type=int, help="activation bits: per-token dynamic symmetric fake quantization")
    run.add_argument("--sym", action="store_true", help="symmetric weight grid (default asymmetric)")
    run.add_argument("--mse", action="store_true", help="MSE clip search for the weight grid (GPTQ reference)")
    run.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="method knob, e.g. -o act_order=false -o gptq.percdamp=0.1 (STEP.KNOB in a pipeline)")
    run.add_argument("--profile", default="cpu", help="measurement profile: cpu (default) or paper")
    run.add_argument("--datasets", help="comma-separated eval datasets (default: the profile's)")
    run.add_argument("--calib-dataset", help="calibration dataset (default: the profile's)")
    run.add_argument("--nsamples", type=int, help="calibration windows (default: the profile's)")
    run.add_argument("--calib-seqlen", type=int, help="calibration window length")
    run.add_argument("--eval-seqlen", type=int, help="perplexity window length")
    run.add_argument("--limit", type=int, default=-1, help="perplexity windows per dataset (default: the profile's)")
    run.add_argument("--all-windows", action="store_true", help="evaluate every window of the test split")
    run.add_argument("--tasks", help="comma-separated zero-shot tasks scored with lm-eval: the offline pack "
                                     "(winogrande_bb, siqa_bb, sciq_bb, mmlu_dev, lastword_wiki) or upstream names "
                                     "(see `list tasks`)")
    run.add_argument("--task-limit", type=int, help="items per task, the first N (default: all)")
    run.add_argument("--task-batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    run.add_argument("--export", metavar="DIR",
                     help="also write the quantized model as a packed GPTQ-format checkpoint into DIR")
    run.add_argument("--seed", type=int, help="calibration seed (default: the profile's; also lm-eval's seeds)")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--quantize-routers", action="store_true",
                     help="mixtures of experts: quantize routers and shared-expert gates too (default: full precision)")
    run.add_argument("--quantize-vision", action="store_true",
                     help="vision-language (llava): quantize the vision tower and projector too (default: the "
                          "language model only)")
    run.add_argument("--vqa-limit", type=int,
                     help="easy_vqa: test questions scored, the first N of a seeded shuffle (default: all 9673)")
    run.add_argument("--min-expert-tokens", type=int,
                     help="an expert routed fewer calibration tokens gets RTN, counted in the notes "
                          "(default: ptqcore.calib.MIN_EXPERT_TOKENS, 32)")
    run.add_argument("--batch-size", type=int, default=1,
                     help="calibration windows per block forward (default 1, as the GPTQ reference; larger is "
                          "faster but changes float summation order, which GPTQ at 3 bits is sensitive to)")
    run.add_argument("--threads", type=int, help="torch threads (recorded with every timing)")
    run.add_argument("--out", default="results", help="results folder (default: results/)")
    run.add_argument("--force", action="store_true", help="rerun even if this config is already recorded")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    lst = sub.add_parser("list", help="list models, methods, datasets, tasks, profiles")
    lst.add_argument("what", nargs="?", default="all", help="models, methods, datasets, tasks, profiles or all")
    lst.add_argument("--all", action="store_true", help="tasks: every upstream lm-eval task name")

    res = sub.add_parser("results", help="print the recorded results as a table")
    res.add_argument("--out", default="results", help="results folder")
    res.add_argument("--model")
    res.add_argument("--method")
    res.add_argument("--all", action="store_true", help="every recorded run, not only the newest per config")
    return parser


def _cmd_run(args) -> int:
    from .quant import ActSpec, QuantSpec, parse_setting
    from .runner import RunSpec, run, summary_line

    spec, act = None, None
    if args.setting:
        if args.wbits is not None or args.group_size is not None or args.abits is not None:
            raise ValueError("give either --setting or --wbits/--group-size/--abits, not both")
        spec, act = parse_setting(args.setting)
        args.wbits, args.group_size, args.abits = spec.bits, spec.group_size, act.bits if act else None
    if args.wbits is not None or args.group_size is not None:
        if args.wbits is None:
            raise ValueError("--group-size needs --wbits")
        spec = QuantSpec(bits=args.wbits, group_size=args.group_size, sym=args.sym, mse=args.mse)
    if args.abits is not None:
        act = ActSpec(bits=args.abits)
    options = dict(_parse_option(o) for o in args.option)
    run_spec = RunSpec(
        model=args.model, method=args.method, spec=spec, act=act, options=options, profile=args.profile,
        datasets=_csv(args.datasets), calib_dataset=args.calib_dataset, nsamples=args.nsamples,
        calib_seqlen=args.calib_seqlen, eval_seqlen=args.eval_seqlen,
        limit=None if args.all_windows else args.limit, seed=args.seed, device=args.device,
        batch_size=args.batch_size, tasks=_csv(args.tasks), task_limit=args.task_limit,
        task_batch_size=args.task_batch_size, quantize_routers=args.quantize_routers,
        quantize_vision=args.quantize_vision, vqa_limit=args.vqa_limit,
        **({} if args.min_expert_tokens is None else {"min_expert_tokens": args.min_expert_tokens}),
    )
    run_spec.validate()  # fail on bad input before torch threads or models are touched
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run(run_spec, out=args.out, force=args.force, progress=not args.quiet, export_dir=args.export)
    if rows:
        print(summary_line(rows))
    return 0


def _cmd_list(args) -> int:
    from .data import DATASETS, OFFLINE_CHOICES
    from .methods import FP, METHODS
    from .models import MODELS
    from .profiles import PROFILES

    sections = ("models", "methods", "datasets", "tasks", "profiles")
    if args.what not in (*sections, "all"):
        raise ValueError(f"unknown list {args.what!r}; available: {', '.join(sections)}, all")
    show = sections if args.what == "all" else (args.what,)
    if "models" in show:
        print("models:")
        for entry in MODELS.values():
            print(f"  {entry.name:14s} {entry.description}")
        print("  (or any Hugging Face id or local checkpoint folder)")
    if "methods" in show:
        print("methods:")
        infos = [FP, *(cls.info for cls in METHODS.values())]
        w = max(len(i.name) for i in infos)
        print(f"  {'name':{w}s} {'strategy':14s} {'kind':9s} {'calibration':11s} paper")
        for info in infos:
            calib = "yes" if info.needs_calibration else "no"
            print(f"  {info.name:{w}s} {info.strategy:14s} {info.kind:9s} {calib:11s} {info.paper}")
    if "datasets" in show:
        print("datasets:")
        for name in sorted(DATASETS):
            where = "offline" if name in OFFLINE_CHOICES else "needs network access"
            print(f"  {name:10s} {where}")
        print(f"  {'easy_vqa':10s} offline (PyPI easy-vqa): VQA accuracy of a vision-language model, --vqa-limit N")
    if "tasks" in show:
        _list_tasks(args.all, count_upstream=args.what == "tasks")
    if "profiles" in show:
        print("profiles:")
        for p in PROFILES.values():
            limit = "all" if p.eval_limit is None else p.eval_limit
            print(f"  {p.name:6s} calib {p.calib_dataset} {p.nsamples} x {p.calib_seqlen} seed {p.seed}; "
                  f"eval {','.join(p.eval_datasets)} seqlen {p.eval_seqlen} limit {limit} ({p.meant_for})")
            for method, knobs in p.method_defaults.items():
                print(f"         {method} defaults: {', '.join(f'{k}={v}' for k, v in knobs.items())}")
    return 0


def _list_tasks(every: bool, count_upstream: bool = True) -> None:
    from .tasks import OFFLINE_TASKS, UPSTREAM_COMMON, upstream_task_names

    print("tasks (zero-shot, scored with lm-eval; --tasks a,b --task-limit N):")
    print("  offline pack (built on first use from installed packages):")
    for card in OFFLINE_TASKS.values():
        print(f"    {card.name:14s} {card.items:5d} items, chance {card.chance:.3g}, options: {card.options}; "
              f"{card.description}")
        print(f"    {'':14s} source: {card.source}; license: {card.license}")
        if count_upstream:  # `list tasks`: the whole card
            print(f"    {'':14s} items: {card.selection}")
    if not count_upstream:  # `list` (all): no lm-eval task index (it takes seconds)
        print("  upstream (lm-eval, need network access): " + ", ".join(UPSTREAM_COMMON) + ", ... (list tasks)")
        return
    upstream = [n for n in upstream_task_names() if n not in OFFLINE_TASKS]
    if not upstream:
        print("  upstream: install lm-eval (pip install lm-eval) for lm-eval's tasks")
        return
    print(f"  upstream (lm-eval, need network access; {len(upstream)} task, group and tag names):")
    for name, alt in UPSTREAM_COMMON.items():
        print(f"    {name:16s} offline alternative: {alt or '-'}")
    if every:
        print("    " + "\n    ".join(n for n in upstream if n not in UPSTREAM_COMMON))
    else:
        print("    ... (ptq-bench list tasks --all prints every name)")


def _cmd_results(args) -> int:
    from .results import ResultsStore, format_table

    df = ResultsStore(args.out).table(latest=not args.all)
    if len(df) and args.model:
        df = df[df["model"] == args.model]
    if len(df) and args.method:
        df = df[df["method"] == args.method]
    print(format_table(df))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .calib import NonFiniteError
    from .data import DatasetUnavailable
    from .models import MissingPackage

    try:
        return {"run": _cmd_run, "list": _cmd_list, "results": _cmd_results}[args.command](args)
    except (ValueError, TypeError, MissingPackage, DatasetUnavailable) as err:
        print(f"ptq-bench: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as err:
        print(f"ptq-bench: aborted, nothing recorded: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
