"""Connecting to Ray, on the driver and in Spark's Python workers.

* On the driver, :func:`ensure_ray` connects to ``ray_address`` / ``RAY_ADDRESS`` when given, and
  otherwise starts a local Ray bound to 127.0.0.1 with the dashboard off (the embedded default).
* In a Spark Python worker, :func:`connect_worker` connects once per process to the driver's GCS
  address that travelled in the UDF closure (a bare ``ray.init()`` there would silently start a
  private cluster per worker).

Before any ``ray.init`` to an address, a plain TCP connect with a short timeout checks that
something listens there, so an unreachable Ray fails fast with :class:`RayUnavailableError`
instead of hanging in Ray's own retries.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from spark_ray_udf.errors import ConfigError, RayAuthError, RayUnavailableError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_lock = threading.Lock()
T = TypeVar("T")


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS address, or None for addresses TCP cannot check (``auto``, ``ray://``).

    >>> split_address("127.0.0.1:6379")
    ('127.0.0.1', 6379)
    >>> split_address("auto") is None
    True
    """
    if "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout_s: float = CONNECT_TIMEOUT_S, who: str = "") -> None:
    """Raise :class:`RayUnavailableError` unless a TCP connection to ``address`` opens in time."""
    hp = split_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        prefix = f"{who}: " if who else ""
        raise RayUnavailableError(
            f"{prefix}Ray is unreachable at {address} ({exc}); start Ray there, fix "
            "ray_address/RAY_ADDRESS, or unset them to let spark-ray-udf start a local Ray"
        ) from exc


def _check_same_cluster(address: str | None, current: str) -> None:
    """Refuse an explicit ``address`` on another port than the Ray this process already uses.

    Only the port is compared (``localhost:6379`` and ``10.0.0.5:6379`` may well be the same
    cluster); ``auto`` and ``ray://`` addresses are not compared. An unreachable address is
    reported as such first.

    >>> _check_same_cluster("10.0.0.5:6379", "127.0.0.1:6379")
    >>> _check_same_cluster(None, "127.0.0.1:6379")
    """
    wanted, have = split_address(address or ""), split_address(current)
    if wanted is None or have is None or wanted[1] == have[1]:
        return
    check_reachable(address or "")
    raise RayUnavailableError(
        f"this process is already connected to the Ray at {current}, but ray_address={address!r} "
        "names another cluster; one driver serves one Ray: pass ray_address=None (or the "
        "current address), or call ray.shutdown() first"
    )


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> None:
    """Make a local Ray bind and advertise 127.0.0.1 only.

    On Linux, Ray replaces ``_node_ip_address="127.0.0.1"`` by the machine's address and its
    GCS and raylet listen on every interface; with Ray's single-machine mode (the switch it uses
    on macOS/Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) every Ray port binds 127.0.0.1.
    Ray reads the switch when imported: the variable is set for the processes Ray starts, and
    the constant patched when this process imported Ray already.
    """
    os.environ[_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def is_loopback(address: str) -> bool:
    """True for a GCS address on the loopback interface.

    >>> is_loopback("127.0.0.1:6379"), is_loopback("10.0.0.5:6379")
    (True, False)
    """
    hp = split_address(address)
    return hp is not None and (hp[0] in ("localhost", "::1") or hp[0].startswith("127."))


DASHBOARD_ENV = "SPARK_RAY_UDF_DASHBOARD"  # "1": the embedded Ray runs its dashboard on 127.0.0.1


def ensure_ray(address: str | None = None) -> str:
    """Connect the driver to Ray (starting a local one if needed) and return the GCS address.

    Safe to call first from any thread: ``ray.init`` runs on the main thread or on one thread
    that lives as long as the process (:func:`on_lasting_thread`), so the local Ray it starts
    lives as long as the driver process, not as long as the calling thread.

    Example::

        gcs = ensure_ray()          # local Ray on 127.0.0.1, dashboard off
        gcs = ensure_ray("10.0.0.5:6379")
    """
    import ray

    with _lock:
        if ray.is_initialized():
            current = str(ray.get_runtime_context().gcs_address)
            if gcs_alive(current):
                _check_same_cluster(address, current)
                return current
            _disconnect_lost(current, who="the driver")
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
            if split_address(address) is not None:
                check_auth(address, who="the driver", adopt_token=True)
            log.info("connecting to Ray at %s", address)
            on_lasting_thread(
                lambda: ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            )
        else:
            dashboard = os.environ.get(DASHBOARD_ENV, "") == "1"
            log.info(
                "starting a local Ray on 127.0.0.1 (dashboard %s)",
                "on 127.0.0.1" if dashboard else f"off; {DASHBOARD_ENV}=1 turns it on",
            )
            _loopback_only()
            on_lasting_thread(
                lambda: ray.init(
                    # "local": never join a cluster some `ray start` left on this machine
                    # (address None would, through /tmp/ray/ray_current_cluster)
                    address="local",
                    # off unless asked (docs/security.md): a dashboard on loopback lets every
                    # local user submit jobs to this Ray; SPARK_RAY_UDF_DASHBOARD=1 turns it on
                    include_dashboard=dashboard,
                    dashboard_host="127.0.0.1",
                    # logical CPUs are a placement budget, not cores: 16 at least holds 64 actors
                    # of the default 0.25 CPU (32 functions of 2 actors) on a laptop; they share
                    # the real cores under load (README, "Capacity")
                    num_cpus=max(16, os.cpu_count() or 1),
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            )
        stop_error_listener()
        return str(ray.get_runtime_context().gcs_address)


START_TIMEOUT_S = 300.0
_starter_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_starter: threading.Thread | None = None
_starter_lock = threading.Lock()


def _serve_starter_jobs() -> None:
    while True:
        _starter_jobs.get()()


def on_lasting_thread(func: Callable[[], T], *, timeout_s: float = START_TIMEOUT_S) -> T:
    """Run ``func`` on a thread that lives as long as this process, and return its result.

    ``ray.init`` without an address starts Ray's GCS, raylet and helpers as child processes
    with ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Ray's "fate sharing"). Linux sends that signal
    when the *thread* that forked the child exits, not the process: a first
    ``register_ray_model`` called from a web handler, a scheduler job or a notebook's background
    thread started a Ray that was SIGKILLed as soon as that thread ended, and a minute later Ray
    ended the whole driver ("Failed to connect to GCS within 60 seconds").

    The main thread lives as long as the process (the interpreter waits for non-daemon threads
    before it ends), so it calls ``func`` itself, and Ray installs its SIGTERM handler as usual.
    Any other thread hands ``func`` to one daemon thread started for this purpose, which never
    returns (a daemon thread is not joined at exit, so it outlives every ``atexit`` close; a
    ``ThreadPoolExecutor`` thread would end before them). Waits at most ``timeout_s`` for it:
    then :class:`RayUnavailableError` (the start may still complete in the background).

    >>> on_lasting_thread(lambda: threading.current_thread() is threading.main_thread())
    True
    >>> box = []
    >>> t = threading.Thread(target=lambda: box.append(on_lasting_thread(
    ...     lambda: threading.current_thread().name)))
    >>> t.start(); t.join()
    >>> box
    ['spark-ray-udf-ray-starter']
    """
    global _starter
    if threading.current_thread() is threading.main_thread():
        return func()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def job() -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(func())
        except BaseException as exc:  # handed to the caller, re-raised there
            done.set_exception(exc)

    with _starter_lock:
        if _starter is None:
            _starter = threading.Thread(
                target=_serve_starter_jobs, name="spark-ray-udf-ray-starter", daemon=True
            )
            _starter.start()
    _starter_jobs.put(job)
    try:
        return done.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError as exc:
        raise RayUnavailableError(
            f"starting or joining Ray did not finish within {timeout_s:.0f}s; look at Ray's logs "
            "(/tmp/ray/session_latest/logs) or start Ray yourself and pass ray_address"
        ) from exc


def gcs_alive(address: str) -> bool:
    """True if the GCS at ``address`` accepts a TCP connection within 2 s (a refused one
    answers at once). Ray's own GCS calls wait up to 60 s for a GCS that is gone, then end
    the process: ask this first where that wait would hurt (``close()``, the watcher)."""
    try:
        check_reachable(address, timeout_s=2.0)
    except RayUnavailableError:
        return False
    return True


def _disconnect_lost(address: str, *, who: str) -> None:
    """Leave a Ray whose GCS is gone (stopped or crashed), so this process can join another;
    without this, Ray itself would end the process once the GCS stays away for 60 s."""
    import ray

    log.warning("%s: the Ray at %s is gone; disconnecting from it", who, address)
    ray.shutdown()


AUTH_MODE_ENV = "RAY_AUTH_MODE"
_TOKEN_HELP = (
    "pass the Ray cluster's token to the Spark executors: --conf "
    "spark.executorEnv.RAY_AUTH_TOKEN_PATH=<a file holding the token on every executor machine>, "
    "or --conf spark.executorEnv.RAY_AUTH_TOKEN=<the token> (Spark redacts it in its UI), or put "
    "it in ~/.ray/auth_token of the user the executors run as (`ray get-auth-token` on a node "
    "prints it); see docs/deploy.md"
)


def auth_mode() -> str:
    """The driver's Ray auth mode (``RAY_AUTH_MODE``, which ``ray.init`` sets when it starts a
    local Ray with token auth), for the workers; ``""`` when unset."""
    return os.environ.get(AUTH_MODE_ENV, "")


def token_source(env: Mapping[str, str], home: str | os.PathLike[str]) -> str | None:
    """Where Ray would find this process's auth token, in Ray's own order, or None.

    Ray looks at ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then
    ``~/.ray/auth_token``.

    >>> token_source({"RAY_AUTH_TOKEN": "abc"}, "/nonexistent")
    'RAY_AUTH_TOKEN'
    >>> token_source({"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, "/nonexistent") is None
    True
    """
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [Path(home) / ".ray" / "auth_token"]
    for file in candidates:
        try:
            if file.read_text().strip():
                return str(file)
        except OSError:
            continue
    return None


def set_auth_mode(mode: str) -> None:
    """Make this process use Ray auth ``mode`` (``"token"`` or ``"disabled"``) from now on.

    Ray reads ``RAY_AUTH_MODE`` into a cached config when ``ray`` is first imported: setting
    the variable alone does nothing in a process that imported Ray already (a reused Spark
    Python worker). Like Ray's own token set-up, the config is then read again.

    >>> set_auth_mode("on")
    Traceback (most recent call last):
    spark_ray_udf.errors.ConfigError: Ray auth mode must be 'token' or 'disabled' (got 'on')
    """
    if mode not in ("token", "disabled"):
        raise ConfigError(f"Ray auth mode must be 'token' or 'disabled' (got {mode!r})")
    os.environ[AUTH_MODE_ENV] = mode
    if "ray._raylet" in sys.modules:
        _reload_ray_auth_config()


def _reload_ray_auth_config() -> None:
    """Private Ray API (what ``ray._private.authentication.authentication_token_setup.
    _enable_token_auth`` calls after setting the variable): re-read ``RAY_*`` config from the
    environment and forget the cached token. ``tests/test_ray_private.py`` checks it."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ray_auth_mode() -> str:
    """The auth mode Ray uses in this process now (``"token"``, ``"disabled"``, ...), as Ray
    itself reports it (a private Ray API, checked by ``tests/test_ray_private.py``)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = get_authentication_mode()
    names = {AuthenticationMode.TOKEN: "token", AuthenticationMode.DISABLED: "disabled"}
    return names.get(mode, f"mode {mode}")


def _gcs_accepts(address: str) -> None:
    """Open Ray's GCS client to ``address`` (a private Ray API, checked by
    ``tests/test_ray_private.py``); raises ``ray.exceptions.AuthenticationError`` in
    milliseconds when the GCS refuses this process's token."""
    from ray._raylet import GcsClient

    GcsClient(address=address)


def check_auth(address: str, *, who: str, adopt_token: bool = False) -> None:
    """Raise :class:`RayAuthError` within a second when the GCS at ``address`` refuses this
    process's token (or lack of one), instead of Ray's ~20 s of retries and a bare
    ``ConnectionError``.

    With ``adopt_token`` (the driver), a process whose ``RAY_AUTH_MODE`` is unset but that has
    a token (see :func:`token_source`) switches to token mode when the cluster asks for one, as
    Ray itself does for ``address="auto"``; the executors then get mode ``token`` from it.
    """
    from ray.exceptions import AuthenticationError

    mode = os.environ.get(AUTH_MODE_ENV, "") or "unset"
    source = token_source(os.environ, Path.home())
    if mode == "token" and source is None:  # Ray's GCS client would abort the process
        raise RayAuthError(f"{who}: {auth_problem(address, mode, source)}{_TOKEN_HELP}")
    try:
        _gcs_accepts(address)
        return
    except AuthenticationError as exc:
        error: AuthenticationError = exc
    if adopt_token and mode == "unset" and source is not None:
        set_auth_mode("token")
        log.info("the Ray at %s asks for a token: using the one from %s", address, source)
        try:
            _gcs_accepts(address)
            return
        except AuthenticationError as exc:
            error, mode = exc, "token"
    raise RayAuthError(f"{who}: {auth_problem(address, mode, source)}{_TOKEN_HELP}") from error


def auth_problem(address: str, mode: str, source: str | None) -> str:
    """Why the Ray at ``address`` refused a process in auth ``mode`` with the token from
    ``source`` (None: no token), for :class:`RayAuthError`.

    >>> auth_problem("h:6379", "token", None)
    'Ray token auth is on but this process has no token for the Ray at h:6379 (missing token): '
    """
    if mode != "token":
        return (
            f"the Ray at {address} requires a token, but this process's RAY_AUTH_MODE is "
            f"{mode!r}: set RAY_AUTH_MODE=token (Ray turns it on by itself only for a cluster it "
            "starts or finds with address='auto') and "
        )
    if source is None:
        return f"Ray token auth is on but this process has no token for the Ray at {address} (missing token): "
    return f"the Ray at {address} refused the token from {source} (wrong token): "


def without_jars(path: list[str]) -> list[str]:
    """``sys.path`` without the JAR files Spark puts on a Python worker's path.

    Spark adds every ``spark.jars.packages`` / ``--jars`` JAR to its Python workers' path (a
    JAR may carry Python code). ``import ray`` imports ``tqdm`` when it is installed, whose
    ``importlib.metadata.version`` call opens every zip on the path: with Delta's 33 JARs that
    took 4 s in every fresh Python worker (S3, S4 in docs/benchmarks.md). Ray has no module in
    a JAR.

    >>> without_jars(["/a/pyspark.zip", "/ivy/jars/io.delta_delta-spark_2.13-4.0.0.jar", "/site"])
    ['/a/pyspark.zip', '/site']
    """
    return [p for p in path if not p.lower().endswith(".jar")]


def import_ray() -> Any:
    """``import ray`` with the JARs out of ``sys.path`` meanwhile (see :func:`without_jars`);
    the path is put back afterwards, with whatever the import added."""
    if "ray" in sys.modules:
        return sys.modules["ray"]
    saved = list(sys.path)
    sys.path[:] = without_jars(saved)
    try:
        import ray
    finally:
        added = [p for p in sys.path if p not in saved]
        sys.path[:] = saved + added
    return ray


def connect_worker(address: str, *, who: str, auth: str = "") -> None:
    """Connect this Spark Python worker process to the Ray at ``address`` (once per process).

    ``auth`` is the driver's ``RAY_AUTH_MODE``: a Spark worker forked before the driver started
    Ray lacks it, and would then connect without the token (Ray 2.60 turns token auth on by
    default). It is applied with :func:`set_auth_mode`, so a worker that imported Ray before
    (a reused Python worker) gets it too. The token itself never travels in the closure: Ray
    reads it from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` on the
    executor (docs/deploy.md says how to pass it). A missing or wrong token raises
    :class:`RayAuthError` at once, naming the fix.
    """
    if is_loopback(address):
        _loopback_only()  # else Ray looks for this node's raylet on the machine's address
    ray = import_ray()

    with _lock:
        if ray.is_initialized():
            current = str(ray.get_runtime_context().gcs_address)
            if current != address and not gcs_alive(current):
                _disconnect_lost(current, who=who)  # Ray restarted: join the new one below
            elif current != address:
                raise RayUnavailableError(
                    f"{who}: this process is already connected to the Ray at {current}, but the "
                    f"function's pool lives at {address}; one process can serve one Ray cluster"
                )
            else:
                return
        if auth in ("token", "disabled") and os.environ.get(AUTH_MODE_ENV) != auth:
            set_auth_mode(auth)
        check_reachable(address, who=who)
        if split_address(address) is not None:
            check_auth(address, who=who)
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
        stop_error_listener()


def stop_error_listener() -> None:
    """Stop Ray's error-message listener thread in this process (after our ``ray.init``).

    Ray 2.60 starts it in every process that calls ``ray.init``; it only copies Ray's cluster
    error messages to this process's log. Once the GCS is gone (Ray stopped or crashed) it
    blocks holding the GIL, which freezes every other thread of the process, so no timeout can
    fire (``ray.get(timeout=5)`` hung for 60 s in tests/test_faults.py) until Ray terminates the
    process. Without it, waits time out and the library reports the lost Ray by name. Private
    Ray attributes, used defensively: if they change, this does nothing.
    """
    import ray

    worker = getattr(getattr(ray, "_private", None), "worker", None)
    global_worker = getattr(worker, "global_worker", None)
    stopped = getattr(global_worker, "threads_stopped", None)
    thread = getattr(global_worker, "listener_thread", None)
    if isinstance(stopped, threading.Event) and isinstance(thread, threading.Thread):
        stopped.set()  # the thread returns after its current poll; ray.shutdown() clears it


KV_TIMEOUT_S = 10.0


def _gcs_client() -> Any:
    """Ray's GCS client of this process (after ``ray.init``)."""
    from ray.experimental import internal_kv

    return internal_kv.internal_kv_get_gcs_client()


def kv_put(key: bytes, value: bytes, *, namespace: str, timeout_s: float = KV_TIMEOUT_S) -> None:
    """Store ``value`` under ``key`` in Ray's GCS key-value store (raw bytes, never pickled).

    Ray's KV store is reachable only through ``ray.experimental.internal_kv``; it is what Ray
    itself uses for cluster metadata, and what Serve uses for its checkpoints.
    """
    _gcs_client().internal_kv_put(key, value, True, namespace.encode(), timeout=timeout_s)


def kv_get(key: bytes, *, namespace: str, timeout_s: float = KV_TIMEOUT_S) -> bytes | None:
    """The raw bytes under ``key`` (None when absent); see :func:`kv_put`."""
    value = _gcs_client().internal_kv_get(key, namespace.encode(), timeout=timeout_s)
    return None if value is None else bytes(value)


def kv_del(key: bytes, *, namespace: str, timeout_s: float = KV_TIMEOUT_S) -> None:
    """Remove ``key``; see :func:`kv_put`."""
    _gcs_client().internal_kv_del(key, False, namespace.encode(), timeout=timeout_s)


def actor_id_of(handle: Any) -> str:
    """The hex id of an actor handle (Ray has no public accessor on the handle)."""
    return str(handle._actor_id.hex())


def actor_info(handle: Any) -> dict[str, Any]:
    """Ray's GCS record of an actor (``State``, ``NumRestarts``, ...; empty when unknown),
    without calling the actor and without the dashboard (the state API needs it)."""
    from ray._private import state

    info = state.actors(actor_id_of(handle))
    return dict(info) if info else {}


def actor_restarts(handle: Any) -> int:
    """How many times Ray restarted the actor."""
    return int(actor_info(handle).get("NumRestarts", 0) or 0)


def metrics_url() -> str:
    """The Prometheus endpoint of this node's Ray metrics agent (where the pool's counters
    appear as ``ray_spark_ray_udf_*``)."""
    import ray

    node = ray._private.worker.global_worker.node
    return f"http://127.0.0.1:{int(node.metrics_export_port)}/metrics"
# --- Ray's own view of placement (private GCS accessors, one function each) ----------------------
#
# Why not the public state API (``ray.util.state.list_actors``, ``ray status``'s data): it asks
# the dashboard's HTTP server, and the embedded Ray runs without a dashboard (it fails there
# with ServerUnavailable after a connect timeout), as do many clusters. The dashboard itself
# reads the same GCS tables these functions read; they need only the driver's connection.
# Each is tested in tests/test_placement.py::test_private_ray_accessors, which fails when Ray
# changes them.


class ActorPlacement(NamedTuple):
    """Where Ray is with one actor: its GCS state, the resources it asks, and whether a node
    has taken it (a worker process started: its resources are held from then on)."""

    state: str  # DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING, DEAD, UNKNOWN
    required: dict[str, float]
    placed: bool
    placement_group_id: str  # hex, "" for none


def actor_placement(actor: Any) -> ActorPlacement:
    """Ray's placement of ``actor``, from the GCS actor table (``ActorTableData``), without
    calling the actor. While ``__init__`` runs the state is PENDING_CREATION too; ``placed``
    tells a loading actor (it has a pid) from one no node has taken yet."""
    from ray._private import state
    from ray.core.generated import gcs_pb2

    raw = state.state._connect_and_get_accessor().get_actor_info(actor._actor_id)
    if raw is None:
        return ActorPlacement("UNKNOWN", {}, False, "")
    data = gcs_pb2.ActorTableData.FromString(raw)
    pg = data.placement_group_id
    return ActorPlacement(
        state=gcs_pb2.ActorTableData.ActorState.Name(data.state),
        required={str(k): float(v) for k, v in data.required_resources.items()},
        placed=bool(data.pid) or bool(data.address.worker_id.strip(b"\0")),
        placement_group_id=pg.hex() if pg.strip(b"\0") else "",
    )


class ClusterResources(NamedTuple):
    """The GCS's resource view: each alive node's total and free resources, and the demand of
    leases no node has granted yet (shape, count), as the autoscaler sees them."""

    nodes: tuple[tuple[str, dict[str, float], dict[str, float]], ...]  # (node id hex, total, free)
    demand: tuple[tuple[dict[str, float], int], ...]
    autoscaler_seen: bool  # an autoscaler (v2) has reported its state to the GCS


def cluster_resources() -> ClusterResources:
    """The GCS's cluster resource state (``GetClusterResourceState``, what ``ray status`` and
    the autoscaler read), through the driver's GCS client."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    from ray.core.generated import autoscaler_pb2

    gcs_client = ray._private.worker.global_worker.gcs_client
    state = get_cluster_resource_state(gcs_client)
    alive = (autoscaler_pb2.NodeStatus.RUNNING, autoscaler_pb2.NodeStatus.IDLE)
    nodes = tuple(
        (
            n.node_id.hex(),
            {str(k): float(v) for k, v in n.total_resources.items()},
            {str(k): float(v) for k, v in n.available_resources.items()},
        )
        for n in state.node_states
        if n.status in alive
    )
    demand = tuple(
        ({str(k): float(v) for k, v in r.request.resources_bundle.items()}, int(r.count))
        for r in state.pending_resource_requests
    )
    return ClusterResources(nodes, demand, state.last_seen_autoscaler_state_version > 0)


def autoscaler_running() -> bool:
    """True when an autoscaler that can add nodes runs for this cluster.

    Every Ray head starts a monitor; without an autoscaling config (``ray.init``, a plain
    ``ray start``) it runs Ray's read-only provider, which only reports: its status (the GCS
    internal KV key ``ray_constants.DEBUG_AUTOSCALING_STATUS``) names each node type after a
    node id. An autoscaler with node types (``ray up``, KubeRay, Ray on Spark with autoscaling)
    names them otherwise, and a v2 autoscaler also stores its cluster config and reports its
    state to the GCS. Limit: an autoscaler that cannot launch the node type asked for still
    counts (the pool then waits up to ``init_timeout_s``, logging what it waits for).
    """
    import json

    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if raw and can_add_nodes(json.loads(raw)):
        return True
    config = state.get_cluster_config()
    if config is not None and len(config.node_group_configs) > 0:
        return True
    return cluster_resources().autoscaler_seen


def can_add_nodes(status: dict[str, Any]) -> bool:
    """Whether an autoscaler status (the monitor's JSON in the GCS KV) comes from a monitor with
    node types, not the read-only one every head node runs.

    >>> can_add_nodes({"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12"}}})
    False
    >>> can_add_nodes({"autoscaler_report": {"node_type_mapping": {"ab12": "head"}}})
    True
    """
    report = status.get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    if report.get("pending_launches"):
        return True
    return any(kind != f"node_{node}" for node, kind in mapping.items())


# --- Ray on Spark (ray.util.spark), behind one function ------------------------------------------
#
# ``setup_ray_cluster`` gives the Ray nodes it starts on the executors only the environment of
# the executor plus what its *start hook* returns from ``custom_environment_variables()``; the
# hook is a class named by ``RAY_ON_SPARK_START_HOOK`` (or Databricks' default one). That is the
# only way to hand the nodes ``RAY_AUTH_MODE`` once the SparkContext runs (``spark.executorEnv``
# is fixed when it starts). tests/test_ray_on_spark.py::test_ray_on_spark_private_api checks
# the hook variable, the base classes and the ``ray`` look-up on the executors.

RAY_ON_SPARK_HOOK_ENV = "RAY_ON_SPARK_START_HOOK"


def _ray_on_spark_hook_base() -> type:
    """The start hook ``setup_ray_cluster`` would use without ours (user's, Databricks', base)."""
    from ray._common.utils import load_class
    from ray.util.spark.databricks_hook import DefaultDatabricksRayOnSparkStartHook
    from ray.util.spark.start_hook_base import RayOnSparkStartHook
    from ray.util.spark.utils import is_in_databricks_runtime

    user = os.environ.get(RAY_ON_SPARK_HOOK_ENV, "")
    if user and user != f"{__name__}._RayOnSparkHook":
        return load_class(user)  # type: ignore[no-any-return]
    if is_in_databricks_runtime():
        return DefaultDatabricksRayOnSparkStartHook
    return RayOnSparkStartHook


def start_ray_on_spark(
    options: Mapping[str, Any], *, node_env: Mapping[str, str]
) -> tuple[str, Callable[[], None]]:
    """Start Ray inside the active Spark application with ``setup_ray_cluster(**options)``,
    every Ray node getting ``node_env`` on top of its executor's (or the driver's) environment;
    returns the GCS address and the function that shuts that cluster down.

    The head node runs on the driver; each worker node is a long Spark task on an executor
    (``python -m ray.util.spark.start_ray_node``, which runs ``shutil.which("ray")`` there).
    ``setup_ray_cluster`` connects this process to Ray while it waits for the nodes and
    disconnects afterwards; call :func:`ensure_ray` with the address to connect. The stop
    function (``shutdown_ray_cluster``) disconnects this process, cancels the Spark job that
    holds the worker nodes and ends the head.
    """
    from ray.util.spark import setup_ray_cluster, shutdown_ray_cluster

    base = _ray_on_spark_hook_base()
    extra = dict(node_env)

    def init(self: Any, is_global: bool = False) -> None:  # Ray builds a named hook with no args
        base.__init__(self, is_global)

    def custom_environment_variables(self: Any) -> dict[str, str]:
        return {**base.custom_environment_variables(self), **extra}

    globals()["_RayOnSparkHook"] = type(
        "_RayOnSparkHook", (base,),
        {"__init__": init, "custom_environment_variables": custom_environment_variables},
    )
    previous = os.environ.get(RAY_ON_SPARK_HOOK_ENV)
    # read at set-up and again whenever the autoscaler asks the driver for a worker node
    os.environ[RAY_ON_SPARK_HOOK_ENV] = f"{__name__}._RayOnSparkHook"

    def restore() -> None:
        if previous is None:
            os.environ.pop(RAY_ON_SPARK_HOOK_ENV, None)
        else:
            os.environ[RAY_ON_SPARK_HOOK_ENV] = previous

    def stop() -> None:
        from ray.util.spark import cluster_init

        cluster = cluster_init._active_ray_cluster
        try:
            try:
                _stop_worker_nodes_first()
            except Exception as exc:  # e.g. the SparkContext stopped already (at exit)
                log.warning("Ray on Spark: could not stop the worker nodes first: %s", exc)
            try:
                shutdown_ray_cluster()
            except Exception as exc:
                # Spark is gone: its executors took the worker nodes with them; end the head
                # here rather than when this process exits (start_ray_node watches our pid)
                log.warning("Ray on Spark: shutdown_ray_cluster failed (%s); ending the head", exc)
                if cluster is not None:
                    cluster.head_proc.terminate()
                cluster_init._active_ray_cluster = None
        finally:
            restore()

    try:
        address, _remote = on_lasting_thread(lambda: setup_ray_cluster(**options))
    except BaseException:
        restore()
        raise
    return str(address), stop


RAY_ON_SPARK_NODES_STOP_S = 30.0


def _stop_worker_nodes_first(timeout_s: float = RAY_ON_SPARK_NODES_STOP_S) -> None:
    """End Ray on Spark's worker nodes while its head (the GCS) still runs, then return.

    ``shutdown_ray_cluster`` cancels the Spark job that holds the worker nodes and ends the head
    one second later. Each worker node's dashboard and runtime-env agents, on seeing their
    raylet gone, report to the GCS before they exit: with the GCS already gone they kept
    retrying, and outlived the cluster by minutes (tests/test_ray_on_spark.py saw 4 agents
    left 60 s after close()). So: cancel the job first (private: the active cluster's
    ``spark_job_server.shutdown()``, which ``shutdown_ray_cluster`` calls again harmlessly),
    wait until the GCS sees no alive node but the head (at most ``timeout_s``), and only then
    let ``shutdown_ray_cluster`` end the head.
    """
    import time

    import ray
    from ray.util.spark import cluster_init

    cluster = cluster_init._active_ray_cluster
    if cluster is None:
        return
    cluster.spark_job_server.shutdown()
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    alive = -1
    while time.monotonic() < deadline:
        try:
            alive = sum(bool(n["Alive"]) for n in ray.nodes())
        except Exception:  # the GCS is gone: nothing left to wait for
            return
        if alive <= 1:  # the head only
            return
        time.sleep(0.5)
    log.warning("Ray on Spark: %d worker nodes still alive %.0fs after their Spark job was "
                "cancelled; ending the head anyway", alive - 1, timeout_s)
