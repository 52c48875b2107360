"""The model actor: one loaded copy of the model, serving Arrow batches (over Ray calls, and over
Arrow Flight for pools registered with ``executor_transport="flight"``, see :mod:`spark_ray_udf._flight`).

:class:`ModelWorker` (run as a Ray actor, see :func:`remote_worker_class`) writes the model files
into its own temporary folder, read straight from the Delta version's Parquet files
(``WorkerSpec.files``) or, when the actors cannot reach the table's storage, from chunks the
driver put in the object store; it calls ``init_func`` once and serves ``predict`` calls on Arrow
batches. An error in ``init_func`` is kept and raised by ``ready()`` with the actor's traceback.

Control calls (``stats``, ``load``, ``pid``) run in their own concurrency group, so they never
queue behind ``predict`` calls. ``predict`` calls run in a group of ``WORK_THREADS`` threads and
take turns in arrival order (one batch computes at a time, as before): the actor itself then
holds its queue, and ``load()`` tells every caller how long it is. The actor counts what it serves
(rows, batches, errors, busy time, latency by door) and exports the same counters as Ray
metrics (``ray.util.metrics``, on Ray's metrics endpoint).

This module never talks to Spark.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import ray

from spark_ray_udf import _shared
from spark_ray_udf._arrow import NullPolicy, empty_result, prepare_inputs, to_result_array
from spark_ray_udf._contract import WorkerInfo
from spark_ray_udf.errors import (
    InputError,
    ModelApplyError,
    ModelInitError,
    ModelTableError,
    SparkRayUdfError,
)
from spark_ray_udf.store import Manifest, materialize, rows_from_files, write_model

log = logging.getLogger(__name__)
T = TypeVar("T")

CONTROL_GROUP = "control"  # stats, loads and pings: never behind predict calls
WORK_GROUP = "work"  # predict calls: accepted at once, computed one at a time in arrival order
WORK_THREADS = 16  # calls an actor accepts at once (and can count for load()); more wait in Ray
STOP_DRAIN_S = 120.0  # how long stop() waits for the calls it accepted to finish
DOORS = ("sql", "http")
_LATENCY_WINDOW = 2048  # batch latencies kept per actor for the percentiles


def qualname(func: Callable[..., Any]) -> str:
    """A readable name for a user function, for error messages.

    >>> qualname(qualname)
    'spark_ray_udf.worker.qualname'
    """
    mod = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{mod}.{name}"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a model worker needs, built once on the driver."""

    function: str
    table: str
    version: int
    manifest: Manifest
    init_func: Callable[[str, Mapping[str, Any]], Any]
    apply_func: Callable[..., Any]
    conf: Mapping[str, Any]
    return_type: pa.DataType
    on_null: NullPolicy
    work_root: str  # the pool's folder name; each node puts it under its own node_work_root()
    fetch_timeout_s: float
    with_version: bool = False
    files: tuple[str, ...] = ()  # read the model from these Parquet files; else chunk refs
    share_files: bool = True  # one folder per machine for these bytes (see spark_ray_udf._shared)
    flight_token: str = ""  # set: also serve batches over Arrow Flight (spark_ray_udf._flight)

    @property
    def where(self) -> str:
        return f"{self.table}@v{self.version}"


def percentiles(values: Any, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of ``values`` (None when empty).

    >>> percentiles([1.0, 2.0, 3.0, 4.0])["p50"]
    2.5
    >>> percentiles([])["p99"] is None
    True
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


class _Counters:
    """What one actor served, by door; thread-safe (predict and stats run on other threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows = dict.fromkeys(DOORS, 0)
        self.batches = dict.fromkeys(DOORS, 0)
        self.errors = dict.fromkeys(DOORS, 0)
        self.busy_s = 0.0
        self.in_flight = 0
        self.crossed = 0  # batches sent by a caller on another node
        self.latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "rows": dict(self.rows),
                "batches": dict(self.batches),
                "errors": dict(self.errors),
                "busy_s": self.busy_s,
                "in_flight": self.in_flight,
                "crossed_nodes": self.crossed,
                "latency_s": percentiles(self.latencies),
                "latency_window": list(self.latencies),
            }


class _Turns:
    """One batch computes at a time, in the order the calls arrived, always on the same thread.

    The calls arrive on the work group's threads (and the Flight server's); each hands its
    batch to one compute thread and waits. One thread, not a lock: a lock would hand itself to
    any waiter (a batch could wait behind later ones), and model code run from many threads
    makes glibc keep one malloc arena per thread, which grows the actor's memory.

    >>> t = _Turns()
    >>> t.run(lambda: t.waiting())
    1
    >>> t.waiting()
    0
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spark-ray-udf-compute")
        self._lock = threading.Lock()
        self._held = 0

    def waiting(self) -> int:
        """Calls handed over and not finished: computing or waiting their turn."""
        with self._lock:
            return self._held

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the compute thread, after the calls handed over before it."""
        with self._lock:
            self._held += 1
        try:
            return self._pool.submit(fn).result()
        finally:
            with self._lock:
                self._held -= 1


class _Metrics:
    """The counters as Ray metrics (Prometheus names ``ray_spark_ray_udf_*``)."""

    def __init__(self, function: str, index: int) -> None:
        from ray.util.metrics import Counter, Histogram

        keys = ("function", "door")
        self.tags = {"function": function}
        self.index = index
        self.rows = Counter("spark_ray_udf_rows", "Rows predicted, by door", tag_keys=keys)
        self.batches = Counter("spark_ray_udf_batches", "Batches predicted, by door", tag_keys=keys)
        self.errors = Counter("spark_ray_udf_errors", "Batches that failed, by door", tag_keys=keys)
        self.latency = Histogram(
            "spark_ray_udf_batch_latency_s",
            "Time apply_func took for one batch, in seconds",
            boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
            tag_keys=keys,
        )

    def record(self, door: str, rows: int, seconds: float, failed: bool) -> None:
        tags = {**self.tags, "door": door}
        if failed:
            self.errors.inc(1, tags)
            return
        self.rows.inc(rows, tags)
        self.batches.inc(1, tags)
        self.latency.observe(seconds, tags)


class ModelWorker:
    """A Ray actor holding one loaded copy of the model (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, index: int, chunks: dict[tuple[str, int], Any]) -> None:
        self._spec = spec
        self._index = index
        self._model: Any = None
        self._flight: Any = None  # the Arrow Flight server (spec.flight_token set)
        self._error: SparkRayUdfError | None = None
        self._counters = _Counters()
        self._turns = _Turns()
        self._started = time.time()
        self._node = str(ray.get_runtime_context().get_node_id() or "")
        self._load_seconds = 0.0
        try:
            self._metrics: _Metrics | None = _Metrics(spec.function, index)
        except Exception:  # metrics are optional: never fail a load on them, but say so
            log.warning("%s: Ray metrics unavailable on actor %d", spec.function, index, exc_info=True)
            self._metrics = None
        root = node_work_root(spec.work_root)  # this node's temp folder, not the driver's
        remove_stale_folders(root.parent)
        _shared.sweep()
        root.mkdir(parents=True, exist_ok=True)
        self._dir = ""
        atexit.register(self._cleanup)
        start = time.monotonic()
        try:
            if spec.share_files:
                key = _shared.folder_key(spec.table, spec.version, spec.manifest)
                self._dir = str(_shared.acquire(
                    key, spec.manifest, lambda d: self._fetch(chunks, str(d)),
                    timeout_s=spec.fetch_timeout_s, where=spec.where,
                ))
            else:
                self._dir = tempfile.mkdtemp(prefix=f"actor{index}-pid{os.getpid()}-", dir=root)
                self._fetch(chunks, self._dir)
        except SparkRayUdfError as exc:
            self._error = exc
            return
        except Exception:  # storage or object store read failed: report with the traceback
            source = "its Delta files" if spec.files else "the Ray object store"
            self._error = ModelInitError(
                f"{spec.function}: actor {index} (pid {os.getpid()}) could not fetch the files of "
                f"{spec.where} from {source}:\n{traceback.format_exc()}"
            )
            return
        try:
            self._model = spec.init_func(self._dir, MappingProxyType(dict(spec.conf)))
        except BaseException:
            self._error = ModelInitError(
                f"{spec.function}: init_func {qualname(spec.init_func)} raised on actor {index} "
                f"(pid {os.getpid()}) while loading {spec.where}; fix init_func or the model "
                f"files. The actor's traceback:\n{traceback.format_exc()}"
            )
        self._load_seconds = time.monotonic() - start
        if spec.flight_token and self._error is None:
            self._start_flight()

    def _start_flight(self) -> None:
        """Serve ``predict`` over Arrow Flight too, on this node's IP, a port the OS picks."""
        from spark_ray_udf._flight import PORTS_ENV, port_range, start_server

        spec = self._spec
        try:
            self._flight = start_server(
                ray.util.get_node_ip_address(), spec.flight_token, who=f"{spec.function} actor {self._index}",
                predict=lambda columns, offset, partition: self.predict(columns, offset, partition, "sql"),
                load=self._calls_held,
                ports=port_range(os.environ.get(PORTS_ENV)),
            )
        except Exception:  # a port or bind failure: the pool's start reports it
            self._error = ModelInitError(
                f"{spec.function}: actor {self._index} (pid {os.getpid()}) could not start its "
                f"Arrow Flight server on {ray.util.get_node_ip_address()}; check that the node "
                f"can bind a TCP port there. The actor's traceback:\n{traceback.format_exc()}"
            )

    def _fetch(self, chunks: dict[tuple[str, int], Any], dest: str) -> None:
        spec = self._spec
        if not spec.files:
            materialize(
                spec.manifest,
                lambda p, i: ray.get(chunks[(p, i)], timeout=spec.fetch_timeout_s),
                dest,
                where=spec.where,
            )
            return
        rows = rows_from_files(spec.files, where=spec.where)
        # checked against the manifest the driver checked, from the first row on
        manifest = write_model(rows, dest, where=spec.where, expected=spec.manifest)
        # pyarrow's allocator keeps the freed read buffers (~60 MB): give them back before the
        # model is loaded, for the actor's whole life.
        pa.default_memory_pool().release_unused()
        if manifest != spec.manifest:
            raise ModelTableError(
                f"{spec.where}: the manifest read by the actor differs from the one read at "
                "registration; the table's files were rewritten: register the model again"
            )

    def ready(self) -> WorkerInfo:
        """Raise the load error, if any; otherwise describe this actor."""
        if self._error is not None:
            raise self._error
        ctx = ray.get_runtime_context()
        return WorkerInfo(
            index=self._index,
            pid=os.getpid(),
            node_ip=ray.util.get_node_ip_address(),
            model_dir=self._dir,
            load_seconds=self._load_seconds,
            version=self._spec.version,
            node_id=str(ctx.get_node_id()),
            name=str(ctx.get_actor_name() or ""),
            actor_id=str(ctx.get_actor_id() or ""),
            flight_uri=self._flight.uri if self._flight is not None else "",
        )

    @ray.method(concurrency_group=WORK_GROUP)
    def predict(
        self,
        columns: list[pa.Array],
        row_offset: int,
        partition: int | None = None,
        door: str = "sql",
        caller_node: str = "",
    ) -> pa.Array:
        """Run ``apply_func`` on one Arrow batch and return the Arrow result.

        ``row_offset`` is the batch's first row within the Spark task's partition (``partition``,
        the task's ``spark_partition_id()``), so errors name rows as a user can find them;
        ``door`` (``"sql"`` or ``"http"``) and ``caller_node`` (the caller's Ray node id) are
        counted in :meth:`stats`.
        """
        if self._error is not None:
            raise self._error
        door = door if door in DOORS else "sql"
        c = self._counters
        n_rows = len(columns[0]) if columns else 0
        with c.lock:
            c.in_flight += 1
            if caller_node and caller_node != self._node:
                c.crossed += 1
        failed = True
        start = time.perf_counter()
        started: list[float] = []

        def compute() -> pa.Array:
            started.append(time.perf_counter())  # busy time and latency: the compute, not the wait
            return self._predict(columns, row_offset, partition, n_rows)

        try:
            out = self._turns.run(compute)  # Ray and Flight calls alike, one at a time, in order
            failed = False
            return out
        except (InputError, ModelApplyError) as exc:
            raise _in_partition(exc, partition) from None
        finally:
            seconds = time.perf_counter() - (started[0] if started else start)
            with c.lock:
                c.in_flight -= 1
                c.busy_s += seconds
                if failed:
                    c.errors[door] += 1
                else:
                    c.rows[door] += n_rows
                    c.batches[door] += 1
                    c.latencies.append(seconds)
            if self._metrics is not None:
                self._metrics.record(door, n_rows, seconds, failed)

    def _predict(
        self, columns: list[pa.Array], row_offset: int, partition: int | None, n_rows: int
    ) -> pa.Array:
        spec = self._spec
        label = spec.function
        if n_rows == 0:
            return self._with_version(empty_result(spec.return_type)) if spec.with_version else (
                empty_result(spec.return_type)
            )
        arrays, kept = prepare_inputs(
            columns, function=label, on_null=spec.on_null, row_offset=row_offset
        )
        if kept is not None and not kept.any():
            nulls = pa.nulls(n_rows, spec.return_type)
            return self._with_version(nulls) if spec.with_version else nulls
        try:
            result = spec.apply_func(self._model, *arrays)
        except Exception:
            raise ModelApplyError(
                f"{label}: apply_func {qualname(spec.apply_func)} raised on actor "
                f"{self._index} (pid {os.getpid()}, {spec.where}) for rows "
                f"{row_offset}..{row_offset + n_rows - 1} of the task{_partition_note(partition)}. "
                f"The actor's traceback:\n{traceback.format_exc()}"
            ) from None
        out = to_result_array(
            result,
            spec.return_type,
            n_rows,
            function=label,
            kept=kept,
            row_offset=row_offset,
        )
        return self._with_version(out) if spec.with_version else out

    def _with_version(self, out: pa.Array) -> pa.Array:
        versions = pa.array([self._spec.version] * len(out), type=pa.int64())
        return pa.StructArray.from_arrays([out, versions], names=["prediction", "model_version"])

    @ray.method(concurrency_group=CONTROL_GROUP)
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def load(self) -> int:
        """Calls this actor holds now (computing or waiting their turn), from every caller."""
        return self._calls_held()

    def _calls_held(self) -> int:  # also the Flight server's DoAction("load")
        with self._counters.lock:
            return self._counters.in_flight

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> dict[str, Any]:
        """This actor's counters (rows, batches and errors by door, busy time, latency
        percentiles, in flight), its version, pid and uptime; answers while predict runs."""
        return {
            **self._counters.snapshot(),
            "index": self._index,
            "pid": os.getpid(),
            "version": self._spec.version,
            "load_s": self._load_seconds,
            "uptime_s": time.time() - self._started,
        }

    def stop(self) -> None:
        """Remove the model folder and exit once the calls it accepted are done (at most
        ``STOP_DRAIN_S``); calls still queued in Ray then fail with ``RayActorError`` and their
        callers send them to the pool's new actors. The Flight server, if any, first finishes
        the calls it holds and then refuses new ones."""
        if self._flight is not None:
            self._flight.shutdown()
            self._flight = None
        deadline = time.monotonic() + STOP_DRAIN_S
        while self.load() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._cleanup()
        ray.actor.exit_actor()

    def _cleanup(self) -> None:
        if not self._dir:
            return
        if self._spec.share_files:
            _shared.release(Path(self._dir))
        else:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = ""
        with contextlib.suppress(OSError):  # the pool's folder on this node, once empty
            node_work_root(self._spec.work_root).rmdir()


def _partition_note(partition: int | None) -> str:
    return "" if partition is None else f" (spark_partition_id() = {partition})"


def _in_partition(exc: SparkRayUdfError, partition: int | None) -> SparkRayUdfError:
    """``exc`` saying which partition its row numbers count in (they count from 0 in the
    task's partition: ``spark_partition_id()`` and a row number within it find the row).

    >>> str(_in_partition(InputError("f: argument 1: row 3 is null"), 2))
    'f: argument 1: row 3 is null [rows count from 0 within the partition with spark_partition_id() = 2]'
    """
    text = str(exc)
    if partition is None or "spark_partition_id()" in text:
        return exc
    first, sep, rest = text.partition("\n")
    note = f" [rows count from 0 within the partition with spark_partition_id() = {partition}]"
    return type(exc)(first + note + sep + rest)


def remote_worker_class() -> Any:
    """:class:`ModelWorker` as a Ray actor class, its control calls in their own group."""
    return ray.remote(concurrency_groups={CONTROL_GROUP: 2, WORK_GROUP: WORK_THREADS})(ModelWorker)


_STALE_NAME = re.compile(r"^actor\d+-pid(\d+)-")


def node_work_root(pool_folder: str) -> Path:
    """The folder of a pool's model copies on this machine: ``<temp>/spark-ray-udf/<pool>``
    for a folder name (each node's own temp folder), or ``pool_folder`` itself when absolute.

    >>> node_work_root("spark-ray-udf.f.abc").parts[-2:]
    ('spark-ray-udf', 'spark-ray-udf.f.abc')
    >>> str(node_work_root("/data/pools/p1"))
    '/data/pools/p1'
    """
    if Path(pool_folder).is_absolute():
        return Path(pool_folder)
    return Path(tempfile.gettempdir()) / "spark-ray-udf" / pool_folder


def remove_stale_folders(root: Path, *, min_age_s: float = 60.0) -> list[Path]:
    """Remove the model folders under ``root`` whose actor process is gone; return them.

    An actor removes its folder on ``stop()`` and at exit, and the pool's ``close()`` removes
    the pool's folder; but an actor killed outright (its driver SIGKILLed, the node's Ray
    stopped) runs no cleanup. Each actor names its folder ``actor<i>-pid<pid>-...``, so every
    new actor sweeps the folders of dead PIDs on its machine, then the pools' folders that are
    empty and untouched for ``min_age_s``. (Machines sharing one temp folder across PID
    namespaces must give each its own ``TMPDIR``.)

    >>> import tempfile
    >>> remove_stale_folders(Path(tempfile.mkdtemp()) / "absent")
    []
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for folder in root.glob("*/actor*-pid*-*"):
        match = _STALE_NAME.match(folder.name)
        if match and not _shared.pid_running(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for pool_root in root.iterdir():
        try:
            if time.time() - pool_root.stat().st_mtime > min_age_s:
                pool_root.rmdir()  # only when empty
                removed.append(pool_root)
        except OSError:
            pass
    return removed
