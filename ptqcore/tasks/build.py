"""Build the offline task pack's JSONL files from installed packages, once, into the cache.

Layout under `$PTQCORE_CACHE/tasks/` (default `~/.cache/ptqcore/tasks/`):

    bigbench-1.0.0/<path inside the sdist>/task.json   the few BIG-bench files the pack needs
    <task>.v<PACK_VERSION>.jsonl                        one JSON object per item, in file order

The BIG-bench sdist (`bigbench==1.0.0`, ~360 MB, no wheel exists) is fetched with pip once,
only the needed `task.json` files are kept, and nothing is fetched again while they are in the
cache. pip >= 26 refuses to *finish* `pip download bigbench` (its metadata declares the direct
URL dependency `bleurt @ file://...`, which pip rejects for PyPI distributions); by then it has
downloaded and unpacked the sdist into its temporary folder, so we run it with `--no-clean` in a
private TMPDIR and take the files from there (older pips finish, and the files come from the
downloaded tarball instead). Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from . import BIGBENCH_VERSION, OFFLINE_TASKS

BIGBENCH_FILES = {
    "winogrande_bb": "bigbench/benchmark_tasks/natural_instructions/subtask029_winogrande_full_object/task.json",
    "siqa_bb": "bigbench/benchmark_tasks/social_iqa/task.json",
    "sciq_bb": "bigbench/benchmark_tasks/natural_instructions/subtask047_misc_answering_science_questions/task.json",
}
MMLU_PROMPTS = "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"  # inside the lm_eval package
PACK_VERSION = 1  # part of the JSONL names: raise it whenever a builder changes, so old caches are not reused


def tasks_cache() -> Path:
    from ..models.zoo import cache_dir

    return cache_dir() / "tasks"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- the bigbench sdist

def _folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _pip_download_bigbench(work: Path, progress: bool) -> subprocess.CompletedProcess:
    """`pip download bigbench==<ver> --no-deps --no-binary :all: --no-clean` into `work`, with a
    progress bar of the bytes pip has written (download, then unpack)."""
    from tqdm.auto import tqdm

    (work / "dl").mkdir()
    (work / "tmp").mkdir()
    cmd = [sys.executable, "-m", "pip", "download", f"bigbench=={BIGBENCH_VERSION}", "--no-deps",
           "--no-binary", ":all:", "--no-clean", "--progress-bar", "off", "-d", str(work / "dl")]
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "PIP_NO_INPUT": "1"}
    log = open(work / "pip.log", "w+", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    bar = tqdm(desc=f"bigbench {BIGBENCH_VERSION} sdist (pip download + unpack, once)", unit="B", unit_scale=True,
               disable=not progress)
    stop = threading.Event()

    def poll():
        while not stop.wait(0.5):
            bar.n = _folder_bytes(work)
            bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        rc = proc.wait()
    finally:
        stop.set()
        thread.join()
        bar.n = _folder_bytes(work)
        bar.close()
    log.seek(0)
    out = log.read()
    log.close()
    return subprocess.CompletedProcess(cmd, rc, out, "")


def bigbench_files(progress: bool = True) -> dict[str, Path]:
    """{task: cached task.json} for the pack's BIG-bench tasks; fetches the sdist only when a
    file is missing from the cache."""
    root = tasks_cache() / f"bigbench-{BIGBENCH_VERSION}"
    paths = {task: root / rel for task, rel in BIGBENCH_FILES.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    from ..models import MissingPackage

    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bigbench-", dir=root.parent))
    try:
        result = _pip_download_bigbench(work, progress)
        tarballs = sorted((work / "dl").glob("bigbench-*.tar.gz"))
        for task, rel in BIGBENCH_FILES.items():
            target = paths[task]
            if target.exists():
                continue
            data = None
            if tarballs:  # pip finished (pip < 26): read the member from the tarball
                with tarfile.open(tarballs[0]) as tar:
                    member = next((m for m in tar.getmembers() if m.name.endswith("/" + rel)), None)
                    if member is not None:
                        data = tar.extractfile(member).read()
            else:  # pip >= 26 stopped after unpacking: the tree is in its temporary folder
                found = sorted((work / "tmp").glob(f"pip-*/*/{rel}"))
                if found:
                    data = found[0].read_bytes()
            if data is None:
                tail = " | ".join(result.stdout.strip().splitlines()[-3:])
                raise MissingPackage(
                    f"could not get {rel} from the bigbench=={BIGBENCH_VERSION} sdist (pip exit {result.returncode}: "
                    f"{tail}); it needs PyPI access once: pip download bigbench=={BIGBENCH_VERSION} --no-deps "
                    "--no-binary :all:"
                )
            json.loads(data)  # a truncated file must never enter the cache
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return paths


# --------------------------------------------------------------------------- item builders

_WINO = re.compile(
    r"^\s*Sentence 1:\s*(?P<s1>.*?)\s*\n\s*Answer1:\s*(?P<a1>.*?)\s*\n\s*Sentence 2:\s*(?P<s2>.*?)\s*\n"
    r"\s*Answer2:\s*(?P<a2>.*?)\s*$",
    re.S,
)


def _strip_period(text: str) -> str:
    return text[:-1].rstrip() if text.endswith(".") else text


def winogrande_items(task_json: Path) -> list[dict]:
    """Two items per parsable twin pair (see the card); partial scoring fields as lm-eval's
    winogrande: `contexts` = the sentence up to the blank with each option filled in,
    `continuation` = the rest of the sentence, `label` = the correct option."""
    items = []
    for example in json.loads(task_json.read_text(encoding="utf-8"))["examples"]:
        m = _WINO.match(example["target"][0])
        if m is None:
            continue
        options = [_strip_period(m["a1"]), _strip_period(m["a2"])]
        if not all(options) or options[0] == options[1]:
            continue
        for label, sentence in enumerate((m["s1"], m["s2"])):
            if sentence.count("_") != 1:
                continue
            cut = sentence.index("_")
            continuation = sentence[cut + 1:].strip()
            if not continuation:
                continue
            items.append({"sentence": sentence, "option1": options[0], "option2": options[1], "label": label,
                          "contexts": [sentence[:cut] + o for o in options], "continuation": continuation})
    return items


def siqa_items(task_json: Path) -> list[dict]:
    items = []
    for example in json.loads(task_json.read_text(encoding="utf-8"))["examples"]:
        scores = example["target_scores"]
        if list(scores.values()).count(1) != 1:
            continue
        choices = list(scores)
        items.append({"question": example["input"].strip(), "choices": choices,
                      "label": list(scores.values()).index(1)})
    return items


_OPTION = re.compile(r"\(([A-E])\)")


def sciq_items(task_json: Path) -> list[dict]:
    items = []
    for example in json.loads(task_json.read_text(encoding="utf-8"))["examples"]:
        text = example["input"].strip()
        if not text.startswith("Question:"):
            continue
        parts = _OPTION.split(text[len("Question:"):])
        question, letters, options = parts[0].strip(), parts[1::2], [p.strip() for p in parts[2::2]]
        if not question or letters != list("ABCDE"[: len(letters)]) or len(letters) < 2:
            continue
        if options[-1].endswith("?"):  # the Natural Instructions template appends '?' to the last option
            options[-1] = options[-1][:-1].rstrip()
        if not options[-1] and len(options) > 2:  # an empty last option '(D)?': the item has one fewer
            options, letters = options[:-1], letters[:-1]
        answer = example["target"][0].strip().rstrip(".")
        if answer not in letters or not all(options):
            continue
        items.append({"question": question, "choices": options, "label": letters.index(answer)})
    return items


_MMLU_ANSWER = re.compile(r"answer is \(([A-E])\)")


def mmlu_items(prompts_json: Path) -> list[dict]:
    """Every 'Q: question\n(A) .. (B) .. (C) .. (D) ..\nA: <reasoning> The answer is (X).' block
    with exactly the options A-D (on one line or one per line)."""
    items = []
    for subject, prompt in json.loads(prompts_json.read_text(encoding="utf-8")).items():
        for block in ("\n\n" + prompt).split("\n\nQ: ")[1:]:
            head, sep, why = block.strip().partition("\nA: ")
            question, sep2, options = head.partition("\n(A) ")
            if not sep or not sep2:
                continue
            parts = _OPTION.split("(A) " + options)
            letters, choices = parts[1::2], [p.strip() for p in parts[2::2]]
            answers = _MMLU_ANSWER.findall(why)
            if parts[0].strip() or letters != list("ABCD") or not all(choices):
                continue
            if not answers or answers[-1] not in "ABCD":
                continue
            items.append({"subject": subject.replace("_", " "), "question": question.strip(), "choices": choices,
                          "label": "ABCD".index(answers[-1])})
    return items


_WORD = re.compile(r"[A-Za-z]+")


def lastword_items(min_words: int = 40) -> list[dict]:
    from ..data import wiki_articles
    from ..models import MissingPackage

    if importlib.util.find_spec("gensim") is None:
        raise MissingPackage("lastword_wiki is made from gensim's bundled Wikipedia fixture; install it with: "
                             "pip install gensim")

    items = []
    test = [doc for i, doc in enumerate(wiki_articles()) if i % 5 == 4]
    for article in test:
        for line in article.split("\n"):
            line = line.strip()
            if not line or line.startswith(("=", "|", "{", "!", "*", "#", ":", ";")) or not line.endswith("."):
                continue
            words = line[:-1].split()
            if len(words) < min_words:
                continue
            word = words[-1]
            if not (word.isascii() and word.isalpha() and len(word) >= 3):
                continue
            context = line[:-1].rstrip()[: -len(word)].rstrip()
            if word not in _WORD.findall(context):
                continue
            items.append({"context": context, "target": " " + word})
    return items


def _builders() -> dict:
    def lm_eval_file(rel: str) -> Path:
        import lm_eval

        return Path(lm_eval.__file__).parent / rel

    return {
        "winogrande_bb": lambda progress: winogrande_items(bigbench_files(progress)["winogrande_bb"]),
        "siqa_bb": lambda progress: siqa_items(bigbench_files(progress)["siqa_bb"]),
        "sciq_bb": lambda progress: sciq_items(bigbench_files(progress)["sciq_bb"]),
        "mmlu_dev": lambda progress: mmlu_items(lm_eval_file(MMLU_PROMPTS)),
        "lastword_wiki": lambda progress: lastword_items(),
    }


def task_jsonl(name: str, progress: bool = True) -> Path:
    """The task's JSONL in the cache, built on first use."""
    if name not in OFFLINE_TASKS:
        raise ValueError(f"unknown offline task {name!r}; available: {', '.join(OFFLINE_TASKS)}")
    path = tasks_cache() / f"{name}.v{PACK_VERSION}.jsonl"
    if not path.exists():
        items = _builders()[name](progress)
        if not items:
            raise RuntimeError(f"task {name}: the source gave no items")
        _write_atomic(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def load_items(name: str) -> list[dict]:
    return [json.loads(line) for line in task_jsonl(name).read_text(encoding="utf-8").splitlines()]


def load_dataset_dict(name: str):
    """The task's items as a `datasets.DatasetDict` with one `test` split (what lm-eval's
    `custom_dataset` hook must return)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_items(name))})


__all__ = ["BIGBENCH_FILES", "bigbench_files", "load_dataset_dict", "load_items", "task_jsonl", "tasks_cache"]
