"""Per-session run history, leaderboard/CSV export, the bounded session store and the results table."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import threading
from pathlib import Path

from studio.ui.session import (SessionData, SessionStore, accuracy_rows, describe_settings, remove_dead_runs,
                                run_folder, session_dir)


def _run(sess: SessionData, method: str, acc: dict, norm: dict, seconds: float = 1.0):
    return sess.add_run(method=method, settings=describe_settings({"alpha": 0.3}), experts=tuple(acc),
                        accuracy=acc, normalized=norm, seconds=seconds)


def test_leaderboard_is_sorted_by_average_normalized_accuracy():
    sess = SessionData()
    _run(sess, "task_arithmetic", {"a": 60.0, "b": 40.0}, {"a": 70.0, "b": 50.0})
    _run(sess, "ties", {"a": 70.0, "b": 50.0}, {"a": 80.0, "b": 60.0})
    _run(sess, "weight_average", {"a": 50.0}, {"a": 55.0})
    header, rows = sess.leaderboard()
    assert header == ["run", "method", "settings", "experts", "avg acc %", "avg norm %", "a", "b", "total s"]
    assert [r[0] for r in rows] == [2, 1, 3]
    assert rows[0][4:7] == [60.0, 70.0, 70.0]
    assert rows[2][7] is None  # run 3 did not include task b


def test_leaderboard_csv_round_trips():
    sess = SessionData()
    _run(sess, "task_arithmetic", {"a": 61.25, "b": 40.0}, {"a": 70.0, "b": 50.0}, seconds=2.345)
    _run(sess, "weight_average", {"a": 50.0}, {"a": 55.0})
    parsed = list(csv.reader(io.StringIO(sess.leaderboard_csv())))
    header, rows = sess.leaderboard()
    assert parsed[0] == header
    assert parsed[1:] == [["" if v is None else str(v) for v in row] for row in rows]


def test_describe_settings_is_compact_and_shows_auto():
    text = describe_settings({"alpha": 1.0, "k": None}, "svc", {"alpha": None}, {"a": 2.0, "b": 1.0})
    assert text == "alpha=1, k=auto | svc(alpha=auto) | prefs a:2, b:1"
    assert describe_settings({}) == "defaults"


def test_store_bounds_sessions_and_frees_on_drop():
    store = SessionStore(max_sessions=2)
    store.get("s1").files["w"] = "x"
    store.get("s2")
    store.get("s1")  # s1 is now the most recent
    store.get("s3")  # evicts s2, the least recently used
    assert "s1" in store and "s3" in store and "s2" not in store
    dropped = store.drop("s1")
    assert dropped is not None and dropped.files == {"w": "x"}
    assert "s1" not in store and store.drop("s1") is None


def test_store_is_safe_under_concurrent_sessions():
    store = SessionStore(max_sessions=1000)

    def worker(i: int) -> None:
        for j in range(50):
            _run(store.get(f"s{i}"), "ta", {"a": float(j)}, {"a": float(j)})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 8
    assert all(len(store.get(f"s{i}").runs) == 50 for i in range(8))
    assert [r.run for r in store.get("s0").runs] == list(range(1, 51))


def test_session_dir_stays_under_the_root(tmp_path: Path):
    for name in ["abc123", "../../etc", "a/b\\c", "", None]:
        path = session_dir(tmp_path, name)
        assert path.is_dir() and tmp_path.resolve() in path.resolve().parents
    assert not session_dir(tmp_path, "new", create=False).exists()


def test_only_the_run_folders_of_processes_that_are_gone_are_removed(tmp_path: Path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        folders = {name: run_folder(tmp_path, pid) for name, pid in
                   (("gone", int(gone.stdout)), ("alive", alive.pid), ("this", None))}
        for folder in folders.values():
            (folder / "api").mkdir(parents=True)
        (tmp_path / "run-notapid-x").mkdir()
        assert remove_dead_runs(tmp_path) == [folders["gone"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [folders["alive"].name, folders["this"].name, "run-notapid-x"])
    finally:
        alive.communicate(b"")
    assert remove_dead_runs(tmp_path) == [folders["alive"]]


def test_a_session_dropped_for_room_is_handed_to_on_evict():
    dropped: list[str] = []
    store = SessionStore(max_sessions=2, on_evict=dropped.append)
    for name in ("a", "b", "a", "c", "d"):
        store.get(name)
    assert dropped == ["b", "a"] and "c" in store and "d" in store


def test_accuracy_rows_average_skips_missing_values():
    table = {"a": {"merged": 80.0, "zero_shot": 40.0, "individual": 100.0, "normalized": 80.0, "nai": None, "kl": 0.2},
             "b": {"merged": 60.0, "zero_shot": 20.0, "individual": 80.0, "normalized": 75.0, "nai": 66.666, "kl": 0.1}}
    header, rows = accuracy_rows(table)
    assert header[0] == "task" and len(header) == 7
    assert rows[0] == ["a", 80.0, 40.0, 100.0, 80.0, None, 0.2]
    assert rows[-1] == ["average", 70.0, 30.0, 90.0, 77.5, 66.7, 0.15]


def test_leaderboard_ranks_runs_only_against_runs_over_the_same_experts():
    """An average over one task does not compare with an average over eight: a run of Iso-C + SVC on digits alone
    (70.9) was ranked above TSV-M on all eight (65.1). Runs over one expert set stay together, best first within it,
    the larger sets first, and the experts column names the set."""
    sess = SessionData()
    eight = [f"t{i}" for i in range(8)]
    _run(sess, "tsv_m", dict.fromkeys(eight, 60.0), dict.fromkeys(eight, 65.1))
    _run(sess, "iso_c", dict.fromkeys(["t0", "t3", "t5"], 60.0), dict.fromkeys(["t0", "t3", "t5"], 65.0))
    _run(sess, "iso_c", {"t0": 70.0}, {"t0": 70.9})
    _run(sess, "ties", dict.fromkeys(eight, 55.0), dict.fromkeys(eight, 58.0))
    _run(sess, "task_arithmetic", dict.fromkeys(["t5", "t3", "t0"], 62.0), dict.fromkeys(["t5", "t3", "t0"], 67.0))
    _run(sess, "weight_average", dict.fromkeys(eight, 58.0), dict.fromkeys(eight, 66.0))
    header, rows = sess.leaderboard()
    assert [r[0] for r in rows] == [6, 1, 4, 5, 2, 3]   # the order of the experts does not make another set
    assert [r[3] for r in rows] == ["all 8"] * 3 + ["t5, t3, t0", "t0, t3, t5", "t0"]


def test_all_in_the_experts_column_means_the_whole_pool():
    """Runs on three of eight experts read "all 3" when no run had merged the others: the app names its suite."""
    sess = SessionData()
    three = ["t0", "t1", "t2"]
    _run(sess, "tsv_m", dict.fromkeys(three, 60.0), dict.fromkeys(three, 65.0))
    assert sess.leaderboard()[1][0][3] == "all 3"                                    # the tasks seen, by default
    assert sess.leaderboard(pool=[f"t{i}" for i in range(8)])[1][0][3] == "t0, t1, t2"
    assert "t0, t1, t2" in sess.leaderboard_csv(pool=[f"t{i}" for i in range(8)])


def test_the_task_columns_follow_the_pools_order():
    """They followed the order the session first merged each task in (aerial_scenes ... before digits)."""
    sess = SessionData()
    _run(sess, "tsv_m", dict.fromkeys(["t5", "t6"], 60.0), dict.fromkeys(["t5", "t6"], 65.0))
    _run(sess, "tsv_m", dict.fromkeys(["t0", "t5"], 60.0), dict.fromkeys(["t0", "t5"], 65.0))
    assert sess.leaderboard()[0][6:9] == ["t5", "t6", "t0"]
    assert sess.leaderboard(pool=[f"t{i}" for i in range(8)])[0][6:9] == ["t0", "t5", "t6"]
