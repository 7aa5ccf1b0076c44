"""The study notebooks: stored clean, executable under papermill with a smoke parameter set,
and the `ptqcore.report` helpers they call.

All notebooks of the book's table of contents run once per session (`smoke_notebooks`), in
one kernel whose namespace is reset between notebooks, on `tiny-llama` with a few configs into
a temporary results folder; `tests/test_book.py` builds the book from the same outputs.
"""

from __future__ import annotations

import ast
import atexit
import importlib.util
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

# tiny-llama, a couple of configs per notebook, tiny calibration and evaluation.
SMOKE = {
    "models": '["tiny-llama"]',  # as papermill's `-p models '["..."]'` passes it: a string
    "methods": ["fp", "rtn", "gptq"],
    "settings": "w3g32",  # comma-separated names work too
    "wa_settings": ["w4a8"],
    "wa_methods": ["rtn", "gptq"],
    "datasets": ["wiki"],
    # a combination runs if its methods are registered; "nosuch" exercises the skip sentence
    "combinations": ["quip+gptq", "nosuch+gptq"],
    "nsamples": 2,
    "calib_seqlen": 32,
    "eval_seqlen": 64,
    "limit": 1,
}


# The vision-language chapter: a tiny LLaVA scored on a few easy-vqa questions.
SMOKE_OVERRIDES = {"notebooks/30_cross_modality.ipynb": {
    "models": ["tiny-llava"], "datasets": ["easy_vqa"], "vqa_limit": 4, "vision_methods": ["rtn"],
    "vision_settings": ["w3g32"]}}


def load_build():
    spec = importlib.util.spec_from_file_location("book_build", ROOT / "book" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SMOKE: dict = {}


def smoke_notebooks() -> dict:
    """Execute every notebook once per session; returns {"build_dir", "src", "results", "timings",
    "notebooks"}. Shared with tests/test_book.py (same module object under pytest)."""
    if not _SMOKE:
        build = load_build()
        tmp = Path(tempfile.mkdtemp(prefix="ptq-book-smoke-"))
        atexit.register(shutil.rmtree, tmp, True)
        build_dir, results = tmp / "_build", tmp / "results"
        src = build_dir / "src"
        notebooks, pages = build.sources()
        start = time.perf_counter()
        timings = build.execute(notebooks, src, {**SMOKE, "results": str(results), "run_missing": True},
                                shared_kernel=True, log=lambda *_: None, overrides=SMOKE_OVERRIDES)
        build.stage(pages, src)
        timings["total"] = time.perf_counter() - start
        _SMOKE.update(build_dir=build_dir, src=src, results=results, timings=timings, notebooks=notebooks)
    return _SMOKE


@pytest.fixture(scope="session")
def smoke():
    return smoke_notebooks()


def stored_notebooks() -> list[Path]:
    return sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb"))


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


# --------------------------------------------------------------------------- stored notebooks

@pytest.mark.parametrize("path", stored_notebooks(), ids=lambda p: p.name)
def test_stored_notebook_is_clean(path):
    """No outputs or execution counts (readable diffs), one `parameters` cell of plain literal
    assignments, and no function longer than a few lines."""
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"
    params = [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    for node in ast.parse(params[0].source).body:
        assert isinstance(node, ast.Assign), f"{path.name}: the parameters cell holds only assignments"
        ast.literal_eval(node.value)  # simple values only: strings, numbers, lists, None, booleans
    for cell in code_cells(nb):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 5, f"{path.name}: move {node.name} into ptqcore/report.py"


def test_every_toc_notebook_is_stored():
    notebooks, _ = load_build().sources()
    assert {ROOT / nb for nb in notebooks} == set(stored_notebooks())


# --------------------------------------------------------------------------- executed notebooks

GLUE_ROLE = re.compile(r"\{glue(?::text|:any)?\}`([^`]+)`|\{glue:figure\}\s+(\S+)")


def glued_names(nb) -> set[str]:
    return {out.metadata["scrapbook"]["name"] for cell in code_cells(nb) for out in cell.outputs
            if "scrapbook" in out.get("metadata", {})}


def test_notebooks_execute_with_smoke_parameters(smoke):
    print("\nsmoke execution seconds:", json.dumps({k: round(v, 1) for k, v in smoke["timings"].items()}))
    for nb_path in smoke["notebooks"]:
        nb = nbformat.read(str(smoke["src"] / nb_path), as_version=4)
        errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{nb_path}: {errors[0].ename}: {errors[0].evalue}"
        passed = nb.metadata.papermill["parameters"]  # those of SMOKE the notebook declares
        injected = [c for c in code_cells(nb) if "injected-parameters" in c.metadata.get("tags", [])]
        assert bool(injected) == bool(passed), nb_path
        if "models" in passed:
            expected = SMOKE_OVERRIDES.get(str(nb_path), {}).get("models", SMOKE["models"])
            assert passed["models"] == expected and "results" in passed
        for cell in code_cells(nb):  # every glued figure is an image, not a repr
            for out in cell.outputs:
                if "scrapbook" in out.get("metadata", {}) and out.data.get("text/plain", "").startswith("<Figure"):
                    assert "image/png" in out.data, f"{nb_path}: {out.metadata.scrapbook.name} glued without a PNG"


def test_every_glue_reference_is_glued(smoke):
    """Each `{glue:text}` / `{glue:figure}` key of a notebook's markdown is glued by its code
    (the book's -W build would fail otherwise; this names the key)."""
    for nb_path in smoke["notebooks"]:
        nb = nbformat.read(str(smoke["src"] / nb_path), as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        keys = {m.group(1) or m.group(2) for m in GLUE_ROLE.finditer(text)}
        keys = {k.rsplit(":", 1)[0] if k.count(":") == 1 else k for k in keys}
        missing = keys - glued_names(nb)
        assert not missing, f"{nb_path}: glued nowhere: {sorted(missing)}"


def test_sweeps_recorded_the_smoke_grid_and_resume(smoke):
    from ptqcore import report
    from ptqcore.results import ResultsStore
    from ptqcore.sweep import grid

    table = ResultsStore(smoke["results"]).table(latest=True)
    assert {"fp", "rtn", "gptq"} <= set(table["method"])
    assert set(table["model"]) == {"tiny-llama", "tiny-llava"}
    common = {k: SMOKE[k] for k in ("nsamples", "calib_seqlen", "eval_seqlen", "limit", "datasets")}
    models = report.as_list(SMOKE["models"])
    specs = grid(models, SMOKE["methods"], report.as_list(SMOKE["settings"]), **common) + grid(
        models, SMOKE["wa_methods"], SMOKE["wa_settings"], **common)
    assert report.missing(specs, smoke["results"]) == []  # a second run of the notebooks would run nothing


def test_combinations_notebook_names_what_cannot_run(smoke):
    nb = nbformat.read(str(smoke["src"] / "notebooks/50_combinations.ipynb"), as_version=4)
    shown = " ".join(o.data.get("text/markdown", "") for c in code_cells(nb) for o in c.outputs if "data" in o)
    assert "nosuch+gptq" in shown and "not registered yet: nosuch" in shown


# --------------------------------------------------------------------------- ptqcore.report

def synthetic_rows(collapse_at: str = "w2g64") -> pd.DataFrame:
    """Result rows shaped like the store's: fp + rtn/gptq at three settings, one collapse."""
    rows = [("fp", "fp", 16, None, 16, 18.0)]
    for method, scale in (("rtn", 1.6), ("gptq", 1.2)):
        for setting, wbits, group, factor in (("w4g128", 4, 128, 1.0), ("w3g128", 3, 128, 2.0), ("w2g64", 2, 64, 300.0)):
            rows.append((method, setting, wbits, group, 16, 18.0 * scale * factor))
    frame = pd.DataFrame(rows, columns=["method", "setting", "wbits", "group_size", "abits", "value"])
    frame = frame.assign(model="tiny-llama", dataset="wiki", metric="ppl", seqlen=64, limit=1, quant_seconds=1.0,
                         peak_rss_bytes=2**30, git_sha="0123456789abcdef", git_dirty=False, device_name="Test CPU",
                         torch_threads=2, run_id=[f"r{i}" for i in range(len(rows))],
                         config_hash=[f"h{i}" for i in range(len(rows))])
    from ptqcore.report import _annotate

    return _annotate(frame)


def test_select_methods_all_and_unknown():
    from ptqcore import report
    from ptqcore.methods import METHODS

    names, note = report.select_methods("all")
    assert names == ["fp", *METHODS] and note == ""
    assert report.default_pipeline("gptq") == "gptq" and report.standalone_name("gptq") == "gptq"
    assert report.default_pipeline("quarot") == "quarot+gptq" and report.standalone_name("quarot") == "quarot+rtn"
    assert report.standalone_name("awq") == "awq"  # RTN is its default quantizer
    names, note = report.select_methods(["fp", "gptq", "nosuch"])
    assert names == ["fp", "gptq"] and "`nosuch`" in note and "unknown method" in note


def test_list_parameters_as_papermill_passes_them():
    from ptqcore.report import as_list

    assert as_list('["meta-llama/Llama-2-7b-hf"]') == ["meta-llama/Llama-2-7b-hf"]
    assert as_list("['w4', 'w3g128']") == ["w4", "w3g128"]
    assert as_list("w4, w3g128") == ["w4", "w3g128"] and as_list("gptq") == ["gptq"]
    assert as_list(("a",)) == ["a"] and as_list(None) is None and as_list("") == []


def test_combination_plan():
    from ptqcore import report

    plan, note = report.combination_plan(["nosuch+gptq", "gptq+rtn"])
    assert plan == {} and "not registered yet: nosuch" in note and "gptq+rtn" in note
    assert report.combination_plan([]) == ({}, "This grid lists no combinations.")


def test_settings_sort_weight_only_then_weight_activation_most_bits_first():
    from ptqcore.report import order_settings

    assert order_settings(["w2g64", "w3", "w4a4", "w4g128", "fp", "w4", "w3g128", "w4a8", "w8a8"]) == [
        "fp", "w4", "w4g128", "w3", "w3g128", "w2g64", "w8a8", "w4a8", "w4a4"]


def test_model_bytes_counts_bits_scales_zeros_and_fp16_rest():
    from ptqcore.report import linear_inventory, model_bytes

    shapes, other = linear_inventory("tiny-llama")  # 2 blocks, hidden 64, intermediate 96, 2 kv heads of 16
    per_block = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    assert sorted(shapes) == sorted(per_block * 2)
    assert other == 49152 * 64 + 5 * 64  # tied embedding/head + 2 norms per block + the final norm
    linear_params = sum(o * i for o, i in shapes)
    assert model_bytes("tiny-llama", 16, None) == (linear_params + other) * 2
    expected = sum(o * i * 3 + o * math.ceil(i / 32) * 32 for o, i in shapes) + other * 16
    assert model_bytes("tiny-llama", 3, 32) == expected / 8
    per_channel = sum(o * i * 4 + o * 32 for o, i in shapes) + other * 16
    assert model_bytes("tiny-llama", 4, None) == per_channel / 8
    # a partial last group counts as a group: 96 = 64 + 32
    assert model_bytes("tiny-llama", 4, 64) > model_bytes("tiny-llama", 4, 96)


def test_pareto_front_per_dataset():
    from ptqcore.report import pareto_front

    df = pd.DataFrame({"model_bytes": [1, 2, 3, 4, 1, 2], "value": [10, 12, 5, 6, 3, 1],
                       "dataset": ["a", "a", "a", "a", "b", "b"]})
    assert pareto_front(df).tolist() == [True, False, True, False, True, True]
    # a collapsed point is never on the front, however small: the next smallest takes its place
    df = pd.DataFrame({"model_bytes": [1, 2, 3, 4], "value": [5000.0, 30.0, 20.0, 25.0], "dataset": "a"})
    assert pareto_front(df).tolist() == [True, True, True, False]
    assert pareto_front(df, collapse=1000).tolist() == [False, True, True, False]


def test_findings_have_fixed_keys_and_compute_the_verdict():
    from ptqcore import report

    rows = synthetic_rows()
    full, empty = report.bitwidth_findings(rows), report.bitwidth_findings(rows.iloc[0:0])
    assert full.keys() == empty.keys()
    assert full["robust_method"] == "gptq" and full["verdict"].startswith("We agree")
    assert full["n_collapsed"] == "2" and "w2g64" in full["collapsed_list"]
    assert "untested" in empty["verdict"]
    # one record asked for under two names (weight-activation grids ask for quarot+gptq) is one method
    gptq = rows[rows.method == "gptq"]
    aliased = report.bitwidth_findings(pd.concat([rows, gptq.assign(method="quarot"), gptq.assign(method="quarot+gptq")]))
    assert aliased["methods_seen"].split(", ").count("quarot") == 1 and "quarot+gptq" not in aliased["methods_seen"]
    assert int(aliased["n_methods"]) == int(full["n_methods"]) + 1
    sized = report.with_size(rows)
    assert report.size_findings(sized).keys() == report.size_findings(sized.iloc[0:0]).keys()
    assert "one model" in report.size_findings(sized)["verdict"]
    # the front is per dataset, and says which
    two = pd.concat([sized, sized.assign(dataset="other", value=sized["value"] * 2)])
    fronts = report.size_findings(two)["front_list"]
    assert fronts.startswith(f"{sized['dataset'].iloc[0]}: ") and "; other: " in fronts


def test_figures_are_titled_labelled_log_scaled_and_mark_collapse():
    from ptqcore import report

    rows = synthetic_rows()
    fig = report.plot_ppl_by_setting(rows, title="T")
    ax = fig.axes[0]
    assert fig._suptitle.get_text() == "T" and ax.get_yscale() == "log"
    assert "perplexity" in ax.get_ylabel() and "setting" in ax.get_xlabel()
    assert any("collapsed (ppl > 1000)" in t.get_text() for t in ax.get_legend().get_texts())
    assert any("Test CPU" in t.get_text() and "0123456" in t.get_text() for t in fig.texts)  # provenance
    fig = report.plot_size_vs_ppl(report.with_size(rows), title="S")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "MiB" in ax.get_xlabel() and ax.get_yscale() == "log"
    plan = {"fake+gptq": ["rtn", "gptq", "fake+gptq"]}
    combined = pd.concat([rows, rows[rows.method == "gptq"].assign(method="fake+gptq", value=lambda d: d.value * 0.9)])
    crow = report.combination_rows(combined, plan)
    fig = report.plot_combinations(crow, title="C")
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_title() == "fake+gptq"
    found = report.combination_findings(crow, plan)
    assert found["n_pairs"] == "3" and found["n_wins"] == "3" and found["verdict"].startswith("We agree")
    for empty in (report.plot_ppl_by_setting(rows.iloc[0:0]), report.plot_combinations(crow.iloc[0:0])):
        assert empty.axes[0].get_title()  # a titled placeholder, not an error


def test_tables_and_explorer(tmp_path):
    from ptqcore import report

    rows = synthetic_rows()
    html = report.ppl_table(rows).to_html()
    assert "†" in html and "font-weight: bold" in html
    weak = rows.assign(model="weak", value=rows["value"] * 1000)  # its fp is above the threshold already
    html = report.ppl_table(pd.concat([rows, weak], ignore_index=True)).to_html()
    assert html.count("†") == 1 + (rows["value"] > 1000).sum()  # the caption's, and tiny-llama's collapsed runs only
    assert report.cost_table(rows).shape[0] == 2
    uneven = rows[~((rows.method == "gptq") & (rows.setting == "w2g64"))]
    cost = report.cost_table(uneven)
    assert not cost.isna().any().any() and cost.loc[("tiny-llama", "gptq"), ("quant seconds", "w2g64")] == ""
    table = report.robustness(rows)
    assert table.iloc[0]["method"] == "gptq" and table.iloc[0]["wins"] == 3
    assert "No results" in report.explorer_html(report.explorer_frame(tmp_path)).data
    assert report.results_path("results") == ROOT / "results"


def test_compute_table_counts_each_run_once():
    """Quantization seconds once per run (every row repeats them), evaluation seconds per row."""
    from ptqcore import report

    frame = pd.DataFrame({
        "run_id": ["a", "a", "b", "c"], "model": ["m", "m", "m", "n"], "quant_seconds": [3600.0, 3600.0, 0.0, None],
        "eval_seconds": [1800.0, 1800.0, 3600.0, 7200.0], "torch_threads": [1, 1, 2, 1]})
    table = report.compute_table(frame).set_index("model")
    assert table.loc["m", "runs"] == 2 and table.loc["m", "quantization h"] == 1.0
    assert table.loc["m", "evaluation h"] == 2.0 and table.loc["m", "threads"] == "1, 2"
    assert table.loc["all", "total h"] == 5.0 and table.loc["all", "runs"] == 3
    assert report.compute_table(frame.iloc[:0]).empty


def test_build_refuses_quick_and_fresh_together(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_build().main(["--quick", "--fresh"])
    assert exit_.value.code == 2 and "choose one" in capsys.readouterr().err


def test_structure_table_plot_and_findings():
    from ptqcore import report

    dense = synthetic_rows()
    moe = synthetic_rows().assign(model="tiny-moe", run_id=lambda f: f["run_id"] + "m",
                                  config_hash=lambda f: f["config_hash"] + "m")
    moe.loc[moe.method == "gptq", "value"] *= 3.0  # gptq degrades most on the MoE: rtn's worst case is better
    moe.loc[moe.method == "rtn", "notes"] = "expert fallback: 2 linears"
    rows = report._annotate(pd.concat([dense, moe], ignore_index=True))
    table = report.structure_table(rows)
    assert list(table.columns[:3]) == ["method", "tiny-llama", "tiny-moe"]
    assert list(table["method"]) == ["rtn", "gptq"] and (table["structures"] == 2).all()
    assert table.iloc[1]["worst"] == pytest.approx(table.iloc[1]["tiny-moe"])
    found = report.structure_findings(rows)
    assert found["robust_method"] == "rtn" and found["verdict"].startswith("We disagree")
    found = report.structure_findings(rows[~((rows.model == "tiny-moe") & (rows.method == "rtn"))])
    assert found["robust_method"] == "gptq" and found["verdict"].startswith("Only gptq")
    assert found["partial"] == "rtn (1 of 2)"
    assert list(report.notes_table(rows)["method"]) == ["rtn"] * 3
    # compared on shared settings only: gptq lacks w2g64 everywhere, so rtn's w2g64 is left out too
    # (else gptq would win by skipping the hardest setting)
    uneven = rows[~((rows.method == "gptq") & (rows.setting == "w2g64"))]
    found = report.structure_findings(uneven)
    assert found["robust_method"] == "rtn" and "settings every compared method has" in found["verdict"]
    assert found["robust_worst"] == report.fmt(1.6 * 2 ** 0.5, 3)  # rtn over w4g128 and w3g128 only
    assert found["runner_up_worst"] == report.fmt(3.6 * 2 ** 0.5, 3)  # gptq on the MoE
    # a third structure with only rtn so far is left out of the comparison, and the verdict says so
    third = rows[(rows.model == "tiny-moe") & rows.method.isin(["fp", "rtn"])].assign(
        model="tiny-ds", run_id=lambda f: f["run_id"] + "d", config_hash=lambda f: f["config_hash"] + "d")
    found = report.structure_findings(pd.concat([rows, third], ignore_index=True))
    assert found["compared"] == "tiny-llama, tiny-moe" and found["robust_method"] == "rtn"
    assert found["verdict"].startswith("Provisional, on 2 of the 3 structures (tiny-ds has only rtn recorded yet). "
                                       "We disagree")
    assert report.structure_findings(rows)["compared"] == "tiny-llama, tiny-moe"
    # a structure with two methods could be compared, but with under half the methods of the best it waits
    many = pd.concat([rows] + [rows[rows.method == "gptq"].assign(method=m) for m in ("awq", "quip", "quarot")],
                     ignore_index=True)
    two = pd.concat([third, rows[(rows.model == "tiny-moe") & (rows.method == "gptq")].assign(model="tiny-ds")])
    found = report.structure_findings(pd.concat([many, two], ignore_index=True))  # 2 of 5 methods: waits
    assert found["compared"] == "tiny-llama, tiny-moe" and found["verdict"].startswith("Provisional")
    # a row averages over the settings all its structures have: the MoE lacks gptq w2g64, so the
    # dense gptq cell leaves its w2g64 out too
    partial = rows[~((rows.method == "gptq") & (rows.model == "tiny-moe") & (rows.setting == "w2g64"))]
    row = report.structure_table(partial).set_index("method").loc["gptq"]
    ratios = report.degradation(rows)
    dense = ratios[(ratios.method == "gptq") & (ratios.model == "tiny-llama") & (ratios.setting != "w2g64")]["ratio"]
    assert row["tiny-llama"] == pytest.approx(math.exp(dense.map(math.log).mean()))
    assert row["settings"] == ", ".join(report.order_settings(["w4g128", "w3g128"]))
    assert report.structure_table(rows).set_index("method").loc["rtn", "settings"].count("w") == 3
    fig = report.plot_structures(rows, title="S")
    assert fig.axes[0].get_yscale() == "log" and fig._suptitle.get_text() == "S"
    weak = rows.copy()
    weak.loc[weak.model == "tiny-moe", "value"] *= 200  # its fp (3600) is above the collapse threshold already
    panels = {ax.get_title(): ax for ax in report.plot_structures(report._annotate(weak)).axes}

    def marked(ax):
        return [c for c in ax.collections if c.get_label().startswith("collapsed")]

    assert len(marked(panels["w4g128"])) == 0  # the weak model's runs are not marked collapsed
    assert len(marked(panels["w2g64"])) == 1  # tiny-llama's w2g64 runs are
    # models are categories: one marker per method in each model's slot, side by side, no line joins them
    for ax in (panels[s] for s in ("w4g128", "w3g128", "w2g64")):
        assert all(len(set(line.get_xdata())) == 1 or len(set(line.get_ydata())) == 1 for line in ax.get_lines())
        points = [c for c in ax.collections if not c.get_label().startswith("collapsed")]
        assert len(points) == 2 and len({tuple(c.get_offsets()[0]) for c in points}) == 2
    assert "No quantized" in report.structure_findings(rows.iloc[0:0])["verdict"]
    assert report.plot_structures(rows.iloc[0:0]).axes[0].get_title()


def test_vqa_rows_table_plot_and_findings():
    from ptqcore import report

    rows = pd.DataFrame({
        "model": "tiny-llava", "dataset": "easy_vqa", "metric": "vqa_acc", "run_id": [f"r{i}" for i in range(6)],
        "method": ["fp", "rtn", "gptq", "rtn", "gptq", "gptq"],
        "setting": ["fp", "w4g128", "w4g128", "w3g128", "w3g128", "w4g128"],
        "quantize_vision": [None, False, False, False, False, True],
        "value": [0.80, 0.70, 0.78, 0.50, 0.74, 0.72], "stderr": [0.02] * 6, "git_sha": "0123456789abcdef",
        "git_dirty": False, "device_name": "Test CPU", "torch_threads": 1, "quant_seconds": 1.0,
        "peak_rss_bytes": 2**30, "wbits": [16, 4, 4, 3, 3, 4], "group_size": [None, 128, 128, 128, 128, 128]})
    rows = report.vqa_rows(rows)
    assert list(rows["quantized"])[:2] == ["nothing (fp)", "language model"]
    assert rows["drop"].iloc[1] == pytest.approx(10.0)
    found = report.modality_findings(rows)
    assert found["robust_method"] == "gptq" and found["verdict"].startswith("We agree")
    assert found["robust_drop"] == report.fmt((2 + 6) / 2, 3)  # mean drop over w4g128 and w3g128
    assert "6 more accuracy points" in found["vision_note"]  # 0.78 -> 0.72 with the vision side
    assert "(1 method x setting pair: gptq w4g128 +6.0;" in found["vision_note"]
    assert "0.780 +- 0.020" in report.vqa_table(rows).to_html()
    fig = report.plot_vqa(rows, title="V")
    assert len(fig.axes) >= 2 and fig.axes[0].get_ylabel().startswith("easy-vqa")
    assert "No quantized" in report.modality_findings(rows.iloc[0:0])["verdict"]


def test_coverage_note_names_what_is_missing():
    from ptqcore import report
    from ptqcore.quant import QuantSpec
    from ptqcore.runner import RunSpec

    fp = RunSpec("tiny-llava")
    lm, vision = (RunSpec("tiny-llava", "rtn", QuantSpec(4, 128), quantize_vision=v) for v in (False, True))
    w3 = RunSpec("tiny-llava", "rtn", QuantSpec(3, 128))
    assert report.describe_specs([fp, w3, lm, vision]) == (
        "tiny-llava: fp; rtn at w4g128, w3g128; rtn with the vision side quantized at w4g128")
    assert report.coverage_note([fp, lm, vision], [vision], run_missing=False) == (
        "2 of 3 configurations of this grid are recorded. The 1 missing are not run (`run_missing` is False) and "
        "absent below: tiny-llava: rtn with the vision side quantized at w4g128.")
    assert report.coverage_note([], [], True) == "The grid is empty: nothing to run or show."
