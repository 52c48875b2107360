"""Built-in ``init_func`` / ``apply_func`` pairs for common frameworks.

Framework imports stay inside the functions, so ``import spark_ray_udf`` works without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spark_ray_udf.errors import MissingDependencyError, ModelInitError


def _require_tensorflow() -> Any:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise MissingDependencyError(
            "init_keras needs TensorFlow: pip install 'spark-ray-udf[tensorflow]'"
        ) from exc
    return tf


def find_keras_model(model_dir: str, conf: Mapping[str, Any] | None = None) -> Path:
    """The Keras model inside ``model_dir``: ``conf["model_file"]`` if given, else the only
    ``.keras`` / ``.h5`` file, else the folder itself when it is a SavedModel.

    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp(); _ = (pathlib.Path(d) / "m.keras").write_bytes(b"")
    >>> find_keras_model(d).name
    'm.keras'
    """
    root = Path(model_dir)
    conf = conf or {}
    if "model_file" in conf:
        candidate = root / str(conf["model_file"])
        if not candidate.exists():
            raise ModelInitError(f"{model_dir}: conf['model_file'] {conf['model_file']!r} does not exist")
        return candidate
    files = sorted(p for p in root.rglob("*") if p.suffix in (".keras", ".h5") and p.is_file())
    if len(files) == 1:
        return files[0]
    if len(files) > 1:
        names = [str(p.relative_to(root)) for p in files]
        raise ModelInitError(
            f"{model_dir}: several Keras files {names}; pick one with conf={{'model_file': ...}}"
        )
    if (root / "saved_model.pb").exists():
        return root
    raise ModelInitError(
        f"{model_dir}: no .keras/.h5 file and no saved_model.pb; save the model with "
        "model.save('model.keras') or tf.saved_model.save(model, dir)"
    )


def init_keras(model_dir: str, conf: Mapping[str, Any]) -> Any:
    """Load a Keras / TensorFlow model saved in ``model_dir`` (Byzer's ``init_tf``).

    A ``.keras``/``.h5`` file loads with ``keras.models.load_model``; a SavedModel folder with
    ``tf.saved_model.load`` (call it through :func:`apply_keras`, which picks its serving
    signature).
    """
    path = find_keras_model(model_dir, conf)  # before the slow TensorFlow import: fail fast
    tf = _require_tensorflow()
    if path.is_dir():
        return tf.saved_model.load(str(path))
    return tf.keras.models.load_model(str(path), compile=False)


def apply_keras(model: Any, *columns: np.ndarray) -> np.ndarray:
    """Predict a batch with a model from :func:`init_keras`; returns the raw output array.

    Use ``return_type="array<float>"`` for a 2-D output, or wrap it (for example
    ``lambda m, x: apply_keras(m, x).argmax(axis=1)``) for one value per row.
    """
    inputs = columns[0] if len(columns) == 1 else list(columns)
    if hasattr(model, "predict_on_batch"):
        out = model.predict_on_batch(inputs)
    else:
        fn = model.signatures["serving_default"]
        result = fn(*[np.asarray(c) for c in columns])
        out = next(iter(result.values()))
    return np.asarray(out)
