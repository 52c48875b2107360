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
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from spark_ray_udf._arrow import NullPolicy, check_return_type
from spark_ray_udf.client import PoolAddress, predict_batches
from spark_ray_udf.errors import ModelTableError, PoolClosedError

if TYPE_CHECKING:
    from pyspark.sql import Column, SparkSession
    from pyspark.sql.types import DataType

    from spark_ray_udf.pool import ModelPool, WorkerInfo, WorkerSpec
    from spark_ray_udf.store import StoredModel

ModelSource = Literal["auto", "storage", "object_store"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTRY: dict[str, RayModel] = {}
_REGISTRY_LOCK = threading.Lock()


def _spark_type(return_type: str | DataType) -> DataType:
    from pyspark.sql.types import DataType

    if isinstance(return_type, DataType):
        return return_type
    if isinstance(return_type, str):
        try:
            return DataType.fromDDL(return_type)
        except Exception as exc:  # ParseException
            raise TypeError(
                f"return_type {return_type!r} is not a Spark type (DDL such as 'double', "
                "'array<double>' or 'label int, score double')"
            ) from exc
    raise TypeError(
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


def _ray_is_this_machine() -> bool:
    """True when every live Ray node is the one this driver is attached to."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return all(n["NodeID"] == here for n in ray.nodes() if n.get("Alive"))


def _stored_for_actors(
    spark: SparkSession, table: str, version: int, source: ModelSource
) -> StoredModel[Any]:
    """How the actors get ``table@version``: its Parquet files (``files`` set, nothing held by
    the driver) or chunks the driver reads and pins in the object store."""
    import ray

    from spark_ray_udf.store import locate_model, read_model

    if source != "object_store":
        located = locate_model(spark, table, version)
        if located is not None and (
            source == "storage" or not _local_only(located.files[0]) or _ray_is_this_machine()
        ):
            return located
        if source == "storage":
            why = (
                "its files are on this machine's disk and Ray has other nodes"
                if located is not None
                else "the table uses deletion vectors, column mapping or catalog-managed commits, "
                "or pyarrow cannot open its storage"
            )
            raise ModelTableError(
                f"{table}@v{version}: model_source='storage' asks the actors to read the table's "
                f"Parquet files, but {why}; pass model_source='auto' or 'object_store'"
            )
    return read_model(spark, table, version=version, sink=lambda p, i, data: ray.put(data))


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

    def key(self, version: int) -> str:
        """Equal for two registrations that would serve the same thing the same way."""
        s = self.spec
        return _fingerprint(
            self.table, version, s.init_func, s.apply_func, dict(s.conf), self.num_actors,
            dict(self.actor_options), str(s.return_type), s.on_null, s.with_version, self.extra,
            self.model_source,
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
            stored = _stored_for_actors(self._spark, self.table, target, s.model_source)
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

    def close(self) -> None:
        """Stop polling, stop the actors and release the model from the object store. Idempotent."""
        self._stop_polling.set()
        with self._reload_lock:
            self._pool.close()
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.name) is self:
                del _REGISTRY[self.name]

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
    model_source: ModelSource = "auto",
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
      retried on another actor up to ``max_retries`` times.
    * ``ray_address`` (or ``RAY_ADDRESS``) selects a Ray cluster; without either, a local Ray
      on 127.0.0.1 is started.
    * ``model_source``: ``"storage"`` has each actor read the version's Parquet files itself
      (pyarrow; the driver reads only the manifest row and holds no model bytes, and a
      restarted actor reads them again); ``"object_store"`` has the driver read the rows and
      put them in Ray's object store, pinned while the pool lives (for actors that cannot reach
      the table's storage). ``"auto"`` (default) picks storage unless the table uses deletion
      vectors or column mapping, pyarrow cannot open it, or it is on local disk and Ray has
      other machines.

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
    from spark_ray_udf import _ray
    from spark_ray_udf.pool import ModelPool, WorkerSpec
    from spark_ray_udf.store import Manifest, resolve_version

    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name must be a SQL identifier like 'model_predict' (got {name!r})")
    if not callable(init_func) or not callable(apply_func):
        raise TypeError(
            f"init_func and apply_func must be callables (got {type(init_func)!r} and "
            f"{type(apply_func)!r})"
        )
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be a positive int (got {num_actors!r})")
    if model_source not in ("auto", "storage", "object_store"):
        raise ValueError(
            f"model_source must be 'auto', 'storage' or 'object_store' (got {model_source!r})"
        )
    if on_null not in ("error", "skip"):
        raise ValueError(f"on_null must be 'error' or 'skip' (got {on_null!r})")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive int (got {max_in_flight!r})")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative int (got {max_retries!r})")
    for opt, t in (("call_timeout_s", call_timeout_s), ("init_timeout_s", init_timeout_s)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{opt} must be a positive number of seconds (got {t!r})")
    if refresh_seconds is not None and not (
        isinstance(refresh_seconds, (int, float)) and refresh_seconds > 0
    ):
        raise ValueError(f"refresh_seconds must be None or positive (got {refresh_seconds!r})")
    conf_dict = dict(conf or {})
    bad_keys = [k for k in conf_dict if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"conf keys must be strings (got {bad_keys!r})")
    options = dict(actor_options or {})
    spark_type, arrow_type = _types(return_type, with_version)

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
    )
    settings = _Settings(
        table=table,
        num_actors=num_actors,
        actor_options=options,
        init_timeout_s=float(init_timeout_s),
        model_source=model_source,
        spec=spec,
        extra=(max_in_flight, float(call_timeout_s), max_retries, ray_address, refresh_seconds),
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

    stored = _stored_for_actors(spark, table, resolved, model_source)
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
    )
    address = PoolAddress(
        function=name,
        ray_address=gcs_address,
        namespace=namespace,
        token=token,
        auth_mode=_ray.auth_mode(),
        max_in_flight=max_in_flight,
        call_timeout_s=float(call_timeout_s),
        max_retries=max_retries,
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
    model._register(spark)
    if existing is not None and not existing.closed:
        existing.close()
    with _REGISTRY_LOCK:
        _REGISTRY[name] = model
    if refresh_seconds is not None:
        model._start_polling(float(refresh_seconds))
    log.info("%s: serving %s@v%d with %d actors", name, table, stored.version, num_actors)
    return model
