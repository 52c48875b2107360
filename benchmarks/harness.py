"""Running contenders side by side: warm-up, alternating rounds, medians, memory windows.

A :class:`Contender` is one way to compute the same predictions (``run`` makes one full pass and
returns a :class:`Pass`). :func:`measure` warms every contender up, then runs ``rounds`` rounds;
round ``r`` starts at contender ``r`` (rotation), so no contender always runs first or last
after the same neighbour. With ``cold_rounds`` every round of a contender starts from fresh Spark
Python workers (idle ones are killed) and a warm-up pass: used where the contenders would
otherwise share state through reused workers (S2: each would keep its own 1 GB copy).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.memory import Sampler, Window, reap_idle_python_workers

log = logging.getLogger(__name__)

SPARK_ONLY = ("jvm", "spark_py")
WITH_RAY = ("jvm", "spark_py", "ray_actors", "ray_system")
INPROC = ("inproc",)


@dataclass(frozen=True)
class Pass:
    """One full pass over the scenario's rows."""

    seconds: float
    rows: int
    checksum: int | float | None
    started: float = 0.0  # time.time() at the start, to match Ray's timeline


@dataclass
class Contender:
    key: str
    label: str
    run: Callable[[], Pass]
    categories: tuple[str, ...] = SPARK_ONLY
    predicts: bool = True  # False for the no-op transport contenders
    warm: Callable[[], Pass] | None = None  # a smaller warm-up pass; ``run`` when None
    exclude_pids: frozenset[int] = frozenset()  # processes not counted (another pool's actors)


@dataclass
class Result:
    """What one contender measured in one scenario."""

    key: str
    label: str
    passes: list[Pass] = field(default_factory=list)
    warmups: list[Pass] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    pass_windows: list[Window] = field(default_factory=list)
    categories: tuple[str, ...] = SPARK_ONLY
    predicts: bool = True
    checksum_ok: bool | None = None
    extra_bytes: int = 0  # memory not visible as USS (e.g. Ray object store), added to the peak
    extra_label: str = "object store"  # what extra_bytes is, in the report's breakdown
    exclude_pids: frozenset[int] = frozenset()
    actor_busy: float | None = None  # share of the measured passes the actors spent in predict
    notes: list[str] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [p.rows / p.seconds for p in self.passes if p.seconds > 0]

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    @property
    def median_seconds(self) -> float:
        return statistics.median(p.seconds for p in self.passes) if self.passes else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the rates: how noisy the runs were."""
        r = self.rates
        return (max(r) - min(r)) / statistics.median(r) if len(r) > 1 else 0.0

    @property
    def checksum(self) -> int | float | None:
        return self.passes[-1].checksum if self.passes else None

    def cpu_per_row(self) -> tuple[float, dict[str, float]]:
        """CPU seconds per row over the measured passes (all categories of the contender), and
        the split by category; robust to a busy machine where wall time is not."""
        rows = sum(p.rows for p in self.passes)
        if not rows or not self.pass_windows:
            return float("nan"), {}
        split: dict[str, float] = {}
        for w in self.pass_windows:
            for cat, sec in w.cpu_seconds(self.exclude_pids).items():
                if cat in self.categories:
                    split[cat] = split.get(cat, 0.0) + sec
        per = {c: v / rows for c, v in split.items()}
        return sum(per.values()), per

    def peak(self) -> tuple[int, dict[str, int]]:
        """Peak summed USS over every window of this contender (+ ``extra_bytes``)."""
        best, at = 0, {}
        for w in self.windows:
            total, breakdown = w.peak(self.categories, self.exclude_pids)
            if total > best:
                best, at = total, breakdown
        return best + self.extra_bytes, at


def checksums_equal(a: int | float | None, b: int | float | None, *, rel: float = 1e-9) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-6)


def measure(
    contenders: Sequence[Contender],
    *,
    rounds: int,
    sampler: Sampler,
    cold_rounds: bool = False,
    warmup: bool = True,
) -> dict[str, Result]:
    """Run every contender ``rounds`` times, alternating, after a warm-up (see module doc)."""
    results = {
        c.key: Result(c.key, c.label, categories=c.categories, predicts=c.predicts,
                      exclude_pids=c.exclude_pids)
        for c in contenders
    }

    def one(c: Contender, *, warm: bool) -> None:
        fn = (c.warm or c.run) if warm else c.run
        with sampler.window() as w:
            p = fn()
        res = results[c.key]
        res.windows.append(w)
        if warm:
            res.warmups.append(p)
        else:
            res.passes.append(p)
            res.pass_windows.append(w)
        log.info(
            "  %-28s %s %8d rows in %7.2fs = %10.0f rows/s  checksum=%s",
            c.label, "warm-up" if warm else "run    ", p.rows, p.seconds,
            p.rows / p.seconds if p.seconds else float("nan"), p.checksum,
        )

    if warmup and not cold_rounds:
        for c in contenders:
            one(c, warm=True)
    n = len(contenders)
    for r in range(rounds):
        order = [contenders[(r + i) % n] for i in range(n)]
        for c in order:
            if cold_rounds:
                reap_idle_python_workers()
                if warmup:
                    one(c, warm=True)
            one(c, warm=False)
    return results


def check_against(results: dict[str, Result], reference: str, *, rel: float = 1e-9) -> None:
    """Mark each predicting contender's checksum as equal (or not) to the reference's."""
    ref = results[reference].checksum
    for r in results.values():
        if r.predicts:
            r.checksum_ok = all(checksums_equal(p.checksum, ref, rel=rel) for p in r.passes)


class InProcess:
    """Contender (a) in a child process (``benchmarks.inproc``), kept alive across rounds."""

    def __init__(self, kind: str, model_path: str, data_path: str, *, sampler: Sampler, cwd: Path) -> None:
        self._sampler = sampler
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.inproc", kind, model_path, data_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(cwd),
        )
        sampler.inproc_pids.add(self._proc.pid)
        self._read()  # ready

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"contender (a) exited with {self._proc.wait()}; see its stderr above")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def run(self) -> Pass:
        assert self._proc.stdin is not None
        self._proc.stdin.write("run\n")
        self._proc.stdin.flush()
        out = self._read()
        return Pass(seconds=out["seconds"], rows=out["rows"], checksum=out["checksum"])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._sampler.inproc_pids.discard(self._proc.pid)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out
