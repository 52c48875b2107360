"""The driver side of a pool: start, swap and stop generations of model actors, the directory
that tells Spark's Python workers which actors serve a function, the watcher, and stats.

* The actors are :class:`~spark_ray_udf.worker.ModelWorker` (see :mod:`spark_ray_udf.worker`),
  each a named actor in the pool's own Ray namespace.
* The :class:`Directory` is an entry in Ray's GCS key-value store (raw bytes, never unpickled)
  naming the serving actors, signed with the pool's secret (:mod:`spark_ray_udf._contract`).
  Executors verify it and check each actor's id before sending it a row, so another Ray job
  can neither redirect a pool's rows nor make executors unpickle what it wrote. The entry lives
  as long as the GCS, so nothing about the pool is lost when an actor restarts.
* :class:`ModelPool` starts a generation, waits until every actor is ready (with a timeout),
  publishes it, watches it (dead actors replaced, a missing or overwritten entry republished),
  reports :meth:`ModelPool.stats`, and stops everything on :meth:`ModelPool.close`.

Actors restart by default (``max_restarts=-1``): a restarted actor runs ``__init__`` again and so
reloads the model from the table's files (a Delta version's files do not change; VACUUM may
remove old ones), or from the object store, where the driver then keeps the chunks pinned while
the pool lives.
"""

from __future__ import annotations

import atexit
import logging
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from spark_ray_udf import _ray, placement
from spark_ray_udf._contract import ENTRY_KEY, ActorRef, Entry, Generation, WorkerInfo, encode_entry
from spark_ray_udf.errors import (
    CallTimeoutError,
    ModelInitError,
    PoolClosedError,
)
from spark_ray_udf.placement import Holder
from spark_ray_udf.store import StoredModel
from spark_ray_udf.worker import (
    WorkerSpec,
    percentiles,
    qualname,
    node_work_root,
    remote_worker_class,
    remove_stale_folders,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ACTOR_OPTIONS",
    "Directory",
    "Generation",
    "ModelPool",
    "WorkerInfo",
    "WorkerSpec",
    "remove_stale_folders",
    "start_actors",
    "stop_actors",
]

# "SPREAD": one actor per node before a second on any (small actors would otherwise all pack
# on one node: no redundancy); actor_options={"scheduling_strategy": "DEFAULT"} packs.
DEFAULT_ACTOR_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"num_cpus": 0.25, "max_restarts": -1, "max_task_retries": 0, "scheduling_strategy": "SPREAD"}
)
STOP_TIMEOUT_S = 10.0
WATCH_S = 5.0  # how often the driver checks that every actor of the pool is still alive


KV_NAMESPACE = "spark-ray-udf"


@dataclass
class Directory:
    """The signed entry that tells executors which actors serve a pool (see the module docstring)."""

    namespace: str  # the pool's Ray namespace; the entry's key in the KV store
    secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    published: bytes | None = field(default=None, repr=False)
    republished: int = 0  # times the watcher found the entry missing or overwritten

    @property
    def key(self) -> bytes:
        return self.namespace.encode() + b"/" + ENTRY_KEY

    def publish(self, generation: Generation, infos: list[WorkerInfo]) -> None:
        by_index = {i.index: i for i in infos}
        refs = []
        for index, actor in enumerate(generation.actors):
            info = by_index.get(index)
            refs.append(ActorRef(
                name=info.name if info else "",
                actor_id=_ray.actor_id_of(actor),
                node_id=info.node_id if info else "",
                flight_uri=info.flight_uri if info else "",
            ))
        blob = encode_entry(Entry(generation.number, generation.version, tuple(refs)), self.secret)
        _ray.kv_put(self.key, blob, namespace=KV_NAMESPACE)
        self.published = blob

    def intact(self) -> bool:
        """True when the stored entry is the one last published."""
        return _ray.kv_get(self.key, namespace=KV_NAMESPACE) == self.published

    def repair(self) -> bool:
        """Publish the entry again if it is missing or was overwritten; True if it was."""
        if self.published is None or self.intact():
            return False
        log.warning("%s: the pool's directory entry was missing or overwritten; republishing", self.namespace)
        _ray.kv_put(self.key, self.published, namespace=KV_NAMESPACE)
        self.republished += 1
        return True

    def remove(self) -> None:
        _ray.kv_del(self.key, namespace=KV_NAMESPACE)


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
    directory: Directory
    generation: Generation
    stored: StoredModel[Any] = field(repr=False)
    infos: list[WorkerInfo]
    spec: WorkerSpec = field(repr=False)
    actor_options: Mapping[str, Any] = field(repr=False)
    init_timeout_s: float = 600.0
    closed: bool = False
    replaced: int = 0  # actors started by the watcher in place of dead ones
    last_watch_error: BaseException | None = None
    holders: Callable[[], Sequence[Holder]] | None = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _restarts: dict[str, int] = field(default_factory=dict, repr=False)  # actor id -> restarts seen

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
        cancel: threading.Event | None = None,
        holders: Callable[[], Sequence[Holder]] | None = None,
        secret: str | None = None,
    ) -> ModelPool:
        """Start ``num_actors`` workers, wait until each has loaded the model, publish them.

        ``cancel`` stops the first load (see :func:`start_actors`); ``holders`` names what
        the other registered functions hold, for placement errors; ``secret`` signs the
        directory entry (a fresh one when None; the caller passes its own when the actors
        need a token derived from it, as Flight's)."""
        directory = Directory(namespace) if secret is None else Directory(namespace, secret=secret)
        try:
            actors, infos = start_actors(
                spec, stored, num_actors=num_actors, options=actor_options,
                timeout_s=init_timeout_s, cancel=cancel, holders=holders, namespace=namespace,
            )
        except BaseException:
            shutil.rmtree(node_work_root(spec.work_root), ignore_errors=True)
            raise
        generation = Generation(number=1, version=stored.version, actors=tuple(actors))
        try:
            directory.publish(generation, infos)
        except BaseException:
            stop_actors(actors, graceful=False)
            shutil.rmtree(spec.work_root, ignore_errors=True)
            raise
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
            holders=holders,
        )
        atexit.register(pool.close, graceful=False, lock_timeout_s=WAIT_STEP_S)
        threading.Thread(target=pool._watch, name=f"spark-ray-udf-watch-{spec.function}", daemon=True).start()
        return pool

    def _watch(self) -> None:
        """Replace actors that Ray will not restart (``ray.kill``, restarts exhausted) so the pool
        keeps its size, and republish the directory entry if it is missing or was overwritten;
        checks every ``WATCH_S`` (one GCS lookup per actor and one for the entry, no actor call)."""
        wait = WATCH_S
        while not self._stop.wait(wait):
            if not ray.is_initialized() or _current_gcs() != self.gcs_address:
                return  # ray.shutdown() here, or the pool's Ray was lost: nothing to watch
            if not _ray.gcs_alive(self.gcs_address):
                continue  # a GCS lookup would wait 60 s for it (it may come back: look again)
            try:
                self.replace_dead()
                if self.spec.flight_token:
                    self.refresh_endpoints()
                with self._lock:
                    if not self.closed:
                        self.directory.repair()
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
                timeout_s=self.init_timeout_s, indices=dead, cancel=self._stop,
                holders=self.holders, namespace=self.namespace,
            )
            actors, all_infos = list(old.actors), list(self.infos)
            for i, actor, info in zip(dead, fresh, infos):
                actors[i] = actor
                if i < len(all_infos):
                    all_infos[i] = info
            generation = Generation(number=old.number + 1, version=old.version, actors=tuple(actors))
            try:
                self.directory.publish(generation, all_infos)
            except BaseException:
                stop_actors(fresh, graceful=False)
                raise
            self.generation, self.infos = generation, all_infos
            self.replaced += len(dead)
            return dead

    def refresh_endpoints(self) -> bool:
        """Flight pools: publish the entry again when an actor that Ray restarted serves on a
        new port (its ``ready()`` answers the new URI); True when it did. One GCS lookup per
        actor; a ``ready()`` call only for restarted ones (predict calls do not queue on Ray's
        side in this mode, so it answers at once)."""
        gen = self.generation
        ids = [_ray.actor_id_of(a) for a in gen.actors]
        counts = [_ray.actor_restarts(a) for a in gen.actors]
        changed = [i for i, (k, n) in enumerate(zip(ids, counts)) if n != self._restarts.get(k, 0)]
        if not changed:
            return False
        fresh = ray.get([gen.actors[i].ready.remote() for i in changed], timeout=STOP_TIMEOUT_S)
        with self._lock:
            if self.closed or self.generation is not gen:
                return False  # a swap, a replacement or close happened meanwhile
            infos = list(self.infos)
            for i, info in zip(changed, fresh):
                if i < len(infos):
                    infos[i] = info
            generation = Generation(number=gen.number + 1, version=gen.version, actors=gen.actors)
            self.directory.publish(generation, infos)
            self.generation, self.infos = generation, infos
            for i in changed:
                self._restarts[ids[i]] = counts[i]
        log.info("%s: restarted actors %s serve on new Flight ports; entry republished", self.function, changed)
        return True

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
        the error is raised; :meth:`close` cancels the load (:class:`PoolClosedError`).
        """
        with self._lock:
            if self.closed:
                raise PoolClosedError(f"{self.function}: the pool is closed; register it again")
            actors, infos = start_actors(
                spec, stored, num_actors=num_actors, options=actor_options,
                timeout_s=init_timeout_s, cancel=self._stop, holders=self.holders,
                namespace=self.namespace,
            )
            old = self.generation
            generation = Generation(
                number=old.number + 1, version=stored.version, actors=tuple(actors)
            )
            try:
                self.directory.publish(generation, infos)
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

    def stats(self, *, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """What the pool served: per actor and summed, by door (see :meth:`RayModel.stats`).

        Each actor answers in its control concurrency group, never behind ``predict``; an actor
        that does not answer within ``timeout_s`` is reported with its error instead.
        """
        gen, infos = self.generation, {i.index: i for i in self.infos}
        refs = [a.stats.remote() for a in gen.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        actors: list[dict[str, Any]] = []
        for index, (actor, ref) in enumerate(zip(gen.actors, refs)):
            info = infos.get(index)
            row: dict[str, Any] = {
                "index": index,
                "node_ip": info.node_ip if info else "",
                "node_id": info.node_id if info else "",
                "restarts": _ray.actor_restarts(actor),
                "state": actor_state(actor),
            }
            if ref in done:
                try:
                    row.update(ray.get(ref, timeout=0))
                except Exception as exc:  # a dead actor: report it, keep the others
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                ray.cancel(ref)
                row["error"] = f"did not answer within {timeout_s}s"
            actors.append(row)
        return summarize(self, actors)

    def close(self, *, graceful: bool = True, lock_timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the actors (after the calls already queued, unless not ``graceful``), the
        directory, and unpin the model.

        A swap or a replacement loading now is cancelled first (it sees the stop event within
        ``WAIT_STEP_S`` and stops its new actors), so this returns within seconds, never after
        a whole load. At exit it runs with ``graceful=False``: bounded by Ray's kill calls.
        """
        self._stop.set()
        locked = self._lock.acquire(timeout=lock_timeout_s)
        if not locked:
            log.warning(
                "%s: a load still held the pool after %.0fs; closing without it",
                self.function, lock_timeout_s,
            )
        try:
            if self.closed:
                return
            self.closed = True
        finally:
            if locked:
                self._lock.release()
        # Else Ray stopped them: ray.shutdown() before atexit, or the pool's Ray was lost and
        # this process has joined another one since (the old handles mean nothing there).
        reachable = ray.is_initialized() and _current_gcs() == self.gcs_address
        if reachable and not _ray.gcs_alive(self.gcs_address):
            # Ray's GCS calls would wait 60 s for it and then end this process
            log.warning(
                "%s: the Ray at %s is gone; closing without stopping its actors or removing their "
                "folders on the nodes (a Ray that comes back sweeps stale folders at its next pool)",
                self.function, self.gcs_address,
            )
            reachable = False
        if reachable:
            stop_actors(self.generation.actors, graceful=graceful)
            try:
                self.directory.remove()
            except Exception:  # the GCS went away meanwhile: the entry goes with it
                log.warning("%s: could not remove the directory entry", self.function, exc_info=True)
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
    cancel: threading.Event | None = None,
    holders: Callable[[], Sequence[Holder]] | None = None,
    namespace: str | None = None,
) -> tuple[list[Any], list[WorkerInfo]]:
    """Create the actors of one generation and wait (at most ``timeout_s``) until all are ready.

    ``indices`` number the actors (``0..num_actors-1`` by default). With ``namespace`` each actor
    is named there (``<function>-<index>-<random>``), so executors can look it up. A request no node could ever
    hold fails before any actor starts; actors that no node takes while the cluster has no room
    fail after ``placement.FULL_GRACE_S`` (unless an autoscaler runs): both with a
    :class:`PlacementError` naming the request, the cluster and ``holders()`` (the registered
    functions and what they hold). ``cancel`` (set by ``close()``) or the interpreter's exit
    stops the wait within ``WAIT_STEP_S`` with :class:`PoolClosedError`. On any failure every
    actor started here is stopped before the error is raised.
    """
    remote_cls = remote_worker_class()
    opts = {**DEFAULT_ACTOR_OPTIONS, **options}
    numbers = list(range(num_actors)) if indices is None else indices
    watch = placement.PlacementWatch(spec.function, spec.where, opts, num_actors, holders)
    watch.before_start()

    def named(i: int) -> dict[str, Any]:
        if namespace is None:
            return {}
        return {"name": f"{spec.function}-{i}-{uuid.uuid4().hex[:8]}", "namespace": namespace}

    actors = [remote_cls.options(**opts, **named(i)).remote(spec, i, stored.chunks) for i in numbers]
    try:
        infos = _wait_ready(spec, actors, opts, timeout_s=timeout_s, cancel=cancel, watch=watch)
    except RayTaskError as exc:
        stop_actors(actors, graceful=False)
        raise _unwrap(exc) from None  # re-raised: the actor's own error (ready() raises ours)
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
    except BaseException:
        stop_actors(actors, graceful=False)
        raise
    log.info(
        "%s: %d actors loaded %s in %.2fs (max)",
        spec.function,
        num_actors,
        spec.where,
        max(i.load_seconds for i in infos),
    )
    return actors, infos


def check_placement(
    spec: WorkerSpec,
    *,
    num_actors: int,
    options: Mapping[str, Any],
    holders: Callable[[], Sequence[Holder]] | None = None,
) -> None:
    """Raise :class:`PlacementError` when no node (or bundle) of the cluster could ever hold one
    actor with ``options``: at registration, before the model is read. One GCS call."""
    opts = {**DEFAULT_ACTOR_OPTIONS, **options}
    placement.PlacementWatch(spec.function, spec.where, opts, num_actors, holders).before_start()


WAIT_STEP_S = 1.0  # one ray.wait of the ready loop: how soon a cancel or a placement check acts
LOG_EVERY_S = 10.0  # how often the ready loop logs what it still waits for
_EXITING = threading.Event()  # set when the interpreter exits: every load in progress stops
# threading's exit hook runs before the interpreter joins non-daemon threads (atexit runs
# after), so a load in a user's thread cannot hold the exit for init_timeout_s
getattr(threading, "_register_atexit", atexit.register)(_EXITING.set)


def _wait_ready(
    spec: WorkerSpec,
    actors: list[Any],
    opts: Mapping[str, Any],
    *,
    timeout_s: float,
    cancel: threading.Event | None,
    watch: placement.PlacementWatch,
) -> list[WorkerInfo]:
    """Short ``ray.wait``s on every actor's ``ready()`` until all answered; between them check
    ``cancel``, the exit, the deadline and placement, and log what is awaited."""
    refs = [a.ready.remote() for a in actors]
    infos: dict[Any, WorkerInfo] = {}
    pending = list(refs)
    start = time.monotonic()
    deadline, next_log = start + timeout_s, start + LOG_EVERY_S
    while pending:
        if (cancel is not None and cancel.is_set()) or _EXITING.is_set():
            raise PoolClosedError(
                f"{spec.function}: closed while {len(pending)} of its {len(actors)} actors were "
                f"still loading {spec.where}; the load was cancelled"
            )
        now = time.monotonic()
        if now >= deadline:
            raise CallTimeoutError(
                f"{spec.function}: {len(pending)} of the {len(actors)} actors did not load "
                f"{spec.where} within init_timeout_s={timeout_s}s (each placed and running "
                f"init_func); init_func or the model download is slow: raise init_timeout_s"
            )
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(WAIT_STEP_S, deadline - now))
        for ref in done:  # an actor that failed fails the pool now, not when the others are done
            infos[ref] = ray.get(ref, timeout=STOP_TIMEOUT_S)
        if not pending:
            break
        waiting = [actors[refs.index(r)] for r in pending]
        waited = time.monotonic() - start
        what = watch.check(waiting, waited)
        if time.monotonic() >= next_log:
            next_log = time.monotonic() + LOG_EVERY_S
            log.info(
                "%s: after %.0fs still waiting for %d of %d actors to load %s (%s; "
                "init_timeout_s=%s)", spec.function, waited, len(pending), len(actors), spec.where,
                what, timeout_s,
            )
    return [infos[r] for r in refs]


def _current_gcs() -> str:
    return str(ray.get_runtime_context().gcs_address)


def actor_state(actor: Any) -> str:
    """Ray's state of an actor (``ALIVE``, ``RESTARTING``, ``DEAD``, ...) from the GCS, without
    calling the actor (a call would queue behind its batches)."""
    return str(_ray.actor_info(actor).get("State", "UNKNOWN"))


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


def summarize(pool: ModelPool, actors: list[dict[str, Any]]) -> dict[str, Any]:
    """The pool's totals over its actors' stats rows (rows, batches, errors by door)."""
    doors = ("sql", "http")

    def total(what: str) -> dict[str, int]:
        return {d: sum(int(a.get(what, {}).get(d, 0)) for a in actors) for d in doors}

    window = [x for a in actors for x in a.pop("latency_window", ())]
    return {
        "function": pool.function,
        "table": pool.stored.table,
        "version": pool.generation.version,
        "generation": pool.generation.number,
        "actors": actors,
        "rows": total("rows"),
        "batches": total("batches"),
        "errors": total("errors"),
        "in_flight": sum(int(a.get("in_flight", 0)) for a in actors),
        "crossed_nodes": sum(int(a.get("crossed_nodes", 0)) for a in actors),
        "busy_s": sum(float(a.get("busy_s", 0.0)) for a in actors),
        "restarts": sum(int(a.get("restarts", 0)) for a in actors),
        "replaced": pool.replaced,
        "directory_republished": pool.directory.republished,
        "latency_s": percentiles(window),
        "closed": pool.closed,
    }


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
