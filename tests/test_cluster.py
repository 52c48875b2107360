"""Real clusters on this machine: Spark standalone (master + 2 workers) and a two-node Ray.

One :class:`~spark_ray_udf.testing.LocalCluster` for the module (it takes ~15 s to start),
inside a private network namespace: every port stays on loopback. Drivers run with
``spark-submit --master spark://...`` inside it (``tests/cluster_app.py``). Ray's token auth is
on; the Spark workers do not have the token, so each job passes it to its executors with
``spark.executorEnv.RAY_AUTH_TOKEN_PATH`` (as docs/deploy.md says). The last test stops the
cluster and checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_ray_udf.cluster import loopback_only, parse_ss
from spark_ray_udf.testing import LocalCluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
FLIGHT_SHADOW = "ray is not installed on this executor (tests/test_cluster.py shadow)"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: Any) -> Iterator[LocalCluster]:
    if sys.platform != "linux":
        pytest.skip("LocalCluster needs Linux network namespaces")
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    yield c
    c.stop()


def _token(cluster: LocalCluster) -> dict[str, str]:
    return {"spark.executorEnv.RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}


def _driver_env(cluster: LocalCluster) -> dict[str, str]:
    return {"RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}


def _app_args(cluster: LocalCluster, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--ray-address", cluster.ray_address, "--data-dir", str(data), "--out", str(out), *extra,
    ]


def _submit_app(cluster: LocalCluster, tmp_path: Path, *extra: str, conf: dict[str, str]) -> dict[str, Any]:
    out = tmp_path / "out.json"
    proc = cluster.spark_submit(
        "tests/cluster_app.py", *_app_args(cluster, tmp_path / "data", out, *extra),
        conf=conf, env=_driver_env(cluster), timeout_s=600,
    )
    assert out.exists(), f"rc {proc.returncode}:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _pool_folders(cluster: LocalCluster) -> list[Path]:
    return [
        p for i in range(cluster.ray_nodes)
        for p in (cluster.node_tmp(i) / "spark-ray-udf").glob("spark-ray-udf.cluster_predict.*")
    ]


def test_every_port_is_on_loopback(cluster):
    """Spark's and Ray's ports listen on 127.0.0.1 only, inside the namespace; outside it, no
    process of the cluster listens anywhere."""
    inside = cluster.listening()
    ports = {p for _, p in inside}
    assert {6379, 7077} <= ports and len(inside) > 5
    assert loopback_only(inside) == []
    outer = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30, check=True).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", outer)}
    assert pids & cluster.pids() == set()


def test_submit_serves_exact_results_spread_over_both_nodes(cluster, tmp_path):
    """spark-submit on the standalone cluster: exact predictions over 4 partitions, the two
    actors on the two Ray nodes (spread by default), each with its model folder under its own
    node's temp folder; the executors' Python workers imported Ray before connecting and still
    joined with token auth; after close() no pool folder is left on any node. A model table on
    the driver's disk goes through the object store by default.

    Locality (the pool's stats): every batch is counted on the Ray node of the actor that served
    it, and ``crossed_nodes`` counts the batches whose caller joined another Ray node than the
    actor's. Here every Ray node and Spark worker share 127.0.0.1, so "node" means a Ray node (a
    raylet), not a machine: a Spark Python worker's ray.init joins whichever raylet Ray finds at
    its address, so how many batches cross is up to Ray and not asserted; only that the counts
    cover both nodes, add up, and bound crossed_nodes."""
    out = _submit_app(cluster, tmp_path, "--import-ray-first", "--try-storage", conf=_token(cluster))
    assert "error" not in out, out.get("traceback")
    assert out["first"]["exact"] and out["first"]["rows"] == 20000
    assert len(out["alive_nodes"]) == 2 and sorted(out["actor_nodes"]) == out["alive_nodes"]
    assert out["auth_mode"] == "token"
    tmp_roots = sorted(
        next(i for i in range(cluster.ray_nodes) if Path(d).is_relative_to(cluster.node_tmp(i)))
        for d in out["work_roots"]
    )
    assert tmp_roots == [0, 1]
    # the model table is on the driver's disk and Ray has two nodes: "auto" takes the
    # object-store path; "storage", asked explicitly, has each actor read the files (this
    # machine's disk is every node's here, as a shared mount would be)
    assert out["files"] == []
    assert out["storage_files"] > 0 and out["storage"]["exact"]
    assert _pool_folders(cluster) == []
    loc = out["locality"]
    assert set(loc["by_node"]) == set(out["actor_nodes"]) and loc["rows"] == 20000
    assert sum(n["rows"] for n in loc["by_node"].values()) == 20000
    assert sum(n["batches"] for n in loc["by_node"].values()) == loc["batches"] > 0
    assert isinstance(loc["crossed_nodes"], int) and 0 <= loc["crossed_nodes"] <= loc["batches"]


def test_executor_without_the_token_fails_fast_naming_the_fix(cluster, tmp_path):
    """Executors without the cluster's token: the query fails at the first task with
    RayAuthError saying the token is missing and how to pass it (no 25 s ConnectionError)."""
    out = _submit_app(cluster, tmp_path, conf={"spark.task.maxFailures": "1"})
    assert "error" in out
    assert "RayAuthError" in out["error"] and "(missing token)" in out["error"]
    assert "spark.executorEnv.RAY_AUTH_TOKEN_PATH" in out["error"]
    # Spark's task start and Python worker included; the check itself takes milliseconds
    assert out["error_s"] < 60, out["error_s"]


def test_connect_without_token_inside_the_cluster_is_fast(cluster, tmp_path):
    """The same check at the process level, timed: under 10 s with a wrong token."""
    code = (
        "import time, ray\n"
        "from spark_ray_udf._ray import connect_worker\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    connect_worker({cluster.ray_address!r}, who='probe', auth='token')\n"
        "except Exception as e:\n"
        "    print('ERR', round(time.monotonic() - t, 3), type(e).__name__, e)\n"
    )
    proc = cluster.python(code, env={"RAY_AUTH_TOKEN": "f" * 64})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ERR ")), "")
    assert "RayAuthError" in line and "(wrong token)" in line, proc.stderr[-3000:]
    assert float(line.split()[1]) < 10


def test_cluster_executors_without_ray_serve_over_flight(cluster, tmp_path):
    """spark-submit on the standalone cluster, executors with neither Ray's token nor an
    importable Ray: exact predictions over 4 partitions through the actors' Flight servers on
    the two Ray nodes."""
    shadow = tmp_path / "shadow"
    (shadow / "ray").mkdir(parents=True)
    (shadow / "ray" / "__init__.py").write_text(f"raise ImportError({FLIGHT_SHADOW!r})\n")
    out_path = tmp_path / "out.json"
    proc = cluster.spark_submit(
        "tests/flight_cluster_app.py", "--ray-address", cluster.ray_address,
        "--data-dir", str(tmp_path / "data"), "--out", str(out_path),
        # standalone executors take this as their whole PYTHONPATH: the checkout goes after it
        conf={
            "spark.executorEnv.PYTHONPATH": f"{shadow}:{ROOT}",
            "spark.task.maxFailures": "1",
        },
        env={"RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}, timeout_s=600,
    )
    assert out_path.exists(), f"rc {proc.returncode}:\n{proc.stderr[-6000:]}"
    out = json.loads(out_path.read_text())
    assert "error" not in out, out.get("traceback")
    assert out["executors_import_ray"] == [FLIGHT_SHADOW]
    assert out["exact"] and out["rows"] == 20000 and out["rows_sql"] == 20000
    assert len(set(out["actor_nodes"])) == 2
    assert all(u.startswith("grpc://127.0.0.1:") for u in out["flight_uris"])


def test_losing_a_ray_node_leaves_the_pool_serving(cluster, tmp_path):
    """SIGKILL every process of Ray node 1 while the pool serves: the next query is still
    exact (Ray restarts the lost actor on node 0; the client retries its batches)."""
    out_path, go = tmp_path / "out.json", tmp_path / "go"
    proc = cluster.popen(
        cluster.spark_submit_args(
            "tests/cluster_app.py",
            *_app_args(cluster, tmp_path / "data", out_path, "--kill-wait", str(go)),
            conf=_token(cluster),
        ),
        env=_driver_env(cluster), cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        phase1 = Path(str(out_path) + ".phase1")
        deadline = time.monotonic() + 400
        while not phase1.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert phase1.exists(), proc.stderr.read()[-6000:] if proc.poll() is not None else "timeout"
        first = json.loads(phase1.read_text())
        assert first["first"]["exact"] and len(set(first["actor_nodes"])) == 2
        killed = cluster.kill_ray_node(1)
        assert killed
        go.write_text("")
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads(out_path.read_text())
    assert "error" not in out, out.get("traceback")
    assert out["second"]["exact"] and out["second"]["rows"] == 20000
    assert len(out["alive_after"]) == 1
    assert set(out["actor_nodes_after"]) == set(out["alive_after"])
    cluster.start_ray_node(1)  # for the tests after this one


@pytest.mark.slow
def test_jobs_run_unchanged_on_the_cluster(cluster, spark, tmp_path):
    """jobs/ on the standalone cluster with --ray-address (train, batch, stream, all through
    spark-submit) give the same predictions as batch_predict run locally (python, local Spark,
    embedded Ray)."""
    data = tmp_path / "demo"
    tok, env = _token(cluster), _driver_env(cluster)

    def submit(script: str, *extra: str) -> None:
        proc = cluster.spark_submit(
            script, "--data-dir", str(data), "--ray-address", cluster.ray_address, *extra,
            conf=tok, env=env, timeout_s=900,
        )
        assert proc.returncode == 0, f"{script}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"

    def predictions() -> list[tuple[int, int]]:
        rows = spark.read.format("delta").load(str(data / "tables" / "mnist_predictions")).collect()
        return sorted((r.id, r.predicted) for r in rows)

    submit("jobs/train_mnist.py", "--epochs", "1")  # the demo trains 8; one shows the path
    local = subprocess.run(
        [sys.executable, "jobs/batch_predict.py", "--data-dir", str(data)], cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYSPARK_GATEWAY"))},
        capture_output=True, text=True, timeout=900,
    )
    assert local.returncode == 0, local.stderr[-6000:]
    expected = predictions()
    submit("jobs/batch_predict.py")
    assert predictions() == expected and len(expected) > 300
    submit("jobs/stream_predict.py")


def test_stop_leaves_no_process(cluster):
    """stop() ends every process the cluster started (executors and Ray workers included)."""
    started = cluster.started_pids()
    names = " ".join(Path(f"/proc/{p}/comm").read_text().strip() for p in cluster.pids())
    assert len(started) > 10 and "raylet" in names and "java" in names
    cluster.stop()  # raises ClusterError naming any process still alive
    assert cluster.leftover_pids() == set() and cluster.pids() == set()


def test_parse_ss_and_loopback_only():
    """The ss parsing the loopback check relies on."""
    text = "LISTEN 0 4096 0.0.0.0:22 0.0.0.0:*\nLISTEN 0 4096 [::1]:631 [::]:*\n"
    assert loopback_only(parse_ss(text)) == [("0.0.0.0", 22)]
