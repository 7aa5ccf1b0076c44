import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ptqcore import results
from ptqcore.results import (
    PROVENANCE_KEYS,
    PeakMemory,
    ResultsFileError,
    ResultsStore,
    config_hash,
    format_table,
    make_rows,
    new_run_id,
    provenance,
)

REPO = Path(__file__).resolve().parents[1]


def _rows(h="abc123", run_id=None, values=(12.5, 0.61), model="smollm2-135m"):
    base = {
        "run_id": run_id or new_run_id(),
        "config_hash": h,
        "model": model,
        "method": "gptq",
        "method_config": {"gptq": {"blocksize": 128, "percdamp": 0.01}},
        "setting": "w3g128",
        "calib": {"dataset": "wiki", "nsamples": 32, "seqlen": 512, "seed": 0},
        "lossless_by_construction": False,
    }
    metrics = [
        {"dataset": "wiki", "metric": "ppl", "value": values[0], "stderr": None, "scored_tokens": 32752},
        {"dataset": "arc_easy", "metric": "acc", "value": values[1], "stderr": 0.01},
    ]
    return make_rows(base, metrics)


def _files(store):
    return sorted(p.name for p in store.runs_dir.iterdir())


# ------------------------------------------------------------------ write / read


def test_write_and_read_back(tmp_path):
    store = ResultsStore(tmp_path / "results")
    rows = _rows()
    path = store.write_run(rows)
    assert path.parent == store.runs_dir
    assert path.name.endswith("-abc123.jsonl")
    got = store.rows()
    assert got == rows
    df = store.table()
    assert list(df["metric"]) == ["ppl", "acc"]
    assert df["value"].tolist() == [12.5, 0.61]
    assert df["method_config"].iloc[0] == {"gptq": {"blocksize": 128, "percdamp": 0.01}}
    assert df["run_id"].nunique() == 1
    # one row per line, valid JSON
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["metric"] == "acc"


def test_empty_store(tmp_path):
    store = ResultsStore(tmp_path / "nothing")
    assert store.rows() == []
    assert store.table().empty
    assert not store.has("abc")
    assert format_table(store.table()) == "(no results)"


def test_has_after_write(tmp_path):
    store = ResultsStore(tmp_path)
    assert not store.has("abc123")
    store.write_run(_rows("abc123"))
    assert store.has("abc123")
    assert not store.has("other")


def test_second_write_same_config_adds_file_and_keeps_first(tmp_path):
    store = ResultsStore(tmp_path)
    first = store.write_run(_rows("h1", values=(10.0, 0.5)))
    first_bytes = first.read_bytes()
    second = store.write_run(_rows("h1", values=(11.0, 0.6)))
    assert second != first and second.exists()
    assert first.read_bytes() == first_bytes
    assert len(store.run_files()) == 2
    assert len(store.rows()) == 4


def test_name_collision_gets_suffix_and_sorts_after(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "_utc_stamp", lambda: "20250101T000000")
    store = ResultsStore(tmp_path)
    a = store.write_run(_rows("h1", values=(10.0, 0.5)))
    b = store.write_run(_rows("h1", values=(11.0, 0.6)))
    c = store.write_run(_rows("h1", values=(12.0, 0.7)))
    assert [a.name, b.name, c.name] == [
        "20250101T000000-h1.jsonl", "20250101T000000-h1-1.jsonl", "20250101T000000-h1-2.jsonl"]
    assert store.run_files() == [a, b, c]
    latest = store.table(latest=True)
    assert latest["value"].tolist() == [12.0, 0.7]


def test_latest_keeps_only_newest_run_per_hash(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    stamps = iter(["20250101T000000", "20250101T000001", "20250102T000000"])
    monkeypatch.setattr(results, "_utc_stamp", lambda: next(stamps))
    old = _rows("h1", values=(10.0, 0.5))
    other = _rows("h2", values=(20.0, 0.4))
    new = _rows("h1", values=(11.0, 0.6))
    store.write_run(old)
    store.write_run(other)
    store.write_run(new)
    all_df = store.table(latest=False)
    assert len(all_df) == 6
    df = store.table(latest=True)
    assert len(df) == 4
    h1 = df[df.config_hash == "h1"]
    assert set(h1["run_id"]) == {new[0]["run_id"]}
    assert h1["value"].tolist() == [11.0, 0.6]
    assert set(df[df.config_hash == "h2"]["run_id"]) == {other[0]["run_id"]}
    assert store.table().equals(all_df)  # default is everything


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf, np.float32("nan")])
def test_nonfinite_value_rejected_and_nothing_written(tmp_path, bad):
    store = ResultsStore(tmp_path)
    rows = _rows("h1")
    rows[1]["value"] = bad
    with pytest.raises(ValueError, match="acc"):
        store.write_run(rows)
    assert not store.runs_dir.exists() or list(store.runs_dir.iterdir()) == []
    assert not store.has("h1")


def test_nonfinite_elsewhere_rejected(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1")
    rows[0]["stderr"] = float("nan")
    with pytest.raises(ValueError, match="stderr"):
        store.write_run(rows)
    assert store.rows() == []


def test_mixed_run_ids_rejected(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1")
    rows[1]["run_id"] = "somethingelse"
    with pytest.raises(ValueError, match="run_id"):
        store.write_run(rows)
    assert store.rows() == []


def test_mixed_config_hashes_rejected(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1")
    rows[1]["config_hash"] = "h2"
    with pytest.raises(ValueError, match="config_hash"):
        store.write_run(rows)
    assert store.rows() == []


def test_missing_key_and_empty_rejected(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1")
    del rows[0]["dataset"]
    with pytest.raises(ValueError, match="dataset"):
        store.write_run(rows)
    with pytest.raises(ValueError):
        store.write_run([])
    assert store.rows() == []


@pytest.mark.parametrize("bad", ["12.5", None, True])
def test_non_numeric_value_rejected(tmp_path, bad):
    rows = _rows("h1")
    rows[0]["value"] = bad
    with pytest.raises(TypeError, match="ppl"):
        ResultsStore(tmp_path).write_run(rows)


def test_non_json_column_is_type_error_not_stringified(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1")
    rows[0]["scored_tokens"] = np.int64(5)
    with pytest.raises(TypeError, match="scored_tokens"):
        store.write_run(rows)
    rows[0]["scored_tokens"] = 5
    rows[0]["notes"] = object()
    with pytest.raises(TypeError, match="notes"):
        store.write_run(rows)
    assert store.rows() == []


def test_numpy_float_value_stored_as_float(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1", values=(np.float64(3.5), np.float32(0.25)))
    store.write_run(rows)
    assert [r["value"] for r in store.rows()] == [3.5, 0.25]
    assert rows[0]["value"] is not None  # caller's rows untouched
    assert isinstance(rows[1]["value"], np.float32)


# ------------------------------------------------------------------ atomicity


def test_crash_at_replace_leaves_nothing(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    store.write_run(_rows("good"))
    before = _files(store)

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        store.write_run(_rows("crashed"))
    monkeypatch.undo()
    assert _files(store) == before  # no final file, no .tmp left behind
    assert not store.has("crashed")
    assert store.has("good")


def test_leftover_tmp_files_ignored(tmp_path):
    store = ResultsStore(tmp_path)
    store.write_run(_rows("good"))
    partial = json.dumps(_rows("crashed")[0])[:40]  # a torn write
    (store.runs_dir / ".20250101T000000-crashed.x1.tmp").write_text(partial)
    assert not store.has("crashed")
    assert {r["config_hash"] for r in store.rows()} == {"good"}
    assert len(store.table()) == 2


def test_hard_kill_during_write_leaves_only_complete_runs(tmp_path):
    """A process killed between fsync and rename (no cleanup runs) leaves a .tmp only."""
    store = ResultsStore(tmp_path)
    store.write_run(_rows("good"))
    script = textwrap.dedent(f"""
        import os
        from ptqcore import results
        from ptqcore.results import ResultsStore, make_rows
        results.os.replace = lambda src, dst: os._exit(3)
        rows = make_rows({{"config_hash": "crashed", "model": "m", "method": "rtn"}},
                         [{{"dataset": "wiki", "metric": "ppl", "value": 1.0}}])
        ResultsStore({str(tmp_path)!r}).write_run(rows)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert proc.returncode == 3
    names = _files(store)
    assert any(n.startswith(".") and n.endswith(".tmp") for n in names)
    assert not store.has("crashed")
    assert {r["config_hash"] for r in store.rows()} == {"good"}


def test_corrupt_run_file_names_file_and_line(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.write_run(_rows("good"))
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ResultsFileError, match=rf"{path.name}:3"):
        store.rows()


# ------------------------------------------------------------------ hashing, ids, rows


def test_config_hash_stable_and_sensitive():
    a = {"model": "smollm2-135m", "method": "gptq", "cfg": {"wbits": 3, "group_size": 128}, "seed": 0}
    b = {"seed": 0, "cfg": {"group_size": 128, "wbits": 3}, "method": "gptq", "model": "smollm2-135m"}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and all(c in "0123456789abcdef" for c in config_hash(a))
    c = json.loads(json.dumps(a))
    c["cfg"]["wbits"] = 4
    assert config_hash(c) != config_hash(a)
    d = dict(a, seed=1)
    assert config_hash(d) != config_hash(a)
    # known value: guards against silent changes of the canonical form
    assert config_hash({"a": 1}) == "015abd7f5cc57a2d"


def test_new_run_id():
    ids = {new_run_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)


def test_make_rows_merges_and_adds_ids():
    base = {"model": "m", "value": -1, "calib": {"seed": 0}, "metric": "base"}
    rows = make_rows(base, [{"metric": "ppl", "value": 1.0}, {"metric": "acc", "value": 0.5}])
    assert [r["metric"] for r in rows] == ["ppl", "acc"]  # metric keys win
    assert [r["value"] for r in rows] == [1.0, 0.5]
    assert rows[0]["run_id"] == rows[1]["run_id"] and len(rows[0]["run_id"]) == 12
    assert rows[0]["timestamp"] == rows[1]["timestamp"]
    assert rows[0]["timestamp"].endswith("+00:00")
    rows[0]["calib"]["seed"] = 9  # nested dicts not shared
    assert rows[1]["calib"]["seed"] == 0 and base["calib"]["seed"] == 0
    kept = make_rows({"run_id": "r1", "timestamp": "t"}, [{"metric": "x", "value": 1.0}])
    assert kept[0]["run_id"] == "r1" and kept[0]["timestamp"] == "t"


# ------------------------------------------------------------------ provenance


def test_provenance_keys_and_threads():
    import torch

    p = provenance("cpu")
    assert set(p) == set(PROVENANCE_KEYS)
    assert p["device"] == "cpu"
    assert isinstance(p["torch_threads"], int) and 1 <= p["torch_threads"] <= (os.cpu_count() or 1024)
    assert p["torch_threads"] == torch.get_num_threads()
    assert p["torch_version"] == torch.__version__
    assert p["ptqcore_version"] == "0.1.0"
    assert p["device_name"] and isinstance(p["device_name"], str)
    assert p["git_sha"] is None or len(p["git_sha"]) == 40
    assert p["git_dirty"] in (True, False, None)
    json.dumps(p)  # flattened into rows: must be JSON-native


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True)


def test_git_info_sha_dirty_and_results_ignored(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    assert results._git_info(str(outside)) == (None, None)
    _git(repo, "init", "-q")
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    sha, dirty = results._git_info(str(repo / "pkg"), ("results", "nocache1"))
    assert sha is None and dirty is True  # no commits yet
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    sha, dirty = results._git_info(str(repo / "pkg"), ("results", "nocache2"))
    assert len(sha) == 40 and dirty is False
    (repo / "results" / "runs").mkdir(parents=True)
    (repo / "results" / "runs" / "x.jsonl").write_text("{}\n")
    assert results._git_info(str(repo / "pkg"), ("results", "nocache3"))[1] is False
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert results._git_info(str(repo / "pkg"), ("results", "nocache4"))[1] is True
    # cached once per process: same args give the first answer
    assert results._git_info(str(repo / "pkg"), ("results", "nocache3"))[1] is False


# ------------------------------------------------------------------ memory


def test_peak_memory_sees_200mb_allocation():
    # In a fresh interpreter: inside a long test session freed memory is reused without
    # growing the RSS, so the increase would depend on which tests ran before.
    code = """
import json, time, numpy as np
from ptqcore.results import PeakMemory
n = 200 * 1024 * 1024
with PeakMemory("cpu") as pm:
    buf = np.ones(n // 4, dtype=np.float32)  # written, so the pages are resident
    time.sleep(0.15)
    del buf
print(json.dumps([pm.peak_bytes, pm.peak_rss_bytes, pm.increase_bytes, pm.peak_cuda_bytes, pm.ru_maxrss_bytes]))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    peak, peak_rss, increase, cuda, maxrss = json.loads(out.strip().splitlines()[-1])
    n = 200 * 1024 * 1024
    assert peak == peak_rss
    assert peak >= n
    assert increase >= 0.95 * n
    assert cuda is None
    assert maxrss >= peak * 0.99


def test_peak_memory_without_sampling_falls_back_to_ru_maxrss():
    with PeakMemory("cpu", sample=False) as pm:
        pass
    assert pm.peak_bytes == pm.ru_maxrss_bytes > 0
    assert pm.increase_bytes is None


# ------------------------------------------------------------------ display


def test_format_table(tmp_path):
    store = ResultsStore(tmp_path)
    rows = _rows("h1", values=(12.345678, 0.6123456))
    rows[0]["quant_seconds"] = 3.14159
    store.write_run(rows)
    text = format_table(store.table())
    assert "12.35" in text and "0.6123" in text and "12.345678" not in text
    assert "w3g128" in text and "method_config" not in text
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["model", "method", "setting"]
    narrow = format_table(store.table(), columns=["metric", "value"])
    assert narrow.splitlines()[0].split() == ["metric", "value"]
    with pytest.raises(KeyError, match="available"):
        format_table(store.table(), columns=["nope"])
