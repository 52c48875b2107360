"""executor_transport="flight": Spark's Python workers call the actors over Arrow Flight, without Ray.

The pool of this module is registered while the Python workers' ``PYTHONPATH`` (Spark's
``spark.executorEnv.PYTHONPATH``, i.e. ``sc.environment``, which local mode's workers get too)
starts with a folder holding a ``ray`` package that raises ImportError: every query here would
fail if the executor side imported Ray. The driver keeps the real Ray.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf._contract import ActorRef, Entry, decode_entry, encode_entry, flight_token
from spark_ray_udf._flight import TOKEN_HEADER, PoolFlightServer
from spark_ray_udf.errors import ConfigError, InputError
from spark_ray_udf.testing import LinearModel, init_linear, make_linear_model
from tests import helpers
from tests.helpers import N_CLASSES, N_FEATURES, features_np, features_sql

SHADOW_MESSAGE = "ray is not installed on this executor (tests/test_flight.py shadow)"


class Versions(NamedTuple):
    table: str
    v1: int
    v2: int
    m1: LinearModel
    m2: LinearModel


@pytest.fixture(scope="module")
def versions(spark: Any, ray_address: str, tmp_path_factory: Any) -> Versions:
    """Two versions of a linear model in ``ai_model.tests_flight``."""
    root = tmp_path_factory.mktemp("flight")
    m1 = make_linear_model(root / "m1", n_features=N_FEATURES, n_classes=N_CLASSES, seed=1)
    v1 = save_model(spark, root / "m1", "ai_model.tests_flight")
    m2 = make_linear_model(root / "m2", n_features=N_FEATURES, n_classes=N_CLASSES, seed=2)
    v2 = save_model(spark, root / "m2", "ai_model.tests_flight")
    return Versions("ai_model.tests_flight", v1, v2, m1, m2)


@pytest.fixture(scope="module")
def no_ray_executors(spark: Any, tmp_path_factory: Any) -> Iterator[str]:
    """Spark's Python workers started from now on cannot import Ray (the driver still can)."""
    shadow = Path(tmp_path_factory.mktemp("shadow"))
    (shadow / "ray").mkdir()
    (shadow / "ray" / "__init__.py").write_text(f"raise ImportError({SHADOW_MESSAGE!r})\n")
    env = spark.sparkContext.environment
    before = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(shadow)
    yield str(shadow)
    if before is None:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def flight_model(spark: Any, versions: Versions, no_ray_executors: str) -> Iterator[Any]:
    """``fl_predict(features)``: double scores of v1, 2 actors, served over Flight."""
    with register_ray_model(
        spark, versions.table, "fl_predict", init_linear, helpers.apply_top_score,
        version=versions.v1, num_actors=2, max_in_flight=2, executor_transport="flight",
    ) as model:
        yield model


def _scores(model: LinearModel, ids: Any) -> list[float]:
    return model.scores(features_np(ids)).max(axis=1).tolist()


def _query(spark: Any, start: int, n: int, parts: int = 3, name: str = "fl_predict") -> list[Any]:
    return sorted(spark.sql(
        f"select id, {name}({features_sql()}) as s from range({start}, {start + n}, 1, {parts})"
    ).collect())


def test_executors_cannot_import_ray(spark, no_ray_executors):
    """The shadow works: a Spark task started under it fails to import Ray (so the queries
    below prove the flight path never imports it)."""

    def probe(_: Any) -> str:
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            return str(exc)
        return "imported"

    assert spark.sparkContext.parallelize([0], 1).map(probe).collect() == [SHADOW_MESSAGE]


def test_sql_over_flight_is_exact_and_counted(spark, versions, flight_model):
    """SQL through a flight pool equals the in-process math exactly, on executors without Ray;
    the actors count the rows under door "sql"."""
    before = flight_model.stats()["rows"]["sql"]
    with helpers.spark_conf(spark, "spark.sql.execution.arrow.maxRecordsPerBatch", "100"):
        rows = _query(spark, 0, 1000)
    assert [r.id for r in rows] == list(range(1000))
    assert [r.s for r in rows] == _scores(versions.m1, np.arange(1000))
    stats = flight_model.stats()
    assert stats["rows"]["sql"] - before == 1000
    assert stats["errors"]["sql"] == 0
    assert all(i.flight_uri.startswith("grpc://127.0.0.1:") for i in flight_model.actors)


def test_wrong_token_is_refused(flight_model):
    """An actor's Flight endpoint and the driver's refuse a call without the pool's token."""
    uri = flight_model.actors[0].flight_uri
    for target in (uri, flight_model.address.directory_uri):
        client = fl.FlightClient(target)
        try:
            for headers in ([], [(TOKEN_HEADER.encode(), flight_token("another secret").encode())]):
                opts = fl.FlightCallOptions(timeout=5, headers=headers)
                with pytest.raises(fl.FlightUnauthenticatedError, match="pool's token"):
                    list(client.do_action("entry", options=opts))
            good = fl.FlightCallOptions(
                timeout=5,
                headers=[(TOKEN_HEADER.encode(), flight_token(flight_model.address.secret).encode())],
            )
            assert [r.body.to_pybytes() for r in client.do_action("ping", options=good)] == [b"ok"]
        finally:
            client.close()


def test_forged_entry_is_refused():
    """An entry not signed with the pool's secret is refused, and an entry without Flight URIs
    (written before this field existed) still decodes."""
    e = Entry(1, 3, (ActorRef("a0", "ff", "n1", "grpc://10.0.0.1:5"),))
    assert decode_entry(encode_entry(e, "key"), "key", where="f") == e
    old = b'{"actors": [["a0", "ff", "n1"]], "number": 1, "version": 3}'
    from spark_ray_udf._contract import sign

    blob = sign("key", old).encode() + b"\n" + old
    assert decode_entry(blob, "key", where="f").actors[0].flight_uri == ""
    with pytest.raises(Exception, match="not signed"):
        decode_entry(encode_entry(e, "other"), "key", where="f")


def test_server_maps_library_errors_back():
    """A library error raised by predict reaches the caller as the same class and message."""
    from spark_ray_udf._flight import error_from_info

    def predict(columns: list[pa.Array], offset: int, partition: int | None) -> pa.Array:
        raise InputError(f"f: argument 1: row {offset} is null\nmore")

    server = PoolFlightServer("127.0.0.1", "tok", who="f", predict=predict)
    client = fl.FlightClient(server.uri)
    try:
        opts = fl.FlightCallOptions(timeout=5, headers=[(TOKEN_HEADER.encode(), b"tok")])
        command = json.dumps({"row_offset": 3, "partition": None}).encode()
        writer, reader = client.do_exchange(fl.FlightDescriptor.for_command(command), options=opts)
        batch = pa.RecordBatch.from_arrays([pa.array([1.0])], names=["c0"])
        writer.begin(batch.schema)
        writer.write_batch(batch)
        writer.done_writing()
        with pytest.raises(fl.FlightServerError) as info:
            reader.read_all()
        err = error_from_info(info.value.extra_info, "?")
        assert type(err) is InputError and str(err) == "f: argument 1: row 3 is null\nmore"
    finally:
        client.close()
        server.shutdown()


def test_apply_error_reaches_the_task(spark, versions, no_ray_executors):
    """apply_func raising on an actor fails the Spark task with the library's error and the
    message a Ray call gives (the apply_func and the row range)."""
    with register_ray_model(
        spark, versions.table, "fl_bad", init_linear, helpers.apply_misbehaving,
        num_actors=1, executor_transport="flight",
    ) as model:
        with pytest.raises(Exception) as info:
            spark.sql(f"select fl_bad(1, {features_sql()}) from range(10)").collect()
        text = str(info.value)
        assert "ModelApplyError" in text and "apply_misbehaving divided by zero" in text
        assert "apply_func tests.helpers.apply_misbehaving raised on actor 0" in text
        assert model.stats()["errors"]["sql"] >= 1


def test_transport_is_validated(spark, versions):
    """An unknown executor_transport is refused before anything starts, naming the allowed values."""
    with pytest.raises(ConfigError, match="'ray' or 'flight'"):
        register_ray_model(
            spark, versions.table, "fl_x", init_linear, helpers.apply_top_score,
            executor_transport="grpc",  # type: ignore[arg-type]
        )


def test_reload_during_queries(spark, versions, flight_model):
    """Queries running through reload() keep working (no failed batch); after it, v2 answers."""
    errors: list[BaseException] = []
    done = threading.Event()
    results: list[tuple[int, list[Any]]] = []

    def loop() -> None:
        k = 0
        while not done.is_set() and k < 200:
            try:
                with_rows = _query(spark, k * 1000, 600)
                results.append((k * 1000, with_rows))
            except BaseException as exc:  # reported by the test
                errors.append(exc)
                return
            k += 1

    with helpers.spark_conf(spark, "spark.sql.execution.arrow.maxRecordsPerBatch", "50"):
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(1.0)
        assert flight_model.reload(versions.v2) == versions.v2
        time.sleep(1.5)
        done.set()
        thread.join(120)
    assert not thread.is_alive()
    assert errors == [], [str(e)[:3000] for e in errors]
    assert len(results) >= 2
    for start, rows in results:  # every row is v1's or v2's answer, never anything else
        ids = np.arange(start, start + 600)
        got = [r.s for r in rows]
        one, two = _scores(versions.m1, ids), _scores(versions.m2, ids)
        assert all(g in (a, b) for g, a, b in zip(got, one, two)), f"query from {start}"
    rows = _query(spark, 0, 300)
    assert [r.s for r in rows] == _scores(versions.m2, np.arange(300))
    assert flight_model.stats()["version"] == versions.v2


def test_close_stops_the_flight_servers(spark, versions, no_ray_executors):
    """close() stops the actors' Flight servers and the driver's endpoint."""
    model = register_ray_model(
        spark, versions.table, "fl_close", init_linear, helpers.apply_top_score,
        num_actors=1, executor_transport="flight",
    )
    uris = [model.actors[0].flight_uri, model.address.directory_uri]
    model.close()
    for uri in uris:
        client = fl.FlightClient(uri)
        try:
            with pytest.raises(fl.FlightError):
                list(client.do_action("ping", options=fl.FlightCallOptions(timeout=3)))
        finally:
            client.close()
    with pytest.raises(Exception):
        spark.sql(f"select fl_close({features_sql()}) from range(3)").collect()


def test_port_range_skips_a_taken_port():
    """With SPARK_RAY_UDF_FLIGHT_PORTS an actor's server binds the first free port of the range."""
    from spark_ray_udf._flight import start_server

    def predict(columns: list[pa.Array], offset: int, partition: int | None) -> pa.Array:
        return columns[0]

    first = PoolFlightServer("127.0.0.1", "tok", who="a", predict=predict)
    ports = range(first.port, min(first.port + 50, 65536))
    second = start_server("127.0.0.1", "tok", who="b", predict=predict, load=lambda: 0, ports=ports)
    try:
        assert second.port in ports and second.port != first.port
    finally:
        second.shutdown()
        first.shutdown()


def test_restarted_actor_is_found_on_its_new_port(spark, versions, no_ray_executors):
    """An actor killed outright is restarted by Ray on a new Flight port; the pool's watcher
    republishes the entry and the next query is exact again."""
    import os
    import signal

    with register_ray_model(
        spark, versions.table, "fl_restart", init_linear, helpers.apply_top_score,
        version=versions.v1, num_actors=1, executor_transport="flight",
    ) as model:
        assert [r.s for r in _query(spark, 0, 200, 2, "fl_restart")] == _scores(versions.m1, np.arange(200))
        old_uri, generation = model.actors[0].flight_uri, model.stats()["generation"]
        os.kill(model.actor_pids()[0], signal.SIGKILL)
        helpers.wait_for(
            lambda: model.stats()["generation"] > generation, 60, "the entry republished"
        )
        assert model.actors[0].flight_uri != old_uri
        assert [r.s for r in _query(spark, 0, 200, 2, "fl_restart")] == _scores(versions.m1, np.arange(200))


def test_stream_runs_through_reload(spark, versions, no_ray_executors, tmp_path):
    """A Structured Streaming query over a flight pool keeps running through reload(): no
    failed batch, rows answered by v1 then by v2, each exactly that version's math."""
    with register_ray_model(
        spark, versions.table, "fl_stream", init_linear, helpers.apply_top_score,
        version=versions.v1, num_actors=1, with_version=True, executor_transport="flight",
    ) as model:
        stream = (
            spark.readStream.format("rate").option("rowsPerSecond", 200).load()
            .selectExpr("value as id").selectExpr("id", f"{features_sql()} as features")
        )
        stream.createOrReplaceTempView("fl_stream_in")
        query = (
            spark.sql("select id, fl_stream(features) as p from fl_stream_in")
            .writeStream.format("memory").queryName("fl_stream_out")
            .option("checkpointLocation", str(tmp_path / "ckpt"))
            .trigger(processingTime="300 milliseconds").start()
        )

        def count(version: int) -> int:
            return spark.sql(
                f"select count(*) from fl_stream_out where p.model_version = {version}"
            ).head()[0]

        try:
            helpers.wait_for(lambda: count(versions.v1) >= 50 or query.exception() is not None,
                             120, "the stream's first rows")
            model.reload(versions.v2)
            helpers.wait_for(lambda: count(versions.v2) >= 50 or query.exception() is not None,
                             120, "rows answered by v2")
        finally:
            query.stop()
        assert query.exception() is None
        rows = spark.sql("select id, p.prediction as s, p.model_version as v from fl_stream_out").collect()
        for version, linear in ((versions.v1, versions.m1), (versions.v2, versions.m2)):
            mine = sorted((r.id, r.s) for r in rows if r.v == version)
            assert mine, version
            assert [s for _, s in mine] == _scores(linear, np.array([i for i, _ in mine]))


# --- the executor-side client against real Flight servers, without Spark or Ray -----------------

SECRET = "test-secret"


def _echo(columns: list[pa.Array], offset: int, partition: int | None) -> pa.Array:
    return columns[0]


class _FakePool:
    """Actor servers that echo their input and a driver endpoint serving a signed entry."""

    def __init__(self, n: int) -> None:
        self.number = 0
        self.blob = b""
        self.actors: list[PoolFlightServer] = []
        self.driver = PoolFlightServer("127.0.0.1", flight_token(SECRET), who="driver", entry=lambda: self.blob)
        self.publish(n)

    def publish(self, n: int) -> list[PoolFlightServer]:
        fresh = [PoolFlightServer("127.0.0.1", flight_token(SECRET), who=f"a{i}", predict=_echo) for i in range(n)]
        self.number += 1
        refs = tuple(ActorRef(f"a{i}", f"id{self.number}-{i}", "", s.uri) for i, s in enumerate(fresh))
        self.blob = encode_entry(Entry(self.number, self.number, refs), SECRET)
        self.actors += fresh
        return fresh

    def address(self, **kw: Any) -> Any:
        from spark_ray_udf._contract import PoolAddress

        opts = {"max_in_flight": 2, "call_timeout_s": 10.0, "max_retries": 2, **kw}
        return PoolAddress(
            function="f", ray_address="-", namespace="ns", token="t", auth_mode="",
            secret=SECRET, min_split_rows=None, transport="flight",
            directory_uri=self.driver.uri, **opts,
        )

    def close(self) -> None:
        for s in [*self.actors, self.driver]:
            s.shutdown()


def _batches(n: int, size: int = 10) -> list[pa.Array]:
    return [pa.array(range(k * size, (k + 1) * size), type=pa.int64()) for k in range(n)]


def test_client_moves_off_a_dead_actor():
    """A batch sent to an actor whose server is gone goes to the live one; results stay in order."""
    from spark_ray_udf._flight import FlightPoolClient

    pool = _FakePool(2)
    try:
        pool.actors[1].shutdown()
        client = FlightPoolClient(pool.address())
        out = list(client.map_batches(_batches(8)))
        assert pa.concat_arrays(out).to_pylist() == list(range(80))
        assert client.router.unusable() == [1]
    finally:
        pool.close()


CANCELLED_CALL = """
import time
import pyarrow as pa, pyarrow.flight as fl
from spark_ray_udf._flight import FlightPoolClient
from tests.test_flight import _FakePool, _batches

def cancel(columns, offset, partition):
    raise fl.FlightCancelledError("actor server shutting down")

pool = _FakePool(2)
pool.actors[0]._predict = cancel
out = list(FlightPoolClient(pool.address(max_in_flight=1)).map_batches(_batches(4)))
assert pa.concat_arrays(out).to_pylist() == list(range(40)), out
time.sleep(0.5)  # a simulated Ctrl-C would land on this (the main) thread by now
pool.close()
print("served")
"""


def test_a_cancelled_call_does_not_interrupt_the_main_thread():
    """A call the server cancels (an actor's server shutting down under a reload) is retried on
    another actor, and no KeyboardInterrupt reaches the main thread: pyarrow's ``read_all()``
    simulates Ctrl-C on a cancelled call, which killed a Spark task in CI (``read_table``).
    In a subprocess, so that a regression fails this test and not the pytest session."""
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-c", CANCELLED_CALL], cwd=Path(__file__).parent.parent,
            capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired as exc:  # interrupted mid-call, it waits on the call's threads
        raise AssertionError(f"the client hung after a cancelled call: {exc.stderr!r:.3000}") from None
    assert proc.returncode == 0 and proc.stdout.strip() == "served", proc.stderr[-3000:]
    assert "KeyboardInterrupt" not in proc.stderr


def test_client_gives_up_after_max_retries():
    """With every actor gone, a batch fails with RetriesExhaustedError after max_retries."""
    from spark_ray_udf._flight import FlightPoolClient
    from spark_ray_udf.errors import RetriesExhaustedError

    pool = _FakePool(2)
    try:
        for s in pool.actors:
            s.shutdown()
        with pytest.raises(RetriesExhaustedError, match="rows 0..9"):
            list(FlightPoolClient(pool.address(max_retries=2)).map_batches(_batches(2)))
    finally:
        pool.close()


class _SlowCounted:
    """An actor's predict that takes ``seconds`` and counts the calls it holds, as the actor's
    ``load()`` does."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.held, self.calls, self.lock = seconds, 0, 0, threading.Lock()

    def predict(self, columns: list[pa.Array], offset: int, partition: int | None) -> pa.Array:
        with self.lock:
            self.held += 1
            self.calls += 1
        try:
            time.sleep(self.seconds)
            return columns[0]
        finally:
            with self.lock:
                self.held -= 1

    def load(self) -> int:
        with self.lock:
            return self.held


def test_flight_callers_see_the_pool_load():
    """Two Flight callers that would both pick actor 0 on their own counts: while the first
    one's slow batch runs there, the second one's DoAction("load") probe shows it, and its batch
    goes to actor 1 (the load view of the Ray path, over Flight)."""
    from spark_ray_udf._flight import FlightPoolClient

    pool = _FakePool(0)
    actors = [_SlowCounted(1.5), _SlowCounted(1.5)]
    pool.actors = [
        PoolFlightServer("127.0.0.1", flight_token(SECRET), who=f"a{i}", predict=a.predict, load=a.load)
        for i, a in enumerate(actors)
    ]
    refs = tuple(ActorRef(f"a{i}", f"id-{i}", "", srv.uri) for i, srv in enumerate(pool.actors))
    pool.blob = encode_entry(Entry(5, 5, refs), SECRET)
    try:
        first, second = FlightPoolClient(pool.address()), FlightPoolClient(pool.address())
        for c in (first, second):
            c.refresh()
            c.router.start = 0
        thread = threading.Thread(target=lambda: list(first.map_batches(_batches(1))))
        thread.start()
        helpers.wait_for(lambda: actors[0].load() == 1, 30, "the first batch to reach actor 0")

        def second_sees_it() -> bool:
            second._loads.run(second.router)
            return second.router.load(0) >= 1

        helpers.wait_for(second_sees_it, 30, "the second caller to see actor 0's load")
        assert second.router.pick() == 1
        second.router.done(1, second.router.number)
        out = list(second.map_batches(_batches(1)))
        assert out[0].to_pylist() == list(range(10))
        assert actors[1].calls == 1 and actors[0].calls == 1
        thread.join(30)
        assert not thread.is_alive()
    finally:
        pool.close()


def test_client_follows_a_new_generation_mid_stream():
    """The entry changes and the old actors stop mid-task: the task's later batches go to the
    new actors, none fails, and none counts as a retry (max_retries=0)."""
    from spark_ray_udf._flight import FlightPoolClient

    pool = _FakePool(2)
    try:
        client = FlightPoolClient(pool.address(max_retries=0))
        results = client.map_batches(_batches(10))
        got = [next(results), next(results)]
        old = list(pool.actors)
        pool.publish(2)
        for s in old:
            s.shutdown()
        got += list(results)
        assert pa.concat_arrays(got).to_pylist() == list(range(100))
        assert client.version == 2
    finally:
        pool.close()


def test_client_refuses_an_entry_signed_by_someone_else():
    """A driver endpoint answering an entry not signed with the pool's secret is refused."""
    from spark_ray_udf._flight import FlightPoolClient
    from spark_ray_udf.errors import PoolIntegrityError

    pool = _FakePool(1)
    try:
        pool.blob = encode_entry(Entry(9, 9, (ActorRef("x", "y", "", "grpc://127.0.0.1:1"),)), "forger")
        with pytest.raises(PoolIntegrityError, match="not signed"):
            list(FlightPoolClient(pool.address()).map_batches(_batches(1)))
    finally:
        pool.close()
