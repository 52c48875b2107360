"""S7: the HTTP door. Requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients for

* ``e-http``: spark-ray-udf's ``model.serve()``, a Serve ingress forwarding to the pool's own
  actors (the model copies that also answer SQL), and
* ``serve``: a plain Ray Serve deployment that loads its own copy of the same model in each
  replica, with ``@serve.batch`` (what a user runs today next to the Spark pool),

same Serve proxy, same JSON body (one row per request, ``{"instances": [row]}``), same batching
options, same number of model copies (``cfg.actors`` replicas), measured in the same run. Each
client is a thread with one keep-alive HTTP connection sending its requests back to back.

``make bench`` runs it as S7 with the digits MLP (``benchmarks/run.py``). A smoke run, with the
numpy linear model (no TensorFlow), tiny sizes, its own Spark and Ray, checks it still works::

    .venv/bin/python benchmarks/http_door.py --smoke
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scenarios import Bench, Scenario, Target  # noqa: E402

log = logging.getLogger(__name__)

CONCURRENCY = (1, 8, 32)
MAX_BATCH_SIZE = 32
BATCH_WAIT_S = 0.005


class PlainModel:
    """The alternative: a Serve deployment holding its own copy of the model."""

    def __init__(
        self,
        init_func: Callable[[str, Mapping[str, Any]], Any],
        apply_func: Callable[..., Any],
        model_dir: str,
        dtype: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        from ray import serve

        self._model = init_func(model_dir, {})
        self._apply = apply_func
        self._dtype = np.dtype(dtype)
        self._batched = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s
        )(self._run)

    async def _run(self, rows: list[list[Any]]) -> list[list[Any]]:
        x = np.asarray([r for request in rows for r in request], dtype=self._dtype)
        out = np.asarray(self._apply(self._model, x)).tolist()
        parts, i = [], 0
        for request in rows:
            parts.append(out[i : i + len(request)])
            i += len(request)
        return parts

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        body = await request.json()
        return JSONResponse({"predictions": await self._batched(body["instances"])})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load(port: int, path: str, body: bytes, *, clients: int, requests: int) -> dict[str, float]:
    """``clients`` threads, each sending ``requests`` POSTs back to back on one connection."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine: list[float] = []
        bad = 0
        try:
            barrier.wait(timeout=60)
            for _ in range(requests):
                t = time.perf_counter()
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                mine.append(time.perf_counter() - t)
                bad += r.status != 200
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)
                errors[0] += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    seconds = time.perf_counter() - start
    arr = np.asarray(latencies) * 1000.0
    return {
        "rps": len(latencies) / seconds if seconds > 0 else 0.0,
        "p50_ms": float(np.percentile(arr, 50)) if arr.size else float("nan"),
        "p99_ms": float(np.percentile(arr, 99)) if arr.size else float("nan"),
        "errors": float(errors[0]),
        "requests": float(len(latencies)),
    }


def run_http(
    spark: Any,
    *,
    table: str,
    model_dir: str,
    init_func: Callable[..., Any],
    apply_func: Callable[..., Any],
    return_type: str,
    input_type: str,
    dtype: str,
    row: Sequence[float],
    actors: int,
    requests: int,
    concurrency: Sequence[int] = CONCURRENCY,
    pools: dict[str, Any] | None = None,
) -> Scenario:
    """Measure both contenders; returns the S7 :class:`Scenario`."""
    from ray import serve

    from spark_ray_udf import register_ray_model

    port = free_port()
    body = json.dumps({"instances": [list(map(float, row))]}).encode()
    model = register_ray_model(
        spark, table, "bench_http", init_func, apply_func, return_type=return_type, num_actors=actors,
    )
    if pools is not None:
        pools["bench_http"] = model
    results: dict[str, dict[int, dict[str, float]]] = {"e-http": {}, "serve": {}}
    try:
        url = model.serve(
            port=port, input_types=[input_type], max_batch_size=MAX_BATCH_SIZE,
            batch_wait_timeout_s=BATCH_WAIT_S, max_queued_requests=4 * max(concurrency),
        )
        plain = serve.deployment(
            PlainModel, name="plain", num_replicas=actors,
            max_ongoing_requests=2 * MAX_BATCH_SIZE, ray_actor_options={"num_cpus": 0.25},
        ).bind(init_func, apply_func, model_dir, dtype, MAX_BATCH_SIZE, BATCH_WAIT_S)
        serve.run(plain, name="bench-plain-serve", route_prefix="/plain")
        paths = {"e-http": "/" + url.split("/", 3)[3] + "/predict", "serve": "/plain"}
        for key, path in paths.items():  # warm-up: connections, TF graphs, batchers
            load(port, path, body, clients=2, requests=max(2, requests // 10))
        for clients in concurrency:
            for key, path in paths.items():
                results[key][clients] = load(port, path, body, clients=clients, requests=requests)
                log.info("S7 %s, %d clients: %s", key, clients, results[key][clients])
        stats = model.stats()
    finally:
        try:
            serve.delete("bench-plain-serve")
        finally:
            model.close()
            if pools is not None:
                pools.pop("bench_http", None)

    sc = Scenario("S7", "The HTTP door: model.serve() on the pool's actors vs a plain Ray Serve deployment")
    sc.setup = [
        f"One row per request (`{input_type}`), {requests} requests per client, back to back, one "
        f"keep-alive connection per client; {', '.join(map(str, concurrency))} concurrent clients.",
        f"(e-http) `model.serve()` over {actors} pool actors; (serve) a Serve deployment with "
        f"{actors} replicas, each loading its own copy of the model; both `@serve.batch` "
        f"(max {MAX_BATCH_SIZE}, wait {BATCH_WAIT_S * 1000:.0f} ms) behind the same Serve proxy.",
    ]
    rows = []
    for clients in concurrency:
        for key in ("e-http", "serve"):
            r = results[key][clients]
            rows.append([key, str(clients), f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f}",
                         f"{r['p99_ms']:.1f}", f"{r['errors']:.0f}"])
    sc.tables.append(("Requests/s and latency", ["contender", "clients", "requests/s", "p50 ms", "p99 ms", "errors"], rows))
    sc.notes.append(
        f"spark-ray-udf's actors served {stats['rows']['http']:,} HTTP rows in "
        f"{stats['batches']['http']:,} actor calls (the batcher's merging); the plain deployment "
        f"holds {actors} more model copies than the pool alone."
    )
    mid = sorted(concurrency)[len(concurrency) // 2]
    ratio = results["e-http"][mid]["rps"] / max(results["serve"][mid]["rps"], 1e-9)
    sc.targets = [
        Target(f"S7 HTTP requests/s vs plain Serve at {mid} clients", ">= 0.8x (serve)",
               f"{ratio:.2f}x", ratio >= 0.8),
    ]
    sc.data["http"] = results
    return sc


def s7(b: Bench, paths: dict[str, Any]) -> Scenario:
    """S7 in ``make bench``: the digits MLP."""
    from benchmarks import models
    from spark_ray_udf import init_keras

    spark = b.start_spark(2)
    row = models.digit_images(1, seed=1)[0]
    return run_http(
        spark, table=paths["table"], model_dir=paths["model_dir"], init_func=init_keras,
        apply_func=models.apply_mlp, return_type="bigint", input_type="array<float>",
        dtype="float32", row=row.ravel().tolist(), actors=b.cfg.actors,
        requests=20 if b.cfg.quick else 200, pools=b.pools,
    )


def smoke(data: Path) -> Scenario:
    """Tiny sizes, the numpy linear model: checks that S7 runs (numbers mean nothing)."""
    import ray

    from spark_ray_udf import save_model
    from spark_ray_udf._ray import ensure_ray
    from spark_ray_udf.testing import apply_linear, init_linear, local_spark, make_linear_model

    data.mkdir(parents=True, exist_ok=True)
    spark = local_spark("bench-http-smoke", warehouse_dir=str(data / "warehouse"))
    ray_was_up = ray.is_initialized()
    try:
        ensure_ray()
        model_dir = data / "linear"
        make_linear_model(model_dir, n_features=8)
        table = str(data / "linear_table")
        save_model(spark, model_dir, table)
        return run_http(
            spark, table=table, model_dir=str(model_dir), init_func=init_linear,
            apply_func=apply_linear, return_type="bigint", input_type="array<double>",
            dtype="float64", row=[0.1] * 8, actors=1, requests=5, concurrency=(1, 2),
        )
    finally:
        spark.stop()
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, linear model: a check that it runs")
    parser.add_argument("--data-dir", default=str(ROOT / "bench_data" / "http_smoke"))
    args = parser.parse_args(argv)
    if not args.smoke:
        parser.error("run S7 through benchmarks/run.py (make bench); here only --smoke")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    sc = smoke(Path(args.data_dir))
    for title, header, rows in sc.tables:
        print(title)
        print(" | ".join(header))
        for r in rows:
            print(" | ".join(r))
    errors = sum(float(r[-1]) for r in sc.tables[0][2])
    print("\n".join(sc.notes))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
