"""Zero-shot tasks: the offline task pack and the upstream lm-evaluation-harness tasks.

Every task is scored by EleutherAI lm-evaluation-harness (`lm-eval`, see `ptqcore.eval.zeroshot`).
Upstream task names (`piqa`, `arc_easy`, `hellaswag`, `winogrande`, `mmlu`, ... : anything
lm-eval's `TaskManager` knows) work unchanged where the Hugging Face hub is reachable. The
offline pack below is a set of lm-eval task YAMLs in this folder (passed to lm-eval as
`include_path`); each reads local JSONL that `ptqcore.tasks.build` makes on first use from an
installed package (or the cached `bigbench` sdist) under `$PTQCORE_CACHE/tasks/`.

Items are always scored in file order and `--task-limit N` takes the first N (lm-eval's `limit`).
The cards (source, license, item count, options, chance level) are `OFFLINE_TASKS[name]`; the
item counts are what the builders produce from the pinned sources (checked by the tests).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_INSTALL = f"pip download bigbench=={BIGBENCH_VERSION} --no-deps --no-binary :all: (done for you on first use)"


@dataclass(frozen=True)
class TaskCard:
    name: str
    description: str
    source: str  # package and file the items come from
    license: str
    items: int  # items the builder produces from the pinned source
    options: str  # number of answer options per item
    chance: float  # accuracy of uniform guessing (mean of 1/options; 0 for open-vocabulary tasks)
    selection: str  # how items are chosen and put into the JSONL
    metrics: tuple[str, ...]  # what lm-eval reports (acc, acc_norm)
    upstream: str  # the closest upstream lm-eval task


OFFLINE_TASKS: dict[str, TaskCard] = {
    "winogrande_bb": TaskCard(
        "winogrande_bb",
        "WinoGrande twin sentences (fill the blank with one of two objects), partial scoring as lm-eval's winogrande",
        f"bigbench=={BIGBENCH_VERSION} sdist: bigbench/benchmark_tasks/natural_instructions/"
        "subtask029_winogrande_full_object/task.json",
        "BIG-bench: Apache-2.0; WinoGrande (Sakaguchi et al., 2020, via Natural Instructions v1): CC-BY",
        8998, "2", 0.5,
        "each of the 4,500 examples holds a twin pair 'Sentence 1/Answer1/Sentence 2/Answer2'; every sentence "
        "with exactly one '_' followed by text becomes one item (options: Answer1, Answer2 in that order; "
        "label 0 for sentence 1, 1 for sentence 2); pairs that do not parse are skipped; file order",
        ("acc",), "winogrande",
    ),
    "siqa_bb": TaskCard(
        "siqa_bb",
        "Social IQa: motivations, reactions and events around social situations, 3 options",
        f"bigbench=={BIGBENCH_VERSION} sdist: bigbench/benchmark_tasks/social_iqa/task.json",
        "BIG-bench: Apache-2.0; Social IQa (Sap et al., 2019): CC-BY-4.0",
        1954, "3 (2 for 4 items: duplicate options merged in the source)", 0.3337,
        "every example with exactly one target score of 1; options in the file's order; prompt as lm-eval's "
        "siqa ('Q: <context and question>\\nA:'); file order",
        ("acc", "acc_norm"), "siqa",
    ),
    "sciq_bb": TaskCard(
        "sciq_bb",
        "grade-school science multiple choice (Natural Instructions 'misc answering science questions')",
        f"bigbench=={BIGBENCH_VERSION} sdist: bigbench/benchmark_tasks/natural_instructions/"
        "subtask047_misc_answering_science_questions/task.json",
        "BIG-bench: Apache-2.0 (Natural Instructions v1 task; the original item source is not stated there)",
        250, "4 (3 for 5 items)", 0.2517,
        "every example; 'Question: q (A) .. (B) .. (C) .. [(D) ..]?' is split into the question and its "
        "options (the '?' the template appends to the last option is removed; an empty last option '(D)?' "
        "is dropped, 3 items), the target letter gives the label; one example whose options contain "
        "'(A)' as text is skipped (251 -> 250); prompt 'Question: q\\nAnswer:' scored on the option texts as "
        "lm-eval's sciq; file order",
        ("acc", "acc_norm"), "sciq",
    ),
    "mmlu_dev": TaskCard(
        "mmlu_dev",
        "MMLU dev questions (5 per subject, 57 subjects), zero-shot, prompt as lm-eval's mmlu",
        "lm-eval wheel: lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json",
        "MMLU (Hendrycks et al., 2021): MIT; lm-eval: MIT",
        281, "4", 0.25,
        "subjects in the file's order, each prompt's 'Q: ... (A) .. (B) .. (C) .. (D) ..' blocks in order "
        "(options on one line or one per line), the label from its last 'The answer is (X)'; 282 blocks "
        "(three subjects' prompts hold 4), one with a fifth option (E) is skipped; scored on the letters "
        "A-D after lm-eval's mmlu prompt",
        ("acc",), "mmlu",
    ),
    "lastword_wiki": TaskCard(
        "lastword_wiki",
        "LAMBADA-style: predict the last word of a Wikipedia paragraph (greedy match of every token)",
        "the `wiki` test split of PROTOCOL.md (gensim's bundled Wikipedia fixture, articles i % 5 == 4)",
        "Wikipedia text: CC BY-SA 3.0; gensim: LGPL-2.1",
        148, "open vocabulary", 0.0,
        "each line of a test article (in order) that is not a heading, has at least 40 words and ends with "
        "'.', whose last word (without the '.') is alphabetic, at least 3 letters long and occurs earlier in "
        "the same line (so the context supports it, as in most LAMBADA items; no human filtering as in "
        "LAMBADA); context = the line before that word, target = ' ' + word",
        ("acc",), "lambada_openai",
    ),
}

# Upstream lm-eval tasks that this project's study uses, with their offline stand-ins.
UPSTREAM_COMMON: dict[str, str | None] = {
    "piqa": None, "arc_easy": "sciq_bb", "arc_challenge": "sciq_bb", "hellaswag": None,
    "winogrande": "winogrande_bb", "boolq": None, "lambada_openai": "lastword_wiki", "mmlu": "mmlu_dev",
    "siqa": "siqa_bb", "sciq": "sciq_bb", "openbookqa": "sciq_bb", "lambada_standard": "lastword_wiki",
}


def offline_task_names() -> list[str]:
    return list(OFFLINE_TASKS)


def _offline_mode() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def upstream_task_names() -> list[str]:
    """Every task, group and tag name lm-eval's TaskManager indexes (empty without lm-eval)."""
    try:
        return list(task_manager().all_tasks)
    except ImportError:
        return []


_MANAGER = None


def task_manager():
    """lm-eval's TaskManager over its own tasks plus this folder (built once per process, ~2 s)."""
    global _MANAGER
    if _MANAGER is None:
        from lm_eval.tasks import TaskManager

        _MANAGER = TaskManager(include_path=str(TASKS_DIR))
    return _MANAGER


def alternative(name: str) -> str:
    alt = UPSTREAM_COMMON.get(name)
    offline = ", ".join(OFFLINE_TASKS)
    return f"offline alternative: {alt}" if alt else f"offline tasks: {offline}"


def check_tasks(names) -> list[str]:
    """Validate task names before any model is loaded; return them. Raises ValueError (unknown
    name, listing the choices), `MissingPackage` (lm-eval not installed) or `DatasetUnavailable`
    (an upstream task while HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, naming the offline
    alternative)."""
    from ..data import DatasetUnavailable
    from ..models import MissingPackage

    names = list(names)
    if not names:
        raise ValueError(f"no task given; offline tasks: {', '.join(OFFLINE_TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is repeated in {','.join(names)}")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MissingPackage("zero-shot tasks need lm-evaluation-harness; install it with: "
                             "pip install lm-eval") from None
    upstream = None
    for name in names:
        if name in OFFLINE_TASKS:
            continue
        if upstream is None:
            upstream = set(upstream_task_names()) - set(OFFLINE_TASKS)
        if name not in upstream:
            close = difflib.get_close_matches(name, sorted({*OFFLINE_TASKS, *upstream}), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown task {name!r}{hint}; offline: {', '.join(OFFLINE_TASKS)}; upstream (lm-eval, needs "
                f"network): {', '.join(UPSTREAM_COMMON)} and {max(len(upstream) - len(UPSTREAM_COMMON), 0)} more "
                "(ptq-bench list tasks --all)"
            )
        var = _offline_mode()
        if var:
            raise DatasetUnavailable(
                f"task {name!r} downloads its data from the Hugging Face hub, but {var} is set; {alternative(name)}"
            )
    return names


def prepare_tasks(names, progress: bool = True) -> None:
    """Build the offline tasks' JSONL into the cache now (fetching the bigbench sdist once if a
    file is missing), so a missing source fails before any model is loaded."""
    from .build import task_jsonl

    for name in names:
        if name in OFFLINE_TASKS:
            task_jsonl(name, progress)


__all__ = [
    "BIGBENCH_VERSION", "OFFLINE_TASKS", "TASKS_DIR", "TaskCard", "UPSTREAM_COMMON", "alternative", "check_tasks",
    "offline_task_names", "prepare_tasks", "task_manager", "upstream_task_names",
]
