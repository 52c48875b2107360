"""Contender (a): the model's own predict, in one process, on the whole array.

Runs as a child process (so its memory is measured apart from the driver) and serves a tiny
line protocol on stdin/stdout: it loads the model and the rows once, answers ``ready``, then for
every ``run`` line predicts all rows and prints one JSON line ``{"seconds", "checksum", "rows"}``;
``quit`` ends it. The checksum is ``sum(id * prediction)``, as in Spark.

    python -m benchmarks.inproc mlp <model.keras> <features.npy>
    python -m benchmarks.inproc embedding <model_dir> <ids.npy>
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    kind, model_path, data_path = argv
    from benchmarks import models

    x = np.load(data_path)
    ids = np.arange(len(x), dtype=np.int64)
    if kind == "mlp":
        model = models.load_mlp(model_path)
        models.mlp_classes(model, x[:64])  # build the graph once, as every contender does

        def predict() -> np.ndarray:
            return models.mlp_classes(model, x)

    elif kind == "embedding":
        emb = models.init_embedding(model_path)

        def predict() -> np.ndarray:
            return emb.scores(x)

    else:
        raise SystemExit(f"unknown model kind {kind!r}; expected 'mlp' or 'embedding'")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "run":
            continue
        start = time.perf_counter()
        pred = predict()
        seconds = time.perf_counter() - start
        if pred.dtype.kind in "iu":
            checksum: float | int = int((ids * pred.astype(np.int64)).sum())
        else:
            checksum = float((ids.astype(np.float64) * pred).sum())
        print(json.dumps({"seconds": seconds, "checksum": checksum, "rows": len(pred)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
