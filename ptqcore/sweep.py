"""Grids of runs for the study notebooks: resumable, skipping configs already recorded."""

from __future__ import annotations

import itertools

from tqdm.auto import tqdm

from .quant import parse_setting
from .results import ResultsStore
from .runner import RunSpec, run


def grid(models, methods, settings, **common) -> list[RunSpec]:
    """RunSpecs for every model x method x setting; `fp` gets one run per model.
    `common` goes to every RunSpec (profile, datasets, limit, device, options ...)."""
    specs, seen = [], set()
    for model, method, setting in itertools.product(models, methods, settings):
        if method == "fp":
            key = (model, "fp")
            if key in seen:
                continue
            seen.add(key)
            specs.append(RunSpec(model=model, method="fp", **common))
            continue
        spec, act = parse_setting(setting)
        specs.append(RunSpec(model=model, method=method, spec=spec, act=act, **common))
    return specs


def sweep(specs: list[RunSpec], out: str = "results", force: bool = False, progress: bool = True):
    """Run every spec not yet recorded under `out` (an interrupted sweep resumes where it
    stopped: each finished run is already in the store). Returns the store's latest table."""
    for spec in specs:
        spec.validate()  # every config is checked before the first one runs
    store = ResultsStore(out)
    for spec in tqdm(specs, desc="sweep", unit="run", disable=not progress):
        run(spec, out=out, force=force, progress=False, log=lambda *_: None)
    return store.table(latest=True)
