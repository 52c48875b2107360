"""The five scenarios. Each returns a :class:`Scenario` that ``report.py`` turns into Markdown.

Contender keys, the same in every scenario where they apply:

* ``a``  the model's own predict, one process, whole array (the compute limit)
* ``b``  a no-op Arrow UDF over the same column (the Spark -> Python transport limit)
* ``bp`` the same no-op as a pandas UDF (what the pandas conversion adds)
* ``c``  a pandas iterator UDF with the model cached per Python worker
* ``d``  ``pyspark.ml.functions.predict_batch_udf``
* ``e``  spark-ray-udf (``register_ray_model``)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import models
from benchmarks.harness import (
    INPROC,
    SPARK_ONLY,
    WITH_RAY,
    Contender,
    InProcess,
    Pass,
    Result,
    check_against,
    measure,
)
from benchmarks.memory import Sampler, reap_idle_python_workers

log = logging.getLogger(__name__)

ARROW_BATCH = 10_000


# --- configuration and shared state ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int
    s1_rows: int
    s1_files: int
    s2_vocab: int
    s2_dim: int
    s2_rows: int
    s2_k: int
    s2_tasks: int
    s2_rounds: int
    s3_rows: int
    s3_batches: int
    s3_spacing_s: float
    s3_real_idle: bool
    s5_iterations: int
    actors: int
    in_flight: int
    s6_rows: int = 2_400
    s6_files: int = 4
    s6_rounds: int = 2
    s6_threads: int = 1
    s6_min_split: int = 128

    @classmethod
    def make(cls, *, quick: bool, real_idle: bool, actors: int, in_flight: int) -> Config:
        if quick:
            return cls(
                quick=True, rounds=1, s1_rows=20_000, s1_files=2, s2_vocab=262_144, s2_dim=128,
                s2_rows=40_000, s2_k=16, s2_tasks=4, s2_rounds=1, s3_rows=2_000, s3_batches=2,
                s3_spacing_s=75.0 if real_idle else 1.0, s3_real_idle=real_idle,
                s5_iterations=8, actors=actors, in_flight=in_flight,
                s6_rows=64, s6_files=4, s6_rounds=1, s6_min_split=8,
            )
        return cls(
            quick=False, rounds=3, s1_rows=200_000, s1_files=8, s2_vocab=2_097_152, s2_dim=128,
            s2_rows=400_000, s2_k=16, s2_tasks=4, s2_rounds=2, s3_rows=10_000, s3_batches=4,
            s3_spacing_s=75.0 if real_idle else 2.0, s3_real_idle=real_idle,
            s5_iterations=30, actors=actors, in_flight=in_flight,
        )


@dataclass
class Target:
    """One target: ``value`` against ``limit`` (in ``unit``), met when at or above it (at or
    below with ``lower_is_better``)."""

    name: str
    goal: str
    measured: str
    met: bool | None
    why: str = ""
    value: float | None = None
    limit: float | None = None
    unit: str = "x"
    lower_is_better: bool = False

    def margin(self) -> str:
        """By how much the target was met or missed, in its own unit.

        >>> Target("t", ">= 1.0x", "0.73x", False, value=0.73, limit=1.0).margin()
        'missed by 0.27x (27% short)'
        >>> Target("t", "<= 0.5x", "0.42x", True, value=0.42, limit=0.5, lower_is_better=True).margin()
        'met with 0.08x to spare (16% under the limit)'
        """
        if self.value is None or self.limit is None or self.met is None:
            return ""
        gap = abs(self.value - self.limit)
        amount = f"{gap:.2f}" if gap >= 0.01 else f"{gap:.2g}"
        rel = f"{gap / abs(self.limit):.0%}" if self.limit else ""
        if self.met:
            side = "under the limit" if self.lower_is_better else "over the goal"
            return f"met with {amount}{self.unit} to spare" + (f" ({rel} {side})" if rel else "")
        side = "over the limit" if self.lower_is_better else "short"
        return f"missed by {amount}{self.unit}" + (f" ({rel} {side})" if rel else "")


@dataclass
class Scenario:
    key: str
    title: str
    setup: list[str] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    reference: str | None = None
    targets: list[Target] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # numbers for the chart / the plan


@dataclass
class Bench:
    """What every scenario needs: the session, the sampler, paths and sizes."""

    root: Path  # the repository
    data: Path  # bench_data/
    cfg: Config
    sampler: Sampler
    spark: Any = None
    cores: int = 0
    conf: dict[str, str] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)

    def start_spark(self, cores: int, *, fresh: bool = False, conf: dict[str, str] | None = None) -> Any:
        """A session with ``local[cores]``; a new JVM when the core count or ``conf`` changes, or
        when ``fresh``."""
        from spark_ray_udf.testing import local_spark

        conf = dict(conf or {})
        if self.spark is not None and self.cores == cores and not fresh and conf == self.conf:
            return self.spark
        if self.spark is not None:
            log.info("restarting Spark with local[%d] in a fresh JVM", cores)
            self.spark.stop()
            from pyspark import SparkContext

            gateway = SparkContext._gateway
            if gateway is not None:  # a new JVM: no heap grown by earlier scenarios
                proc = getattr(gateway, "proc", None)  # the JVM this driver launched
                gateway.shutdown()
                SparkContext._gateway = None
                SparkContext._jvm = None
                if proc is not None:
                    try:
                        proc.stdin.close()  # PythonGatewayServer exits on EOF of its stdin
                        proc.wait(timeout=30)
                    except Exception:  # noqa: BLE001
                        proc.terminate()
                        proc.wait(timeout=30)
        self.spark = local_spark(
            "spark-ray-udf-bench",
            cores=cores,
            warehouse_dir=str(self.data / "warehouse"),
            conf={
                "spark.sql.execution.arrow.maxRecordsPerBatch": str(ARROW_BATCH),
                "spark.sql.files.openCostInBytes": str(1 << 30),  # one file = one partition
                "spark.python.worker.reuse": "true",
                # save_model writes 4 MB binary chunks; Parquet checks a page's size only after
                # 100 values by default, so it buffered (and compressed) ~400 MB pages and the
                # 2 GB driver heap ran out on the 1 GB model. Check after every value instead.
                "spark.hadoop.parquet.page.size.row.check.min": "1",
                **conf,
            },
        )
        self.cores = cores
        self.conf = conf
        return self.spark

    def close_pools(self) -> None:
        for name, pool in list(self.pools.items()):
            pool.close()
            del self.pools[name]


def _stamp_ok(stamp: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads(stamp.read_text()) == params
    except (OSError, ValueError):
        return False


# --- data and models (cached in bench_data/ across runs, keyed by their parameters) ----------------


def prepare_mlp(b: Bench) -> dict[str, Any]:
    from spark_ray_udf import save_model

    cfg = b.cfg
    d = b.data / f"s1_{cfg.s1_rows}"
    params = {"rows": cfg.s1_rows, "files": cfg.s1_files, "v": 2}
    model_dir = b.data / "models" / "mlp"
    table = str(b.data / "tables" / "mlp")
    stamp = d / "stamp.json"
    if not _stamp_ok(stamp, params) or not (model_dir / models.MLP_FILE).exists():
        log.info("S1: training the digits MLP and writing %d rows", cfg.s1_rows)
        if not (model_dir / models.MLP_FILE).exists():
            models.train_mlp(model_dir)
        x = models.digit_images(cfg.s1_rows, seed=0)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "features.npy", x)
        models.write_parquet(d / "parquet", np.arange(cfg.s1_rows), "features", x, files=cfg.s1_files)
        stamp.write_text(json.dumps(params))
    tstamp = b.data / "tables" / "mlp.stamp"
    mtime = str((model_dir / models.MLP_FILE).stat().st_mtime_ns)
    if not _stamp_ok(tstamp, {"mtime": mtime}):
        save_model(b.spark, model_dir, table)
        tstamp.write_text(json.dumps({"mtime": mtime}))
    return {
        "dir": d,
        "parquet": str(d / "parquet"),
        "npy": str(d / "features.npy"),
        "model_dir": str(model_dir),
        "keras": str(model_dir / models.MLP_FILE),
        "table": table,
    }


def prepare_embedding(b: Bench) -> dict[str, Any]:
    from spark_ray_udf import save_model

    cfg = b.cfg
    tag = f"{cfg.s2_vocab}x{cfg.s2_dim}"
    model_dir = b.data / "models" / f"embedding_{tag}"
    table = str(b.data / "tables" / f"embedding_{tag}")
    model_stamp = b.data / "models" / f"embedding_{tag}.stamp"
    table_stamp = b.data / "tables" / f"embedding_{tag}.stamp"
    if not _stamp_ok(model_stamp, {"vocab": cfg.s2_vocab, "dim": cfg.s2_dim}):
        log.info("S2: writing a %s float32 embedding table", tag)
        models.make_embedding_model(model_dir, vocab=cfg.s2_vocab, dim=cfg.s2_dim)
        model_stamp.write_text(json.dumps({"vocab": cfg.s2_vocab, "dim": cfg.s2_dim}))
        table_stamp.unlink(missing_ok=True)
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    mtime = str((model_dir / "table.npy").stat().st_mtime_ns)
    try:
        saved_mtime = json.loads(table_stamp.read_text()).get("mtime")
    except (OSError, ValueError):
        saved_mtime = None
    if saved_mtime != mtime:
        log.info("S2: save_model of the %.2f GB model into the Delta table %s", size / 1e9, table)
        t = time.perf_counter()
        save_model(b.spark, model_dir, table)
        seconds = time.perf_counter() - t
        log.info("S2: save_model took %.1fs (%.0f MB/s)", seconds, size / seconds / 1e6)
        table_stamp.write_text(json.dumps({"mtime": mtime, "save_seconds": seconds}))
    save_seconds = json.loads(table_stamp.read_text()).get("save_seconds")
    params = {"vocab": cfg.s2_vocab, "rows": cfg.s2_rows, "k": cfg.s2_k, "files": cfg.s2_tasks, "v": 3}
    d = b.data / f"s2_{cfg.s2_vocab}_{cfg.s2_rows}"
    if not _stamp_ok(d / "stamp.json", params):
        log.info("S2: writing %d rows of %d token ids", cfg.s2_rows, cfg.s2_k)
        ids = models.token_ids(cfg.s2_rows, cfg.s2_k, cfg.s2_vocab)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "ids.npy", ids)
        models.write_parquet(d / "parquet", np.arange(cfg.s2_rows), "ids", ids, files=cfg.s2_tasks)
        small = max(cfg.s2_tasks, cfg.s2_rows // 40)
        models.write_parquet(d / "warm", np.arange(small), "ids", ids[:small], files=cfg.s2_tasks)
        (d / "stamp.json").write_text(json.dumps(params))
    return {
        "parquet": str(d / "parquet"),
        "warm": str(d / "warm"),
        "npy": str(d / "ids.npy"),
        "model_dir": str(model_dir),
        "table": table,
        "bytes": size,
        "save_seconds": save_seconds,
    }


# --- Spark helpers ----------------------------------------------------------------------------------


def spark_pass(df: Any, column: Any, *, exact: bool) -> Pass:
    """One pass: every row's prediction computed and folded into ``sum(id * p)``."""
    from pyspark.sql import functions as F

    wall = time.time()
    start = time.perf_counter()
    prod = F.col("id") * F.col("p") if exact else F.col("id").cast("double") * F.col("p")
    row = df.select("id", column.alias("p")).agg(
        F.sum(prod).alias("checksum"), F.count("*").alias("n")
    ).collect()[0]
    seconds = time.perf_counter() - start
    cs = row["checksum"]
    checksum = (int(cs) if exact else float(cs)) if cs is not None else None
    return Pass(seconds=seconds, rows=int(row["n"]), checksum=checksum, started=wall)


def make_udfs(kind: str, paths: dict[str, Any]) -> dict[str, Any]:
    """The Spark-side UDFs of contenders b, bp, c, d for one model."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.functions import ArrowUDFType, PandasUDFType, arrow_udf, pandas_udf
    from pyspark.sql.types import DoubleType, LongType

    out_type = "bigint" if kind == "mlp" else "double"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        udfs = {
            "b": arrow_udf(models.noop_arrow, "bigint", ArrowUDFType.SCALAR_ITER),
            "bp": pandas_udf(models.noop_pandas, "bigint", PandasUDFType.SCALAR_ITER),
        }
        if kind == "mlp":
            udfs["c"] = pandas_udf(models.pandas_mlp(paths["keras"]), out_type, PandasUDFType.SCALAR_ITER)
            udfs["d"] = predict_batch_udf(
                models.pbu_mlp(paths["keras"]), return_type=LongType(), batch_size=ARROW_BATCH,
                input_tensor_shapes=[[models.N_PIXELS]],
            )
        else:
            udfs["c"] = pandas_udf(models.pandas_embedding(paths["model_dir"]), out_type, PandasUDFType.SCALAR_ITER)
            udfs["d"] = predict_batch_udf(
                models.pbu_embedding(paths["model_dir"]), return_type=DoubleType(), batch_size=ARROW_BATCH,
                input_tensor_shapes=[[paths["k"]]],
            )
    return udfs


LABELS = {
    "a": "(a) model.predict, 1 process",
    "b": "(b) no-op Arrow UDF",
    "bp": "(b') no-op pandas UDF",
    "c": "(c) pandas UDF, cached model",
    "d": "(d) predict_batch_udf",
    "e": "(e) spark-ray-udf",
    "e2": "(e2) spark-ray-udf, 2 actors",
}


def register_mlp(b: Bench, paths: dict[str, Any], name: str, **kw: Any) -> Any:
    from spark_ray_udf import init_keras, register_ray_model

    options = {"num_actors": b.cfg.actors, "max_in_flight": b.cfg.in_flight}
    options.update(kw)
    model = register_ray_model(
        b.spark, paths["table"], name, init_keras, models.apply_mlp, return_type="bigint", **options
    )
    b.pools[name] = model
    return model


def object_store_bytes() -> int | None:
    """Bytes in this Ray's object store (shared memory, invisible to USS), or None if unknown."""
    try:
        import re

        from ray._private.internal_api import memory_summary

        text = memory_summary(stats_only=True)
        m = re.search(r"Plasma memory usage (\d+) MiB", text)
        return int(m.group(1)) * 2**20 if m else None
    except Exception:  # noqa: BLE001 - a private API: best effort only
        return None


# --- S1 ---------------------------------------------------------------------------------------------


def s1(b: Bench) -> Scenario:
    cfg = b.cfg
    spark = b.start_spark(2)
    paths = prepare_mlp(b)
    sc = Scenario("S1", "Small compute-bound model: the digits Keras MLP")
    sc.setup = [
        f"{cfg.s1_rows:,} rows of 28x28 float32 (`array<float>`, 784 values), {cfg.s1_files} Parquet "
        f"files = {cfg.s1_files} partitions, Spark `local[2]`, Arrow batches of {ARROW_BATCH:,} rows.",
        "Model: Keras MLP 784 -> 512 (relu) -> 10, the same `.keras` file for every contender; "
        "prediction = argmax class (bigint); checksum = `sum(id * class)`.",
        f"spark-ray-udf: {cfg.actors} actors (0.25 CPU each), max_in_flight={cfg.in_flight}.",
        f"{cfg.rounds} measured rounds after one warm-up pass per contender (over the first 2 files: "
        "starts the workers, loads the models, builds the TF graph), contenders rotated each round.",
    ]
    df = spark.read.parquet(paths["parquet"])
    files = sorted(str(f) for f in Path(paths["parquet"]).glob("*.parquet"))[:2]
    warm_df = spark.read.parquet(*files)  # 2 partitions: starts both Python workers
    udfs = make_udfs("mlp", paths)
    t, model = _timed(lambda: register_mlp(b, paths, "bench_mlp"))
    sc.data["register_s"] = t
    inproc = InProcess("mlp", paths["keras"], paths["npy"], sampler=b.sampler, cwd=b.root)
    try:
        contenders = [
            Contender("a", LABELS["a"], inproc.run, INPROC),
            _spark_contender("b", df, warm_df, udfs["b"], "features", exact=True, predicts=False),
            _spark_contender("bp", df, warm_df, udfs["bp"], "features", exact=True, predicts=False),
            _spark_contender("c", df, warm_df, udfs["c"], "features", exact=True),
            _spark_contender("d", df, warm_df, udfs["d"], "features", exact=True),
            _spark_contender("e", df, warm_df, model, "features", exact=True, categories=WITH_RAY),
        ]
        sc.results = measure(contenders, rounds=cfg.rounds, sampler=b.sampler)
    finally:
        inproc.close()
    sc.reference = "a"
    check_against(sc.results, "a")
    r = sc.results
    r["e"].actor_busy = actor_busy(r["e"].passes, cfg.actors)
    if r["e"].actor_busy is not None:
        r["e"].notes.append(f"its {cfg.actors} actors spent {r['e'].actor_busy:.0%} of the measured "
                            "passes in `predict` (Ray timeline)")
    bound = 1.0 / (1.0 / r["a"].median_rate + 1.0 / r["b"].median_rate)
    sc.data["bound"] = bound
    e_vs_d = r["e"].median_rate / r["d"].median_rate
    e_vs_bound = r["e"].median_rate / bound
    sc.notes.append(
        "Bound implied by (a) and (b): on the same 2 cores the transport work and the compute work "
        "add up, so `1 / (1/a + 1/b)` = "
        f"1 / (1/{r['a'].median_rate:,.0f} + 1/{r['b'].median_rate:,.0f}) = **{bound:,.0f} rows/s**."
    )
    sc.targets = [
        Target(
            "S1 throughput vs predict_batch_udf", ">= 1.05x (d)", f"{e_vs_d:.2f}x",
            e_vs_d >= 1.05, value=e_vs_d, limit=1.05,
        ),
        Target(
            "S1 throughput vs the (a)+(b) bound", ">= 0.95x bound", f"{e_vs_bound:.2f}x", e_vs_bound >= 0.95,
            value=e_vs_bound, limit=0.95,
        ),
    ]
    sc.data["e_vs_d"], sc.data["e_vs_bound"] = e_vs_d, e_vs_bound
    sc.data["paths"] = paths
    return sc


def _spark_contender(
    key: str, df: Any, warm_df: Any, fn: Any, column: str, *, exact: bool, predicts: bool = True,
    categories: tuple[str, ...] = SPARK_ONLY, exclude_pids: frozenset[int] = frozenset(),
) -> Contender:
    return Contender(
        key, LABELS[key], lambda: spark_pass(df, fn(column), exact=exact), categories, predicts,
        warm=lambda: spark_pass(warm_df, fn(column), exact=exact), exclude_pids=exclude_pids,
    )


def actor_busy(passes: list[Pass], num_actors: int) -> float | None:
    """Share of the passes' wall time the pool's actors spent in ``predict`` (Ray's timeline);
    only one pool is used at a time, so every ``predict`` in the window is this pool's."""
    try:
        import ray

        events = [e for e in ray.timeline() if e.get("ph") == "X" and e.get("name") == "predict"]
    except Exception:  # noqa: BLE001 - task events may be off
        return None
    # An actor holds several calls at once (they wait their turn inside it), so its calls'
    # intervals overlap: count the union per actor process, not the sum.
    by_actor: dict[Any, list[tuple[float, float]]] = {}
    for e in events:
        t0 = e["ts"] / 1e6
        by_actor.setdefault(e.get("pid"), []).append((t0, t0 + e["dur"] / 1e6))
    merged: list[tuple[float, float]] = []
    for spans in by_actor.values():
        spans.sort()
        cur = list(spans[0])
        for a, z in spans[1:]:
            if a > cur[1]:
                merged.append((cur[0], cur[1]))
                cur = [a, z]
            else:
                cur[1] = max(cur[1], z)
        merged.append((cur[0], cur[1]))
    busy = wall = 0.0
    for p in passes:
        lo, hi = p.started, p.started + p.seconds
        wall += p.seconds * num_actors
        for t0, t1 in merged:
            busy += max(0.0, min(t1, hi) - max(t0, lo))
    return busy / wall if wall else None


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --- profile of S1's hot path -------------------------------------------------------------------------


def profile_s1(b: Bench, paths: dict[str, Any]) -> dict[str, Any]:
    """One S1 pass through a 1-actor pool whose model runs under a sampling profiler, with
    Spark's UDF profiler (cProfile) on in the Python workers. Returns the two text reports."""
    from pyspark.sql import functions as F

    from spark_ray_udf import register_ray_model
    from spark_ray_udf.client import get_client

    spark = b.start_spark(2)
    out_dir = b.data / "profile"
    out_dir.mkdir(parents=True, exist_ok=True)
    stop_file = out_dir / "stop"
    stop_file.unlink(missing_ok=True)
    actor_out = out_dir / "actor.txt"
    actor_out.unlink(missing_ok=True)
    model = register_ray_model(
        spark, paths["table"], "bench_mlp_profiled", models.init_profiled, models.apply_profiled,
        return_type="bigint", num_actors=1, max_in_flight=b.cfg.in_flight,
        conf={"stop_file": str(stop_file), "out_file": str(actor_out)},
    )
    b.pools["bench_mlp_profiled"] = model
    files = sorted(str(f) for f in Path(paths["parquet"]).glob("*.parquet"))
    df = spark.read.parquet(*files[: max(2, len(files) // 2)])
    spark_pass(df, model("features"), exact=True)  # warm: TF graph, worker connections
    spark.conf.set("spark.sql.pyspark.udf.profiler", "perf")
    t = time.perf_counter()
    p = spark_pass(df, model("features"), exact=True)
    wall = time.perf_counter() - t
    spark.conf.unset("spark.sql.pyspark.udf.profiler")
    stop_file.write_text("stop")
    # one more tiny batch from the driver makes the actor notice the stop file
    import pyarrow as pa

    x = np.zeros((1, models.N_PIXELS), np.float32)
    one = pa.ListArray.from_arrays(pa.array([0, models.N_PIXELS], pa.int32()), pa.array(x.reshape(-1)))
    list(get_client(model.address).map_batches(iter([one])))
    deadline = time.monotonic() + 30
    while not actor_out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker_text = ""
    worker_stats: dict[str, float] = {}
    try:
        import io
        import pstats

        dump_dir = out_dir / "spark_udf"
        shutil.rmtree(dump_dir, ignore_errors=True)
        spark.profile.dump(str(dump_dir), type="perf")
        files = sorted(dump_dir.rglob("*.pstats"))
        if files:
            stats = pstats.Stats(*[str(f) for f in files])
            buf = io.StringIO()
            stats.stream = buf
            stats.sort_stats("cumulative").print_stats(25)
            worker_text = buf.getvalue()
            # Spark's profiler keeps base names only: match (file, function) pairs
            wanted = {("client.py", "predict_batches"): "total", ("worker.py", "get_objects"): "ray_get",
                      ("serializers.py", "load_stream"): "arrow_in", ("client.py", "_submit"): "submit",
                      ("client.py", "refresh"): "refresh"}
            for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
                key = wanted.get((os.path.basename(fname), func))
                if key:
                    worker_stats[key] = worker_stats.get(key, 0.0) + ct
    except Exception as exc:  # noqa: BLE001 - profiling is best effort
        worker_text = f"(Spark's UDF profiler gave nothing: {exc!r})"
    model.close()
    b.pools.pop("bench_mlp_profiled", None)
    return {
        "actor": actor_out.read_text() if actor_out.exists() else "(no actor profile written)",
        "worker": worker_text,
        "worker_stats": worker_stats,
        "pass_seconds": wall,
        "rows": p.rows,
    }


# --- S2 -----------------------------------------------------------------------------------------------


def s2(b: Bench) -> Scenario:
    cfg = b.cfg
    # The model is written (once, cached in bench_data/) and registered with Spark's default
    # 2 GB driver heap; the contenders are then measured in a new local[4] JVM.
    spark = b.start_spark(2)
    paths = prepare_embedding(b)
    paths["k"] = cfg.s2_k
    sc = Scenario("S2", "Large model: a >= 1 GB embedding table, 4 Spark tasks at once")
    sc.setup = [
        f"Model: float32 embedding table {cfg.s2_vocab:,} x {cfg.s2_dim} = {paths['bytes'] / 2**30:.2f} GiB "
        "(`table.npy`) + a projection; `score = mean(table[ids]) @ proj` (float64); "
        "init loads the arrays fully (`np.load`, no mmap), as a typical init does.",
        f"{cfg.s2_rows:,} rows of {cfg.s2_k} token ids (`array<int>`), {cfg.s2_tasks} files = "
        f"{cfg.s2_tasks} partitions, Spark `local[{cfg.s2_tasks}]` on {os.cpu_count()} cores "
        f"({cfg.s2_tasks} tasks, so {cfg.s2_tasks} Python workers, at once).",
        "The contenders run in a new `local[4]` JVM started after the model was written and "
        "registered. Every round of every contender starts from fresh Spark Python workers (the "
        "idle ones are killed) and a warm-up pass over "
        f"{max(cfg.s2_tasks, cfg.s2_rows // 40):,} rows in {cfg.s2_tasks} partitions, so a contender "
        "never finds another one's model copies in a reused worker; the peak covers the load and "
        "the measured pass. spark-ray-udf: (e) 1 actor loading the arrays fully (`np.load`); "
        "(e2) 2 actors whose init memory-maps the table (`np.load(mmap_mode='r')`) from the one "
        "model folder the actors of a machine share (`share_model_files=True`, the default), so "
        "both read the same page-cache copy; that copy is added once to (e2)'s peak.",
        f"{cfg.s2_rounds} measured rounds (each a warm-up + a measured pass per contender, rotated); "
        "checksum `sum(id * score)` (double, relative tolerance 1e-9).",
    ]
    from spark_ray_udf import register_ray_model

    def register(name: str, actors: int, init: Any = models.init_embedding) -> tuple[float, Any, int]:
        before = object_store_bytes() or 0
        t, model = _timed(
            lambda: register_ray_model(
                spark, paths["table"], name, init, models.apply_embedding,
                return_type="double", num_actors=actors, max_in_flight=cfg.in_flight,
            )
        )
        b.pools[name] = model
        after = object_store_bytes()
        return t, model, (after - before) if after is not None else paths["bytes"]

    t, model, pinned = register("bench_embedding", 1)
    t2, model2, pinned2 = register("bench_embedding2", 2, models.init_embedding_mmap)
    sc.data["register_s"] = t
    load_s = max(i.load_seconds for i in model.actors)
    mb = paths["bytes"] / 1e6
    save_s = paths.get("save_seconds")
    sc.tables.append((
        "One-off costs of the large model (s)",
        ["step", "seconds", "note"],
        [
            ["`save_model` (model folder -> Delta)", f"{save_s:.1f}" if save_s else "n/a",
             (f"{mb / save_s:.0f} MB/s; measured when the table was written (cached in bench_data/ afterwards)"
              if save_s else "")],
            ["`register_ray_model` (find the version's files, start 1 actor: it reads them, "
             "checks, `np.load`s)", f"{t:.1f}",
             f"{mb / t:.0f} MB/s overall; the actor's own read + write + checks + `np.load`: {load_s:.1f} s"],
            ["`register_ray_model` with 2 actors (one writes the shared folder, both memory-map it)",
             f"{t2:.1f}", ""],
        ],
    ))
    sc.data["object_store_bytes"] = pinned
    pids1, pids2 = frozenset(model.actor_pids()), frozenset(model2.actor_pids())
    # Measure every contender in a new local[4] JVM, whose heap writing and reading the model did
    # not grow (the pool lives in Ray and does not need the old JVM).
    spark = b.start_spark(cfg.s2_tasks, fresh=True)
    df = spark.read.parquet(paths["parquet"])
    warm_df = spark.read.parquet(paths["warm"])
    udfs = make_udfs("embedding", paths)
    inproc = InProcess("embedding", paths["model_dir"], paths["npy"], sampler=b.sampler, cwd=b.root)
    try:
        contenders = [
            Contender("a", LABELS["a"], inproc.run, INPROC),
            _spark_contender("b", df, warm_df, udfs["b"], "ids", exact=True, predicts=False),
            _spark_contender("c", df, warm_df, udfs["c"], "ids", exact=False),
            _spark_contender("d", df, warm_df, udfs["d"], "ids", exact=False),
            _spark_contender("e", df, warm_df, model, "ids", exact=False, categories=WITH_RAY,
                             exclude_pids=pids2),
            _spark_contender("e2", df, warm_df, model2, "ids", exact=False, categories=WITH_RAY,
                             exclude_pids=pids1),
        ]
        sc.results = measure(contenders, rounds=cfg.s2_rounds, sampler=b.sampler, cold_rounds=True)
    finally:
        inproc.close()
    sc.reference = "a"
    check_against(sc.results, "a", rel=1e-9)
    r = sc.results
    sc.notes.append(
        "Both sides run with Spark's default 2 GB driver heap. `save_model` sets "
        "`parquet.page.size.row.check.min/max=1` on the session for its write (Parquet otherwise "
        "checks a page's size every 100 values: a 400 MB page of 4 MB chunks overflowed the heap "
        "in `CodecFactory$HeapBytesCompressor.compress`), and the actors read the version's "
        "Parquet files with pyarrow page by page, so no model byte passes through the JVM or the "
        "driver (before, `read_model`'s vectorized Spark scan of 4096 x 4 MB rows overflowed it)."
    )
    r["e"].extra_bytes = pinned
    # (e2)'s actors map the table: its pages are page cache (in no process's USS), held once
    r["e2"].extra_bytes = pinned2 + paths["bytes"]
    r["e2"].extra_label = "page cache (the mapped table, once)" + (" + object store" if pinned2 else "")
    for key, n in (("e", 1), ("e2", 2)):
        r[key].actor_busy = actor_busy(r[key].passes, n)
        busy = r[key].actor_busy
        r[key].notes.append(
            f"includes {r[key].extra_bytes / 2**30:.2f} GiB: "
            + ("what the pool added to the Ray object store" if key == "e" else
               "the memory-mapped table's one page-cache copy plus what the pool added to the object store")
            + "; the other pool's model actors are not counted"
            + (f"; its {n} actor(s) spent {busy:.0%} of the measured passes in `predict` (Ray timeline)"
               if busy is not None else "")
        )
    mem_e, _ = r["e"].peak()
    mem_e_uss = mem_e - pinned
    mem_d, _ = r["d"].peak()
    mem_ratio = mem_e / mem_d
    rate_ratio = r["e"].median_rate / r["d"].median_rate
    mem2_ratio = r["e2"].peak()[0] / mem_d
    rate2_ratio = r["e2"].median_rate / r["d"].median_rate
    sc.data.update(mem_ratio=mem_ratio, mem_ratio_uss=mem_e_uss / mem_d, rate_ratio=rate_ratio,
                   mem2_ratio=mem2_ratio, rate2_ratio=rate2_ratio)
    sc.targets = [
        Target("S2 peak memory vs predict_batch_udf, 2 actors sharing one copy", "<= 0.55x (d)",
               f"{mem2_ratio:.2f}x", mem2_ratio <= 0.55, value=mem2_ratio, limit=0.55, lower_is_better=True),
        Target("S2 throughput vs predict_batch_udf, 2 actors sharing one copy", ">= 1.0x (d)",
               f"{rate2_ratio:.2f}x", rate2_ratio >= 1.0, value=rate2_ratio, limit=1.0),
        Target("S2 peak memory vs predict_batch_udf, 1 actor", "<= 0.5x (d)",
               f"{mem_ratio:.2f}x ({mem_e_uss / mem_d:.2f}x without the object store)", mem_ratio <= 0.5,
               value=mem_ratio, limit=0.5, lower_is_better=True),
        Target("S2 throughput vs predict_batch_udf, 1 actor", ">= 1.0x (d)", f"{rate_ratio:.2f}x", rate_ratio >= 1.0,
               value=rate_ratio, limit=1.0),
    ]
    b.close_pools()
    return sc


# --- S3 -----------------------------------------------------------------------------------------------


def s3(b: Bench, paths: dict[str, Any]) -> Scenario:
    """Structured Streaming, micro-batches further apart than the Python worker idle timeout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    cfg = b.cfg
    spark = b.start_spark(2)
    sc = Scenario("S3", "Streaming: micro-batches further apart than Spark's Python worker idle timeout")
    if cfg.s3_real_idle:
        idle = (f"each query's micro-batch comes {cfg.s3_spacing_s:.0f} s after the previous one of any "
                "query (so no query reuses a worker another one just warmed), longer than the "
                "idle-worker timeout, and Spark's own monitor kills the idle workers")
    else:
        idle = (f"to keep the run short, the benchmark does what that monitor does, {cfg.s3_spacing_s:.0f} s "
                "before each measured micro-batch of each query: it SIGKILLs the idle Python workers "
                "of its own Spark (`benchmarks/memory.py: reap_idle_python_workers`), exactly as the "
                "monitor has `pyspark.daemon` do. `--s3-real-idle` instead waits 75 s before each "
                "(so about 5 min per micro-batch round) and lets Spark kill them")
    sc.setup = [
        f"{cfg.s3_batches} micro-batches of {cfg.s3_rows:,} rows (one Parquet file each) into a file-source "
        "stream per contender, all queries running; the first micro-batch of every query is a "
        "warm-up (query start), the others are measured. Latency = from the file's arrival to "
        "the end of the `foreachBatch` that folds the predictions into `sum(id * class)`.",
        "Spark kills a Python worker that stayed idle for `IDLE_WORKER_TIMEOUT_NS` = 1 minute "
        "(hard-coded in `PythonWorkerFactory`, checked every 10 s; `pyspark/ml/model_cache.py` "
        "documents that this clears the model cache). `spark.python.worker.idleTimeoutSeconds` "
        "is *not* that timeout: it only logs (and with `killOnIdleTimeout` kills) a worker that "
        f"stops answering during a task, so it cannot shorten the wait. So {idle}.",
        "The spark-ray-udf actors are Ray processes: the monitor does not touch them.",
    ]
    root = b.data / "s3"
    shutil.rmtree(root, ignore_errors=True)
    udfs = make_udfs("mlp", paths)
    model = b.pools.get("bench_mlp") or register_mlp(b, paths, "bench_mlp")
    keys = ["b", "c", "d", "e"]
    columns = {"b": udfs["b"], "c": udfs["c"], "d": udfs["d"], "e": model}
    schema = spark.read.parquet(paths["parquet"]).schema
    done: dict[str, dict[int, tuple[float, int, Any]]] = {k: {} for k in keys}
    lock = threading.Lock()
    queries = {}
    for k in keys:
        src = root / k / "in"
        src.mkdir(parents=True)

        def sink(df: Any, epoch: int, k: str = k) -> None:
            exact = F.col("id") * F.col("p")
            row = df.agg(F.sum(exact).alias("cs"), F.count("*").alias("n")).collect()[0]
            with lock:
                done[k][epoch] = (time.perf_counter(), int(row["n"]), row["cs"])

        stream = spark.readStream.schema(schema).option("maxFilesPerTrigger", 1).parquet(str(src))
        queries[k] = (
            stream.select("id", columns[k]("features").alias("p"))
            .writeStream.foreachBatch(sink)
            .option("checkpointLocation", str(root / k / "checkpoint"))
            .queryName(f"bench_s3_{k}")
            .start()
        )
    latencies: dict[str, list[float]] = {k: [] for k in keys}
    warm: dict[str, float] = {}
    checks: dict[str, int] = {k: 0 for k in keys}
    rows = cfg.s3_rows
    all_x = []
    try:
        for m in range(cfg.s3_batches):
            x = models.digit_images(rows, seed=100 + m)
            all_x.append(x)
            ids = np.arange(m * rows, (m + 1) * rows, dtype=np.int64)
            table = pa.table({
                "id": pa.array(ids),
                "features": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, (rows + 1) * models.N_PIXELS, models.N_PIXELS, dtype=np.int32)),
                    pa.array(x.reshape(-1)),
                ),
            })
            tmp = root / f"batch-{m}.parquet"
            pq.write_table(table, tmp)
            order = [keys[(m + i) % len(keys)] for i in range(len(keys))]
            for k in order:
                if m > 0:  # every measured micro-batch finds no live Python worker
                    time.sleep(cfg.s3_spacing_s)
                    if not cfg.s3_real_idle:
                        reap_idle_python_workers()
                target = root / k / "in" / f"batch-{m:03d}.parquet"
                start = time.perf_counter()
                os.link(tmp, target)  # an atomic arrival
                queries[k].processAllAvailable()
                with lock:
                    finished = [v for v in done[k].values() if v[1] == rows and v[0] >= start]
                if not finished:
                    raise RuntimeError(f"S3: query {k} did not process micro-batch {m}")
                t_end, n, cs = finished[-1]
                lat = t_end - start
                checks[k] += int(cs)
                (latencies[k].append(lat) if m > 0 else warm.__setitem__(k, lat))
                log.info("  S3 micro-batch %d  %-28s %6.2fs", m, LABELS[k], lat)
    finally:
        for q in queries.values():
            q.stop()
    # reference: the model's own predictions over all micro-batch rows
    ref = _mlp_reference(b, paths, np.concatenate(all_x))
    for k in keys:
        res = Result(k, LABELS[k], categories=WITH_RAY if k == "e" else SPARK_ONLY, predicts=k != "b")
        res.passes = [Pass(seconds=s, rows=rows, checksum=None) for s in latencies[k]]
        res.checksum_ok = (checks[k] == ref) if k != "b" else None
        sc.results[k] = res
    sc.reference = None
    med = {k: statistics.median(v) for k, v in latencies.items()}
    ratio = med["e"] / med["d"]
    sc.data.update(latency=med, warm=warm, ratio=ratio)
    sc.tables.append((
        "Per-micro-batch latency (s) after the idle workers were killed",
        ["contender", "median", "each measured micro-batch", "first micro-batch (query start)", "checksum = (a)"],
        [[LABELS[k], f"{med[k]:.2f}", ", ".join(f"{v:.2f}" for v in latencies[k]), f"{warm[k]:.2f}",
          "n/a (no-op)" if k == "b" else ("yes" if sc.results[k].checksum_ok else "**NO**")] for k in keys],
    ))
    sc.targets = [Target("S3 per-micro-batch latency vs predict_batch_udf", "<= 0.3x (d)", f"{ratio:.2f}x", ratio <= 0.3,
                         value=ratio, limit=0.3, lower_is_better=True)]
    return sc


def _mlp_reference(b: Bench, paths: dict[str, Any], x: np.ndarray) -> int:
    tmp = b.data / "s3" / "reference.npy"
    np.save(tmp, x)
    proc = InProcess("mlp", paths["keras"], str(tmp), sampler=b.sampler, cwd=b.root)
    try:
        return int(proc.run().checksum)
    finally:
        proc.close()


# --- S4 -----------------------------------------------------------------------------------------------


def s4(b: Bench, paths: dict[str, Any]) -> Scenario:
    from pyspark.sql import functions as F

    from spark_ray_udf import latest_version

    spark = b.start_spark(2)
    sc = Scenario("S4", "Cold start: register, re-register, first prediction")
    sc.setup = [
        "A new function name over the S1 MLP table, so `register_ray_model` starts new actors "
        f"({b.cfg.actors}, each imports TensorFlow and loads the model). Re-registering with the same "
        "arguments reuses the running pool; median of 5. First prediction: one query of 1 row "
        "from fresh Spark Python workers (idle ones killed first), then the same query again warm.",
    ]
    one = spark.read.parquet(paths["parquet"]).limit(1).cache()
    one.count()
    rows: list[list[str]] = []
    reap_idle_python_workers()
    t_cold, model = _timed(lambda: register_mlp(b, paths, "bench_mlp_cold"))
    loads = [i.load_seconds for i in model.actors]
    rows.append(["register_ray_model, new pool (until every actor is ready)", f"{t_cold * 1000:,.0f}",
                 f"actors' own load time (TF import + model load): {max(loads):.2f} s max"])
    re_none = [_timed(lambda: register_mlp(b, paths, "bench_mlp_cold"))[0] for _ in range(5)]
    version = latest_version(spark, paths["table"])
    t_pinned_first = _timed(lambda: register_mlp(b, paths, "bench_mlp_cold", version=version))[0]
    re_pinned = [_timed(lambda: register_mlp(b, paths, "bench_mlp_cold", version=version))[0] for _ in range(5)]
    t_resolve = statistics.median(_timed(lambda: latest_version(spark, paths["table"]))[0] for _ in range(5))
    from spark_ray_udf.store import read_model

    t_read = _timed(lambda: read_model(spark, paths["table"], sink=lambda p, i, data: len(data)))[0]
    re_med = statistics.median(re_none)
    re_pin_med = statistics.median(re_pinned)
    rows.append(["re-register, same version (version=None)", f"{re_med * 1000:,.1f}",
                 f"runs: {', '.join(f'{v * 1000:.0f}' for v in re_none)} ms"])
    rows.append(["re-register, same version (version pinned)", f"{re_pin_med * 1000:,.1f}",
                 f"runs: {', '.join(f'{v * 1000:.0f}' for v in re_pinned)} ms (first pinned call: {t_pinned_first * 1000:.0f} ms)"])
    rows.append(["`latest_version()` alone (lists `_delta_log`)", f"{t_resolve * 1000:,.1f}", ""])
    model_mb = Path(paths["keras"]).stat().st_size / 1e6
    rows.append(["`read_model()` alone (Parquet files -> driver with pyarrow, sha256 checks; no Ray)", f"{t_read * 1000:,.0f}",
                 f"a {model_mb:.1f} MB model"])
    model = b.pools["bench_mlp_cold"]

    def first(col: Any) -> float:
        return _timed(lambda: one.select(col.alias("p")).agg(F.sum("p")).collect())[0]

    reap_idle_python_workers()
    e_cold = first(model("features"))
    e_warm = first(model("features"))
    udfs = make_udfs("mlp", paths)
    reap_idle_python_workers()
    d_cold = first(udfs["d"]("features"))
    d_warm = first(udfs["d"]("features"))
    reap_idle_python_workers()
    b_cold = first(udfs["b"]("features"))
    b_warm = first(udfs["b"]("features"))
    rows += [
        ["first prediction, spark-ray-udf, fresh Python worker", f"{e_cold * 1000:,.0f}",
         "worker start + `import ray` + `ray.init(address)` + directory lookup + 1 actor call"],
        ["next prediction, spark-ray-udf, warm worker", f"{e_warm * 1000:,.0f}", ""],
        ["first prediction, predict_batch_udf, fresh Python worker", f"{d_cold * 1000:,.0f}",
         "worker start + `import tensorflow` + model load"],
        ["next prediction, predict_batch_udf, warm worker", f"{d_warm * 1000:,.0f}", ""],
        ["first call, no-op Arrow UDF, fresh Python worker", f"{b_cold * 1000:,.0f}", "Spark job + worker start"],
        ["next call, no-op Arrow UDF, warm worker", f"{b_warm * 1000:,.0f}", "Spark job floor"],
    ]
    sc.tables.append(("Cold start (ms)", ["step", "ms", "detail"], rows))
    sc.data.update(read_model_s=t_read, actor_load_s=max(loads), model_mb=model_mb,
                   register_s=t_cold, reregister_s=re_med, reregister_pinned_s=re_pin_med,
                   resolve_s=t_resolve, e_first_s=e_cold, d_first_s=d_cold, b_first_s=b_cold,
                   e_warm_s=e_warm, d_warm_s=d_warm, b_warm_s=b_warm)
    best = min(re_med, re_pin_med)
    sc.targets = [Target("S4 re-register the same version", "< 50 ms",
                         f"{re_med * 1000:.0f} ms (version=None), {re_pin_med * 1000:.0f} ms (pinned)", best < 0.05,
                         value=best * 1000, limit=50.0, unit=" ms", lower_is_better=True)]
    one.unpersist()
    model.close()
    b.pools.pop("bench_mlp_cold", None)
    return sc


# --- S5 -----------------------------------------------------------------------------------------------


def s5(b: Bench) -> Scenario:
    import pyarrow as pa
    import ray

    from spark_ray_udf import register_ray_model, save_model
    from spark_ray_udf._arrow import prepare_inputs, to_result_array
    from spark_ray_udf.client import get_client

    spark = b.start_spark(2)
    n, w = ARROW_BATCH, models.N_PIXELS
    iters = b.cfg.s5_iterations
    sc = Scenario("S5", "The Ray hop alone: one 10k x 784 float32 batch to an actor and back")
    sc.setup = [
        f"From the driver (a Ray driver like every Spark Python worker), {iters} sequential round trips "
        f"after 3 warm-up ones, each followed by one run of every baseline (interleaved); batch = {n:,} x {w} float32 = {n * w * 4 / 1e6:.1f} MB as the Arrow "
        "`list<float>` array Spark hands to the UDF; the actor's `apply_func` returns column 0 (near-zero "
        "compute), so the round trip is the hop. Medians.",
    ]
    empty = b.data / "models" / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    (empty / "README").write_text("no weights: S5 measures the hop\n")
    table = str(b.data / "tables" / "empty")
    if not _stamp_ok(b.data / "tables" / "empty.stamp", {"v": 1}):
        save_model(spark, empty, table)
        (b.data / "tables" / "empty.stamp").write_text(json.dumps({"v": 1}))
    model = register_ray_model(
        spark, table, "bench_hop", models.init_nothing, models.apply_first_column,
        return_type="float", num_actors=1, max_in_flight=1,
    )
    b.pools["bench_hop"] = model
    x = np.random.default_rng(5).random((n, w), dtype=np.float32)
    arr = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32)), pa.array(x.reshape(-1))
    )
    client = get_client(model.address)
    marks: list[float] = []

    def feed(k: int):  # noqa: ANN202
        for _ in range(k):
            marks.append(time.perf_counter())
            yield arr

    # what the actor does besides the hop: Arrow -> numpy, apply_func, numpy -> Arrow
    def actor_side() -> None:
        arrays, _ = prepare_inputs([arr], function="bench_hop")
        to_result_array(models.apply_first_column(None, arrays[0]), pa.float32(), n, function="bench_hop")

    echo = ray.remote(num_cpus=0.25)(models.Echo).remote()
    ray.get(echo.ping.remote(0))
    dst = np.empty_like(x)
    # One task-long map_batches (max_in_flight=1), advanced one batch at a time; between two
    # batches every baseline runs once, so all series see the same moments of a busy machine.
    warm = 3
    stream = client.map_batches(feed(iters + warm))
    lib, local, ping, raw_np, put, memcpy = [], [], [], [], [], []
    for i in range(iters + warm):
        res = next(stream)
        rtt = time.perf_counter() - marks[i]
        assert len(res) == n
        if i < warm:
            ray.get(echo.first_column.remote(x))
            continue
        lib.append(rtt)
        local.append(_timed(actor_side)[0])
        ping.append(_timed(lambda: ray.get(echo.ping.remote(0)))[0])
        raw_np.append(_timed(lambda: ray.get(echo.first_column.remote(x)))[0])
        put.append(_timed(lambda: ray.put(x))[0])
        memcpy.append(_timed(lambda: np.copyto(dst, x))[0])
    stream.close()
    ray.kill(echo)
    series = dict(lib=lib, local=local, ping=ping, raw=raw_np, put=put, memcpy=memcpy)
    med = {k: statistics.median(v) * 1000 for k, v in series.items()}
    low = {k: min(v) * 1000 for k, v in series.items()}
    hop = med["lib"] - med["local"]
    hop_min = low["lib"] - low["local"]
    sc.tables.append((
        "Round trip of one batch (ms, median)",
        ["what", "median ms", "best ms", "note"],
        [
            ["spark-ray-udf client -> actor -> client", f"{med['lib']:.2f}", f"{low['lib']:.2f}",
             "`PoolClient.map_batches`, max_in_flight=1"],
            ["  of which actor-side conversion + apply (measured in-process)", f"{med['local']:.2f}",
             f"{low['local']:.2f}", "`prepare_inputs` + `apply_func` + `to_result_array`"],
            ["**hop = round trip - actor-side work**", f"**{hop:.2f}**", f"**{hop_min:.2f}**", ""],
            ["raw Ray: actor call with a tiny argument", f"{med['ping']:.2f}", f"{low['ping']:.2f}", "control plane only"],
            ["raw Ray: actor call with the numpy array", f"{med['raw']:.2f}", f"{low['raw']:.2f}", "no spark-ray-udf code"],
            ["`ray.put` of the numpy array", f"{med['put']:.2f}", f"{low['put']:.2f}", "the one copy into shared memory"],
            [f"`memcpy` of {n * w * 4 / 1e6:.1f} MB", f"{med['memcpy']:.2f}", f"{low['memcpy']:.2f}",
             f"this machine copies {n * w * 4 / (low['memcpy'] / 1000) / 1e9:.1f} GB/s at best"],
        ],
    ))
    from benchmarks.hop import profile_hop

    stages = profile_hop(iters, n, w)
    sc.tables.append((
        "Where a raw Ray round trip of the batch goes (ms, median; benchmarks/hop.py)",
        ["stage", "median ms", "what it is"],
        [
            ["memcpy into touched memory", f"{stages['memcpy']:.2f}", "the floor"],
            ["memcpy into fresh memory", f"{stages['memcpy_fresh']:.2f}", "the same with page faults"],
            ["`ray.put` of the numpy array", f"{stages['put_numpy']:.2f}", "serialize + copy into the object store"],
            ["`ray.put` of the Arrow array", f"{stages['put_arrow']:.2f}", "what the client's call does first"],
            ["submit (argument already put)", f"{stages['submit']:.2f}", "`.remote()` returning"],
            ["submit -> the method's first line", f"{stages['to_actor']:.2f}", "schedule, resolve and map the argument, deserialize"],
            ["actor reads one float per page, first time", f"{stages['touch_first']:.2f}", "mapping the shared pages"],
            ["... second time", f"{stages['touch_again']:.2f}", ""],
            ["method return -> `ray.get` returns", f"{stages['reply']:.2f}", "the reply (small, inline)"],
            ["whole call, Arrow argument by value", f"{stages['round_trip_arrow']:.2f}", "put + submit + run + reply"],
            ["whole call, numpy argument by value", f"{stages['round_trip_numpy']:.2f}", ""],
        ],
    ))
    floor = 2 * med["memcpy"] + med["local"]
    sc.data.update(med=med, low=low, hop_ms=hop, hop_min_ms=hop_min, batch_bytes=n * w * 4,
                   stages=stages, floor_ms=floor)
    put_share = stages["put_arrow"]
    why = ("" if med["lib"] <= floor else
           f"the copy into Ray's object store alone (`ray.put` of the Arrow batch, {put_share:.1f} ms) "
           f"is {put_share / max(med['memcpy'], 1e-9):.1f}x a memcpy; then scheduling and mapping the "
           f"argument in the actor ({stages['to_actor']:.1f} ms) and the reply ({stages['reply']:.1f} ms). "
           f"A raw Ray actor call with the same bytes costs {med['raw']:.1f} ms, so spark-ray-udf adds "
           f"{med['lib'] - med['raw']:+.1f} ms over Ray itself: the floor is Ray's object store path, "
           "which copies a batch that Spark's socket already wrote into the worker's heap; below it "
           "needs the batch read straight into shared memory (no public Ray API) or fewer bytes "
           "(float16/uint8 inputs)")
    sc.targets = [Target(
        "S5 round trip vs 2x memcpy + the actor's compute", f"<= {floor:.2f} ms",
        f"{med['lib']:.2f} ms median ({hop:.2f} ms hop)", med["lib"] <= floor, why,
        value=med["lib"], limit=floor, unit=" ms", lower_is_better=True)]
    model.close()
    b.pools.pop("bench_hop", None)
    return sc
