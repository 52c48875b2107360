"""Threads and exits: one name registered from several threads leaves one pool; close() and the
interpreter's exit cancel a load in progress instead of waiting for it.

Real Spark, Ray and Delta. Which actors exist is asked of the machine (the Ray worker
processes of this driver, ``ray::ModelWorker``), not of the library.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from spark_ray_udf import PoolClosedError, register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, make_linear_model
from tests import helpers

ROOT = Path(__file__).resolve().parent.parent
SLOW_S = 60  # how long the slow version's init_func sleeps


class SlowVersions(NamedTuple):
    """``table``: version ``fast`` loads at once, version ``slow`` sleeps SLOW_S in init_func."""

    table: str
    fast: int
    slow: int
    model: Any


@pytest.fixture(scope="module")
def slow_versions(spark, ray_address, tmp_path_factory) -> SlowVersions:
    root = tmp_path_factory.mktemp("races")
    model = make_linear_model(root / "fast")
    shutil.copytree(root / "fast", root / "slow")
    (root / "slow" / "sleep_s").write_text(str(SLOW_S))
    table = str(root / "table")  # a path: the exit test's own Spark reads it too
    fast = save_model(spark, root / "fast", table)
    slow = save_model(spark, root / "slow", table)
    return SlowVersions(table, fast, slow, model)


def _in_threads(n: int, target: Any) -> tuple[list[Any], list[BaseException]]:
    """Run ``target(i)`` in ``n`` threads released at once; return results and errors."""
    barrier = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            results.append(target(i))
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a registration thread hung"
    return results, errors


def _only_these_actors(baseline: set[int], pids: set[int]) -> None:
    helpers.wait_for(
        lambda: helpers.actor_processes("ModelWorker") - baseline == pids, 30,
        f"the model actors started by the test to be exactly the serving pool's {sorted(pids)}",
    )


def test_one_name_from_threads_leaves_one_pool(spark, linear_table):
    """Four threads register one name with the same arguments at once: one pool, one model
    object, two actors; no orphan pool or actor."""
    baseline = helpers.actor_processes("ModelWorker")
    results, errors = _in_threads(
        4,
        lambda i: register_ray_model(
            spark, linear_table.table, "race_same", init_linear, apply_linear, return_type="bigint"
        ),
    )
    assert not errors, errors
    model = results[0]
    try:
        assert all(r is model for r in results)
        assert helpers.pool_namespaces("race_same") == [model.namespace]
        _only_these_actors(baseline, set(model.actor_pids()))
    finally:
        model.close()


def test_one_name_different_arguments_from_threads_leaves_one_pool(spark, linear_table):
    """Four threads register one name with different conf at once: exactly one pool serves it
    (the registered one), the others are closed and their actors gone."""
    baseline = helpers.actor_processes("ModelWorker")
    results, errors = _in_threads(
        4,
        lambda i: register_ray_model(
            spark, linear_table.table, "race_diff", init_linear, apply_linear,
            return_type="bigint", conf={"thread": i},
        ),
    )
    assert not errors, errors
    live = [m for m in results if not m.closed]
    try:
        assert len(live) == 1, [repr(m) for m in results]
        assert helpers.pool_namespaces("race_diff") == [live[0].namespace]
        _only_these_actors(baseline, set(live[0].actor_pids()))
        rows = spark.sql(
            f"select id, race_diff({helpers.features_sql()}) as c from range(20)"
        ).orderBy("id").collect()
        assert [r.c for r in rows] == helpers.expected_classes(linear_table.model, range(20))
    finally:
        for m in results:
            m.close()


def test_close_cancels_a_reload_in_progress(spark, slow_versions, caplog):
    """close() while reload() loads a slow version returns in seconds; the reload raises
    PoolClosedError and no actor of either generation is left. Meanwhile the wait logs what
    it waits for."""
    model = register_ray_model(
        spark, slow_versions.table, "race_reload", helpers.init_sleep_file, apply_linear,
        return_type="bigint", version=slow_versions.fast,
    )
    serving = set(model.actor_pids())
    baseline = helpers.actor_processes("ModelWorker")
    errors: list[BaseException] = []

    def reload() -> None:
        try:
            model.reload(slow_versions.slow)
        except BaseException as exc:  # checked below
            errors.append(exc)

    thread = threading.Thread(target=reload)
    thread.start()
    helpers.wait_for(
        lambda: len(helpers.actor_processes("ModelWorker") - baseline) >= 2, 60,
        "the reload's new actors to start loading",
    )
    loading = helpers.actor_processes("ModelWorker") - baseline
    with caplog.at_level(logging.INFO, logger="spark_ray_udf.pool"):
        helpers.wait_for(
            lambda: "s still waiting for 2 of 2 actors to load "
            f"{slow_versions.table}@v{slow_versions.slow} (placed, loading the model;" in caplog.text,
            30, "the ready loop's log line",
        )
    start = time.monotonic()
    model.close()
    closed_in = time.monotonic() - start
    thread.join(timeout=15)
    assert closed_in < 5, f"close() took {closed_in:.1f}s"
    assert not thread.is_alive(), "the reload still runs after close()"
    assert len(errors) == 1 and isinstance(errors[0], PoolClosedError), errors
    assert "the load was cancelled" in str(errors[0])
    assert helpers.wait_gone(serving | loading) == []
    assert helpers.pool_namespaces("race_reload") == []


EXIT_APP = """
import sys, threading, time
from pathlib import Path

from spark_ray_udf import register_ray_model
from spark_ray_udf.testing import apply_linear, local_spark
from tests import helpers

tmp, table, fast, slow = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spark = local_spark("exit-bounded", warehouse_dir=str(tmp / "wh"))
model = register_ray_model(
    spark, table, "exit_reload", helpers.init_sleep_file, apply_linear,
    return_type="bigint", version=fast, num_actors=1,
)
before = helpers.actor_processes("ModelWorker")
# two loads in user threads (not daemons): a reload, and a new function's first load
threading.Thread(target=model.reload, args=(slow,)).start()
threading.Thread(
    target=register_ray_model,
    args=(spark, table, "exit_first", helpers.init_sleep_file, apply_linear),
    kwargs={"return_type": "bigint", "version": slow, "num_actors": 1},
).start()
helpers.wait_for(lambda: len(helpers.actor_processes("ModelWorker") - before) >= 2, 120, "loads")
time.sleep(1.0)
print("EXITING", flush=True)
"""


@pytest.mark.slow
def test_exit_during_loads_is_bounded(spark, slow_versions, tmp_path):
    """A driver whose main thread ends while a reload and a first registration load in its own
    threads exits within seconds (the loads are cancelled), not after init_func's 60 s."""
    script = tmp_path / "exit_app.py"
    script.write_text(EXIT_APP)
    log_path = tmp_path / "exit_app.err"
    err = log_path.open("w")  # a file, not a pipe: Spark's start-up log would fill a pipe
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), slow_versions.table, str(slow_versions.fast),
         str(slow_versions.slow)],
        cwd=ROOT, env=helpers.subprocess_env(), stdout=subprocess.PIPE, stderr=err, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("EXITING"):
                break
        else:
            pytest.fail(f"the app ended before its loads started: {log_path.read_text()[-3000:]}")
        start = time.monotonic()
        proc.wait(timeout=SLOW_S + 60)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        err.close()
    stderr = log_path.read_text()
    assert took < 25, f"the exit took {took:.1f}s:\n{stderr[-3000:]}"
    assert "the load was cancelled" in stderr
