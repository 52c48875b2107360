"""Ray on Spark (``register_ray_model(..., ray_address="spark")``).

The decisions (options, auth, the ``ray`` look-up) are tested without Spark or Ray; the Ray APIs
it leans on are checked against the installed Ray; one cluster test runs the whole path on a
Spark standalone cluster with no Ray of its own (``LocalCluster(ray_nodes=0)``): the job starts
Ray inside Spark, serves exact results from actors on the Ray nodes that Spark executors run,
and after close() no Ray process is left.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_ray_udf import ray_on_spark
from spark_ray_udf.errors import ConfigError, RayAuthError
from spark_ray_udf.ray_on_spark import ExecutorProbe, check_options, cli_problem, plan_auth


def test_options_defaults_leave_spark_room_and_turn_the_dashboard_off():
    """Without options: 2 worker nodes of 1 CPU, no GPU, no dashboard; given keys win."""
    opts = check_options(None)
    assert opts["max_worker_nodes"] == 2 and opts["num_cpus_worker_node"] == 1
    assert opts["num_gpus_worker_node"] == 0
    assert opts["head_node_options"] == {"include_dashboard": False}
    opts = check_options({"max_worker_nodes": 4, "head_node_options": {"include_dashboard": True}})
    assert opts["max_worker_nodes"] == 4 and opts["head_node_options"]["include_dashboard"] is True


@pytest.mark.parametrize(
    "given, words",
    [
        ({"num_worker_nodes": 2}, "unknown option 'num_worker_nodes'"),
        ({"max_worker_nodes": -1}, "MAX_NUM_WORKER_NODES would hold every Spark task slot"),
        ({"max_worker_nodes": 2, "min_worker_nodes": 3}, "min_worker_nodes (3) must be <="),
        ({"num_cpus_worker_node": 0}, "num_cpus_worker_node must be an int >= 1"),
        ({"memory_worker_node": "1g"}, "memory_worker_node must be an int >= 1"),
        ({"worker_node_options": ["x"]}, "worker_node_options must be a mapping"),
    ],
)
def test_bad_options_name_the_key(given, words):
    """A bad option is refused before anything starts, naming the key."""
    with pytest.raises(ConfigError) as info:
        check_options(given)
    assert words in str(info.value)


def test_options_are_setup_ray_cluster_keywords():
    """SETUP_KEYS are exactly setup_ray_cluster's keyword arguments (fails when Ray changes)."""
    from ray.util.spark import setup_ray_cluster

    params = inspect.signature(setup_ray_cluster).parameters
    named = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert named == ray_on_spark.SETUP_KEYS


def test_ray_on_spark_private_api():
    """What _ray.start_ray_on_spark relies on in Ray: the start-hook variable and its classes,
    and that the worker nodes run ``shutil.which("ray")`` (fails when Ray changes them)."""
    import ray.util.spark.cluster_init as ci
    import ray.util.spark.start_ray_node as srn
    from ray.util.spark.databricks_hook import DefaultDatabricksRayOnSparkStartHook
    from ray.util.spark.start_hook_base import RayOnSparkStartHook

    from spark_ray_udf import _ray

    assert ci.RAY_ON_SPARK_START_HOOK == _ray.RAY_ON_SPARK_HOOK_ENV
    assert "load_class(os.environ[RAY_ON_SPARK_START_HOOK])()" in inspect.getsource(ci._create_hook_entry)
    assert "start_hook.custom_environment_variables()" in inspect.getsource(ci._setup_ray_cluster)
    for base in (RayOnSparkStartHook, DefaultDatabricksRayOnSparkStartHook):
        assert callable(base.custom_environment_variables)
    assert _ray._ray_on_spark_hook_base() is RayOnSparkStartHook
    assert ci._active_ray_cluster is None and "spark_job_server" in inspect.signature(ci.RayClusterOnSpark).parameters
    assert "self.spark_job_server.shutdown()" in inspect.getsource(ci.RayClusterOnSpark.shutdown)
    assert "self.head_proc = head_proc" in inspect.getsource(ci.RayClusterOnSpark.__init__)
    assert 'shutil.which(ray_cli_cmd)' in Path(srn.__file__).read_text()


def test_plan_auth():
    """Token auth needs the same token on the driver and every executor; disabled is explicit."""
    assert plan_auth("", "a", ["a", "a"]) == "token"
    assert plan_auth("token", "a", ["a"]) == "token"
    assert plan_auth("disabled", None, [None, "b"]) == "disabled"
    with pytest.raises(RayAuthError, match="the driver .* has no Ray token"):
        plan_auth("token", None, ["a"])
    with pytest.raises(RayAuthError, match="1 of 2 executors have no Ray token.*RAY_AUTH_TOKEN_PATH"):
        plan_auth("", "a", ["a", None])
    with pytest.raises(RayAuthError, match="not the driver's"):
        plan_auth("", "a", ["b"])
    with pytest.raises(RayAuthError, match="must be 'token', 'disabled' or unset"):
        plan_auth("on", "a", ["a"])


def test_token_digest_follows_rays_order(tmp_path):
    """RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; only a digest."""
    (tmp_path / "t").write_text("secret\n")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home")
    d = ray_on_spark.token_digest
    assert d({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}, tmp_path) == d({"RAY_AUTH_TOKEN": "secret"}, "/x")
    assert d({}, tmp_path) == d({"RAY_AUTH_TOKEN": "home"}, "/x")
    assert d({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, tmp_path) is None
    assert "secret" not in (d({"RAY_AUTH_TOKEN": "secret"}, "/x") or "")


def test_missing_ray_cli_names_spark_executor_env_path():
    """An executor without ``ray`` on PATH: the fix names spark.executorEnv.PATH and the folder."""
    ok = ExecutorProbe("a", "/v/bin/python", "/v/bin/ray", "/v/bin:/bin", None)
    bad = ExecutorProbe("b", "/v/bin/python", None, "/bin", None)
    assert cli_problem([ok, ok]) is None
    why = cli_problem([ok, bad]) or ""
    assert "executors on b" in why and "spark.executorEnv.PATH=/v/bin:/bin" in why


def test_ray_on_spark_options_need_the_spark_address():
    """ray_on_spark= with another ray_address is refused (nothing starts)."""
    from spark_ray_udf import register_ray_model

    with pytest.raises(ConfigError, match="ray_on_spark needs ray_address='spark'"):
        register_ray_model(
            None, "t", "f", lambda d, c: None, lambda m, x: x, ray_on_spark={"max_worker_nodes": 1}  # type: ignore[arg-type]
        )


def test_leases_share_one_cluster_and_the_last_release_stops_it(monkeypatch):
    """Two functions with the same options share one Ray on Spark; other options are refused;
    the last release stops it, once; shutdown() with none running does nothing."""
    stopped: list[str] = []
    starts: list[dict[str, Any]] = []

    def fake_start(spark: Any, options: dict[str, Any]) -> Any:
        starts.append(options)
        return ray_on_spark._Running(address="127.0.0.1:9999", options=options,
                                     stop=lambda: stopped.append("stop"), start_s=1.0)

    monkeypatch.setattr(ray_on_spark, "_start", fake_start)
    monkeypatch.setattr(ray_on_spark, "_atexit_registered", True)
    a = ray_on_spark.acquire(None, None)
    b = ray_on_spark.acquire(None, {})
    assert a.address == b.address == ray_on_spark.running_address() and len(starts) == 1
    with pytest.raises(ConfigError, match="already runs"):
        ray_on_spark.acquire(None, {"max_worker_nodes": 5})
    a.release()
    a.release()  # idempotent: does not count twice
    assert stopped == [] and ray_on_spark.running_address() is not None
    b.release()
    assert stopped == ["stop"] and ray_on_spark.running_address() is None
    ray_on_spark.shutdown()
    assert stopped == ["stop"]


# --- on a real Spark standalone cluster ---------------------------------------------------------

# small nodes: 1 CPU each (the other core of each Spark worker runs the queries' tasks)
_OPTIONS = {
    "max_worker_nodes": 2,
    "num_cpus_worker_node": 1,
    "num_gpus_worker_node": 0,
    "memory_worker_node": 1 << 30,
    "object_store_memory_worker_node": 200 << 20,
    "object_store_memory_head_node": 200 << 20,
}


# Ray on Spark starts the nodes of one machine 10 s apart (a lock in /tmp held that long after
# each node picks its worker ports); every node of this harness is on one machine, where 3 s is
# enough for a node to bind its ports (start 47.5 s with it, 51.5 s without, on a machine this
# loaded the difference is within the noise)
_ONE_MACHINE_ENV = {"RAY_ON_SPARK_RAY_WORKER_NODE_STARTUP_INTERVAL": "3"}
_ONE_MACHINE = {f"spark.executorEnv.{k}": v for k, v in _ONE_MACHINE_ENV.items()}


@pytest.fixture(scope="module")
def spark_only(tmp_path_factory: Any) -> Iterator[Any]:
    if sys.platform != "linux":
        pytest.skip("LocalCluster needs Linux network namespaces")
    from spark_ray_udf.testing import LocalCluster

    # two Spark workers of 2 cores: one slot each holds a Ray worker node, one runs the SQL
    c = LocalCluster(tmp_path_factory.mktemp("ros"), ray_nodes=0, worker_cores=2, worker_memory="1g")
    c.start()
    yield c
    c.stop()


@pytest.mark.cluster
def test_ray_on_spark_serves_and_leaves_no_ray(spark_only, tmp_path):
    """spark-submit a driver with ray_address="spark" on a Spark cluster without Ray: Ray
    starts inside Spark with token auth (the token reaches the executors through
    spark.executorEnv.RAY_AUTH_TOKEN_PATH; the driver, the head node, reads the same file), the
    query over 4 partitions is exact, both actors run on Ray worker nodes that are processes of
    Spark executors (not on the driver's head node), and once the function is closed every Ray
    process (nodes, GCS, actors) is gone."""
    cluster = spark_only
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    proc = cluster.spark_submit(
        "tests/cluster_app.py", "--ray-address", "spark", "--data-dir", str(tmp_path / "data"),
        "--out", str(out), "--ray-on-spark", json.dumps(_OPTIONS),
        conf={"spark.executorEnv.RAY_AUTH_TOKEN_PATH": str(cluster.token_path), **_ONE_MACHINE},
        env={"RAY_AUTH_TOKEN_PATH": str(cluster.token_path), **_ONE_MACHINE_ENV}, timeout_s=400,
    )
    wall = time.monotonic() - t0
    assert out.exists(), f"rc {proc.returncode}:\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert "error" not in res, res.get("traceback")
    assert res["first"]["exact"] and res["first"]["rows"] == 20000
    assert res["auth_mode"] == "token"
    # head (the driver's, 0 CPUs) + 2 worker nodes; the actors on the worker nodes only
    assert len(res["alive_nodes"]) == 3
    assert res["driver_node"] not in res["actor_nodes"]
    assert set(res["actor_nodes"]) <= set(res["alive_nodes"])
    assert res["under_executor"] == [True, True]
    assert res["locality"]["rows"] == 20000
    assert res["ray_left_after_close"] == [], res["ray_left_after_close"]
    print(f"Ray on Spark started in {res['ray_on_spark_start_s']:.1f}s; job {wall:.0f}s; "
          f"Ray gone {res['ray_gone_s']:.1f}s after close")
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in cluster.pids() if Path(f"/proc/{p}").exists()}
    assert not names & {"raylet", "gcs_server"}, names


_REFUSAL_DRIVER = """
import time
from pyspark.sql import SparkSession
from spark_ray_udf import ray_on_spark
spark = SparkSession.builder.appName("ros-refusal").getOrCreate()
t = time.monotonic()
try:
    ray_on_spark.acquire(spark, None)
    print("STARTED")
except Exception as exc:
    print("ERR", round(time.monotonic() - t, 2), type(exc).__name__, exc)
finally:
    spark.stop()
"""


@pytest.mark.cluster
def test_ray_on_spark_without_the_executors_token_refuses_before_starting(spark_only, tmp_path):
    """Token auth on, the driver has the token, the executors do not: RayAuthError from the
    executor probe within seconds, naming spark.executorEnv.RAY_AUTH_TOKEN_PATH, before
    setup_ray_cluster runs (a bare driver, no model: only the refusal is under test)."""
    script = tmp_path / "refusal.py"
    script.write_text(_REFUSAL_DRIVER)
    proc = spark_only.spark_submit(
        str(script), env={"RAY_AUTH_TOKEN_PATH": str(spark_only.token_path)}, timeout_s=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith(("ERR ", "STARTED"))), "")
    assert line.startswith("ERR "), f"{line!r}\n{proc.stderr[-4000:]}"
    assert "RayAuthError" in line and "executors have no Ray token" in line, line
    assert "spark.executorEnv.RAY_AUTH_TOKEN_PATH" in line
    assert float(line.split()[1]) < 30, line
