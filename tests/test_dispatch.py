"""choose_actor: the pure rule that picks the actor for the next batch (no Ray)."""

from __future__ import annotations

import pytest

from spark_ray_udf._dispatch import choose_actor


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [([3, 1, 2], 1), ([0, 5, 5], 0), ([4, 4, 1], 2), ([7], 0)],
)
def test_least_loaded_wins(in_flight: list[int], expected: int) -> None:
    """The actor with the fewest batches in flight is chosen."""
    assert choose_actor(in_flight, [True] * len(in_flight)) == expected


@pytest.mark.parametrize("start", range(6))
def test_ties_rotate_from_start(start: int) -> None:
    """Among equally loaded actors the first at or after ``start`` (mod n) wins."""
    assert choose_actor([0, 0, 0], [True, True, True], start=start) == start % 3


def test_ties_rotation_skips_busier_actor() -> None:
    """A tie between actors 0 and 2 starting at 1 goes to 2, the next in rotation."""
    assert choose_actor([1, 2, 1], [True, True, True], start=1) == 2


def test_large_start_is_taken_modulo() -> None:
    """A pid-sized ``start`` still selects a valid index."""
    assert choose_actor([0, 0, 0, 0], [True] * 4, start=4_000_003) == 4_000_003 % 4


def test_least_loaded_beats_rotation() -> None:
    """Rotation only breaks ties: a less loaded actor before ``start`` still wins."""
    assert choose_actor([0, 1, 1], [True, True, True], start=1) == 0


def test_unusable_actor_is_skipped_even_when_idle() -> None:
    """An unusable (dead) actor is never chosen, however idle it is."""
    assert choose_actor([0, 3, 2], [False, True, True]) == 2


def test_no_usable_actor_gives_none() -> None:
    """When every actor is unusable there is no choice."""
    assert choose_actor([0, 0], [False, False]) is None


def test_no_actors_gives_none() -> None:
    """An empty pool gives None rather than an error."""
    assert choose_actor([], [], start=5) is None


def test_per_actor_bound_excludes_full_actors() -> None:
    """Actors at ``max_in_flight_per_actor`` are skipped; the one below the bound is chosen."""
    assert choose_actor([2, 2, 1], [True, True, True], max_in_flight_per_actor=2) == 2


def test_per_actor_bound_all_full_gives_none() -> None:
    """When every usable actor is full there is no choice."""
    assert choose_actor([2, 3], [True, True], max_in_flight_per_actor=2) is None


def test_per_actor_bound_and_unusable_together() -> None:
    """The only actor below the bound is unusable, so nobody is chosen."""
    assert choose_actor([0, 1], [False, True], max_in_flight_per_actor=1) is None


def test_without_bound_busy_actor_is_still_chosen() -> None:
    """With no bound, a busy actor can still take a batch."""
    assert choose_actor([50, 60], [True, True]) == 0


@pytest.mark.parametrize(("in_flight", "usable"), [([0, 0], [True]), ([0], [True, True]), ([], [True])])
def test_mismatched_lengths_are_refused(in_flight: list[int], usable: list[bool]) -> None:
    """in_flight and usable must describe the same actors; the error gives both lengths."""
    with pytest.raises(ValueError, match=rf"in_flight has {len(in_flight)} entries but usable has {len(usable)}"):
        choose_actor(in_flight, usable)
