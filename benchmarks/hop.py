"""Where S5's round trip goes: one 31 MB batch to an actor and back, cut into its stages.

Run alone (``.venv/bin/python benchmarks/hop.py``, a local Ray of its own) or from S5
(:func:`profile_hop`, on the Ray already running). Every stage is timed with wall clocks on
both sides (one machine, one clock), medians over ``iterations`` rounds:

* ``memcpy``: a bare copy of the bytes into memory already touched (the floor);
* ``memcpy_fresh``: the same copy into newly allocated memory (page faults included);
* ``put_numpy`` / ``put_arrow``: ``ray.put`` of the batch as numpy / as the Arrow array Spark
  hands the UDF (serialization + the copy into the object store);
* ``submit``: ``actor.method.remote(ref)`` returning (the call is queued, the argument is
  a reference);
* ``to_actor``: from the submit to the first line of the actor method (scheduling, resolving
  and mapping the argument, deserializing it);
* ``touch_first`` / ``touch_again``: the actor reading one float per 4 KiB page of the
  argument, first and second time (the cost of mapping shared pages into the actor);
* ``reply``: from the method's return to ``ray.get`` returning in the caller (the small
  result inline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray


class HopProbe:
    """An actor that stamps when it got a batch and how long touching its pages took."""

    def stamp(self, x: Any) -> tuple[float, float, float, float]:
        entered = time.time()
        flat = x.reshape(-1) if isinstance(x, np.ndarray) else x.values.to_numpy(zero_copy_only=True)
        t = time.perf_counter()
        flat[::1024].sum()
        touch_first = time.perf_counter() - t
        t = time.perf_counter()
        flat[::1024].sum()
        touch_again = time.perf_counter() - t
        return entered, touch_first, touch_again, time.time()


def batch(n: int = 10_000, width: int = 784) -> tuple[np.ndarray, pa.Array]:
    x = np.random.default_rng(5).random((n, width), dtype=np.float32)
    arr = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)), pa.array(x.reshape(-1)))
    return x, arr


def profile_hop(iterations: int = 30, n: int = 10_000, width: int = 784) -> dict[str, float]:
    """Median milliseconds of every stage (see the module docstring), on the running Ray."""
    x, arr = batch(n, width)
    probe = ray.remote(num_cpus=0)(HopProbe).remote()
    dst = np.empty_like(x)
    dst.fill(0)
    series: dict[str, list[float]] = {k: [] for k in (
        "memcpy", "memcpy_fresh", "put_numpy", "put_arrow", "submit", "to_actor", "touch_first",
        "touch_again", "reply", "round_trip_arrow", "round_trip_numpy")}
    for i in range(iterations + 3):
        t = time.perf_counter(); np.copyto(dst, x); memcpy = time.perf_counter() - t
        t = time.perf_counter(); fresh = x.copy(); fresh_s = time.perf_counter() - t
        del fresh
        t = time.perf_counter(); ray.put(x); put_np = time.perf_counter() - t
        t = time.perf_counter(); ref = ray.put(arr); put_arrow = time.perf_counter() - t
        t0 = time.time()
        fut = probe.stamp.remote(ref)
        t1 = time.time()
        entered, touch_first, touch_again, left = ray.get(fut, timeout=60)
        t2 = time.time()
        del ref
        t = time.perf_counter(); ray.get(probe.stamp.remote(arr), timeout=60); rt_arrow = time.perf_counter() - t
        t = time.perf_counter(); ray.get(probe.stamp.remote(x), timeout=60); rt_np = time.perf_counter() - t
        if i < 3:
            continue
        for k, v in (("memcpy", memcpy), ("memcpy_fresh", fresh_s), ("put_numpy", put_np),
                     ("put_arrow", put_arrow), ("submit", t1 - t0), ("to_actor", entered - t1),
                     ("touch_first", touch_first), ("touch_again", touch_again), ("reply", t2 - left),
                     ("round_trip_arrow", rt_arrow), ("round_trip_numpy", rt_np)):
            series[k].append(v)
    ray.kill(probe)
    return {k: statistics.median(v) * 1000 for k, v in series.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print(json.dumps(profile_hop(args.iterations), indent=1))  # noqa: T201 - a script's output
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
