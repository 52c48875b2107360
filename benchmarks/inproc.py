"""Contender (a): the model's own predict, in one process, on the whole array.

Runs as a child process (so its memory is measured apart from the driver) and serves a tiny
line protocol on stdin/stdout: it loads the model and the rows once, answers ``ready``, then for
every ``run`` line predicts all rows and prints one JSON line ``{"seconds", "checksum", "rows"}``;
``quit`` ends it. The checksum is ``sum(id * prediction)``, as in Spark.

    python -m benchmarks.inproc mlp <model.keras> <features.npy>
    python -m benchmarks.inproc embedding <model_dir> <ids.npy>
    python -m benchmarks.inproc minilm <model_dir> <sentences.npy>   # S6; also writes <sentences>.a.npy
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

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

    elif kind == "minilm":
        from benchmarks import minilm

        st = minilm.load(model_path, threads=int(os.environ.get("BENCH_TORCH_THREADS", "1")))
        minilm.encode(st, x[:8])  # first call: lazy initialisation, as every contender's warm-up

        def predict() -> np.ndarray:
            return minilm.encode(st, x)

    else:
        raise SystemExit(f"unknown model kind {kind!r}; expected 'mlp', 'embedding' or 'minilm'")
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
        if kind == "minilm":  # S6 compares every element with (a)'s
            np.save(Path(data_path).with_suffix(".a.npy"), pred)
        if pred.ndim == 2:  # embeddings: sum(id * sum of the row's values)
            checksum: float | int = float((ids.astype(np.float64) * pred.sum(axis=1, dtype=np.float64)).sum())
        elif pred.dtype.kind in "iu":
            checksum = int((ids * pred.astype(np.int64)).sum())
        else:
            checksum = float((ids.astype(np.float64) * pred).sum())
        print(json.dumps({"seconds": seconds, "checksum": checksum, "rows": len(pred)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
