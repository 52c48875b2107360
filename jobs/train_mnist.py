"""Build an MNIST-like Delta table from scikit-learn's digits, train a Keras model on Ray, store it.

1. ``sklearn.datasets.load_digits`` (1797 8x8 images shipped inside scikit-learn, nothing is
   downloaded) is upsampled bilinearly to 28x28 (784 float32 pixels in [0, 1]), split 80/20 with
   a fixed seed, and written to the Delta table ``<data-dir>/tables/mnist``
   (``id bigint, image array<float>, label int, split string``).
2. The train split goes to Ray as one Arrow table (``df.toArrow()``, ``ray.put``); a Ray task
   trains a 784-512-10 dense network with fixed seeds and saves it as ``model.keras``.
3. ``save_model`` stores that folder in the Delta table ``<data-dir>/tables/mnist_model``.

Run from the repository root (then ``jobs/batch_predict.py`` serves the model)::

    .venv/bin/python jobs/train_mnist.py --data-dir demo_data
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

if __package__ in (None, ""):  # run as a script: make the `jobs` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._common import Tables, parse_args, setup_logging, spark_and_ray
from spark_ray_udf import save_model

log = logging.getLogger("jobs.train_mnist")

SEED = 42
SIDE = 28
TEST_FRACTION = 0.2
EPOCHS = 8
BATCH_SIZE = 32
MNIST_SCHEMA = "id bigint, image array<float>, label int, split string"


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of 1-D linear interpolation with pixel centres aligned.

    >>> interpolation_matrix(4, 2).sum(axis=1).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1 - frac
    w[np.arange(n_out), hi] += frac
    return w


def digits_as_mnist(side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits upsampled to ``side`` x ``side``: (images (n, side*side) float32
    in [0, 1], labels (n,) int32)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images / 16.0  # (n, 8, 8), values 0..16
    w = interpolation_matrix(side, small.shape[1])
    big = np.einsum("ij,njk,lk->nil", w, small, w)  # bilinear: W @ img @ W.T for every image
    images = np.clip(big, 0.0, 1.0).astype(np.float32).reshape(len(big), side * side)
    return images, digits.target.astype(np.int32)


def mnist_table(images: np.ndarray, labels: np.ndarray, *, seed: int = SEED) -> pa.Table:
    """An Arrow table with the ``MNIST_SCHEMA`` columns and a fixed-seed train/test split."""
    n, width = images.shape
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[: int(round(n * TEST_FRACTION))]] = "test"
    image_col = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)),
        pa.array(images.reshape(-1), type=pa.float32()),
    )
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "image": image_col,
            "label": pa.array(labels, type=pa.int32()),
            "split": pa.array(split, type=pa.string()),
        }
    )


@ray.remote(num_cpus=1)
class KerasTrainer:
    """The 784-512-10 network, trained on Ray one epoch per call so the driver can show
    progress; :meth:`save` writes ``model_dir/model.keras``."""

    def __init__(self, train: pa.Table, *, seed: int) -> None:
        import keras

        keras.utils.set_random_seed(seed)
        images = train.column("image").combine_chunks()
        self.x = images.flatten().to_numpy().reshape(len(images), -1).astype(np.float32)
        self.y = train.column("label").to_numpy()
        self.model = keras.Sequential(
            [
                keras.Input(shape=(self.x.shape[1],)),
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        self.model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )

    def rows(self) -> int:
        return len(self.x)

    def epoch(self) -> dict[str, float]:
        start = time.perf_counter()
        history = self.model.fit(
            self.x, self.y, epochs=1, batch_size=BATCH_SIZE, shuffle=True, verbose=0
        )
        return {
            "seconds": time.perf_counter() - start,
            "loss": float(history.history["loss"][-1]),
            "accuracy": float(history.history["accuracy"][-1]),
        }

    def save(self) -> bytes:
        """The saved ``model.keras`` file's bytes (this actor may run on another machine than
        the driver, so it cannot write into the driver's folder)."""
        with tempfile.TemporaryDirectory(prefix="mnist-model-") as tmp:
            self.model.save(str(Path(tmp) / "model.keras"))
            return (Path(tmp) / "model.keras").read_bytes()


def train_keras(train: Any, model_dir: str, *, seed: int, epochs: int) -> dict[str, Any]:
    """Train on Ray, logging each epoch (loss, accuracy, seconds) as it ends; save the model
    into ``model_dir`` and return the final metrics."""
    trainer = KerasTrainer.remote(train, seed=seed)
    try:
        last: dict[str, float] = {}
        total = 0.0
        for n in range(1, epochs + 1):
            last = ray.get(trainer.epoch.remote(), timeout=600)
            total += last["seconds"]
            log.info(
                "epoch %d/%d: loss %.4f, accuracy %.4f (%.1fs)",
                n, epochs, last["loss"], last["accuracy"], last["seconds"],
            )
        saved = ray.get(trainer.save.remote(), timeout=600)
        rows = ray.get(trainer.rows.remote(), timeout=60)
        (Path(model_dir) / "model.keras").write_bytes(saved)
    finally:
        ray.kill(trainer)
    return {
        "rows": rows,
        "epochs": epochs,
        "seconds": round(total, 2),
        "loss": round(last.get("loss", float("nan")), 4),
        "accuracy": round(last.get("accuracy", float("nan")), 4),
    }


def main() -> int:
    args = parse_args("Train a Keras digit classifier on Ray and store it in Delta.", epochs=EPOCHS)
    setup_logging()
    tables = Tables.under(args.data_dir)
    started = time.perf_counter()
    with spark_and_ray(
        "train_mnist", args.data_dir, cores=args.cores, ray_address=args.ray_address
    ) as spark:
        images, labels = digits_as_mnist()
        table = mnist_table(images, labels)
        (
            spark.createDataFrame(table, schema=MNIST_SCHEMA)
            .write.format("delta")
            .mode("overwrite")
            .option("overwriteSchema", "true")
            .save(tables.mnist)
        )
        mnist = spark.read.format("delta").load(tables.mnist)
        counts = dict(mnist.groupBy("split").count().collect())
        log.info("wrote %s (%s): %s rows", tables.mnist, mnist.schema.simpleString(), counts)

        train = mnist.where("split = 'train'").select("image", "label").orderBy("id").toArrow()
        train_ref = ray.put(train)
        with tempfile.TemporaryDirectory(prefix="mnist-model-") as model_dir:
            # the trainer returns the file's bytes: it may run on another node
            metrics = train_keras(train_ref, model_dir, seed=SEED, epochs=args.epochs)
            log.info("trained on Ray: %s", metrics)
            version = save_model(spark, model_dir, tables.model)
    print(
        f"train_mnist: model saved to {tables.model} (Delta version {version}); train accuracy "
        f"{metrics['accuracy']:.4f} after {metrics['epochs']} epochs; job took "
        f"{time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
