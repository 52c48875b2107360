"""The HTTP door: a Ray Serve ingress that forwards to the pool's own actors.

:meth:`RayModel.serve <spark_ray_udf.udf.RayModel.serve>` starts one Serve application per
function (named ``spark-ray-udf-<function>``, routed at ``/<function>`` by default). Its replica
holds **no model**: it reads the pool's signed directory entry exactly as Spark's Python workers
do (:func:`spark_ray_udf._contract.decode_entry`, then :func:`spark_ray_udf.client.lookup_actor`
checks each actor's id), picks actors with the same :class:`~spark_ray_udf.router.Router`, and
awaits ``ModelWorker.predict(columns, 0, None, "http")``. So HTTP and SQL share the actors, the
loaded model and the version; one ``reload()`` moves both (the replica reads the entry again for
every batch, one GCS key-value read), and ``close()`` deletes the application.

Requests (TensorFlow Serving's REST shapes, plus Arrow for bulk clients):

* ``POST /<function>/predict`` with ``{"instances": [...]}``: one row per instance: the value
  itself for a one-argument function, a list of the argument values, or an object
  ``{argument: value}`` when the arguments are named (``input_types={"x": "double", ...}``);
* ``{"inputs": {argument: [...]}}`` (columns by name) or ``{"inputs": [...]}`` (one argument);
* a body of ``Content-Type: application/vnd.apache.arrow.stream``: an Arrow IPC stream whose
  columns are the arguments in order.

JSON answers ``{"predictions": [...], "model_version": N}``; Arrow answers an Arrow IPC stream
with one column ``prediction`` (the version in the ``X-Model-Version`` header and the schema
metadata). ``GET /<function>`` describes the function (table, version, argument and return
types).

Argument types: the SQL function takes whatever columns Spark passes it; over HTTP the types come
from ``input_types`` (Spark DDL or Arrow types, one per argument) when given, else they are
inferred from JSON: numbers become ``double``, booleans ``boolean``, strings ``string``, lists
``array<...>`` of those (``[[1, 2]]`` is ``array<double>``). Arrow bodies keep their own types
(cast to ``input_types`` when given).

Concurrent requests are merged by ``@serve.batch`` (``max_batch_size`` requests, waiting at most
``batch_wait_timeout_s``) into one actor call; should that call fail on one request's rows, each
request of the batch is sent again alone, so a bad request fails alone. Status codes: 400 for a
body that cannot be read (the message names the field and the type expected), 404 for a closed
model or an unknown path, 500 when ``apply_func`` fails, 503 with ``Retry-After`` when more than
``max_queued_requests`` wait (Serve's own bound) or no actor is left, 504 after
``call_timeout_s``.

``ray.serve`` is imported inside functions only: ``import spark_ray_udf`` works without it, and
``RayModel.serve()`` without it raises :class:`~spark_ray_udf.errors.MissingDependencyError`
naming the extra ``spark-ray-udf[serve]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

from spark_ray_udf._contract import ActorRef, PoolAddress, decode_entry
from spark_ray_udf.errors import (
    ConfigError,
    ConfigTypeError,
    CallTimeoutError,
    InputError,
    MissingDependencyError,
    ModelApplyError,
    PoolClosedError,
    RetriesExhaustedError,
    SparkRayUdfError,
)
from spark_ray_udf.router import Router, retries_left

log = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"
APP_PREFIX = "spark-ray-udf-"
RETRY_AFTER_S = 1  # what a 503 tells the client to wait
READY_TIMEOUT_S = 120.0
PING_TIMEOUT_S = 10.0

__all__ = [
    "ARROW_STREAM",
    "HttpDoor",
    "HttpOptions",
    "InputSpec",
    "app_name",
    "input_spec",
    "parse_arrow",
    "parse_json",
    "start_http",
    "stop_http",
]


# --- options and argument types (driver side) -----------------------------------------------------


@dataclass(frozen=True)
class HttpOptions:
    """How the HTTP door listens and batches; checked when built.

    >>> HttpOptions(max_batch_size=0)
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ConfigError: max_batch_size must be a positive int (got 0)
    """

    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str | None = None  # default "/<function>"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int | None = None  # per replica; default 2 x max_batch_size
    max_queued_requests: int = 256
    num_replicas: int = 1

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_size", "max_queued_requests", "num_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int (got {value!r})")
        if self.max_ongoing_requests is not None and (
            isinstance(self.max_ongoing_requests, bool)
            or not isinstance(self.max_ongoing_requests, int)
            or self.max_ongoing_requests < 1
        ):
            raise ConfigError(
                f"max_ongoing_requests must be None or a positive int (got {self.max_ongoing_requests!r})"
            )
        t = self.batch_wait_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t)):
            raise ConfigError(f"batch_wait_timeout_s must be a number of seconds >= 0 (got {t!r})")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a host name or address (got {self.host!r})")
        prefix = self.route_prefix
        if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("/")):
            raise ConfigError(f"route_prefix must start with '/' (got {prefix!r})")

    def prefix_for(self, function: str) -> str:
        """The route prefix, ``/<function>`` unless given.

        >>> HttpOptions().prefix_for("model_predict"), HttpOptions(route_prefix="/m/").prefix_for("f")
        ('/model_predict', '/m')
        """
        prefix = self.route_prefix or f"/{function}"
        return prefix.rstrip("/") or "/"

    def ongoing(self) -> int:
        """Requests one replica works on at once: enough to fill two batches by default."""
        return self.max_ongoing_requests or 2 * self.max_batch_size


class InputSpec(NamedTuple):
    """The function's arguments over HTTP: their names (None: positional) and Arrow types
    (None: inferred from each JSON body)."""

    names: tuple[str, ...] | None = None
    types: tuple[pa.DataType, ...] | None = None

    def describe(self) -> list[dict[str, str]] | None:
        """The arguments as ``[{"name": ..., "type": ...}]`` (None when inferred).

        >>> InputSpec(None, (pa.float64(),)).describe()
        [{'name': 'arg0', 'type': 'double'}]
        """
        if self.types is None:
            return None
        names = self.names or tuple(f"arg{i}" for i in range(len(self.types)))
        return [{"name": n, "type": str(t)} for n, t in zip(names, self.types)]


def _arrow_type(t: Any, where: str) -> pa.DataType:
    if isinstance(t, pa.DataType):
        return t
    try:
        from pyspark.sql.pandas.types import to_arrow_type
        from pyspark.sql.types import DataType
    except ImportError as exc:  # pragma: no cover - pyspark is a dependency
        raise ConfigTypeError(f"{where}: Spark types need pyspark ({exc})") from exc
    if isinstance(t, str):
        try:
            t = DataType.fromDDL(t)
        except Exception as exc:  # ParseException
            raise ConfigTypeError(
                f"{where}: {t!r} is not a Spark type (DDL such as 'double' or 'array<float>')"
            ) from exc
    if isinstance(t, DataType):
        return to_arrow_type(t, timezone="UTC", prefers_large_types=False)
    raise ConfigTypeError(
        f"{where} must be a Spark DDL string, a pyspark DataType or a pyarrow DataType "
        f"(got {t!r} that is a {type(t)!r})"
    )


def input_spec(input_types: Sequence[Any] | Mapping[str, Any] | None) -> InputSpec:
    """The :class:`InputSpec` of ``serve(input_types=...)``: a sequence of types (positional
    arguments) or a mapping ``{name: type}`` (named, in order); types are Spark DDL strings,
    pyspark or pyarrow types. None infers them from each body.

    >>> input_spec([pa.float64()])
    InputSpec(names=None, types=(DataType(double),))
    >>> input_spec({"x": pa.list_(pa.float32())}).names
    ('x',)
    >>> input_spec([])
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ConfigError: input_types must name at least one argument (got [])
    """
    if input_types is None:
        return InputSpec()
    if isinstance(input_types, Mapping):
        names = tuple(input_types)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ConfigTypeError(f"input_types names must be non-empty strings (got {bad!r})")
        values: list[Any] = list(input_types.values())
    elif isinstance(input_types, (str, bytes)) or not isinstance(input_types, Sequence):
        raise ConfigTypeError(
            "input_types must be a list of types (one per argument) or a mapping "
            f"{{name: type}} (got {input_types!r}); e.g. ['array<double>']"
        )
    else:
        names, values = None, list(input_types)  # type: ignore[assignment]
    if not values:
        raise ConfigError(f"input_types must name at least one argument (got {input_types!r})")
    types = tuple(_arrow_type(t, f"input_types[{i}]") for i, t in enumerate(values))
    return InputSpec(names=names, types=types)


# --- request bodies -> Arrow columns (pure) --------------------------------------------------------


def _kind(value: Any) -> str:
    """A JSON value's kind, for error messages.

    >>> _kind(1.5), _kind("a"), _kind([1]), _kind(None), _kind({"a": 1}), _kind(True)
    ('a number', 'a string', 'a list', 'null', 'an object', 'a boolean')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _first_value(values: Sequence[Any]) -> Any:
    for v in values:
        if v is not None and not (isinstance(v, list) and not v):
            return v
    return None


def infer_type(values: Sequence[Any], *, where: str) -> pa.DataType:
    """The Arrow type of a column of JSON values: numbers ``double``, booleans ``boolean``,
    strings ``string``, lists ``list<...>`` of those (nested lists nest).

    >>> infer_type([1, 2.5], where="x"), infer_type([[1, 2], [3, 4]], where="x")
    (DataType(double), ListType(list<item: double>))
    >>> infer_type([{"a": 1}], where="instances")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.InputError: instances[0]: expected a number, a boolean, a string or a list, got an object; pass input_types= to serve() for other argument types
    """
    first = _first_value(values)
    if first is None:
        return pa.float64()  # all null or empty: the actor's null policy decides
    if isinstance(first, bool):
        return pa.bool_()
    if isinstance(first, (int, float)):
        return pa.float64()
    if isinstance(first, str):
        return pa.string()
    if isinstance(first, list):
        inner = [x for v in values if isinstance(v, list) for x in v]
        return pa.list_(infer_type(inner, where=f"{where}[...]"))
    index = next(i for i, v in enumerate(values) if v is first)
    raise InputError(
        f"{where}[{index}]: expected a number, a boolean, a string or a list, got {_kind(first)}; "
        "pass input_types= to serve() for other argument types"
    )


def to_column(values: Sequence[Any], t: pa.DataType | None, *, where: str) -> pa.Array:
    """One argument's JSON values as an Arrow array of type ``t`` (inferred when None); the
    error names the first value that does not fit.

    >>> to_column([1, 2], pa.int64(), where="inputs['n']").to_pylist()
    [1, 2]
    >>> to_column([1, "two"], pa.float64(), where="instances")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.InputError: instances[1]: expected double, got a string ("two")
    """
    target = t if t is not None else infer_type(values, where=where)
    try:
        return pa.array(values, type=target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        for i, v in enumerate(values):
            try:
                pa.array([v], type=target)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                shown = json.dumps(v)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise InputError(
                    f"{where}[{i}]: expected {target}, got {_kind(v)} ({shown})"
                ) from None
        raise InputError(f"{where}: expected values of type {target}: {exc}") from None


def _arity(spec: InputSpec, rows: Sequence[Any]) -> tuple[int, tuple[str, ...] | None]:
    if spec.types is not None:
        return len(spec.types), spec.names
    first = _first_value(rows)
    if isinstance(first, dict):
        return len(first), tuple(first)
    return 1, None


def _expected_row(n: int, names: tuple[str, ...] | None, spec: InputSpec) -> str:
    what = f"a list of {n} argument values"
    if spec.types is not None:
        what += " (" + ", ".join(str(t) for t in spec.types) + ")"
    if names:
        what += f" or an object with the keys {list(names)}"
    return what


def _columns_from_instances(rows: Any, spec: InputSpec) -> list[list[Any]]:
    if not isinstance(rows, list):
        raise InputError(f"instances: expected a list (one entry per row), got {_kind(rows)}")
    n, names = _arity(spec, rows)
    if n == 1 and not (names and any(isinstance(r, dict) for r in rows)):
        return [list(rows)]
    columns: list[list[Any]] = [[] for _ in range(n)]
    for i, row in enumerate(rows):
        if isinstance(row, dict) and names:
            missing = [k for k in names if k not in row]
            extra = [k for k in row if k not in names]
            if missing or extra:
                raise InputError(
                    f"instances[{i}]: expected the keys {list(names)}, got {list(row)}"
                )
            values = [row[k] for k in names]
        elif isinstance(row, list) and len(row) == n:
            values = row
        else:
            got = f"a list of {len(row)}" if isinstance(row, list) else _kind(row)
            raise InputError(f"instances[{i}]: expected {_expected_row(n, names, spec)}, got {got}")
        for col, v in zip(columns, values):
            col.append(v)
    return columns


def _columns_from_inputs(inputs: Any, spec: InputSpec) -> tuple[list[list[Any]], list[str]]:
    if isinstance(inputs, list):
        if spec.types is not None and len(spec.types) != 1:
            raise InputError(
                f"inputs: a list is one argument, but the function takes {len(spec.types)}; "
                f"send an object {{argument: [values]}} with the keys {list(spec.names or [])} "
                "or use instances"
            )
        return [inputs], ["inputs"]
    if not isinstance(inputs, dict) or not inputs:
        raise InputError(
            f"inputs: expected an object {{argument: [values]}} or a list, got {_kind(inputs)}"
        )
    if spec.types is not None:
        if spec.names is None:
            raise InputError(
                "inputs: this function's arguments have no names (input_types is a list); "
                "send instances, or {\"inputs\": [values]} for one argument"
            )
        if sorted(inputs) != sorted(spec.names):
            raise InputError(f"inputs: expected the keys {list(spec.names)}, got {list(inputs)}")
        keys = list(spec.names)
    else:
        keys = list(inputs)
    columns = []
    for k in keys:
        if not isinstance(inputs[k], list):
            raise InputError(f"inputs[{k!r}]: expected a list (one value per row), got {_kind(inputs[k])}")
        columns.append(inputs[k])
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise InputError(
            "inputs: every argument needs one value per row; got "
            + ", ".join(f"{k!r}: {len(c)}" for k, c in zip(keys, columns))
        )
    return columns, [f"inputs[{k!r}]" for k in keys]


def parse_json(body: Any, spec: InputSpec = InputSpec()) -> list[pa.Array]:
    """A TensorFlow-Serving-shaped JSON body as one Arrow array per argument.

    >>> [c.to_pylist() for c in parse_json({"instances": [[1, 2], [3, 4]]})]
    [[[1.0, 2.0], [3.0, 4.0]]]
    >>> spec = input_spec({"a": pa.int64(), "b": pa.string()})
    >>> [c.to_pylist() for c in parse_json({"instances": [{"a": 1, "b": "x"}]}, spec)]
    [[1], ['x']]
    >>> [c.to_pylist() for c in parse_json({"inputs": {"a": [1], "b": ["y"]}}, spec)]
    [[1], ['y']]
    >>> parse_json({"rows": []})
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.InputError: body: expected a JSON object with "instances" (a list of rows) or "inputs" (columns), got the keys ['rows']
    """
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        got = f"the keys {list(body)}" if isinstance(body, dict) else _kind(body)
        raise InputError(
            'body: expected a JSON object with "instances" (a list of rows) or "inputs" '
            f"(columns), got {got}"
        )
    if "instances" in body:
        columns = _columns_from_instances(body["instances"], spec)
        n = len(columns)
        wheres = ["instances"] * n if n == 1 else [f"instances[*][{i}]" for i in range(n)]
        if spec.names and n > 1:
            wheres = [f"instances[*][{k!r}]" for k in spec.names]
    else:
        columns, wheres = _columns_from_inputs(body["inputs"], spec)
    types = spec.types or (None,) * len(columns)
    return [to_column(c, t, where=w) for c, t, w in zip(columns, types, wheres)]


def parse_arrow(data: bytes, spec: InputSpec = InputSpec()) -> list[pa.Array]:
    """An Arrow IPC stream body as its columns (the arguments in order), cast to
    ``spec.types`` when given.

    >>> sink = pa.BufferOutputStream()
    >>> batch = pa.record_batch([pa.array([1.0, 2.0])], names=["x"])
    >>> with pa.ipc.new_stream(sink, batch.schema) as w:
    ...     w.write_batch(batch)
    >>> parse_arrow(sink.getvalue().to_pybytes())[0].to_pylist()
    [1.0, 2.0]
    >>> parse_arrow(b"not arrow")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.InputError: body: expected an Arrow IPC stream (application/vnd.apache.arrow.stream) whose columns are the arguments in order; it could not be read: ...
    """
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            f"body: expected an Arrow IPC stream ({ARROW_STREAM}) whose columns are the "
            f"arguments in order; it could not be read: {exc}"
        ) from None
    if table.num_columns == 0:
        raise InputError("body: the Arrow stream has no columns; send one column per argument")
    columns = [c.combine_chunks() for c in table.columns]
    if spec.types is None:
        return columns
    if len(columns) != len(spec.types):
        raise InputError(
            f"body: the Arrow stream has {len(columns)} columns {table.column_names}; the "
            f"function takes {len(spec.types)} ({', '.join(str(t) for t in spec.types)})"
        )
    out = []
    for i, (col, t, name) in enumerate(zip(columns, spec.types, table.column_names)):
        if col.type == t:
            out.append(col)
            continue
        try:
            out.append(col.cast(t))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise InputError(
                f"body: column {name!r} (argument {i + 1}): expected {t}, got {col.type} ({exc})"
            ) from None
    return out


def arrow_bytes(predictions: pa.Array, version: int) -> bytes:
    """The predictions as an Arrow IPC stream: one column ``prediction``, the version in the
    schema metadata.

    >>> data = arrow_bytes(pa.array([1, 2]), 3)
    >>> t = pa.ipc.open_stream(data).read_all()
    >>> t.column("prediction").to_pylist(), t.schema.metadata[b"model_version"]
    ([1, 2], b'3')
    """
    batch = pa.record_batch([predictions], names=["prediction"])
    schema = batch.schema.with_metadata({"model_version": str(version)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch.replace_schema_metadata(schema.metadata))
    return bytes(sink.getvalue().to_pybytes())


def merge(requests: Sequence[Sequence[pa.Array]]) -> list[pa.Array]:
    """The columns of several requests (same types) concatenated, argument by argument.

    >>> [c.to_pylist() for c in merge([[pa.array([1])], [pa.array([2, 3])]])]
    [[1, 2, 3]]
    """
    return [pa.concat_arrays([r[j] for r in requests]) for j in range(len(requests[0]))]


def split(result: pa.Array, lengths: Sequence[int]) -> list[pa.Array]:
    """Cut one result back into the requests' parts.

    >>> [p.to_pylist() for p in split(pa.array([1, 2, 3]), [1, 2])]
    [[1], [2, 3]]
    """
    parts, offset = [], 0
    for n in lengths:
        parts.append(result.slice(offset, n))
        offset += n
    if offset != len(result):
        raise ModelApplyError(f"the actor returned {len(result)} rows for {offset}")
    return parts


def _signature(columns: Sequence[pa.Array]) -> tuple[str, ...]:
    return tuple(str(c.type) for c in columns)


# --- the replica -----------------------------------------------------------------------------------


class _Failure(SparkRayUdfError, RuntimeError):
    """An HTTP error answer: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        r"""The answer for a library error; a 500 keeps the first line only (an ``apply_func``
        traceback stays in the replica's log, it is not sent to the client).

        >>> _Failure.of(ModelApplyError("f: apply_func raised. The actor's traceback:\nboom")).args
        ("f: apply_func raised. The actor's traceback: (in the Serve replica's log)",)
        """
        status = _status_of(exc)
        message = str(exc)
        if status >= 500 and "\n" in message:
            log.error("HTTP %d: %s", status, message)
            message = message.splitlines()[0] + " (in the Serve replica's log)"
        return cls(status, message)


def _status_of(exc: BaseException) -> int:
    """The HTTP status for a library error.

    >>> _status_of(InputError("x")), _status_of(PoolClosedError("x")), _status_of(ModelApplyError("x"))
    (400, 404, 500)
    """
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, PoolClosedError):
        return 404
    if isinstance(exc, (CallTimeoutError, TimeoutError)):
        return 504
    if isinstance(exc, RetriesExhaustedError):
        return 503
    return 500


@dataclass
class _Item:
    columns: list[pa.Array]

    @property
    def rows(self) -> int:
        return len(self.columns[0])


@dataclass
class _Outcome:
    predictions: pa.Array | None = None
    version: int = -1
    error: _Failure | None = None


@dataclass
class _Door:
    """The replica's view of the pool: the entry, verified handles and a router (async)."""

    address: PoolAddress
    router: Router = field(default_factory=Router)
    version: int = -1
    handles: dict[str, Any] = field(default_factory=dict)  # actor id -> handle
    actors: list[Any] = field(default_factory=list)  # by slot
    pings: dict[int, Any] = field(default_factory=dict)  # slot -> asyncio task
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _read(self) -> bytes | None:
        from spark_ray_udf import _ray
        from spark_ray_udf.client import KV_NAMESPACE, entry_key

        timeout = min(self.address.call_timeout_s, 30.0)
        return _ray.kv_get(entry_key(self.address.namespace), namespace=KV_NAMESPACE, timeout_s=timeout)

    def _lookup(self, refs: Sequence[ActorRef]) -> list[Any]:
        from spark_ray_udf.client import lookup_actor

        return [self.handles.get(r.actor_id) or lookup_actor(self.address, r) for r in refs]

    async def refresh(self) -> None:
        """Read the directory entry; adopt a new generation (reload, replaced actor)."""
        async with self.lock:
            try:
                blob = await asyncio.to_thread(self._read)
            except Exception as exc:  # the GCS did not answer
                raise CallTimeoutError(
                    f"{self.address.function}: the pool's directory entry could not be read "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            if blob is None:
                raise PoolClosedError(
                    f"{self.address.function}: the model was closed; register it and serve it again"
                )
            entry = decode_entry(blob, self.address.secret, where=self.address.function)
            if entry.number == self.router.number:
                self._readmit()
                return
            handles = await asyncio.to_thread(self._lookup, entry.actors)
            self.router.update(entry.number, [r.actor_id for r in entry.actors], [r.node_id for r in entry.actors])
            self.version, self.actors, self.pings = entry.version, handles, {}
            self.handles = {r.actor_id: h for r, h in zip(entry.actors, handles) if h is not None}

    def _readmit(self) -> None:
        """Ping each actor out of rotation (once at a time); one that answers comes back (a
        Ray-restarted actor has reloaded the model)."""
        for i in self.router.unusable():
            handle = self.actors[i] if i < len(self.actors) else None
            if handle is None or (i in self.pings and not self.pings[i].done()):
                continue
            self.pings[i] = asyncio.ensure_future(self._ping(i, self.router.number, handle))

    async def _ping(self, i: int, number: int, handle: Any) -> None:
        from ray.exceptions import RayError

        try:
            await asyncio.wait_for(_awaitable(handle.pid.remote()), PING_TIMEOUT_S)
        except (RayError, asyncio.TimeoutError):
            return  # still down: pinged again at a later refresh
        if number == self.router.number:
            self.router.readmit(i)

    async def predict(self, columns: list[pa.Array]) -> tuple[pa.Array, int]:
        """One actor call for these rows, retried on another actor when its actor dies."""
        from ray.exceptions import RayActorError, RayTaskError

        a = self.address
        attempts, backoff = 0, 0.1
        while True:
            await self.refresh()
            i = self.router.pick()
            if i is not None and self.actors[i] is None:
                self.router.failed(i, self.router.number)
                continue
            if i is None:
                attempts += 1
                if not retries_left(attempts, a.max_retries):
                    raise RetriesExhaustedError(
                        f"{a.function}: no actor of the pool could take the request after "
                        f"{attempts} tries; retry later"
                    )
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self.router.forget()
                continue
            number, version, handle = self.router.number, self.version, self.actors[i]
            try:
                ref = handle.predict.remote(columns, 0, None, "http")
                out = await asyncio.wait_for(_awaitable(ref), a.call_timeout_s)
            except asyncio.TimeoutError:
                self.router.done(i, number)
                raise CallTimeoutError(
                    f"{a.function}: actor {i} did not answer within call_timeout_s="
                    f"{a.call_timeout_s}s"
                ) from None
            except RayTaskError as exc:
                self.router.done(i, number)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SparkRayUdfError):
                    raise cause from None
                raise ModelApplyError(f"{a.function}: {exc}") from None
            except RayActorError as exc:
                self.router.failed(i, number)
                await self.refresh()
                if self.router.number == number:  # the same generation: a real failure
                    attempts += 1
                    log.warning("%s: actor %d died (%s); retrying", a.function, i, type(exc).__name__)
                    if not retries_left(attempts, a.max_retries):
                        raise RetriesExhaustedError(
                            f"{a.function}: the request failed on {attempts} actors; last cause: "
                            f"{type(exc).__name__}"
                        ) from exc
                continue
            self.router.done(i, number)
            return out, version


def _awaitable(ref: Any) -> Any:
    """An ObjectRef as an asyncio future (``await ref`` works; wait_for wants a future)."""
    return asyncio.wrap_future(ref.future())


class HttpIngress:
    """The Serve deployment's class: parses requests, batches them, forwards to the pool."""

    def __init__(
        self,
        address: PoolAddress,
        metadata: dict[str, Any],
        spec: InputSpec,
        route_prefix: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        from ray import serve

        import ray

        self._door = _Door(address, Router(node=str(ray.get_runtime_context().get_node_id() or "")))
        self._metadata = metadata
        self._spec = spec
        self._prefix = "" if route_prefix == "/" else route_prefix
        self._batched = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s
        )(self._run_batch)

    async def _run_batch(self, items: list[_Item]) -> list[_Outcome]:
        outcomes: list[_Outcome] = [_Outcome() for _ in items]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(_signature(item.columns), []).append(i)

        async def run(indices: list[int]) -> None:
            parts = [items[i] for i in indices]
            columns = parts[0].columns if len(parts) == 1 else merge([p.columns for p in parts])
            try:
                result, version = await self._door.predict(columns)
                pieces = split(result, [p.rows for p in parts])
            except (InputError, ModelApplyError) as exc:
                if len(indices) > 1:  # one request's rows may be at fault: each alone
                    await asyncio.gather(*(run([i]) for i in indices))
                    return
                outcomes[indices[0]].error = _Failure.of(exc)
                return
            except SparkRayUdfError as exc:
                for i in indices:
                    outcomes[i].error = _Failure.of(exc)
                return
            for i, piece in zip(indices, pieces):
                outcomes[i].predictions, outcomes[i].version = piece, version

        await asyncio.gather(*(run(g) for g in groups.values()))
        return outcomes

    async def __call__(self, request: Any) -> Any:
        path = request.url.path
        if self._prefix and path.startswith(self._prefix):
            path = path[len(self._prefix):]
        path = path.rstrip("/")
        try:
            if path == "" and request.method == "GET":
                return await self._describe()
            if path in ("/predict", ":predict"):
                if request.method != "POST":
                    raise _Failure(405, f"{path}: use POST with a JSON or Arrow body")
                return await self._predict(request)
            raise _Failure(
                404, f"{request.url.path}: unknown path; use GET {self._prefix or '/'} or "
                f"POST {self._prefix}/predict"
            )
        except _Failure as exc:
            return _error_response(exc.status, str(exc))
        except SparkRayUdfError as exc:
            failure = _Failure.of(exc)
            return _error_response(failure.status, str(failure))

    async def _describe(self) -> Any:
        await self._door.refresh()
        meta = {
            **self._metadata,
            "version": self._door.version,
            "generation": self._door.router.number,
            "actors": len(self._door.actors),
        }
        return _json_response(200, meta)

    async def _predict(self, request: Any) -> Any:
        from starlette.responses import Response

        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        arrow_in = content_type == ARROW_STREAM
        if arrow_in:
            columns = parse_arrow(body, self._spec)
        else:
            try:
                decoded = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Failure(
                    400, f"body: expected JSON (or Content-Type: {ARROW_STREAM}): {exc}"
                ) from None
            columns = parse_json(decoded, self._spec)
        arrow_out = arrow_in or ARROW_STREAM in request.headers.get("accept", "")
        if len(columns[0]) == 0:
            await self._door.refresh()
            outcome = _Outcome(pa.array([], type=pa.null()), self._door.version)
        else:
            outcome = await self._batched(_Item(columns))
        if outcome.error is not None:
            raise outcome.error
        if outcome.predictions is None:  # the batcher answered neither rows nor an error
            raise _Failure(500, f"{self._metadata['name']}: the batch returned no predictions")
        if arrow_out:
            return Response(
                arrow_bytes(outcome.predictions, outcome.version),
                media_type=ARROW_STREAM,
                headers={"X-Model-Version": str(outcome.version)},
            )
        return _json_response(
            200, {"predictions": outcome.predictions.to_pylist(), "model_version": outcome.version}
        )


def _json_response(status: int, payload: Any) -> Any:
    from starlette.responses import Response

    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return Response(
        json.dumps(payload, allow_nan=True), status_code=status,
        media_type="application/json", headers=headers,
    )


def _error_response(status: int, message: str) -> Any:
    return _json_response(status, {"error": message})


# --- starting and stopping (driver side) -------------------------------------------------------


class HttpDoor(NamedTuple):
    """A running HTTP door: its Serve application and where it answers."""

    app: str
    url: str
    started_serve: bool  # this process started Serve for it (and stops Serve with its last app)


_LOCK = threading.Lock()
_APPS: dict[str, HttpDoor] = {}  # the doors this process started, by application name
_PROXY: tuple[str, int] | None = None  # host and port of the Serve this process started


def app_name(function: str) -> str:
    """The Serve application of a function's HTTP door.

    >>> app_name("model_predict")
    'spark-ray-udf-model_predict'
    """
    return APP_PREFIX + function


def import_serve() -> Any:
    """``ray.serve``, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        from ray import serve
        import starlette  # noqa: F401  (Serve's HTTP requests and responses)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the HTTP door needs Ray Serve ({exc}); install it with "
            "pip install 'spark-ray-udf[serve]'"
        ) from exc
    return serve


def start_http(
    address: PoolAddress,
    *,
    table: str,
    return_type: str,
    spec: InputSpec,
    options: HttpOptions,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> HttpDoor:
    """Start (or update) the function's Serve application and wait until it answers."""
    serve = import_serve()
    from ray.serve.config import BackpressureConfig

    name = app_name(address.function)
    prefix = options.prefix_for(address.function)
    global _PROXY
    with _LOCK:
        started = False
        if not _serve_running(serve):
            serve.start(http_options={"host": options.host, "port": options.port})
            started, _PROXY = True, (options.host, options.port)
        else:
            started = any(d.started_serve for d in _APPS.values())
            if started and _PROXY is not None and _PROXY != (options.host, options.port):
                raise ConfigError(
                    f"{address.function}: Serve already listens on {_PROXY[0]}:{_PROXY[1]} for "
                    f"this Ray cluster (one HTTP proxy per cluster); serve on that host and port, "
                    "or close the models served there first"
                )
        metadata = {
            "name": address.function,
            "table": table,
            "return_type": return_type,
            "arguments": spec.describe() or "inferred from each JSON body (numbers: double, "
            "lists: array<double>, strings: string); Arrow bodies keep their types",
            "predict": f"POST {prefix.rstrip('/')}/predict",
            "formats": ["application/json", ARROW_STREAM],
        }
        deployment = serve.deployment(
            HttpIngress,
            name="ingress",
            num_replicas=options.num_replicas,
            max_ongoing_requests=options.ongoing(),
            max_queued_requests=options.max_queued_requests,
            backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
            ray_actor_options={"num_cpus": 0},
        )
        app = deployment.bind(
            address, metadata, spec, prefix, options.max_batch_size, options.batch_wait_timeout_s
        )
        serve.run(app, name=name, route_prefix=prefix, blocking=False)
        host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host
        url = f"http://{host}:{options.port}{'' if prefix == '/' else prefix}"
        door = HttpDoor(app=name, url=url, started_serve=started)
        _APPS[name] = door
    try:
        _wait_answering(url, ready_timeout_s, function=address.function)
    except BaseException:
        stop_http(door)
        raise
    log.info("%s: answering HTTP at %s (Serve application %r)", address.function, url, name)
    return door


def _serve_running(serve: Any) -> bool:
    """True when Serve runs in this Ray cluster (its controller is a named actor in the
    ``serve`` namespace; ``serve.status()`` answers even when it does not)."""
    import ray

    return any(
        a["namespace"] == "serve" and a["name"].startswith("SERVE_CONTROLLER")
        for a in ray.util.list_named_actors(all_namespaces=True)
    )


def _wait_answering(url: str, timeout_s: float, *, function: str) -> None:
    """Poll ``GET url`` until it answers 200, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    raise CallTimeoutError(
        f"{function}: the HTTP door did not answer at {url} within {timeout_s}s (last: {last}); "
        "if Serve already runs in this Ray cluster with other http_options, it keeps its own "
        "host and port: pass them to serve()"
    )


def stop_http(door: HttpDoor, *, timeout_s: float = 60.0) -> None:
    """Delete the door's Serve application; stop Serve too when this process started it and
    no application is left."""
    import ray

    serve = import_serve()
    with _LOCK:
        _APPS.pop(door.app, None)
        if not ray.is_initialized() or not _serve_running(serve):
            return  # Ray or Serve already gone: nothing left to delete
        serve.delete(door.app, _blocking=True)
        if door.started_serve and not _APPS and not serve.status().applications:
            serve.shutdown()
    log.info("deleted the Serve application %r", door.app)

