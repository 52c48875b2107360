"""The HTTP door (spark_ray_udf/serve.py): real Spark, Ray, Ray Serve and HTTP over loopback.

One pool (2 actors, ``serve_predict``) answers SQL and HTTP; a second, tiny one
(``serve_overload``, 1 actor, one request at a time) shows the 503 bound and keeps Serve up
while the first one's closed route answers 404. The tests run in file order and share the
pools: counters are compared as differences, and the reload test comes after the counting ones
(a reload starts new actors, with new counters).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pytest

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.errors import InputError
from spark_ray_udf.serve import ARROW_STREAM, InputSpec, app_name, input_spec, parse_json
from spark_ray_udf.testing import LinearModel, make_linear_model
from tests.helpers import (
    N_FEATURES,
    apply_slow_score,
    features_np,
    features_sql,
    free_port,
    init_with_conf,
    wait_for,
)

TABLE = "ai_model.tests_serve"  # its own table: the reload test commits a second version
REL = 1e-12  # one matrix product on other batch shapes may round the last bit differently


class Served(NamedTuple):
    model: Any  # RayModel serve_predict
    url: str
    linear: LinearModel
    overload: Any  # RayModel serve_overload
    overload_url: str
    port: int
    tmp: Path


@pytest.fixture(scope="module")
def served(spark: Any, ray_address: str, tmp_path_factory: Any) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    linear = make_linear_model(tmp / "v1", n_features=N_FEATURES, seed=0)
    save_model(spark, tmp / "v1", TABLE)
    port = free_port()
    model = register_ray_model(
        spark, TABLE, "serve_predict", init_with_conf, apply_slow_score,
        num_actors=2, conf={"sleep_s": 0.002},
    )
    overload = None
    try:
        url = model.serve(port=port, max_batch_size=16, batch_wait_timeout_s=0.01)
        overload = register_ray_model(
            spark, TABLE, "serve_overload", init_with_conf, apply_slow_score,
            num_actors=1, conf={"sleep_s": 0.2},
        )
        overload_url = overload.serve(
            port=port, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1,
        )
        yield Served(model, url, linear, overload, overload_url, port, tmp)
    finally:
        model.close()
        if overload is not None:
            overload.close()


# --- HTTP over loopback ---------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
    content_type: str = "application/json",
) -> Reply:
    conn.request(method, path, body=body, headers={"Content-Type": content_type})
    r = conn.getresponse()
    return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def post_json(port: int, path: str, payload: Any) -> Reply:
    conn = connect(port)
    try:
        return request(conn, "POST", path, json.dumps(payload).encode())
    finally:
        conn.close()


def arrow_body(columns: list[pa.Array]) -> bytes:
    batch = pa.record_batch(columns, names=[f"a{i}" for i in range(len(columns))])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def expected(linear: LinearModel, ids: Any) -> list[float]:
    return linear.scores(features_np(ids)).max(axis=1).tolist()


def sql_scores(spark: Any, function: str, n: int) -> list[float]:
    # sorted here: an ORDER BY samples its input first, which would call the function twice
    rows = spark.sql(f"select id, {function}({features_sql()}) as p from range({n})").collect()
    return [r["p"] for r in sorted(rows, key=lambda r: r["id"])]


# --- tests without Ray -------------------------------------------------------------------------


def test_import_works_without_serve_and_names_the_extra() -> None:
    """With ray.serve missing, the package imports and serve's import error names the extra."""
    code = (
        "import sys; sys.modules['ray.serve'] = None\n"
        "import spark_ray_udf\n"
        "from spark_ray_udf.serve import import_serve\n"
        "from spark_ray_udf.errors import MissingDependencyError\n"
        "try:\n    import_serve()\nexcept MissingDependencyError as e:\n"
        "    assert isinstance(e, ImportError); print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'spark-ray-udf[serve]'" in out.stdout


@pytest.mark.parametrize(
    ("body", "spec", "message"),
    [
        ({"instances": [[1, 2], "x"]}, InputSpec(), "instances[1]: expected list<item: double>, got a string"),
        ({"instances": [[1.0, [1, 2]], [2.0]]}, input_spec([pa.float64(), pa.list_(pa.float64())]),
         "instances[1]: expected a list of 2 argument values (double, list<item: double>), got a list of 1"),
        ({"instances": [{"a": 1}]}, input_spec({"a": pa.int64(), "b": pa.string()}),
         "instances[0]: expected the keys ['a', 'b'], got ['a']"),
        ({"inputs": {"a": [1, 2], "b": [1]}}, InputSpec(), "inputs: every argument needs one value per row"),
        ({"inputs": {"a": ["x"]}}, input_spec({"a": pa.float64()}), "inputs['a'][0]: expected double, got a string"),
        ([1, 2], InputSpec(), 'body: expected a JSON object with "instances"'),
    ],
)
def test_bad_json_names_field_and_type(body: Any, spec: InputSpec, message: str) -> None:
    """Each malformed body is refused naming the field and the type expected."""
    with pytest.raises(InputError) as info:
        parse_json(body, spec)
    assert message in str(info.value)


def test_several_arguments_by_position_and_by_name() -> None:
    """A list per row or an object per row make one column per argument, in order."""
    spec = input_spec({"x": pa.float64(), "v": pa.list_(pa.float32())})
    by_list = parse_json({"instances": [[1, [1, 2]], [2, [3, 4]]]}, spec)
    by_name = parse_json({"instances": [{"v": [1, 2], "x": 1}, {"x": 2, "v": [3, 4]}]}, spec)
    columns = parse_json({"inputs": {"v": [[1, 2], [3, 4]], "x": [1, 2]}}, spec)
    for cols in (by_list, by_name, columns):
        assert [c.type for c in cols] == [pa.float64(), pa.list_(pa.float32())]
        assert [c.to_pylist() for c in cols] == [[1.0, 2.0], [[1.0, 2.0], [3.0, 4.0]]]


# --- both doors -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_http_equals_sql_for_json_and_arrow(spark: Any, served: Served) -> None:
    """The same rows through SQL, JSON (instances and inputs) and Arrow give the same scores,
    and the http counter grows by exactly the rows sent."""
    model, linear = served.model, served.linear
    n = 60
    ids = np.arange(n)
    x = features_np(ids)
    sql = sql_scores(spark, "serve_predict", n)
    assert sql == pytest.approx(expected(linear, ids), rel=REL)
    before = model.stats()
    path = path_of(served.url) + "/predict"

    r1 = post_json(served.port, path, {"instances": x.tolist()})
    r2 = post_json(served.port, path, {"inputs": {"features": x.tolist()}})
    conn = connect(served.port)
    try:
        col = pa.array(x.tolist(), type=pa.list_(pa.float64()))
        r3 = request(conn, "POST", path, arrow_body([col]), ARROW_STREAM)
        meta = request(conn, "GET", path_of(served.url))
    finally:
        conn.close()
    for r in (r1, r2, r3):
        assert r.status == 200, r.body[:500]
    assert r1.json() == {"predictions": pytest.approx(sql, rel=REL), "model_version": model.version}
    assert r2.json()["predictions"] == pytest.approx(sql, rel=REL)
    assert r3.headers["content-type"] == ARROW_STREAM
    table = pa.ipc.open_stream(r3.body).read_all()
    assert table.column("prediction").to_pylist() == pytest.approx(sql, rel=REL)
    assert int(table.schema.metadata[b"model_version"]) == model.version

    after = model.stats()
    assert after["rows"]["http"] - before["rows"]["http"] == 3 * n
    assert after["rows"]["sql"] == before["rows"]["sql"]
    assert meta.status == 200
    info = meta.json()
    assert (info["name"], info["table"], info["version"], info["return_type"]) == (
        "serve_predict", TABLE, model.version, "double"
    )


@pytest.mark.slow
def test_concurrent_http_clients_while_spark_queries(spark: Any, served: Served) -> None:
    """8 clients x 200 requests while a Spark query runs on the same actors: every answer is
    right, the actors' PIDs do not change, the batcher merged requests, the counters add up."""
    model, linear = served.model, served.linear
    pids = sorted(model.actor_pids())
    before = model.stats()
    path = path_of(served.url) + "/predict"
    threads, per_thread = 8, 200
    sent = [0] * threads
    failures: list[str] = []

    def client(t: int) -> None:
        conn = connect(served.port)
        try:
            for k in range(per_thread):
                ids = np.arange(3) + 1000 * t + 3 * k
                rows = 1 + (k % 3)
                ids = ids[:rows]
                r = request(conn, "POST", path, json.dumps({"instances": features_np(ids).tolist()}).encode())
                if r.status != 200:
                    failures.append(f"client {t} request {k}: {r.status} {r.body[:200]!r}")
                    return
                if r.json()["predictions"] != pytest.approx(expected(linear, ids), rel=REL):
                    failures.append(f"client {t} request {k}: wrong predictions")
                    return
                sent[t] += rows
        except Exception as exc:  # reported below, with the thread that failed
            failures.append(f"client {t}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    n_sql = 20_000
    sql = sql_scores(spark, "serve_predict", n_sql)
    for w in workers:
        w.join(timeout=240)
    assert not any(w.is_alive() for w in workers), "an HTTP client did not finish in 240 s"
    assert not failures, failures[:5]
    assert sql == pytest.approx(expected(linear, np.arange(n_sql)), rel=REL)

    after = model.stats()
    assert sorted(model.actor_pids()) == pids
    http_rows = after["rows"]["http"] - before["rows"]["http"]
    http_batches = after["batches"]["http"] - before["batches"]["http"]
    assert http_rows == sum(sent)
    assert after["rows"]["sql"] - before["rows"]["sql"] == n_sql
    assert 0 < http_batches < threads * per_thread, http_batches
    assert after["errors"] == before["errors"]
    print(f"{threads * per_thread} requests -> {http_batches} actor calls")


@pytest.mark.slow
def test_bad_bodies_get_400_and_do_not_fail_their_batch(served: Served) -> None:
    """Malformed bodies get 400 naming the field; a request whose rows the actor refuses fails
    alone, the good requests merged with it still answer 200; unknown paths 404."""
    path = path_of(served.url) + "/predict"
    conn = connect(served.port)
    try:
        cases = [
            (b"{not json", "application/json", "body: expected JSON"),
            (b'{"instances": "x"}', "application/json", "instances: expected a list"),
            (b'{"instances": [[1, "a"]]}', "application/json", "instances[0]: expected list<item: double>"),
            (b"not arrow", ARROW_STREAM, "expected an Arrow IPC stream"),
            (b'{"instances": [null]}', "application/json", "is null"),
        ]
        for body, ctype, message in cases:
            r = request(conn, "POST", path, body, ctype)
            assert r.status == 400, (body, r.status, r.body[:300])
            assert message in r.json()["error"], (body, r.json())
        r = request(conn, "GET", path_of(served.url) + "/nowhere")
        assert r.status == 404
    finally:
        conn.close()

    # A ragged row passes JSON parsing (list<double>) and is refused by the actor; sent at the
    # same time as good requests, it may share their batch: each request then goes alone.
    barrier = threading.Barrier(6)
    replies: dict[int, Reply] = {}

    def send(i: int) -> None:
        x = features_np([i]).tolist()
        payload = {"instances": [x[0], x[0][:3]]} if i == 0 else {"instances": x}
        barrier.wait(timeout=30)
        replies[i] = post_json(served.port, path, payload)

    senders = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for s in senders:
        s.start()
    for s in senders:
        s.join(timeout=60)
    assert replies[0].status == 400 and "elements" in replies[0].json()["error"]
    for i in range(1, 6):
        assert replies[i].status == 200, replies[i].body[:300]
        assert replies[i].json()["predictions"] == pytest.approx(expected(served.linear, [i]), rel=REL)


@pytest.mark.slow
def test_overload_gets_503_with_retry_after(served: Served) -> None:
    """Beyond one request running and one queued, Serve answers 503 with Retry-After at once;
    the others are answered (never an unbounded queue)."""
    path = path_of(served.overload_url) + "/predict"
    body = {"instances": features_np([1]).tolist()}
    statuses: list[Reply] = []
    for _ in range(3):  # a burst; again if the first one happened to be absorbed
        barrier = threading.Barrier(12)
        lock = threading.Lock()

        def send() -> None:
            barrier.wait(timeout=30)
            r = post_json(served.port, path, body)
            with lock:
                statuses.append(r)

        senders = [threading.Thread(target=send) for _ in range(12)]
        for s in senders:
            s.start()
        for s in senders:
            s.join(timeout=120)
        if any(r.status == 503 for r in statuses):
            break
    codes = sorted({r.status for r in statuses})
    assert 503 in codes and set(codes) <= {200, 503}, codes
    rejected = [r for r in statuses if r.status == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    answered = sum(r.status == 200 for r in statuses)
    assert served.overload.stats()["rows"]["http"] == answered


@pytest.mark.slow
def test_reload_moves_both_doors_without_failed_requests(spark: Any, served: Served) -> None:
    """While a client keeps sending, reload() to a new version: no request fails, and after it
    both SQL and HTTP answer with the new model and HTTP reports the new version."""
    model = served.model
    old = model.version
    path = path_of(served.url) + "/predict"
    seen: list[tuple[int, int]] = []  # (status, version)
    stop = threading.Event()

    def client() -> None:
        conn = connect(served.port)
        try:
            while not stop.is_set():
                r = request(conn, "POST", path, json.dumps({"instances": features_np([7]).tolist()}).encode())
                seen.append((r.status, r.json().get("model_version", -1) if r.status == 200 else -1))
        finally:
            conn.close()

    worker = threading.Thread(target=client)
    worker.start()
    try:
        wait_for(lambda: len(seen) >= 3, 60, "the first HTTP answers")
        linear2 = make_linear_model(served.tmp / "v2", n_features=N_FEATURES, seed=1)
        new = save_model(spark, served.tmp / "v2", TABLE)
        assert model.reload() == new != old
        count = len(seen)
        wait_for(lambda: len(seen) >= count + 3, 60, "HTTP answers after the reload")
    finally:
        stop.set()
        worker.join(timeout=60)
    assert all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {v for _, v in seen} <= {old, new}
    assert seen[-1][1] == new

    r = post_json(served.port, path, {"instances": features_np([1, 2, 3]).tolist()})
    assert r.json() == {"predictions": pytest.approx(expected(linear2, [1, 2, 3]), rel=REL), "model_version": new}
    assert sql_scores(spark, "serve_predict", 3) == pytest.approx(expected(linear2, [0, 1, 2]), rel=REL)
    meta = json.loads(urllib.request.urlopen(served.url, timeout=30).read())
    assert meta["version"] == new


@pytest.mark.slow
def test_close_ends_http_and_leaves_no_serve_app_or_actor(served: Served) -> None:
    """close() deletes the model's Serve application (its route then answers 404 while Serve
    still runs for the other model); closing the last one stops Serve: no application, no
    Serve actor, no pool actor left."""
    import ray
    from ray import serve

    from tests.helpers import pool_namespaces

    served.model.close()
    assert app_name("serve_predict") not in serve.status().applications
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(served.url, timeout=30)
    assert info.value.code == 404
    r = post_json(served.port, path_of(served.url) + "/predict", {"instances": [[0.0] * N_FEATURES]})
    assert r.status == 404

    served.overload.close()

    def serve_actors() -> list[dict[str, str]]:
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]

    wait_for(lambda: not serve_actors(), 60, f"Serve's actors to exit: {serve_actors()}")
    assert pool_namespaces("serve_predict") == [] and pool_namespaces("serve_overload") == []
    with pytest.raises(OSError):
        urllib.request.urlopen(served.url, timeout=5)  # the port is closed
