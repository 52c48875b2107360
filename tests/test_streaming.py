"""Structured Streaming with the registered function: hot swaps and exactly-once restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from pyspark.sql import functions as F

from spark_ray_udf import ModelInitError, register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, make_linear_model

N_FEATURES = 8
ROOT = Path(__file__).resolve().parent.parent


def _rows(start: int, n: int) -> tuple[list[tuple[int, list[float]]], np.ndarray]:
    rng = np.random.default_rng(start)
    x = rng.normal(size=(n, N_FEATURES))
    return [(start + i, x[i].tolist()) for i in range(n)], x


def _append(spark, path: str, start: int, n: int) -> np.ndarray:
    rows, x = _rows(start, n)
    spark.createDataFrame(rows, "id bigint, features array<double>").coalesce(1).write.format(
        "delta"
    ).mode("append").save(path)
    return x


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def test_swap_during_stream_loses_nothing(spark, ray_address, tmp_path):
    """A reload while a stream runs: no failed batch, each row once, versions split at the swap."""
    m1 = make_linear_model(tmp_path / "m1", n_features=N_FEATURES, seed=1)
    m2 = make_linear_model(tmp_path / "m2", n_features=N_FEATURES, seed=2)
    table = str(tmp_path / "model")
    v1 = save_model(spark, tmp_path / "m1", table)
    source, sink = str(tmp_path / "source"), str(tmp_path / "sink")
    inputs: dict[int, np.ndarray] = {}
    per_file = 50
    for k in range(3):
        x = _append(spark, source, k * per_file, per_file)
        inputs.update({k * per_file + i: x[i] for i in range(per_file)})

    model = register_ray_model(
        spark, table, "swap_predict", init_linear, apply_linear,
        return_type="bigint", with_version=True, num_actors=2,
    )
    timeline: list[tuple[int, float, float]] = []

    def process(batch_df, batch_id: int) -> None:
        start = time.monotonic()
        batch_df.createOrReplaceTempView("micro")
        out = batch_df.sparkSession.sql(
            "select id, swap_predict(features) as p from micro"
        ).withColumn("batch_id", F.lit(batch_id))
        out.write.format("delta").mode("append").save(sink)
        timeline.append((batch_id, start, time.monotonic()))

    query = (
        spark.readStream.format("delta").option("maxFilesPerTrigger", 1).load(source)
        .writeStream.foreachBatch(process)
        .option("checkpointLocation", str(tmp_path / "ckpt"))
        .trigger(processingTime="200 milliseconds")
        .start()
    )
    stop_feeding = threading.Event()
    next_id = [3 * per_file]
    feed_lock = threading.Lock()

    def feed() -> None:
        while not stop_feeding.is_set():
            with feed_lock:
                start = next_id[0]
                x = _append(spark, source, start, per_file)
                inputs.update({start + i: x[i] for i in range(per_file)})
                next_id[0] += per_file
            stop_feeding.wait(0.5)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        feeder.start()
        _wait(lambda: len(timeline) >= 3, 180, "3 micro-batches before the swap")
        v2 = save_model(spark, tmp_path / "m2", table)
        swap_start = time.monotonic()
        assert model.reload() == v2
        swap_end = time.monotonic()
        assert model.version == v2
        # A broken version fails to load and leaves v2 serving.
        (tmp_path / "m2" / "weights.npy").write_bytes(b"not a numpy file")
        save_model(spark, tmp_path / "m2", table)
        with pytest.raises(ModelInitError, match="init_func"):
            model.reload()
        assert model.version == v2
        _wait(
            lambda: sum(1 for _, start, _ in timeline if start > swap_end) >= 3,
            180,
            "3 micro-batches after the swap",
        )
        stop_feeding.set()
        feeder.join(timeout=60)
        expected = next_id[0]
        _wait(
            lambda: spark.read.format("delta").load(sink).count() >= expected
            or query.exception() is not None,
            180,
            "the stream to drain",
        )
    finally:
        stop_feeding.set()
        query.stop()
        model.close()
    assert query.exception() is None
    result = spark.read.format("delta").load(sink).collect()
    ids = [r.id for r in result]
    assert len(ids) == len(set(ids)) == expected, "every row predicted exactly once"
    by_version = {v1: m1, v2: m2}
    before = {b for b, _, end in timeline if end < swap_start}
    after = {b for b, start, _ in timeline if start > swap_end}
    assert before and after
    for r in result:
        assert r.p.model_version in by_version
        want = by_version[r.p.model_version].predict(inputs[r.id][None, :])[0]
        assert r.p.prediction == want, f"row {r.id} of v{r.p.model_version}"
        if r.batch_id in before:
            assert r.p.model_version == v1, f"batch {r.batch_id} ran before the swap"
        if r.batch_id in after:
            assert r.p.model_version == v2, f"batch {r.batch_id} ran after the swap"


def test_refresh_seconds_follows_new_versions(spark, ray_address, tmp_path):
    """refresh_seconds= polls the table and swaps to a newly committed version."""
    make_linear_model(tmp_path / "m1", n_features=N_FEATURES, seed=1)
    m2 = make_linear_model(tmp_path / "m2", n_features=N_FEATURES, seed=2)
    table = str(tmp_path / "model")
    v1 = save_model(spark, tmp_path / "m1", table)
    with register_ray_model(
        spark, table, "refresh_predict", init_linear, apply_linear,
        return_type="bigint", num_actors=1, refresh_seconds=0.5,
    ) as model:
        assert model.version == v1
        v2 = save_model(spark, tmp_path / "m2", table)
        _wait(lambda: model.version == v2, 120, "the poller to load v2")
        rows, x = _rows(0, 20)
        df = spark.createDataFrame(rows, "id bigint, features array<double>")
        got = [r.p for r in df.select("id", model("features").alias("p")).orderBy("id").collect()]
        assert got == m2.predict(x).tolist()
        assert model.last_reload_error is None


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


@pytest.mark.slow
def test_killed_stream_driver_restarts_exactly_once(spark, tmp_path):
    """SIGKILL the streaming driver mid-micro-batch; a restart from the checkpoint writes each row once."""
    model_dir = tmp_path / "m"
    m = make_linear_model(model_dir, n_features=N_FEATURES, seed=3)
    table = str(tmp_path / "model")
    save_model(spark, model_dir, table)
    source, sink = tmp_path / "source", tmp_path / "sink"
    n_files, per_file = 8, 100
    xs = [_append(spark, str(source), k * per_file, per_file) for k in range(n_files)]
    x = np.concatenate(xs)
    args = [
        sys.executable, str(ROOT / "tests" / "stream_app.py"),
        "--source", str(source), "--sink", str(sink),
        "--checkpoint", str(tmp_path / "ckpt"), "--model-table", table,
        "--warehouse", str(tmp_path / "wh"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the app starts its own Ray
    log1 = open(tmp_path / "run1.log", "wb")
    proc = subprocess.Popen(args, stdout=log1, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    tree: list[psutil.Process] = []
    try:
        # Wait until 2 micro-batches are committed to the sink, then kill inside the next one.
        deadline = time.monotonic() + 300
        while _commits(sink) < 2:
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the stream never committed 2 micro-batches"
            tree = _tree(proc.pid) or tree
            time.sleep(0.1)
        time.sleep(0.3)
        tree = _tree(proc.pid) or tree
        assert _commits(sink) < n_files, "the stream finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        # The driver's JVM and its Ray are this test's processes too: end them like a crash would.
        for p in tree[1:]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree[1:], timeout=30)
        log1.close()
    partial = _commits(sink)
    assert 2 <= partial < n_files

    run2 = subprocess.run(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=600
    )
    out = run2.stdout.decode(errors="replace")
    assert run2.returncode == 0 and "STREAM-DONE" in out, out[-3000:]

    result = spark.read.format("delta").load(str(sink)).collect()
    ids = sorted(r.id for r in result)
    assert ids == list(range(n_files * per_file)), "each source row exactly once"
    expected = m.predict(x)
    checksum = sum((r.id + 1) * int(r.predicted) for r in result)
    assert checksum == sum((i + 1) * int(expected[i]) for i in range(len(expected)))
