"""Zero-shot accuracy through EleutherAI lm-evaluation-harness, on the model already in memory.

The (quantized) model is wrapped as `lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer, batch_size=...)` — no reload from disk — and each task is scored by its
own `lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=..., limit=...)` call, so
every task gets its own wall seconds. The task manager indexes lm-eval's tasks plus the offline
pack of `ptqcore/tasks/` (`include_path`). Zero-shot (`num_fewshot=0`), no chat template.

lm-eval reports composite keys (`"acc,none"`, `"acc_stderr,none"`); they are turned into plain
metric dicts here: `{"dataset": task, "metric": "acc", "value", "stderr", "limit", "task_items",
"num_fewshot", "chance", "eval_seconds", "lm_eval_version"}` — `limit` as asked (None: all
items), `task_items` the number actually scored. `seed` goes to all of lm-eval's seeds (python,
numpy, torch, few-shot); zero-shot log-likelihood scoring does not depend on them, but the row
records what was used.
"""

from __future__ import annotations

import logging
import time

from ..tasks import OFFLINE_TASKS, check_tasks, task_manager

REPORTED = ("acc", "acc_norm")


def _quiet_lm_eval() -> None:
    # lm-eval logs every task's config and a warning for `custom_dataset` at WARNING level.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def task_rows(results: dict, task: str, limit: int | None, seed: int) -> list[dict]:
    """Plain metric dicts for one task from `simple_evaluate(...)["results"]`."""
    res = results["results"][task]
    n = results.get("n-samples", {}).get(task, {})
    rows = []
    for metric in REPORTED:
        key = f"{metric},none"
        if key not in res:
            continue
        stderr = res.get(f"{metric}_stderr,none")
        rows.append({
            "dataset": task, "metric": metric, "value": float(res[key]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "limit": limit, "task_items": n.get("effective"), "num_fewshot": 0, "seed": seed,
            "chance": OFFLINE_TASKS[task].chance if task in OFFLINE_TASKS else None,
            "seqlen": None, "scored_tokens": None, "lm_eval_version": _lm_eval_version(),
        })
    if not rows:
        raise RuntimeError(f"lm-eval reported none of {', '.join(REPORTED)} for task {task}: {sorted(res)}")
    return rows


def zeroshot(model, tokenizer, tasks, limit: int | None = None, batch_size: int = 8, seed: int = 0,
             progress: bool = True, log=print) -> list[dict]:
    """Score `model` (a transformers causal LM in memory) on `tasks`; one list of metric dicts."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = check_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ValueError(f"task limit must be positive (or omitted for all items), got {limit}")
    _quiet_lm_eval()
    manager = task_manager()
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    rows = []
    try:
        for task in tasks:
            if progress:
                log(f"zero-shot {task} (limit {limit if limit is not None else 'all'})")
            start = time.perf_counter()
            results = simple_evaluate(
                model=lm, tasks=[task], task_manager=manager, limit=limit, num_fewshot=0,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                log_samples=False, bootstrap_iters=100000, verbosity="ERROR",
            )
            seconds = time.perf_counter() - start
            for row in task_rows(results, task, limit, seed):
                row["eval_seconds"] = seconds
                rows.append(row)
    finally:
        model.train(was_training)
    return rows


__all__ = ["REPORTED", "task_rows", "zeroshot"]
