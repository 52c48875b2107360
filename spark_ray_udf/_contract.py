"""The small records every side of a pool shares: the driver, the actors, Spark's Python workers
and the HTTP door. Pure data and pure functions: no Ray, no Spark, no I/O.

* :class:`PoolAddress` travels in the UDF closure: where the pool lives and how to call it.
* :class:`Generation` is the driver's view of the actors serving a function at one time.
* The directory entry is what executors read to find those actors: a JSON record signed with the
  pool's secret (:func:`encode_entry` / :func:`decode_entry`). It holds actor names and ids only,
  so a reader never unpickles anything another Ray job could have written, and a forged or
  stale entry is refused instead of routing rows to someone else's actors.
* :class:`WorkerInfo` is what a ready actor reports about itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, NamedTuple

from spark_ray_udf.errors import PoolIntegrityError

ENTRY_KEY = b"generation"  # the directory entry's key in the pool's namespace of Ray's KV store


class PoolAddress(NamedTuple):
    """Where a function's pool lives and how to call it; small and picklable, it travels in
    the UDF closure (an actor handle cannot be unpickled before ``ray.init``)."""

    function: str
    ray_address: str
    namespace: str
    token: str
    auth_mode: str
    max_in_flight: int
    call_timeout_s: float
    max_retries: int
    secret: str = ""  # signs the directory entry; only the registrant and its tasks know it
    min_split_rows: int | None = None  # cut a batch for idle actors when pieces keep this many
    transport: str = "ray"  # how executors reach the actors: "ray" (as Ray drivers) or "flight"
    directory_uri: str = ""  # flight: the registering driver's endpoint answering the entry


class WorkerInfo(NamedTuple):
    """What a ready actor reports about itself."""

    index: int
    pid: int
    node_ip: str
    model_dir: str
    load_seconds: float
    version: int
    node_id: str = ""
    name: str = ""
    actor_id: str = ""
    flight_uri: str = ""  # grpc://ip:port of the actor's Flight server ("" without one)


class Generation(NamedTuple):
    """The actors serving a function at one time, for one model version (driver side)."""

    number: int
    version: int
    actors: tuple[Any, ...]


class ActorRef(NamedTuple):
    """One actor of a directory entry: how to look it up and what it must turn out to be."""

    name: str
    actor_id: str
    node_id: str = ""
    flight_uri: str = ""  # where executors without Ray call it (executor_transport="flight")


class Entry(NamedTuple):
    """A decoded, verified directory entry."""

    number: int
    version: int
    actors: tuple[ActorRef, ...]


def sign(secret: str, payload: bytes) -> str:
    """The HMAC-SHA256 of ``payload`` under ``secret``, hex.

    >>> len(sign("s", b"x"))
    64
    """
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def flight_token(secret: str) -> str:
    """The token Arrow Flight calls to a pool carry (``executor_transport="flight"``), derived
    from the pool's secret: the actors and the driver's endpoint check it, and only the secret
    (which never leaves the UDF closure) signs directory entries.

    >>> flight_token("s") == flight_token("s") != flight_token("t")
    True
    """
    return sign(secret, b"flight")


def encode_entry(entry: Entry, secret: str) -> bytes:
    """The directory entry as signed bytes (``signature`` newline ``json``).

    >>> e = Entry(1, 3, (ActorRef("a0", "ff", "n1"),))
    >>> decode_entry(encode_entry(e, "key"), "key", where="f") == e
    True
    """
    payload = json.dumps(
        {
            "number": entry.number,
            "version": entry.version,
            "actors": [list(a) for a in entry.actors],
        },
        sort_keys=True,
    ).encode()
    return sign(secret, payload).encode() + b"\n" + payload


def decode_entry(blob: bytes, secret: str, *, where: str) -> Entry:
    """Verify and parse a directory entry; :class:`PoolIntegrityError` when it was not written
    with ``secret`` (another Ray job wrote it, or it is damaged).

    >>> decode_entry(b"0" * 64 + b"\\n{}", "key", where="model_predict")
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.PoolIntegrityError: model_predict: the pool's directory entry is not signed by this pool's registrant (another Ray job wrote it, or it is damaged); it was ignored: register the function again if this persists
    """
    signature, _, payload = blob.partition(b"\n")
    if not hmac.compare_digest(signature, sign(secret, payload).encode()):
        raise PoolIntegrityError(
            f"{where}: the pool's directory entry is not signed by this pool's registrant "
            "(another Ray job wrote it, or it is damaged); it was ignored: register the "
            "function again if this persists"
        )
    data = json.loads(payload)
    actors = tuple(ActorRef(*(str(x) for x in a)) for a in data["actors"])
    return Entry(number=int(data["number"]), version=int(data["version"]), actors=actors)
