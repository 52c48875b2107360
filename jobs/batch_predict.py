"""Serve the stored Keras model from Ray actors as a SQL function and score the test split.

Needs the tables written by ``jobs/train_mnist.py``. The job

1. registers ``<data-dir>/tables/mnist_model`` as the SQL function ``model_predict`` (the
   built-in ``init_keras`` loads ``model.keras`` in each of 2 Ray actors; ``predict_class``
   returns the argmax class of each row);
2. runs ``select id, label, model_predict(image) as predicted from mnist_test`` and overwrites
   the Delta table ``<data-dir>/tables/mnist_predictions`` with the result (timed: rows/s);
3. computes the accuracy with Spark SQL, shows the DataFrame form ``df.select(model("image"))``
   once, and closes the model (its actors stop).

It exits with status 1 when the accuracy is below 0.9. Run from the repository root::

    .venv/bin/python jobs/batch_predict.py --data-dir demo_data
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `jobs` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._common import Tables, parse_args, setup_logging, spark_and_ray
from spark_ray_udf import init_keras, register_ray_model

log = logging.getLogger("jobs.batch_predict")

MIN_ACCURACY = 0.9


def predict_class(model: Any, images: np.ndarray) -> np.ndarray:
    """``apply_func``: the most likely digit of each row of ``images`` (rows x 784 float32)."""
    return np.asarray(model.predict_on_batch(images)).argmax(axis=1).astype(np.int32)


def main() -> int:
    args = parse_args("Score the MNIST test split with the stored model, served by Ray actors.")
    setup_logging()
    tables = Tables.under(args.data_dir)
    missing = [t for t in (tables.mnist, tables.model) if not (Path(t) / "_delta_log").is_dir()]
    if missing:
        print(
            f"batch_predict: no Delta table at {missing}; run jobs/train_mnist.py --data-dir "
            f"{args.data_dir} first",
            file=sys.stderr,
        )
        return 2
    with spark_and_ray(
        "batch_predict", args.data_dir, cores=args.cores, ray_address=args.ray_address
    ) as spark:
        test = spark.read.format("delta").load(tables.mnist).where("split = 'test'")
        test.createOrReplaceTempView("mnist_test")
        with register_ray_model(
            spark,
            tables.model,
            "model_predict",
            init_keras,
            predict_class,
            return_type="int",
            num_actors=2,
        ) as model:
            loads = ", ".join(f"pid {a.pid} in {a.load_seconds:.2f}s" for a in model.actors)
            log.info("registered %r; model loaded by %s", model, loads)

            start = time.perf_counter()
            (
                spark.sql("select id, label, model_predict(image) as predicted from mnist_test")
                .write.format("delta")
                .mode("overwrite")
                .option("overwriteSchema", "true")
                .save(tables.predictions)
            )
            seconds = time.perf_counter() - start

            row = spark.sql(
                "select count(*) as n, avg(cast(predicted = label as double)) as accuracy "
                f"from delta.`{tables.predictions}`"
            ).first()
            rows = int(row["n"]) if row else 0
            accuracy = float(row["accuracy"] or 0.0) if row else 0.0

            log.info("the same function through the DataFrame API, df.select(model('image')):")
            test.select("id", "label", model("image").alias("predicted")).orderBy("id").show(5)

    print(
        f"batch_predict: accuracy {accuracy:.4f} on {rows} test rows; predict+write took "
        f"{seconds:.2f}s ({rows / seconds:.0f} rows/s) -> {tables.predictions}"
    )
    if accuracy < MIN_ACCURACY:
        print(f"batch_predict: accuracy {accuracy:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
