"""The Ray side: model worker actors, the pool's directory, and the driver-side pool.

* :class:`ModelWorker` (a Ray actor) writes the model files into its own temporary folder, read
  straight from the Delta version's Parquet files (``WorkerSpec.files``) or, when the actors
  cannot reach the table's storage, from chunks the driver put in the object store; it calls
  ``init_func`` once, and serves ``predict`` calls on Arrow batches. An error in ``init_func`` is kept and raised by ``ready()`` with the actor's traceback.
* :class:`Directory` (a tiny named actor, no CPU) tells Spark's Python workers which actors serve
  the function now: a :class:`Generation`. Workers find it by name in the pool's own namespace.
* :class:`ModelPool` (driver side) starts a generation, waits until every actor is ready (with a
  timeout), publishes it, and stops everything on :meth:`ModelPool.close`.

Actors restart by default (``max_restarts=-1``): a restarted actor runs ``__init__`` again and so
reloads the model from the table's files (a Delta version's files do not change; VACUUM may
remove old ones), or from the object store, where the driver then keeps the chunks pinned while
the pool lives.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from spark_ray_udf._arrow import NullPolicy, empty_result, prepare_inputs, to_result_array
from spark_ray_udf.errors import (
    CallTimeoutError,
    ModelApplyError,
    ModelInitError,
    ModelTableError,
    PoolClosedError,
    SparkRayUdfError,
)
from spark_ray_udf.store import Manifest, StoredModel, materialize, rows_from_files, write_model

log = logging.getLogger(__name__)

# "SPREAD": one actor per node before a second on any (small actors would otherwise all pack
# on one node: no redundancy); actor_options={"scheduling_strategy": "DEFAULT"} packs.
DEFAULT_ACTOR_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"num_cpus": 0.25, "max_restarts": -1, "max_task_retries": 0, "scheduling_strategy": "SPREAD"}
)
STOP_TIMEOUT_S = 10.0
WATCH_S = 5.0  # how often the driver checks that every actor of the pool is still alive


def qualname(func: Callable[..., Any]) -> str:
    """A readable name for a user function, for error messages.

    >>> qualname(qualname)
    'spark_ray_udf.pool.qualname'
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

    @property
    def where(self) -> str:
        return f"{self.table}@v{self.version}"


class WorkerInfo(NamedTuple):
    """What a ready actor reports about itself."""

    index: int
    pid: int
    node_ip: str
    model_dir: str
    load_seconds: float
    version: int
    node_id: str = ""


class Generation(NamedTuple):
    """The actors serving a function at one time, for one model version."""

    number: int
    version: int
    actors: tuple[Any, ...]


class ModelWorker:
    """A Ray actor holding one loaded copy of the model (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, index: int, chunks: dict[tuple[str, int], Any]) -> None:
        self._spec = spec
        self._index = index
        self._model: Any = None
        self._error: SparkRayUdfError | None = None
        root = node_work_root(spec.work_root)  # this node's temp folder, not the driver's
        remove_stale_folders(root.parent)
        root.mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix=f"actor{index}-pid{os.getpid()}-", dir=root)
        atexit.register(self._cleanup)
        start = time.monotonic()
        try:
            self._fetch(chunks)
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

    def _fetch(self, chunks: dict[tuple[str, int], Any]) -> None:
        spec = self._spec
        if not spec.files:
            materialize(
                spec.manifest,
                lambda p, i: ray.get(chunks[(p, i)], timeout=spec.fetch_timeout_s),
                self._dir,
                where=spec.where,
            )
            return
        rows = rows_from_files(spec.files, where=spec.where)
        manifest = write_model(rows, self._dir, where=spec.where)
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
        return WorkerInfo(
            index=self._index,
            pid=os.getpid(),
            node_ip=ray.util.get_node_ip_address(),
            model_dir=self._dir,
            load_seconds=self._load_seconds,
            version=self._spec.version,
            node_id=ray.get_runtime_context().get_node_id(),
        )

    def predict(self, columns: list[pa.Array], row_offset: int) -> pa.Array:
        """Run ``apply_func`` on one Arrow batch and return the Arrow result."""
        if self._error is not None:
            raise self._error
        spec = self._spec
        n_rows = len(columns[0]) if columns else 0
        if n_rows == 0:
            return self._with_version(empty_result(spec.return_type)) if spec.with_version else (
                empty_result(spec.return_type)
            )
        arrays, kept = prepare_inputs(
            columns, function=spec.function, on_null=spec.on_null, row_offset=row_offset
        )
        if kept is not None and not kept.any():
            nulls = pa.nulls(n_rows, spec.return_type)
            return self._with_version(nulls) if spec.with_version else nulls
        try:
            result = spec.apply_func(self._model, *arrays)
        except Exception:
            raise ModelApplyError(
                f"{spec.function}: apply_func {qualname(spec.apply_func)} raised on actor "
                f"{self._index} (pid {os.getpid()}, {spec.where}) for rows "
                f"{row_offset}..{row_offset + n_rows - 1} of the task. The actor's traceback:\n"
                f"{traceback.format_exc()}"
            ) from None
        out = to_result_array(
            result,
            spec.return_type,
            n_rows,
            function=spec.function,
            kept=kept,
            row_offset=row_offset,
        )
        return self._with_version(out) if spec.with_version else out

    def _with_version(self, out: pa.Array) -> pa.Array:
        versions = pa.array([self._spec.version] * len(out), type=pa.int64())
        return pa.StructArray.from_arrays([out, versions], names=["prediction", "model_version"])

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        """Remove the model folder and exit once the calls queued before this one are done."""
        self._cleanup()
        ray.actor.exit_actor()

    def _cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the pool's folder on this node, once empty
            Path(self._dir).parent.rmdir()


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


def _clean_node(pool_folder: str) -> str:
    """Remove a pool's folder on this node and sweep stale ones; runs as a task on each node."""
    root = node_work_root(pool_folder)
    shutil.rmtree(root, ignore_errors=True)
    remove_stale_folders(root.parent)
    return ray.get_runtime_context().get_node_id()


def clean_every_node(pool_folder: str, *, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Remove a pool's model folders on every alive Ray node (a zero-CPU task pinned to each
    node), bounded by ``timeout_s``; returns the IDs of the nodes it could not clean (logged).
    A Ray whose only node is the driver's own needs no task (the driver removes the folder)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if nodes == [ray.get_runtime_context().get_node_id()]:
        return []  # one node, the driver's own: ModelPool.close() removes the folder here
    task = ray.remote(_clean_node)
    refs = {
        task.options(
            num_cpus=0, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(pool_folder): node
        for node in nodes
    }
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    cleaned = set()
    for ref in done:
        try:
            cleaned.add(ray.get(ref, timeout=0))
        except ray.exceptions.RayError as exc:
            log.warning("cleaning %s on node %s failed: %s", pool_folder, refs[ref], exc)
    left = [n for n in nodes if n not in cleaned]
    for ref in refs:
        if refs[ref] in left:
            ray.cancel(ref, force=True)
    if left:
        log.warning(
            "the model folders of %s may remain on nodes %s (not cleaned within %.0fs); the "
            "next actor on those nodes removes them", pool_folder, left, timeout_s,
        )
    return left


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists
        return True
    return True


def remove_stale_folders(root: Path, *, min_age_s: float = 60.0) -> list[Path]:
    """Remove the model folders under ``root`` whose actor process is gone; return them.

    An actor removes its folder on ``stop()`` and at exit, and :meth:`ModelPool.close` removes
    the pool's folder; but an actor killed outright (its driver SIGKILLed, the node's Ray
    stopped) runs no cleanup. Each actor names its folder ``actor<i>-pid<pid>-...``, so every
    new actor sweeps the folders of dead PIDs on its machine, then the pools' folders that are
    empty and untouched for ``min_age_s``. (Machines sharing one temp folder across PID
    namespaces must give each its own ``TMPDIR``.)
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for folder in root.glob("*/actor*-pid*-*"):
        match = _STALE_NAME.match(folder.name)
        if match and not _pid_running(int(match.group(1))):
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


class Directory:
    """A named actor that tells Spark's Python workers which generation serves the function."""

    def __init__(self) -> None:
        self._current: Generation | None = None

    def publish(self, generation: Generation) -> None:
        self._current = generation

    def current(self) -> Generation | None:
        return self._current


def _unwrap(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@dataclass
class ModelPool:
    """The driver's handle on one function's actors. Build it with :meth:`start`."""

    function: str
    namespace: str
    gcs_address: str
    work_root: str  # the pool's folder on the driver's machine (each node has its own)
    directory: Any
    generation: Generation
    stored: StoredModel[Any] = field(repr=False)
    infos: list[WorkerInfo]
    spec: WorkerSpec = field(repr=False)
    actor_options: Mapping[str, Any] = field(repr=False)
    init_timeout_s: float = 600.0
    closed: bool = False
    replaced: int = 0  # actors started by the watcher in place of dead ones
    last_watch_error: BaseException | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def start(
        cls,
        spec: WorkerSpec,
        stored: StoredModel[Any],
        *,
        namespace: str,
        gcs_address: str,
        num_actors: int,
        actor_options: Mapping[str, Any],
        init_timeout_s: float,
    ) -> ModelPool:
        """Start ``num_actors`` workers, wait until each has loaded the model, publish them."""
        directory = ray.remote(Directory).options(
            name=spec.function, namespace=namespace, num_cpus=0, max_restarts=-1
        ).remote()
        try:
            actors, infos = start_actors(
                spec, stored, num_actors=num_actors, options=actor_options, timeout_s=init_timeout_s
            )
        except BaseException:
            ray.kill(directory, no_restart=True)
            shutil.rmtree(node_work_root(spec.work_root), ignore_errors=True)
            raise
        generation = Generation(number=1, version=stored.version, actors=tuple(actors))
        ray.get(directory.publish.remote(generation), timeout=init_timeout_s)
        pool = cls(
            function=spec.function,
            namespace=namespace,
            gcs_address=gcs_address,
            work_root=str(node_work_root(spec.work_root)),
            directory=directory,
            generation=generation,
            stored=stored,
            infos=infos,
            spec=spec,
            actor_options=actor_options,
            init_timeout_s=init_timeout_s,
        )
        atexit.register(pool.close)
        threading.Thread(target=pool._watch, name=f"spark-ray-udf-watch-{spec.function}", daemon=True).start()
        return pool

    def _watch(self) -> None:
        """Replace actors that Ray will not restart (``ray.kill``, restarts exhausted) so the pool
        keeps its size; checks every ``WATCH_S`` (one GCS lookup per actor, no actor call)."""
        wait = WATCH_S
        while not self._stop.wait(wait):
            if not ray.is_initialized() or _current_gcs() != self.gcs_address:
                return  # ray.shutdown() here, or the pool's Ray was lost: nothing to watch
            try:
                self.replace_dead()
                self.last_watch_error, wait = None, WATCH_S
            except PoolClosedError:
                return
            except Exception as exc:  # keep watching; say why, back off up to a minute
                self.last_watch_error = exc
                wait = min(60.0, wait * 2)
                log.exception("%s: replacing a dead actor failed; retrying in %.0fs", self.function, wait)

    def replace_dead(self) -> list[int]:
        """Start a new actor (same version) for each actor of the serving generation that is dead
        for good, publish the repaired generation, and return the replaced indices."""
        if self.closed:
            raise PoolClosedError(f"{self.function}: the pool is closed")
        old = self.generation
        # GCS lookups outside the lock: close() never waits for them
        dead = [i for i, a in enumerate(old.actors) if actor_state(a) == "DEAD"]
        if not dead:
            return []
        with self._lock:
            if self.closed:
                raise PoolClosedError(f"{self.function}: the pool is closed")
            if self.generation is not old:
                return []  # a swap or close happened meanwhile: look again at the next check
            log.warning("%s: actors %s are dead for good; starting replacements", self.function, dead)
            fresh, infos = start_actors(
                self.spec, self.stored, num_actors=len(dead), options=self.actor_options,
                timeout_s=self.init_timeout_s, indices=dead,
            )
            actors, all_infos = list(old.actors), list(self.infos)
            for i, actor, info in zip(dead, fresh, infos):
                actors[i] = actor
                if i < len(all_infos):
                    all_infos[i] = info
            generation = Generation(number=old.number + 1, version=old.version, actors=tuple(actors))
            try:
                ray.get(self.directory.publish.remote(generation), timeout=self.init_timeout_s)
            except BaseException:
                stop_actors(fresh, graceful=False)
                raise
            self.generation, self.infos = generation, all_infos
            self.replaced += len(dead)
            return dead

    def swap(
        self,
        spec: WorkerSpec,
        stored: StoredModel[Any],
        *,
        num_actors: int,
        actor_options: Mapping[str, Any],
        init_timeout_s: float,
    ) -> Generation:
        """Replace the serving actors with a new generation, without downtime.

        The new actors load ``stored`` and pass ``ready()`` first; only then are they published,
        so Spark tasks send new batches to them. The old actors finish the calls already queued
        and exit. If loading fails, the new actors are stopped, the old ones keep serving, and
        the error is raised.
        """
        with self._lock:
            if self.closed:
                raise PoolClosedError(f"{self.function}: the pool is closed; register it again")
            actors, infos = start_actors(
                spec, stored, num_actors=num_actors, options=actor_options, timeout_s=init_timeout_s
            )
            old = self.generation
            generation = Generation(
                number=old.number + 1, version=stored.version, actors=tuple(actors)
            )
            try:
                ray.get(self.directory.publish.remote(generation), timeout=init_timeout_s)
            except BaseException:
                stop_actors(actors, graceful=False)
                raise
            self.generation, self.stored, self.infos = generation, stored, infos
            self.spec, self.actor_options, self.init_timeout_s = spec, actor_options, init_timeout_s
        stop_actors(old.actors)
        log.info(
            "%s: generation %d (v%d) replaced generation %d (v%d)",
            self.function,
            generation.number,
            generation.version,
            old.number,
            old.version,
        )
        return generation

    def actor_pids(self) -> list[int]:
        """The PIDs of the live actors, asked of the actors themselves."""
        refs = [a.pid.remote() for a in self.generation.actors]
        return list(ray.get(refs, timeout=STOP_TIMEOUT_S))

    def close(self) -> None:
        """Stop the actors (after the calls already queued), the directory, and unpin the model."""
        self._stop.set()
        with self._lock:
            if self.closed:
                return
            self.closed = True
        # Else Ray stopped them: ray.shutdown() before atexit, or the pool's Ray was lost and
        # this process has joined another one since (the old handles mean nothing there).
        if ray.is_initialized() and _current_gcs() == self.gcs_address:
            stop_actors(self.generation.actors)
            try:
                ray.kill(self.directory, no_restart=True)
            except (RayActorError, ValueError):
                pass  # already gone
            # Actors killed without their own cleanup leave their model folders: remove the
            # pool's folder on every node (each node has its own temp folder).
            clean_every_node(self.spec.work_root)
        self.stored = StoredModel(self.stored.table, self.stored.version, self.stored.manifest, {})
        # And on this machine in every case (ray.shutdown() ran first, the Ray was lost).
        shutil.rmtree(self.work_root, ignore_errors=True)
        log.info("closed the pool of %s", self.function)


def start_actors(
    spec: WorkerSpec,
    stored: StoredModel[Any],
    *,
    num_actors: int,
    options: Mapping[str, Any],
    timeout_s: float,
    indices: list[int] | None = None,
) -> tuple[list[Any], list[WorkerInfo]]:
    """Create the actors of one generation and wait (at most ``timeout_s``) until all are ready.

    ``indices`` number the actors (``0..num_actors-1`` by default). On any failure every actor
    started here is stopped before the error is raised.
    """
    remote_cls = ray.remote(ModelWorker)
    opts = {**DEFAULT_ACTOR_OPTIONS, **options}
    numbers = list(range(num_actors)) if indices is None else indices
    actors = [remote_cls.options(**opts).remote(spec, i, stored.chunks) for i in numbers]
    try:
        infos = ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
    except GetTimeoutError as exc:
        stop_actors(actors, graceful=False)
        raise CallTimeoutError(
            f"{spec.function}: the {num_actors} actors did not load {spec.where} within "
            f"init_timeout_s={timeout_s}s; Ray may lack the resources asked ({opts}; available: "
            f"{ray.available_resources()}), or init_func is slow: raise init_timeout_s"
        ) from exc
    except RayTaskError as exc:
        stop_actors(actors, graceful=False)
        raise _unwrap(exc) from None
    except RayActorError as exc:
        stop_actors(actors, graceful=False)
        hint = ""
        if "No module named" in str(exc):
            # Ray pickles module-level functions by reference: the actor imports their module.
            hint = (
                f"; init_func {qualname(spec.init_func)} and apply_func "
                f"{qualname(spec.apply_func)} must be importable in the Ray worker processes: "
                "define them in an installed package (or put their folder on PYTHONPATH before "
                "Ray starts, or ship it with actor_options={'runtime_env': {'py_modules': [...]}})"
            )
        raise ModelInitError(
            f"{spec.function}: an actor died while loading {spec.where}: {exc}{hint}"
        ) from exc
    log.info(
        "%s: %d actors loaded %s in %.2fs (max)",
        spec.function,
        num_actors,
        spec.where,
        max(i.load_seconds for i in infos),
    )
    return actors, list(infos)


def _current_gcs() -> str:
    return str(ray.get_runtime_context().gcs_address)


def actor_state(actor: Any) -> str:
    """Ray's state of an actor (``ALIVE``, ``RESTARTING``, ``DEAD``, ...) from the GCS, without
    calling the actor (a call would queue behind its batches). Uses Ray's GCS state accessor,
    which needs no dashboard."""
    from ray._private import state

    info = state.actors(actor._actor_id.hex())
    return str(info.get("State", "UNKNOWN")) if info else "UNKNOWN"


def stop_actors(actors: tuple[Any, ...] | list[Any], *, graceful: bool = True) -> None:
    """Stop actors: ``stop()`` after their queued calls (bounded wait), then ``ray.kill``."""
    if graceful:
        refs = [a.stop.remote() for a in actors]
        ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except (RayActorError, ValueError):
            pass  # already exited
