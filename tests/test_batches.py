"""The batch loop both executor clients share (:mod:`spark_ray_udf._batches`), over a fake
transport: no Spark, no Ray."""

from __future__ import annotations

import ast
import concurrent.futures
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from spark_ray_udf import _batches
from spark_ray_udf._batches import BatchLoop, Pending, cut, map_batches
from spark_ray_udf.errors import InputError, ModelApplyError

ROOT = Path(__file__).resolve().parents[1]


class FakeTransport:
    """Calls that run on threads (each ``delay(offset)`` seconds) and answer ``10 * x``;
    counts what is out, and records what was sent, collected and abandoned."""

    def __init__(self, delay: float | None = None, fail_at: int | None = None, idle: int = 1) -> None:
        self.delay = delay
        self.fail_at = fail_at
        self.idle = idle
        self.threads = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.lock = threading.Lock()
        self.out = 0
        self.most_out = 0
        self.sent: list[int] = []
        self.pieces: list[list[int]] = []  # the lengths of each call's columns
        self.collected: list[int] = []
        self.abandoned: list[int] = []
        self.finished: list[int] = []  # offsets in the order their calls completed

    def _call(self, columns: list[pa.Array], offset: int, delay: float) -> pa.Array:
        time.sleep(delay)
        with self.lock:
            self.finished.append(offset)
        return pa.array([10 * x for x in columns[0].to_pylist()])

    def submit(self, p: Pending) -> Pending:
        with self.lock:
            self.out += 1
            self.most_out = max(self.most_out, self.out)
            self.sent.append(p.row_offset)
            self.pieces.append([len(c) for c in p.columns])
        delay = 0.0 if self.delay is None else max(0.0, self.delay - 0.04 * len(self.sent))
        p.call = self.threads.submit(self._call, p.columns, p.row_offset, delay)
        return p

    def send(self, columns: list[pa.Array], offset: int) -> list[Pending]:
        return cut(columns, offset, idle=self.idle, min_rows=1, submit=self.submit)

    def collect(self, p: Pending) -> pa.Array:
        with self.lock:
            self.out -= 1
            self.collected.append(p.row_offset)
        if p.row_offset == self.fail_at:
            raise ModelApplyError(f"f: rows from {p.row_offset} failed")
        out: pa.Array = p.call.result(timeout=10)
        return out

    def abandon(self, p: Pending) -> None:
        with self.lock:
            self.out -= 1
            self.abandoned.append(p.row_offset)
        p.call.cancel()

    def run(self, batches: object, max_in_flight: int = 2) -> Iterator[pa.Array]:
        return map_batches(
            batches,  # type: ignore[arg-type]
            function="f",
            max_in_flight=max_in_flight,
            send=self.send,
            collect=self.collect,
            abandon=self.abandon,
        )


def _batches_of(*sizes: int) -> list[pa.Array]:
    """Consecutive integer batches: sizes (2, 3) give [0, 1], [2, 3, 4]."""
    out, start = [], 0
    for n in sizes:
        out.append(pa.array(range(start, start + n), type=pa.int64()))
        start += n
    return out


def test_results_come_back_in_input_order_when_calls_finish_out_of_order() -> None:
    """Each call finishes sooner than the one sent before it; the results still follow the
    input, and each batch's first row offset counts the rows before it."""
    fake = FakeTransport(delay=0.2)
    out = [a.to_pylist() for a in fake.run(_batches_of(2, 3, 1, 4), max_in_flight=4)]
    assert out == [[0, 10], [20, 30, 40], [50], [60, 70, 80, 90]]
    assert fake.sent == [0, 2, 5, 6]
    assert fake.finished != sorted(fake.finished)  # the fake really answered out of order
    assert fake.abandoned == [] and fake.out == 0


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_at_most_max_in_flight_batches_are_out(limit: int) -> None:
    """Never more than ``max_in_flight`` batches out, and that many (the next batch goes out
    while the earlier ones compute)."""
    fake = FakeTransport(delay=0.02)
    out = [a.to_pylist() for a in fake.run(_batches_of(*[1] * 8), max_in_flight=limit)]
    assert out == [[10 * i] for i in range(8)]
    assert fake.most_out == limit


def test_a_limit_below_one_is_one() -> None:
    fake = FakeTransport()
    assert len(list(fake.run(_batches_of(1, 1, 1), max_in_flight=0))) == 3
    assert fake.most_out == 1


def test_a_consumer_that_stops_early_abandons_what_is_in_flight() -> None:
    """Spark stops reading (a ``limit``): the batches sent but not collected are abandoned,
    and nothing more is sent."""
    fake = FakeTransport()
    results = fake.run(iter(_batches_of(1, 1, 1, 1, 1, 1)), max_in_flight=3)
    assert next(results).to_pylist() == [0]
    results.close()
    assert fake.sent == [0, 1, 2]
    assert fake.abandoned == [1, 2]
    assert fake.out == 0


def test_an_error_while_collecting_abandons_the_batches_behind_it() -> None:
    fake = FakeTransport(fail_at=1)
    with pytest.raises(ModelApplyError, match="f: rows from 1 failed"):
        list(fake.run(_batches_of(1, 1, 1, 1), max_in_flight=3))
    assert fake.collected == [0, 1]
    assert fake.abandoned == [2, 3]


def test_an_error_from_the_input_abandons_every_batch_in_flight() -> None:
    fake = FakeTransport()

    def batches() -> Iterator[pa.Array]:
        yield from _batches_of(1, 1)
        raise RuntimeError("the input broke")

    with pytest.raises(RuntimeError, match="the input broke"):
        list(fake.run(batches(), max_in_flight=3))
    assert fake.collected == [] and fake.abandoned == [0, 1]


def test_a_call_without_arguments_is_an_input_error() -> None:
    """Zero columns: the message names the function; what was already sent is abandoned."""
    fake = FakeTransport()
    with pytest.raises(InputError) as caught:
        list(fake.run([_batches_of(2)[0], ()], max_in_flight=3))
    assert str(caught.value) == (
        "f: called without arguments; pass the columns apply_func takes, e.g. f(features)"
    )
    assert fake.abandoned == [0]


def test_an_empty_batch_is_answered_without_a_call() -> None:
    fake = FakeTransport()
    empty = pa.array([], type=pa.int64())
    out = list(fake.run([empty, _batches_of(2)[0], (empty, empty)], max_in_flight=2))
    assert [(len(a), a.type) for a in out] == [(0, pa.null()), (2, pa.int64()), (0, pa.null())]
    assert fake.sent == [0] and fake.collected == [0]


def test_an_empty_batch_left_in_flight_is_not_abandoned() -> None:
    fake = FakeTransport()
    results = fake.run([_batches_of(1)[0], pa.array([], type=pa.int64()), _batches_of(1)[0]], max_in_flight=3)
    next(results)
    results.close()
    assert fake.abandoned == [1]  # the third batch (offset 1); the empty one made no call


def test_a_batch_cut_for_idle_actors_comes_back_whole() -> None:
    """With 3 idle actors one batch of 7 rows goes out as 3 pieces; its result is one array,
    in order, and the tuple's columns are cut alike."""
    fake = FakeTransport(delay=0.05, idle=3)
    cols = (pa.array(range(7)), pa.array(list("abcdefg")))
    out = list(fake.run([cols], max_in_flight=1))
    assert len(out) == 1 and out[0].to_pylist() == [10 * i for i in range(7)]
    assert fake.sent == [0, 3, 5]
    assert fake.pieces == [[3, 3], [2, 2], [2, 2]]


def test_a_failed_piece_abandons_its_sibling_pieces() -> None:
    """A batch cut into 3 pieces whose first piece fails: the other two are abandoned (their
    actors' in-flight counts are let go), as is the batch behind it."""
    fake = FakeTransport(fail_at=0, idle=3)
    with pytest.raises(ModelApplyError, match="f: rows from 0 failed"):
        list(fake.run([pa.array(range(7)), pa.array(range(7, 10))], max_in_flight=2))
    assert fake.sent[:3] == [0, 3, 5] and fake.collected == [0]
    assert sorted(fake.abandoned) == sorted(fake.sent[1:]) and fake.out == 0


def test_cut_uses_the_piece_callable_and_plain_slices_by_default() -> None:
    column = pa.array(range(6))
    plain = cut([column], 0, idle=2, min_rows=1, submit=lambda p: p)
    assert [p.columns[0].offset for p in plain] == [0, 3]  # slices share the parent
    made: list[tuple[int, int]] = []

    def compact(c: pa.Array, start: int, size: int) -> pa.Array:
        made.append((start, size))
        return pa.concat_arrays([c.slice(start, size)])

    copies = cut([column], 40, idle=2, min_rows=1, submit=lambda p: p, piece=compact)
    assert made == [(0, 3), (3, 3)]
    assert [(p.row_offset, p.columns[0].offset, p.columns[0].to_pylist()) for p in copies] == [
        (40, 0, [0, 1, 2]),
        (43, 0, [3, 4, 5]),
    ]
    assert [p.where(7) for p in copies] == ["rows 40..42 of partition 7", "rows 43..45 of partition 7"]


def test_a_batch_loop_subclass_refreshes_first_and_knows_no_partition_outside_spark() -> None:
    calls: list[str] = []

    class Loop(BatchLoop):
        address = SimpleNamespace(function="g", max_in_flight=2)

        def refresh(self) -> None:
            calls.append(f"refresh {self._partition}")

        def _send(self, columns: list[pa.Array], offset: int) -> list[Pending]:
            calls.append(f"send {offset}")
            return [Pending(columns=columns, row_offset=offset, call=columns[0])]

        def _collect(self, p: Pending) -> pa.Array:
            calls.append(f"collect {p.row_offset}")
            return p.call

        def _abandon(self, p: Pending) -> None:
            calls.append(f"abandon {p.row_offset}")

    results = Loop().map_batches(_batches_of(1, 2, 3))
    assert calls == []  # a generator: nothing happens before the first result is asked for
    assert next(results).to_pylist() == [0]
    results.close()
    assert calls == ["refresh None", "send 0", "send 1", "collect 0", "abandon 1"]


def test_the_module_imports_neither_ray_nor_spark_nor_the_clients() -> None:
    """The Flight client must never import Ray: the shared loop imports only pyarrow and the
    library's ``errors`` and ``router``, and never the clients it serves."""
    tree = ast.parse(Path(_batches.__file__).read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in tree.body
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert {m for m in imported if m and m.startswith("spark_ray_udf")} <= {
        "spark_ray_udf.errors",
        "spark_ray_udf.router",
    }
    code = (
        "import sys\n"
        "import spark_ray_udf._batches, spark_ray_udf._flight\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyspark'))\n"
        "print('loaded', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "loaded []" in proc.stdout, proc.stderr[-3000:]
