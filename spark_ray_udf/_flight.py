"""Arrow Flight: the transport for Spark executors that are not Ray nodes (``executor_transport="flight"``).

Where a Spark executor's machine has no raylet (Spark on Kubernetes next to a KubeRay cluster),
it cannot join Ray as a driver. With ``executor_transport="flight"`` each model actor also runs
a :class:`PoolFlightServer` (``pyarrow.flight``), bound to its node's IP on a port the OS picks,
and the executors call the actors straight over gRPC with Arrow batches. The executor side
imports ``pyarrow`` only, never Ray.

* **The call**: one ``DoExchange`` per batch. The descriptor's command is a small JSON record
  (the batch's first row in the task's partition, the partition); the client writes one record
  batch of argument columns, the server runs the actor's own ``predict`` (same checks, same
  errors, rows counted under door ``"sql"``) and writes the result column back.
* **Errors**: a library error raised by ``predict`` goes back as a ``FlightServerError`` whose
  ``extra_info`` is ``{"type": ..., "message": ...}``; the client raises the same
  :class:`~spark_ray_udf.errors.SparkRayUdfError` subclass with the same message a Ray call
  gives (:func:`error_from_info`).
* **Auth**: every call carries the header ``x-spark-ray-udf-token: HMAC(secret, "flight")``
  (:func:`flight_token`); the pool's secret travels only in the UDF closure, the actors get the
  derived token. A call without it is refused with ``FlightUnauthenticatedError``.
* **Discovery**: the registering driver runs a small :class:`PoolFlightServer` too (bound to
  ``spark.driver.host``, which executors reach anyway) that answers ``DoAction("entry")`` with
  the pool's signed directory entry (:mod:`spark_ray_udf._contract`), which holds each actor's
  Flight URI. The client verifies the signature with the secret before trusting it, so a
  forged endpoint cannot redirect rows. The driver is the one place that always knows the
  serving generation (after a ``reload()`` every actor a client knew is gone), and Spark's
  executors reach it anyway; while the pool lives, so does its driver. A ``reload()`` publishes a new entry before the old actors stop; the old
  actors' servers finish the calls they hold and then refuse, and the client reads the entry
  again and sends the batch to the new actors (not counted as a retry).

This module imports no Ray: :class:`FlightPoolClient` runs in Spark's Python workers, and the
server part runs inside the actor, which passes it its ``predict`` method.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl

from spark_ray_udf import _batches, errors
from spark_ray_udf._batches import Pending
from spark_ray_udf._contract import Entry, PoolAddress, decode_entry, flight_token
from spark_ray_udf.errors import (
    CallTimeoutError,
    ConfigError,
    FlightAuthError,
    ModelApplyError,
    PoolClosedError,
    PoolIntegrityError,
    RetriesExhaustedError,
    SparkRayUdfError,
)
from spark_ray_udf.router import Router, retries_left

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-spark-ray-udf-token"
ENTRY_ACTION = "entry"
PING_ACTION = "ping"
LOAD_ACTION = "load"  # an actor's answer: how many calls it holds (every caller's), as ASCII digits
PING_TIMEOUT_S = 2.0  # a ping of an actor that failed waits this long
ENTRY_TIMEOUT_S = 30.0  # a read of the directory entry waits this long (at most call_timeout_s)

PORTS_ENV = "SPARK_RAY_UDF_FLIGHT_PORTS"  # on the Ray nodes: "lo-hi" to keep actors' ports there

__all__ = ["FlightPoolClient", "PoolFlightServer", "error_from_info", "error_info"]


def read_table(reader: Any) -> pa.Table:
    """Read a Flight stream to its end, chunk by chunk, never with ``reader.read_all()``.

    pyarrow's ``read_all()`` runs under a ``SignalStopHandler`` that answers any cancelled
    call (``FlightCancelledError``: the other side shut down or cancelled mid-stream) by
    simulating Ctrl-C, ``PyErr_SetInterrupt()``: the process's *main* thread then gets a
    ``KeyboardInterrupt``, whichever thread made the call. In a Spark Python worker that
    kills the task (the main thread waits on the call's future); in an actor it hits Ray's
    main loop. ``read_chunk()`` raises the ``FlightCancelledError`` in the calling thread
    only, where the retry logic handles it.

    >>> batch = pa.RecordBatch.from_arrays([pa.array([1, 2])], names=["x"])
    >>> class Reader:  # the part of a Flight stream reader this uses
    ...     schema, chunks = batch.schema, [batch, batch]
    ...     def read_chunk(self):
    ...         if not self.chunks:
    ...             raise StopIteration
    ...         return type("Chunk", (), {"data": self.chunks.pop()})()
    >>> read_table(Reader()).num_rows
    4
    """
    batches = []
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return pa.Table.from_batches(batches, schema=reader.schema)
        if chunk.data is not None:
            batches.append(chunk.data)


def error_info(exc: BaseException) -> bytes:
    """What a server sends back about a library error: its class name and message.

    >>> error_info(errors.InputError("f: row 3 is null"))
    b'{"message": "f: row 3 is null", "type": "InputError"}'
    """
    return json.dumps({"type": type(exc).__name__, "message": str(exc)}, sort_keys=True).encode()


def port_range(text: str | None) -> range:
    """The ports an actor's Flight server may bind, from ``SPARK_RAY_UDF_FLIGHT_PORTS``
    (``"lo-hi"``, both included, or one port); ``range(0, 1)`` (the OS picks) when unset.

    >>> port_range("20000-20003"), port_range(None), port_range("7000")
    (range(20000, 20004), range(0, 1), range(7000, 7001))
    >>> port_range("9-3")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ConfigError: SPARK_RAY_UDF_FLIGHT_PORTS must be 'lo-hi' with 1 <= lo <= hi <= 65535 (got '9-3')
    """
    if not text or not text.strip():
        return range(0, 1)
    lo, _, hi = text.strip().partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"{PORTS_ENV} must be 'lo-hi' with 1 <= lo <= hi <= 65535 (got {text!r})")
    return range(first, last + 1)


def start_server(
    host: str, token: str, *, who: str, predict: Predict, load: Callable[[], int], ports: range
) -> PoolFlightServer:
    """An actor's server on the first free port of ``ports`` (see :func:`port_range`)."""
    last: Exception | None = None
    for port in ports:
        try:
            return PoolFlightServer(host, token, who=who, predict=predict, load=load, port=port)
        except (OSError, pa.ArrowException) as exc:  # taken: try the next one
            last = exc
    raise ConfigError(
        f"{who}: no port of {ports.start}-{ports.stop - 1} ({PORTS_ENV}) is free on {host} for "
        f"its Flight server ({last}); widen the range or stop what holds it"
    ) from last


def flight_message(exc: BaseException) -> str:
    """A Flight error's own message, without gRPC's debug context.

    >>> flight_message(fl.FlightUnavailableError("no route. Detail: Unavailable. gRPC client"))
    'no route'
    """
    return str(exc).split(". Detail:", 1)[0]


def error_from_info(info: bytes | None, fallback: str) -> SparkRayUdfError:
    """The library error a server described with :func:`error_info` (a
    :class:`ModelApplyError` saying ``fallback`` when the description is missing or names no
    error of the library).

    >>> error_from_info(error_info(errors.InputError("f: row 3 is null")), "?")
    InputError('f: row 3 is null')
    >>> error_from_info(b"junk", "f: the actor failed")
    ModelApplyError('f: the actor failed')
    """
    try:
        data = json.loads(info or b"")
        cls = getattr(errors, str(data["type"]), None)
        message = str(data["message"])
    except (ValueError, KeyError, TypeError):
        return ModelApplyError(fallback)
    if isinstance(cls, type) and issubclass(cls, SparkRayUdfError):
        return cls(message)
    return ModelApplyError(message)


class _TokenCheck(fl.ServerMiddlewareFactory):  # type: ignore[misc]
    """Refuses every call that does not carry the pool's token."""

    def __init__(self, token: str, who: str) -> None:
        super().__init__()
        self._token = token
        self._who = who

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> None:
        sent = headers.get(TOKEN_HEADER, [])
        for value in sent:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if hmac.compare_digest(text, self._token):
                return None
        raise fl.FlightUnauthenticatedError(  # re-raised: the client turns it into FlightAuthError
            f"{self._who}: this call does not carry the pool's token (header {TOKEN_HEADER}); "
            "only the registered SQL function's tasks may call its actors"
        )


Predict = Callable[[list[pa.Array], int, "int | None"], pa.Array]


class PoolFlightServer(fl.FlightServerBase):  # type: ignore[misc]
    """A Flight server for one actor (``predict`` set) or for the registering driver (only
    ``entry``): ``DoExchange`` predicts one batch, ``DoAction("entry")`` answers the signed
    directory entry, ``DoAction("ping")`` answers ``b"ok"``, ``DoAction("load")`` (``load``
    set) the number of calls the actor holds from every caller. Listens on ``host``, port 0
    (the OS picks; :attr:`uri` says which), from construction until :meth:`shutdown`.

    >>> server = PoolFlightServer("127.0.0.1", "tok", who="f", entry=lambda: b"signed")
    >>> client = fl.FlightClient(server.uri)
    >>> opts = fl.FlightCallOptions(headers=[(TOKEN_HEADER.encode(), b"tok")], timeout=5)
    >>> [r.body.to_pybytes() for r in client.do_action(ENTRY_ACTION, options=opts)]
    [b'signed']
    >>> client.close(); server.shutdown()
    """

    def __init__(
        self,
        host: str,
        token: str,
        *,
        who: str,
        predict: Predict | None = None,
        load: Callable[[], int] | None = None,
        entry: Callable[[], bytes | None] | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(f"grpc://{host}:{port}", middleware={"token": _TokenCheck(token, who)})
        self._who = who
        self._predict = predict  # the actor's: it queues calls for its one compute thread
        self._load = load
        self._entry = entry
        self.uri = f"grpc://{host}:{self.port}"
        threading.Thread(target=self.serve, name=f"spark-ray-udf-flight-{who}", daemon=True).start()

    def do_exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        if self._predict is None:
            raise fl.FlightServerError(f"{self._who}: this endpoint serves no batches")  # re-raised: client maps it
        meta = json.loads(descriptor.command)
        table = read_table(reader)
        columns = [c.combine_chunks() for c in table.columns]
        partition = meta.get("partition")
        try:
            out = self._predict(columns, int(meta["row_offset"]), None if partition is None else int(partition))
        except SparkRayUdfError as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise fl.FlightServerError(first, extra_info=error_info(exc)) from None  # re-raised: client maps it
        result = pa.Table.from_arrays([out], names=["result"])
        writer.begin(result.schema)
        writer.write_table(result)

    def do_action(self, context: Any, action: Any) -> Iterator[bytes]:
        if action.type == PING_ACTION:
            return iter([b"ok"])
        if action.type == LOAD_ACTION and self._load is not None:
            return iter([str(int(self._load())).encode()])
        if action.type == ENTRY_ACTION:
            blob = self._entry() if self._entry is not None else None
            return iter([blob or b""])
        raise fl.FlightServerError(f"{self._who}: unknown action {action.type!r}")  # re-raised: client maps it


class FlightPoolClient(_batches.BatchLoop):
    """Sends a task's batches to the pool's actors over Flight; the executor-side twin of
    :class:`spark_ray_udf.client.PoolClient` (same ordering, in-flight limit, retries and
    timeouts), without Ray. One per (process, pool)."""

    def __init__(self, address: PoolAddress) -> None:
        self.address = address
        token = flight_token(address.secret).encode()
        headers = [(TOKEN_HEADER.encode(), token)]
        self._options = fl.FlightCallOptions(timeout=address.call_timeout_s, headers=headers)
        self._quick = fl.FlightCallOptions(timeout=PING_TIMEOUT_S, headers=headers)
        self._entry_options = fl.FlightCallOptions(
            timeout=min(address.call_timeout_s, ENTRY_TIMEOUT_S), headers=headers
        )
        self._router = Router(node="")
        self._router.start = os.getpid()
        self._uris: tuple[str, ...] = ()
        self._version = -1
        self._clients: dict[str, fl.FlightClient] = {}
        self._lock = threading.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, 2 * address.max_in_flight), thread_name_prefix="spark-ray-udf-flight"
        )
        self._partition: int | None = None
        # load probes get threads of their own: behind the batches they would answer late
        self._probe_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="spark-ray-udf-flight-load"
        )
        self._loads = _batches.LoadProbes(
            ask=self._ask_load,
            ready=lambda futures, timeout: concurrent.futures.wait(futures, timeout=timeout).done,
            answer=lambda future: future.result(timeout=0),
            errors=(fl.FlightError, OSError, ValueError),
        )

    def _client(self, uri: str) -> fl.FlightClient:
        with self._lock:
            client = self._clients.get(uri)
            if client is None:
                client = fl.FlightClient(uri)
                self._clients[uri] = client
            return client

    def close(self) -> None:
        """Close the connections and the call threads (the cache calls it on dropping this)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._probe_threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def _forget_client(self, uri: str) -> None:
        with self._lock:
            client = self._clients.pop(uri, None)
        if client is not None:
            client.close()

    def _ask_entry(self, uri: str) -> bytes | None:
        results = list(self._client(uri).do_action(ENTRY_ACTION, options=self._entry_options))
        blob = results[0].body.to_pybytes() if results else b""
        return blob or None

    def _verified_entry(self) -> Entry:
        """The newest directory entry the driver's endpoint (else any known actor) answers,
        verified with the pool's secret."""
        a = self.address
        sources = [a.directory_uri] if a.directory_uri else []
        sources += [u for u in self._uris if u]
        causes: list[str] = []
        best: Entry | None = None
        for uri in sources:
            try:
                blob = self._ask_entry(uri)
            except fl.FlightUnauthenticatedError as exc:
                raise FlightAuthError(
                    f"{a.function}: {uri} refused this task's token ({flight_message(exc)}); the "
                    "pool was registered again meanwhile: rerun the query"
                ) from exc
            except (fl.FlightError, OSError) as exc:
                causes.append(f"{uri}: {type(exc).__name__}")
                self._forget_client(uri)
                continue
            if blob is None:
                causes.append(f"{uri}: no entry")
                continue
            entry = decode_entry(blob, a.secret, where=a.function)
            if best is None or entry.number > best.number:
                best = entry
            if uri == a.directory_uri:
                break  # the driver's answer is the current one
        if best is None:
            raise PoolClosedError(
                f"{a.function}: no endpoint of its pool answered (the driver's at "
                f"{a.directory_uri or '-'} and {len(self._uris)} actors: {'; '.join(causes)}); "
                "the pool is closed or its driver is gone: call register_ray_model() again"
            )
        return best

    def refresh(self) -> None:
        """Read the directory entry: which actors serve the function now; ping failed ones."""
        entry = self._verified_entry()
        if entry.number == self._router.number:
            self._readmit()
            return
        self._router.update(entry.number, [r.actor_id for r in entry.actors], [r.node_id for r in entry.actors])
        self._version = entry.version
        self._uris = tuple(r.flight_uri for r in entry.actors)
        missing = [r.name for r in entry.actors if not r.flight_uri]
        if missing:
            raise PoolIntegrityError(
                f"{self.address.function}: the pool's actors {missing} publish no Flight endpoint; "
                "register the function again with executor_transport='flight'"
            )

    def _readmit(self) -> None:
        for i in self._router.unusable():
            try:
                list(self._client(self._uris[i]).do_action(PING_ACTION, options=self._quick))
            except (fl.FlightError, OSError):
                self._forget_client(self._uris[i])
                continue
            self._router.readmit(i)
            log.info("%s: actor %d answers again", self.address.function, i)

    def _exchange(self, uri: str, columns: list[pa.Array], row_offset: int) -> pa.Array:
        command = json.dumps({"row_offset": row_offset, "partition": self._partition}).encode()
        writer, reader = self._client(uri).do_exchange(
            fl.FlightDescriptor.for_command(command), options=self._options
        )
        batch = pa.RecordBatch.from_arrays(columns, names=[f"c{i}" for i in range(len(columns))])
        try:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            writer.done_writing()
            table = read_table(reader)
        except BaseException:
            with contextlib.suppress(Exception):  # closing repeats the call's own error
                writer.close()
            raise
        writer.close()
        return table.column(0).combine_chunks()

    def _submit(self, p: Pending) -> Pending:
        backoff = 0.1
        while True:
            i = self._router.pick()
            if i is not None:
                break
            p.attempts += 1
            self._check_attempts(p, None)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            self._router.forget()
            self.refresh()
        p.actor, p.generation = i, self._router.number
        p.call = self._threads.submit(self._exchange, self._uris[i], p.columns, p.row_offset)
        return p

    def _check_attempts(self, p: Pending, cause: BaseException | None) -> None:
        if retries_left(p.attempts, self.address.max_retries):
            return
        why = "no actor of the pool could take the batch" if cause is None else (
            f"actor {p.actor} failed: {type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
        )
        raise RetriesExhaustedError(
            f"{self.address.function}: {self._where(p)} failed on {p.attempts} actors of the "
            f"pool (Flight, namespace {self.address.namespace!r}); last cause: {why}. Raise "
            "max_retries= or check why the actors die or are unreachable from the executors "
            "(their Flight ports must be open to them)"
        ) from cause

    def _collect(self, p: Pending) -> pa.Array:
        a = self.address
        while True:
            future: concurrent.futures.Future[pa.Array] | None = p.call
            if future is None:  # never sent (cannot happen after _send): send it now
                self._submit(p)
                continue
            try:
                out = future.result(timeout=a.call_timeout_s + PING_TIMEOUT_S)
            except (concurrent.futures.TimeoutError, fl.FlightTimedOutError) as exc:
                self._router.done(p.actor, p.generation)
                raise CallTimeoutError(
                    f"{a.function}: actor {p.actor} ({self._uris[p.actor] if p.actor < len(self._uris) else '?'}) "
                    f"did not return {self._where(p)} within call_timeout_s={a.call_timeout_s}s "
                    "over Flight; raise call_timeout_s= or look at the actor's logs"
                ) from exc
            except fl.FlightUnauthenticatedError as exc:
                self._router.done(p.actor, p.generation)
                raise FlightAuthError(
                    f"{a.function}: actor {p.actor} refused this task's token ({flight_message(exc)}); the pool "
                    "was registered again meanwhile: rerun the query"
                ) from exc
            except fl.FlightServerError as exc:
                self._router.done(p.actor, p.generation)
                raise error_from_info(exc.extra_info, f"{a.function}: {flight_message(exc)}") from None
            except (fl.FlightError, OSError) as exc:  # unreachable, shut down or died mid-call
                self._router.failed(p.actor, p.generation)
                if p.actor < len(self._uris):
                    self._forget_client(self._uris[p.actor])
                self.refresh()
                if self._router.number != p.generation:
                    log.info("%s: rows from %d go to generation %d (v%d)", a.function, p.row_offset,
                             self._router.number, self._version)
                else:
                    p.attempts += 1
                    log.warning("%s: actor %d failed over Flight (%s); retrying %s (attempt %d of %d)",
                                a.function, p.actor, type(exc).__name__, self._where(p), p.attempts,
                                a.max_retries)
                    self._check_attempts(p, exc)
                self._submit(p)
                continue
            self._router.done(p.actor, p.generation)
            return out

    def _ask_load(self, i: int) -> concurrent.futures.Future[int] | None:
        """Send actor ``i`` a ``DoAction("load")`` on a probe thread (None: no URI known)."""
        uri = self._uris[i] if i < len(self._uris) else ""
        if not uri:
            return None

        def ask() -> int:
            results = list(self._client(uri).do_action(LOAD_ACTION, options=self._quick))
            return int(results[0].body.to_pybytes()) if results else 0

        return self._probe_threads.submit(ask)

    def _send(self, columns: list[pa.Array], offset: int) -> list[Pending]:
        """Submit one batch: whole, or cut into pieces for the idle actors (``plan_split``), as
        the actors' load reports (:class:`~spark_ray_udf._batches.LoadProbes`) count them.
        Pieces are plain slices: they go out as Arrow IPC, not pickled."""
        self._loads.run(self._router)
        return _batches.cut(
            columns, offset, idle=self._router.idle(), min_rows=self.address.min_split_rows, submit=self._submit
        )

    def _abandon(self, p: Pending) -> None:
        p.call.cancel()
        self._router.done(p.actor, p.generation)
