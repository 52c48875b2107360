"""Which actor gets the next batch: a pure decision, tested without Ray.

The executor-side client keeps, per actor, how many of its batches are in flight and whether the
actor is usable. :func:`choose_actor` picks the least-loaded usable actor that is below the
per-actor bound; ties go to the first one at or after ``start`` in rotation, so that different
Spark Python workers (each starting at a different offset) spread over the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

from spark_ray_udf.errors import ConfigError


def choose_actor(
    in_flight: Sequence[int],
    usable: Sequence[bool],
    *,
    max_in_flight_per_actor: int | None = None,
    start: int = 0,
) -> int | None:
    """Return the index of the least-loaded usable actor, or None when none can take a batch.

    >>> choose_actor([2, 0, 1], [True, True, True])
    1
    >>> choose_actor([0, 0, 0], [True, True, True], start=2)
    2
    >>> choose_actor([1, 0], [True, False])
    0
    >>> choose_actor([2, 2], [True, True], max_in_flight_per_actor=2) is None
    True
    """
    if len(in_flight) != len(usable):
        raise ConfigError(f"in_flight has {len(in_flight)} entries but usable has {len(usable)}")
    n = len(in_flight)
    best: int | None = None
    for step in range(n):
        i = (start + step) % n
        if not usable[i]:
            continue
        if max_in_flight_per_actor is not None and in_flight[i] >= max_in_flight_per_actor:
            continue
        if best is None or in_flight[i] < in_flight[best]:
            best = i
    return best
