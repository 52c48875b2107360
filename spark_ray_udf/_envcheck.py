"""The environment check a new pool runs before its first query: can Spark's Python workers serve it?

A SQL function runs in Spark's Python workers, on the interpreter Spark picks for them
(``spark.pyspark.python`` / ``PYSPARK_PYTHON``, else ``python3`` from the PATH). When that is not
the driver's interpreter, the first query used to die deep inside an executor with
``ModuleNotFoundError: No module named 'numpy'``. :func:`check_environment` runs one tiny Spark
job (one partition, a plain Python UDF) that reports, from an executor:

* the interpreter path and its Python version;
* whether ``spark_ray_udf``, ``ray`` and ``pyarrow`` import there, and their versions;
* whether a TCP connection to Ray's GCS opens from there.

:func:`find_problems` compares that with the driver (a pure function). The Ray actors are not
asked: ``ray.init`` already refuses a driver whose Ray or Python version differs from the
cluster's, so the driver's versions are the actors' versions, and an actor that cannot import
the library fails the pool's start with :class:`~spark_ray_udf.errors.ModelInitError`.
A ``pyarrow`` version that differs is only logged: Arrow's IPC format is stable across versions.

The probe imports nothing at module scope and is pickled by value, so a bare interpreter runs it
and reports what it lacks instead of failing with a raw ``ModuleNotFoundError``.
"""

from __future__ import annotations

import builtins
import json
import logging
import sys
import threading
import time
import types
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spark_ray_udf.errors import CallTimeoutError, EnvironmentMismatchError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

MODULES = ("spark_ray_udf", "ray", "pyarrow")
CHECK_TIMEOUT_S = 120.0  # the job may wait for an executor to start on a cluster
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Facts:
    """One interpreter's answers: where it is, its Python, what it imports, whether Ray answers."""

    python: str
    version: tuple[int, int, int]
    host: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # module -> version, for imported ones
    missing: dict[str, str] = field(default_factory=dict)  # module -> the import error
    files: dict[str, str] = field(default_factory=dict)  # module -> where it was imported from
    ray_error: str = ""  # why the TCP connection to the GCS failed; "" when it opened

    @classmethod
    def from_json(cls, text: str) -> Facts:
        d = json.loads(text)
        return cls(
            python=d["python"],
            version=tuple(d["version"]),  # type: ignore[arg-type]
            host=d.get("host", ""),
            versions=dict(d.get("versions", {})),
            missing=dict(d.get("missing", {})),
            files=dict(d.get("files", {})),
            ray_error=d.get("ray_error", ""),
        )


def _probe(host: str, port: int, timeout_s: float, auth: str) -> str:
    # Runs in Spark's Python worker, pickled by value (see _portable): only builtins and
    # imports inside, so any interpreter that runs PySpark's worker runs it.
    import json
    import os
    import socket
    import sys

    # Ray reads its auth mode once, when first imported: set it the way the function's own
    # connect_worker would, or this worker could never join a token-auth Ray afterwards.
    if auth and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = auth

    out: dict = {
        "python": sys.executable,
        "version": list(sys.version_info[:3]),
        "host": socket.gethostname(),
        "versions": {},
        "missing": {},
        "files": {},
        "ray_error": "",
    }
    for name in ("spark_ray_udf", "ray", "pyarrow"):
        try:
            module = __import__(name)
            out["versions"][name] = str(getattr(module, "__version__", "unknown"))
            out["files"][name] = str(getattr(module, "__file__", ""))
        except Exception as exc:  # reported to the driver, which raises
            out["missing"][name] = f"{type(exc).__name__}: {exc}"
    if port > 0:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            out["ray_error"] = f"{type(exc).__name__}: {exc}"
    return json.dumps(out)


def _portable(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` that belongs to no module, so cloudpickle pickles it by value (a
    function of this module would be pickled by reference and need ``spark_ray_udf`` to load).

    >>> from pyspark import cloudpickle
    >>> b"spark_ray_udf._envcheck" in cloudpickle.dumps(_portable(_probe))
    False
    """
    copy = types.FunctionType(fn.__code__, {"__builtins__": builtins}, fn.__name__)
    copy.__module__ = None  # type: ignore[assignment]
    return copy


def driver_facts() -> Facts:
    """This process's interpreter and module versions (the driver's).

    >>> driver_facts().versions["spark_ray_udf"] == __import__("spark_ray_udf").__version__
    True
    """
    import socket

    versions = {}
    for name in MODULES:
        versions[name] = str(getattr(__import__(name), "__version__", "unknown"))
    return Facts(
        python=sys.executable,
        version=tuple(sys.version_info[:3]),  # type: ignore[arg-type]
        host=socket.gethostname(),
        versions=versions,
    )


def find_problems(driver: Facts, executor: Facts, gcs_address: str) -> list[str]:
    """What stops ``executor``'s Spark Python workers from serving a pool the driver started.

    >>> d = Facts("/venv/bin/python", (3, 11, 7), versions={"spark_ray_udf": "0.1.0",
    ...           "ray": "2.60.0", "pyarrow": "26.0.1"})
    >>> find_problems(d, d, "127.0.0.1:6379")
    []
    >>> bare = Facts("/usr/bin/python3", (3, 11, 2), missing=dict.fromkeys(
    ...              ("spark_ray_udf", "ray"), "ModuleNotFoundError: x"))
    >>> find_problems(d, bare, "127.0.0.1:6379")
    ['spark_ray_udf does not import (ModuleNotFoundError: x)']
    >>> old = Facts("/opt/py", (3, 10, 1), versions={"spark_ray_udf": "0.1.0", "ray": "2.50.0",
    ...             "pyarrow": "18.0.0"}, ray_error="TimeoutError: timed out")
    >>> for p in find_problems(d, old, "10.0.0.5:6379"): print(p)
    Python 3.10 (the driver runs 3.11)
    ray 2.50.0 (the driver has 2.60.0)
    Ray's GCS at 10.0.0.5:6379 is unreachable from there (TimeoutError: timed out)
    """
    problems = []
    if executor.version[:2] != driver.version[:2]:
        problems.append(
            f"Python {executor.version[0]}.{executor.version[1]} (the driver runs "
            f"{driver.version[0]}.{driver.version[1]})"
        )
    for name in ("spark_ray_udf", "ray"):
        if name in executor.missing:
            why = executor.missing[name]
            if name == "ray" and "spark_ray_udf" in executor.missing:
                continue  # one line: installing spark-ray-udf brings ray
            problems.append(f"{name} does not import ({why})")
        elif executor.versions.get(name) != driver.versions.get(name):
            found = executor.files.get(name)
            problems.append(
                f"{name} {executor.versions.get(name)}{f' from {found}' if found else ''} "
                f"(the driver has {driver.versions.get(name)})"
            )
    if "pyarrow" in executor.missing and "spark_ray_udf" not in executor.missing:
        problems.append(f"pyarrow does not import ({executor.missing['pyarrow']})")
    if executor.ray_error:
        problems.append(f"Ray's GCS at {gcs_address} is unreachable from there ({executor.ray_error})")
    return problems


def _fixes(driver: Facts, executor: Facts, problems: list[str]) -> str:
    text = " ".join(problems)
    fixes = []
    if "does not import" in text or "Python " in text:
        fixes.append(
            "run Spark's Python workers on an interpreter that has spark-ray-udf: set "
            f"PYSPARK_PYTHON (the driver runs {driver.python}) before the SparkSession starts, or "
            "spark.pyspark.python; or install it on every executor: pip install "
            f"'spark-ray-udf=={driver.versions.get('spark_ray_udf')}'"
        )
    if "the driver has" in text:
        pins = " ".join(f"'{n.replace('_', '-')}=={driver.versions[n]}'" for n in ("spark_ray_udf", "ray"))
        fixes.append(f"install the driver's versions on the executors ({pins}), or the executors' on the driver")
    if "unreachable" in text:
        fixes.append(
            "let the executors reach Ray: on a cluster start Ray with an address they can reach "
            "(ray start --head --node-ip-address=...) and pass ray_address=, or open the port"
        )
    return "; ".join(fixes)


def _configured_python(spark: SparkSession) -> str:
    """The interpreter Spark was told to use, as well as the driver can know it."""
    import os

    classic = getattr(getattr(spark, "_sc", None), "pythonExec", None)  # None over Connect
    return str(classic or os.environ.get("PYSPARK_PYTHON") or "python3 from the PATH")


def _run_probe(spark: SparkSession, host: str, port: int, auth: str, timeout_s: float) -> str:
    """Run :func:`_probe` in one task; interrupt the job after ``timeout_s``."""
    from pyspark.sql import functions as F

    probe = F.udf(_portable(_probe), "string", useArrow=False)
    tag = f"spark-ray-udf-envcheck-{uuid.uuid4().hex[:8]}"
    result: list[Any] = []
    failure: list[BaseException] = []

    def job() -> None:
        spark.addTag(tag)
        try:
            rows = (
                spark.range(0, 1, 1, numPartitions=1)
                .select(
                    probe(F.lit(host), F.lit(port), F.lit(CONNECT_TIMEOUT_S), F.lit(auth))
                    .alias("facts")
                )
                .collect()
            )
            result.append(rows[0][0])
        except BaseException as exc:  # handed to the caller's thread, which raises
            failure.append(exc)
        finally:
            spark.removeTag(tag)

    thread = threading.Thread(target=job, name=tag, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        spark.interruptTag(tag)
        raise CallTimeoutError(
            f"the environment check (one Spark task) did not finish within {timeout_s:.0f} s; "
            "the cluster may have no free executor: retry, or pass check_environment=False"
        )
    if failure:
        raise failure[0]
    return str(result[0])


def check_environment(
    spark: SparkSession, gcs_address: str, *, who: str = "", timeout_s: float = CHECK_TIMEOUT_S
) -> Facts:
    """Check on an executor that Spark's Python workers can serve a pool on ``gcs_address``.

    Returns the executor's :class:`Facts`; raises
    :class:`~spark_ray_udf.errors.EnvironmentMismatchError` naming the interpreter, what is
    missing or different, and the fix. ``register_ray_model`` calls it once per new pool
    (``check_environment=False`` skips it).

    Example::

        facts = check_environment(spark, "127.0.0.1:6379")
        facts.python   # the interpreter Spark's Python workers run
    """
    from spark_ray_udf._ray import auth_mode, split_address

    prefix = f"{who}: " if who else ""
    hp = split_address(gcs_address)
    host, port = hp if hp is not None else ("", 0)
    started = time.perf_counter()
    try:
        text = _run_probe(spark, host, port, auth_mode(), timeout_s)
    except CallTimeoutError as exc:
        raise CallTimeoutError(f"{prefix}{exc}") from None
    except Exception as exc:  # the job failed before the probe could answer
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise EnvironmentMismatchError(
            f"{prefix}Spark's Python workers could not run the environment check on "
            f"{_configured_python(spark)} ({first}); point PYSPARK_PYTHON (or "
            f"spark.pyspark.python) at a Python {sys.version_info[0]}.{sys.version_info[1]} "
            f"with spark-ray-udf installed (the driver runs {sys.executable})"
        ) from exc
    executor = Facts.from_json(text)
    driver = driver_facts()
    log.info(
        "%senvironment check: %s on %s in %.2f s", prefix, executor.python, executor.host,
        time.perf_counter() - started,
    )
    if executor.versions.get("pyarrow") not in (None, driver.versions["pyarrow"]):
        log.info(
            "%sexecutors have pyarrow %s, the driver %s (fine: Arrow's IPC format is stable)",
            prefix, executor.versions["pyarrow"], driver.versions["pyarrow"],
        )
    problems = find_problems(driver, executor, gcs_address)
    if problems:
        where = f" on {executor.host}" if executor.host else ""
        raise EnvironmentMismatchError(
            f"{prefix}Spark's Python workers{where} run {executor.python} (Python "
            f"{'.'.join(map(str, executor.version))}), which cannot serve the function: "
            f"{'; '.join(problems)}. Fix: {_fixes(driver, executor, problems)}"
        )
    return executor
