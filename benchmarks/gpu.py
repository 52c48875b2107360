"""``make bench-gpu``: S1 (the digits MLP) and S6 (all-MiniLM-L6-v2) with the model on a GPU.

    .venv/bin/python benchmarks/gpu.py                 # needs an NVIDIA GPU (nvidia-smi); < 5 min
    .venv/bin/python benchmarks/gpu.py --cpu --quick   # the same code on CPU: a smoke test

Spark's executors stay on the CPU (``local[--cores]``); two contenders per model:

* (d) ``predict_batch_udf``: every Spark Python worker loads the model onto the GPU;
* (e) spark-ray-udf: ``--actors`` Ray actors hold it there
  (``actor_options={"num_gpus": 1 / actors}``), the workers only ship Arrow batches.

Measured: median rows/s, the GPU's memory (``nvidia-smi``, sampled every 0.25 s, above what
was in use before the run), host memory (USS of this run's processes, ``benchmarks/memory.py``)
and that (e) answers what (d) answers. The MLP runs through Keras 3 on torch
(``benchmarks/keras_torch.py``: PyPI's TensorFlow here is CPU-only). Every round starts from
fresh Spark Python workers, so (d)'s models leave the GPU between contenders.

A GPU run writes ``docs/benchmarks-gpu.md``; ``--cpu`` hides any GPU (``CUDA_VISIBLE_DEVICES=""``,
no ``num_gpus``) and writes ``bench_data/benchmarks-gpu-cpu.md`` unless ``--out`` says otherwise,
so a CPU stand-in never replaces GPU figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.gpu")

NO_GPU = ("benchmarks/gpu.py: no NVIDIA GPU here (nvidia-smi {why}). Run it on a machine with one, "
          "or pass --cpu to run the same contenders on the CPU (a smoke test, no GPU figures).")


# --- nvidia-smi ------------------------------------------------------------------------------------


def parse_gpus(text: str) -> list[tuple[str, int, int]]:
    """``(name, used MiB, total MiB)`` per GPU from
    ``nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader,nounits``.

    >>> parse_gpus("NVIDIA H200, 1024, 143771\\nNVIDIA H200, 0, 143771\\n")
    [('NVIDIA H200', 1024, 143771), ('NVIDIA H200', 0, 143771)]
    >>> parse_gpus("")
    []
    >>> parse_gpus("NVIDIA H200, [N/A], 143771")
    Traceback (most recent call last):
    ...
    ValueError: nvidia-smi line 1 is not 'name, used MiB, total MiB': 'NVIDIA H200, [N/A], 143771'
    """
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rsplit(",", 2)]
        try:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        except (IndexError, ValueError):
            raise ValueError(f"nvidia-smi line {i} is not 'name, used MiB, total MiB': {line!r}") from None
    return out


def query_gpus(timeout_s: float = 10.0) -> list[tuple[str, int, int]]:
    """The GPUs ``nvidia-smi`` sees (``[]`` when it is missing or finds none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        res = subprocess.run(
            [exe, "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("nvidia-smi did not answer within %.0f s", timeout_s)
        return []
    return parse_gpus(res.stdout) if res.returncode == 0 else []


def gpu_problem() -> str | None:
    """None when a GPU is usable, else the reason (for :data:`NO_GPU`)."""
    if shutil.which("nvidia-smi") is None:
        return "is not installed"
    if not query_gpus():
        return "lists no GPU"
    return None


class GpuSampler:
    """Samples the GPUs' used memory (MiB, summed over GPUs) every ``interval_s`` while open."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._sample()

    def _sample(self) -> None:
        gpus = query_gpus()
        if gpus:
            self.samples.append(sum(used for _, used, _ in gpus))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def peak_mib(self) -> int | None:
        return max(self.samples) if self.samples else None


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One contender on one model."""

    model: str
    key: str
    label: str
    rates: list[float]
    host_peak: int
    gpu_peak_mib: int | None  # peak while it ran (main(): minus the baseline); None without a GPU
    check: str
    notes: list[str] = field(default_factory=list)

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


def _gpu_wrapped(fn: Callable[[], Any], peaks: list[int], on: bool) -> Callable[[], Any]:
    def run() -> Any:
        if not on:
            return fn()
        with GpuSampler() as g:
            out = fn()
        if g.peak_mib is not None:
            peaks.append(g.peak_mib)
        return out

    return run


def _measure_one(key: str, label: str, run: Callable[[], Any], warm: Callable[[], Any], cats: tuple[str, ...],
                 *, rounds: int, sampler: Any, gpu: bool) -> tuple[Any, int | None]:
    from benchmarks.harness import Contender, measure

    peaks: list[int] = []
    c = Contender(key, label, _gpu_wrapped(run, peaks, gpu), cats, warm=_gpu_wrapped(warm, peaks, gpu))
    res = measure([c], rounds=rounds, sampler=sampler, cold_rounds=True)[key]
    return res, (max(peaks) if peaks else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="no GPU: the same contenders on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (smoke test)")
    parser.add_argument("--only", default="S1,S6", help="S1, S6 or both")
    parser.add_argument("--actors", type=int, default=2, help="spark-ray-udf actors (sharing the GPU)")
    parser.add_argument("--cores", type=int, default=min(8, os.cpu_count() or 2), help="Spark local[N]")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--data-dir", default=str(ROOT / "bench_data"))
    parser.add_argument("--out", default=None, help="the Markdown report (see the module doc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("py4j", "ray", "tensorflow", "absl", "matplotlib", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.cpu:
        why = gpu_problem()
        if why:
            print(NO_GPU.format(why=why), file=sys.stderr)
            return 2
    from benchmarks import minilm

    missing = minilm.available()
    if missing:
        print(f"benchmarks/gpu.py: {missing}", file=sys.stderr)
        return 2
    wanted = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    out = Path(args.out) if args.out else (
        Path(args.data_dir) / "benchmarks-gpu-cpu.md" if args.cpu else ROOT / "docs" / "benchmarks-gpu.md")
    from benchmarks.run import _environment

    _environment()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before Ray and Spark start: nothing sees a GPU
    gpus = [] if args.cpu else query_gpus()
    baseline = sum(u for _, u, _ in gpus) if gpus else None
    started = time.perf_counter()
    rows = _run(args, wanted, gpu=not args.cpu)
    for r in rows:  # above what was in use before the run
        if r.gpu_peak_mib is not None and baseline is not None:
            r.gpu_peak_mib = max(0, r.gpu_peak_mib - baseline)
    elapsed = time.perf_counter() - started
    text = render(rows, gpus=gpus, baseline_mib=baseline, args=args, elapsed_s=elapsed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"benchmarks/gpu.py ({elapsed / 60:.1f} min) -> {out}")
    for r in rows:
        gpu_txt = f", GPU +{r.gpu_peak_mib / 1024:.2f} GiB" if r.gpu_peak_mib is not None else ""
        print(f"  {r.model} {r.label}: {r.median_rate:,.0f} rows/s, host {r.host_peak / 2**30:.2f} GiB{gpu_txt}; {r.check}")
    bad = [r for r in rows if r.check.startswith("**")]
    return 1 if bad else 0


def _run(args: argparse.Namespace, wanted: set[str], *, gpu: bool) -> list[Row]:
    import ray

    from benchmarks import keras_torch, minilm
    from benchmarks.harness import SPARK_ONLY, WITH_RAY
    from benchmarks.memory import Sampler
    from benchmarks.real import collect_embeddings, embed_pass
    from benchmarks.real import prepare as prepare_s6
    from benchmarks.scenarios import Bench, Config, prepare_mlp, spark_pass
    from spark_ray_udf import register_ray_model
    from spark_ray_udf._ray import ensure_ray

    quick = args.quick
    cfg = Config.make(quick=True, real_idle=False, actors=args.actors, in_flight=2)
    cfg = dataclasses.replace(
        cfg, quick=quick, s1_rows=4_000 if quick else 200_000, s1_files=2 if quick else args.cores,
        s6_rows=64 if quick else 20_000, s6_files=min(4, args.cores) if quick else args.cores,
        s6_min_split=8 if quick else 512,
    )
    rounds = args.rounds or (1 if quick else 2)
    device = "cuda" if gpu else "cpu"
    actors = f"{args.actors} actor{'' if args.actors == 1 else 's'}"
    options = {"num_gpus": 1.0 / args.actors} if gpu else {}
    sampler = Sampler().start()
    b = Bench(root=ROOT, data=Path(args.data_dir), cfg=cfg, sampler=sampler)
    b.data.mkdir(parents=True, exist_ok=True)
    ray_was_up = ray.is_initialized()
    rows: list[Row] = []
    try:
        ensure_ray()
        b.start_spark(args.cores)
        if "S1" in wanted:
            paths = prepare_mlp(b)
            df = b.spark.read.parquet(paths["parquet"])
            warm_df = df  # a full pass: it must start every Python worker (one per file)
            from pyspark.ml.functions import predict_batch_udf
            from pyspark.sql.types import LongType

            from benchmarks.models import N_PIXELS
            from benchmarks.scenarios import ARROW_BATCH

            udf_d = predict_batch_udf(keras_torch.pbu_factory(paths["keras"]), return_type=LongType(),
                                      batch_size=ARROW_BATCH, input_tensor_shapes=[[N_PIXELS]])
            res_d, g_d = _measure_one("d", f"(d) predict_batch_udf, model on {device} in every worker",
                                      lambda: spark_pass(df, udf_d("features"), exact=True),
                                      lambda: spark_pass(warm_df, udf_d("features"), exact=True),
                                      SPARK_ONLY, rounds=rounds, sampler=sampler, gpu=gpu)
            model = register_ray_model(b.spark, paths["table"], "gpu_mlp", keras_torch.init_mlp,
                                       keras_torch.apply_mlp, return_type="bigint", num_actors=args.actors,
                                       actor_options=options, conf={"threads": 1})
            b.pools["gpu_mlp"] = model
            res_e, g_e = _measure_one("e", f"(e) spark-ray-udf, {actors} on {device}",
                                      lambda: spark_pass(df, model("features"), exact=True),
                                      lambda: spark_pass(warm_df, model("features"), exact=True),
                                      WITH_RAY, rounds=rounds, sampler=sampler, gpu=gpu)
            b.close_pools()
            same = res_e.checksum == res_d.checksum
            check = "checksum = (d)'s" if same else f"**checksum {res_e.checksum} != (d)'s {res_d.checksum}**"
            rows += [Row("S1 MLP", "d", res_d.label, res_d.rates, res_d.peak()[0], g_d, "reference"),
                     Row("S1 MLP", "e", res_e.label, res_e.rates, res_e.peak()[0], g_e, check)]
        if "S6" in wanted:
            paths6 = prepare_s6(b)
            df = b.spark.read.parquet(paths6["parquet"])
            warm_df = b.spark.read.parquet(paths6["warm"])
            from pyspark.ml.functions import predict_batch_udf
            from pyspark.sql.types import ArrayType, FloatType

            from benchmarks.real import PBU_BATCH

            udf_d = predict_batch_udf(minilm.pbu_factory(paths6["folder"], device=device),
                                      return_type=ArrayType(FloatType()), batch_size=PBU_BATCH)
            res_d, g_d = _measure_one("d", f"(d) predict_batch_udf, model on {device} in every worker",
                                      lambda: embed_pass(df, udf_d("text")), lambda: embed_pass(warm_df, udf_d("text")),
                                      SPARK_ONLY, rounds=rounds, sampler=sampler, gpu=gpu)
            ref = collect_embeddings(df, udf_d("text"))
            model = register_ray_model(b.spark, paths6["table"], "gpu_minilm", minilm.init_minilm,
                                       minilm.apply_minilm, return_type="array<float>", num_actors=args.actors,
                                       actor_options=options, conf={"threads": 1, "device": device},
                                       min_split_rows=cfg.s6_min_split)
            b.pools["gpu_minilm"] = model
            res_e, g_e = _measure_one("e", f"(e) spark-ray-udf, {actors} on {device}",
                                      lambda: embed_pass(df, model("text")), lambda: embed_pass(warm_df, model("text")),
                                      WITH_RAY, rounds=rounds, sampler=sampler, gpu=gpu)
            diff = minilm.max_abs_diff(collect_embeddings(df, model("text")), ref)
            b.close_pools()
            tol = 1e-4 if gpu else 1e-5  # GPU kernels depend on the batch's shape
            check = (f"embeddings within {diff:.1e} of (d)'s" if diff <= tol
                     else f"**embeddings differ from (d)'s by {diff:.1e} (> {tol:g})**")
            rows += [Row("S6 MiniLM", "d", res_d.label, res_d.rates, res_d.peak()[0], g_d, "reference"),
                     Row("S6 MiniLM", "e", res_e.label, res_e.rates, res_e.peak()[0], g_e, check)]
    finally:
        for what, stop in (("the actor pools", b.close_pools), ("the memory sampler", sampler.stop),
                           ("Spark", lambda: b.spark.stop() if b.spark is not None else None),
                           ("Ray", lambda: ray.shutdown() if not ray_was_up and ray.is_initialized() else None)):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - still write what was measured
                log.warning("stopping %s failed: %r", what, exc)
    return rows


def render(rows: list[Row], *, gpus: list[tuple[str, int, int]], baseline_mib: int | None,
           args: argparse.Namespace, elapsed_s: float) -> str:
    """The Markdown page for ``rows``.

    >>> ns = argparse.Namespace(cpu=True, quick=True, cores=2, actors=2)
    >>> text = render([Row("S1 MLP", "d", "(d) x", [10.0], 2**30, None, "reference")], gpus=[],
    ...               baseline_mib=None, args=ns, elapsed_s=60)
    >>> "not GPU figures" in text and "| S1 MLP | (d) x | 10 |" in text
    True
    """
    if args.cpu:
        where = ("**CPU stand-in (`--cpu`): no GPU was used, so these are not GPU figures** — the "
                 "run only shows that the script works.")
    else:
        names = ", ".join(sorted({n for n, _, _ in gpus})) or "?"
        where = (f"{len(gpus)} GPU(s): {names}, {gpus[0][2] / 1024:.0f} GiB each; "
                 f"{baseline_mib} MiB in use before the run." if gpus else "GPU: unknown")
    lines = [
        "# GPU benchmark: spark-ray-udf against predict_batch_udf with the model on the GPU",
        "",
        f"Written by `benchmarks/gpu.py`{' --cpu' if args.cpu else ''}{' --quick' if args.quick else ''} "
        f"in {elapsed_s / 60:.1f} min on {platform.machine()}, {os.cpu_count()} cores, Spark "
        f"`local[{args.cores}]` (executors on the CPU), spark-ray-udf with {args.actors} "
        f"actor{'' if args.actors == 1 else 's'}. {where}",
        "",
        "Every round of every contender starts from fresh Spark Python workers and a warm-up pass. "
        "GPU memory: the peak of `nvidia-smi`'s used memory (all GPUs) while the contender ran, minus "
        "what was in use before; host memory: the peak USS of the run's processes "
        "(`benchmarks/memory.py`), Ray's processes included for (e).",
        "",
        "| model | contender | median rows/s | runs (rows/s) | vs (d) | host peak (GiB) | GPU peak (GiB) | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {r.model: r.median_rate for r in rows if r.key == "d"}
    for r in rows:
        vs = f"{r.median_rate / ref[r.model]:.2f}x" if ref.get(r.model) else ""
        gpu_txt = "n/a" if r.gpu_peak_mib is None else f"{r.gpu_peak_mib / 1024:.2f}"
        lines.append(f"| {r.model} | {r.label} | {r.median_rate:,.0f} | "
                     f"{' / '.join(f'{x:,.0f}' for x in r.rates)} | {vs} | {r.host_peak / 2**30:.2f} | "
                     f"{gpu_txt} | {r.check} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
