"""The pool's load, not only one caller's: actors count the calls they hold (every caller's),
callers probe that count, and a batch goes to the actor other callers are not keeping busy.
The actor computes one batch at a time, in arrival order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray

from spark_ray_udf import register_ray_model
from spark_ray_udf.client import PoolClient
from tests import helpers


def _batch(n: int) -> pa.Array:
    return pa.array(list(helpers.features_np(np.arange(n))), type=pa.list_(pa.float64()))


@pytest.fixture(scope="module")
def slow_pool(spark, linear_table, tmp_path_factory):
    progress = tmp_path_factory.mktemp("progress")
    with register_ray_model(
        spark, linear_table.table, "load_view_fn", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=2, min_split_rows=None,
        conf={"sleep_s": 1.5, "progress_dir": str(progress)},
    ) as model:
        yield model, progress


def test_a_batch_avoids_the_actor_another_caller_keeps_busy(slow_pool):
    """Two callers that would both pick actor 0 on their own counts (same rotation start):
    while the first one's 1.5 s batch runs there, the second one's batch goes to actor 1."""
    model, progress = slow_pool
    first, second = PoolClient(model.address), PoolClient(model.address)
    for c in (first, second):
        c.refresh()
        c.router.start = 0
    out: dict[str, object] = {}

    def run_first() -> None:
        out["first"] = list(first.map_batches([_batch(10)]))

    t = threading.Thread(target=run_first)
    before = set(p.name for p in progress.iterdir())
    t.start()
    helpers.wait_for(lambda: model.stats()["in_flight"] >= 1, 30, "the first batch to reach an actor")

    def second_sees_it() -> bool:  # a loaded machine can answer load() later than LOAD_WAIT_S
        second._probe_loads()
        return second.router.load(0) >= 1

    helpers.wait_for(second_sees_it, 30, "the second caller to see actor 0's report")
    list(second.map_batches([_batch(10)]))
    t.join(30)
    names = sorted(
        (p for p in progress.iterdir() if p.name not in before), key=lambda p: int(p.name.split("-")[1])
    )
    pids = [int(p.name.split("-")[0]) for p in names]
    assert len(pids) == 2 and pids[0] != pids[1], pids


def test_an_actor_computes_one_batch_at_a_time_in_arrival_order(slow_pool):
    """Four callers at once on one actor: it holds all four (load() says so) and computes
    them one after another (each 1.5 s), never two at once."""
    model, _ = slow_pool
    actor = ray.get_actor(model.actors[0].name, namespace=model.address.namespace)
    refs = [actor.predict.remote([_batch(5)], 0) for _ in range(4)]
    time.sleep(0.5)
    assert ray.get(actor.load.remote(), timeout=10) == 4
    t0 = time.monotonic()
    ray.get(refs, timeout=60)
    assert time.monotonic() - t0 >= 3 * 1.5 - 0.6
    assert ray.get(actor.load.remote(), timeout=10) == 0
