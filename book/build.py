"""Build the ptq-bench book: execute the notebooks with papermill, then jupyter-book 1 with -W.

    python book/build.py                 # `make book`: default grids, results/, missing configs are run
    python book/build.py --quick         # `make book QUICK=1`: the reduced grid into _build/quick-results
    python book/build.py --no-run-missing   # only what is recorded (`make book RUN_MISSING=0`)
    python book/build.py --fresh         # `make book FRESH=1`: the default grids from scratch into _build/fresh-results
    python book/build.py -p models='["tiny-llama"]' --results /tmp/r   # any notebook parameter, as JSON
    python book/build.py --strip         # store the notebooks clean (no outputs, no metadata) before committing

Steps: every notebook the table of contents (`_toc.yml`) lists is executed by papermill from
its stored, output-free copy into `<build-dir>/src/<same path>`, with the parameters it
declares (the others are not passed); the markdown pages and `_config.yml`/`_toc.yml` are copied
beside them; then `jupyter-book build <build-dir>/src --path-output <build-dir>/.. -W` writes the
HTML into `<build-dir>/html` (jupyter-book 1 always writes into `<path-output>/_build/html`, so
the build directory is named `_build`). `_config.yml` has `execute_notebooks: "off"`: notebooks
are executed here, once, with parameters, never again by jupyter-book.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `make book QUICK=1`: a reduced grid run from scratch into its own results folder, so the whole
# pipeline (sweep -> results -> notebooks -> book) can be checked in well under 45 minutes on 2
# cores (20 minutes measured with two benchmarks sharing the cores): SmolLM2-135M, fp/rtn/gptq at w4g128 and w3g128, 8 calibration windows of 512
# tokens, 4 evaluation windows of 2048 tokens of wiki, no weight-activation settings, no combinations.
QUICK = {
    "models": ["smollm2-135m"],
    "methods": ["fp", "rtn", "gptq"],
    "settings": ["w4g128", "w3g128"],
    "datasets": ["wiki"],
    "wa_settings": [],
    "combinations": [],
    "nsamples": 8,
    "limit": 4,
}
# The quick build leaves the vision-language chapter's grid empty: its model's build alone
# (smollm2-llava, ~15-30 minutes on 2 cores) would not fit; the chapter renders and says so.
QUICK_OVERRIDES = {"notebooks/30_cross_modality.ipynb": {"models": []}}
QUICK_RESULTS = "_build/quick-results"
# `make book FRESH=1`: the whole default study recomputed into an empty results folder (hours on
# 2 cores: the results explorer's "What the records cost" table sums the recorded run times).
FRESH_RESULTS = "_build/fresh-results"


def toc_files(root: Path = ROOT) -> list[str]:
    """Every `file:` of the table of contents (and its root), in order, without suffix."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def sources(root: Path = ROOT) -> tuple[list[Path], list[Path]]:
    """(notebooks, other pages) of the table of contents, as paths relative to `root`."""
    notebooks, pages = [], []
    for name in toc_files(root):
        matches = [Path(name + ext) for ext in (".ipynb", ".md") if (root / (name + ext)).exists()]
        if not matches:
            raise FileNotFoundError(f"_toc.yml lists {name!r}, but neither {name}.ipynb nor {name}.md exists")
        (notebooks if matches[0].suffix == ".ipynb" else pages).append(matches[0])
    return notebooks, pages


def execute(notebooks: list[Path], dest: Path, parameters: dict, root: Path = ROOT, shared_kernel: bool = False,
            log=print, overrides: dict[str, dict] | None = None) -> dict[str, float]:
    """Execute each notebook (relative to `root`) into `dest/<same path>` with the parameters it
    declares; `overrides` maps a notebook path to parameters that replace those for it alone
    (the vision-language chapter needs other models and datasets than the text chapters).
    `shared_kernel`: one kernel for all, its namespace reset between notebooks (faster
    start-up; the tests use it); otherwise a fresh kernel per notebook. Returns seconds per notebook."""
    import papermill as pm

    km = None
    if shared_kernel:
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name="python3")
        km.start_kernel(cwd=str(root), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    timings = {}
    try:
        for nb in notebooks:
            declared = pm.inspect_notebook(str(root / nb))
            params = {k: v for k, v in {**parameters, **(overrides or {}).get(str(nb), {})}.items() if k in declared}
            out = dest / nb
            out.parent.mkdir(parents=True, exist_ok=True)
            if km is not None:
                _reset(km)
            log(f"execute {nb} {json.dumps(params) if params else ''}".rstrip())
            start = time.perf_counter()
            pm.execute_notebook(str(root / nb), str(out), parameters=params, cwd=str(root), kernel_name="python3",
                                progress_bar=False, **({"km": km} if km is not None else {}))
            timings[str(nb)] = time.perf_counter() - start
            _hide_injected(out)
    finally:
        if km is not None:
            km.shutdown_kernel(now=True)
    return timings


def _reset(km) -> None:
    """Clear the user namespace of a shared kernel (imported modules stay loaded)."""
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive("%reset -f\nimport matplotlib.pyplot as _plt; _plt.close('all'); del _plt",
                               timeout=60, output_hook=lambda msg: None)
    finally:
        kc.stop_channels()


def _hide_injected(path: Path) -> None:
    """Tag papermill's injected-parameters cell `hide-input` like the rest of the code (the book
    shows a toggle)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")
    nbformat.write(nb, str(path))


def strip(paths) -> list[Path]:
    """Store notebooks clean: no outputs, execution counts or metadata besides cell tags and the
    kernel. Returns the files it changed."""
    import nbformat

    changed = []
    for path in map(Path, paths):
        before = path.read_text()
        nb = nbformat.reads(before, as_version=4)
        nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                       "language_info": {"name": "python"}}
        for cell in nb.cells:
            tags = cell.metadata.get("tags", [])
            cell.metadata = {"tags": tags} if tags else {}
            cell.pop("id", None)
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nb.nbformat_minor = 4
        after = nbformat.writes(nb) + "\n"
        if after != before:
            path.write_text(after)
            changed.append(path)
    return changed


def stage(pages: list[Path], dest: Path, root: Path = ROOT) -> None:
    """Copy the configuration and the non-notebook pages (plus any images next to them) into `dest`."""
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, dest / name)
    for page in pages:
        (dest / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / page, dest / page)


def build_html(src: Path, build_dir: Path, strict: bool = True) -> Path:
    """jupyter-book 1 build of `src` into `build_dir/html` (`build_dir` must be named `_build`)."""
    if build_dir.name != "_build":
        raise ValueError(f"jupyter-book 1 writes into <path-output>/_build; name the build folder _build, not {build_dir}")
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(src), "--path-output", str(build_dir.parent),
           "--builder", "html"] + (["-W", "--keep-going"] if strict else [])
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return build_dir / "html"


def build(build_dir: Path, parameters: dict, root: Path = ROOT, shared_kernel: bool = False, strict: bool = True,
          log=print, overrides: dict[str, dict] | None = None) -> dict[str, float]:
    """The whole book: execute, stage, build. Returns seconds per step/notebook."""
    notebooks, pages = sources(root)
    src = build_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    timings = execute(notebooks, src, parameters, root, shared_kernel=shared_kernel, log=log, overrides=overrides)
    stage(pages, src, root)
    start = time.perf_counter()
    build_html(src, build_dir, strict=strict)
    timings["jupyter-book"] = time.perf_counter() - start
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"the reduced grid into {QUICK_RESULTS}")
    parser.add_argument("--fresh", action="store_true", help=f"the default grids from scratch into {FRESH_RESULTS}")
    parser.add_argument("--results", help="results folder (default: results/, or the quick or fresh folder)")
    parser.add_argument("--no-run-missing", action="store_true", help="show only recorded configs; run nothing")
    parser.add_argument("--build-dir", default=str(ROOT / "_build"), help="build folder, named _build (default: ./_build)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=JSON",
                        help="a notebook parameter (JSON value, or a plain string)")
    parser.add_argument("--no-strict", action="store_true", help="let warnings pass (default: -W, warnings are errors)")
    parser.add_argument("--strip", action="store_true", help="strip the stored notebooks (outputs, metadata) and exit")
    args = parser.parse_args(argv)
    if args.strip:
        notebooks, _ = sources()
        for path in strip(ROOT / nb for nb in notebooks):
            print(f"stripped {path.relative_to(ROOT)}")
        return

    if args.quick and args.fresh:
        parser.error("--quick and --fresh are two different grids: choose one")
    parameters = dict(QUICK) if args.quick else {}
    results = args.results or (QUICK_RESULTS if args.quick else FRESH_RESULTS if args.fresh else "results")
    parameters["results"] = str((ROOT / results).resolve()) if not Path(results).is_absolute() else results
    parameters["run_missing"] = not args.no_run_missing
    for item in args.param:
        key, _, value = item.partition("=")
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value
    build_dir = Path(args.build_dir).resolve()
    start = time.perf_counter()
    timings = build(build_dir, parameters, strict=not args.no_strict, overrides=QUICK_OVERRIDES if args.quick else None)
    for step, seconds in timings.items():
        print(f"{seconds:8.1f} s  {step}")
    print(f"{time.perf_counter() - start:8.1f} s  total; open {build_dir / 'html' / 'index.html'}")


if __name__ == "__main__":
    main()
