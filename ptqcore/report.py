"""Tables, figures and findings for the study notebooks and the book.

The notebooks under `notebooks/` stay thin: a `parameters` cell, a sweep through
`ptqcore.sweep`, then calls into this module. Everything here reads the results store (tidy
rows, see `ptqcore.results`) and the method registry; nothing here quantizes.

Conventions every figure follows: a title, axis labels with units, perplexity on a log axis,
and a red cross on every *collapsed* point, i.e. a perplexity above `COLLAPSE_PPL` (the line
is drawn and named in the legend). Each figure carries a footnote with the machine and the
commit that produced its numbers (`provenance_note`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import pandas as pd

COLLAPSE_PPL = 1000.0  # a perplexity above this counts as "collapsed"
FP_BITS = 16  # storage of everything not quantized (and of the fp model): fp16
GROUP_OVERHEAD_BITS = 32  # one fp16 scale + one fp16 zero point per group (or per row)

# What each strategy does, in one sentence (keys: `MethodInfo.strategy`).
STRATEGIES: dict[str, str] = {
    "none": "Full precision: the reference every method is measured against.",
    "baseline": "Round every weight to the nearest point of its own min-max grid; no data needed (RTN).",
    "compensation": "Quantize one weight column at a time and update the columns not yet quantized to "
                    "cancel the error, using second-order statistics (the Hessian X X^T) of calibration "
                    "activations (GPTQ).",
    "rotation": "Multiply weights and activations by orthogonal matrices that cancel in exact arithmetic, "
                "spreading outliers over all channels so a uniform grid fits better (QuIP, QuaRot).",
    "salience": "Find the few weight channels that matter most, judged by activation magnitude, and protect "
                "them, e.g. by scaling them up before rounding and the activations down (AWQ).",
    "optimization": "Learn quantization parameters (clipping ranges, equivalent-transform scales) by gradient "
                    "descent on each block's reconstruction error (OmniQuant).",
    "transformation": "Rescale channels by an equivalence transform that migrates quantization difficulty "
                      "from activations to weights (SmoothQuant).",
}
STRATEGY_ORDER = ("baseline", "compensation", "rotation", "salience", "optimization", "transformation")

# Members of each strategy the study plans to cover; shown as "planned" until registered.
PLANNED: dict[str, tuple[str, str]] = {
    "gptq": ("compensation", "Frantar et al., GPTQ, ICLR 2023"),
    "quip": ("rotation", "Chee et al., QuIP, NeurIPS 2023"),
    "quarot": ("rotation", "Ashkboos et al., QuaRot, NeurIPS 2024"),
    "awq": ("salience", "Lin et al., AWQ, MLSys 2024"),
    "omniquant": ("optimization", "Shao et al., OmniQuant, ICLR 2024"),
    "smoothquant": ("transformation", "Xiao et al., SmoothQuant, ICML 2023"),
}

NA = "n/a"


# --------------------------------------------------------------------------- set-up, paths

def setup() -> None:
    """Plot style and quiet loaders for notebook output."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.autolayout": False})
    try:  # figures are built outside pyplot: register the PNG formatter pyplot would have set up
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats

        shell = get_ipython()
        if shell is not None:
            select_figure_formats(shell, {"png"}, bbox_inches="tight")
    except ImportError:  # pragma: no cover - IPython comes with the notebook stack
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def repo_root() -> Path:
    """The folder holding `ptqcore/` (the repository root of a source checkout)."""
    return Path(__file__).resolve().parents[1]


def results_path(results: str | Path) -> Path:
    """A results folder; a relative one is taken from the repository root, not the working
    directory (a notebook opened in `notebooks/` then still reads the repository's `results/`)."""
    path = Path(results).expanduser()
    return path if path.is_absolute() else repo_root() / path


def as_list(value):
    """A list parameter as papermill's `-p` may pass it: a list, a JSON/Python list in a string
    (`'["a", "b"]'`), comma-separated names, or one name. None stays None."""
    import ast

    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    text = str(value).strip()
    if text.startswith("["):
        return list(ast.literal_eval(text))
    return [part.strip() for part in text.split(",") if part.strip()]


def say(text: str):
    """Show a sentence of markdown in a notebook."""
    from IPython.display import Markdown, display

    display(Markdown(text))


# --------------------------------------------------------------------------- methods, grids

def _registry():
    from .methods import FP, METHODS

    return FP, METHODS


def default_pipeline(method: str) -> str:
    """What a registered method runs as when named alone: a quantizer as itself, a transform
    followed by its default quantizer (e.g. `awq+rtn`, `quip+gptq`)."""
    from .pipeline import validate_pipeline_name

    return "+".join(validate_pipeline_name(method)) or method


def standalone_name(method: str) -> str:
    """A method *alone*, for comparison with a combination: a quantizer as itself, a transform with
    plain rounding (RTN): its own name when RTN is its default quantizer, else `name+rtn`."""
    _, methods = _registry()
    info = methods[method].info
    if info.kind == "quantizer" or info.default_quantizer == "rtn":
        return method
    return f"{method}+rtn"


def select_methods(methods) -> tuple[list[str], str]:
    """`methods`: "all" (fp and every registered method, each as its authors run it: a transform
    with its default quantizer) or a list of method / pipeline names. Returns (runnable names, a
    sentence about what is skipped and why, or "")."""
    from .pipeline import validate_pipeline_name

    fp, registry = _registry()
    if methods == "all":
        return [fp.name, *registry], ""
    keep, skipped = [], []
    methods = as_list(methods)
    for name in methods:
        try:
            validate_pipeline_name(name)
            keep.append(name)
        except ValueError as e:
            skipped.append(f"`{name}` ({e})")
    note = ("Skipped, not runnable with the methods registered now: " + "; ".join(skipped) + ".") if skipped else ""
    return keep, note


def select_models(models) -> tuple[list[str], str]:
    """The models that can be loaded (registered names, paths, hub ids) and a sentence naming the
    others, which are skipped (a chapter renders with the structures ptqcore knows)."""
    from .models import check_model_name

    keep, skipped = [], []
    for name in as_list(models):
        try:
            check_model_name(name)
            keep.append(name)
        except ValueError:
            skipped.append(f"`{name}`")
    note = ("Skipped, not a model ptqcore can load here: " + ", ".join(skipped) + ".") if skipped else ""
    return keep, note


def combination_plan(combinations) -> tuple[dict[str, list[str]], str]:
    """For each runnable combination, the pipelines to compare: each step alone, then the
    combination; e.g. {"quarot+gptq": ["quarot", "gptq", "quarot+gptq"]}. Plus a sentence naming
    the combinations that cannot run yet and the missing methods."""
    from .pipeline import split_pipeline, validate_pipeline_name

    _, registry = _registry()
    combinations = as_list(combinations)
    if not combinations:
        return {}, "This grid lists no combinations."
    plan, missing = {}, []
    for combo in combinations:
        steps = split_pipeline(combo)
        absent = [s for s in steps if s not in registry]
        if absent:
            missing.append(f"`{combo}` (not registered yet: {', '.join(absent)})")
            continue
        try:
            validate_pipeline_name(combo)
        except ValueError as e:
            missing.append(f"`{combo}` ({e})")
            continue
        plan[combo] = [standalone_name(s) for s in steps] + [combo]
    note = ("Cannot run yet: " + "; ".join(missing) + ".") if missing else ""
    return plan, note


def missing(specs, results) -> list:
    """The specs no record under `results` answers yet (`RunSpec.result_keys`)."""
    from .results import ResultsStore

    store = ResultsStore(results_path(results))
    done = store.hashes()
    return [s for s in specs if store.first_recorded(s.result_keys(), done) is None]


def describe_specs(specs) -> str:
    """Specs for a sentence, grouped: `model: fp; gptq at w4, w3; rtn at w4; rtn with the vision
    side quantized at w4g128`."""
    from .quant import setting_name

    grouped: dict[str, dict[str, list[str]]] = {}
    for s in specs:
        name = f"{s.method} with the vision side quantized" if s.quantize_vision else s.method
        grouped.setdefault(s.model, {}).setdefault(name, []).append(setting_name(s.spec, s.act))
    return "; ".join(
        f"{model}: " + "; ".join(m if m == "fp" else f"{m} at {', '.join(order_settings(st))}" for m, st in methods.items())
        for model, methods in grouped.items())


def coverage_note(specs, todo, run_missing: bool) -> str:
    """One sentence: how much of the grid is recorded and what happens to the rest."""
    if not specs:
        return "The grid is empty: nothing to run or show."
    done = len(specs) - len(todo)
    text = f"{done} of {len(specs)} configurations of this grid are recorded."
    if todo and run_missing:
        text += f" Running the {len(todo)} missing ({describe_specs(todo)})."
    elif todo:
        text += f" The {len(todo)} missing are not run (`run_missing` is False) and absent below: {describe_specs(todo)}."
    return text


def regime_note(rows: pd.DataFrame, wa_settings) -> str:
    """A sentence on the weight-activation part of a grid."""
    if not wa_settings:
        return ("This grid has no weight-activation settings (the wa_settings parameter is empty); set it, "
                "e.g. to w8a8, w4a8 and w4a4, to add them.")
    seen = set(rows.loc[rows.regime == "weight-activation", "setting"]) if len(rows) else set()
    shown = [s for s in order_settings(wa_settings) if s in seen]
    absent = [s for s in order_settings(wa_settings) if s not in seen]
    text = f"Weight-activation settings shown: {', '.join(shown) or 'none'}."
    return text + (f" Not recorded: {', '.join(absent)}." if absent else "")


def rows_for(specs, results, metric: str = "ppl") -> pd.DataFrame:
    """The newest recorded rows of exactly these configs (`metric` only), with `collapsed`
    and `regime` (weight-only / weight-activation) added. Rows are labelled with the spec's
    method name: a record made as `quip` serves a spec named `quip+gptq` (the same steps), and a
    run that evaluated more datasets serves a spec asking for fewer (its rows for those only)."""
    from .results import ResultsStore

    store = ResultsStore(results_path(results))
    table = store.table(latest=True)
    if not len(table):
        return _empty_rows()
    done = set(table["config_hash"])
    names: dict[tuple[str, str | None], list[str]] = {}  # (record, dataset or None: all) -> spec names
    for s in specs:
        keys = s.result_keys()
        key = store.first_recorded(keys, done)
        if key is None:
            continue
        datasets = [None] if key == keys[0] else s.resolved()[0].eval_datasets
        for dataset in datasets:
            labels = names.setdefault((key, dataset), [])
            if s.method not in labels:
                labels.append(s.method)
    table = table[table["metric"] == metric]
    label = [names.get((h, None), []) + names.get((h, d), []) for h, d in zip(table["config_hash"], table["dataset"])]
    rows = table.assign(method=label)
    rows = rows[rows["method"].map(len) > 0]
    if rows.empty:
        return _empty_rows()
    rows = rows.explode("method")
    return _annotate(rows)


def _empty_rows() -> pd.DataFrame:
    cols = ["config_hash", "run_id", "model", "method", "setting", "wbits", "group_size", "abits", "dataset",
            "metric", "value", "seqlen", "limit",
            "quant_seconds", "peak_rss_bytes", "git_sha", "git_dirty", "device_name", "torch_threads",
            "collapsed", "regime"]
    return pd.DataFrame(columns=cols)


def _annotate(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL) -> pd.DataFrame:
    rows = rows.reset_index(drop=True)
    rows["collapsed"] = rows["value"] > collapse
    abits = pd.to_numeric(rows["abits"], errors="coerce").fillna(16)
    rows["regime"] = ["weight-activation" if a < 16 else "weight-only" for a in abits]
    rows.loc[rows["method"] == "fp", "regime"] = "fp"
    return rows


# --------------------------------------------------------------------------- ordering, labels

def setting_key(setting: str) -> tuple:
    """Sort settings: fp, then weight-only from most to fewest bits, then weight-activation
    (the two regimes are compared apart): fp, w4, w4g128, w3, w3g128, w2g64, w8a8, w4a8, w4a4."""
    from .quant import parse_setting

    if setting == "fp":
        return (0, 0, 0, 0, 0)
    spec, act = parse_setting(setting)
    return (1, act is not None, -spec.bits, -(act.bits if act else 16), spec.group_size is not None,
            -(spec.group_size or 0))


def order_settings(settings) -> list[str]:
    return sorted(dict.fromkeys(settings), key=setting_key)


def method_colors(names) -> dict[str, tuple]:
    """One colour per method/pipeline, stable across figures (fp is black)."""
    import seaborn as sns

    names = sorted(set(names) - {"fp"})
    palette = sns.color_palette("colorblind", max(len(names), 1))
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    colors["fp"] = (0.0, 0.0, 0.0)
    return colors


def fmt(value, digits: int = 4) -> str:
    """A number for prose: 4 significant digits, `n/a` when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    return f"{value:.{digits}g}"


def provenance_note(rows: pd.DataFrame) -> str:
    """Which machine(s) and commit(s) produced these rows, for captions and footnotes."""
    if rows is None or not len(rows):
        return "no recorded runs"
    machines = sorted({f"{d} ({t} thread{'' if str(t) == '1' else 's'})" if str(d) != "nan" else "unknown machine"
                       for d, t in zip(rows["device_name"], rows["torch_threads"])})
    shas = sorted({str(s)[:7] for s in rows["git_sha"] if isinstance(s, str) and s})
    commit = ", ".join(shas[:3]) + (f" and {len(shas) - 3} more" if len(shas) > 3 else "") if shas else "unknown commit"
    dirty = rows.drop_duplicates("run_id")["git_dirty"] if "run_id" in rows else rows["git_dirty"]
    n_dirty = int(sum(bool(d) for d in dirty if d is not None and d == d))
    text = f"{len(set(rows.get('run_id', rows.index)))} runs on {'; '.join(machines)}, commit {commit}"
    if n_dirty:
        text += f" ({n_dirty} with uncommitted changes)"
    return text


def _figure(*grid, figsize, **kwargs):
    """A figure outside pyplot (a notebook shows it only where it is glued or displayed, never
    twice) and its axes: `_figure(1, 3, figsize=...)` like `plt.subplots`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def _panels(n: int, width: float = 6.6, height: float = 4.4):
    """A figure with `n` panels, at most two per row (narrower then); returns (figure, the n axes)."""
    cols, rows = min(n, 2), math.ceil(n / 2)
    if cols == 2:
        width, height = width * 0.68, height * 0.9
    fig, axes = _figure(rows, cols, figsize=(width * cols + 0.4, height * rows + 0.6), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plain_log_ticks(axis) -> None:
    """Tick labels like 5 or 120 instead of 5x10^0 on a log axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)


def _finish(fig, title: str, rows: pd.DataFrame):
    """Every figure's end: its title, the layout, and a footnote naming the machine and commit."""
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.01, 0.005, "Numbers: " + provenance_note(rows), fontsize=8, color="0.35", ha="left", va="bottom")
    return fig


# --------------------------------------------------------------------------- the taxonomy

def method_table() -> pd.DataFrame:
    """Registered methods (plus fp) and the planned ones not registered yet, one row each."""
    fp, registry = _registry()
    rows = [{"method": fp.name, "strategy": fp.strategy, "kind": fp.kind, "calibration": False,
             "runs as": fp.name, "paper": fp.paper, "registered": True}]
    for name, cls in registry.items():
        info = cls.info
        rows.append({"method": name, "strategy": info.strategy, "kind": info.kind,
                     "calibration": info.needs_calibration, "runs as": default_pipeline(name),
                     "paper": info.paper, "registered": True})
    for name, (strategy, paper) in PLANNED.items():
        if name not in registry:
            rows.append({"method": name, "strategy": strategy, "kind": "planned", "calibration": None,
                         "runs as": "", "paper": paper, "registered": False})
    table = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(("none", *STRATEGY_ORDER))}
    table["_o"] = table["strategy"].map(lambda s: order.get(s, len(order)))
    return table.sort_values(["_o", "method"]).drop(columns="_o").reset_index(drop=True)


def strategy_table(methods: pd.DataFrame) -> pd.DataFrame:
    """One row per strategy: what it does and its members (registered / planned)."""
    rows = []
    for strategy, group in methods.groupby("strategy", sort=False):
        rows.append({"strategy": strategy, "what it does": STRATEGIES.get(strategy, "(not described yet)"),
                     "registered": ", ".join(group.loc[group.registered, "method"]) or "-",
                     "planned": ", ".join(group.loc[~group.registered, "method"]) or "-"})
    return pd.DataFrame(rows)


PAPER_STRATEGIES = ("compensation", "rotation", "salience", "optimization")


def taxonomy_findings(methods: pd.DataFrame) -> dict[str, str]:
    """Glue values for the taxonomy chapter: what the registry covers of the paper's four classes."""
    from .results import provenance

    reg = methods[methods.registered & (methods.strategy != "none")]
    covered = [s for s in PAPER_STRATEGIES if s in set(reg.strategy)]
    uncovered = [s for s in PAPER_STRATEGIES if s not in covered]
    extra = sorted(set(reg.strategy) - set(PAPER_STRATEGIES))
    planned = methods[~methods.registered]
    sha = provenance("cpu").get("git_sha")
    out = {"n_registered": str(len(reg)), "registered_list": ", ".join(reg.method) or "none",
           "n_covered": str(len(covered)), "covered_list": ", ".join(covered) or "none",
           "uncovered_list": ", ".join(uncovered) or "none", "extra_strategies": ", ".join(extra) or "none",
           "planned_list": ", ".join(planned.method) or "none",
           "registry_commit": sha[:7] if sha else "an uncommitted tree"}
    if not uncovered:
        out["verdict"] = (f"The registry follows the paper's taxonomy: every one of its four strategies has a "
                          f"member ({out['registered_list']}).")
    else:
        out["verdict"] = (f"The registry covers {len(covered)} of the paper's four strategies ({out['covered_list']}); "
                          f"not yet: {out['uncovered_list']}.")
    return out


def plot_taxonomy(methods: pd.DataFrame):
    """Strategies as columns, members as boxes: filled = registered (colour by kind), dashed =
    planned. A title; the axes are categories, named in the title and legend."""
    from matplotlib.patches import FancyBboxPatch, Patch

    methods = methods[methods.strategy != "none"]
    strategies = [s for s in STRATEGY_ORDER if s in set(methods.strategy)]
    strategies += sorted(set(methods.strategy) - set(strategies))
    depth = max([int((methods.strategy == s).sum()) for s in strategies] or [1])
    fig, ax = _figure(figsize=(max(6.5, 1.9 * len(strategies)), 1.6 + 0.75 * depth))
    kind_color = {"quantizer": "#4c72b0", "transform": "#55a868"}
    for x, strategy in enumerate(strategies):
        members = methods[methods.strategy == strategy]
        for y, row in enumerate(members.itertuples()):
            filled = row.registered
            color = kind_color.get(row.kind, "#8172b2")
            box = FancyBboxPatch((x - 0.42, -y - 0.32), 0.84, 0.64, boxstyle="round,pad=0.02",
                                 facecolor=color if filled else "white", edgecolor=color if filled else "0.5",
                                 linestyle="-" if filled else "--", linewidth=1.4)
            ax.add_patch(box)
            label = row.method + ("\n(calibrated)" if row.calibration else "\n(no data)" if filled else "\n(planned)")
            ax.text(x, -y, label, ha="center", va="center", fontsize=9, color="white" if filled else "0.35")
    ax.set_xlim(-0.6, len(strategies) - 0.4)
    ax.set_ylim(-depth + 0.4, 0.9)
    ax.set_xticks(range(len(strategies)), strategies, fontsize=10)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.grid(False)
    for side in ("left", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("strategy (MethodInfo.strategy)")
    ax.set_ylabel("members")
    ax.legend(handles=[Patch(color=kind_color["quantizer"], label="registered quantizer (lossy, last step)"),
                       Patch(color=kind_color["transform"], label="registered transform (equivalence, first)"),
                       Patch(facecolor="white", edgecolor="0.5", linestyle="--", label="planned, not registered")],
              loc="lower center", bbox_to_anchor=(0.5, -0.32), ncol=3, fontsize=8, frameon=False)
    ax.set_title("PTQ methods in ptqcore's registry, by strategy", pad=28)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- tables

def ppl_table(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL):
    """Perplexity, method x setting (per model and dataset); best per column in bold, collapsed
    cells in red with a dagger. A pandas Styler (renders as HTML in the book)."""
    if not len(rows):
        return pd.DataFrame({"note": ["no recorded results for this grid"]}).style.hide(axis="index")
    settings = order_settings(rows["setting"])
    table = rows.pivot_table(index=["model", "dataset", "method"], columns="setting", values="value", aggfunc="first")
    table = table[[s for s in settings if s in table.columns]]
    table.columns.name = "setting"

    def number(v):
        return "" if pd.isna(v) else (f"{v:.4g}" if v < 1e4 else f"{v:.1e}")

    def best(col):
        out = pd.Series("", index=col.index)
        for _, idx in col.groupby(level=[0, 1]).groups.items():
            sub = col.loc[idx].dropna()
            if len(sub) and col.name != "fp":
                out[sub.idxmin()] = "font-weight: bold"
        return out

    # collapsed: above the threshold where the model's own fp is not (a weak model's fp may be)
    fp = {idx[:2]: v for idx, v in (table["fp"].items() if "fp" in table.columns else []) if pd.notna(v)}
    strong = pd.Series([fp.get(idx[:2], 0.0) <= collapse for idx in table.index], index=table.index)
    collapsed = table.gt(collapse) & pd.DataFrame({c: strong for c in table.columns})
    style = table.style.format(number).apply(best, axis=0)
    for row, col in ((r, c) for r in table.index for c in table.columns if collapsed.at[r, c]):
        style = style.format(lambda v: number(v) + " †", subset=([row], [col]))
    style = style.apply(lambda _: collapsed.replace({True: "color: #c0392b", False: ""}), axis=None)
    return style.set_caption(f"Perplexity (lower is better); bold: best quantized method per setting; "
                             f"† collapsed (> {collapse:g}, where the model's own full precision is below it).")


def cost_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Quantization wall seconds and peak memory, method x setting."""
    if not len(rows):
        return pd.DataFrame({"note": ["no recorded results for this grid"]})
    rows = rows[rows.method != "fp"]
    if not len(rows):
        return pd.DataFrame({"note": ["only the fp baseline is recorded"]})
    out = rows.drop_duplicates(["model", "method", "setting"]).assign(
        **{"quant seconds": lambda d: d["quant_seconds"].round(1),
           "peak memory (GiB)": lambda d: (d["peak_rss_bytes"] / 2**30).round(2)})
    out = out.pivot_table(index=["model", "method"], columns="setting",
                          values=["quant seconds", "peak memory (GiB)"], aggfunc="first")
    settings = order_settings(rows["setting"])
    out = out.reindex(columns=[(v, s) for v in ("quant seconds", "peak memory (GiB)") for s in settings
                               if (v, s) in out.columns])
    return out.astype(object).where(out.notna(), "")  # a setting a method was not run at: blank, not NaN


# --------------------------------------------------------------------------- figures

def _placeholder(title: str, message: str):

    fig, ax = _figure(figsize=(7, 2.2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="0.3", wrap=True,
            transform=ax.transAxes)
    return fig


def _mark_collapsed(ax, xs, ys, collapse: float, label: bool) -> None:
    bad = [(x, y) for x, y in zip(xs, ys) if y > collapse]
    if bad:
        ax.scatter(*zip(*bad), marker="X", s=110, color="#c0392b", edgecolor="white", linewidth=0.8, zorder=5,
                   label=f"collapsed (ppl > {collapse:g})" if label else None)


def _dataset_label(rows: pd.DataFrame, dataset: str) -> str:
    sub = rows[rows.dataset == dataset]
    seqlen = sub["seqlen"].dropna().iloc[0] if "seqlen" in sub and sub["seqlen"].notna().any() else None
    limit = sub["limit"].dropna().iloc[0] if "limit" in sub and sub["limit"].notna().any() else None
    extra = f", {int(limit)} windows of {int(seqlen)} tokens" if seqlen and limit else ""
    return f"{dataset} test{extra}"


def plot_ppl_by_setting(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL,
                        title: str = "Perplexity across bitwidths"):
    """One panel per (model, dataset, regime): perplexity (log) per setting, a line per method,
    fp dashed, the collapse threshold dotted, collapsed points crossed."""

    if not len(rows):
        return _placeholder(title, "No recorded results for this grid yet.")
    quant = rows[rows.method != "fp"]
    fp = rows[rows.method == "fp"]
    panels = [(m, d, r) for (m, d, r), _ in quant.groupby(["model", "dataset", "regime"], sort=False)]
    panels.sort(key=lambda p: (p[0], p[1], p[2] != "weight-only"))
    if not panels:
        return _placeholder(title, "Only the fp baseline is recorded for this grid.")
    colors = method_colors(rows["method"])
    fig, axes = _panels(len(panels))
    for ax, (model, dataset, regime) in zip(axes, panels):
        sub = quant[(quant.model == model) & (quant.dataset == dataset) & (quant.regime == regime)]
        settings = order_settings(sub["setting"])
        xpos = {s: k for k, s in enumerate(settings)}
        for method, m in sub.groupby("method"):
            m = m.assign(x=m["setting"].map(xpos)).sort_values("x")
            ax.plot(m["x"], m["value"], marker="o", color=colors[method], label=method, linewidth=1.6)
        _mark_collapsed(ax, sub["setting"].map(xpos), sub["value"], collapse, label=True)
        base = fp[(fp.model == model) & (fp.dataset == dataset)]["value"]
        if len(base):
            ax.axhline(base.iloc[0], color="black", linestyle="--", linewidth=1, label=f"fp ({base.iloc[0]:.4g})")
        if sub["value"].max() > collapse / 3:
            ax.axhline(collapse, color="#c0392b", linestyle=":", linewidth=1, label=f"collapse threshold ({collapse:g})")
        ax.set_yscale("log")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlabel("setting (w: weight bits, g: group size, a: activation bits)", fontsize=9)
        ax.set_ylabel(f"perplexity, {_dataset_label(rows, dataset)} (log)", fontsize=9)
        ax.set_title(f"{model}, {regime}", fontsize=10)
        ax.legend(fontsize=8)
    return _finish(fig, title, rows)


# --------------------------------------------------------------------------- findings: bitwidth

def _steps(method: str) -> list[str]:
    """The steps a method or pipeline name runs (default quantizer appended), or its parts."""
    from .pipeline import split_pipeline, validate_pipeline_name

    try:
        return validate_pipeline_name(method) or [method]
    except ValueError:  # a name no longer registered: its parts as written
        return split_pipeline(method)


def strategy_label(method: str) -> str:
    """The strategy of a method, or of each step of a pipeline: `rotation then compensation (quarot+gptq)`."""
    from .methods import FP, METHODS

    steps = _steps(method)
    strategies = [METHODS[step].info.strategy if step in METHODS else FP.strategy for step in steps]
    return strategies[0] if len(steps) == 1 else f"{' then '.join(strategies)} ({'+'.join(steps)})"


def compensation_verdict(method: str, does: str, margin: str) -> str:
    """The paper's recurring claim (compensation is the most robust) judged on the method that
    `does` best: agree, partly (a pipeline whose quantizer is a compensation step), or disagree."""
    from .methods import METHODS

    steps = _steps(method)
    strategies = [METHODS[step].info.strategy if step in METHODS else "none" for step in steps]
    if strategies[0] == "compensation":
        return f"We agree: {method} (compensation) {does}: {margin}."
    if "compensation" in strategies:
        return (f"Partly: {method} {does}, a {strategies[0]} method whose weights a compensation quantizer rounds "
                f"({'+'.join(steps)}): {margin}.")
    return f"We disagree: {method} ({strategies[0]}), not a compensation method, {does}: {margin}."


def degradation(rows: pd.DataFrame) -> pd.DataFrame:
    """Per quantized row: perplexity relative to the fp run of the same model and dataset."""
    if not len(rows):
        return rows.assign(ratio=pd.Series(dtype=float))
    fp = rows[rows.method == "fp"].set_index(["model", "dataset"])["value"]
    quant = rows[rows.method != "fp"].copy()
    base = [fp.get((m, d), float("nan")) for m, d in zip(quant["model"], quant["dataset"])]
    quant["ratio"] = quant["value"].to_numpy() / pd.Series(base, dtype=float).to_numpy()
    return quant


def robustness(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL) -> pd.DataFrame:
    """Per method: settings covered, geometric-mean perplexity ratio to fp, wins (best in a
    setting), collapses. Compared only over settings that every listed method has."""
    quant = degradation(rows[rows.regime != "weight-activation"] if len(rows) else rows)
    cols = ["method", "settings", "geomean ppl / fp", "wins", "collapsed"]
    if not len(quant) or quant["ratio"].isna().all():
        return pd.DataFrame(columns=cols)
    quant = quant.dropna(subset=["ratio"])
    key = ["model", "dataset", "setting"]
    methods = sorted(quant["method"].unique())
    complete = quant.groupby(key)["method"].nunique()
    shared = complete[complete == len(methods)].index
    common = quant.set_index(key).loc[shared].reset_index() if len(shared) else quant
    winners = common.loc[common.groupby(key)["value"].idxmin(), "method"].value_counts()
    out = []
    for method, m in common.groupby("method"):
        out.append({"method": method, "settings": len(m),
                    "geomean ppl / fp": math.exp(m["ratio"].map(math.log).mean()),
                    "wins": int(winners.get(method, 0)), "collapsed": int((m["value"] > collapse).sum())})
    return pd.DataFrame(out).sort_values("geomean ppl / fp").reset_index(drop=True)


def _record_name(method: str) -> str:
    """The name a method's runs are recorded under (`pipeline.canonical_name`: `quarot+gptq` ->
    `quarot`); a name ptqcore does not know is kept as it is."""
    from .pipeline import canonical_name

    try:
        return canonical_name(method)
    except ValueError:
        return method


def bitwidth_findings(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL) -> dict[str, str]:
    """Glue values for the cross-bitwidth chapter; every key is always present."""
    out = {"fp_ppl": NA, "n_methods": "0", "methods_seen": NA, "robust_method": NA, "robust_strategy": NA,
           "robust_ratio": NA, "robust_wins": NA, "n_settings": "0", "n_collapsed": "0",
           "collapsed_list": "none", "runner_up": NA, "runner_up_ratio": NA,
           "verdict": "No quantized results are recorded for this grid yet, so the claim is untested here."}
    if not len(rows):
        return out
    fp = rows[rows.method == "fp"]["value"]
    out["fp_ppl"] = fmt(fp.iloc[0]) if len(fp) else NA
    table = robustness(rows, collapse)
    quant = rows[rows.method != "fp"]
    seen = sorted({_record_name(m) for m in quant["method"]})  # quarot and quarot+gptq are one record
    out["n_methods"] = str(len(seen))
    out["methods_seen"] = ", ".join(seen) or NA
    collapsed = quant[quant["value"] > collapse]
    out["n_collapsed"] = str(len(collapsed))
    out["collapsed_list"] = ", ".join(f"{m} {s} ({fmt(v, 3)})" for m, s, v in
                                      zip(collapsed["method"], collapsed["setting"], collapsed["value"])) or "none"
    if not len(table):
        out["verdict"] = "No fp baseline is recorded for this grid, so degradation cannot be computed."
        return out
    best = table.iloc[0]
    out["n_settings"] = str(int(best["settings"]))
    out["robust_method"] = best["method"]
    out["robust_strategy"] = strategy_label(best["method"])
    out["robust_ratio"] = fmt(best["geomean ppl / fp"], 3)
    out["robust_wins"] = f"{int(best['wins'])} of {int(best['settings'])}"
    if len(table) > 1:
        out["runner_up"] = table.iloc[1]["method"]
        out["runner_up_ratio"] = fmt(table.iloc[1]["geomean ppl / fp"], 3)
    margin = (f"a geometric-mean perplexity {out['robust_ratio']}x fp against {out['runner_up_ratio']}x for "
              f"{out['runner_up']}, best in {out['robust_wins']} settings; the comparison covers "
              f"{out['methods_seen']}")
    if len(table) < 2:
        out["verdict"] = f"Only {best['method']} is recorded besides fp, so there is nothing to compare yet."
    else:
        out["verdict"] = compensation_verdict(best["method"], "degrades least", margin)
    return out


# --------------------------------------------------------------------------- structures

def structure_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Geometric-mean perplexity / fp over the weight-only settings, method x model (one column
    per structure), then `worst`: the largest over the models the method has, which ranks them;
    `structures`: how many models the method has; `settings`: what each row averages over.

    A row averages over the (dataset, setting) cells that every one of its structures has, so
    its columns compare like with like while a grid is partly recorded (a structure without the
    hardest setting yet would otherwise look more robust); where its structures share no cell,
    each averages over its own and `settings` says `uneven`."""
    quant = degradation(rows[rows.regime != "weight-activation"] if len(rows) else rows)
    if not len(quant) or quant["ratio"].isna().all():
        return pd.DataFrame(columns=["method", "worst"])
    quant = quant.dropna(subset=["ratio"])
    kept, used = [], {}
    for method, m in quant.groupby("method"):
        cells = m.groupby(["dataset", "setting"])["model"].nunique()
        shared = cells[cells == m["model"].nunique()].index
        if len(shared):
            m = m[m.set_index(["dataset", "setting"]).index.isin(shared)]
        used[method] = ", ".join(order_settings(shared.get_level_values("setting").unique())) if len(shared) \
            else "uneven"
        kept.append(m)
    quant = pd.concat(kept)
    table = quant.groupby(["method", "model"])["ratio"].agg(lambda r: math.exp(r.map(math.log).mean()))
    table = table.unstack("model")
    table = table[[m for m in dict.fromkeys(rows["model"]) if m in table.columns]]  # the grid's model order
    table["worst"] = table.max(axis=1)
    table["structures"] = table.drop(columns="worst").notna().sum(axis=1)
    table["settings"] = [used[method] for method in table.index]
    return table.sort_values(["structures", "worst"], ascending=[False, True]).reset_index()


def plot_structures(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL,
                    title: str = "Degradation across structures"):
    """One panel per (dataset, setting): perplexity / fp (log) per model, one marker per method
    side by side in each model's slot (the models are categories: no lines join them)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    quant = degradation(rows[rows.regime != "weight-activation"] if len(rows) else rows)
    if not len(quant) or quant["ratio"].isna().all():
        return _placeholder(title, "No quantized results with an fp baseline are recorded for this grid yet.")
    quant = quant.dropna(subset=["ratio"])
    models = [m for m in dict.fromkeys(rows["model"]) if m in set(quant["model"])]
    panels = [(d, s) for d in dict.fromkeys(quant["dataset"]) for s in order_settings(quant["setting"])
              if len(quant[(quant.dataset == d) & (quant.setting == s)])]
    colors = method_colors(quant["method"])
    methods = sorted(set(quant["method"]))
    width = 0.7 / max(1, len(methods))
    offset = {m: (k - (len(methods) - 1) / 2) * width for k, m in enumerate(methods)}
    slot = {name: k for k, name in enumerate(models)}
    fig, axes = _panels(len(panels))
    for ax, (dataset, setting) in zip(axes, panels):
        sub = quant[(quant.dataset == dataset) & (quant.setting == setting)]
        sub = sub.assign(x=sub["model"].map(slot) + sub["method"].map(offset))
        for method, m in sub.groupby("method"):
            ax.scatter(m["x"], m["ratio"], marker="o", s=28, color=colors[method], label=method, zorder=3)
        # collapsed: above the threshold where the model's own fp is not (a weak model's fp may be)
        collapsed = sub[(sub["value"] > collapse) & (sub["value"] / sub["ratio"] <= collapse)]
        if len(collapsed):
            ax.scatter(collapsed["x"], collapsed["ratio"], marker="x", s=90, color="#c0392b", zorder=5,
                       label=f"collapsed (ppl > {collapse:g})")
        ax.axhline(1, color="black", linestyle="--", linewidth=1, label="fp")
        ax.set_yscale("log")
        low, high = min(sub["ratio"].min(), 1.0), max(sub["ratio"].max(), 1.0)
        if high / low < 20:  # within about a decade the log axis has no labelled ticks: place plain ones
            ax.yaxis.set_major_locator(FixedLocator(MaxNLocator(5).tick_values(low, high)))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(-0.5, len(models) - 0.5)
        for k in range(1, len(models)):
            ax.axvline(k - 0.5, color="#dddddd", linewidth=0.8, zorder=0)
        ax.set_xticks(range(len(models)), models, rotation=15, fontsize=8)
        ax.grid(False, axis="x")
        ax.set_xlabel("model (structure)", fontsize=9)
        ax.set_ylabel(f"perplexity / fp, {_dataset_label(rows, dataset)} (log)", fontsize=9)
        ax.set_title(f"{setting}", fontsize=10)
        ax.legend(fontsize=7)
    return _finish(fig, title, rows)


def notes_table(rows: pd.DataFrame) -> pd.DataFrame:
    """What runs recorded about themselves (expert fallbacks, transforms skipped by structure),
    one row per run that has a note."""
    cols = ["model", "method", "setting", "notes"]
    if not len(rows) or "notes" not in rows:
        return pd.DataFrame(columns=cols)
    noted = rows[rows["notes"].fillna("").astype(str).str.len() > 0]
    return noted.drop_duplicates("run_id")[cols].reset_index(drop=True)


def structure_findings(rows: pd.DataFrame) -> dict[str, str]:
    """Glue values for the cross-structure chapter; every key is always present.

    While the grid is partly recorded, a structure with fewer than half as many methods as the
    best-covered one waits, and then the structures with the fewest methods, one at a time, until
    at least two methods are recorded on every remaining one (`compared`; the verdict names what
    was left out)."""
    out = {"n_models": "0", "models_seen": NA, "compared": NA, "robust_method": NA, "robust_strategy": NA,
           "robust_worst": NA, "runner_up": NA, "runner_up_worst": NA, "partial": "none",
           "verdict": "No quantized results with an fp baseline are recorded for this grid yet, so the claim is "
                      "untested here."}
    table = structure_table(rows)
    if not len(table):
        return out
    models = [c for c in table.columns if c not in ("method", "worst", "structures", "settings")]
    out["n_models"], out["models_seen"] = str(len(models)), ", ".join(models)
    out["partial"] = ", ".join(f"{r.method} ({int(r.structures)} of {len(models)})"
                               for r in table[table["structures"] < len(models)].itertuples()) or "none"
    counts = table[models].notna().sum()
    compared = [m for m in models if 2 * counts[m] >= counts.max()]  # half the best coverage (never empty)
    while len(compared) > 2 and table[compared].notna().all(axis=1).sum() < 2:
        counts = table[compared].notna().sum()
        compared.remove(counts[counts == counts.min()].index[-1])  # the fewest methods; ties: the last
    left_out = [m for m in models if m not in compared]
    candidates = set(table.loc[table[compared].notna().all(axis=1), "method"])
    out["compared"] = ", ".join(compared)
    if len(models) < 2 or not candidates:
        out["verdict"] = "Fewer than two structures have a method recorded on all of them, so the claim is untested."
        return out
    # Rank the methods recorded on every compared structure over the same cells: per model, the
    # settings (and datasets) that all of them have, so no method is judged on easier settings.
    quant = rows[rows.method.isin(candidates) & rows.model.isin(compared)]
    present = quant.groupby(["model", "dataset", "setting"])["method"].nunique()
    shared = present[present == len(candidates)].index
    keep = quant.set_index(["model", "dataset", "setting"]).index.isin(shared)
    full = structure_table(pd.concat([rows[(rows.method == "fp") & rows.model.isin(compared)], quant[keep]]))
    full = full[full["structures"] == len(compared)] if len(full) else full
    if not len(full):
        out["verdict"] = ("The methods recorded on every structure share no setting on some structure yet, so the "
                          "claim is untested.")
        return out
    best = full.iloc[0]
    out["robust_method"], out["robust_worst"] = best["method"], fmt(best["worst"], 3)
    out["robust_strategy"] = strategy_label(best["method"])
    if len(full) > 1:
        out["runner_up"], out["runner_up_worst"] = full.iloc[1]["method"], fmt(full.iloc[1]["worst"], 3)
    margin = (f"its worst geometric-mean perplexity over the {len(compared)} structures (settings every compared "
              f"method has) is {out['robust_worst']}x fp, against {out['runner_up_worst']}x for {out['runner_up']}")
    if len(full) < 2:
        out["verdict"] = f"Only {best['method']} is recorded on every structure, so there is nothing to compare yet."
    else:
        out["verdict"] = compensation_verdict(best["method"], "is the most robust across structures", margin)
    if left_out:
        only = {m: sorted(table.loc[table[m].notna(), "method"]) for m in left_out}
        out["verdict"] = (f"Provisional, on {len(compared)} of the {len(models)} structures ("
                          + "; ".join(f"{m} has only {', '.join(v) or 'no method'} recorded yet" for m, v in only.items())
                          + f"). {out['verdict']}")
    return out


# --------------------------------------------------------------------------- modality

def vqa_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """VQA rows with `quantized` (which parts: "language model" or "language model + vision")
    and `drop` (accuracy points lost against the fp run of the same model)."""
    if not len(rows):
        return rows.assign(quantized=pd.Series(dtype=str), drop=pd.Series(dtype=float))
    vision = rows["quantize_vision"].fillna(False).astype(bool) if "quantize_vision" in rows else False
    rows = rows.assign(quantized=["language model + vision" if v else "language model"
                                  for v in (vision if not isinstance(vision, bool) else [vision] * len(rows))])
    rows.loc[rows.method == "fp", "quantized"] = "nothing (fp)"
    fp = rows[rows.method == "fp"].set_index("model")["value"]
    return rows.assign(drop=[100 * (fp.get(m, float("nan")) - v) for m, v in zip(rows["model"], rows["value"])])


def vqa_table(rows: pd.DataFrame):
    """Accuracy +- stderr, (model, quantized parts, method) x setting."""
    if not len(rows):
        return pd.DataFrame({"note": ["no recorded results for this grid"]}).style.hide(axis="index")
    cells = rows.assign(cell=[f"{v:.3f} +- {e:.3f}" if pd.notna(e) else f"{v:.3f}"
                              for v, e in zip(rows["value"], rows["stderr"])])
    table = cells.pivot_table(index=["model", "quantized", "method"], columns="setting", values="cell",
                              aggfunc="first")
    table = table[[s for s in order_settings(rows["setting"]) if s in table.columns]]
    table.columns.name = "setting"
    return table.style.format(na_rep="").set_caption(
        "easy-vqa exact-match accuracy +- standard error (higher is better).")


def plot_vqa(rows: pd.DataFrame, title: str = "VQA accuracy per method and setting"):
    """One panel per (model, quantized parts): accuracy per setting, a bar per method, fp dashed."""
    quant = rows[rows.method != "fp"] if len(rows) else rows
    if not len(quant):
        return _placeholder(title, "No quantized VQA results are recorded for this grid yet.")
    panels = list(dict.fromkeys(zip(quant["model"], quant["quantized"])))
    colors = method_colors(quant["method"])
    fig, axes = _panels(len(panels))
    for ax, (model, parts) in zip(axes, panels):
        sub = quant[(quant.model == model) & (quant.quantized == parts)]
        settings, methods = order_settings(sub["setting"]), sorted(sub["method"].unique())
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            m = sub[sub.method == method].set_index("setting")
            xs = [i + (k - (len(methods) - 1) / 2) * width for i, s in enumerate(settings) if s in m.index]
            ys = [m.loc[s, "value"] for s in settings if s in m.index]
            errs = [m.loc[s, "stderr"] if pd.notna(m.loc[s, "stderr"]) else 0 for s in settings if s in m.index]
            ax.bar(xs, ys, width, yerr=errs, color=colors[method], label=method, capsize=2)
        base = rows[(rows.model == model) & (rows.method == "fp")]["value"]
        if len(base):
            ax.axhline(base.iloc[0], color="black", linestyle="--", linewidth=1, label=f"fp ({base.iloc[0]:.3f})")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlabel("setting (w: weight bits, g: group size)", fontsize=9)
        ax.set_ylabel("easy-vqa exact-match accuracy", fontsize=9)
        ax.set_title(f"{model}: {parts} quantized", fontsize=10)
        ax.legend(fontsize=7)
    return _finish(fig, title, rows)


def modality_findings(rows: pd.DataFrame) -> dict[str, str]:
    """Glue values for the cross-modality chapter (rows from `vqa_rows`); every key is present."""
    out = {"fp_acc": NA, "n_methods": "0", "robust_method": NA, "robust_strategy": NA, "robust_drop": NA,
           "runner_up": NA, "runner_up_drop": NA, "vision_note": "No run quantized the vision side yet.",
           "verdict": "No quantized VQA results are recorded for this grid yet, so the claim is untested here."}
    if not len(rows):
        return out
    fp = rows[rows.method == "fp"]["value"]
    out["fp_acc"] = fmt(fp.iloc[0], 3) if len(fp) else NA
    lm = rows[(rows.method != "fp") & (rows.quantized == "language model")].dropna(subset=["drop"])
    if len(lm):
        settings = lm.groupby("setting")["method"].nunique()
        shared = settings[settings == lm["method"].nunique()].index
        common = lm[lm.setting.isin(shared)]
        ranked = common.groupby("method")["drop"].mean().sort_values()
        out["n_methods"] = str(len(ranked))
        best = ranked.index[0]
        out["robust_method"], out["robust_drop"] = best, fmt(ranked.iloc[0], 3)
        out["robust_strategy"] = strategy_label(best)
        if len(ranked) > 1:
            out["runner_up"], out["runner_up_drop"] = ranked.index[1], fmt(ranked.iloc[1], 3)
        margin = (f"{out['robust_drop']} accuracy points lost on average over {len(shared)} settings, against "
                  f"{out['runner_up_drop']} for {out['runner_up']}")
        if len(ranked) < 2:
            out["verdict"] = f"Only {best} is recorded besides fp, so there is nothing to compare yet."
        else:
            out["verdict"] = compensation_verdict(best, "loses the least VQA accuracy", margin)
    both = rows[rows.method != "fp"].pivot_table(index=["method", "setting"], columns="quantized", values="drop")
    if {"language model", "language model + vision"} <= set(both.columns):
        pairs = both.dropna(subset=["language model", "language model + vision"])
        if len(pairs):
            diff = pairs["language model + vision"] - pairs["language model"]
            each = ", ".join(f"{m} {s} {d:+.1f}" for (m, s), d in diff.sort_values(ascending=False).items())
            out["vision_note"] = (f"Quantizing the vision tower and projector as well costs {fmt(diff.mean(), 3)} more "
                                  f"accuracy points on average ({len(pairs)} method x setting "
                                  f"pair{'' if len(pairs) == 1 else 's'}: {each}; a negative cost is a gain).")
    return out


# --------------------------------------------------------------------------- model size

@lru_cache(maxsize=None)
def linear_inventory(model: str) -> tuple[tuple[tuple[int, int], ...], int]:
    """((out_features, in_features) of every quantized linear, count of all other parameters),
    from the model's config on the meta device (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import adapter_for
    from .models.zoo import MODELS, cached_checkpoint

    source = str(cached_checkpoint(MODELS[model])) if model in MODELS else model
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(net)
    shapes, quantized = [], 0
    for block in adapter.get_blocks(net):
        for linear in adapter.linears(block).values():
            shapes.append((linear.out_features, linear.in_features))
            quantized += linear.weight.numel()
    total = sum(p.numel() for p in net.parameters())
    return tuple(shapes), total - quantized


def model_bytes(model: str, wbits: int | None, group_size: int | None) -> float:
    """Storage of the model: quantized linears at `wbits` plus one fp16 scale and one fp16 zero
    per group (per output row when per-channel; a partial last group counts as a group), every
    other parameter (embeddings, head, norms) in fp16. `wbits` None or 16: all fp16."""
    shapes, other = linear_inventory(model)
    if wbits is None or wbits >= FP_BITS:
        return (sum(o * i for o, i in shapes) + other) * FP_BITS / 8
    bits = 0
    for out_f, in_f in shapes:
        groups = math.ceil(in_f / group_size) if group_size else 1
        bits += out_f * in_f * wbits + out_f * groups * GROUP_OVERHEAD_BITS
    return (bits + other * FP_BITS) / 8


def with_size(rows: pd.DataFrame) -> pd.DataFrame:
    """Weight-only and fp rows with `model_bytes`, `params` and `bits_per_param` added."""
    if not len(rows):
        return rows.assign(model_bytes=pd.Series(dtype=float), bits_per_param=pd.Series(dtype=float))
    rows = rows[rows.regime != "weight-activation"].copy()
    group = [None if pd.isna(g) or g in (-1, 0) else int(g) for g in rows["group_size"]]
    wbits = [None if pd.isna(w) else int(w) for w in rows["wbits"]]
    rows["model_bytes"] = [model_bytes(m, w, g) for m, w, g in zip(rows["model"], wbits, group)]
    rows["params"] = [sum(o * i for o, i in linear_inventory(m)[0]) + linear_inventory(m)[1] for m in rows["model"]]
    rows["bits_per_param"] = rows["model_bytes"] * 8 / rows["params"]
    return rows


def size_table(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL) -> pd.DataFrame:
    """The sized rows as a table, smallest first: size, bits per parameter, perplexity, front
    (`pareto_front` without the collapsed points, unless the rows carry an `on front` column)."""
    cols = ["model", "method", "setting", "dataset", "size (MiB)", "bits / param", "perplexity", "on front"]
    if not len(rows):
        return pd.DataFrame(columns=cols)
    out = rows.assign(**{"size (MiB)": (rows["model_bytes"] / 2**20).round(2),
                         "bits / param": rows["bits_per_param"].round(3), "perplexity": rows["value"].map(fmt)})
    if "on front" not in out:
        out["on front"] = pareto_front(rows, collapse=collapse)
    return out.sort_values(["dataset", "model_bytes"])[cols].reset_index(drop=True)


def pareto_front(rows: pd.DataFrame, x: str = "model_bytes", y: str = "value", by: str | None = "dataset",
                 collapse: float | None = None) -> pd.Series:
    """True for the points no other point (of the same `by` group, e.g. dataset) beats on both
    `x` and `y`; smaller is better for both. With `collapse`, a point whose `y` is above it is
    never on the front: a collapsed model is not a size/quality trade-off, however small."""
    front = pd.Series(False, index=rows.index)
    if collapse is not None and len(rows):
        rows = rows[rows[y] <= collapse]
    groups = rows.groupby(by) if by and by in rows and len(rows) else [(None, rows)]
    for _, group in groups:
        best = math.inf
        for idx, value in group.sort_values([x, y])[y].items():
            if value < best:
                front[idx] = True
                best = value
    return front


def plot_size_vs_ppl(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL,
                     title: str = "Perplexity vs model size"):
    """Scatter of every model x method x setting: size (MiB, log) vs perplexity (log); the Pareto
    front of the points that did not collapse as a step line with its points labelled; collapsed
    points crossed. One panel per dataset."""

    if not len(rows):
        return _placeholder(title, "No recorded results for this grid yet.")
    colors = method_colors(rows["method"])
    markers = dict(zip(sorted(rows["model"].unique()), "os^Dvp*"))
    datasets = sorted(rows["dataset"].unique())
    fig, axes = _panels(len(datasets), width=7.0, height=5.0)
    for ax, dataset in zip(axes, datasets):
        sub = rows[rows.dataset == dataset]
        mib = sub["model_bytes"] / 2**20
        for (method, model), m in sub.groupby(["method", "model"]):
            ax.scatter(m["model_bytes"] / 2**20, m["value"], color=colors[method], marker=markers[model], s=55,
                       label=f"{method} ({model})", zorder=3, edgecolor="white", linewidth=0.5)
        _mark_collapsed(ax, mib, sub["value"], collapse, label=True)
        front = sub[pareto_front(sub, collapse=collapse)].sort_values("model_bytes")
        ax.step(front["model_bytes"] / 2**20, front["value"], where="post", color="0.25", linewidth=1.2,
                label="Pareto front", zorder=2)
        for r in front.itertuples():
            ax.annotate(f"{r.method} {r.setting}", (r.model_bytes / 2**20, r.value), textcoords="offset points",
                        xytext=(5, 5), fontsize=8, color="0.2")
        if sub["value"].max() > collapse / 3:
            ax.axhline(collapse, color="#c0392b", linestyle=":", linewidth=1, label=f"collapse threshold ({collapse:g})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set_xlabel("model size (MiB; params x bits + fp16 scale and zero per group, log)")
        ax.set_ylabel(f"perplexity, {_dataset_label(rows, dataset)} (log)", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    return _finish(fig, title, rows)


def size_findings(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL) -> dict[str, str]:
    """Glue values for the size-vs-bits chapter (rows from `with_size`); every key always present."""
    out = {"n_points": str(len(rows)), "n_models": "0", "n_front": "0", "front_list": NA,
           "low_bit_on_front": "none", "smallest_ok": NA, "smallest_ok_mib": NA, "fp_mib": NA,
           "verdict": "No results are recorded for this grid yet, so the claim is untested here."}
    if not len(rows):
        return out
    out["n_models"] = str(rows["model"].nunique())
    front = rows[pareto_front(rows, collapse=collapse)].sort_values("model_bytes")
    out["n_front"] = str(len(front))
    out["front_list"] = "; ".join(
        f"{dataset}: " + ", ".join(f"{r.model} {r.method} {r.setting} ({r.model_bytes / 2**20:.1f} MiB, ppl "
                                   f"{fmt(r.value, 3)})" for r in points.itertuples())
        for dataset, points in front.groupby("dataset", sort=False)) or NA
    low = front[pd.to_numeric(front["wbits"], errors="coerce") <= 2]
    out["low_bit_on_front"] = ", ".join(f"{r.model} {r.method} {r.setting}" for r in low.itertuples()) or "none"
    fp = rows[rows.method == "fp"]
    if len(fp):
        out["fp_mib"] = f"{fp['model_bytes'].min() / 2**20:.1f}"
    ok = rows[rows["value"] <= collapse].sort_values(["model_bytes", "value"])  # at one size, the best
    if len(ok):
        out["smallest_ok"] = f"{ok.iloc[0]['model']} {ok.iloc[0]['method']} {ok.iloc[0]['setting']}"
        out["smallest_ok_mib"] = f"{ok.iloc[0]['model_bytes'] / 2**20:.1f}"
    sizes = rows.groupby("model")["params"].first().sort_values()
    if len(sizes) < 2:
        out["verdict"] = (f"Untested here: the claim compares model sizes, and this grid has one model "
                          f"({sizes.index[0]}). Within it, {'no' if low.empty else len(low)} 2-bit configuration"
                          f"{'' if len(low) == 1 else 's'} reach the Pareto front.")
        return out
    big, small = sizes.index[-1], sizes.index[:-1]
    big2 = rows[(rows.model == big) & (pd.to_numeric(rows["wbits"], errors="coerce") <= 2)]
    small4 = rows[rows.model.isin(small) & (pd.to_numeric(rows["wbits"], errors="coerce") == 4)]
    if big2.empty or small4.empty:
        out["verdict"] = f"Untested: needs {big} at 2 bits and a smaller model at 4 bits in the grid."
        return out
    b, s = big2.loc[big2["value"].idxmin()], small4.loc[small4["value"].idxmin()]
    better = "smaller 4-bit" if s["value"] < b["value"] else "larger 2-bit"
    out["verdict"] = (f"The {better} model wins: {s['model']} {s['method']} {s['setting']} reaches ppl {fmt(s['value'], 3)} "
                      f"in {s['model_bytes'] / 2**20:.0f} MiB, {b['model']} {b['method']} {b['setting']} ppl "
                      f"{fmt(b['value'], 3)} in {b['model_bytes'] / 2**20:.0f} MiB"
                      + (" — in line with the paper's call to re-examine 2-bit quantization of large models."
                         if better == "smaller 4-bit" else " — against the paper's doubt about 2-bit large models."))
    return out


# --------------------------------------------------------------------------- combinations

def combination_rows(rows: pd.DataFrame, plan: dict[str, list[str]]) -> pd.DataFrame:
    """Rows of each combination and of its steps alone, with `combination` and `role` columns
    (one copy of a shared row, e.g. gptq alone, per combination it belongs to); fp rows are kept
    with role "baseline"."""
    parts = [rows[rows.method == "fp"].assign(combination="fp", role="baseline", step=-1)] if plan else []
    for combo, pipelines in plan.items():
        for step, p in enumerate(pipelines):
            parts.append(rows[rows.method == p].assign(combination=combo, role="combined" if p == combo else "alone",
                                                       step=step))
    return pd.concat(parts, ignore_index=True) if parts else rows.iloc[0:0].assign(combination=[], role=[], step=[])


def plot_combinations(rows: pd.DataFrame, collapse: float = COLLAPSE_PPL,
                      title: str = "Combined strategies vs each alone"):
    """One panel per combination: perplexity (log) per setting, a bar per pipeline (each step
    alone, then the combination), collapsed bars crossed, fp dashed."""
    import numpy as np

    quant = rows[rows.method != "fp"] if len(rows) else rows
    if not len(quant):
        return _placeholder(title, "No combination is recorded yet (see the sentence above the figure).")
    combos = list(dict.fromkeys(quant["combination"]))
    colors = method_colors(quant["method"])
    fig, axes = _panels(len(combos))
    for ax, combo in zip(axes, combos):
        sub = quant[quant.combination == combo]
        settings = order_settings(sub["setting"])
        pipelines = list(dict.fromkeys(sub.sort_values("step")["method"]))  # each step alone, then combined
        width = 0.8 / max(len(pipelines), 1)
        for k, p in enumerate(pipelines):
            m = sub[sub.method == p].drop_duplicates(["setting"]).set_index("setting").reindex(settings)
            xs = np.arange(len(settings)) + (k - (len(pipelines) - 1) / 2) * width
            ax.bar(xs, m["value"], width=width * 0.95, color=colors[p], label=p,
                   hatch="//" if p == combo else None, edgecolor="white")
            _mark_collapsed(ax, xs, m["value"].fillna(0), collapse, label=(k == 0))
        base = rows[(rows.method == "fp")]["value"]
        if len(base):
            ax.axhline(base.iloc[0], color="black", linestyle="--", linewidth=1, label=f"fp ({base.iloc[0]:.4g})")
        ax.set_yscale("log")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlabel("setting (w: weight bits, g: group size, a: activation bits)", fontsize=9)
        ax.set_ylabel(f"perplexity, {_dataset_label(rows, sub['dataset'].iloc[0])} (log)", fontsize=9)
        ax.set_title(combo, fontsize=10)
        ax.legend(fontsize=8)
    return _finish(fig, title, quant)


def combination_findings(rows: pd.DataFrame, plan: dict[str, list[str]]) -> dict[str, str]:
    """Glue values for the combinations chapter; every key is always present."""
    out = {"n_combos": str(len(plan)), "n_pairs": "0", "n_wins": "0", "best_pipeline": NA, "wins_list": "none",
           "verdict": "No combination could run with the methods registered now, so the claim is untested here."}
    quant = rows[rows.method != "fp"] if len(rows) else rows
    if not plan:
        return out
    if not len(quant):
        out["verdict"] = "No combination is recorded yet, so the claim is untested here."
        return out
    pairs, wins = 0, []
    for combo in plan:
        sub = quant[quant.combination == combo]
        for (setting, dataset), s in sub.groupby(["setting", "dataset"]):
            combined = s[s.role == "combined"]["value"]
            alone = s[s.role == "alone"]
            if len(combined) and alone["method"].nunique() == len(plan[combo]) - 1:
                pairs += 1
                if combined.iloc[0] < alone["value"].min():
                    wins.append(f"{combo} {setting}")
    out["n_pairs"], out["n_wins"] = str(pairs), str(len(wins))
    out["wins_list"] = ", ".join(wins) or "none"
    best = quant.loc[quant.groupby("setting")["value"].idxmin()]
    out["best_pipeline"] = "; ".join(f"{r.setting}: {r.method} ({fmt(r.value, 3)})" for r in best.itertuples())
    if not pairs:
        out["verdict"] = "No combination has all of its parts recorded in one setting yet, so the claim is untested."
    elif len(wins) == pairs:
        out["verdict"] = f"We agree: every combination beats each of its parts alone ({pairs} of {pairs} comparisons)."
    elif wins:
        out["verdict"] = f"Partly: a combination beats each of its parts alone in {len(wins)} of {pairs} comparisons."
    else:
        out["verdict"] = f"We disagree: no combination beats its best part alone ({pairs} comparisons)."
    return out


# --------------------------------------------------------------------------- results explorer

_EXPLORER_JS = """
<script>
(function () {
  var table = document.getElementById("%(id)s"), input = document.getElementById("%(id)s-filter");
  var count = document.getElementById("%(id)s-count"), body = table.tBodies[0];
  function refresh() {
    var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean), shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var text = row.textContent.toLowerCase();
      var ok = words.every(function (w) { return text.indexOf(w) >= 0; });
      row.style.display = ok ? "" : "none"; if (ok) shown++;
    });
    count.textContent = shown + " of " + body.rows.length + " rows";
  }
  input.addEventListener("input", refresh);
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    th.style.cursor = "pointer"; th.title = "click to sort";
    th.addEventListener("click", function () {
      var asc = th.dataset.sort !== "asc"; th.dataset.sort = asc ? "asc" : "desc";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent, y = b.cells[col].textContent, nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  refresh();
})();
</script>
"""


def explorer_frame(results) -> pd.DataFrame:
    """Every newest row of the store, dict columns flattened to text, newest first."""
    import json

    from .results import ResultsStore

    table = ResultsStore(results_path(results)).table(latest=True)
    if not len(table):
        return table
    for col in table.columns:
        if table[col].map(lambda v: isinstance(v, (dict, list))).any():
            table[col] = table[col].map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
    first = [c for c in ("model", "method", "setting", "dataset", "metric", "value", "quant_seconds",
                         "peak_rss_bytes", "device_name", "git_sha", "timestamp") if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]].sort_values("timestamp", ascending=False)


def compute_table(frame: pd.DataFrame) -> pd.DataFrame:
    """What the recorded runs cost, per model: runs, quantization and evaluation hours as
    recorded (each run's `quant_seconds` once, the `eval_seconds` of its rows), the threads they
    ran with, and a total row: the time `make book FRESH=1` needs to compute them again on the
    same machine (model loading and builds not included)."""
    if not len(frame):
        return pd.DataFrame(columns=["model", "runs", "quantization h", "evaluation h", "total h", "threads"])
    runs = frame.groupby("run_id").agg(model=("model", "first"), quant=("quant_seconds", "first"),
                                       evaluation=("eval_seconds", "sum"), threads=("torch_threads", "first"))
    runs = runs.fillna({"quant": 0.0, "evaluation": 0.0})

    def summary(group: pd.DataFrame, name: str) -> dict:
        threads = sorted({int(t) for t in group["threads"].dropna()})
        return {"model": name, "runs": len(group), "quantization h": group["quant"].sum() / 3600,
                "evaluation h": group["evaluation"].sum() / 3600,
                "total h": (group["quant"].sum() + group["evaluation"].sum()) / 3600,
                "threads": ", ".join(map(str, threads))}

    table = [summary(group, model) for model, group in runs.groupby("model")]
    return pd.DataFrame(table + [summary(runs, "all")])


def explorer_html(frame: pd.DataFrame, table_id: str = "results-table"):
    """The frame as a plain HTML table with a text filter and click-to-sort headers (no
    dependencies). Returns an IPython HTML object."""
    from IPython.display import HTML

    if not len(frame):
        return HTML("<p>No results recorded yet.</p>")
    shown = frame.copy()
    for col in ("value", "quant_seconds", "eval_seconds", "tokens_per_s", "weight_rel_change"):
        if col in shown:
            shown[col] = shown[col].map(lambda v: fmt(v, 5) if isinstance(v, float) else v)
    table = shown.to_html(index=False, table_id=table_id, border=0, classes="ptq-results", na_rep="",
                          escape=True)
    head = (f'<p><input id="{table_id}-filter" type="search" placeholder="filter rows: e.g. gptq w3g128" '
            f'style="width: 24em; padding: 4px"> <span id="{table_id}-count"></span></p>'
            '<style>.ptq-results td, .ptq-results th {font-size: 0.8em; padding: 2px 6px; white-space: nowrap}'
            '</style>')
    return HTML(head + f'<div style="overflow-x: auto; max-height: 40em">{table}</div>'
                + _EXPLORER_JS % {"id": table_id})


__all__ = [
    "COLLAPSE_PPL", "PLANNED", "as_list", "STRATEGIES", "bitwidth_findings", "combination_findings", "combination_plan",
    "combination_rows", "cost_table", "coverage_note", "default_pipeline", "degradation", "explorer_frame", "explorer_html", "fmt",
    "linear_inventory", "method_colors", "method_table", "missing", "model_bytes", "order_settings",
    "pareto_front", "plot_combinations", "plot_ppl_by_setting", "plot_size_vs_ppl", "plot_taxonomy",
    "ppl_table", "provenance_note", "repo_root", "compute_table", "results_path", "robustness", "rows_for",
    "regime_note", "say", "select_methods", "size_table", "taxonomy_findings", "PAPER_STRATEGIES", "setting_key", "setup", "size_findings", "standalone_name", "strategy_table",
    "with_size",
]
