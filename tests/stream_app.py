"""A streaming driver run as its own process by tests/test_streaming.py (the kill-and-restart test).

Reads a Delta source one file per micro-batch, calls the registered SQL function over a
streaming temp view, writes to a Delta sink with a checkpoint, and stops when the source is
drained (``availableNow``). Each model call sleeps, so a kill lands inside a micro-batch.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from spark_ray_udf import register_ray_model
from spark_ray_udf.testing import LinearModel, init_linear, local_spark


def slow_apply(model: LinearModel, x: np.ndarray) -> np.ndarray:
    time.sleep(0.5)
    return model.predict(x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", required=True)
    p.add_argument("--sink", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model-table", required=True)
    p.add_argument("--warehouse", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spark = local_spark("stream-app", warehouse_dir=args.warehouse)
    conf: Mapping[str, Any] = {}
    model = register_ray_model(
        spark, args.model_table, "model_predict", init_linear, slow_apply,
        return_type="bigint", num_actors=1, conf=conf,
    )
    stream = spark.readStream.format("delta").option("maxFilesPerTrigger", 1).load(args.source)
    stream.createOrReplaceTempView("stream")
    query = (
        spark.sql("select id, model_predict(features) as predicted from stream")
        .writeStream.format("delta")
        .option("checkpointLocation", args.checkpoint)
        .trigger(availableNow=True)
        .start(args.sink)
    )
    query.awaitTermination()
    model.close()
    spark.stop()
    print("STREAM-DONE", flush=True)


if __name__ == "__main__":
    main()
