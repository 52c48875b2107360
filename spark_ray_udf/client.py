"""The executor side: what runs in Spark's Python workers for every task of the SQL function.

A :class:`PoolClient` is cached once per Python worker process (see :func:`get_client`), keyed
by the :class:`PoolAddress` that travelled in the UDF closure. It connects to Ray once, finds
the pool's :class:`~spark_ray_udf.pool.Directory` by name in the pool's namespace, and for every
task streams the task's Arrow batches to the actors:

* each batch goes to the least-loaded actor (:func:`~spark_ray_udf._dispatch.choose_actor`);
* up to ``max_in_flight`` batches per task are in flight, so Spark ships batch k+1 while an
  actor computes batch k;
* results come back in input order;
* a batch whose actor died is sent again to a live actor, at most ``max_retries`` times
  (then :class:`~spark_ray_udf.errors.RetriesExhaustedError`); an actor that failed is taken
  back once it answers a ping (Ray restarts killed actors);
* every wait on Ray has a timeout (``call_timeout_s``), and while waiting the task checks every
  ``PROBE_S`` that Ray's GCS still accepts connections, so a stopped Ray fails the task in
  seconds with :class:`~spark_ray_udf.errors.RayUnavailableError`.

This is the one piece of per-process state in the library; :func:`clear_clients` empties it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa

from spark_ray_udf._dispatch import choose_actor
from spark_ray_udf.errors import (
    CallTimeoutError,
    InputError,
    ModelApplyError,
    PoolClosedError,
    RayUnavailableError,
    RetriesExhaustedError,
    SparkRayUdfError,
)

log = logging.getLogger(__name__)

PROBE_S = 2.0  # while a call is out, check this often that Ray's GCS still accepts connections


class PoolAddress(NamedTuple):
    """Where a function's pool lives and how to call it; small and picklable, it travels in
    the UDF closure (an actor handle cannot be unpickled before ``ray.init``)."""

    function: str
    ray_address: str
    namespace: str
    token: str
    auth_mode: str
    max_in_flight: int
    call_timeout_s: float
    max_retries: int


@dataclass
class _Pending:
    columns: list[pa.Array]
    row_offset: int
    actor: int = -1
    generation: int = -1
    ref: Any = None
    attempts: int = 0
    done: pa.Array | None = None


class PoolClient:
    """Sends a task's batches to the pool's actors. One per (process, pool)."""

    def __init__(self, address: PoolAddress) -> None:
        from spark_ray_udf._ray import connect_worker

        self.address = address
        connect_worker(address.ray_address, who=address.function, auth=address.auth_mode)
        import ray
        try:
            self._directory = ray.get_actor(address.function, namespace=address.namespace)
        except ValueError as exc:
            raise PoolClosedError(self._closed_message()) from exc
        self._number = -1
        self._version = -1
        self._actors: tuple[Any, ...] = ()
        self._in_flight: list[int] = []
        self._usable: list[bool] = []
        self._pings: dict[int, Any] = {}  # actor index -> pending pid() call of an unusable actor
        self._start = os.getpid()

    def _closed_message(self) -> str:
        a = self.address
        return (
            f"{a.function}: its actor pool (namespace {a.namespace!r} on the Ray at "
            f"{a.ray_address}) is closed or gone; call register_ray_model() again"
        )

    def refresh(self) -> None:
        """Ask the directory which actors serve the function now."""
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            gen = self._get(self._directory.current.remote(), what="the pool's directory")
        except RayActorError as exc:
            self._check_ray("the pool's directory")  # a lost Ray is named as such
            raise PoolClosedError(self._closed_message()) from exc
        except GetTimeoutError as exc:
            raise CallTimeoutError(
                f"{self.address.function}: the pool's directory on the Ray at "
                f"{self.address.ray_address} did not answer within "
                f"call_timeout_s={self.address.call_timeout_s}s"
            ) from exc
        if gen is None:
            raise PoolClosedError(self._closed_message())
        if gen.number != self._number:
            self._number, self._version, self._actors = gen.number, gen.version, gen.actors
            self._in_flight = [0] * len(gen.actors)
            self._usable = [True] * len(gen.actors)
            self._pings = {}
        else:
            self._readmit()

    def _readmit(self) -> None:
        """Take back actors that failed once they answer a ping (never blocks).

        A killed actor is restarted by Ray (``max_restarts=-1``) and reloads the model; without
        this, a long-lived Spark Python worker would never send it a batch again. An actor gone
        for good (``ray.kill``) fails every ping and stays out of rotation.
        """
        import ray
        from ray.exceptions import RayError

        for i, usable in enumerate(self._usable):
            if usable:
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
            self._usable[i] = True
            log.info("%s: actor %d answers again", self.address.function, i)

    @property
    def version(self) -> int:
        return self._version

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

    def _submit(self, p: _Pending) -> _Pending:
        backoff = 0.1
        while True:
            i = choose_actor(self._in_flight, self._usable, start=self._start)
            if i is not None:
                break
            # Every known actor failed: the pool may be restarting them or have a new generation.
            p.attempts += 1
            self._check_attempts(p, None)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            self._number = -1  # force a fresh view
            self.refresh()
        self._start = i + 1
        p.actor = i
        p.generation = self._number
        p.ref = self._actors[i].predict.remote(p.columns, p.row_offset)
        self._in_flight[i] += 1
        return p

    def _check_attempts(self, p: _Pending, cause: BaseException | None) -> None:
        if p.attempts > self.address.max_retries:
            n = len(p.columns[0]) if p.columns else 0
            if cause is None:
                why = "no actor of the pool could take the batch"
            else:
                first_line = (str(cause).strip().splitlines() or [""])[0].rstrip(".")
                why = f"actor {p.actor} died: {type(cause).__name__}: {first_line}"
            raise RetriesExhaustedError(
                f"{self.address.function}: rows {p.row_offset}..{p.row_offset + n - 1} failed on "
                f"{p.attempts} actors of the pool (namespace {self.address.namespace!r}, Ray at "
                f"{self.address.ray_address}); last cause: {why}. Raise max_retries= or check "
                "why the actors die (out of memory, apply_func or a library crashing the process)"
            ) from cause

    def _collect(self, p: _Pending) -> pa.Array:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if p.done is not None:
            return p.done
        while True:
            try:
                n = len(p.columns[0])
                out = self._get(
                    p.ref, what=f"rows {p.row_offset}..{p.row_offset + n - 1} from actor {p.actor}"
                )
            except GetTimeoutError as exc:
                ray.cancel(p.ref)
                n = len(p.columns[0])
                raise CallTimeoutError(
                    f"{self.address.function}: actor {p.actor} did not return rows "
                    f"{p.row_offset}..{p.row_offset + n - 1} within call_timeout_s="
                    f"{self.address.call_timeout_s}s (Ray at {self.address.ray_address}); raise "
                    "call_timeout_s= or look at the actor's logs"
                ) from exc
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SparkRayUdfError):
                    raise cause from None
                raise ModelApplyError(f"{self.address.function}: {exc}") from None
            except RayActorError as exc:
                number = self._number
                if p.generation == number:
                    self._in_flight[p.actor] -= 1
                    self._usable[p.actor] = False
                self.refresh()
                if self._number != p.generation:
                    # The pool moved to a new generation (a reload): the old actor exited after
                    # its queued calls. Not a failure: send the batch to the new actors.
                    log.info(
                        "%s: rows from %d go to generation %d (v%d)",
                        self.address.function,
                        p.row_offset,
                        self._number,
                        self._version,
                    )
                else:
                    p.attempts += 1
                    log.warning(
                        "%s: actor %d died (%s); retrying rows from %d (attempt %d of %d)",
                        self.address.function,
                        p.actor,
                        type(exc).__name__,
                        p.row_offset,
                        p.attempts,
                        self.address.max_retries,
                    )
                    self._check_attempts(p, exc)
                self._submit(p)
                continue
            if p.generation == self._number:
                self._in_flight[p.actor] -= 1
            return out

    def map_batches(self, batches: Iterable[pa.Array | tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
        """Predict every batch of a task, in order."""
        self.refresh()
        pending: deque[_Pending] = deque()
        offset = 0
        limit = max(1, self.address.max_in_flight)
        try:
            for batch in batches:
                columns = list(batch) if isinstance(batch, tuple) else [batch]
                if not columns:
                    f = self.address.function
                    raise InputError(
                        f"{f}: called without arguments; pass the columns apply_func takes, "
                        f"e.g. {f}(features)"
                    )
                n = len(columns[0])
                p = _Pending(columns=columns, row_offset=offset)
                offset += n
                if n == 0:
                    p.done = pa.array([], type=pa.null())
                else:
                    self._submit(p)
                pending.append(p)
                while len(pending) >= limit:
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())
        finally:
            # On an error or an abandoned iterator, forget what is still in flight.
            for p in pending:
                if p.ref is not None and p.done is None and p.generation == self._number:
                    self._in_flight[p.actor] = max(0, self._in_flight[p.actor] - 1)


_CLIENTS: dict[PoolAddress, PoolClient] = {}
_CLIENTS_LOCK = threading.Lock()


def get_client(address: PoolAddress) -> PoolClient:
    """The process's client for ``address``, created (and connected) on first use."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(address)
        if client is None:
            client = PoolClient(address)
            _CLIENTS[address] = client
        return client


def clear_clients() -> None:
    """Forget every cached client (tests call this; the Ray connection stays)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def predict_batches(
    address: PoolAddress, batches: Iterator[pa.Array | tuple[pa.Array, ...]]
) -> Iterator[pa.Array]:
    """The body of the registered UDF: stream a task's batches through the pool."""
    yield from get_client(address).map_batches(batches)
