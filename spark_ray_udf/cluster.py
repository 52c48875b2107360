"""A real multi-node cluster on one machine, for tests: Spark standalone + a Ray cluster.

:class:`LocalCluster` starts, inside a private network namespace that it creates (its only
interface is ``lo``, so no port of the cluster can be reached from, or listen on, the machine's
external address):

* a Spark standalone master and ``spark_workers`` workers, from the pyspark installation's own
  launch classes (``bin/spark-class org.apache.spark.deploy.master.Master`` / ``...Worker``);
* a Ray cluster of ``ray_nodes`` nodes (``ray start --head`` and ``ray start --address=...``),
  separate raylets with their own resources (``{"node0": 1}``, ``{"node1": 1}``, ...) and their own
  ``--temp-dir`` under the cluster's folder, with Ray's token authentication on and a token of
  its own (a file under the cluster's folder, never ``~/.ray/auth_token``).

Every process of the cluster lives in that namespace, so the namespace is the record of what the
cluster started: :meth:`LocalCluster.pids` lists them (Spark executors and Ray workers started
later included), :meth:`LocalCluster.stop` ends exactly those and checks that none is left.
Drivers run inside the namespace too, through :meth:`LocalCluster.run` / :meth:`spark_submit`.

Why a namespace: on Linux Ray ignores ``--node-ip-address=127.0.0.1`` (it advertises and binds
the machine's external address), and its single-machine switch refuses a second node. In a
namespace with only ``lo``, Ray finds no other address than 127.0.0.1.

Needs Linux, ``unshare`` and ``nsenter`` (util-linux), ``ip`` (iproute2) and Java; as root a
plain network namespace is used, otherwise a user namespace (``unshare --user
--map-root-user``) where the kernel allows it.

Example (``tests/test_cluster.py`` runs these lines)::

    from spark_ray_udf.testing import LocalCluster

    with LocalCluster(tmp_path) as cluster:
        out = cluster.spark_submit("jobs/batch_predict.py", "--ray-address", cluster.ray_address)
        assert out.returncode == 0, out.stderr
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spark_ray_udf.errors import ConfigError, SparkRayUdfError

log = logging.getLogger(__name__)

SPARK_MASTER_PORT = 7077
RAY_GCS_PORT = 6379
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0

# Environment of the pytest/driver process that must not leak into the cluster's processes.
_DROPPED_ENV = re.compile(r"^(RAY_.*|PYSPARK_GATEWAY_.*|SPARK_.*|_PYSPARK_.*|PYSPARK_PIN_THREAD)$")


class ClusterError(SparkRayUdfError, RuntimeError):
    """The local cluster could not start or stop as asked."""


def loopback_only(listening: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The ``(address, port)`` pairs of ``listening`` that are not on the loopback range.

    ``0.0.0.0`` and ``::`` count as not loopback (they are every interface).

    >>> loopback_only([("127.0.0.1", 6379), ("127.0.0.2", 8076), ("0.0.0.0", 22), ("::1", 80)])
    [('0.0.0.0', 22)]
    """
    def is_loopback(addr: str) -> bool:
        addr = addr.strip("[]").split("%")[0]
        return addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1") or addr.startswith(
            "::ffff:127."
        )

    return [(a, p) for a, p in listening if not is_loopback(a)]


def parse_ss(text: str) -> list[tuple[str, int]]:
    """``(address, port)`` of every listening socket in ``ss -ltnH`` output.

    >>> parse_ss("LISTEN 0 4096 127.0.0.1:6379 0.0.0.0:*\\nLISTEN 0 50 [::ffff:127.0.0.1]:7077 [::]:*")
    [('127.0.0.1', 6379), ('::ffff:127.0.0.1', 7077)]
    """
    out: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        addr, _, port = fields[3].rpartition(":")
        if port.isdigit():
            out.append((addr.strip("[]"), int(port)))
    return out


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rpartition(")")[2].split()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def spark_home() -> Path:
    """The Spark installation that pyspark ships (its ``bin/spark-class`` starts the daemons)."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def delta_jars() -> list[str]:
    """The Delta Lake JARs of the pip installation, resolved once through ``spark.jars.packages``.

    The cluster has no network: its drivers get the JARs as files (``--jars``). They come from
    Ivy's cache, filled (once, outside the namespace) by a local Spark with Delta, as
    :func:`spark_ray_udf.testing.local_spark` starts.
    """
    found = _cached_delta_jars()
    if not found:
        log.info("resolving the Delta JARs (once) with a local Spark")
        code = (
            "from spark_ray_udf.testing import local_spark\n"
            "local_spark('resolve-delta-jars', cores=1).stop()\n"
        )
        subprocess.run(
            [sys.executable, "-c", code], check=True, timeout=600, capture_output=True,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )
        found = _cached_delta_jars()
    if not found:
        raise ClusterError("no Delta JARs in ~/.ivy2*/jars after resolving them with a local Spark")
    return found


def _cached_delta_jars() -> list[str]:
    jars: list[str] = []
    for cache in sorted(Path.home().glob(".ivy2*/jars")):
        jars = sorted(str(p) for p in cache.glob("io.delta_delta-*.jar"))
        if any("delta-spark_" in j for j in jars):
            return jars
    return []


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


class LocalCluster:
    """Spark standalone (master + workers) and a multi-node Ray, in a private network namespace.

    Attributes once started: ``spark_master`` (``spark://127.0.0.1:7077``), ``ray_address``
    (``127.0.0.1:6379``), ``token_path`` (the Ray token file), ``env`` (the environment every
    process of the cluster gets; pass extra variables with ``env=``).

    ``spark_worker_env`` is added to the Spark workers' environment only (their executors
    inherit it): by default they do *not* get the Ray token, as on a real Spark cluster next to
    a separate Ray cluster; a job passes it (``spark.executorEnv.RAY_AUTH_TOKEN_PATH``, see
    docs/deploy.md).

    ``ray_nodes=0`` starts Spark only (for jobs that start Ray inside Spark, Ray on Spark);
    ``ray_address`` then names nothing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        spark_workers: int = 2,
        ray_nodes: int = 2,
        worker_cores: int = 1,
        worker_memory: str = "1g",
        ray_cpus: float = 1,
        env: Mapping[str, str] | None = None,
        spark_worker_env: Mapping[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if spark_workers < 1 or ray_nodes < 0:
            raise ConfigError(
                f"spark_workers must be >= 1 and ray_nodes >= 0 (got {spark_workers}, {ray_nodes})"
            )
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="sru-cluster-"))
        self.spark_workers = spark_workers
        self.ray_nodes = ray_nodes
        self.worker_cores = worker_cores
        self.worker_memory = worker_memory
        self.ray_cpus = ray_cpus
        self.start_timeout_s = start_timeout_s
        self.spark_master = f"spark://127.0.0.1:{SPARK_MASTER_PORT}"
        self.ray_address = f"127.0.0.1:{RAY_GCS_PORT}"
        self.token_path = self.root / "ray" / "auth_token"
        self._extra_env = dict(env or {})
        self._spark_worker_env = dict(spark_worker_env or {})
        self._holder: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None
        self._userns = os.geteuid() != 0
        self._seen: set[int] = set()
        self._ray_root: Path | None = None
        self.env: dict[str, str] = {}

    # -- running things inside -------------------------------------------------------------

    def _enter_cmd(self) -> list[str]:
        if self._holder is None:
            raise ClusterError("the cluster is not started")
        pid = str(self._holder.pid)
        if self._userns:
            return ["nsenter", "-t", pid, "--user", "--net", "--preserve-credentials"]
        return ["nsenter", "-t", pid, "--net"]

    def popen(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``args`` inside the cluster's network namespace (with :attr:`env` + ``env``)."""
        return subprocess.Popen(
            [*self._enter_cmd(), *args], env={**self.env, **(env or {})}, **kwargs
        )

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside the namespace to completion; stdout and stderr are captured."""
        proc = subprocess.run(
            [*self._enter_cmd(), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-6000:]}"
            )
        return proc

    def spark_submit(
        self,
        script: str,
        *args: str,
        conf: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> subprocess.CompletedProcess[str]:
        """``spark-submit --master spark://... --jars <delta> script args`` inside the namespace.

        ``conf`` adds ``--conf k=v``; the Delta JARs are passed as files (no network inside).
        """
        return self.run(self.spark_submit_args(script, *args, conf=conf), env=env, timeout_s=timeout_s)

    def spark_submit_args(
        self, script: str, *args: str, conf: Mapping[str, str] | None = None
    ) -> list[str]:
        """The command line :meth:`spark_submit` runs (for :meth:`popen`)."""
        cmd = [
            str(spark_home() / "bin" / "spark-submit"),
            "--master", self.spark_master,
            "--jars", ",".join(delta_jars()),
            "--conf", "spark.driver.host=127.0.0.1",
            "--conf", "spark.driver.bindAddress=127.0.0.1",
            "--conf", "spark.ui.enabled=false",
            "--conf", "spark.executor.memory=512m",
            "--conf", "spark.driver.memory=1g",
        ]
        for key, value in (conf or {}).items():
            cmd += ["--conf", f"{key}={value}"]
        return [*cmd, script, *args]

    def python(
        self, code: str, *, env: Mapping[str, str] | None = None, timeout_s: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` (this interpreter) inside the namespace."""
        return self.run([sys.executable, "-c", code], env=env, timeout_s=timeout_s)

    # -- what runs ----------------------------------------------------------------------------

    def pids(self) -> set[int]:
        """Every live process in the cluster's namespace (all that the cluster started)."""
        if self._ns is None:
            return set()
        here = {p for p in _all_pids() if _netns(p) == self._ns and _alive(p)}
        self._seen |= here
        return here

    def started_pids(self) -> set[int]:
        """Every process ever seen in the namespace (to check afterwards that none is left)."""
        self.pids()
        return set(self._seen)

    def leftover_pids(self) -> set[int]:
        """Processes the cluster started that are still alive (empty after :meth:`stop`)."""
        return {p for p in self._seen if _alive(p) and _netns(p) == self._ns}

    def listening(self) -> list[tuple[str, int]]:
        """``(address, port)`` of every TCP socket listening in the namespace (``ss -ltnH``)."""
        out = self.run(["ss", "-ltnH"], timeout_s=30, check=True)
        return parse_ss(out.stdout)

    def ray_node_pids(self, index: int) -> set[int]:
        """The processes of Ray node ``index`` (0 is the head): those naming its temp dir, and
        their descendants (the raylet's workers)."""
        marker = str(self._ray_dir(index))
        pids = self.pids()
        mine = {p for p in pids if marker in _cmdline(p)}
        grew = True
        while grew:
            more = {p for p in pids if p not in mine and _ppid(p) in mine}
            mine |= more
            grew = bool(more)
        return mine

    def kill_ray_node(self, index: int) -> set[int]:
        """SIGKILL every process of Ray node ``index`` (a machine lost); returns their PIDs."""
        if index == 0:
            raise ConfigError("node 0 is the head: killing it ends the whole Ray cluster")
        victims = self.ray_node_pids(index)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    # -- start / stop -------------------------------------------------------------------------

    def _ray_dir(self, index: int) -> Path:
        # Ray's socket paths must stay under 107 bytes: a short folder of its own under /tmp
        if self._ray_root is None:
            self._ray_root = Path(tempfile.mkdtemp(prefix="sru-ray-", dir="/tmp"))
        return self._ray_root / f"n{index}"

    def node_tmp(self, index: int) -> Path:
        """``TMPDIR`` of Ray node ``index`` (each node has its own, as separate machines do)."""
        return self.root / "tmp" / f"node{index}"

    def start(self) -> LocalCluster:
        """Create the namespace, then start Spark's master and workers and Ray's nodes."""
        for tool in ("unshare", "nsenter", "ip", "java"):
            if shutil.which(tool) is None:
                raise ClusterError(f"LocalCluster needs {tool!r} on PATH (Linux: util-linux, iproute2, a JDK)")
        delta_jars()  # resolve outside the namespace, where the network is
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "home").mkdir(exist_ok=True)
        self.token_path.parent.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self._start_namespace()
        atexit.register(self.stop)  # an interrupted session (Ctrl-C) still ends the cluster
        try:
            self.env = self._base_env()
            self._start_spark()
            self._start_ray()
        except BaseException:
            self.stop()
            raise
        return self

    def _base_env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not _DROPPED_ENV.match(k)}
        env.update(
            {
                # a private HOME: no ~/.ray/auth_token or ~/.ivy2 of the machine leaks in
                "HOME": str(self.root / "home"),
                "TMPDIR": str(self.root / "tmp"),
                "PATH": os.pathsep.join([venv_bin, env.get("PATH", "/usr/bin:/bin")]),
                "PYTHONPATH": _pythonpath(),
                "PYSPARK_PYTHON": sys.executable,
                "PYSPARK_DRIVER_PYTHON": sys.executable,
                "SPARK_HOME": str(spark_home()),
                "SPARK_LOCAL_IP": "127.0.0.1",
                "SPARK_LOG_DIR": str(self.root / "spark-logs"),
                "SPARK_WORKER_DIR": str(self.root / "spark-work"),
                "RAY_AUTH_MODE": "token",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        (self.root / "tmp").mkdir(exist_ok=True)
        env.update(self._extra_env)
        return env

    def _start_namespace(self) -> None:
        flags = ["--user", "--map-root-user"] if self._userns else []
        self._holder = subprocess.Popen(
            ["unshare", *flags, "--net", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        outer = _netns(os.getpid())
        while time.monotonic() < deadline:
            ns = _netns(self._holder.pid)
            if ns is not None and ns != outer and "sleep" in _cmdline(self._holder.pid):
                self._ns = ns
                self._seen.add(self._holder.pid)
                return
            if self._holder.poll() is not None:
                break
            time.sleep(0.05)
        raise ClusterError(
            "could not create a network namespace (unshare --net); as non-root this needs "
            "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)"
        )

    def _daemon(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start a long-running process inside; ``env`` replaces :attr:`env` when given."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.out", "ab") as out:
            subprocess.Popen(
                [*self._enter_cmd(), *args], env=dict(self.env if env is None else env),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait_port(self, port: int, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if any(p == port for _, p in self.listening()):
                return
            time.sleep(0.5)
        raise ClusterError(f"{what} did not listen on 127.0.0.1:{port} within {self.start_timeout_s}s (logs: {self.root / 'logs'})")

    def _start_spark(self) -> None:
        spark_class = str(spark_home() / "bin" / "spark-class")
        self._daemon(
            "spark-master",
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(SPARK_MASTER_PORT), "--webui-port", "0"],
        )
        self._wait_port(SPARK_MASTER_PORT, "the Spark master")
        worker_env = {k: v for k, v in self.env.items() if not k.startswith("RAY_AUTH")}
        worker_env.update(self._spark_worker_env)
        for i in range(self.spark_workers):
            work = self.root / "spark-work" / f"worker{i}"
            work.mkdir(parents=True, exist_ok=True)
            self._daemon(
                f"spark-worker{i}",
                [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", str(self.worker_cores), "--memory", self.worker_memory,
                 "--work-dir", str(work), "--webui-port", "0", self.spark_master],
                env=worker_env,
            )
        self._wait_workers()

    def _wait_workers(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        logs = self.root / "logs"
        while time.monotonic() < deadline:
            up = sum(
                "Successfully registered with master" in (logs / f"spark-worker{i}.out").read_text(errors="replace")
                for i in range(self.spark_workers)
                if (logs / f"spark-worker{i}.out").exists()
            )
            if up == self.spark_workers:
                return
            time.sleep(0.5)
        raise ClusterError(f"the Spark workers did not register within {self.start_timeout_s}s (logs: {logs})")

    def _start_ray(self) -> None:
        if self.ray_nodes == 0:  # Spark only: a job may start Ray itself (ray_address="spark")
            return
        for i in range(self.ray_nodes):
            self.start_ray_node(i, wait=False)
        self._wait_ray_nodes()

    def start_ray_node(self, index: int, *, wait: bool = True) -> None:
        """Start Ray node ``index`` (0: the head), e.g. again after :meth:`kill_ray_node`.

        Each node has its own ``--temp-dir``, ``TMPDIR``, ports and a resource ``node<index>``.
        """
        ray_bin = str(Path(sys.executable).parent / "ray")
        env = {"RAY_AUTH_TOKEN_PATH": str(self.token_path), "TMPDIR": str(self.node_tmp(index))}
        self.node_tmp(index).mkdir(parents=True, exist_ok=True)
        temp = self._ray_dir(index)
        temp.mkdir(parents=True, exist_ok=True)
        i = index
        common = [
            f"--temp-dir={temp}", f"--num-cpus={self.ray_cpus}", "--num-gpus=0",
            f'--resources={{"node{i}": 1}}', "--node-ip-address=127.0.0.1",
            "--disable-usage-stats", f"--dashboard-agent-listen-port={52365 + i}",
            f"--object-manager-port={8076 + i}", f"--node-manager-port={8176 + i}",
            f"--min-worker-port={20000 + 2000 * i}", f"--max-worker-port={21999 + 2000 * i}",
        ]
        if i == 0:
            args = [ray_bin, "start", "--head", f"--port={RAY_GCS_PORT}", "--include-dashboard=false", *common]
        else:
            args = [ray_bin, "start", f"--address={self.ray_address}", *common]
        proc = self.run(args, env=env, timeout_s=self.start_timeout_s)
        if proc.returncode != 0:
            raise ClusterError(f"ray start (node {i}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        if wait:
            self._wait_ray_nodes()

    def _wait_ray_nodes(self) -> None:
        code = (
            "import ray, time, sys\n"
            f"ray.init(address={self.ray_address!r}, log_to_driver=False)\n"
            "deadline = time.monotonic() + 60\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {self.ray_nodes}:\n"
            "    if time.monotonic() > deadline: sys.exit('nodes: %s' % ray.nodes())\n"
            "    time.sleep(0.5)\n"
        )
        proc = self.python(code, env={"RAY_AUTH_TOKEN_PATH": str(self.token_path)}, timeout_s=self.start_timeout_s)
        if proc.returncode != 0:
            raise ClusterError(f"the Ray cluster did not get {self.ray_nodes} nodes:\n{proc.stderr[-4000:]}")

    def stop(self) -> None:
        """End every process in the namespace (SIGTERM, then SIGKILL), then the namespace.

        Raises :class:`ClusterError` if a process is still alive afterwards.
        """
        if self._holder is None:
            return
        holder = self._holder.pid
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, STOP_TIMEOUT_S)):
            victims = self.pids() - {holder}
            for pid in victims:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.pids() - {holder}:
                time.sleep(0.2)
            if not self.pids() - {holder}:
                break
        left = self.pids() - {holder}
        try:
            os.kill(holder, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._holder.wait(timeout=STOP_TIMEOUT_S)
        left |= self.leftover_pids()
        self._holder = None
        if self._ray_root is not None and not left:
            shutil.rmtree(self._ray_root, ignore_errors=True)
            self._ray_root = None
        if left:
            raise ClusterError(
                f"processes of the cluster still alive after stop(): "
                f"{ {p: _cmdline(p)[:120] for p in left} }"
            )

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
