"""Per-session data of the app: the run history (leaderboard) and the latest exported files.

Gradio's ``gr.State`` is copied per event and serialised with the page, so tensors never go there. Instead a
module-level :class:`SessionStore` maps ``request.session_hash`` to a :class:`SessionData` (plain Python values
and file paths only) and the app frees an entry in ``demo.unload``.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


@dataclass
class RunRecord:
    """One merge + evaluation shown in the session leaderboard.

    ``accuracy`` / ``normalized`` map task name -> value in % (normalized = merged / individual expert).
    """

    run: int
    method: str
    settings: str
    experts: tuple[str, ...]
    accuracy: dict[str, float]
    normalized: dict[str, float]
    seconds: float
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def avg_accuracy(self) -> float:
        return sum(self.accuracy.values()) / max(1, len(self.accuracy))

    @property
    def avg_normalized(self) -> float:
        return sum(self.normalized.values()) / max(1, len(self.normalized))


def describe_settings(hparams: Mapping[str, Any], calibrate: str | None = None,
                      calibrate_hparams: Mapping[str, Any] | None = None,
                      preferences: Mapping[str, float] | None = None, seed: int | None = None, *,
                      automatic: Mapping[str, float] | None = None,
                      calibrate_automatic: Mapping[str, float] | None = None) -> str:
    """A compact one-line description of a run's settings for the leaderboard (``seed``: given for a method that
    draws from it). An automatic value (``None``) shows the value it took where ``automatic`` (the method's) or
    ``calibrate_automatic`` gives it: TSV-M's 1/T on 8 and on 4 experts read apart.

    Example:
        >>> describe_settings({"alpha": 0.3, "k": None}, "svc", {"beta": 1.0})
        'alpha=0.3, k=auto | svc(beta=1)'
        >>> describe_settings({"p": 0.8}, seed=3)
        'p=0.8 | seed 3'
        >>> describe_settings({"rank_fraction": None, "alpha": 1.0}, automatic={"rank_fraction": 0.125})
        'rank_fraction=0.125 (auto), alpha=1'
    """

    def fmt(d: Mapping[str, Any], auto: Mapping[str, float] | None) -> str:
        def shown(k: str, v: Any) -> str:
            if v is None:
                return f"{auto[k]:g} (auto)" if auto and k in auto else "auto"
            return f"{v:g}" if isinstance(v, float) else str(v)

        return ", ".join(f"{k}={shown(k, v)}" for k, v in d.items())

    text = fmt(hparams, automatic) or "defaults"
    if calibrate:
        text += f" | {calibrate}({fmt(calibrate_hparams or {}, calibrate_automatic)})"
    if preferences:
        text += " | prefs " + ", ".join(f"{k}:{v:g}" for k, v in preferences.items())
    if seed is not None:
        text += f" | seed {seed}"
    return text


@dataclass
class SessionData:
    """Everything the app remembers for one browser session (no tensors)."""

    runs: list[RunRecord] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    last_recipe: dict[str, Any] | None = None
    stop_requested: bool = False
    job: tuple[str, object] | None = None   # the job running for this session, (kind, its own mark), for Stop
    stops: int = 0   # how many times Stop was pressed
    armed: int = 0   # ``stops`` when Merge or Optimise was last clicked: a job starts only if it has not changed
    #: the kinds of the jobs clicked that have not started (queued); a set, so that a click whose job never started
    #: (the page closed first) leaves one stale kind at most, which the next job of that kind clears
    waiting: set[str] = field(default_factory=set)
    touched: float = field(default_factory=time.time)
    made: int = 0   # runs numbered so far: a removed run's number is not given again
    #: held by Stop and by a merge recording its run: the run is recorded only if Stop did not come first
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_run(self, **kwargs: Any) -> RunRecord:
        self.made += 1
        record = RunRecord(run=self.made, **kwargs)
        self.runs.append(record)
        return record

    def remove_run(self, run: Any) -> RunRecord | None:
        """Take the run numbered ``run`` off the leaderboard (None if there is none); the next run is numbered on
        from the last one made, so a number names one run for the whole session.

        Example:
            >>> s = SessionData()
            >>> for m in ("ta", "ties"):
            ...     _ = s.add_run(method=m, settings="", experts=("a",), accuracy={"a": 50.0}, normalized={"a": 60.0},
            ...                   seconds=1.0)
            >>> s.remove_run(1).method, s.remove_run(1), [r.run for r in s.runs]
            ('ta', None, [2])
            >>> s.add_run(method="dare", settings="", experts=("a",), accuracy={}, normalized={}, seconds=1.0).run
            3
        """
        record = self.run_record(run)
        if record is not None:
            self.runs.remove(record)
        return record

    def run_choices(self) -> list[tuple[str, int]]:
        """``(label, run)`` for every run, the latest first: the runs whose settings the app can load again.

        Example:
            >>> s = SessionData()
            >>> _ = s.add_run(method="ta", settings="alpha=0.3", experts=("a", "b"), accuracy={"a": 50.0, "b": 40.0},
            ...               normalized={"a": 62.5, "b": 50.0}, seconds=1.0)
            >>> s.run_choices()
            [('#1 · ta (alpha=0.3) · 2 experts · 56.2% normalized', 1)]
        """
        return [(f"#{r.run} · {r.method} ({r.settings}) · {len(r.experts)} expert{'' if len(r.experts) == 1 else 's'}"
                 f" · {r.avg_normalized:.1f}% normalized", r.run) for r in reversed(self.runs)]

    def run_record(self, run: Any) -> RunRecord | None:
        """The run numbered ``run`` (None if there is none)."""
        return next((r for r in self.runs if r.run == run), None)

    def leaderboard(self, tasks: Sequence[str] | None = None,
                    pool: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
        """Header and rows of the leaderboard: runs over the same experts together, best average normalized accuracy
        first within each set (an average over other tasks does not compare), the larger sets first, then the
        earlier.

        Per-task columns cover ``tasks`` (default: every task seen in any run, in ``pool``'s order); a run that did
        not include a task shows an empty cell. The ``experts`` column names the set: ``all N`` where it holds every
        expert of ``pool`` (the app's suite; default: the tasks of the columns), else the tasks. Accuracies are
        percentages rounded to 0.1.

        Example:
            >>> s = SessionData()
            >>> _ = s.add_run(method="ta", settings="alpha=0.3", experts=("a", "b"), accuracy={"a": 50.0, "b": 40.0},
            ...               normalized={"a": 62.5, "b": 50.0}, seconds=1.0)
            >>> _ = s.add_run(method="ta", settings="alpha=0.3", experts=("a",), accuracy={"a": 70.0},
            ...               normalized={"a": 80.0}, seconds=1.0)
            >>> [row[:6] for row in s.leaderboard()[1]]
            [[1, 'ta', 'alpha=0.3', 'all 2', 45.0, 56.2], [2, 'ta', 'alpha=0.3', 'a', 70.0, 80.0]]
        """
        if tasks is None:   # every task seen, in the pool's order where one is given
            seen: dict[str, None] = {}
            for r in self.runs:
                seen.update(dict.fromkeys(r.accuracy))
            tasks = [t for t in (pool or ()) if t in seen] + [t for t in seen if t not in (pool or ())]
        header = ["run", "method", "settings", "experts", "avg acc %", "avg norm %", *tasks, "total s"]
        everything = tasks if pool is None else pool
        first: dict[frozenset, int] = {}
        for r in self.runs:
            first.setdefault(frozenset(r.experts), r.run)

        def order(r: RunRecord) -> tuple:
            group = frozenset(r.experts)
            return -len(group), first[group], -r.avg_normalized, r.run

        rows = []
        for r in sorted(self.runs, key=order):
            per_task = [round(r.accuracy[t], 1) if t in r.accuracy else None for t in tasks]
            named = f"all {len(r.experts)}" if set(everything) <= set(r.experts) else ", ".join(r.experts)
            rows.append([r.run, r.method, r.settings, named, round(r.avg_accuracy, 1),
                         round(r.avg_normalized, 1), *per_task, round(r.seconds, 2)])
        return header, rows

    def leaderboard_csv(self, pool: Sequence[str] | None = None) -> str:
        """The leaderboard as CSV text (one row per run, same columns as :meth:`leaderboard`)."""
        header, rows = self.leaderboard(pool=pool)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return buf.getvalue()


def leaderboard_widths(header: Sequence[str]) -> list[str]:
    """The page's widths for the leaderboard's columns (:meth:`SessionData.leaderboard`'s ``header``): the settings
    wide, every other column as wide as its name (about 8 px a character, plus the cell's padding), so that a task's
    column does not cut its name into pieces above short numbers.

    Example:
        >>> leaderboard_widths(["run", "settings", "house_numbers"])
        ['56px', '300px', '128px']
    """
    fixed = {"settings": 300, "method": 144, "experts": 110}
    return [f"{fixed.get(name, max(56, 8 * len(name) + 24))}px" for name in header]


class SessionStore:
    """Thread-safe ``session_hash -> SessionData`` map with an upper bound on the number of sessions.

    When more than ``max_sessions`` are alive (tabs closed without an unload event), the least recently used one
    is dropped, so memory stays bounded on a public Space.

    Example:
        >>> store = SessionStore(max_sessions=1)
        >>> store.get("a").files["x"] = "1"
        >>> _ = store.get("b")
        >>> "a" in store, len(store)
        (False, 1)
    """

    def __init__(self, max_sessions: int = 256, on_evict: "Callable[[str], None] | None" = None):
        self.max_sessions = max_sessions
        self.on_evict = on_evict   # called with the hash of each session dropped for room (its files to remove)
        self._data: "OrderedDict[str, SessionData]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_hash: str | None) -> SessionData:
        key = session_hash or "anonymous"
        evicted = []
        with self._lock:
            data = self._data.get(key)
            if data is None:
                data = self._data[key] = SessionData()
            self._data.move_to_end(key)
            data.touched = time.time()
            while len(self._data) > self.max_sessions:
                evicted.append(self._data.popitem(last=False)[0])
        for old in evicted if self.on_evict is not None else ():
            self.on_evict(old)
        return data

    def find(self, session_hash: str | None) -> SessionData | None:
        """The session stored for ``session_hash``, or ``None``: unlike :meth:`get`, neither made nor touched.

        Example:
            >>> store = SessionStore()
            >>> store.find("a") is None, store.find("a") is None and "a" in store
            (True, False)
            >>> store.get("a") is store.find("a")
            True
        """
        with self._lock:
            return self._data.get(session_hash or "anonymous")

    def drop(self, session_hash: str | None) -> SessionData | None:
        """Forget a session (called from ``demo.unload``); returns what was stored, if anything."""
        with self._lock:
            return self._data.pop(session_hash or "anonymous", None)

    def __contains__(self, session_hash: str) -> bool:
        return session_hash in self._data

    def __len__(self) -> int:
        return len(self._data)


def accuracy_rows(table: Mapping[str, Mapping[str, float | None]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-task results table (values in %, rounded to 0.1) plus an "average" row.

    The average of a column skips missing values (e.g. NAI where an expert does not beat zero-shot).

    Example:
        >>> accuracy_rows({"a": {"merged": 80.0, "zero_shot": 40.0, "individual": 100.0, "normalized": 80.0,
        ...                      "nai": 66.67, "kl": 0.1}})[1][-1]
        ['average', 80.0, 40.0, 100.0, 80.0, 66.7, 0.1]
    """
    cols = [("merged", "merged %"), ("zero_shot", "zero-shot %"), ("individual", "individual %"),
            ("normalized", "normalized %"), ("nai", "NAI %"), ("kl", "KL (nats)")]
    header = ["task", *(label for _, label in cols)]
    rows: list[list[Any]] = []
    for task, r in table.items():
        rows.append([task, *(None if r.get(k) is None else round(float(r[k]), 3 if k == "kl" else 1) for k, _ in cols)])
    if rows:
        avg: list[Any] = ["average"]
        for j, (k, _) in enumerate(cols, start=1):
            vals = [float(table[t][k]) for t in table if table[t].get(k) is not None]
            avg.append(round(sum(vals) / len(vals), 3 if k == "kl" else 1) if vals else None)
        rows.append(avg)
    return header, rows


def session_dir(root: str | Path, session_hash: str | None, *, create: bool = True) -> Path:
    """The per-session folder for exported files under ``root`` (the app process's folder, :func:`run_folder`),
    made unless ``create`` is false."""
    safe = "".join(c for c in (session_hash or "anonymous") if c.isalnum() or c in "-_")[:64] or "anonymous"
    path = Path(root) / "sessions" / safe
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def run_folder(parent: str | Path, pid: int | None = None) -> Path:
    """A folder under ``parent`` for the files one app process exports (its sessions' and its API's), named after the
    process (``run-<pid>-<random>``), so that a later app can tell it from a live one's (:func:`remove_dead_runs`)."""
    return Path(parent) / f"run-{os.getpid() if pid is None else pid}-{uuid.uuid4().hex[:8]}"


def remove_dead_runs(parent: str | Path) -> list[Path]:
    """Remove the :func:`run_folder` folders under ``parent`` whose process is gone (an app stopped by SIGTERM, a
    crash, a kill: its exports were left behind, up to a model's size each); returns them. A process that exists
    keeps its folder, whoever runs it (a reused process id only delays the removal)."""
    removed = []
    for folder in sorted(Path(parent).glob("run-*-*")):
        try:
            pid = int(folder.name.split("-")[1])
        except ValueError:
            continue
        if pid == os.getpid() or _process_exists(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):   # another user's process, or no valid id: left alone
        return True
    return True
