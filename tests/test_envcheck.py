"""The environment check a new pool runs on an executor before its first query (_envcheck.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import spark_ray_udf
from spark_ray_udf import register_ray_model
from spark_ray_udf._envcheck import Facts, check_environment, driver_facts, find_problems
from spark_ray_udf.testing import apply_linear, init_linear
from tests import helpers

ROOT = Path(__file__).resolve().parent.parent
BARE = "/usr/bin/python3"  # the system interpreter: no numpy, pyarrow or ray


def test_problems_name_each_difference():
    """Every kind of difference gets its own line; a matching executor gets none."""
    d = driver_facts()
    assert find_problems(d, d, "127.0.0.1:1") == []
    other = Facts(
        "/x/python", d.version, versions={**d.versions, "spark_ray_udf": "0.0.1", "pyarrow": "1.0"}
    )
    assert find_problems(d, other, "127.0.0.1:1") == [
        f"spark_ray_udf 0.0.1 (the driver has {spark_ray_udf.__version__})"
    ], "a pyarrow difference alone is no problem"
    bare = Facts(
        "/x/python", d.version, versions={"spark_ray_udf": spark_ray_udf.__version__},
        missing={n: "ModuleNotFoundError: no" for n in ("ray", "pyarrow")},
    )
    assert find_problems(d, bare, "127.0.0.1:1") == [
        "ray does not import (ModuleNotFoundError: no)",
        "pyarrow does not import (ModuleNotFoundError: no)",
    ]


def test_check_passes_on_the_suite_session_and_is_fast(spark, ray_address):
    """The suite's Spark runs its Python workers on this interpreter: the check passes, reports
    the driver's versions, and costs well under a second once the workers are warm."""
    check_environment(spark, ray_address)  # warm the Python worker
    started = time.perf_counter()
    facts = check_environment(spark, ray_address)
    seconds = time.perf_counter() - started
    assert facts.versions == driver_facts().versions
    assert Path(facts.python).resolve() == Path(sys.executable).resolve()
    assert seconds < 1.0, f"the warm check took {seconds:.2f}s"


def test_unreachable_ray_is_named(spark):
    """A GCS address nobody listens on fails the check naming the address and the fix."""
    address = f"127.0.0.1:{helpers.free_port()}"
    with pytest.raises(spark_ray_udf.errors.EnvironmentMismatchError) as info:
        check_environment(spark, address, who="f")
    text = str(info.value)
    assert text.startswith("f: Spark's Python workers on ")
    assert f"Ray's GCS at {address} is unreachable from there" in text
    assert "ray_address=" in text


def test_check_runs_once_per_new_pool_not_on_reuse(spark, ray_address, linear_table, caplog):
    """Registering the same thing again reuses the pool and runs no check job."""
    caplog.set_level(logging.INFO, logger="spark_ray_udf._envcheck")
    kwargs: dict[str, Any] = dict(return_type="bigint", num_actors=1)
    with register_ray_model(spark, linear_table.table, "envcheck_once", init_linear, apply_linear, **kwargs):
        checks = [r for r in caplog.records if "environment check:" in r.getMessage()]
        assert len(checks) == 1
        again = register_ray_model(spark, linear_table.table, "envcheck_once", init_linear, apply_linear, **kwargs)
        checks = [r for r in caplog.records if "environment check:" in r.getMessage()]
        assert len(checks) == 1, "a reused pool must not run the check again"
        assert again.closed is False


ENV_APP = """
import json, os, sys, time
from pathlib import Path

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf._envcheck import check_environment
from spark_ray_udf._ray import ensure_ray
from spark_ray_udf.errors import EnvironmentMismatchError
from spark_ray_udf.testing import init_linear, apply_linear, local_spark, make_linear_model

tmp = Path(sys.argv[1])
out = {}
# 1. Spark's Python workers on a bare interpreter (as PYSPARK_PYTHON)
os.environ["PYSPARK_PYTHON"] = sys.argv[2]
spark = local_spark("envcheck-bare", cores=1, warehouse_dir=str(tmp / "wh"))
make_linear_model(tmp / "m", n_features=8)
save_model(spark, tmp / "m", "ai_model.envcheck")
started = time.monotonic()
try:
    register_ray_model(spark, "ai_model.envcheck", "envcheck_bare", init_linear, apply_linear,
                       return_type="bigint", num_actors=1)
    out["bare"] = "registered"
except EnvironmentMismatchError as exc:
    out["bare"] = str(exc)
out["bare_s"] = time.monotonic() - started
out["actors"] = len(__import__("ray").util.list_named_actors(all_namespaces=True))
spark.stop()
# 2. the right interpreter, but another spark_ray_udf first on the executors' PYTHONPATH
os.environ["PYSPARK_PYTHON"] = sys.executable
spark = local_spark("envcheck-stub", cores=1, warehouse_dir=str(tmp / "wh"),
                    conf={"spark.executorEnv.PYTHONPATH": sys.argv[3]})
try:
    check_environment(spark, ensure_ray(), who="envcheck_stub")
    out["stub"] = "passed"
except EnvironmentMismatchError as exc:
    out["stub"] = str(exc)
print("RESULT " + json.dumps(out), flush=True)
spark.stop()
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access(BARE, os.X_OK), reason=f"needs {BARE}")
def test_bare_interpreter_and_other_version_fail_registration(tmp_path):
    """Own Spark in a subprocess: with a bare interpreter as PYSPARK_PYTHON, registration fails
    before any actor starts, naming the interpreter, what it lacks and the fix; with a stub
    spark_ray_udf 0.0.1 first on the executors' PYTHONPATH, the check names the version."""
    probe = subprocess.run([BARE, "-c", "import numpy"], capture_output=True)
    assert probe.returncode != 0, f"{BARE} has numpy: it is not a bare interpreter"
    stub = tmp_path / "stub" / "spark_ray_udf"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('__version__ = "0.0.1"\n')
    script = tmp_path / "env_app.py"
    script.write_text(ENV_APP)
    env = helpers.subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), BARE, str(stub.parent)],
        # not the repository root: a Python worker's sys.path starts with its working folder,
        # which would put this checkout's spark_ray_udf before the stub
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = json.loads(lines[0][len("RESULT "):])
    bare = out["bare"]
    assert bare.startswith("envcheck_bare: Spark's Python workers on "), bare
    assert f"run {BARE} (Python 3." in bare, bare
    assert "spark_ray_udf does not import (ModuleNotFoundError: No module named" in bare, bare
    assert "PYSPARK_PYTHON" in bare and "spark.pyspark.python" in bare, bare
    assert f"the driver runs {sys.executable}" in bare, bare
    assert out["actors"] == 0, "no actor may start before the check passed"
    assert out["bare_s"] < 60, f"the refusal took {out['bare_s']:.1f}s"
    stub_text = out["stub"]
    assert (
        f"spark_ray_udf 0.0.1 from {stub / '__init__.py'} (the driver has {spark_ray_udf.__version__})"
    ) in stub_text, stub_text
    assert f"'spark-ray-udf=={spark_ray_udf.__version__}'" in stub_text, stub_text
