"""Peak private memory (USS) of the processes this benchmark started, sampled in a thread.

Only descendants of this (driver) process are looked at, so other people's Spark or Ray on the
same machine are never counted. Each process falls in one category:

* ``jvm``: the Spark driver/executor JVM (``local[n]``: one process);
* ``spark_py``: ``pyspark.daemon`` and the Python workers it forks;
* ``ray_actors``: Ray worker processes running an actor (``ray::ModelWorker``, ...);
* ``ray_system``: ``gcs_server``, ``raylet``, Ray's agents and monitors, idle Ray workers;
* ``inproc``: the child process of contender (a).

The driver process itself is not counted (it holds the generated data, not the serving path).
USS counts pages mapped by one process only: the Ray object store (shared memory) is reported
apart by the scenarios that pin data in it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

CATEGORIES = ("jvm", "spark_py", "ray_actors", "ray_system", "inproc")
_RAY_SYSTEM_WORKERS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def classify(proc: psutil.Process, inproc_pids: set[int]) -> str | None:
    """The category of one descendant process, or None to ignore it."""
    try:
        if proc.pid in inproc_pids:
            return "inproc"
        name = proc.name()
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    line = " ".join(cmd)
    if name == "java" or (cmd and cmd[0].endswith("/java")):
        return "jvm"
    if "pyspark.daemon" in line or "pyspark.worker" in line:
        return "spark_py"
    title = cmd[0] if cmd else name
    if title.startswith("ray::"):
        return "ray_system" if title.startswith(_RAY_SYSTEM_WORKERS) else "ray_actors"
    if name in ("gcs_server", "raylet") or "/ray/" in line:
        return "ray_system"
    return None


def descendants(root: psutil.Process | None = None) -> list[psutil.Process]:
    root = root or psutil.Process(os.getpid())
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass(frozen=True)
class Sample:
    """USS per category, and each process's category and cumulative CPU seconds."""

    uss: dict[str, int]
    cpu: dict[int, tuple[str, float]]
    procs: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (category, USS)


def snapshot(inproc_pids: set[int] | None = None) -> Sample:
    """USS in bytes per category and CPU seconds per process, right now."""
    uss = dict.fromkeys(CATEGORIES, 0)
    cpu: dict[int, tuple[str, float]] = {}
    procs: dict[int, tuple[str, int]] = {}
    pids = inproc_pids or set()
    for proc in descendants():
        cat = classify(proc, pids)
        if cat is None:
            continue
        try:
            with proc.oneshot():
                mem = proc.memory_full_info().uss
                t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        uss[cat] += mem
        cpu[proc.pid] = (cat, t.user + t.system)
        procs[proc.pid] = (cat, mem)
    return Sample(uss, cpu, procs)


@dataclass
class Window:
    """Samples taken while one contender ran."""

    samples: list[Sample] = field(default_factory=list)

    def peak(self, categories: Iterable[str], exclude: Iterable[int] = ()) -> tuple[int, dict[str, int]]:
        """The largest sum over ``categories`` of one sample, and that sample's breakdown;
        processes in ``exclude`` (e.g. another pool's actors) are left out."""
        cats = tuple(categories)
        skip = set(exclude)
        best, at = 0, dict.fromkeys(cats, 0)
        for s in self.samples:
            if skip:
                split = dict.fromkeys(cats, 0)
                for pid, (cat, mem) in s.procs.items():
                    if cat in split and pid not in skip:
                        split[cat] += mem
            else:
                split = {c: s.uss[c] for c in cats}
            total = sum(split.values())
            if total > best:
                best, at = total, split
        return best, at

    def cpu_seconds(self, exclude: Iterable[int] = ()) -> dict[str, float]:
        """CPU seconds used per category during the window: for each process, the last value
        seen minus the first (minus 0 for a process that started inside the window)."""
        if not self.samples:
            return {}
        skip = set(exclude)
        start = self.samples[0].cpu
        last: dict[int, tuple[str, float]] = {}
        for s in self.samples:
            last.update(s.cpu)
        out = dict.fromkeys(CATEGORIES, 0.0)
        for pid, (cat, t) in last.items():
            if pid in skip:
                continue
            base = start[pid][1] if pid in start else 0.0
            out[cat] += max(0.0, t - base)
        return out


class Sampler:
    """A daemon thread that snapshots USS every ``interval_s`` into the open windows."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.inproc_pids: set[int] = set()
        self._windows: list[Window] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uss-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if not self._windows:
                    continue
            s = snapshot(self.inproc_pids)
            with self._lock:
                for w in self._windows:
                    w.samples.append(s)

    @contextmanager
    def window(self) -> Iterator[Window]:
        """Collect samples while the block runs (one at the start and end too)."""
        w = Window()
        w.samples.append(snapshot(self.inproc_pids))
        with self._lock:
            self._windows.append(w)
        try:
            yield w
        finally:
            with self._lock:
                self._windows.remove(w)
            w.samples.append(snapshot(self.inproc_pids))


def spark_python_workers() -> list[psutil.Process]:
    """The Python workers forked by this driver's ``pyspark.daemon`` (not the daemon itself)."""
    out = []
    for proc in descendants():
        try:
            if "pyspark.daemon" in " ".join(proc.cmdline()):
                out.extend(proc.children())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def reap_idle_python_workers(*, settle_s: float = 0.3) -> int:
    """Do what Spark's idle-worker monitor does after a minute, now: kill the idle workers.

    Spark's ``PythonWorkerFactory`` kills a Python worker that stayed in its idle pool for
    ``IDLE_WORKER_TIMEOUT_NS`` (hard-coded to one minute in Spark 4.2, checked every 10 s) by
    asking ``pyspark.daemon`` to SIGKILL it; the JVM then discards the dead worker ("process
    from idle queue is dead") and forks a fresh one for the next task. Call only between jobs,
    when every worker is idle. Returns how many were killed.
    """
    workers = spark_python_workers()
    for w in workers:
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    for w in workers:
        try:
            w.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
            pass
    time.sleep(settle_s)
    return len(workers)
