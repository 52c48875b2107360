"""Faults during a query, with real processes: actors killed by PID or by ``ray.kill``, retries
exhausted, the pool closed, Ray itself gone; and nothing left behind afterwards.

Every query here compares its rows with the model's own in-process predictions (count, exact
values and an order-dependent checksum), so a lost, doubled or shifted row fails the test.
A slow ``apply_func`` (``tests.helpers.apply_slow``) leaves one file per batch in a progress
folder, so a fault is injected only once the query is known to be running, and the test can
check that batches kept coming after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spark_ray_udf import (
    CallTimeoutError,
    ModelInitError,
    RayModel,
    register_ray_model,
)
from spark_ray_udf.testing import apply_linear, init_linear
from tests import helpers
from tests.helpers import features_np, features_sql, spark_conf

ROOT = Path(__file__).resolve().parent.parent
N_ROWS = 1200
BATCH_ROWS = "10"
QUERY_TIMEOUT_S = 300.0  # a hang fails the test instead of blocking the run
BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"


class Query:
    """``spark.sql(sql).collect()`` in a thread, with its rows or its error and end time."""

    def __init__(self, spark: Any, sql: str) -> None:
        self.rows: list[Any] | None = None
        self.error: BaseException | None = None
        self.ended = 0.0
        self._thread = threading.Thread(target=self._run, args=(spark, sql), daemon=True)
        self._thread.start()

    def _run(self, spark: Any, sql: str) -> None:
        try:
            self.rows = spark.sql(sql).collect()
        except BaseException as exc:  # reported by the test
            self.error = exc
        self.ended = time.monotonic()

    def join(self, timeout_s: float = QUERY_TIMEOUT_S) -> Query:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the query still runs after {timeout_s}s: a hang"
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def events_view(spark: Any, view: str, n: int = N_ROWS, partitions: int = 4) -> None:
    spark.range(0, n, 1, partitions).selectExpr("id", f"{features_sql()} as features") \
        .createOrReplaceTempView(view)


def assert_all_predicted(rows: list[Any], linear: Any, n: int = N_ROWS) -> None:
    """Every id once, each with the in-process prediction, checked three ways."""
    rows = sorted(rows, key=lambda r: r.id)
    ids = np.array([r.id for r in rows])
    labels = np.array([r.label for r in rows])
    want = apply_linear(linear, features_np(np.arange(n)))
    assert len(rows) == n
    np.testing.assert_array_equal(ids, np.arange(n))
    weights = np.arange(1, n + 1)
    assert int((weights * labels).sum()) == int((weights * want).sum()), "order-dependent checksum"
    np.testing.assert_array_equal(labels, want)


def count_files(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir())


def inject_mid_query(
    spark: Any, sql: str, progress: Path, fault: Callable[[], None], *, after: int = 10
) -> tuple[Query, int, float]:
    """Run ``sql``; once ``after`` batches are done, call ``fault``. Returns the query, the
    batch count at the fault and when the fault happened."""
    query = Query(spark, sql)
    helpers.wait_for(
        lambda: count_files(progress) >= after or not query.running, 240, f"{after} batches"
    )
    assert query.running, f"the query ended before the fault: {query.error!r}"
    done_at_fault = count_files(progress)
    t_fault = time.monotonic()
    fault()
    query.join()
    return query, done_at_fault, t_fault


def clear(folder: Path) -> Path:
    for f in folder.iterdir():
        f.unlink()
    return folder


@pytest.fixture(scope="module")
def progress(tmp_path_factory: Any) -> Path:
    return tmp_path_factory.mktemp("progress")


@pytest.fixture(scope="module")
def slow(spark: Any, linear_table: Any, progress: Path) -> Iterator[RayModel]:
    """``fault_slow(features)``: bigint classes, 2 actors, 50 ms per batch, 3 retries."""
    with register_ray_model(
        spark, linear_table.table, "fault_slow", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=2, max_retries=3, call_timeout_s=60,
        conf={"sleep_s": 0.05, "progress_dir": str(progress)},
    ) as model:
        yield model


# --- an actor dies mid-query ---------------------------------------------------------------------


def test_sigkill_actor_mid_query_loses_nothing(spark, linear_table, slow, progress):
    """SIGKILL one actor's process mid-query: the query completes, every row predicted once."""
    events_view(spark, "fault_events")
    pids = slow.actor_pids()
    victim = pids[0]
    clear(progress)
    with spark_conf(spark, BATCH_KEY, BATCH_ROWS):
        query, done_at_kill, _ = inject_mid_query(
            spark, "select id, fault_slow(features) as label from fault_events", progress,
            lambda: os.kill(victim, signal.SIGKILL),
        )
    assert query.error is None, f"the query failed after the kill: {query.error}"
    assert_all_predicted(query.rows, linear_table.model)
    batches = helpers.progress_pids(progress)
    assert len(batches) - done_at_kill >= 5, "the query barely ran after the kill"
    assert victim in batches[:done_at_kill], "the victim served batches before the kill"
    assert helpers.wait_gone([victim]) == []
    # the pool restarted the actor (max_restarts=-1): two live actors, the victim replaced
    helpers.wait_for(lambda: _pids_or_none(slow) is not None, 120, "the restarted actor")
    now = slow.actor_pids()
    assert len(now) == 2 and victim not in now and pids[1] in now


def _pids_or_none(model: RayModel) -> list[int] | None:
    try:
        return model.actor_pids()
    except Exception:  # the restarting actor does not answer yet
        return None


def test_restarted_actor_serves_again(spark, linear_table, slow, progress):
    """After the kill, a new query's batches reach both actors again, results exact."""
    events_view(spark, "fault_events")
    pids = set(slow.actor_pids())
    clear(progress)
    with spark_conf(spark, BATCH_KEY, BATCH_ROWS):
        rows = spark.sql("select id, fault_slow(features) as label from fault_events").collect()
    assert_all_predicted(rows, linear_table.model)
    assert set(helpers.progress_pids(progress)) == pids


def test_ray_kill_actor_mid_query_loses_nothing(spark, linear_table, tmp_path):
    """ray.kill(handle) (no restart) mid-query: the query completes on the other actor, and
    the pool starts a replacement, which the next query uses."""
    import ray

    progress = tmp_path / "progress"
    progress.mkdir()
    events_view(spark, "fault_events")
    with register_ray_model(
        spark, linear_table.table, "fault_raykill", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=2, max_retries=2,
        conf={"sleep_s": 0.05, "progress_dir": str(progress)},
    ) as model:
        handle = model._pool.generation.actors[0]
        victim = ray.get(handle.pid.remote(), timeout=30)
        with spark_conf(spark, BATCH_KEY, BATCH_ROWS):
            query, done_at_kill, _ = inject_mid_query(
                spark, "select id, fault_raykill(features) as label from fault_events",
                progress, lambda: ray.kill(handle),
            )
            assert query.error is None, f"the query failed after ray.kill: {query.error}"
            assert_all_predicted(query.rows, linear_table.model)
            after = helpers.progress_pids(progress)[done_at_kill:]
            assert after and victim not in after[2:], "batches kept going, not to the dead actor"
            assert helpers.wait_gone([victim]) == []
            # the driver's watcher replaces the actor Ray will not restart: the pool is 2 again
            helpers.wait_for(lambda: model._pool.replaced == 1, 60, "a replacement actor")
            pids = set(model.actor_pids())
            assert len(pids) == 2 and victim not in pids
            before = len(helpers.progress_pids(progress))
            rows = spark.sql(
                "select id, fault_raykill(features) as label from fault_events"
            ).collect()
            assert_all_predicted(rows, linear_table.model)
            assert set(helpers.progress_pids(progress)[before:]) == pids


def test_replacement_that_cannot_load_is_reported_and_retried(spark, tmp_path):
    """The table's files removed under a serving pool (as an early VACUUM would), then its only
    actor killed for good: the watcher's replacement cannot read the version; the error names
    the missing file and is kept in last_watch_error while the watcher retries; once the files
    are back, the retry succeeds and the pool serves again."""
    import shutil

    import ray

    from spark_ray_udf import ModelNotFoundError, save_model
    from spark_ray_udf.testing import make_linear_model

    linear = make_linear_model(tmp_path / "m", seed=4)
    table = tmp_path / "vacuumed"
    save_model(spark, tmp_path / "m", str(table))
    events_view(spark, "fault_vacuumed", n=50, partitions=1)
    with register_ray_model(
        spark, str(table), "fault_vacuumed", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    ) as model:
        assert model._pool.stored.files  # the actors read the table's files
        backup = tmp_path / "backup"
        shutil.copytree(table, backup)
        for f in table.glob("*.parquet"):
            f.unlink()
        ray.kill(model._pool.generation.actors[0])
        helpers.wait_for(lambda: model._pool.last_watch_error is not None, 60, "the watcher's error")
        err = model._pool.last_watch_error
        assert isinstance(err, ModelNotFoundError), repr(err)
        assert f"{table}@v0: its data file file:{table}/" in str(err) and "is gone" in str(err)
        assert model._pool.replaced == 0
        for f in backup.glob("*.parquet"):
            shutil.copy(f, table / f.name)
        helpers.wait_for(
            lambda: model._pool.replaced == 1 and model._pool.last_watch_error is None,
            90, "the retried replacement",
        )
        rows = spark.sql("select id, fault_vacuumed(features) as label from fault_vacuumed").collect()
        assert_all_predicted(rows, linear, n=50)


def test_every_retry_failing_fails_the_job_naming_function_and_cause(spark, linear_table):
    """apply_func killing its actor on every batch: the job fails in bounded time, saying why."""
    from pyspark.errors import PySparkException

    events_view(spark, "fault_small", n=10, partitions=1)
    with register_ray_model(
        spark, linear_table.table, "fault_exit", init_linear, helpers.apply_exit,
        return_type="bigint", num_actors=2, max_retries=1, call_timeout_s=60,
    ) as model:
        start = time.monotonic()
        with pytest.raises(PySparkException) as info:
            spark.sql("select id, fault_exit(features) as label from fault_small").collect()
        elapsed = time.monotonic() - start
        text = str(info.value)
        assert "RetriesExhaustedError" in text
        assert "fault_exit: rows 0..9 of partition 0 failed on 2 actors of the pool" in text
        assert f"namespace {model.namespace!r}" in text and model.address.ray_address in text
        assert "last cause: actor " in text and " died: Actor" in text, "the actor and the cause"
        assert "Raise max_retries= or check why the actors die (out of memory" in text
        assert elapsed < 60, f"took {elapsed:.1f}s"


# --- the pool closed, Ray gone -------------------------------------------------------------------


def test_close_mid_query_fails_fast_with_pool_closed(spark, linear_table, tmp_path):
    """close() from another thread mid-query: the query fails soon with PoolClosedError text."""
    progress = tmp_path / "progress"
    progress.mkdir()
    events_view(spark, "fault_events")
    model = register_ray_model(
        spark, linear_table.table, "fault_close", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=1, call_timeout_s=60,
        conf={"sleep_s": 0.1, "progress_dir": str(progress)},
    )
    address, namespace = model.address.ray_address, model.namespace
    with spark_conf(spark, BATCH_KEY, BATCH_ROWS):
        query, _, t_close = inject_mid_query(
            spark, "select id, fault_close(features) as label from fault_events", progress,
            model.close, after=5,
        )
    assert query.error is not None, "the query cannot complete on a closed pool"
    text = str(query.error)
    assert "PoolClosedError" in text
    assert (
        f"fault_close: its actor pool (namespace {namespace!r} on the Ray at {address}) is "
        "closed or gone; call register_ray_model() again"
    ) in text
    assert query.ended - t_close < 30, f"took {query.ended - t_close:.1f}s after close()"


def run_app(tmp_path: Path, name: str, text: str) -> dict[str, Any]:
    """Run ``text`` as a script with its own Spark and Ray; return the JSON it printed after
    ``RESULT ``."""
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=helpers.subprocess_env(),
        capture_output=True, text=True, timeout=480,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[0][len("RESULT "):])


RAY_GONE_APP = """
import json, sys, threading, time
from pathlib import Path

import psutil

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.testing import local_spark, make_linear_model
from tests import helpers

tmp = Path(sys.argv[1])
spark = local_spark("ray-gone", warehouse_dir=str(tmp / "wh"))
make_linear_model(tmp / "m")
save_model(spark, tmp / "m", str(tmp / "model"))
progress = tmp / "progress"
progress.mkdir()
model = register_ray_model(
    spark, str(tmp / "model"), "model_gone", helpers.init_with_conf, helpers.apply_slow,
    return_type="bigint", num_actors=1, call_timeout_s=CALL_TIMEOUT_S,
    conf={"sleep_s": 0.2, "progress_dir": str(progress)},
)
spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10")
df = spark.range(0, 2000, 1, 2).selectExpr("id", helpers.features_sql() + " as features")
out = {"gcs": model.address.ray_address}
def run():
    try:
        out["rows"] = len(df.select(model("features")).collect())
    except Exception as exc:
        out["error"] = str(exc)
    out["ended"] = time.monotonic()
query = threading.Thread(target=run, daemon=True)
query.start()
helpers.wait_for(lambda: len(list(progress.iterdir())) >= 4, 240, "4 batches")
# Kill every process of this driver's Ray (GCS, raylet, agents, actors), as a crash would;
# Spark's JVM and its Python workers stay.
me = psutil.Process()
spark_side = {p.pid for j in me.children() if j.name() == "java" for p in [j, *j.children(True)]}
ray_side = [p for p in me.children(recursive=True) if p.pid not in spark_side]
out["killed"] = sorted({p.name() for p in ray_side})
killed_at = time.monotonic()
for p in ray_side:
    p.kill()
query.join(120)
out["alive"] = query.is_alive()
out["seconds"] = out.pop("ended", killed_at - 1) - killed_at
closing = time.monotonic()
model.close()  # what atexit runs for a notebook that never calls it
out["close_seconds"] = time.monotonic() - closing
print("RESULT " + json.dumps(out), flush=True)
spark.stop()
"""


RAY_RESTART_APP = """
import json, sys, time
from pathlib import Path

import psutil

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, local_spark, make_linear_model
from tests import helpers

tmp = Path(sys.argv[1])
spark = local_spark("ray-restart", warehouse_dir=str(tmp / "wh"))
linear = make_linear_model(tmp / "m")
save_model(spark, tmp / "m", str(tmp / "model"))

def register():
    return register_ray_model(
        spark, str(tmp / "model"), "model_again", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    )

model = register()
df = spark.range(0, 300, 1, 2).selectExpr("id", helpers.features_sql() + " as features")
first = sorted(df.select("id", model("features").alias("c")).collect())
me = psutil.Process()
java = [j for j in me.children() if j.name() == "java"]
spark_side = {p.pid for j in java for p in [j, *j.children(True)]}

def pyspark_workers():
    found = set()
    for p in (p for j in java for p in j.children(True)):
        try:
            if "pyspark" in " ".join(p.cmdline()):
                found.add(p.pid)
        except psutil.Error:  # exited meanwhile
            pass
    return found

workers = pyspark_workers()
ray_side = [p for p in me.children(recursive=True) if p.pid not in spark_side]
out = {"old_gcs": model.address.ray_address, "killed": sorted({p.name() for p in ray_side})}
for p in ray_side:  # Ray crashes: every process of it, the driver and Spark stay
    p.kill()
psutil.wait_procs(ray_side, timeout=10)
start = time.monotonic()
again = register()
out["reused"] = again is model
out["new_gcs"] = again.address.ray_address
rows = sorted(df.select("id", again("features").alias("c")).collect())
out["seconds"] = time.monotonic() - start
out["equal"] = rows == first and [r.c for r in rows] == helpers.expected_classes(linear, list(range(300)))
out["workers_kept"] = len(workers & pyspark_workers())
again.close()
print("RESULT " + json.dumps(out), flush=True)
spark.stop()
"""


@pytest.mark.slow
def test_register_again_after_ray_crashed_serves_from_a_new_ray(tmp_path):
    """Ray's processes all killed between queries (own Spark+Ray in a subprocess): registering
    again does not reuse the lost pool; it starts a new Ray, and Spark's Python workers that
    were connected to the lost one leave it and join the new one (within Ray's 60 s limit, after
    which Ray itself would end them)."""
    out = run_app(tmp_path, "ray_restart_app.py", RAY_RESTART_APP)
    assert {"gcs_server", "raylet"} <= set(out["killed"])
    assert not out["reused"] and out["new_gcs"] != out["old_gcs"]
    assert out["equal"], "the query on the new Ray must give the model's predictions"
    assert out["workers_kept"] >= 1, "the Python workers of the first query should have served"
    assert out["seconds"] < 45, f"re-registering and querying took {out['seconds']:.1f}s"


@pytest.mark.slow
def test_ray_killed_mid_query_fails_within_call_timeout(tmp_path):
    """Ray's processes killed mid-query (own Spark+Ray in a subprocess): a named error, fast,
    and close() returns at once instead of waiting 60 s on the lost GCS."""
    call_timeout_s = 10
    out = run_app(tmp_path, "ray_gone_app.py", RAY_GONE_APP.replace("CALL_TIMEOUT_S", str(call_timeout_s)))
    assert {"gcs_server", "raylet"} <= set(out["killed"])
    assert not out["alive"], "the query hangs after Ray was killed"
    assert "rows" not in out, "the query cannot complete without its actor"
    text = out["error"]
    assert "model_gone: " in text and out["gcs"] in text, text[-2000:]
    assert "RayUnavailableError" in text or "PoolClosedError" in text, text[-2000:]
    assert out["seconds"] < call_timeout_s + 10, f"the error took {out['seconds']:.1f}s"
    # close() (and so the exit) does not wait out Ray's 60 s for the lost GCS
    assert out["close_seconds"] < 10, f"close() took {out['close_seconds']:.1f}s"


# --- nothing left behind -------------------------------------------------------------------------


def _model_state(model: RayModel) -> tuple[list[int], list[str], str]:
    return (
        model.actor_pids(),
        [info.model_dir for info in model.actors],
        model._pool.work_root,
    )


@pytest.mark.parametrize("source", ["auto", "object_store"])
def test_close_leaves_no_actor_folder_or_pinned_model(spark, linear_table, source):
    """After close(): no actor process, no directory entry, no folder, no pinned model chunk.
    ('auto' here reads the table's files in the actors: the driver pins no chunk at all.)"""
    import ray

    events_view(spark, "fault_small", n=10, partitions=1)
    workers_before = helpers.actor_processes("ModelWorker")
    model = register_ray_model(
        spark, linear_table.table, "fault_leak", init_linear, apply_linear,
        return_type="bigint", num_actors=2, model_source=source,
    )
    spark.sql("select fault_leak(features) from fault_small").collect()
    pids, model_dirs, work_root = _model_state(model)
    workers = helpers.actor_processes("ModelWorker") - workers_before
    chunk_ids = {ref.hex() for ref in model._pool.stored.chunks.values()}
    assert workers == set(pids) and helpers.pool_namespaces("fault_leak") == [model.namespace]
    assert bool(chunk_ids) == (source == "object_store")
    assert all(Path(d).is_dir() for d in model_dirs) and Path(work_root).is_dir()
    assert Path(work_root) in helpers.work_roots("fault_leak")

    assert helpers.object_refs_held(chunk_ids) == chunk_ids
    model.close()
    assert helpers.wait_gone(pids) == []
    assert helpers.pool_namespaces("fault_leak") == []
    assert not Path(work_root).exists()
    assert all(helpers.model_dir_released(d, pids) for d in model_dirs)
    # the driver no longer holds the chunks, so Ray frees them
    assert model._pool.stored.chunks == {}
    helpers.wait_for(
        lambda: not helpers.object_refs_held(chunk_ids), 30, "the chunks to be released"
    )
    assert ray.is_initialized()


def test_failed_init_leaves_nothing(spark, linear_table):
    """init_func raising at registration: no actor process, no directory, no folder left."""
    workers_before = helpers.actor_processes("ModelWorker")
    roots_before = helpers.work_roots("fault_broken")
    with pytest.raises(ModelInitError, match="fault_broken: init_func tests.helpers.init_raising"):
        register_ray_model(
            spark, linear_table.table, "fault_broken", helpers.init_raising, apply_linear,
            num_actors=2,
        )
    helpers.wait_for(
        lambda: helpers.actor_processes("ModelWorker") <= workers_before, 30, "actors to die"
    )
    assert helpers.pool_namespaces("fault_broken") == []
    assert helpers.work_roots("fault_broken") == roots_before


def test_init_timeout_leaves_nothing(spark, linear_table):
    """init_func slower than init_timeout_s: CallTimeoutError in bounded time, nothing left."""
    workers_before = helpers.actor_processes("ModelWorker")
    roots_before = helpers.work_roots("fault_slow_init")
    start = time.monotonic()
    with pytest.raises(CallTimeoutError) as info:
        register_ray_model(
            spark, linear_table.table, "fault_slow_init", helpers.init_sleeping, apply_linear,
            num_actors=1, init_timeout_s=3, conf={"sleep_s": 120},
        )
    assert time.monotonic() - start < 60
    assert "fault_slow_init: 1 of the 1 actors did not load" in str(info.value)
    assert "init_timeout_s=3s" in str(info.value) and "raise init_timeout_s" in str(info.value)
    helpers.wait_for(
        lambda: helpers.actor_processes("ModelWorker") <= workers_before, 30, "actors to die"
    )
    assert helpers.pool_namespaces("fault_slow_init") == []
    assert helpers.work_roots("fault_slow_init") == roots_before


DRIVER_APP = """
import hashlib, json, os, sys, tempfile
from pathlib import Path

from spark_ray_udf._ray import connect_worker
from spark_ray_udf.pool import ModelPool, WorkerSpec
from spark_ray_udf.store import Manifest, ModelFile, StoredModel
from spark_ray_udf.testing import apply_linear, init_linear, make_linear_model
import pyarrow as pa
import ray

address, folder, namespace = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
connect_worker(address, who="driver-exit", auth=os.environ.get("RAY_AUTH_MODE", ""))
make_linear_model(folder)
files, chunks = [], {}
for f in sorted(folder.iterdir()):
    data = f.read_bytes()
    files.append(ModelFile(f.name, len(data), hashlib.sha256(data).hexdigest(), 1))
    chunks[(f.name, 0)] = ray.put(data)
manifest = Manifest(files=tuple(files), dirs=(), chunk_size=1 << 20)
spec = WorkerSpec(
    function="fault_exit_driver", table="local", version=0, manifest=manifest,
    init_func=init_linear, apply_func=apply_linear, conf={}, return_type=pa.int64(),
    on_null="error", work_root=str(Path(tempfile.gettempdir()) / "spark-ray-udf" / namespace),
    fetch_timeout_s=60,
)
pool = ModelPool.start(
    spec, StoredModel("local", 0, manifest, chunks), namespace=namespace, gcs_address=address,
    num_actors=2, actor_options={}, init_timeout_s=120,
)
print("POOL " + json.dumps({
    "pids": pool.actor_pids(), "dirs": [i.model_dir for i in pool.infos],
    "work_root": pool.work_root,
}), flush=True)
if sys.argv[4] == "crash":
    os.kill(os.getpid(), 9)
"""


def run_driver(ray_address: str, tmp_path: Path, how: str) -> dict[str, Any]:
    """Run DRIVER_APP (a pool on the session's Ray, no Spark) until it exits or kills itself."""
    import uuid

    namespace = f"spark-ray-udf.fault_exit_driver.{uuid.uuid4().hex[:12]}"
    script = tmp_path / "driver_app.py"
    script.write_text(DRIVER_APP)
    proc = subprocess.run(
        [sys.executable, str(script), ray_address, str(tmp_path / "m"), namespace, how],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("POOL ")]
    assert lines, f"rc {proc.returncode}:\n{proc.stderr[-4000:]}"
    state = json.loads(lines[0][len("POOL "):])
    from spark_ray_udf._shared import models_root

    # the model folder is the machine's shared copy of these bytes (share_files=True)
    assert len(state["pids"]) == 2 and all(Path(d).is_relative_to(models_root()) for d in state["dirs"])
    return state


def test_driver_exit_leaves_nothing(ray_address, tmp_path):
    """A driver that exits normally (atexit closes its pool): no actor, directory or folder."""
    state = run_driver(ray_address, tmp_path, "exit")
    assert helpers.wait_gone(state["pids"], timeout_s=60) == []
    assert helpers.pool_namespaces("fault_exit_driver") == []
    assert not Path(state["work_root"]).exists()


def test_killed_driver_actors_die_and_folders_are_swept(spark, linear_table, ray_address, tmp_path):
    """A SIGKILLed driver: Ray ends its actors; the next pool on the machine removes their folders."""
    state = run_driver(ray_address, tmp_path, "crash")
    assert helpers.wait_gone(state["pids"], timeout_s=60) == []
    assert helpers.pool_namespaces("fault_exit_driver") == []
    left = [d for d in state["dirs"] if Path(d).exists()]
    assert left, "a killed actor runs no cleanup: its folder is there until the next sweep"
    with register_ray_model(
        spark, linear_table.table, "fault_sweeper", init_linear, apply_linear, num_actors=1,
        return_type="bigint",
    ):
        assert not any(Path(d).exists() for d in state["dirs"])
