"""Hostile tables, threads and results (issue 11): what an adversarial or unlucky user does
through the public API, with real Spark, Ray and Delta where the path needs them.

* the embedded Ray started from a thread that then exits (own Spark and Ray in a subprocess, so
  a Ray that ends its driver cannot take pytest with it);
* model tables whose manifest or chunk rows lie (types, sizes, counts, paths, a 1 TiB file);
* a model of 20,000+ small files (bounded open files);
* symbolic links in a model folder;
* results too large for one Arrow array, and the fallbacks that used to be silent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parent.parent


def run_script(tmp_path: Path, name: str, text: str, *, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run ``text`` as a script (argument: ``tmp_path``); return the JSON it printed after
    ``RESULT ``, or fail with its output and exit status."""
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout_s,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------
# 11.3 The embedded Ray outlives the thread that started it
# --------------------------------------------------------------------------------------------

# Ray ends a driver whose GCS stays unreachable for gcs_rpc_server_reconnect_timeout_s (60 s by
# default); the app lowers it to RECONNECT_S so that "still alive a minute later" takes seconds.
RECONNECT_S = 10

THREAD_APP = """
import json, sys, threading, time
from pathlib import Path

import psutil

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, local_spark, make_linear_model
from tests import helpers

tmp = Path(sys.argv[1])
spark = local_spark("ray-thread", warehouse_dir=str(tmp / "wh"))
linear = make_linear_model(tmp / "m")
save_model(spark, tmp / "m", str(tmp / "model"))
df = spark.range(0, 200, 1, 2).selectExpr("id", helpers.features_sql() + " as features")
expected = helpers.expected_classes(linear, list(range(200)))
box = {}

def first_registration():  # a web handler, a scheduler job, a notebook's background task
    box["model"] = register_ray_model(
        spark, str(tmp / "model"), "model_thread", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    )
    box["thread_rows"] = [r.c for r in sorted(df.select("id", box["model"]("features").alias("c")).collect())]

t = threading.Thread(target=first_registration, name="first-registration")
t.start()
t.join(300)
model = box["model"]
gone_at = time.monotonic()
out = {"thread_ok": box["thread_rows"] == expected, "thread_alive": t.is_alive()}
# Past Ray's reconnect limit: with a Ray tied to the ended thread, Ray ends this process here.
time.sleep(RECONNECT_S + 5)
ray_names = {p.name() for p in psutil.Process().children(recursive=True)
             if p.status() != psutil.STATUS_ZOMBIE}
out["ray_processes"] = sorted(n for n in ray_names if n in ("gcs_server", "raylet"))
rows = [r.c for r in sorted(df.select("id", model("features").alias("c")).collect())]
out["later_ok"] = rows == expected
out["seconds_after_thread"] = time.monotonic() - gone_at
model.close()
print("RESULT " + json.dumps(out), flush=True)
spark.stop()
"""


@pytest.mark.slow
def test_embedded_ray_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    """The first register_ray_model runs in a thread that then exits (own Spark and Ray in a
    subprocess): Ray's GCS and raylet live on, a query after Ray's reconnect limit still gives
    the model's predictions, and the driver was not ended by Ray."""
    env = {**helpers.subprocess_env(), "RAY_gcs_rpc_server_reconnect_timeout_s": str(RECONNECT_S)}
    out = run_script(
        tmp_path, "thread_app.py", THREAD_APP.replace("RECONNECT_S", str(RECONNECT_S)),
        env=env, timeout_s=480,
    )
    assert out["thread_ok"] and not out["thread_alive"]
    assert out["ray_processes"] == ["gcs_server", "raylet"], out
    assert out["later_ok"], "a query after the registering thread ended must be served"
    assert out["seconds_after_thread"] > RECONNECT_S
