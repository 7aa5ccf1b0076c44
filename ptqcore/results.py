"""Tidy results store with provenance, and the cache of finished runs.

Every number ptq-bench produces is one *row*: one (run, dataset/task, metric).
Rows of one run live in one JSON-lines file, ``<root>/runs/<YYYYmmddTHHMMSS>-<config_hash>.jsonl``,
written atomically (temporary file in the same folder, fsync, ``os.replace``), so an interrupted
run leaves no partial rows, and files once written are never rewritten: a forced re-run adds a
new file and ``table(latest=True)`` picks the newest run per ``config_hash``.
Plots and the book read only this store.

Row schema (the contract between the run code and everything that reads results)
-------------------------------------------------------------------------------
Required in every row (``write_run`` rejects rows without them):

    run_id         str    12 hex chars, ``new_run_id()``; one per run (all rows of a file share it)
    config_hash    str    ``config_hash(config)`` of everything that defines the result
                          (model, method pipeline + step configs, setting, calibration spec,
                          eval spec, seed); never provenance. One per run.
    model          str    model name, e.g. "smollm2-135m"
    method         str    pipeline string, e.g. "gptq", "awq+gptq", "fp"
    dataset        str    dataset or task, e.g. "wiki", "sotu", "arc_easy"
    metric         str    plain name, e.g. "ppl", "acc", "acc_norm" (no "acc,none" composites)
    value          float  finite (NaN/Inf are rejected)

Written by the run code for every row (by convention; not enforced):

    timestamp      str    ISO 8601 UTC, run start (``utc_now_iso()``; ``make_rows`` adds it)
    <provenance>          the fields of ``provenance()`` flattened into the row: git_sha,
                          git_dirty, ptqcore_version, torch_version, transformers_version,
                          python_version, platform, device ("cpu"/"cuda"), device_name
                          (CPU model or GPU name), torch_threads, hostname
    method_config  dict   config of every pipeline step, {step name: dataclass-as-dict}
    setting        str    "fp", "w4", "w4g128", "w3g128", "w4a8", ... (PROTOCOL.md names)
    wbits          int    weight bits (16 or None for fp)
    group_size     int    None/-1 for per-channel
    sym            bool   symmetric weight grid
    abits          int    activation bits (16 or None when activations are not quantized)
    calib          dict   {"dataset", "nsamples", "seqlen", "seed"}; None when no calibration
    seed           int
    profile        str    "cpu" or "paper" (PROTOCOL.md profiles)
    stderr         float  standard error of value, None where undefined (zero-shot: lm-eval's
                          standard error of the mean over items)
    seqlen         int    perplexity window / eval context length (None for zero-shot tasks)
    limit          int    number of eval windows/examples asked for, None = all
    scored_tokens  int    tokens scored for perplexity (None for accuracy tasks)
    task_items     int    zero-shot: items actually scored (min(limit, task size)); None for ppl
    num_fewshot    int    zero-shot: in-context examples (0); None for ppl
    chance         float  zero-shot: accuracy of uniform guessing on the offline task (None upstream)
    lm_eval_version str   zero-shot: the lm-evaluation-harness version that scored it
    bits_per_weight float effective bits per weight of the quantized linears stored in the GPTQ
                          format (codes + fp16 scales + packed zeros + g_idx; ``ptqcore.cost``);
                          16 for fp (float16 storage)
    model_bytes    int    the whole model stored packed (other tensors in float16)
    export_bytes   int    size of the packed checkpoint written with ``--export`` (None otherwise)
    quant_seconds  float  wall seconds fp model -> quantized model (no load, no eval)
    eval_seconds   float  wall seconds of this evaluation
    peak_rss_bytes int    peak memory of the run (``PeakMemory``: CPU RSS or CUDA allocated)
    weight_rel_change float  ||W_q - W|| / ||W|| over every quantized linear (0 for fp)
    lossless_by_construction  bool  True where quantization left the weights unchanged
                          (weight_rel_change < 1e-6): the setting reproduces the checkpoint's own grid
                          (SmolLM2 Q4_1: W4 g32 asymmetric); plots flag it
    notes          str    deviations from PROTOCOL.md, free text ("" when none)

Values must be JSON-native (str, int, float, bool, None, lists, dicts with str keys); numpy
or torch scalars must be converted by the caller (``write_run`` raises ``TypeError`` rather
than stringifying silently). Non-finite floats anywhere in a row are rejected.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import numbers
import os
import platform as _platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "REQUIRED_KEYS",
    "PROVENANCE_KEYS",
    "ROW_COLUMNS",
    "ResultsFileError",
    "ResultsStore",
    "PeakMemory",
    "config_hash",
    "format_table",
    "make_rows",
    "new_run_id",
    "provenance",
    "utc_now_iso",
]

REQUIRED_KEYS: tuple[str, ...] = (
    "run_id", "config_hash", "model", "method", "dataset", "metric", "value",
)

PROVENANCE_KEYS: tuple[str, ...] = (
    "git_sha", "git_dirty", "ptqcore_version", "torch_version", "transformers_version",
    "python_version", "platform", "device", "device_name", "torch_threads", "hostname",
)

ROW_COLUMNS: tuple[str, ...] = (
    "run_id", "config_hash", "timestamp", *PROVENANCE_KEYS,
    "model", "method", "method_config", "setting", "wbits", "group_size", "sym", "abits",
    "calib", "seed", "profile", "dataset", "metric", "value", "stderr", "seqlen", "limit",
    "scored_tokens", "task_items", "num_fewshot", "chance", "lm_eval_version",
    "quant_seconds", "eval_seconds", "peak_rss_bytes", "weight_rel_change", "lossless_by_construction",
    "bits_per_weight", "model_bytes", "export_bytes", "notes",
)

_PACKAGE_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- ids, hashes, time

def new_run_id() -> str:
    """A fresh run id: 12 hex characters of a uuid4."""
    return uuid.uuid4().hex[:12]


def utc_now_iso() -> str:
    """Current time as ISO 8601 UTC, seconds resolution, e.g. '2025-01-31T12:00:00+00:00'."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_hash(config: dict) -> str:
    """First 16 hex chars of sha256 over canonical JSON of ``config``.

    Canonical = ``sort_keys=True``, separators ``(",", ":")``, ``default=str`` (so dataclass
    dicts with e.g. enums or paths hash by their string form). Key order does not matter;
    any value change does. Pass everything that defines the result, never provenance.
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_rows(base: dict, metrics: list[dict]) -> list[dict]:
    """One row per metric dict: ``{**base, **metric}`` (metric keys win).

    ``run_id`` and ``timestamp`` are added when neither ``base`` nor the metric has them; the
    generated values are shared by all rows. ``base`` is deep-copied per row so nested dicts
    (method_config, calib) are not shared between rows.
    """
    run_id = new_run_id()
    stamp = utc_now_iso()
    rows = []
    for m in metrics:
        row = copy.deepcopy(base)
        row.update(copy.deepcopy(m))
        row.setdefault("run_id", run_id)
        row.setdefault("timestamp", stamp)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- provenance

def _git(repo_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def _git_info(repo_dir: str, ignore: tuple[str, ...] = ("results",)) -> tuple[str | None, bool | None]:
    """(sha, dirty) of the git checkout containing ``repo_dir``; cached per process.

    sha is None outside a checkout or before the first commit. dirty is None outside a
    checkout, else whether ``git status --porcelain`` lists anything outside the top-level
    folders in ``ignore`` (the results folder must not make every run after the first dirty).
    """
    top = _git(Path(repo_dir), "rev-parse", "--show-toplevel")
    if top is None:
        return None, None
    top_dir = Path(top.strip())
    sha = _git(top_dir, "rev-parse", "--verify", "-q", "HEAD")
    sha = sha.strip() if sha else None
    status = _git(top_dir, "status", "--porcelain", "-z")
    if status is None:
        return sha, None
    entries = status.split("\0")
    dirty = False
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if "R" in code or "C" in code:  # rename/copy: the original path follows
            i += 1
        first = path.strip("/").split("/", 1)[0]
        if first not in ignore:
            dirty = True
            break
    return sha, dirty


@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor() or _platform.machine() or "unknown"


def _device_type(device: Any) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def provenance(device: str = "cpu", *, ignore: tuple[str, ...] = ("results",)) -> dict:
    """Where and with what a number was produced; flattened into every results row.

    Keys: git_sha (None outside a git checkout or before the first commit), git_dirty (None
    outside a checkout; changes under the top-level folders in ``ignore`` do not count),
    ptqcore_version, torch_version, transformers_version, python_version, platform, device
    ("cpu"/"cuda"), device_name (CPU model from /proc/cpuinfo, or the GPU name),
    torch_threads, hostname. Git info is computed once per process.
    """
    import torch

    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        transformers_version = None
    from ptqcore import __version__ as ptqcore_version

    sha, dirty = _git_info(str(_PACKAGE_DIR), tuple(ignore))
    dev = _device_type(device)
    if dev == "cuda":
        index = torch.device(device).index if ":" in str(device) else None
        device_name = torch.cuda.get_device_name(index)
    else:
        device_name = _cpu_name()
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "ptqcore_version": ptqcore_version,
        "torch_version": torch.__version__,
        "transformers_version": transformers_version,
        "python_version": _platform.python_version(),
        "platform": _platform.platform(),
        "device": dev,
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
    }


# --------------------------------------------------------------------------- the store

class ResultsFileError(ValueError):
    """A run file that cannot be read (should never happen given atomic writes)."""


_RUN_FILE = re.compile(r"^(\d{8}T\d{6})-(.+?)(?:-(\d+))?\.jsonl$")


def _file_key(path: Path) -> tuple[str, str, int]:
    """Sort key: (timestamp, hash, suffix); '-1', '-2' suffixes sort after the plain name."""
    m = _RUN_FILE.match(path.name)
    if m is None:
        return (path.name, "", 0)
    return (m.group(1), m.group(2), int(m.group(3) or 0))


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj!r}; results must be finite (use None for 'undefined')")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def _validate_rows(rows: list[dict]) -> list[dict]:
    """Checked, JSON-ready copies of ``rows``; raises before anything is written."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("write_run needs a non-empty list of rows")
    out = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"row {n} is a {type(row).__name__}, not a dict")
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {n} (metric {row.get('metric')!r}) lacks required keys {missing}")
        row = dict(row)
        label = f"row {n} (dataset {row['dataset']!r}, metric {row['metric']!r})"
        value = row["value"]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{label}: value must be a real number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{label}: value is {value!r}; metric {row['metric']!r} must be finite")
        row["value"] = value
        for key in ("run_id", "config_hash"):
            if not isinstance(row[key], str) or not row[key]:
                raise ValueError(f"{label}: {key} must be a non-empty string, got {row[key]!r}")
        for key, v in row.items():
            if not isinstance(key, str):
                raise TypeError(f"{label}: column names must be strings, got {key!r}")
            _check_finite(v, f"{label} column {key!r}")
            try:
                json.dumps(v, allow_nan=False)
            except TypeError as e:
                raise TypeError(
                    f"{label} column {key!r}: {type(v).__name__} is not JSON-serialisable ({e}); "
                    "convert it to str/int/float/bool/None/list/dict first"
                ) from None
        out.append(row)
    for key in ("run_id", "config_hash"):
        seen = sorted({r[key] for r in out})
        if len(seen) != 1:
            raise ValueError(f"all rows of a run must share one {key}; got {seen}")
    return out


class ResultsStore:
    """All results rows under ``root`` (default ``results``), one JSONL file per run.

    The caller owns the cache policy: ``if store.has(h) and not force: skip`` (or
    ``first_recorded(spec.result_keys())``, which also finds a run that evaluated more datasets); a forced run is
    written as an additional file (earlier rows are never lost or rewritten) and
    ``table(latest=True)`` keeps only the newest run per config_hash.
    """

    def __init__(self, root: str | Path = "results") -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    # ---- reading

    def run_files(self) -> list[Path]:
        """Complete run files, oldest first (by file name: timestamp, hash, suffix)."""
        if not self.runs_dir.is_dir():
            return []
        files = [p for p in self.runs_dir.glob("*.jsonl") if not p.name.startswith(".") and p.is_file()]
        return sorted(files, key=_file_key)

    @staticmethod
    def _read_file(path: Path) -> list[dict]:
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ResultsFileError(f"{path}:{lineno}: unparsable results line ({e})") from None
                if not isinstance(row, dict):
                    raise ResultsFileError(f"{path}:{lineno}: results line is not a JSON object")
                rows.append(row)
        return rows

    def _runs(self) -> list[tuple[Path, list[dict]]]:
        return [(p, self._read_file(p)) for p in self.run_files()]

    def rows(self, latest: bool = False) -> list[dict]:
        """All rows of all run files, oldest file first; ``latest``: see ``table``."""
        runs = self._runs()
        if latest:
            newest: dict[str, int] = {}
            for i, (_, rows) in enumerate(runs):
                for r in rows:
                    newest[r.get("config_hash")] = i
            return [r for i, (_, rows) in enumerate(runs) for r in rows if newest[r.get("config_hash")] == i]
        return [r for _, rows in runs for r in rows]

    def table(self, latest: bool = False):
        """Rows as a pandas DataFrame. ``latest=True`` keeps, per config_hash, only the rows of
        the newest run file (what plots use); ``latest=False`` returns every row ever written."""
        import pandas as pd

        rows = self.rows(latest=latest)
        if not rows:
            return pd.DataFrame(columns=list(REQUIRED_KEYS))
        return pd.DataFrame(rows)

    def has(self, config_hash: str) -> bool:
        """Whether any recorded row carries ``config_hash``."""
        return config_hash in self.hashes()

    def hashes(self) -> set[str]:
        """Every recorded config_hash."""
        return {r.get("config_hash") for _, rows in self._runs() for r in rows}

    def first_recorded(self, keys: Iterable[str], recorded: set[str] | None = None) -> str | None:
        """The first of ``keys`` that is recorded (``recorded``: the store's hashes, when the
        caller already has them), else None. With `RunSpec.result_keys()`: the record serving a spec."""
        recorded = self.hashes() if recorded is None else recorded
        return next((k for k in keys if k in recorded), None)

    # ---- writing

    def write_run(self, rows: list[dict]) -> Path:
        """Validate ``rows`` (one run), then write them atomically to a new run file.

        Raises ValueError (empty, missing keys, mixed run_id/config_hash, non-finite values)
        or TypeError (non-numeric value, non-JSON column) before anything touches disk.
        Returns the path of the new file.
        """
        rows = _validate_rows(rows)
        payload = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in rows)
        h = re.sub(r"[^0-9A-Za-z_]", "_", rows[0]["config_hash"])[:64]
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = _utc_stamp()
        fd, tmp = tempfile.mkstemp(prefix=f".{stamp}-{h}.", suffix=".tmp", dir=self.runs_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            final = self.runs_dir / f"{stamp}-{h}.jsonl"
            n = 0
            while final.exists():  # never overwrite (single writer per run name assumed)
                n += 1
                final = self.runs_dir / f"{stamp}-{h}-{n}.jsonl"
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(self.runs_dir)
        return final


# --------------------------------------------------------------------------- cost

def _ru_maxrss_bytes() -> int:
    """Process-lifetime peak RSS (ru_maxrss is KiB on Linux, bytes on macOS)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(ru) if sys.platform == "darwin" else int(ru) * 1024


class PeakMemory:
    """Peak memory of a block of work: ``with PeakMemory(device) as pm: ...; pm.peak_bytes``.

    CPU: the process RSS is sampled by a thread (psutil) every ``interval`` seconds (default
    20 ms) plus once at entry and exit; ``peak_rss_bytes`` is the largest sample. The kernel's
    ``ru_maxrss`` is the peak over the whole *process lifetime*, not the block, so it is used
    only (a) when it rose during the block (then it is the exact block peak and beats
    sampling, which may miss a short spike) and (b) as the fallback when psutil is missing or
    ``sample=False`` (then the value may include peaks from before the block).
    CUDA: ``torch.cuda.reset_peak_memory_stats()`` at entry, ``max_memory_allocated()`` at
    exit (``peak_cuda_bytes``; CPU RSS is still recorded as ``peak_rss_bytes``).

    After exit: ``peak_bytes`` (CUDA allocated on cuda, else peak RSS), ``peak_rss_bytes``,
    ``peak_cuda_bytes`` (None on cpu), ``start_rss_bytes``, ``ru_maxrss_bytes``.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.02, sample: bool = True) -> None:
        self.device = _device_type(device)
        self._torch_device = device
        self.interval = interval
        self.sample = sample
        self.peak_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self.start_rss_bytes: int | None = None
        self.ru_maxrss_bytes: int | None = None
        self._max_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = None

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._max_seen = max(self._max_seen, self._rss())
            except Exception:  # process info unavailable: keep what we have
                return

    def __enter__(self) -> "PeakMemory":
        self._ru_start = _ru_maxrss_bytes()
        if self.sample:
            try:
                import psutil
                self._proc = psutil.Process()
                self.start_rss_bytes = self._max_seen = self._rss()
            except Exception:
                self._proc = None
        if self._proc is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="PeakMemory", daemon=True)
            self._thread.start()
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize(self._torch_device)
            torch.cuda.reset_peak_memory_stats(self._torch_device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize(self._torch_device)
            self.peak_cuda_bytes = int(torch.cuda.max_memory_allocated(self._torch_device))
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.ru_maxrss_bytes = _ru_maxrss_bytes()
        if self._proc is not None:
            try:
                self._max_seen = max(self._max_seen, self._rss())
            except Exception:
                pass
            peak = self._max_seen
            if self.ru_maxrss_bytes > self._ru_start:  # the lifetime peak happened in the block
                peak = max(peak, self.ru_maxrss_bytes)
            self.peak_rss_bytes = peak
        else:
            self.peak_rss_bytes = self.ru_maxrss_bytes
        self.peak_bytes = self.peak_cuda_bytes if self.device == "cuda" else self.peak_rss_bytes

    @property
    def increase_bytes(self) -> int | None:
        """Peak RSS above the RSS at entry (None without sampling)."""
        if self.peak_rss_bytes is None or self.start_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.start_rss_bytes


# --------------------------------------------------------------------------- display

DEFAULT_COLUMNS: tuple[str, ...] = (
    "model", "method", "setting", "dataset", "metric", "value", "stderr",
    "quant_seconds", "lossless_by_construction", "run_id",
)


def _fmt4(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return f"{float(v):.4g}"
    return str(v)


def format_table(df, columns: Iterable[str] | None = None) -> str:
    """Compact text table of results rows (``to_string(index=False)``), value/stderr to 4
    significant digits. ``columns``: which to show (default: the ``DEFAULT_COLUMNS`` present
    in ``df``); an unknown column raises KeyError listing the available ones."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(list(df))
    if df.empty:
        return "(no results)"
    if columns is None:
        cols = [c for c in DEFAULT_COLUMNS if c in df.columns] or list(df.columns)
    else:
        cols = list(columns)
        unknown = [c for c in cols if c not in df.columns]
        if unknown:
            raise KeyError(f"unknown column(s) {unknown}; available: {sorted(map(str, df.columns))}")
    out = df[cols].copy()
    for c in ("value", "stderr", "quant_seconds", "eval_seconds"):
        if c in out.columns:
            out[c] = out[c].map(_fmt4)
    return out.to_string(index=False)
