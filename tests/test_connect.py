"""Spark Connect: the same calls work over a local Spark Connect server (own process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parent.parent

CONNECT_APP = """
import json, sys, time
from pathlib import Path

from pyspark.sql.connect.session import SparkSession as ConnectSession

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, local_spark, make_linear_model
from tests import helpers

tmp = Path(sys.argv[1])
spark = local_spark("connect-test", warehouse_dir=str(tmp / "wh"), connect=True)
out = {"connect": isinstance(spark, ConnectSession)}
linear = make_linear_model(tmp / "m", n_features=helpers.N_FEATURES, n_classes=helpers.N_CLASSES)
out["version"] = save_model(spark, tmp / "m", "ai_model.connect_linear")
kw = dict(return_type="bigint", num_actors=1)
started = time.monotonic()
first = register_ray_model(spark, "ai_model.connect_linear", "connect_predict", init_linear, apply_linear, **kw)
out["first_s"] = time.monotonic() - started
first.close()
started = time.monotonic()  # Ray and the Python workers are up now: what a notebook sees
model = register_ray_model(spark, "ai_model.connect_linear", "connect_predict", init_linear, apply_linear, **kw)
out["register_s"] = time.monotonic() - started
spark.range(300).selectExpr("id", f"{helpers.features_sql()} as features").createOrReplaceTempView("ev")
expected = helpers.expected_classes(linear, list(range(300)))
rows = spark.sql("select id, connect_predict(features) as c from ev order by id").collect()
out["sql"] = [r.c for r in rows] == expected
frame = spark.table("ev").orderBy("id").select(model("features").alias("c")).collect()
out["dataframe"] = [r.c for r in frame] == expected
out["served_version"] = model.version
model.close()
print("RESULT " + json.dumps(out), flush=True)
spark.stop()
"""


@pytest.mark.slow
def test_save_register_and_query_over_spark_connect(tmp_path):
    """A Connect session (a local Spark Connect server in a subprocess): save_model,
    register_ray_model, the SQL function and the DataFrame call give the model's exact
    predictions; the pool lives in the client process."""
    script = tmp_path / "connect_app.py"
    script.write_text(CONNECT_APP)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=helpers.subprocess_env(),
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[0][len("RESULT "):])
    assert out["connect"], "local_spark(connect=True) must return a Spark Connect session"
    assert out["sql"] and out["dataframe"]
    assert out["served_version"] == out["version"]
    assert out["register_s"] < 60, f"registering over Connect took {out['register_s']:.1f}s"
