"""spark-ray-udf: a model stored in Delta, served by a pool of Ray actors as a Spark SQL function.

>>> import spark_ray_udf
>>> sorted(spark_ray_udf.__all__)[:3]
['CallTimeoutError', 'ConfigError', 'ConfigTypeError']
"""

from spark_ray_udf.builtins import apply_keras, init_keras
from spark_ray_udf.errors import (
    CallTimeoutError,
    ConfigError,
    ConfigTypeError,
    DestinationExistsError,
    FlightAuthError,
    InputError,
    MissingDependencyError,
    ModelApplyError,
    ModelInitError,
    ModelNotFoundError,
    ModelTableError,
    PlacementError,
    PoolClosedError,
    PoolIntegrityError,
    RayAuthError,
    RayOnSparkError,
    RayUnavailableError,
    RetriesExhaustedError,
    SparkRayUdfError,
)
from spark_ray_udf.store import latest_version, load_model, save_model
from spark_ray_udf.udf import RayModel, models, register_ray_model

__version__ = "0.1.0"

__all__ = [
    "CallTimeoutError",
    "ConfigError",
    "ConfigTypeError",
    "DestinationExistsError",
    "FlightAuthError",
    "InputError",
    "MissingDependencyError",
    "ModelApplyError",
    "ModelInitError",
    "ModelNotFoundError",
    "ModelTableError",
    "PlacementError",
    "PoolClosedError",
    "PoolIntegrityError",
    "RayAuthError",
    "RayModel",
    "RayOnSparkError",
    "RayUnavailableError",
    "RetriesExhaustedError",
    "SparkRayUdfError",
    "apply_keras",
    "init_keras",
    "latest_version",
    "load_model",
    "models",
    "register_ray_model",
    "save_model",
]
