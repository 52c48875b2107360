"""Serve the stored Keras model over HTTP from the same Ray actors that answer SQL.

Needs the tables written by ``jobs/train_mnist.py``. The job

1. registers ``<data-dir>/tables/mnist_model`` as the SQL function ``model_predict`` (2 Ray
   actors, each holding one copy of the model);
2. starts its HTTP door, ``model.serve()``: a Ray Serve ingress on 127.0.0.1 that forwards to
   those same actors (``POST /model_predict/predict`` with ``{"instances": [[784 floats]]}``);
3. predicts the first test row through SQL and through HTTP and prints both, side by side, with
   the model version each door reports; it exits with status 1 if they differ;
4. with ``--once`` (what ``make demo`` runs) it then closes the model; otherwise it keeps
   serving until Ctrl-C and prints a ``curl`` line to try.

Run from the repository root::

    .venv/bin/python jobs/serve_model.py --data-dir demo_data            # serve on :8000
    .venv/bin/python jobs/serve_model.py --data-dir demo_data --once     # one prediction, exit
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `jobs` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._common import Tables, setup_logging, spark_and_ray
from spark_ray_udf import init_keras, register_ray_model

log = logging.getLogger("jobs.serve_model")


def predict_class(model: Any, images: np.ndarray) -> np.ndarray:
    """``apply_func``: the most likely digit of each row of ``images`` (rows x 784 float32)."""
    return np.asarray(model.predict_on_batch(images)).argmax(axis=1).astype(np.int32)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _args() -> Any:
    import argparse

    parser = argparse.ArgumentParser(description="Serve the stored MNIST model over SQL and HTTP.")
    parser.add_argument("--data-dir", type=Path, default=Path("demo_data"))
    parser.add_argument("--cores", type=int, default=2, help="cores of the local Spark (default: 2)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: 8000; with --once a free one)"
    )
    parser.add_argument("--once", action="store_true", help="one prediction through each door, then exit")
    return parser.parse_args()


def main() -> int:
    args = _args()
    setup_logging()
    tables = Tables.under(args.data_dir)
    missing = [t for t in (tables.mnist, tables.model) if not (Path(t) / "_delta_log").is_dir()]
    if missing:
        print(
            f"serve_model: no Delta table at {missing}; run jobs/train_mnist.py --data-dir "
            f"{args.data_dir} first",
            file=sys.stderr,
        )
        return 2
    port = args.port if args.port is not None else (_free_port() if args.once else 8000)
    with spark_and_ray("serve_model", args.data_dir, cores=args.cores) as spark:
        test = spark.read.format("delta").load(tables.mnist).where("split = 'test'")
        test.createOrReplaceTempView("mnist_test")
        with register_ray_model(
            spark, tables.model, "model_predict", init_keras, predict_class,
            return_type="int", num_actors=2,
        ) as model:
            url = model.serve(host=args.host, port=port, input_types=["array<float>"])
            log.info("%r answers SQL and HTTP at %s", model, url)

            row = spark.sql(
                "select id, label, image, model_predict(image) as predicted "
                "from mnist_test order by id limit 1"
            ).first()
            if row is None:
                print("serve_model: the test split is empty", file=sys.stderr)
                return 2
            body = json.dumps({"instances": [list(row["image"])]}).encode()
            request = urllib.request.Request(
                f"{url}/predict", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            http_prediction = answer["predictions"][0]
            print(
                f"serve_model: test row id {row['id']} (label {row['label']}): "
                f"SQL model_predict(image) = {row['predicted']} (v{model.version}), "
                f"HTTP POST {url}/predict = {http_prediction} (v{answer['model_version']}); "
                f"same actors, pids {sorted(model.actor_pids())}"
            )
            if http_prediction != row["predicted"] or answer["model_version"] != model.version:
                print("serve_model: the HTTP and SQL predictions differ", file=sys.stderr)
                return 1
            if not args.once:
                print(
                    f"serve_model: serving; try  curl -s {url}  or  curl -s -H 'Content-Type: "
                    f"application/json' -d '{{\"instances\": [[0.0, ... 784 floats]]}}' "
                    f"{url}/predict ; Ctrl-C stops"
                )
                stop = threading.Event()
                signal.signal(signal.SIGINT, lambda *_: stop.set())
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                while not stop.wait(1.0):
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
