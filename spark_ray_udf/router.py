"""Which actor gets the next batch, and when to give up: pure bookkeeping, no Ray, no waits.

A :class:`Router` keeps one :class:`Slot` per actor of the generation a caller knows (in-flight
count, usable or not, node). Both doors use it: the Spark loop in :mod:`spark_ray_udf.client`
(blocking waits) and the HTTP door in :mod:`spark_ray_udf.serve` (async waits). The caller does
the transport: it asks :meth:`Router.pick` for a slot, sends the batch, and reports back with
:meth:`Router.done` or :meth:`Router.failed`; slots carry the generation number, so a report about
an actor of an older generation changes nothing.

The choosing rule (:func:`choose_actor`) is least-loaded first, then an actor on the caller's own
node (no cross-node copy of the batch), then rotation from ``start`` so that Spark Python workers
(each starting at a different offset) spread over the pool.

"Load" is the pool's, not only this caller's: each actor reports how many calls it holds
(running or waiting their turn, from every caller), the caller reports it here with
:meth:`Router.report`, and :func:`pool_load` combines that (stale) figure with the caller's own
exact count. The Spark loop probes every actor a few times a second (all of them: pools are
small, so the full view costs what Ray Serve's power-of-two-choices sample does and misses
nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from spark_ray_udf.errors import ConfigError


def pool_load(own: int, reported: int, own_at_report: int) -> int:
    """An actor's load as a caller sees it: its own calls in flight now, plus the calls of other
    callers that the actor last reported (``reported`` minus this caller's calls at the time).

    >>> pool_load(1, 0, 0)        # nothing reported yet: own calls only
    1
    >>> pool_load(1, 5, 2)        # 3 calls of others were there at the report
    4
    >>> pool_load(0, 1, 2)        # ours had not arrived yet: never below our own count
    0
    """
    return own + max(0, reported - own_at_report)


def choose_actor(
    in_flight: Sequence[int],
    usable: Sequence[bool],
    *,
    local: Sequence[bool] | None = None,
    start: int = 0,
) -> int | None:
    """Return the index of the least-loaded usable actor, or None when none is usable.

    Among equally loaded actors one on this node (``local``) wins; then the first one at or
    after ``start`` in rotation.

    >>> choose_actor([2, 0, 1], [True, True, True])
    1
    >>> choose_actor([0, 0, 0], [True, True, True], start=2)
    2
    >>> choose_actor([0, 0, 0], [True, True, True], local=[False, False, True])
    2
    >>> choose_actor([1, 0], [True, False])
    0
    >>> choose_actor([0, 0], [False, False]) is None
    True
    """
    if len(in_flight) != len(usable) or (local is not None and len(local) != len(usable)):
        raise ConfigError(
            f"in_flight has {len(in_flight)} entries, usable {len(usable)}"
            + ("" if local is None else f", local {len(local)}")
        )
    n = len(in_flight)
    best: int | None = None
    best_rank: tuple[int, int] = (0, 0)
    for step in range(n):
        i = (start + step) % n
        if not usable[i]:
            continue
        rank = (in_flight[i], 0 if local is not None and local[i] else 1)
        if best is None or rank < best_rank:
            best, best_rank = i, rank
    return best


@dataclass
class Slot:
    """One actor as a caller sees it."""

    key: str  # the actor's id
    node: str = ""
    in_flight: int = 0  # this caller's calls out to it
    reported: int = 0  # calls the actor said it held (every caller's), at the last report
    own_at_report: int = 0  # this caller's in_flight when that report was asked for
    usable: bool = True
    sent: int = 0  # batches sent to it by this caller
    remote: int = 0  # of which to an actor on another node


@dataclass
class Router:
    """The slots of one generation, for one caller (a Spark Python worker or an HTTP replica).

    >>> r = Router(node="n1")
    >>> r.update(1, ["a", "b"], ["n2", "n1"])
    True
    >>> r.pick()
    1
    >>> r.pick()
    0
    >>> r.done(1, 1); r.failed(0, 1); r.usable_count()
    1
    >>> r.pick(), r.crossed_nodes()
    (1, 1)

    Other callers' load, as the actors reported it, counts too:

    >>> r = Router(); r.update(1, ["a", "b"])
    True
    >>> r.report(0, 1, reported=3, own_at_report=0); r.pick(), r.pick(), r.pick()
    (1, 1, 1)
    """

    node: str = ""  # the caller's node, for locality
    number: int = -1  # the generation the slots belong to
    slots: list[Slot] = field(default_factory=list)
    start: int = 0

    def update(self, number: int, keys: Sequence[str], nodes: Sequence[str] = ()) -> bool:
        """Adopt generation ``number`` with these actors; False when it is the one known."""
        if number == self.number:
            return False
        nodes = list(nodes) or [""] * len(keys)
        self.number = number
        self.slots = [Slot(key=k, node=n) for k, n in zip(keys, nodes)]
        return True

    def forget(self) -> None:
        """Drop the known generation, so the next :meth:`update` adopts whatever is published."""
        self.number = -1

    def load(self, i: int) -> int:
        """Slot ``i``'s load: this caller's calls plus other callers' last reported ones."""
        s = self.slots[i]
        return pool_load(s.in_flight, s.reported, s.own_at_report)

    def report(self, i: int, number: int, reported: int, own_at_report: int) -> None:
        """Slot ``i``'s actor said it holds ``reported`` calls, when this caller had
        ``own_at_report`` out to it. Reports about an older generation change nothing."""
        if number == self.number and 0 <= i < len(self.slots):
            self.slots[i].reported = max(0, reported)
            self.slots[i].own_at_report = max(0, own_at_report)

    def pick(self) -> int | None:
        """The slot for the next batch (counted as in flight), or None when none is usable."""
        local = [bool(self.node) and s.node == self.node for s in self.slots]
        i = choose_actor(
            [self.load(i) for i in range(len(self.slots))],
            [s.usable for s in self.slots],
            local=local if any(local) else None,
            start=self.start,
        )
        if i is None:
            return None
        self.start = i + 1
        slot = self.slots[i]
        slot.in_flight += 1
        slot.sent += 1
        if self.node and slot.node and slot.node != self.node:
            slot.remote += 1
        return i

    def done(self, i: int, number: int) -> None:
        """A batch sent to slot ``i`` of generation ``number`` came back (or was abandoned)."""
        if number == self.number and 0 <= i < len(self.slots):
            self.slots[i].in_flight = max(0, self.slots[i].in_flight - 1)

    def failed(self, i: int, number: int) -> None:
        """The actor of slot ``i`` died under a batch: out of rotation until :meth:`readmit`."""
        if number == self.number and 0 <= i < len(self.slots):
            self.done(i, number)
            self.slots[i].usable = False

    def readmit(self, i: int) -> None:
        """The actor of slot ``i`` answers again."""
        self.slots[i].usable = True

    def idle(self) -> int:
        """Usable slots with no load (nothing from this caller, nothing others reported)."""
        return sum(s.usable and self.load(i) == 0 for i, s in enumerate(self.slots))

    def unusable(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if not s.usable]

    def usable_count(self) -> int:
        return sum(s.usable for s in self.slots)

    def crossed_nodes(self) -> int:
        """Batches this caller sent to an actor on another node."""
        return sum(s.remote for s in self.slots)


def retries_left(attempts: int, max_retries: int) -> bool:
    """True while a batch that failed ``attempts`` times may be sent again.

    >>> retries_left(3, 3), retries_left(4, 3)
    (True, False)
    """
    return attempts <= max_retries


def plan_split(n_rows: int, idle: int, *, min_rows: int | None) -> list[int]:
    """Sizes of the pieces one batch of ``n_rows`` is cut into, to keep ``idle`` actors busy.

    A batch is cut only when more than one actor is idle and each piece keeps at least
    ``min_rows`` rows (``None`` never cuts); pieces differ by at most one row and keep the
    rows' order, so the results are put back together by concatenation.

    >>> plan_split(1200, 2, min_rows=256)
    [600, 600]
    >>> plan_split(1000, 4, min_rows=300)
    [334, 333, 333]
    >>> plan_split(400, 2, min_rows=256), plan_split(10_000, 1, min_rows=1), plan_split(9, 3, min_rows=None)
    ([400], [10000], [9])
    """
    if min_rows is None or idle < 2 or n_rows < 2 * max(1, min_rows):
        return [n_rows]
    k = min(idle, n_rows // max(1, min_rows))
    base, extra = divmod(n_rows, k)
    return [base + (1 if i < extra else 0) for i in range(k)]
