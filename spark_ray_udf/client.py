"""The executor side: what runs in Spark's Python workers for every task of the SQL function.

A :class:`PoolClient` is cached once per Python worker process (see :func:`get_client`), keyed
by the :class:`~spark_ray_udf._contract.PoolAddress` that travelled in the UDF closure. It
connects to Ray once, reads the pool's signed directory entry (refusing one that the pool's
registrant did not write) and looks its actors up by name, checking each actor's id; for every
task it streams the task's Arrow batches to the actors:

* which actor gets a batch is the :class:`~spark_ray_udf.router.Router`'s choice (least loaded,
  then on this node, then rotation); the load includes other callers' calls, as each actor
  reports them to a ``load()`` probe (:class:`~spark_ray_udf._batches.LoadProbes`: sent at most
  every ``LOAD_PROBE_S``, never waited on except once, briefly, when the view is older than
  ``LOAD_STALE_S``); this module only does the transport and the waits;
* up to ``max_in_flight`` batches per task are in flight, so Spark ships batch k+1 while an
  actor computes batch k;
* results come back in input order;
* a batch whose actor died is sent again to a live actor, at most ``max_retries`` times
  (then :class:`~spark_ray_udf.errors.RetriesExhaustedError`); an actor that failed is taken
  back once it answers a ping (Ray restarts killed actors);
* every wait on Ray has a timeout (``call_timeout_s``), and while waiting the task checks every
  ``PROBE_S`` that Ray's GCS still accepts connections, so a stopped Ray fails the task in
  seconds with :class:`~spark_ray_udf.errors.RayUnavailableError`.

Rows are numbered within the task's partition: an error names ``partition P`` (Spark's
``spark_partition_id()``) and the row's offset in it.

Pools registered with ``executor_transport="flight"`` (executors that are not Ray nodes) get a
:class:`~spark_ray_udf._flight.FlightPoolClient` from :func:`get_client` instead: the same loop
(:mod:`spark_ray_udf._batches`, which both clients share) over Arrow Flight, and Ray is never
imported.

This is the one piece of per-process state in the library: a bounded cache of clients,
:func:`clear_clients` empties it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from spark_ray_udf import _batches
from spark_ray_udf._batches import Pending
from spark_ray_udf._contract import ENTRY_KEY, ActorRef, Entry, PoolAddress, decode_entry
from spark_ray_udf.errors import (
    CallTimeoutError,
    ModelApplyError,
    PoolClosedError,
    PoolIntegrityError,
    RayUnavailableError,
    RetriesExhaustedError,
    SparkRayUdfError,
)
from spark_ray_udf.router import Router, retries_left

log = logging.getLogger(__name__)

PROBE_S = 2.0  # while a call is out, check this often that Ray's GCS still accepts connections
INTEGRITY_WAIT_S = 15.0  # how long a forged directory entry is waited out (3 watcher rounds)
MAX_CLIENTS = 64  # clients cached per process (one per registered pool it served)
KV_NAMESPACE = "spark-ray-udf"  # same as pool.KV_NAMESPACE (the pool module needs the driver)

__all__ = ["PoolAddress", "PoolClient", "clear_clients", "get_client", "predict_batches"]


def entry_key(namespace: str) -> bytes:
    """The key of a pool's directory entry in Ray's KV store (namespace ``KV_NAMESPACE``).

    >>> entry_key("spark-ray-udf.f.0123")
    b'spark-ray-udf.f.0123/generation'
    """
    return namespace.encode() + b"/" + ENTRY_KEY


def lookup_actor(address: PoolAddress, ref: ActorRef) -> Any:
    """The handle of one actor of a directory entry, checked to be the actor the entry names
    (:class:`PoolIntegrityError` otherwise); None when it is gone. Shared by the Spark loop and
    the HTTP door (:mod:`spark_ray_udf.serve`)."""
    import ray

    from spark_ray_udf._ray import actor_id_of

    try:
        handle = ray.get_actor(ref.name, namespace=address.namespace)
    except ValueError as exc:  # gone for good: the watcher is replacing it
        log.info("%s: actor %s is gone (%s)", address.function, ref.name, exc)
        return None
    if actor_id_of(handle) != ref.actor_id:
        raise PoolIntegrityError(
            f"{address.function}: the actor named {ref.name!r} in the pool's namespace "
            f"is not the one its registrant started (id {actor_id_of(handle)}, expected "
            f"{ref.actor_id}); refusing to send it rows: register the function again"
        )
    return handle


class PoolClient(_batches.BatchLoop):
    """Sends a task's batches to the pool's actors. One per (process, pool)."""

    def __init__(self, address: PoolAddress) -> None:
        from spark_ray_udf._ray import connect_worker

        self.address = address
        # before this process imports Ray: connect_worker sets Ray's auth mode first
        connect_worker(address.ray_address, who=address.function, auth=address.auth_mode)
        import ray

        self._router = Router(node=str(ray.get_runtime_context().get_node_id() or ""))
        self._version = -1
        self._actors: tuple[Any, ...] = ()
        self._handles: dict[str, Any] = {}  # actor id -> verified handle
        self._pings: dict[int, Any] = {}  # slot -> pending pid() call of an unusable actor
        self._router.start = os.getpid()
        self._partition: int | None = None
        from ray.exceptions import RayError

        self._loads = _batches.LoadProbes(
            ask=lambda i: self._actors[i].load.remote() if self._actors[i] is not None else None,
            ready=lambda refs, timeout: ray.wait(refs, num_returns=len(refs), timeout=timeout)[0],
            answer=lambda ref: ray.get(ref, timeout=0),
            errors=(RayError,),
        )

    def _closed_message(self) -> str:
        a = self.address
        return (
            f"{a.function}: its actor pool (namespace {a.namespace!r} on the Ray at "
            f"{a.ray_address}) is closed or gone; call register_ray_model() again"
        )

    def _read_entry(self) -> bytes | None:
        from spark_ray_udf._ray import kv_get

        a = self.address
        try:
            return kv_get(entry_key(a.namespace), namespace=KV_NAMESPACE, timeout_s=min(a.call_timeout_s, 30.0))
        except Exception as exc:  # the GCS did not answer: say whether Ray is gone
            self._check_ray("the pool's directory entry")
            raise CallTimeoutError(
                f"{a.function}: the pool's directory entry on the Ray at {a.ray_address} could "
                f"not be read ({type(exc).__name__}: {exc})"
            ) from exc

    def _verified_entry(self) -> Entry:
        """The directory entry, verified. One that fails verification (another Ray job wrote
        it) is never used: the registrant's watcher publishes the right one again within
        ``WATCH_S``, so it is read again for up to ``INTEGRITY_WAIT_S`` before failing."""
        deadline = time.monotonic() + INTEGRITY_WAIT_S
        while True:
            blob = self._read_entry()
            if blob is None:
                raise PoolClosedError(self._closed_message())
            try:
                return decode_entry(blob, self.address.secret, where=self.address.function)
            except PoolIntegrityError:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: ignoring a directory entry this pool did not write", self.address.function)
                time.sleep(0.5)

    def refresh(self) -> None:
        """Read the directory entry: which actors serve the function now."""
        entry = self._verified_entry()
        if entry.number == self._router.number:
            self._readmit()
            return
        handles = tuple(self._lookup(ref) for ref in entry.actors)
        self._router.update(entry.number, [r.actor_id for r in entry.actors], [r.node_id for r in entry.actors])
        self._version, self._actors, self._pings = entry.version, handles, {}
        self._handles = {r.actor_id: h for r, h in zip(entry.actors, handles)}

    def _lookup(self, ref: ActorRef) -> Any:
        """The handle of one actor of the entry, checked to be the actor the entry names."""
        known = self._handles.get(ref.actor_id)
        if known is not None:
            return known
        return lookup_actor(self.address, ref)

    def _readmit(self) -> None:
        """Take back actors that failed once they answer a ping (never blocks).

        A killed actor is restarted by Ray (``max_restarts=-1``) and reloads the model; without
        this, a long-lived Spark Python worker would never send it a batch again. An actor gone
        for good (``ray.kill``) fails every ping and stays out of rotation.
        """
        import ray
        from ray.exceptions import RayError

        for i in self._router.unusable():
            if self._actors[i] is None:
                continue
            ping = self._pings.pop(i, None)
            if ping is None:
                self._pings[i] = self._actors[i].pid.remote()
                continue
            ready, _ = ray.wait([ping], timeout=0)
            if not ready:
                self._pings[i] = ping
                continue
            try:
                ray.get(ping, timeout=0)
            except RayError:
                continue  # still down: ping again at the next refresh
            self._router.readmit(i)
            log.info("%s: actor %d answers again", self.address.function, i)

    def _get(self, ref: Any, *, what: str) -> Any:
        """``ray.get(ref)`` within ``call_timeout_s``, checking every ``PROBE_S`` that the GCS
        still accepts connections: a stopped Ray fails in seconds with
        :class:`RayUnavailableError`, not at the timeout (``GetTimeoutError`` then)."""
        import ray
        from ray.exceptions import GetTimeoutError

        a = self.address
        deadline = time.monotonic() + a.call_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                return ray.get(ref, timeout=max(0.0, min(PROBE_S, remaining)))
            except GetTimeoutError:
                if remaining <= PROBE_S:
                    raise
            self._check_ray(what)

    def _check_ray(self, what: str) -> None:
        """Raise :class:`RayUnavailableError` if Ray's GCS no longer accepts connections."""
        from spark_ray_udf._ray import check_reachable

        a = self.address
        try:
            check_reachable(a.ray_address, timeout_s=PROBE_S, who=a.function)
        except RayUnavailableError as exc:
            raise RayUnavailableError(
                f"{a.function}: the Ray at {a.ray_address} stopped answering while this task "
                f"waited for {what} ({exc.__cause__}); Ray was stopped or crashed: start it "
                "again and register the function again with register_ray_model() (Spark's "
                "retries of this task fail the same way until then)"
            ) from exc

    def _probe_loads(self) -> None:
        """Feed the router the actors' own counts of the calls they hold (every caller's):
        ``load()`` Ray calls, timed by :class:`~spark_ray_udf._batches.LoadProbes`."""
        self._loads.run(self._router)

    def _submit(self, p: Pending) -> Pending:
        backoff = 0.1
        while True:
            i = self._router.pick()
            if i is not None and self._actors[i] is None:
                self._router.failed(i, self._router.number)  # looked up gone: not usable
                continue
            if i is not None:
                break
            # Every known actor failed: the pool may be restarting them or have a new generation.
            p.attempts += 1
            self._check_attempts(p, None)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            self._router.forget()  # force a fresh view
            self.refresh()
        p.actor = i
        p.generation = self._router.number
        p.call = self._actors[i].predict.remote(
            p.columns, p.row_offset, self._partition, "sql", self._router.node
        )
        return p

    def _check_attempts(self, p: Pending, cause: BaseException | None) -> None:
        if retries_left(p.attempts, self.address.max_retries):
            return
        if cause is None:
            why = "no actor of the pool could take the batch"
        else:
            first_line = (str(cause).strip().splitlines() or [""])[0].rstrip(".")
            why = f"actor {p.actor} died: {type(cause).__name__}: {first_line}"
        raise RetriesExhaustedError(
            f"{self.address.function}: {self._where(p)} failed on "
            f"{p.attempts} actors of the pool (namespace {self.address.namespace!r}, Ray at "
            f"{self.address.ray_address}); last cause: {why}. Raise max_retries= or check "
            "why the actors die (out of memory, apply_func or a library crashing the process)"
        ) from cause

    def _collect(self, p: Pending) -> pa.Array:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        while True:
            try:
                out = self._get(p.call, what=f"{self._where(p)} from actor {p.actor}")
            except GetTimeoutError as exc:
                ray.cancel(p.call)
                self._router.done(p.actor, p.generation)
                raise CallTimeoutError(
                    f"{self.address.function}: actor {p.actor} did not return "
                    f"{self._where(p)} within call_timeout_s="
                    f"{self.address.call_timeout_s}s (Ray at {self.address.ray_address}); raise "
                    "call_timeout_s= or look at the actor's logs"
                ) from exc
            except RayTaskError as exc:
                self._router.done(p.actor, p.generation)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SparkRayUdfError):
                    raise cause from None
                raise ModelApplyError(f"{self.address.function}: {exc}") from None
            except RayActorError as exc:
                self._router.failed(p.actor, p.generation)
                self.refresh()
                if self._router.number != p.generation:
                    # The pool moved to a new generation (a reload): the old actor exited after
                    # its queued calls. Not a failure: send the batch to the new actors.
                    log.info(
                        "%s: rows from %d go to generation %d (v%d)",
                        self.address.function,
                        p.row_offset,
                        self._router.number,
                        self._version,
                    )
                else:
                    p.attempts += 1
                    log.warning(
                        "%s: actor %d died (%s); retrying %s (attempt %d of %d)",
                        self.address.function,
                        p.actor,
                        type(exc).__name__,
                        self._where(p),
                        p.attempts,
                        self.address.max_retries,
                    )
                    self._check_attempts(p, exc)
                self._submit(p)
                continue
            self._router.done(p.actor, p.generation)
            return out

    def _send(self, columns: list[pa.Array], offset: int) -> list[Pending]:
        """Submit one batch: whole, or cut into pieces for the idle actors (``plan_split``).
        Pieces are compact copies: a pickled Arrow slice would carry its whole parent buffer."""
        self._probe_loads()
        return _batches.cut(
            columns,
            offset,
            idle=self._router.idle(),
            min_rows=self.address.min_split_rows,
            submit=self._submit,
            piece=_compact_slice,
        )

    def _abandon(self, p: Pending) -> None:
        self._router.done(p.actor, p.generation)


def _compact_slice(column: pa.Array, start: int, size: int) -> pa.Array:
    """A copy of ``column[start:start + size]`` that owns only its own rows."""
    return pa.concat_arrays([column.slice(start, size)])


_CLIENTS: OrderedDict[PoolAddress, Any] = OrderedDict()  # PoolClient or FlightPoolClient
_CLIENTS_LOCK = threading.Lock()


def get_client(address: PoolAddress) -> Any:
    """The process's client for ``address``, created (and connected) on first use: a
    :class:`PoolClient` (this process joins Ray), or for ``address.transport == "flight"`` a
    :class:`~spark_ray_udf._flight.FlightPoolClient` (Arrow Flight to the actors; Ray is never
    imported).

    The cache keeps the ``MAX_CLIENTS`` most recently used clients; a client whose pool turned
    out to be closed is dropped by :func:`predict_batches`.
    """
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(address)
        if client is None:
            if address.transport == "flight":
                from spark_ray_udf._flight import FlightPoolClient

                client = FlightPoolClient(address)
            else:
                client = PoolClient(address)
            _CLIENTS[address] = client
            while len(_CLIENTS) > MAX_CLIENTS:
                _close(_CLIENTS.popitem(last=False)[1])
        else:
            _CLIENTS.move_to_end(address)
        return client


def _close(client: Any) -> None:
    """Close a dropped client that holds its own connections (a Flight client; a Ray one
    shares the process's Ray connection, which stays)."""
    close = getattr(client, "close", None)
    if close is not None:
        close()


def drop_client(address: PoolAddress) -> None:
    """Forget the cached client of ``address`` (its pool is closed)."""
    with _CLIENTS_LOCK:
        _close(_CLIENTS.pop(address, None))


def clear_clients() -> None:
    """Forget every cached client (tests call this; the Ray connection stays)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def predict_batches(
    address: PoolAddress, batches: Iterator[pa.Array | tuple[pa.Array, ...]]
) -> Iterator[pa.Array]:
    """The body of the registered UDF: stream a task's batches through the pool."""
    try:
        yield from get_client(address).map_batches(batches)
    except PoolClosedError:
        drop_client(address)
        raise
