"""The executor-side batch loop that both transports share (Ray calls and Arrow Flight).

A task's Arrow batches go out in order, at most ``max_in_flight`` of them at once, each one
whole or cut into pieces for the idle actors (:func:`~spark_ray_udf.router.plan_split`), and
the results come back in input order. What differs between the transports (how one piece is
sent, how its result is awaited, what to do with a call nobody will wait for) comes in as
callables (:func:`map_batches`), or as the methods of a :class:`BatchLoop`:
:class:`~spark_ray_udf.client.PoolClient` sends Ray calls,
:class:`~spark_ray_udf._flight.FlightPoolClient` sends Flight calls.

Pure: this module imports pyarrow and the library's ``errors`` and ``router`` only (no Ray,
no Spark at import), so the Flight client, which must never import Ray, can use it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from spark_ray_udf.errors import InputError
from spark_ray_udf.router import Router, plan_split

log = logging.getLogger(__name__)

__all__ = ["BatchLoop", "LoadProbes", "Pending", "cut", "map_batches", "partition"]

LOAD_PROBE_S = 0.05  # ask the actors for their load at most this often
LOAD_STALE_S = 1.0  # a view older than this is refreshed before choosing (waiting LOAD_WAIT_S)
LOAD_WAIT_S = 0.05  # the longest a batch waits for the actors' load reports


@dataclass
class Pending:
    """One piece of a batch on its way: its columns, its first row's offset in the task's
    partition, the actor (slot and router generation) it went to, the transport's handle of
    the call (``call``: a Ray ``ObjectRef``, a Flight call's future), how many actors it
    failed on, and its result when there is nothing to send (an empty batch).

    >>> p = Pending(columns=[pa.array([1, 2, 3])], row_offset=10)
    >>> p.rows, p.where(None), p.where(4)
    ('rows 10..12', 'rows 10..12', 'rows 10..12 of partition 4')
    """

    columns: list[pa.Array]
    row_offset: int
    actor: int = -1
    generation: int = -1
    call: Any = None
    attempts: int = 0
    done: pa.Array | None = None

    @property
    def rows(self) -> str:
        n = len(self.columns[0]) if self.columns else 0
        return f"rows {self.row_offset}..{self.row_offset + n - 1}"

    def where(self, partition: int | None) -> str:
        """Its rows, and the partition they belong to when known (for error messages)."""
        part = "" if partition is None else f" of partition {partition}"
        return f"{self.rows}{part}"


def partition() -> int | None:
    """The Spark partition of the running task (None outside a Spark task).

    >>> partition() is None  # not in a Spark task
    True
    """
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a dependency
        return None
    ctx = TaskContext.get()
    return None if ctx is None else int(ctx.partitionId())


def _slice(column: pa.Array, start: int, size: int) -> pa.Array:
    return column.slice(start, size)


def cut(
    columns: list[pa.Array],
    offset: int,
    *,
    idle: int,
    min_rows: int | None,
    submit: Callable[[Pending], Pending],
    piece: Callable[[pa.Array, int, int], pa.Array] = _slice,
) -> list[Pending]:
    """Submit one batch whose first row is ``offset``: whole, or cut into pieces for ``idle``
    actors (:func:`~spark_ray_udf.router.plan_split`), each piece made by
    ``piece(column, start, size)`` (a plain slice unless told otherwise) and handed to
    ``submit``, which sends it and returns it.

    >>> sent = []
    >>> group = cut([pa.array(range(8))], 100, idle=2, min_rows=2, submit=lambda p: sent.append(p) or p)
    >>> [(p.row_offset, p.columns[0].to_pylist()) for p in group]
    [(100, [0, 1, 2, 3]), (104, [4, 5, 6, 7])]
    >>> len(cut([pa.array(range(8))], 0, idle=1, min_rows=2, submit=lambda p: p))
    1
    """
    sizes = plan_split(len(columns[0]), idle, min_rows=min_rows)
    if len(sizes) == 1:
        return [submit(Pending(columns=columns, row_offset=offset))]
    group, start = [], 0
    for size in sizes:
        part = [piece(c, start, size) for c in columns]
        group.append(submit(Pending(columns=part, row_offset=offset + start)))
        start += size
    return group


def map_batches(
    batches: Iterable[pa.Array | tuple[pa.Array, ...]],
    *,
    function: str,
    max_in_flight: int,
    send: Callable[[list[pa.Array], int], list[Pending]],
    collect: Callable[[Pending], pa.Array],
    abandon: Callable[[Pending], None],
) -> Iterator[pa.Array]:
    """Predict every batch of a task, in order, with at most ``max_in_flight`` batches out.

    A batch is a column or a tuple of columns (the SQL function's arguments). ``send(columns,
    offset)`` submits a non-empty batch whose first row is ``offset`` in the partition and
    returns its pieces; ``collect(piece)`` waits for one piece's result (retrying as the
    transport does); an empty batch is answered without a call. When the loop stops before
    the end (an error, or the consumer stops reading), ``abandon(piece)`` is called for every
    piece still in flight, the failed piece's siblings included. A call without arguments is an :class:`InputError` for
    ``function``.

    >>> sent = []
    >>> def send(columns, offset):
    ...     sent.append(offset)
    ...     return [Pending(columns=columns, row_offset=offset, call=columns[0])]
    >>> out = map_batches([pa.array([1, 2]), pa.array([3])], function="f", max_in_flight=2,
    ...                   send=send, collect=lambda p: pa.array([10 * x for x in p.call.to_pylist()]),
    ...                   abandon=lambda p: None)
    >>> [a.to_pylist() for a in out], sent
    ([[10, 20], [30]], [0, 2])
    """
    pending: deque[list[Pending]] = deque()
    offset = 0
    limit = max(1, max_in_flight)

    def collect_group(group: list[Pending]) -> pa.Array:
        results = []
        for k, p in enumerate(group):
            try:
                results.append(p.done if p.done is not None else collect(p))
            except BaseException:  # re-raised: the pieces after it are let go first
                for q in group[k + 1:]:
                    if q.call is not None and q.done is None:
                        abandon(q)
                raise
        return results[0] if len(results) == 1 else pa.concat_arrays(results)

    try:
        for batch in batches:
            columns = list(batch) if isinstance(batch, tuple) else [batch]
            if not columns:
                raise InputError(
                    f"{function}: called without arguments; pass the columns apply_func takes, "
                    f"e.g. {function}(features)"
                )
            n = len(columns[0])
            if n == 0:
                pending.append([Pending(columns=columns, row_offset=offset, done=pa.array([], type=pa.null()))])
            else:
                pending.append(send(columns, offset))
            offset += n
            while len(pending) >= limit:
                yield collect_group(pending.popleft())
        while pending:
            yield collect_group(pending.popleft())
    finally:
        # On an error or an abandoned iterator, let go of what is still in flight.
        left = [p for group in pending for p in group if p.call is not None and p.done is None]
        if left:
            log.debug("%s: abandoning %d calls still in flight", function, len(left))
        for p in left:
            abandon(p)


class _Address(Protocol):
    """The part of a pool's address the loop reads."""

    @property
    def function(self) -> str: ...

    @property
    def max_in_flight(self) -> int: ...


class BatchLoop(ABC):
    """A client whose :meth:`map_batches` is the shared loop over its own transport: a
    subclass sets ``address`` (the function's name and ``max_in_flight``) and gives
    :meth:`refresh` (learn which actors serve now), :meth:`_send`, :meth:`_collect` and
    :meth:`_abandon` (the ``send``, ``collect`` and ``abandon`` of :func:`map_batches`).
    ``_partition`` is the running task's partition while :meth:`map_batches` runs.

    >>> from types import SimpleNamespace
    >>> class Doubler(BatchLoop):
    ...     address = SimpleNamespace(function="f", max_in_flight=1)
    ...     def refresh(self): pass
    ...     def _send(self, columns, offset):
    ...         return [Pending(columns=columns, row_offset=offset, call=columns[0])]
    ...     def _collect(self, p): return pa.array([2 * x for x in p.call.to_pylist()])
    ...     def _abandon(self, p): pass
    >>> [a.to_pylist() for a in Doubler().map_batches([pa.array([1]), (pa.array([2, 3]),)])]
    [[2], [4, 6]]
    """

    address: _Address
    _partition: int | None = None
    _router: Router
    _version: int = -1

    @property
    def version(self) -> int:
        """The model version of the generation this client last read."""
        return self._version

    @property
    def router(self) -> Router:
        """This client's view of the pool (its slots, loads and usable actors)."""
        return self._router

    def _where(self, p: Pending) -> str:
        """``p``'s rows and the running task's partition, for error messages."""
        return p.where(self._partition)

    @abstractmethod
    def refresh(self) -> None: ...

    @abstractmethod
    def _send(self, columns: list[pa.Array], offset: int) -> list[Pending]: ...

    @abstractmethod
    def _collect(self, p: Pending) -> pa.Array: ...

    @abstractmethod
    def _abandon(self, p: Pending) -> None: ...

    def map_batches(self, batches: Iterable[pa.Array | tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
        """Predict every batch of a task, in order (at most ``max_in_flight`` out at once)."""
        self._partition = partition()
        self.refresh()
        yield from map_batches(
            batches,
            function=self.address.function,
            max_in_flight=self.address.max_in_flight,
            send=self._send,
            collect=self._collect,
            abandon=self._abandon,
        )


class LoadProbes:
    """The pool's load as one caller sees it: asks every usable actor how many calls it holds
    (every caller's) and feeds the answers to the caller's :class:`~spark_ray_udf.router.Router`
    (:meth:`~spark_ray_udf.router.Router.report`). Both transports use it with their own call:
    ``ask(i)`` sends actor ``i`` a load probe and returns its handle (a Ray ``ObjectRef``, a
    future) or None when it cannot; ``ready(handles, timeout)`` returns those answered within
    ``timeout`` seconds; ``answer(handle)`` reads one (raising one of ``errors`` when the probe
    failed: that answer is skipped, the batches' own calls detect dead actors).

    :meth:`run` sends probes at most every ``LOAD_PROBE_S`` and takes the answers that are in,
    without waiting, except when the view is older than ``LOAD_STALE_S`` (a task's first
    batch): then up to ``LOAD_WAIT_S``. Probes never answered are asked again after
    ``LOAD_STALE_S``.

    >>> from spark_ray_udf.router import Router
    >>> r = Router(start=0); _ = r.update(1, ["a0", "a1"])
    >>> probes = LoadProbes(
    ...     ask=lambda i: (i, [3, 0][i]), ready=lambda handles, timeout: handles,
    ...     answer=lambda handle: handle[1], errors=(OSError,))
    >>> probes.run(r)
    >>> r.load(0), r.load(1), r.pick()
    (3, 0, 1)
    """

    def __init__(
        self,
        *,
        ask: Callable[[int], Any],
        ready: Callable[[list[Any], float], Iterable[Any]],
        answer: Callable[[Any], int],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self._ask, self._ready, self._answer, self._errors = ask, ready, answer, errors
        self._probes: dict[Any, tuple[int, int, int]] = {}  # handle -> (slot, generation, own)
        self._probed_at = -1e9  # monotonic time the last probes were sent
        self._reported_at = -1e9  # monotonic time a probe last came back

    def run(self, router: Router) -> None:
        """Send the probes that are due and report the answers that are in (see the class)."""
        if len(router.slots) < 2:
            return
        now = time.monotonic()
        if self._probes and now - self._probed_at > LOAD_STALE_S:
            self._probes.clear()  # answers that never came: ask again
        if not self._probes and now - self._probed_at >= LOAD_PROBE_S:
            self._probed_at = now
            for i, slot in enumerate(router.slots):
                if slot.usable:
                    handle = self._ask(i)
                    if handle is not None:
                        self._probes[handle] = (i, router.number, slot.in_flight)
        if not self._probes:
            return
        wait = LOAD_WAIT_S if now - self._reported_at > LOAD_STALE_S else 0.0
        for handle in list(self._ready(list(self._probes), wait)):
            i, number, own = self._probes.pop(handle)
            try:
                router.report(i, number, int(self._answer(handle)), own)
            except self._errors:
                continue
            self._reported_at = time.monotonic()
