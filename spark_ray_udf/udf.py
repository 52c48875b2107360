"""``register_ray_model``: a model stored in Delta becomes a SQL function served by Ray actors.

On the driver, :func:`register_ray_model` checks what it can (name, return type, options),
finds the model version's Parquet files in Delta (the actors read them; or, when they cannot,
the driver puts the rows in the Ray object store), starts the actor pool (once per driver and
function), and registers an Arrow-native iterator UDF (``arrow_udf``, Spark >= 4.1)
under ``name``. The UDF's closure holds only a :class:`~spark_ray_udf.client.PoolAddress`; its
Python workers connect to Ray once per process and stream Arrow batches to the actors.

Versions: ``version=N`` pins a Delta version, ``version=None`` takes the latest at registration.
:meth:`RayModel.reload` swaps the pool to another version without stopping running queries
(new actors load and pass a readiness check first; batches in flight finish on the old ones);
``refresh_seconds=`` polls the table and reloads when a newer version is committed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from spark_ray_udf._arrow import NullPolicy, check_return_type
from spark_ray_udf._contract import PoolAddress, flight_token
from spark_ray_udf.client import predict_batches
from spark_ray_udf.errors import (
    CallTimeoutError,
    ConfigError,
    ConfigTypeError,
    ModelTableError,
    PoolClosedError,
    RayUnavailableError,
)
from spark_ray_udf.store import DEFAULT_MAX_MODEL_BYTES

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType

    from spark_ray_udf._contract import WorkerInfo
    from spark_ray_udf.placement import Holder
    from spark_ray_udf.pool import ModelPool
    from spark_ray_udf.serve import HttpDoor
    from spark_ray_udf.store import StoredModel
    from spark_ray_udf.worker import WorkerSpec

ModelSource = Literal["auto", "storage", "object_store"]
ExecutorTransport = Literal["ray", "flight"]
TRANSPORTS = ("ray", "flight")

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTRY: dict[str, RayModel] = {}
_REGISTRY_LOCK = threading.Lock()
# One lock per function name, held through a whole registration: threads registering one name
# at once take turns, so the later ones find the first one's pool (reuse or replace it) and no
# pool is left behind unregistered.
_NAME_LOCKS: dict[str, threading.Lock] = {}


def _name_lock(name: str) -> threading.Lock:
    with _REGISTRY_LOCK:
        return _NAME_LOCKS.setdefault(name, threading.Lock())


def _holders() -> list[Holder]:
    """What each open registered function holds (actors x resources), for placement errors."""
    from spark_ray_udf.placement import Holder, actor_request
    from spark_ray_udf.pool import DEFAULT_ACTOR_OPTIONS

    with _REGISTRY_LOCK:
        models = [m for m in _REGISTRY.values() if not m.closed]
    return [
        Holder(
            m.name,
            len(m._pool.generation.actors),
            actor_request({**DEFAULT_ACTOR_OPTIONS, **m._settings.actor_options}),
        )
        for m in models
    ]


def _spark_type(return_type: str | DataType) -> DataType:
    from pyspark.sql.types import DataType

    if isinstance(return_type, DataType):
        return return_type
    if isinstance(return_type, str):
        try:
            return DataType.fromDDL(return_type)
        except Exception as exc:  # ParseException
            raise ConfigTypeError(
                f"return_type {return_type!r} is not a Spark type (DDL such as 'double', "
                "'array<double>' or 'label int, score double')"
            ) from exc
    raise ConfigTypeError(
        f"return_type must be a DDL string or a pyspark DataType (got {return_type!r} that "
        f"is a {type(return_type)!r})"
    )


def _types(return_type: str | DataType, with_version: bool) -> tuple[DataType, pa.DataType]:
    """The Spark type the SQL function returns and the Arrow type of one prediction."""
    from pyspark.sql.pandas.types import to_arrow_type
    from pyspark.sql.types import LongType, StructField, StructType

    prediction = _spark_type(return_type)
    arrow_type = to_arrow_type(prediction, timezone="UTC", prefers_large_types=False)
    check_return_type(arrow_type)
    if not with_version:
        return prediction, arrow_type
    wrapped = StructType(
        [StructField("prediction", prediction), StructField("model_version", LongType(), False)]
    )
    return wrapped, arrow_type


def _fingerprint(*parts: Any) -> str:
    from ray import cloudpickle

    h = hashlib.sha256()
    for part in parts:
        h.update(cloudpickle.dumps(part))
    return h.hexdigest()


def _make_udf(address: PoolAddress, spark_type: DataType) -> Any:
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    def predict(batches: Iterator[Any]) -> Iterator[pa.Array]:
        return predict_batches(address, batches)

    predict.__name__ = address.function
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "prefer type hints": arity is not fixed
        return arrow_udf(predict, spark_type, ArrowUDFType.SCALAR_ITER)


def _local_only(uri: str) -> bool:
    """True for a file on this machine's disk (which actors on other machines cannot read).

    >>> _local_only("file:/tmp/t/part-0.parquet"), _local_only("s3a://bucket/t/part-0.parquet")
    (True, False)
    """
    return uri.startswith("file:") or "://" not in uri


NODES_TIMEOUT_S = 30.0


def _ray_is_this_machine(timeout_s: float = NODES_TIMEOUT_S) -> bool:
    """True when every live Ray node is the one this driver is attached to.

    ``ray.nodes()`` has no timeout of its own (a GCS that accepts connections but does not
    answer would hold the registration forever): it runs in a daemon thread, waited for at most
    ``timeout_s``, then :class:`~spark_ray_udf.errors.RayUnavailableError`.
    """
    import concurrent.futures

    import ray

    here = ray.get_runtime_context().get_node_id()
    answer: concurrent.futures.Future[list[dict[str, Any]]] = concurrent.futures.Future()

    def ask() -> None:
        try:
            answer.set_result(ray.nodes())
        except BaseException as exc:  # handed to the waiting caller
            answer.set_exception(exc)

    threading.Thread(target=ask, name="spark-ray-udf-ray-nodes", daemon=True).start()
    try:
        nodes = answer.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RayUnavailableError(
            f"Ray's GCS did not list its nodes within {timeout_s:.0f}s (ray.nodes()); Ray is "
            "overloaded or stuck: look at its logs, or pass model_source='storage' or "
            "'object_store' to skip this check"
        ) from None
    return all(n["NodeID"] == here for n in nodes if n.get("Alive"))


def _stored_for_actors(
    spark: SparkSession, table: str, version: int, source: ModelSource, max_model_bytes: int
) -> tuple[StoredModel[Any], str]:
    """How the actors get ``table@version``: its Parquet files (``files`` set, nothing held by
    the driver) or chunks the driver reads and pins in the object store; and, for the object
    store under ``model_source="auto"``, why (logged at WARNING; else "")."""
    import ray

    from spark_ray_udf.store import locate, read_model

    reason = "model_source='object_store'"
    if source != "object_store":
        located, reason = locate(spark, table, version, max_model_bytes=max_model_bytes)
        if located is not None:
            if source == "storage" or not _local_only(located.files[0]) or _ray_is_this_machine():
                return located, ""
            reason = "its files are on this machine's disk and Ray has other nodes"
        if source == "storage":
            raise ModelTableError(
                f"{table}@v{version}: model_source='storage' asks the actors to read the table's "
                f"Parquet files, but {reason}; pass model_source='auto' or 'object_store'"
            )
        log.warning(
            "%s@v%d: model_source='auto' falls back to the object store (the driver reads the "
            "model and pins it in Ray's object store): %s", table, version, reason,
        )
    stored = read_model(
        spark, table, version=version, sink=lambda p, i, data: ray.put(data),
        max_model_bytes=max_model_bytes,
    )
    return stored, reason


@dataclass(frozen=True)
class _Settings:
    """What a registration asked for, apart from the model version."""

    table: str
    num_actors: int
    actor_options: Mapping[str, Any]
    init_timeout_s: float
    model_source: ModelSource
    spec: WorkerSpec  # its version and manifest are those of the first load
    extra: tuple[Any, ...]  # client-side options: in flight, timeouts, retries, address, refresh
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES  # the manifest check (store.parse_manifest)

    def key(self, version: int) -> str:
        """Equal for two registrations that would serve the same thing the same way."""
        s = self.spec
        return _fingerprint(
            self.table, version, s.init_func, s.apply_func, dict(s.conf), self.num_actors,
            dict(self.actor_options), str(s.return_type), s.on_null, s.with_version, self.extra,
            self.model_source, self.max_model_bytes,
        )


class RayModel:
    """A registered function: call it on columns, ``reload()`` it, ``close()`` it, or use it in
    ``with``. Built by :func:`register_ray_model`; not meant to be constructed directly."""

    def __init__(
        self,
        *,
        spark: SparkSession,
        name: str,
        pool: ModelPool,
        address: PoolAddress,
        spark_type: DataType,
        settings: _Settings,
        fingerprint: str,
    ) -> None:
        self.name = name
        self.address = address
        self.return_type = spark_type
        self._spark = spark
        self._pool = pool
        self._settings = settings
        self._fingerprint = fingerprint
        self._udf = _make_udf(address, spark_type)
        self._reload_lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self.last_reload_error: BaseException | None = None
        self._http: HttpDoor | None = None  # the HTTP door, while serve() runs it
        self._flight_directory: Any = None  # flight: the driver's endpoint answering the entry
        self._ray_lease: Any = None  # ray_on_spark.Lease, for ray_address="spark"
        self.model_source: Literal["storage", "object_store"] = "storage"
        """Where the actors read the served version from: ``"storage"`` (the table's Parquet
        files) or ``"object_store"`` (chunks the driver read and pinned in Ray's object store)."""
        self.model_source_reason = ""
        """Why the served version comes from the object store ("" when it does not), e.g. the
        table uses deletion vectors; ``model_source="auto"`` also logs it at WARNING."""

    def _set_source(self, stored: StoredModel[Any], reason: str) -> None:
        self.model_source = "storage" if stored.files else "object_store"
        self.model_source_reason = reason

    @property
    def table(self) -> str:
        return self._settings.table

    @property
    def version(self) -> int:
        """The Delta version the actors serve now."""
        return self._pool.generation.version

    @property
    def closed(self) -> bool:
        return self._pool.closed

    @property
    def namespace(self) -> str:
        return self.address.namespace

    @property
    def actors(self) -> list[WorkerInfo]:
        """What each actor reported when it became ready (pid, node, model folder, load time)."""
        return list(self._pool.infos)

    def actor_pids(self) -> list[int]:
        """PIDs of the live actors, asked of the actors."""
        self._check_open()
        return self._pool.actor_pids()

    def stats(self) -> dict[str, Any]:
        """What the pool served, asked of its actors (never queued behind predictions).

        Returns a dict: ``function``, ``table``, ``version``, ``generation``; ``rows``,
        ``batches`` and ``errors`` by door (``{"sql": n, "http": n}``); ``in_flight``
        batches; ``busy_s``; ``latency_s`` (``p50``/``p95``/``p99`` of the recent batches'
        ``apply_func`` time); ``crossed_nodes`` (batches from a Spark task on another node than
        the actor); ``restarts`` (by Ray), ``replaced`` (by the watcher),
        ``directory_republished``; and ``actors``, one dict per actor with the same counters and
        its ``pid``, ``node_ip``, ``node_id``, ``state``, ``version``, ``load_s``, ``uptime_s``.

        Example::

            model.stats()["rows"]     # {'sql': 1000, 'http': 12}
        """
        self._check_open()
        out = self._pool.stats()
        out["name"] = self.name
        out["model_source"], out["model_source_reason"] = self.model_source, self.model_source_reason
        return out

    def _check_open(self) -> None:
        if self._pool.closed:
            raise PoolClosedError(f"{self.name}: the model was closed; register it again")

    def __call__(self, *cols: Column | str) -> Column:
        """The function as a DataFrame column expression: ``df.select(model("image"))``."""
        self._check_open()
        return self._udf(*cols)

    def _register(self, spark: SparkSession) -> None:
        spark.udf.register(self.name, self._udf)

    def reload(self, version: int | None = None) -> int:
        """Serve another Delta version (the latest when None) without stopping running queries.

        The new actors load the version and pass a readiness check before any batch goes to
        them; batches in flight finish on the old actors, which then exit. If the new version
        fails to load, the old one keeps serving and the error is raised. Returns the version
        now served (unchanged when it is already the one asked for).
        """
        from spark_ray_udf.store import resolve_version

        self._check_open()
        with self._reload_lock:
            target = resolve_version(self._spark, self.table, version)
            if target == self.version:
                return target
            s = self._settings
            stored, reason = _stored_for_actors(
                self._spark, self.table, target, s.model_source, s.max_model_bytes
            )
            spec = replace(
                s.spec, version=stored.version, manifest=stored.manifest, files=stored.files
            )
            self._pool.swap(
                spec,
                stored,
                num_actors=s.num_actors,
                actor_options=s.actor_options,
                init_timeout_s=s.init_timeout_s,
            )
            self._fingerprint = s.key(stored.version)
            self._set_source(stored, reason)
            log.info("%s: now serving %s@v%d", self.name, self.table, stored.version)
            return stored.version

    def _start_polling(self, seconds: float) -> None:
        def poll() -> None:
            from spark_ray_udf.store import latest_version

            while not self._stop_polling.wait(seconds):
                try:
                    if latest_version(self._spark, self.table) > self.version:
                        self.reload()
                    self.last_reload_error = None
                except PoolClosedError:
                    return
                except Exception as exc:  # keep serving the old version; report, don't hide
                    self.last_reload_error = exc
                    log.exception("%s: reloading %s failed; still serving v%d", self.name, self.table, self.version)

        self._poller = threading.Thread(target=poll, name=f"spark-ray-udf-refresh-{self.name}", daemon=True)
        self._poller.start()

    def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        route_prefix: str | None = None,
        input_types: Sequence[str | DataType | pa.DataType] | Mapping[str, Any] | None = None,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        max_ongoing_requests: int | None = None,
        max_queued_requests: int = 256,
    ) -> str:
        """Answer HTTP too, from the same actors (a Ray Serve ingress; see :mod:`spark_ray_udf.serve`).

        ``POST <url>/predict`` takes ``{"instances": [...]}``, ``{"inputs": ...}`` or an Arrow
        IPC stream and answers ``{"predictions": [...], "model_version": N}`` (Arrow for Arrow);
        ``GET <url>`` describes the function. ``input_types`` (Spark DDL or Arrow types, one per
        argument, or ``{name: type}``) sets how JSON converts; else numbers are ``double``,
        lists ``array<double>``, strings ``string``. Up to ``max_batch_size`` concurrent
        requests (waiting ``batch_wait_timeout_s`` at most) become one actor call; beyond
        ``max_queued_requests`` waiting, requests get 503 with ``Retry-After``. Binds
        ``host`` (loopback by default: see docs/security.md before exposing it). ``reload()``
        moves HTTP with SQL; ``close()`` deletes the Serve application (and so does registering
        the name again with other options, which closes this model: call ``serve()`` on the
        new one). Calling ``serve()`` again updates the application in place. Serve has one
        HTTP proxy per Ray cluster: the first ``serve()`` decides its host and port. Needs
        ``spark-ray-udf[serve]``. Returns the URL.

        Example (``tests/test_serve.py`` runs it)::

            url = model.serve(port=8000)        # http://127.0.0.1:8000/model_predict
            # curl -d '{"instances": [[0.1, 0.2, ...]]}' http://127.0.0.1:8000/model_predict/predict
        """
        from spark_ray_udf.serve import HttpOptions, input_spec, start_http

        self._check_open()
        options = HttpOptions(
            host=host,
            port=port,
            route_prefix=route_prefix,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
        )
        spec = input_spec(input_types)
        with self._reload_lock:
            self._check_open()
            self._http = start_http(
                self.address,
                table=self.table,
                return_type=self.return_type.simpleString(),
                spec=spec,
                options=options,
            )
        return self._http.url

    def close(self) -> None:
        """Stop polling, the HTTP door (if any), the actors, and release the model from the
        object store. Idempotent.

        A :meth:`reload` loading now is cancelled (it raises :class:`PoolClosedError`): this
        returns within seconds, not after the load."""
        self._stop_polling.set()
        door, self._http = self._http, None
        try:
            if door is not None:
                from spark_ray_udf.serve import stop_http

                stop_http(door)  # first: no HTTP request reaches a stopping actor
        finally:
            self._pool.close()  # the pool's own lock orders it with a swap, which it cancels
            directory, self._flight_directory = self._flight_directory, None
            if directory is not None:  # after the actors: a stream still reads the entry
                directory.shutdown()
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]
        lease, self._ray_lease = self._ray_lease, None
        if lease is not None:  # the last function using Ray on Spark shuts it down
            lease.release()

    def _hold(self, lease: Any) -> None:
        """Keep one Ray on Spark lease (a reused pool already holds one: give the new back)."""
        if self._ray_lease is None and not self.closed:
            self._ray_lease = lease
        else:
            lease.release()

    def __enter__(self) -> RayModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._pool.generation.actors)} actors"
        return f"RayModel({self.name!r}, table={self.table!r}, version={self.version}, {state})"


def register_ray_model(
    spark: SparkSession,
    table: str,
    name: str,
    init_func: Callable[[str, Mapping[str, Any]], Any],
    apply_func: Callable[..., Any],
    *,
    return_type: str | DataType = "double",
    num_actors: int = 2,
    actor_options: Mapping[str, Any] | None = None,
    version: int | None = None,
    conf: Mapping[str, Any] | None = None,
    on_null: NullPolicy = "error",
    with_version: bool = False,
    refresh_seconds: float | None = None,
    max_in_flight: int = 2,
    call_timeout_s: float = 300.0,
    init_timeout_s: float = 600.0,
    max_retries: int = 3,
    ray_address: str | None = None,
    ray_on_spark: Mapping[str, Any] | None = None,
    model_source: ModelSource = "auto",
    min_split_rows: int | None = 1024,
    share_model_files: bool = True,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    check_environment: bool = True,
    executor_transport: ExecutorTransport = "ray",
) -> RayModel:
    """Register the model stored in the Delta table ``table`` as the SQL function ``name``.

    * ``init_func(model_dir, conf) -> model`` runs once in each of the ``num_actors`` Ray actors,
      on a local folder holding the model files exactly as saved by :func:`save_model`.
    * ``apply_func(model, *columns) -> predictions`` gets one numpy array per SQL argument for a
      whole Arrow batch (a fixed-length array column as a 2-D array) and returns one value per
      row (a dict of arrays or a DataFrame for a struct ``return_type``).
    * ``version`` pins a Delta version (time travel); None takes the latest. ``refresh_seconds``
      polls the table and reloads when a newer version is committed. ``with_version=True``
      returns ``struct<prediction, model_version>`` so each row says which version answered.
    * ``actor_options`` go to Ray (``num_cpus`` defaults to 0.25, ``num_gpus``, ``memory``,
      ``max_restarts`` = -1, ...). ``on_null``: ``"error"`` refuses null inputs, ``"skip"``
      returns null for rows with a null argument.
    * ``max_in_flight`` batches per Spark task are in flight at once; every Ray wait times out
      after ``call_timeout_s`` (``init_timeout_s`` for loading); a batch whose actor died is
      retried on another actor up to ``max_retries`` times. A batch is cut into pieces for the
      actors this task's worker has idle when each piece keeps at least ``min_split_rows`` rows
      (None: never), so one large partition keeps every actor busy.
    * ``share_model_files``: the actors on one machine serving the same table version share one
      copy of its files (written once, under a lock, checksummed; removed by the last of them),
      so loaders that memory-map (``np.load(mmap_mode="r")``, safetensors) share the page cache
      too. Pass False when ``init_func`` writes into ``model_dir``.
    * ``ray_address`` (or ``RAY_ADDRESS``) selects a Ray cluster; without either, a local Ray
      on 127.0.0.1 is started. ``ray_address="spark"`` starts Ray inside this Spark application
      (Ray on Spark, options in ``ray_on_spark``: ``setup_ray_cluster``'s keyword arguments) and
      shuts it down when the last function using it closes, or at exit
      (:mod:`spark_ray_udf.ray_on_spark`, docs/deploy.md).
    * ``model_source``: ``"storage"`` has each actor read the version's Parquet files itself
      (pyarrow; the driver reads only the manifest row and holds no model bytes, and a
      restarted actor reads them again); ``"object_store"`` has the driver read the rows and
      put them in Ray's object store, pinned while the pool lives (for actors that cannot reach
      the table's storage). ``"auto"`` (default) picks storage unless the table uses deletion
      vectors or column mapping, pyarrow cannot open it, or it is on local disk and Ray has
      other machines; ``model.model_source`` says which was taken and
      ``model.model_source_reason`` why not storage (the fallback is also logged at WARNING).
    * ``max_model_bytes`` (64 GiB by default): the driver checks the version's manifest before
      any actor starts, and refuses a model whose files add up to more (raise it for larger
      models); each actor then checks every chunk against that manifest as it arrives.
    * ``check_environment``: before a new pool starts, one Spark task checks that Spark's Python
      workers import spark-ray-udf, ray and pyarrow in the driver's versions and reach Ray
      (:class:`~spark_ray_udf.errors.EnvironmentMismatchError` names the interpreter and the
      fix); ``False`` skips it.
    * ``executor_transport``: how Spark's Python workers reach the actors. ``"ray"`` (default):
      each joins the Ray cluster as a driver (its machine must be a Ray node or reach the GCS
      and the raylets). ``"flight"``: each actor also serves Arrow Flight on its node's IP (a
      port the OS picks) and the registering driver answers where the actors are (on
      ``spark.driver.host``); the executors call them over gRPC, authenticated with a token
      derived from the pool's secret, and need only pyarrow, pandas, numpy and spark-ray-udf,
      not Ray (Spark on Kubernetes next to KubeRay: see docs/deploy.md). The environment check
      is skipped in this mode.

    Registering the same name again with the same table version, functions and options reuses
    the running pool; anything else replaces it.

    Example (``tests/test_docs_example.py`` runs these lines)::

        from spark_ray_udf import register_ray_model, save_model
        from spark_ray_udf.testing import apply_linear, init_linear

        save_model(spark, model_dir, "ai_model.linear")
        with register_ray_model(spark, "ai_model.linear", "model_predict",
                                init_linear, apply_linear, return_type="bigint") as model:
            spark.sql("select id, model_predict(features) from events").show()
            df.select(model("features"))
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"name must be a SQL identifier like 'model_predict' (got {name!r})")
    if not callable(init_func) or not callable(apply_func):
        raise ConfigTypeError(
            f"init_func and apply_func must be callables (got {type(init_func)!r} and "
            f"{type(apply_func)!r})"
        )
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ConfigError(f"num_actors must be a positive int (got {num_actors!r})")
    if model_source not in ("auto", "storage", "object_store"):
        raise ConfigError(
            f"model_source must be 'auto', 'storage' or 'object_store' (got {model_source!r})"
        )
    if isinstance(max_model_bytes, bool) or not isinstance(max_model_bytes, int) or max_model_bytes < 1:
        raise ConfigError(f"max_model_bytes must be a positive int (got {max_model_bytes!r})")
    if executor_transport not in TRANSPORTS:
        raise ConfigError(
            f"executor_transport must be 'ray' or 'flight' (got {executor_transport!r})"
        )
    if on_null not in ("error", "skip"):
        raise ConfigError(f"on_null must be 'error' or 'skip' (got {on_null!r})")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ConfigError(f"max_in_flight must be a positive int (got {max_in_flight!r})")
    if min_split_rows is not None and (
        isinstance(min_split_rows, bool) or not isinstance(min_split_rows, int) or min_split_rows < 1
    ):
        raise ConfigError(f"min_split_rows must be None or a positive int (got {min_split_rows!r})")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be a non-negative int (got {max_retries!r})")
    for opt, t in (("call_timeout_s", call_timeout_s), ("init_timeout_s", init_timeout_s)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"{opt} must be a positive number of seconds (got {t!r})")
    if refresh_seconds is not None and not (
        isinstance(refresh_seconds, (int, float)) and refresh_seconds > 0
    ):
        raise ConfigError(f"refresh_seconds must be None or positive (got {refresh_seconds!r})")
    if ray_on_spark is not None and ray_address != "spark":
        raise ConfigError(f"ray_on_spark needs ray_address='spark' (got ray_address={ray_address!r})")
    conf_dict = dict(conf or {})
    bad_keys = [k for k in conf_dict if not isinstance(k, str)]
    if bad_keys:
        raise ConfigTypeError(f"conf keys must be strings (got {bad_keys!r})")
    options = dict(actor_options or {})
    spark_type, arrow_type = _types(return_type, with_version)

    lease = None
    if ray_address == "spark":
        from spark_ray_udf import ray_on_spark as _ray_on_spark

        lease = _ray_on_spark.acquire(spark, ray_on_spark)
        ray_address = lease.address
    try:
        model = _register_named(
            spark, table, name, init_func, apply_func, spark_type=spark_type,
            arrow_type=arrow_type, num_actors=num_actors, options=options, version=version,
            conf_dict=conf_dict, on_null=on_null, with_version=with_version,
            refresh_seconds=refresh_seconds, max_in_flight=max_in_flight,
            call_timeout_s=call_timeout_s, init_timeout_s=init_timeout_s,
            max_retries=max_retries, ray_address=ray_address, model_source=model_source,
            max_model_bytes=max_model_bytes, min_split_rows=min_split_rows,
            share_model_files=share_model_files, check_environment=check_environment,
            executor_transport=executor_transport,
        )
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    if lease is not None:
        model._hold(lease)
    return model


def _register_named(
    spark: SparkSession, table: str, name: str, init_func: Callable[[str, Mapping[str, Any]], Any],
    apply_func: Callable[..., Any], *, init_timeout_s: float, **kwargs: Any,
) -> RayModel:
    """:func:`_register_locked` holding the name's lock."""
    lock = _name_lock(name)
    lock_wait_s = float(init_timeout_s) + 60.0
    if not lock.acquire(timeout=lock_wait_s):
        raise CallTimeoutError(
            f"{name}: another thread's registration of this name still runs after "
            f"{lock_wait_s:.0f}s; wait for it, or register another name"
        )
    try:
        return _register_locked(
            spark, table, name, init_func, apply_func, init_timeout_s=init_timeout_s, **kwargs
        )
    finally:
        lock.release()


def _register_locked(
    spark: SparkSession,
    table: str,
    name: str,
    init_func: Callable[[str, Mapping[str, Any]], Any],
    apply_func: Callable[..., Any],
    *,
    spark_type: DataType,
    arrow_type: pa.DataType,
    num_actors: int,
    options: dict[str, Any],
    version: int | None,
    conf_dict: dict[str, Any],
    on_null: NullPolicy,
    with_version: bool,
    refresh_seconds: float | None,
    max_in_flight: int,
    call_timeout_s: float,
    init_timeout_s: float,
    max_retries: int,
    ray_address: str | None,
    model_source: ModelSource,
    max_model_bytes: int,
    min_split_rows: int | None,
    share_model_files: bool,
    check_environment: bool,
    executor_transport: ExecutorTransport = "ray",
) -> RayModel:
    """:func:`register_ray_model` once its arguments are checked, holding the name's lock."""
    from spark_ray_udf import _ray
    from spark_ray_udf.pool import ModelPool, check_placement
    from spark_ray_udf.store import Manifest, resolve_version
    from spark_ray_udf.worker import WorkerSpec

    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(name)
    # A pinned version the running pool already serves needs no Delta round trip (~200 ms).
    pinned = (
        version is not None
        and existing is not None
        and not existing.closed
        and existing.table == table
        and existing.version == version
    )
    resolved = version if pinned and version is not None else resolve_version(spark, table, version)
    token = uuid.uuid4().hex[:12]
    namespace = f"spark-ray-udf.{name}.{token}"
    secret = secrets.token_hex(32)  # signs the directory entry; flight derives its token from it
    flight = executor_transport == "flight"
    spec = WorkerSpec(
        function=name,
        table=table,
        version=resolved,
        manifest=Manifest(files=(), dirs=(), chunk_size=0),  # filled in once read
        init_func=init_func,
        apply_func=apply_func,
        conf=conf_dict,
        return_type=arrow_type,
        on_null=on_null,
        work_root=namespace,  # each actor's node puts it under its own temp folder
        fetch_timeout_s=init_timeout_s,
        with_version=with_version,
        share_files=bool(share_model_files),
        flight_token=flight_token(secret) if flight else "",
    )
    settings = _Settings(
        table=table,
        num_actors=num_actors,
        actor_options=options,
        init_timeout_s=float(init_timeout_s),
        model_source=model_source,
        spec=spec,
        extra=(
            max_in_flight, float(call_timeout_s), max_retries, ray_address, refresh_seconds,
            min_split_rows, bool(share_model_files), executor_transport,
        ),
        max_model_bytes=max_model_bytes,
    )
    fingerprint = settings.key(resolved)
    # Also checks that the Ray this driver uses still answers (a TCP connect); after a Ray crash
    # it joins or starts a new one, and a pool of the lost Ray is never reused.
    gcs_address = _ray.ensure_ray(ray_address)
    if existing is not None and not existing.closed:
        if existing._fingerprint == fingerprint and existing.address.ray_address == gcs_address:
            existing._register(spark)
            log.info("%s: reusing the running pool for %s@v%d", name, table, resolved)
            return existing
        log.info("%s: replacing the pool of %s@v%d", name, existing.table, existing.version)

    # an impossible request fails here, in seconds, before the model's files are read
    check_placement(spec, num_actors=num_actors, options=options, holders=_holders)
    if check_environment and not flight:  # once per new pool, before any actor starts (~0.2 s warm)
        from spark_ray_udf._envcheck import check_environment as check_executors

        check_executors(spark, gcs_address, who=name)
    t0 = time.monotonic()
    stored, source_reason = _stored_for_actors(spark, table, resolved, model_source, max_model_bytes)
    log.info(
        "%s: found %s@v%d in %.2fs: %d files, %d bytes, %s",
        name, table, resolved, time.monotonic() - t0, len(stored.manifest.files),
        stored.manifest.total_bytes,
        f"{len(stored.files)} Parquet files the actors read" if stored.files
        else f"{len(stored.chunks)} chunks in the object store",
    )
    t0 = time.monotonic()
    spec = replace(spec, manifest=stored.manifest, files=stored.files)
    settings = replace(settings, spec=spec)
    pool = ModelPool.start(
        spec,
        stored,
        namespace=namespace,
        gcs_address=gcs_address,
        num_actors=num_actors,
        actor_options=options,
        init_timeout_s=init_timeout_s,
        holders=_holders,
        secret=secret,
    )
    directory_server = None
    if flight:
        try:
            directory_server = _directory_server(spark, name, pool)
        except BaseException:
            pool.close(graceful=False)
            raise
    address = PoolAddress(
        function=name,
        ray_address=gcs_address,
        namespace=namespace,
        token=token,
        auth_mode=_ray.auth_mode(),
        max_in_flight=max_in_flight,
        call_timeout_s=float(call_timeout_s),
        max_retries=max_retries,
        secret=pool.directory.secret,
        min_split_rows=min_split_rows,
        transport=executor_transport,
        directory_uri=directory_server.uri if directory_server is not None else "",
    )
    model = RayModel(
        spark=spark,
        name=name,
        pool=pool,
        address=address,
        spark_type=spark_type,
        settings=settings,
        fingerprint=fingerprint,
    )
    model._flight_directory = directory_server
    model._set_source(stored, source_reason)
    model._register(spark)
    if existing is not None and not existing.closed:
        existing.close()
    with _REGISTRY_LOCK:
        _REGISTRY[name] = model
    if refresh_seconds is not None:
        model._start_polling(float(refresh_seconds))
    log.info(
        "%s: serving %s@v%d with %d actors (started in %.2fs; load %s)", name, table,
        stored.version, num_actors, time.monotonic() - t0,
        ", ".join(f"actor {i.index} {i.load_seconds:.2f}s on {i.node_ip}" for i in pool.infos),
    )
    return model


def _directory_server(spark: SparkSession, name: str, pool: ModelPool) -> Any:
    """The driver's Flight endpoint answering the pool's signed entry, on ``spark.driver.host``
    (the address Spark's executors reach the driver at; 127.0.0.1 in local mode)."""
    from spark_ray_udf._flight import PoolFlightServer

    try:
        host = spark.conf.get("spark.driver.host", None) or "127.0.0.1"
    except Exception:  # Spark Connect may hide the key: the driver's loopback (local mode)
        host = "127.0.0.1"
    return PoolFlightServer(
        host, flight_token(pool.directory.secret), who=f"{name} driver",
        entry=lambda: pool.directory.published,
    )


_MODELS_SCHEMA = (
    "name string, table string, version bigint, generation bigint, actors int, "
    "model_source string, rows_sql bigint, rows_http bigint, batches_sql bigint, "
    "batches_http bigint, errors_sql bigint, errors_http bigint, in_flight int, "
    "busy_s double, latency_p50_s double, latency_p99_s double, restarts int, replaced int"
)


def models(spark: SparkSession) -> DataFrame:
    """Every function registered in this driver, with its counters, as a DataFrame.

    One row per open :class:`RayModel` (name, table, version, actors, rows / batches / errors
    by door, in flight, busy seconds, latency p50 / p99, restarts), from :meth:`RayModel.stats`.

    Example::

        spark_ray_udf.models(spark).createOrReplaceTempView("ray_models")
        spark.sql("select name, version, rows_sql from ray_models").show()
    """
    with _REGISTRY_LOCK:
        open_models = [m for m in _REGISTRY.values() if not m.closed]
    rows = []
    for m in sorted(open_models, key=lambda m: m.name):
        st = m.stats()
        rows.append((
            m.name, m.table, st["version"], st["generation"], len(st["actors"]),
            st["model_source"], st["rows"]["sql"], st["rows"]["http"], st["batches"]["sql"],
            st["batches"]["http"], st["errors"]["sql"], st["errors"]["http"], st["in_flight"],
            float(st["busy_s"]), st["latency_s"]["p50"], st["latency_s"]["p99"], st["restarts"],
            st["replaced"],
        ))
    return spark.createDataFrame(rows, _MODELS_SCHEMA)
