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


class PoolClosedError(SparkRayUdfError, RuntimeError):
    """The actor pool behind a SQL function was closed or is gone."""


class PoolIntegrityError(SparkRayUdfError, RuntimeError):
    """What an executor read about a pool was not written by the pool's registrant (another Ray
    job wrote it, or it is damaged): it is refused rather than used."""


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


__all__ = [
    "CallTimeoutError",
    "ConfigError",
    "ConfigTypeError",
    "DestinationExistsError",
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
]
