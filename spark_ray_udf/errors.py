"""The error hierarchy of spark-ray-udf.

Every error the library raises derives from :class:`SparkRayUdfError` and also from the
built-in exception a caller would naturally catch (``LookupError`` for a missing table,
``TypeError`` for a column of the wrong type, ...). Messages name the table, version, file,
column or row involved and say how to fix it.

This module imports nothing from the package.
"""

from __future__ import annotations


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


class CallTimeoutError(SparkRayUdfError, TimeoutError):
    """A Ray call did not answer within its timeout."""


class RetriesExhaustedError(SparkRayUdfError, RuntimeError):
    """The actors serving a batch died more than ``max_retries`` times (out of memory, killed,
    ``apply_func`` crashing the process); the message names the rows and the last cause."""


__all__ = [
    "CallTimeoutError",
    "InputError",
    "ModelApplyError",
    "ModelInitError",
    "ModelNotFoundError",
    "ModelTableError",
    "PoolClosedError",
    "RayUnavailableError",
    "RetriesExhaustedError",
    "SparkRayUdfError",
]
