"""The executor side: what runs in Spark's Python workers for every task of the SQL function.

A :class:`PoolClient` is cached once per Python worker process (see :func:`get_client`), keyed
by the :class:`PoolAddress` that travelled in the UDF closure. It connects to Ray once, finds
the pool's :class:`~spark_ray_udf.pool.Directory` by name in the pool's namespace, and for every
task streams the task's Arrow batches to the actors:

* each batch goes to the least-loaded actor (:func:`~spark_ray_udf._dispatch.choose_actor`);
* up to ``max_in_flight`` batches per task are in flight, so Spark ships batch k+1 while an
  actor computes batch k;
* results come back in input order;
* a batch whose actor died is sent again to a live actor, at most ``max_retries`` times;
* every wait on Ray has a timeout (``call_timeout_s``).

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
    ModelApplyError,
    PoolClosedError,
    SparkRayUdfError,
)

log = logging.getLogger(__name__)


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
        self._start = os.getpid()

    def _closed_message(self) -> str:
        a = self.address
        return (
            f"{a.function}: its actor pool (namespace {a.namespace!r} on the Ray at "
            f"{a.ray_address}) is closed or gone; call register_ray_model() again"
        )

    def refresh(self) -> None:
        """Ask the directory which actors serve the function now."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            gen = ray.get(self._directory.current.remote(), timeout=self.address.call_timeout_s)
        except RayActorError as exc:
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

    @property
    def version(self) -> int:
        return self._version

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
            raise PoolClosedError(
                f"{self.address.function}: rows {p.row_offset}..{p.row_offset + n - 1} failed on "
                f"{p.attempts} actors of the pool (namespace {self.address.namespace!r}, Ray at "
                f"{self.address.ray_address}); last cause: {cause!r}. Raise max_retries= or check "
                "why the actors die (memory, init_func)"
            ) from cause

    def _collect(self, p: _Pending) -> pa.Array:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if p.done is not None:
            return p.done
        while True:
            try:
                out = ray.get(p.ref, timeout=self.address.call_timeout_s)
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
