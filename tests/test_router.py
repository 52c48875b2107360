"""The router: the pure rules that pick the actor for the next batch, and its bookkeeping (no Ray)."""

from __future__ import annotations

import pytest

from spark_ray_udf.router import Router, choose_actor, retries_left


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


@pytest.mark.parametrize(("in_flight", "usable"), [([0, 0], [True]), ([0], [True, True]), ([], [True])])
def test_mismatched_lengths_are_refused(in_flight: list[int], usable: list[bool]) -> None:
    """in_flight and usable must describe the same actors; the error gives both lengths."""
    with pytest.raises(ValueError, match=rf"in_flight has {len(in_flight)} entries, usable {len(usable)}"):
        choose_actor(in_flight, usable)


def test_local_actor_wins_ties_only() -> None:
    """An actor on the caller's node wins among equally loaded ones, never over a less loaded one."""
    assert choose_actor([1, 1], [True, True], local=[False, True]) == 1
    assert choose_actor([0, 1], [True, True], local=[False, True]) == 0
    assert choose_actor([0, 0], [True, True], local=[True, False], start=1) == 0


def test_router_counts_in_flight_and_spreads() -> None:
    """Four batches over two actors: two each; a done batch frees its slot."""
    r = Router()
    assert r.update(1, ["a", "b"])
    picks = [r.pick() for _ in range(4)]
    assert sorted(picks) == [0, 0, 1, 1]
    r.done(picks[0], 1)
    assert r.pick() == picks[0]


def test_router_ignores_reports_about_an_old_generation() -> None:
    """A batch of generation 1 that comes back after generation 2 was adopted changes nothing."""
    r = Router()
    r.update(1, ["a", "b"])
    i = r.pick()
    assert i is not None
    assert r.update(2, ["c", "d"])
    r.failed(i, 1)
    r.done(i, 1)
    assert [s.usable for s in r.slots] == [True, True] and [s.in_flight for s in r.slots] == [0, 0]
    assert not r.update(2, ["c", "d"])  # the same generation again: slots kept


def test_failed_actor_leaves_rotation_until_readmitted() -> None:
    """A dead actor is never picked; readmit puts it back; none usable gives None."""
    r = Router()
    r.update(1, ["a", "b"])
    r.failed(0, 1)
    assert {r.pick() for _ in range(3)} == {1}
    r.failed(1, 1)
    assert r.pick() is None and r.unusable() == [0, 1]
    r.readmit(0)
    assert r.pick() == 0


def test_router_counts_batches_that_crossed_nodes() -> None:
    """Batches to an actor on another node are counted; the local actor is preferred."""
    r = Router(node="n1")
    r.update(1, ["a", "b"], ["n1", "n2"])
    assert [r.pick() for _ in range(3)] == [0, 1, 0]
    assert r.crossed_nodes() == 1


@pytest.mark.parametrize(("attempts", "max_retries", "ok"), [(0, 0, True), (1, 0, False), (3, 3, True), (4, 3, False)])
def test_retries_left(attempts: int, max_retries: int, ok: bool) -> None:
    """A batch is sent again while it failed at most max_retries times."""
    assert retries_left(attempts, max_retries) is ok


def test_pool_load_adds_other_callers_reported_calls() -> None:
    """Reported calls minus this caller's at the time of the report, plus its own now."""
    from spark_ray_udf.router import pool_load

    assert pool_load(0, 0, 0) == 0
    assert pool_load(2, 3, 1) == 4
    assert pool_load(1, 0, 3) == 1  # a report from before our calls arrived never lowers it


def test_reported_load_steers_picks_and_idle() -> None:
    """An actor busy with other callers' batches is neither idle nor picked first."""
    r = Router()
    r.update(1, ["a", "b"])
    assert r.idle() == 2
    r.report(0, 1, reported=2, own_at_report=0)
    assert r.idle() == 1 and r.pick() == 1
    r.report(1, 0, reported=9, own_at_report=0)  # an older generation's report: ignored
    assert r.load(1) == 1


def test_a_new_generation_starts_without_reports() -> None:
    r = Router()
    r.update(1, ["a", "b"])
    r.report(0, 1, reported=5, own_at_report=0)
    r.update(2, ["c", "d"])
    assert [r.load(i) for i in range(2)] == [0, 0]
