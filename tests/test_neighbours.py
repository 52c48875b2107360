"""A pool only its registrant can change: other Ray jobs cannot redirect its rows, a lost or
overwritten directory entry is republished, and stats come from a public call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spark_ray_udf import PoolIntegrityError, register_ray_model
from spark_ray_udf._contract import ActorRef, Entry, encode_entry
from spark_ray_udf.testing import apply_linear, init_linear
from tests import helpers

ROOT = Path(__file__).resolve().parent.parent

NEIGHBOUR_APP = r'''
import json, os, sys
import ray
from spark_ray_udf._ray import connect_worker, kv_get, kv_put
from spark_ray_udf._contract import ActorRef, Entry, encode_entry

address, victim = sys.argv[1], sys.argv[2]
connect_worker(address, who="neighbour", auth=os.environ.get("RAY_AUTH_MODE", ""))

@ray.remote(num_cpus=0)
class Evil:
    def predict(self, columns, row_offset, partition=None, door="sql"):
        import pyarrow as pa
        return pa.array([999] * len(columns[0]), type=pa.int64())
    def pid(self):
        return os.getpid()

evil = Evil.options(name="evil", namespace="neighbour", lifetime="detached").remote()
ray.get(evil.pid.remote(), timeout=60)
# what a neighbour can see: every named actor of every namespace, and the pool's entry
mine = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == victim]
key = victim.encode() + b"/generation"
before = kv_get(key, namespace="spark-ray-udf")
forged = encode_entry(Entry(99, 0, (ActorRef("evil", evil._actor_id.hex()),)), "guessed-secret")
kv_put(key, forged, namespace="spark-ray-udf")
print("NEIGHBOUR " + json.dumps({"saw": len(mine), "had_entry": before is not None}), flush=True)
'''


def events(spark: Any, name: str, n: int) -> None:
    spark.sql(
        f"select id, {helpers.features_sql()} as features from range({n})"
    ).repartition(2).createOrReplaceTempView(name)


def test_neighbour_cannot_redirect_a_pool(spark, linear_table, ray_address, tmp_path):
    """Another Ray job overwrites the pool's directory entry with one naming its own actor: no
    row goes to it, the next query returns the model's predictions, and the entry is repaired."""
    import ray

    events(spark, "nb_events", 200)
    with register_ray_model(
        spark, linear_table.table, "nb_victim", init_linear, apply_linear, return_type="bigint",
        num_actors=2,
    ) as model:
        script = tmp_path / "neighbour.py"
        script.write_text(NEIGHBOUR_APP)
        proc = subprocess.run(
            [sys.executable, str(script), ray_address, model.namespace],
            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300,
        )
        assert "NEIGHBOUR " in proc.stdout, proc.stderr[-4000:]
        try:
            rows = spark.sql("select id, nb_victim(features) as p from nb_events").collect()
            got = {r["id"]: r["p"] for r in rows}
            assert 999 not in got.values()
            ids = sorted(got)
            assert [got[i] for i in ids] == helpers.expected_classes(linear_table.model, ids)
            helpers.wait_for(lambda: model.stats()["directory_republished"] >= 1, 30, "the repair")
            assert model._pool.directory.intact()
        finally:
            ray.kill(ray.get_actor("evil", namespace="neighbour"))


def test_lost_entry_is_republished(spark, linear_table, ray_address):
    """The directory entry deleted under a live pool (as a lost Directory would be): the watcher
    publishes it again and queries keep working; the pool never looks closed."""
    from spark_ray_udf import _ray
    from spark_ray_udf.pool import KV_NAMESPACE

    events(spark, "nb_lost", 50)
    with register_ray_model(
        spark, linear_table.table, "nb_lost_fn", init_linear, apply_linear, return_type="bigint",
        num_actors=1,
    ) as model:
        key = model._pool.directory.key
        _ray.kv_del(key, namespace=KV_NAMESPACE)
        assert _ray.kv_get(key, namespace=KV_NAMESPACE) is None
        helpers.wait_for(
            lambda: _ray.kv_get(key, namespace=KV_NAMESPACE) is not None, 30, "the entry again"
        )
        rows = spark.sql("select id, nb_lost_fn(features) as p from nb_lost").collect()
        ids = sorted(r["id"] for r in rows)
        got = {r["id"]: r["p"] for r in rows}
        assert [got[i] for i in ids] == helpers.expected_classes(linear_table.model, ids)
        assert model.stats()["directory_republished"] == 1


def test_entry_naming_another_actor_is_refused(spark, linear_table, ray_address, monkeypatch):
    """Even a correctly signed entry is checked: an actor whose id differs from the one named is
    never sent a row (PoolIntegrityError); a wrong secret is refused likewise."""
    from spark_ray_udf import _ray
    from spark_ray_udf.client import PoolClient
    from spark_ray_udf.pool import KV_NAMESPACE

    with register_ray_model(
        spark, linear_table.table, "nb_ids", init_linear, apply_linear, return_type="bigint",
        num_actors=1,
    ) as model:
        info = model.actors[0]
        directory = model._pool.directory
        model._pool._stop.set()  # no repair during this test: the watcher would undo the entry
        wrong = encode_entry(Entry(7, model.version, (ActorRef(info.name, "00" * 16),)), directory.secret)
        _ray.kv_put(directory.key, wrong, namespace=KV_NAMESPACE)
        with pytest.raises(PoolIntegrityError, match="is not the one its registrant started"):
            PoolClient(model.address).refresh()
        bad_secret = model.address._replace(secret="not-the-secret")
        directory.repair()
        monkeypatch.setattr("spark_ray_udf.client.INTEGRITY_WAIT_S", 0.0)
        with pytest.raises(PoolIntegrityError, match="not signed by this pool's registrant"):
            PoolClient(bad_secret).refresh()


def test_stats_count_rows_by_door_and_answer_while_busy(spark, linear_table, ray_address):
    """stats(): rows and batches served add up exactly to the rows sent; per actor pid, node,
    version; latency percentiles; stats answer while predict is busy (control group)."""
    import threading
    import time

    events(spark, "nb_stats", 300)
    with register_ray_model(
        spark, linear_table.table, "nb_stats_fn", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=2, conf={"sleep_s": 2.0},
    ) as model:
        before = model.stats()
        assert before["rows"] == {"sql": 0, "http": 0} and len(before["actors"]) == 2
        worker = threading.Thread(
            target=lambda: spark.sql("select nb_stats_fn(features) from nb_stats").collect()
        )
        worker.start()
        try:
            helpers.wait_for(lambda: model.stats()["in_flight"] >= 1, 60, "a busy actor")
            t = time.monotonic()
            model.stats()
            assert time.monotonic() - t < 1.5  # not queued behind a 2 s predict
        finally:
            worker.join(timeout=300)
        after = model.stats()
        assert after["rows"]["sql"] == 300 and after["rows"]["http"] == 0
        assert after["batches"]["sql"] == sum(a["batches"]["sql"] for a in after["actors"])
        assert after["errors"]["sql"] == 0 and after["latency_s"]["p50"] >= 2.0
        assert sorted(a["pid"] for a in after["actors"]) == sorted(model.actor_pids())
        assert all(a["version"] == model.version and a["node_id"] for a in after["actors"])
        assert after["crossed_nodes"] == 0  # one machine: every batch stayed on its node


def test_models_lists_every_registered_function_for_sql(spark, linear_table, ray_address):
    """spark_ray_udf.models(spark) is a DataFrame of the open functions that SQL can query."""
    from spark_ray_udf import models

    events(spark, "nb_models_events", 40)
    with register_ray_model(
        spark, linear_table.table, "nb_models_a", init_linear, apply_linear, return_type="bigint",
        num_actors=1,
    ), register_ray_model(
        spark, linear_table.table, "nb_models_b", init_linear, apply_linear, return_type="bigint",
        num_actors=2,
    ):
        spark.sql("select nb_models_a(features) from nb_models_events").collect()
        models(spark).createOrReplaceTempView("ray_models")
        rows = spark.sql(
            "select name, actors, rows_sql, version from ray_models "
            "where name like 'nb_models_%' order by name"
        ).collect()
        assert [(r["name"], r["actors"], r["rows_sql"]) for r in rows] == [
            ("nb_models_a", 1, 40), ("nb_models_b", 2, 0)
        ]
        assert {r["version"] for r in rows} == {linear_table.version}
    assert "nb_models_a" not in {r["name"] for r in models(spark).collect()}


def test_counters_reach_rays_metrics_endpoint(spark, linear_table, ray_address):
    """The actors' counters are Ray metrics: ray_spark_ray_udf_rows_total on Ray's Prometheus
    endpoint counts the rows of a query, tagged with the function and the door."""
    import urllib.request

    from spark_ray_udf import _ray

    events(spark, "nb_metrics", 70)
    with register_ray_model(
        spark, linear_table.table, "nb_metrics_fn", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    ):
        spark.sql("select nb_metrics_fn(features) from nb_metrics").collect()
        url = _ray.metrics_url()

        def rows_exported() -> float:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            return sum(
                float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                if line.startswith("ray_spark_ray_udf_rows_total{")
                and 'function="nb_metrics_fn"' in line and 'door="sql"' in line
            )

        helpers.wait_for(lambda: rows_exported() == 70, 90, "the rows counter on Ray's endpoint")
