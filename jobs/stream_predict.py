"""Score a stream with the stored model, and swap to a new model version while it runs.

Needs the tables written by ``jobs/train_mnist.py``. The job

1. registers ``<data-dir>/tables/mnist_model`` as ``model_predict`` with ``with_version=True``
   (each row says which model version answered);
2. starts a Structured Streaming query that reads the Delta table
   ``<data-dir>/tables/mnist_stream_source`` and runs, over a streaming temp view,
   ``select id, label, model_predict(image) as p from stream`` into the Delta sink
   ``<data-dir>/tables/mnist_stream_predictions`` (checkpoint under ``<data-dir>/checkpoints``);
3. appends the test split to the source in chunks from a feeder thread; half-way it commits a
   new model version (the same model saved again, as a retraining job would) and calls
   ``model.reload()``: the stream keeps running, no batch fails;
4. checks that every source row was predicted exactly once, prints rows per model version and
   the accuracy, then shows the ``foreachBatch`` form (idempotent Delta writes keyed by the
   batch id) over the same source.

Exits with status 1 if a row is missing or duplicated. Run from the repository root::

    .venv/bin/python jobs/stream_predict.py --data-dir demo_data
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `jobs` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._common import Tables, parse_args, setup_logging, spark_and_ray
from jobs.batch_predict import predict_class
from spark_ray_udf import init_keras, load_model, register_ray_model, save_model

log = logging.getLogger("jobs.stream_predict")

CHUNKS = 6
CHUNK_PAUSE_S = 1.0


def main() -> int:
    args = parse_args("Score a Delta stream with the stored model; swap versions mid-stream.")
    setup_logging()
    tables = Tables.under(args.data_dir)
    if not (Path(tables.model) / "_delta_log").is_dir():
        print(f"stream_predict: run jobs/train_mnist.py --data-dir {args.data_dir} first", file=sys.stderr)
        return 2
    source = str(tables.root / "mnist_stream_source")
    sink = str(tables.root / "mnist_stream_predictions")
    sink_fb = str(tables.root / "mnist_stream_predictions_foreach")
    checkpoints = args.data_dir.resolve() / "checkpoints"
    for path in (source, sink, sink_fb, str(checkpoints)):
        shutil.rmtree(path, ignore_errors=True)  # a fresh demo each run

    with spark_and_ray(
        "stream_predict", args.data_dir, cores=args.cores, ray_address=args.ray_address
    ) as spark:
        test = spark.read.format("delta").load(tables.mnist).where("split = 'test'").select(
            "id", "image", "label"
        )
        test.limit(0).write.format("delta").save(source)  # an empty source with the schema
        ids = [r.id for r in test.select("id").orderBy("id").collect()]
        chunks = [ids[i::CHUNKS] for i in range(CHUNKS)]

        with register_ray_model(
            spark, tables.model, "model_predict", init_keras, predict_class,
            return_type="int", num_actors=2, with_version=True,
        ) as model:
            first_version = model.version
            spark.readStream.format("delta").load(source).createOrReplaceTempView("stream")
            query = (
                spark.sql("select id, label, model_predict(image) as p from stream")
                .writeStream.format("delta")
                .option("checkpointLocation", str(checkpoints / "sql"))
                .trigger(processingTime="1 second")
                .start(sink)
            )
            swapped = threading.Event()

            def feed() -> None:
                for k, chunk in enumerate(chunks):
                    test.where(test.id.isin(chunk)).write.format("delta").mode("append").save(source)
                    log.info("fed chunk %d/%d (%d rows)", k + 1, CHUNKS, len(chunk))
                    if k == CHUNKS // 2 - 1:
                        swapped.wait(timeout=300)
                    time.sleep(CHUNK_PAUSE_S)

            feeder = threading.Thread(target=feed, name="feeder", daemon=True)
            feeder.start()
            _wait_rows(spark, sink, sum(len(c) for c in chunks[: CHUNKS // 2]), query)
            # A retraining job commits a new version; the running stream switches to it.
            with tempfile.TemporaryDirectory() as tmp:
                load_model(spark, tables.model, Path(tmp) / "model")
                new_version = save_model(spark, Path(tmp) / "model", tables.model)
            start = time.perf_counter()
            model.reload()
            log.info(
                "reloaded v%d -> v%d in %.2fs while the stream ran",
                first_version, new_version, time.perf_counter() - start,
            )
            swapped.set()
            feeder.join(timeout=600)
            _wait_rows(spark, sink, len(ids), query)
            query.stop()
            if query.exception() is not None:
                raise RuntimeError(f"the streaming query failed: {query.exception()}")

            summary = spark.sql(
                f"select p.model_version as version, count(*) as n, "
                f"avg(cast(p.prediction = label as double)) as accuracy "
                f"from delta.`{sink}` group by p.model_version order by version"
            ).collect()
            written = spark.read.format("delta").load(sink)
            total, distinct = written.count(), written.select("id").distinct().count()

            # The same function in a foreachBatch sink: idempotent appends keyed by batch id.
            def write_batch(batch_df: Any, batch_id: int) -> None:
                (
                    batch_df.selectExpr("id", "label", "model_predict(image) as p")
                    .write.format("delta").mode("append")
                    .option("txnAppId", "stream_predict_foreach").option("txnVersion", batch_id)
                    .save(sink_fb)
                )

            fb = (
                spark.readStream.format("delta").load(source).writeStream
                .foreachBatch(write_batch)
                .option("checkpointLocation", str(checkpoints / "foreach"))
                .trigger(availableNow=True)
                .start()
            )
            fb.awaitTermination(600)
            fb_rows = spark.read.format("delta").load(sink_fb).count()

    for row in summary:
        print(f"stream_predict: model v{row.version}: {row.n} rows, accuracy {row.accuracy:.4f}")
    print(
        f"stream_predict: {total} rows written for {len(ids)} source rows ({distinct} distinct ids); "
        f"foreachBatch variant wrote {fb_rows} rows"
    )
    if not total == distinct == len(ids) == fb_rows:
        print("stream_predict: rows missing or duplicated", file=sys.stderr)
        return 1
    return 0


def _wait_rows(spark: Any, sink: str, n: int, query: Any, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if query.exception() is not None:
            raise RuntimeError(f"the streaming query failed: {query.exception()}")
        if (Path(sink) / "_delta_log").is_dir() and spark.read.format("delta").load(sink).count() >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stream did not write {n} rows to {sink} in {timeout_s}s")
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
