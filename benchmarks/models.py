"""The benchmark's models and the functions every contender calls.

This module is imported by Spark's Python workers, by the Ray actors and by the in-process
contender (``inproc.py``): it imports only numpy and pyarrow at module level; TensorFlow and
pandas are imported inside the functions that need them. ``run.py`` puts the repository root on
``PYTHONPATH`` before Spark and Ray start, so functions defined here pickle by reference.

Two models, one per kind of scenario:

* **MLP** (S1, S3, S4): the digits Keras MLP, 784 -> 512 (relu) -> 10, trained for a few seconds
  on scikit-learn's 8x8 digits upscaled to 28x28. The prediction is the class (argmax), so the
  checksum ``sum(id * class)`` is an exact integer, equal for every contender.
* **Embedding** (S2): a ``(vocab, dim)`` float32 table in ``table.npy`` (>= 1 GB in the full run)
  and a ``(dim,)`` projection; a row holds ``k`` token ids; the score is
  ``mean(table[ids]) @ proj`` in float64. Cheap to compute, expensive to hold: the memory scenario.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
MLP_FILE = "mlp.keras"


# --- data ------------------------------------------------------------------------------------------


def digit_images(n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` noisy 28x28 digits (float32 in [0, 1], flattened to 784) from scikit-learn's digits.

    >>> digit_images(3).shape, digit_images(3).dtype.name
    ((3, 784), 'float32')
    """
    base = _upscaled_digits()[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n, N_PIXELS), dtype=np.float32)
    step = 50_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        idx = rng.integers(0, len(base), hi - lo)
        noise = rng.normal(0.0, 0.08, (hi - lo, N_PIXELS)).astype(np.float32)
        np.clip(base[idx] + noise, 0.0, 1.0, out=out[lo:hi])
    return out


def _upscaled_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pick = (np.arange(IMAGE_SIDE) * 8 // IMAGE_SIDE).astype(int)
    images = d.images[:, pick][:, :, pick] / 16.0
    return images.reshape(len(images), N_PIXELS).astype(np.float32), d.target.astype(np.int64)


def token_ids(n: int, k: int, vocab: int, *, seed: int = 1) -> np.ndarray:
    """``(n, k)`` int32 token ids for the embedding model."""
    return np.random.default_rng(seed).integers(0, vocab, (n, k), dtype=np.int32)


def write_parquet(path: Path, ids: np.ndarray, column: str, values: np.ndarray, *, files: int) -> None:
    """Write ``id`` (bigint) and ``column`` (array of the values' dtype) in ``files`` files,
    so that Spark reads ``files`` partitions."""
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    n, width = values.shape
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        flat = pa.array(values[lo:hi].reshape(-1))
        offsets = pa.array(np.arange(0, (hi - lo + 1) * width, width, dtype=np.int32))
        col = pa.ListArray.from_arrays(offsets, flat)
        table = pa.table({"id": pa.array(ids[lo:hi].astype(np.int64)), column: col})
        pq.write_table(table, path / f"part-{f:03d}.parquet", compression="snappy", row_group_size=8192)


# --- the MLP ---------------------------------------------------------------------------------------


def train_mlp(model_dir: Path, *, seed: int = 0, epochs: int = 4) -> Path:
    """Train the digits MLP briefly and save it as ``model_dir/mlp.keras``."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    x, y = _upscaled_digits()
    rng = np.random.default_rng(seed)
    x = np.clip(np.repeat(x, 4, axis=0) + rng.normal(0, 0.08, (len(x) * 4, N_PIXELS)), 0, 1)
    y = np.repeat(y, 4)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(N_PIXELS,), dtype="float32"),
            tf.keras.layers.Dense(512, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x.astype(np.float32), y, epochs=epochs, batch_size=128, verbose=0)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MLP_FILE
    model.save(path)
    return path


_KERAS: dict[str, Any] = {}
_KERAS_LOCK = threading.Lock()


def load_mlp(path: str) -> Any:
    """Load the Keras model at ``path`` (no per-process cache: callers decide)."""
    import tensorflow as tf

    return tf.keras.models.load_model(path, compile=False)


def cached_mlp(path: str) -> Any:
    """The per-Python-worker cached model of contender (c)."""
    with _KERAS_LOCK:
        model = _KERAS.get(path)
        if model is None:
            model = _KERAS[path] = load_mlp(path)
        return model


def mlp_classes(model: Any, x: np.ndarray) -> np.ndarray:
    """The model's own predict: logits for a 2-D float32 batch, then the class (int64)."""
    return np.asarray(model.predict_on_batch(x)).argmax(axis=1).astype(np.int64)


def apply_mlp(model: Any, x: np.ndarray) -> np.ndarray:
    """``apply_func`` for spark-ray-udf (``init_func`` is :func:`spark_ray_udf.init_keras`)."""
    return mlp_classes(model, x)


# --- the embedding model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingModel:
    table: np.ndarray  # (vocab, dim) float32
    proj: np.ndarray  # (dim,) float64

    def scores(self, ids: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
        """``mean(table[ids], axis=1) @ proj`` in float64, ``chunk`` rows at a time."""
        ids = np.asarray(ids)
        out = np.empty(len(ids), dtype=np.float64)
        for lo in range(0, len(ids), chunk):
            rows = self.table[ids[lo : lo + chunk]]
            out[lo : lo + chunk] = rows.mean(axis=1, dtype=np.float64) @ self.proj
        return out


def make_embedding_model(model_dir: Path, *, vocab: int, dim: int, seed: int = 2) -> int:
    """Write ``table.npy`` and ``proj.npy`` into ``model_dir``; return the table's size in bytes."""
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = np.lib.format.open_memmap(
        model_dir / "table.npy", mode="w+", dtype=np.float32, shape=(vocab, dim)
    )
    step = 131_072
    for lo in range(0, vocab, step):
        hi = min(vocab, lo + step)
        table[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
    table.flush()
    del table
    np.save(model_dir / "proj.npy", rng.standard_normal(dim), allow_pickle=False)
    return vocab * dim * 4


def init_embedding(model_dir: str, conf: Mapping[str, Any] | None = None) -> EmbeddingModel:
    """Load both arrays fully into this process's memory (what a typical ``init`` does)."""
    root = Path(model_dir)
    return EmbeddingModel(
        table=np.load(root / "table.npy", allow_pickle=False),
        proj=np.load(root / "proj.npy", allow_pickle=False),
    )


def init_embedding_mmap(model_dir: str, conf: Mapping[str, Any] | None = None) -> EmbeddingModel:
    """Memory-map the table instead (``np.load(mmap_mode="r")``): actors of one machine that
    share the model's folder (``share_model_files=True``, the default) then share one copy of
    its pages in the page cache."""
    root = Path(model_dir)
    return EmbeddingModel(
        table=np.load(root / "table.npy", mmap_mode="r", allow_pickle=False),
        proj=np.load(root / "proj.npy", allow_pickle=False),
    )


def apply_embedding(model: EmbeddingModel, ids: np.ndarray) -> np.ndarray:
    """``apply_func`` for spark-ray-udf: one float64 score per row."""
    return model.scores(ids)


_EMB: dict[str, EmbeddingModel] = {}


def cached_embedding(model_dir: str) -> EmbeddingModel:
    """The per-Python-worker cached model of contender (c)."""
    with _KERAS_LOCK:
        model = _EMB.get(model_dir)
        if model is None:
            model = _EMB[model_dir] = init_embedding(model_dir)
        return model


# --- Spark UDF bodies (contenders b and c); (d) is built in contenders.py ------------------------


def noop_arrow(batches: Iterator[pa.Array]) -> Iterator[pa.Array]:
    """(b) The transport limit: receive each Arrow batch, return zeros (bigint)."""
    for batch in batches:
        yield pa.array(np.zeros(len(batch), dtype=np.int64))


def noop_pandas(batches: Iterator[Any]) -> Iterator[Any]:
    """(b') The same through pandas: each row of an array column becomes a numpy object."""
    import pandas as pd

    for s in batches:
        yield pd.Series(np.zeros(len(s), dtype=np.int64))


def pandas_mlp(path: str):  # noqa: ANN201 - returns a UDF body
    """(c) A pandas iterator UDF body with the model cached per Python worker."""

    def body(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        model = cached_mlp(path)
        for s in batches:
            x = np.stack(s.to_numpy()).astype(np.float32, copy=False)
            yield pd.Series(mlp_classes(model, x))

    return body


def pandas_embedding(model_dir: str):  # noqa: ANN201
    """(c) for the embedding model."""

    def body(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        model = cached_embedding(model_dir)
        for s in batches:
            yield pd.Series(model.scores(np.stack(s.to_numpy())))

    return body


def pbu_mlp(path: str):  # noqa: ANN201
    """(d) ``make_predict_fn`` for ``predict_batch_udf``."""

    def make_predict_fn():  # noqa: ANN202
        model = load_mlp(path)

        def predict(x: np.ndarray) -> np.ndarray:
            return mlp_classes(model, x.astype(np.float32, copy=False))

        return predict

    return make_predict_fn


def pbu_embedding(model_dir: str):  # noqa: ANN201
    """(d) for the embedding model."""

    def make_predict_fn():  # noqa: ANN202
        model = init_embedding(model_dir)

        def predict(ids: np.ndarray) -> np.ndarray:
            return model.scores(ids)

        return predict

    return make_predict_fn


# --- S5: the Ray hop ----------------------------------------------------------------------------


def init_nothing(model_dir: str, conf: Mapping[str, Any]) -> None:
    return None


def apply_first_column(model: None, x: np.ndarray) -> np.ndarray:
    """Near-zero compute: one float per row, so a round trip is the hop itself."""
    return x[:, 0]


class Echo:
    """A raw Ray actor for S5's baselines (no spark-ray-udf code on the path)."""

    def ping(self, x: Any) -> int:
        return 0

    def first_column(self, x: np.ndarray) -> np.ndarray:
        return x[:, 0].copy()


# --- profiling the actor (S1) -----------------------------------------------------------------------


class ProfiledModel:
    """Wraps the MLP with a sampling profiler running in the thread of the actor's ``predict``.

    ``apply_profiled`` starts the profiler on its first call (an actor with concurrency groups
    runs its methods on the group's thread, not on the thread that ran ``__init__``, and a
    profiler must stop on the thread that started it), and stops it and writes the report once
    the file ``conf['stop_file']`` exists. pyinstrument when installed, else cProfile.
    """

    def __init__(self, model: Any, conf: Mapping[str, Any]) -> None:
        self.model = model
        self.stop_file = str(conf["stop_file"])
        self.out_file = str(conf["out_file"])
        self.calls = 0
        self.apply_seconds = 0.0
        self.done = False
        try:
            from pyinstrument import Profiler

            self.kind = "pyinstrument"
            self.profiler: Any = Profiler(interval=0.001)
        except ImportError:
            import cProfile

            self.kind = "cProfile"
            self.profiler = cProfile.Profile()
        self.started = False

    def start(self) -> None:
        self.started = True
        self.profiler.start() if self.kind == "pyinstrument" else self.profiler.enable()

    def finish(self) -> None:
        self.done = True
        if self.kind == "pyinstrument":
            self.profiler.stop()
            text = self.profiler.output_text(unicode=False, color=False, show_all=False)
        else:
            import io
            import pstats

            self.profiler.disable()
            buf = io.StringIO()
            pstats.Stats(self.profiler, stream=buf).sort_stats("cumulative").print_stats(40)
            text = buf.getvalue()
        header = (
            f"profiler={self.kind} pid={os.getpid()} calls={self.calls} "
            f"apply_seconds={self.apply_seconds:.3f}\n"
        )
        Path(self.out_file).write_text(header + text)


def init_profiled(model_dir: str, conf: Mapping[str, Any]) -> ProfiledModel:
    from spark_ray_udf import init_keras

    return ProfiledModel(init_keras(model_dir, conf), conf)


def apply_profiled(model: ProfiledModel, x: np.ndarray) -> np.ndarray:
    if not model.started:
        model.start()
    elif not model.done and os.path.exists(model.stop_file):
        model.finish()
    start = time.perf_counter()
    out = mlp_classes(model.model, x)
    model.apply_seconds += time.perf_counter() - start
    model.calls += 1
    return out
