"""The S1 digits MLP (``mlp.keras``) through Keras 3 on its torch backend, for ``gpu.py``.

PyPI's ``tensorflow-cpu`` (the ``tensorflow`` extra) cannot use a GPU, while PyPI's torch wheel
(the ``bench`` extra) can: Keras 3 reads the same ``.keras`` file on either backend, so the GPU
script runs the MLP on torch, on the GPU when one is visible (``CUDA_VISIBLE_DEVICES``) and on
the CPU otherwise. Imported by Spark's Python workers and the Ray actors; the backend is chosen
in the loading process before Keras is imported there (a process that already imported Keras
with another backend is refused, see :func:`load`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks import models


def load(path: str, *, threads: int = 1) -> Any:
    """``keras.models.load_model(path)`` on the torch backend, torch on ``threads`` threads."""
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != "torch":
        raise RuntimeError("keras was imported with another backend in this process; "
                           "set KERAS_BACKEND=torch before it starts")
    os.environ["KERAS_BACKEND"] = "torch"
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    import keras

    return keras.models.load_model(path, compile=False)


def device() -> str:
    """Where this process's Keras-on-torch runs: ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init_mlp(model_dir: str, conf: Mapping[str, Any]) -> Any:
    """``init_func`` for spark-ray-udf: the ``.keras`` file in the saved folder."""
    return load(os.path.join(model_dir, models.MLP_FILE), threads=int(conf.get("threads", 1)))


def apply_mlp(model: Any, x: np.ndarray) -> np.ndarray:
    """``apply_func``: the class of each row (bigint)."""
    return models.mlp_classes(model, x.astype(np.float32, copy=False))


def pbu_factory(path: str, *, threads: int = 1):  # noqa: ANN201
    """(d) ``make_predict_fn`` for ``predict_batch_udf``: the model in every Python worker."""

    def make_predict_fn():  # noqa: ANN202
        model = load(path, threads=threads)

        def predict(x: np.ndarray) -> np.ndarray:
            return apply_mlp(model, x)

        return predict

    return make_predict_fn
