"""Functions the integration tests register as ``init_func``/``apply_func``, and driver-side helpers.

Ray pickles a module-level function by reference (``tests.helpers.apply_label``), so every Ray
actor imports this module: the root ``conftest.py`` puts the repository root on ``PYTHONPATH``
and ``tests/__init__.py`` makes ``tests`` a package. A function defined in a test module would
be pickled as ``tests.test_udf.fn`` and make every actor import that test module (pytest and
all); without ``tests/__init__.py`` it would be ``test_udf.fn``, which no actor can import.
Keep this module's imports light (numpy; pandas, psutil and ray inside functions).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spark_ray_udf.testing import LinearModel, apply_linear

N_FEATURES = 8
N_CLASSES = 3
LABELS = np.array(["cat", "dog", "emu"])
_PRIMES = (7919, 104729, 1299709, 15485863, 179424673, 2038074743, 22801763489, 252097800623)


# --- deterministic features: the same values in Spark SQL and in numpy ---------------------------


def features_sql(n_features: int = N_FEATURES, *, start: int = 0) -> str:
    """A SQL expression for an ``array<double>`` of features computed from the ``id`` column.

    Integer arithmetic, one exact cast, one division and one subtraction: IEEE rounds each the
    same way in the JVM and in numpy, so :func:`features_np` gives the very same doubles.
    """
    parts = [
        f"cast((id * {p} + {j}) % 1001 as double) / 1000D - 0.5D"
        for j, p in enumerate(_PRIMES[start : start + n_features], start=start)
    ]
    return f"array({', '.join(parts)})"


def features_np(ids: Any, n_features: int = N_FEATURES, *, start: int = 0) -> np.ndarray:
    """The rows of :func:`features_sql` for ``ids``, as a ``(len(ids), n_features)`` array."""
    ids = np.asarray(ids, dtype=np.int64)
    cols = [
        ((ids * p + j) % 1001).astype(np.float64) / 1000.0 - 0.5
        for j, p in enumerate(_PRIMES[start : start + n_features], start=start)
    ]
    return np.stack(cols, axis=1)


# --- apply functions, one per return type --------------------------------------------------------


def apply_top_score(model: LinearModel, x: np.ndarray) -> np.ndarray:
    """``double``: the highest class score of each row."""
    return model.scores(x).max(axis=1)


def apply_top_score_f32(model: LinearModel, x: np.ndarray) -> np.ndarray:
    """``float``: the highest class score of each row, as float32."""
    return model.scores(x).max(axis=1).astype(np.float32)


def apply_label(model: LinearModel, x: np.ndarray) -> np.ndarray:
    """``string``: the class name of each row."""
    return LABELS[model.predict(x)]


def apply_struct_dict(model: LinearModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """``struct<label bigint, scores array<double>>`` as a dict of arrays."""
    return {"label": model.predict(x), "scores": model.scores(x)}


def apply_struct_frame(model: LinearModel, x: np.ndarray) -> Any:
    """``struct<label int, name string, score double>`` as a pandas DataFrame."""
    import pandas as pd

    classes = model.predict(x)
    return pd.DataFrame(
        {
            "score": model.scores(x).max(axis=1),
            "name": LABELS[classes],
            "label": classes.astype(np.int32),
        }
    )


def apply_concat(model: LinearModel, *columns: np.ndarray) -> np.ndarray:
    """``bigint``: the class of the row made of all arguments side by side (a scalar argument
    is one feature, an array argument as many as its length)."""
    parts = [c.reshape(len(c), -1).astype(np.float64) for c in columns]
    return model.predict(np.hstack(parts))


# --- misbehaving functions -----------------------------------------------------------------------


def init_raising(model_dir: str, conf: Mapping[str, Any]) -> Any:
    """An ``init_func`` that fails the way a corrupt model would."""
    raise RuntimeError(f"the weights in {model_dir} are corrupt (on purpose)")


def apply_misbehaving(model: LinearModel, mode: np.ndarray, x: np.ndarray) -> Any:
    """A ``double`` function whose first argument picks how it misbehaves, so one pool serves
    every apply error test: 0 fine, 1 raises, 2 returns one value too few, 3 returns strings."""
    m = int(mode[0])
    if m == 1:
        raise ZeroDivisionError("apply_misbehaving divided by zero (on purpose)")
    scores = model.scores(x).max(axis=1)
    if m == 2:
        return scores[:-1]
    if m == 3:
        return np.array([f"score {s:.3f}" for s in scores])
    return scores


# --- driver-side helpers -------------------------------------------------------------------------


def expected_classes(model: LinearModel, ids: Any) -> list[int]:
    """What :func:`~spark_ray_udf.testing.apply_linear` predicts in-process for ``ids``."""
    return apply_linear(model, features_np(ids)).tolist()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(pids: Any) -> list[int]:
    """The PIDs in ``pids`` whose process still runs (a zombie does not count)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(pids: Any, timeout_s: float = 20.0) -> list[int]:
    """Wait until no process of ``pids`` runs; return those still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = running(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = running(alive)
    return alive


def pool_namespaces(function: str) -> list[str]:
    """Namespaces holding a live pool of ``function``: its named model actors with their directory
    entry in Ray's KV store (the pool's registrant removes both on close)."""
    import ray

    from spark_ray_udf import _ray
    from spark_ray_udf.pool import KV_NAMESPACE

    prefix = f"spark-ray-udf.{function}."
    found = {
        a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"].startswith(prefix) and a["name"].startswith(f"{function}-")
    }
    for namespace in list(found):
        if _ray.kv_get(namespace.encode() + b"/generation", namespace=KV_NAMESPACE) is None:
            found.discard(namespace)  # actors still exiting, entry already gone
    return sorted(found)


def work_roots(function: str) -> list[Path]:
    """Temporary folders of ``function``'s pools that still exist on this machine."""
    import tempfile

    root = Path(tempfile.gettempdir()) / "spark-ray-udf"
    return sorted(root.glob(f"spark-ray-udf.{function}.*")) if root.is_dir() else []


@contextlib.contextmanager
def spark_conf(spark: Any, key: str, value: str) -> Iterator[None]:
    """Set a Spark SQL conf for the duration of a block, then restore it."""
    old = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if old is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, old)


def subprocess_env() -> dict[str, str]:
    """This process's environment without what points a child at the session's Ray."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    return env


# --- faults, backpressure and bad input (tests/test_faults.py, test_bad_input.py, test_concurrency.py)


def init_with_conf(model_dir: str, conf: Mapping[str, Any]) -> tuple[LinearModel, dict[str, Any]]:
    """An ``init_func`` keeping the registration's ``conf`` beside the linear model, so apply
    functions can read their knobs (``sleep_s``, ``progress_dir``, ``exit_after``)."""
    from spark_ray_udf.testing import init_linear

    return init_linear(model_dir, conf), dict(conf)


def _mark_progress(conf: Mapping[str, Any]) -> None:
    folder = conf.get("progress_dir")
    if folder:
        Path(folder, f"{os.getpid()}-{time.monotonic_ns()}").touch()


def apply_slow(model: tuple[LinearModel, dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """``bigint``: the linear classes, after sleeping ``conf["sleep_s"]`` per batch and leaving
    one file per batch in ``conf["progress_dir"]`` (named ``<actor pid>-<ns>``)."""
    linear, conf = model
    time.sleep(float(conf.get("sleep_s", 0.05)))
    _mark_progress(conf)
    return linear.predict(x)


def apply_slow_score(model: tuple[LinearModel, dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """``double``: the highest class score of each row, after sleeping ``conf["sleep_s"]`` per
    batch (tests/test_serve.py: both doors, overload)."""
    linear, conf = model
    time.sleep(float(conf.get("sleep_s", 0.0)))
    return linear.scores(x).max(axis=1)


def apply_exit(model: Any, x: np.ndarray) -> np.ndarray:
    """Kill the actor's own process on every batch, the way an out-of-memory kill would."""
    os._exit(3)


def progress_pids(folder: Any) -> list[int]:
    """The actor PID of each batch recorded by :func:`apply_slow` in ``folder``, in time order."""
    names = sorted(Path(folder).iterdir(), key=lambda p: int(p.name.split("-")[1]))
    return [int(p.name.split("-")[0]) for p in names]


def wait_for(cond: Any, timeout_s: float, what: str) -> None:
    """Poll ``cond()`` every 50 ms; raise AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def apply_modes(model: LinearModel, mode: np.ndarray, *columns: np.ndarray) -> Any:
    """One apply function for every bad-input test; ``mode`` (the first value of the batch's
    first argument) picks what it returns for the other arguments:

    0 the sum of each row's values (any numeric shapes); 1 raises; 2 one value too many;
    3 a 2-D array; 4 strings; 5 None; 6 a 0-d scalar; 7 a Python list with None in the middle;
    8 integral floats; 9 ``"<dtype> <shape>"`` of each argument, for string functions.
    """
    m = int(mode[0])
    n = len(mode)
    if m == 1:
        raise ValueError("apply_modes refused the batch (on purpose)")
    if m == 9:
        desc = " | ".join(f"{c.dtype} {tuple(c.shape)}" for c in columns)
        return np.array([desc] * n)
    sums = np.zeros(n)
    for c in columns:
        sums = sums + c.reshape(n, -1).astype(np.float64).sum(axis=1)
    if m == 0:
        return sums
    if m == 2:
        return np.append(sums, 0.0)
    if m == 3:
        return np.stack([sums, sums], axis=1)
    if m == 4:
        return np.array([f"{s:.2f}" for s in sums])
    if m == 5:
        return None
    if m == 6:
        return np.float64(sums.sum())
    if m == 7:
        return [None if i == n // 2 else float(s) for i, s in enumerate(sums)]
    if m == 8:
        return np.arange(n, dtype=np.float64)
    raise ValueError(f"apply_modes: unknown mode {m}")


def actor_processes(class_name: str) -> set[int]:
    """PIDs of the running actor processes of ``class_name`` (``ray::ModelWorker``, ...) of the
    Ray this process started. (Ray's state API needs the dashboard, which the library keeps
    off.)"""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            name = proc.name()
            # named actors' processes read "ray::<actor name>:<Class>[.<method>]"
            bare = name.split(":", 3)[-1] if name.startswith("ray::") else name
            if name.startswith("ray::") and (bare == class_name or bare.startswith(f"{class_name}.")):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    pids.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def object_refs_held(ids: Any) -> set[str]:
    """Which of the object ids (``ObjectRef.hex()``) this process still counts references to
    (a private Ray call: there is no public one without the dashboard)."""
    import ray

    counts = ray._private.worker.global_worker.core_worker.get_all_reference_counts()
    held = {k.decode() if isinstance(k, bytes) else str(k) for k in counts}
    return set(ids) & held


def init_sleeping(model_dir: str, conf: Mapping[str, Any]) -> Any:
    """An ``init_func`` that takes ``conf["sleep_s"]`` seconds, for init timeouts."""
    time.sleep(float(conf.get("sleep_s", 60)))
    from spark_ray_udf.testing import init_linear

    return init_linear(model_dir, conf)


def init_digests(model_dir: str, conf: Mapping[str, Any]) -> dict[str, str]:
    """An ``init_func`` that reads every model file as bytes (unpickling nothing) and keeps
    each file's sha256: what a careful ``init_func`` of an untrusted folder would do."""
    import hashlib

    root = Path(model_dir)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def apply_digest(model: dict[str, str], name: np.ndarray) -> np.ndarray:
    """``string``: the sha256 the actor saw for the model file named in each row."""
    return np.array([model.get(str(n), "missing") for n in name])


class Touch:
    """Pickles to a call that creates the file ``path`` when unpickled: a stand-in for a
    malicious pickle in a model folder."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


# --- Keras ---------------------------------------------------------------------------------------


def apply_keras_argmax(model: Any, x: np.ndarray) -> np.ndarray:
    """``int``: the class a Keras model from ``init_keras`` picks for each row."""
    from spark_ray_udf.builtins import apply_keras

    return apply_keras(model, x).argmax(axis=1).astype(np.int32)


# --- placement and races (tests/test_placement.py, tests/test_races.py) -------------------------


def init_sleep_file(model_dir: str, conf: Mapping[str, Any]) -> Any:
    """``init_func`` of the linear model that first sleeps the seconds written in the model's
    own ``sleep_s`` file, when it has one: a version that loads slowly, next to fast ones."""
    from spark_ray_udf.testing import init_linear

    slow = Path(model_dir) / "sleep_s"
    if slow.exists():
        time.sleep(float(slow.read_text()))
    return init_linear(model_dir, conf)


class Probe:
    """A bare Ray actor for the tests of Ray's own view of placement."""

    def ready(self) -> int:
        return os.getpid()


def model_dir_released(model_dir: str, pids: Any) -> bool:
    """True once the actors ``pids`` no longer hold ``model_dir``: it is gone, or it is a
    machine's shared copy (spark_ray_udf._shared) still held by other pools' actors only."""
    p = Path(model_dir)
    if not p.exists():
        return True
    holders = p.with_name(p.name + ".holders")
    held = {int(h.name) for h in holders.iterdir() if h.name.isdigit()} if holders.is_dir() else set()
    return holders.is_dir() and not held & set(pids) and bool(held)
