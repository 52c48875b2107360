"""The error hierarchy of spark-ray-udf.

Every error the library raises derives from :class:`SparkRayUdfError` and also from the
built-in exception a caller would naturally catch (``LookupError`` for a missing table,
``TypeError`` for a column of the wrong type, ...). Messages name the table, version, file,
column or row involved and say how to fix it.

This module imports nothing from the package.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager


class SparkRayUdfError(Exception):
    """Base class of every error raised by spark-ray-udf."""


class ModelNotFoundError(SparkRayUdfError, LookupError):
    """The model table (or the requested version of it) does not exist."""


class ModelTableError(SparkRayUdfError, ValueError):
    """The model table exists but does not hold a valid model: missing chunk, bad checksum,
    unsafe path, empty table, or a table that was not written by :func:`save_model`."""


class ModelInitError(SparkRayUdfError, RuntimeError):
    """``init_func`` raised inside a Ray actor; the message carries the actor's traceback."""


class ModelApplyError(SparkRayUdfError, RuntimeError):
    """``apply_func`` raised, or returned a result of the wrong length or type."""


class InputError(SparkRayUdfError, TypeError):
    """An argument column has an unsupported type or an unusable value (null, ragged array)."""


class RayUnavailableError(SparkRayUdfError, ConnectionError):
    """Ray cannot be reached at the configured address."""


class RayAuthError(RayUnavailableError):
    """Ray's token authentication refused this process: no token, or not the cluster's."""


class PoolClosedError(SparkRayUdfError, RuntimeError):
    """The actor pool behind a SQL function was closed or is gone."""


class PoolIntegrityError(SparkRayUdfError, RuntimeError):
    """What an executor read about a pool was not written by the pool's registrant (another Ray
    job wrote it, or it is damaged): it is refused rather than used."""


class FlightAuthError(SparkRayUdfError, PermissionError):
    """An actor's (or the driver's) Flight endpoint refused a call's token: the caller does not
    hold the pool's secret (``executor_transport="flight"``)."""


class CallTimeoutError(SparkRayUdfError, TimeoutError):
    """A Ray call did not answer within its timeout."""


class ConfigError(SparkRayUdfError, ValueError):
    """An argument of a library function has a value it cannot use (a name that is not a SQL
    identifier, a negative count, an unknown mode); the message names it and what is allowed."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument of a library function has the wrong type (also a :class:`ConfigError`)."""


class MissingDependencyError(SparkRayUdfError, ImportError):
    """An optional package is not installed; the message names the extra to install."""


class DestinationExistsError(SparkRayUdfError, FileExistsError):
    """A folder the library would write into already holds files (``load_model``'s ``dest``)."""


class PlacementError(SparkRayUdfError, RuntimeError):
    """Ray cannot place the actors of a pool: the request per actor fits no node of the cluster,
    or the cluster is full. The message names the request, what the cluster has in total and
    free, which registered functions hold it, and the fix."""


class RetriesExhaustedError(SparkRayUdfError, RuntimeError):
    """The actors serving a batch died more than ``max_retries`` times (out of memory, killed,
    ``apply_func`` crashing the process); the message names the rows and the last cause."""


class EnvironmentMismatchError(SparkRayUdfError, RuntimeError):
    """Spark's Python workers cannot serve the function: their interpreter lacks spark-ray-udf,
    ray or pyarrow, has other versions than the driver, or cannot reach Ray."""


class RayOnSparkError(SparkRayUdfError, RuntimeError):
    """``ray_address="spark"`` could not start Ray inside the Spark application: the executors
    cannot run ``ray`` (``spark.executorEnv.PATH``), or Ray on Spark itself failed to start."""


_IN_TRACEBACK = re.compile(r"^spark_ray_udf\.errors\.(\w+): ", re.M)
_END_OF_MESSAGE = re.compile(r"\n\s*\n|\nJVM stacktrace:|\n\tat ")


def explain(exc: BaseException) -> SparkRayUdfError | None:
    r"""The library's error behind a failed Spark query, rebuilt on the driver, or None.

    When the library fails a task (a null input, ``apply_func`` raising, a lost Ray), Spark
    raises a ``PythonException`` on the driver whose message starts with PySpark's "An exception
    was thrown from the Python worker" and a traceback; PySpark offers no way to make it start
    with the library's message. This finds the library's error in that text (the last one) and
    returns it as an instance of the same class, with the same message; ``exc`` itself when it
    already is one.

    >>> failed = RuntimeError("An exception was thrown from the Python worker:\nTraceback ...\n"
    ...                       "spark_ray_udf.errors.InputError: f: row 3 is null; filter it")
    >>> explain(failed)
    InputError('f: row 3 is null; filter it')
    >>> explain(ValueError("something else")) is None
    True
    """
    if isinstance(exc, SparkRayUdfError):
        return exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        found = [
            (m, cls) for m in _IN_TRACEBACK.finditer(text) if (cls := _library_class(m.group(1)))
        ]
        if found:
            last, cls = found[-1]
            rest = text[last.end():]
            end = _END_OF_MESSAGE.search(rest)
            return cls((rest[: end.start()] if end else rest).rstrip())
        current = current.__cause__ or current.__context__
    return None


def _library_class(name: str) -> type[SparkRayUdfError] | None:
    cls = globals().get(name)
    return cls if isinstance(cls, type) and issubclass(cls, SparkRayUdfError) else None


@contextmanager
def library_errors() -> Iterator[None]:
    """Re-raise a failed Spark query whose cause is the library's error as that error.

    The exception caught then starts with the library's message (it keeps Spark's exception as
    its ``__cause__``); other errors pass unchanged::

        with library_errors():
            spark.sql("select model_predict(features) from events").collect()
        # raises InputError("model_predict: argument 1 (...): row 17 is null; ...")
    """
    try:
        yield
    except Exception as exc:
        found = explain(exc)
        if found is None or found is exc:
            raise
        raise found from exc


__all__ = [
    "CallTimeoutError",
    "ConfigError",
    "ConfigTypeError",
    "DestinationExistsError",
    "EnvironmentMismatchError",
    "InputError",
    "MissingDependencyError",
    "ModelApplyError",
    "ModelInitError",
    "ModelNotFoundError",
    "ModelTableError",
    "PlacementError",
    "PoolClosedError",
    "PoolIntegrityError",
    "RayUnavailableError",
    "RetriesExhaustedError",
    "SparkRayUdfError",
    "explain",
    "library_errors",
]
