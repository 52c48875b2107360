"""Ray on Spark: ``register_ray_model(..., ray_address="spark")`` starts Ray inside the Spark
application (``ray.util.spark.setup_ray_cluster``) and shuts it down when the last function that
uses it closes, or at interpreter exit (a notebook may never call ``close()``).

What :func:`acquire` does, in order, once per Ray on Spark cluster:

1. Refuses when this driver is already connected to another Ray (Ray on Spark needs a driver
   that is not; one driver serves one Ray).
2. Runs one short Spark job (one task per default-parallelism slot) that reports, from each
   executor's Python worker: whether ``ray`` is on its ``PATH`` (Ray on Spark starts each worker
   node with ``shutil.which("ray")`` there) and a digest of the Ray token it would use.
3. Decides the auth mode (:func:`plan_auth`): token auth (Ray 2.60's default) needs the token on
   the driver (head node) and on every executor (worker nodes and the UDF's Python workers),
   the same one. The driver takes it from ``spark.executorEnv.RAY_AUTH_TOKEN(_PATH)`` when it
   has none of its own. ``RAY_AUTH_MODE=disabled`` on the driver turns auth off everywhere.
4. Starts the cluster (``_ray.start_ray_on_spark``); every node gets ``RAY_AUTH_MODE``.

Options go through ``ray_on_spark=`` (:func:`check_options`): the keyword arguments of
``setup_ray_cluster``. The defaults leave Spark room to run the queries: 2 worker nodes of 1 CPU
(Ray's own default, one node taking every core of each Spark worker, would hold every task slot
for as long as Ray runs, and the SQL that calls the function would never get one) and no
dashboard (Ray on Spark binds it on every interface).

Example (``tests/test_ray_on_spark.py`` runs the same on a real cluster)::

    with register_ray_model(spark, table, "predict", init_linear, apply_linear,
                            ray_address="spark",
                            ray_on_spark={"max_worker_nodes": 2}) as model:
        spark.sql("select predict(features) from events").show()
    # the last function using it closed: the Ray nodes are gone
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from spark_ray_udf.errors import ConfigError, ConfigTypeError, RayAuthError, RayOnSparkError

log = logging.getLogger(__name__)

ADDRESS = "spark"  # the ray_address that asks for Ray on Spark

# setup_ray_cluster's keyword arguments in Ray 2.60 (tests/test_ray_on_spark.py checks them)
SETUP_KEYS = frozenset({
    "max_worker_nodes", "min_worker_nodes", "num_cpus_worker_node", "num_cpus_head_node",
    "num_gpus_worker_node", "num_gpus_head_node", "memory_worker_node", "memory_head_node",
    "object_store_memory_worker_node", "object_store_memory_head_node", "head_node_options",
    "worker_node_options", "ray_temp_root_dir", "strict_mode", "collect_log_to_path",
    "autoscale_upscaling_speed", "autoscale_idle_timeout_minutes",
})
DEFAULTS: Mapping[str, Any] = {
    "max_worker_nodes": 2,
    "num_cpus_worker_node": 1,
    "num_gpus_worker_node": 0,
    "head_node_options": {"include_dashboard": False},
}
_COUNTS = ("max_worker_nodes", "min_worker_nodes", "num_cpus_worker_node", "num_cpus_head_node",
           "num_gpus_worker_node", "num_gpus_head_node")
_BYTES = ("memory_worker_node", "memory_head_node", "object_store_memory_worker_node",
          "object_store_memory_head_node")
_TOKEN_CONFS = ("spark.executorEnv.RAY_AUTH_TOKEN", "spark.executorEnv.RAY_AUTH_TOKEN_PATH")


def check_options(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``setup_ray_cluster``'s keyword arguments: :data:`DEFAULTS` overlaid with ``given``,
    checked (:class:`ConfigError` names the key and what is allowed).

    >>> check_options({"max_worker_nodes": 3})["max_worker_nodes"], check_options(None)["head_node_options"]
    (3, {'include_dashboard': False})
    >>> check_options({"num_worker_nodes": 2})
    Traceback (most recent call last):
    spark_ray_udf.errors.ConfigError: ray_on_spark: unknown option 'num_worker_nodes'; setup_ray_cluster takes autoscale_idle_timeout_minutes, autoscale_upscaling_speed, collect_log_to_path, head_node_options, max_worker_nodes, memory_head_node, memory_worker_node, min_worker_nodes, num_cpus_head_node, num_cpus_worker_node, num_gpus_head_node, num_gpus_worker_node, object_store_memory_head_node, object_store_memory_worker_node, ray_temp_root_dir, strict_mode, worker_node_options
    """
    if given is not None and not isinstance(given, Mapping):
        raise ConfigTypeError(f"ray_on_spark must be a mapping of setup_ray_cluster options (got {type(given)!r})")
    given = dict(given or {})
    for key in given:
        if key not in SETUP_KEYS:
            raise ConfigError(
                f"ray_on_spark: unknown option {key!r}; setup_ray_cluster takes "
                f"{', '.join(sorted(SETUP_KEYS))}"
            )
    out = {**DEFAULTS, **given}
    out["head_node_options"] = {**DEFAULTS["head_node_options"], **dict(given.get("head_node_options") or {})}
    for key in _COUNTS + _BYTES:
        value = out.get(key)
        if value is None:
            continue
        low = 1 if key in ("max_worker_nodes", "num_cpus_worker_node") or key in _BYTES else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"ray_on_spark: {key} must be an int >= {low} (got {value!r})"
                + ("; ray.util.spark.MAX_NUM_WORKER_NODES would hold every Spark task slot, "
                   "leaving none for the queries that call the function"
                   if key == "max_worker_nodes" else "")
            )
    mn = out.get("min_worker_nodes")
    if mn is not None and mn > out["max_worker_nodes"]:
        raise ConfigError(
            f"ray_on_spark: min_worker_nodes ({mn}) must be <= max_worker_nodes ({out['max_worker_nodes']})"
        )
    for key in ("head_node_options", "worker_node_options"):
        if out.get(key) is not None and not isinstance(out[key], Mapping):
            raise ConfigTypeError(f"ray_on_spark: {key} must be a mapping of `ray start` options (got {out[key]!r})")
    return out


class ExecutorProbe(NamedTuple):
    """What one executor's Python worker reported before Ray on Spark starts."""

    host: str
    python: str
    ray_cli: str | None  # shutil.which("ray"), what start_ray_node runs
    path: str  # the PATH it searched
    token: str | None  # sha256 prefix of the Ray token it would use, None: no token


def token_digest(env: Mapping[str, str], home: str | os.PathLike[str]) -> str | None:
    """A short sha256 of the Ray token a process with ``env`` would use (Ray's order:
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), None when it has none.
    Only the digest leaves the executor, never the token.

    >>> token_digest({"RAY_AUTH_TOKEN": "abc"}, "/nonexistent")
    'ba7816bf8f01cfea'
    >>> token_digest({}, "/nonexistent") is None
    True
    """
    text = env.get("RAY_AUTH_TOKEN", "").strip()
    if not text:
        path = env.get("RAY_AUTH_TOKEN_PATH")
        file = Path(path) if path else Path(home) / ".ray" / "auth_token"
        try:
            text = file.read_text().strip()
        except OSError:
            text = ""
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def cli_problem(probes: Sequence[ExecutorProbe]) -> str | None:
    """Why Ray on Spark could not start its worker nodes on these executors, or None.

    >>> ok = ExecutorProbe("h", "/venv/bin/python", "/venv/bin/ray", "/venv/bin:/usr/bin", None)
    >>> cli_problem([ok]) is None
    True
    >>> print(cli_problem([ok._replace(ray_cli=None, path="/usr/bin")]))
    the executors on h cannot run `ray` (not on their PATH /usr/bin; Ray on Spark starts each Ray worker node with shutil.which('ray')): pass --conf spark.executorEnv.PATH=/venv/bin:/usr/bin (the folder of the executors' Python /venv/bin/python, which holds Ray's `ray` script), or install ray there
    """
    missing = [p for p in probes if p.ray_cli is None]
    if not missing:
        return None
    first = missing[0]
    hosts = ", ".join(sorted({p.host for p in missing}))
    folder = str(Path(first.python).parent)
    return (
        f"the executors on {hosts} cannot run `ray` (not on their PATH {first.path}; Ray on Spark "
        "starts each Ray worker node with shutil.which('ray')): pass --conf "
        f"spark.executorEnv.PATH={folder}:{first.path} (the folder of the executors' Python "
        f"{first.python}, which holds Ray's `ray` script), or install ray there"
    )


AuthMode = Literal["token", "disabled"]
_TOKEN_FIX = (
    "give the driver and the executors the same token: --conf "
    "spark.executorEnv.RAY_AUTH_TOKEN_PATH=<a file holding it on every machine> (the driver "
    "reads the same path) or --conf spark.executorEnv.RAY_AUTH_TOKEN=<the token> (`ray "
    "get-auth-token --generate` makes one), or set RAY_AUTH_MODE=disabled on the driver to run "
    "this Ray without auth (docs/deploy.md, 'Ray on Spark')"
)


def plan_auth(driver_mode: str, driver_token: str | None, executors: Sequence[str | None]) -> AuthMode:
    """The auth mode of a Ray on Spark cluster, or :class:`RayAuthError` saying what is missing.

    ``driver_mode`` is the driver's ``RAY_AUTH_MODE`` (``""``: unset, Ray 2.60's default is
    token); ``driver_token`` and ``executors`` are :func:`token_digest` results.

    >>> plan_auth("", "ab", ["ab", "ab"]), plan_auth("disabled", None, [None])
    ('token', 'disabled')
    >>> plan_auth("", "ab", ["ab", None])
    Traceback (most recent call last):
    spark_ray_udf.errors.RayAuthError: Ray on Spark with token auth: 1 of 2 executors have no Ray token; give the driver and the executors the same token: --conf spark.executorEnv.RAY_AUTH_TOKEN_PATH=<a file holding it on every machine> (the driver reads the same path) or --conf spark.executorEnv.RAY_AUTH_TOKEN=<the token> (`ray get-auth-token --generate` makes one), or set RAY_AUTH_MODE=disabled on the driver to run this Ray without auth (docs/deploy.md, 'Ray on Spark')
    """
    if driver_mode == "disabled":
        return "disabled"
    if driver_mode not in ("", "token"):
        raise RayAuthError(f"Ray on Spark: RAY_AUTH_MODE on the driver must be 'token', 'disabled' or unset (got {driver_mode!r})")
    if driver_token is None:
        raise RayAuthError(f"Ray on Spark with token auth: the driver (the Ray head node) has no Ray token; {_TOKEN_FIX}")
    lacking = sum(d is None for d in executors)
    if lacking:
        raise RayAuthError(
            f"Ray on Spark with token auth: {lacking} of {len(executors)} executors have no Ray "
            f"token; {_TOKEN_FIX}"
        )
    if any(d != driver_token for d in executors):
        raise RayAuthError(
            f"Ray on Spark with token auth: the executors' Ray token is not the driver's; {_TOKEN_FIX}"
        )
    return "token"


def _probe(_: Any) -> Any:
    import shutil
    import socket
    import sys

    yield ExecutorProbe(
        socket.gethostname(), sys.executable, shutil.which("ray"), os.environ.get("PATH", ""),
        token_digest(os.environ, Path.home()),
    )


def probe_executors(spark: Any) -> list[ExecutorProbe]:
    """:class:`ExecutorProbe` from one task per default-parallelism slot (~1 s)."""
    sc = spark.sparkContext
    n = max(1, int(sc.defaultParallelism))
    return [ExecutorProbe(*p) for p in sc.parallelize(range(n), n).mapPartitions(_probe).collect()]


def _adopt_token_from_conf(conf: Mapping[str, str]) -> None:
    """Give the driver the executors' token when it has none of its own (the head node runs
    on the driver and needs the same token)."""
    if token_digest(os.environ, Path.home()) is not None:
        return
    token, path = (conf.get(k, "") for k in _TOKEN_CONFS)
    if token.strip():
        os.environ["RAY_AUTH_TOKEN"] = token.strip()
    elif path and Path(path).is_file():
        os.environ["RAY_AUTH_TOKEN_PATH"] = path


@dataclass
class _Running:
    address: str
    options: dict[str, Any]
    stop: Any
    holders: int = 0
    start_s: float = 0.0


_lock = threading.RLock()
_running: _Running | None = None
_atexit_registered = False


class Lease:
    """One function's use of the Ray on Spark cluster; :meth:`release` (idempotent) gives it
    back, and the last release shuts the cluster down."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._released = False

    def release(self) -> None:
        with _lock:
            if self._released:
                return
            self._released = True
            _release_one()


def running_address() -> str | None:
    """The GCS address of the Ray on Spark cluster this driver started, None when none runs."""
    with _lock:
        return _running.address if _running is not None else None


def start_seconds() -> float | None:
    """How long the running cluster took to start (probe, head, worker nodes), None if none."""
    with _lock:
        return _running.start_s if _running is not None else None


def acquire(spark: Any, options: Mapping[str, Any] | None) -> Lease:
    """A :class:`Lease` on this driver's Ray on Spark cluster, starting it if none runs.

    A second function reuses the running cluster when its options are the same (else
    :class:`ConfigError`: one Ray per driver).
    """
    global _running, _atexit_registered
    wanted = check_options(options)
    with _lock:
        if _running is not None:
            if _running.options != wanted:
                raise ConfigError(
                    f"ray_on_spark: a Ray on Spark cluster with {_running.options} already runs "
                    f"for this driver (at {_running.address}); {wanted} asks for another: pass the "
                    "same options, or close the functions using it first"
                )
            _running.holders += 1
            return Lease(_running.address)
        _running = _start(spark, wanted)
        _running.holders = 1
        if not _atexit_registered:  # before any pool's: atexit runs it after they close
            atexit.register(shutdown)
            _atexit_registered = True
        return Lease(_running.address)


def _start(spark: Any, options: dict[str, Any]) -> _Running:
    import ray

    from spark_ray_udf import _ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        raise ConfigError(
            f"ray_address='spark': this driver is already connected to the Ray at {current}; Ray "
            "on Spark starts its own cluster for a driver not connected to Ray: close the "
            "functions using it and call ray.shutdown() first, or pass ray_address="
            f"{current!r}"
        )
    t0 = time.monotonic()
    probes = probe_executors(spark)
    problem = cli_problem(probes)
    if problem is not None:
        raise RayOnSparkError(f"ray_address='spark': {problem}")
    conf = dict(spark.sparkContext.getConf().getAll())
    _adopt_token_from_conf(conf)
    mode = plan_auth(
        os.environ.get(_ray.AUTH_MODE_ENV, ""), token_digest(os.environ, Path.home()),
        [p.token for p in probes],
    )
    _ray.set_auth_mode(mode)  # the head (a child of this process) and our connection
    if mode == "disabled":
        log.warning("Ray on Spark runs without auth (RAY_AUTH_MODE=disabled on the driver)")
    log.info("starting Ray on Spark: %s (auth %s)", options, mode)
    try:
        address, stop = _ray.start_ray_on_spark(options, node_env={_ray.AUTH_MODE_ENV: mode})
    except Exception as exc:
        raise RayOnSparkError(
            f"ray_address='spark': setup_ray_cluster({options}) failed: {exc}; its logs are under "
            "ray_temp_root_dir (default /tmp) on the driver and executors"
        ) from exc
    seconds = time.monotonic() - t0
    log.info("Ray on Spark runs at %s (started in %.1fs)", address, seconds)
    return _Running(address=address, options=options, stop=stop, start_s=seconds)


def _release_one() -> None:
    if _running is None:
        return
    _running.holders -= 1
    if _running.holders <= 0:
        shutdown()


def shutdown() -> None:
    """Shut the Ray on Spark cluster down now, whoever still holds it (at interpreter exit, and
    for tests); nothing when none runs."""
    global _running
    with _lock:
        running, _running = _running, None
    if running is None:
        return
    log.info("shutting Ray on Spark at %s down", running.address)
    try:
        running.stop()
    except Exception as exc:  # at exit: Spark may be gone already; its executors end the nodes
        log.warning("shutting Ray on Spark down failed: %s", exc)
