"""Errors of the SQL function, end to end: each names the function, what went wrong and the fix.

Real local Spark, Ray and Delta; no mocks. An error raised in a Ray actor reaches the driver
inside Spark's job failure, so those tests look for our error's text in that failure.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spark_ray_udf import (
    InputError,
    ModelInitError,
    ModelNotFoundError,
    RayModel,
    RayUnavailableError,
    register_ray_model,
)
from spark_ray_udf._ray import check_reachable
from spark_ray_udf.testing import apply_linear, init_linear
from tests import helpers
from tests.helpers import expected_classes, features_sql

FAST_S = 15.0  # "fails fast": a generous bound for a loaded 2-core machine; it takes < 1 s


def job_failure(df: Any) -> str:
    """Run ``df`` and return the text of the exception the Spark job fails with."""
    from pyspark.errors import PySparkException

    with pytest.raises(Exception) as info:
        df.collect()
    assert isinstance(info.value, PySparkException), repr(info.value)
    return str(info.value)


# --- the table ----------------------------------------------------------------------------------


def test_unknown_table(spark, ray_address):
    """A table that does not exist: ModelNotFoundError naming it and save_model()."""
    with pytest.raises(ModelNotFoundError, match=r"ai_model\.no_such_model: no such table") as info:
        register_ray_model(spark, "ai_model.no_such_model", "model_x", init_linear, apply_linear)
    assert "save_model()" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_unknown_table_path(spark, ray_address, tmp_path):
    """A path holding no Delta table: ModelNotFoundError naming the path."""
    path = str(tmp_path / "nothing_here")
    with pytest.raises(ModelNotFoundError, match="no Delta table at this path") as info:
        register_ray_model(spark, path, "model_x", init_linear, apply_linear)
    assert path in str(info.value)


def test_unknown_version(spark, linear_table):
    """A version the table does not have: ModelNotFoundError listing the versions there are."""
    with pytest.raises(ModelNotFoundError, match=r"version 7 does not exist \(versions 0\.\.0\)"):
        register_ray_model(
            spark, linear_table.table, "model_x", init_linear, apply_linear, version=7
        )


# --- loading the model ---------------------------------------------------------------------------


def test_init_func_raising(spark, linear_table):
    """init_func raising: ModelInitError with the function, table@version and actor traceback."""
    with pytest.raises(ModelInitError) as info:
        register_ray_model(
            spark, linear_table.table, "model_broken", helpers.init_raising, apply_linear,
            num_actors=1,
        )
    text = str(info.value)
    assert text.startswith("model_broken: init_func tests.helpers.init_raising raised on actor 0")
    assert f"while loading {linear_table.table}@v{linear_table.version}" in text
    assert "fix init_func or the model files" in text
    # the actor's traceback, down to the raising line's text and the message
    assert "Traceback (most recent call last)" in text
    assert 'raise RuntimeError(f"the weights in {model_dir} are corrupt (on purpose)")' in text
    assert "are corrupt (on purpose)" in text
    # nothing is left behind
    assert helpers.pool_namespaces("model_broken") == []
    assert helpers.work_roots("model_broken") == []


def test_function_not_importable_by_actors(spark, linear_table, tmp_path, monkeypatch):
    """An apply_func from a module only the driver can import: ModelInitError saying so."""
    (tmp_path / "driver_only_mod.py").write_text(
        "def apply_here(model, x):\n    return model.predict(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver's sys.path only, not PYTHONPATH
    monkeypatch.delitem(sys.modules, "driver_only_mod", raising=False)
    import driver_only_mod

    with pytest.raises(ModelInitError) as info:
        register_ray_model(
            spark, linear_table.table, "model_unimportable", init_linear,
            driver_only_mod.apply_here, num_actors=1, return_type="bigint",
        )
    text = str(info.value)
    assert text.startswith("model_unimportable: an actor died while loading")
    assert "No module named 'driver_only_mod'" in text
    assert "apply_func driver_only_mod.apply_here must be importable in the Ray worker" in text
    assert helpers.pool_namespaces("model_unimportable") == []


# --- applying the model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(spark: Any, linear_table: Any) -> Iterator[RayModel]:
    """``model_bad(mode, features)``: double; mode 1 raises, 2 is short, 3 returns strings."""
    with register_ray_model(
        spark, linear_table.table, "model_bad", init_linear, helpers.apply_misbehaving,
        return_type="double", num_actors=1,
    ) as model:
        yield model


def ten_rows(spark: Any, view: str = "err_events") -> Any:
    """Ten rows in one partition, so a batch is rows 0..9 of its task."""
    df = spark.range(0, 10, 1, 1).selectExpr("id", f"{features_sql()} as features")
    df.createOrReplaceTempView(view)
    return df


def test_apply_func_raising(spark, bad):
    """apply_func raising fails the job with ModelApplyError: function, rows, actor traceback."""
    ten_rows(spark)
    text = job_failure(spark.sql("select model_bad(1, features) from err_events"))
    assert "ModelApplyError" in text
    assert "model_bad: apply_func tests.helpers.apply_misbehaving raised on actor 0" in text
    assert "for rows 0..9 of the task" in text
    assert 'raise ZeroDivisionError("apply_misbehaving divided by zero (on purpose)")' in text
    assert "ZeroDivisionError: apply_misbehaving divided by zero (on purpose)" in text


def test_apply_func_wrong_length(spark, bad):
    """One value too few fails the job with ModelApplyError saying how many were expected."""
    ten_rows(spark)
    text = job_failure(spark.sql("select model_bad(2, features) from err_events"))
    assert "ModelApplyError" in text
    assert "model_bad: apply_func's result for rows 0..9: expected 10 values (one per row), got 9" in text
    assert "apply_func must return one prediction per input row" in text


def test_apply_func_wrong_type(spark, bad):
    """Strings for a double function fail the job with ModelApplyError naming both types."""
    ten_rows(spark)
    text = job_failure(spark.sql("select model_bad(3, features) from err_events"))
    assert "ModelApplyError" in text
    assert "model_bad: apply_func's result for rows 0..9: got values of type string for return type double" in text
    assert "return numbers or change return_type" in text


def test_pool_survives_apply_errors(spark, linear_table, bad):
    """After the failed jobs, the same actor still answers correctly."""
    pids = bad.actor_pids()
    ten_rows(spark)
    for mode in (1, 2, 3):
        job_failure(spark.sql(f"select model_bad({mode}, features) from err_events"))
    rows = spark.sql("select id, model_bad(0, features) as s from err_events order by id").collect()
    want = helpers.apply_top_score(linear_table.model, helpers.features_np([r.id for r in rows]))
    assert [r.s for r in rows] == pytest.approx(want.tolist(), rel=1e-12)
    assert bad.actor_pids() == pids


@pytest.mark.parametrize(
    ("argument", "fragments"),
    [
        (
            "named_struct('a', 1.0D, 'b', 2.0D)",
            ["argument 2 (struct<a: double not null, b: double not null>) is a struct",
             "pass its fields as separate arguments"],
        ),
        (
            "timestamp_seconds(id)",
            ["argument 2 (timestamp[us, tz=", "has the unsupported type timestamp[us", "cast it in SQL"],
        ),
        (
            "array(date'2024-01-01')",
            ["argument 2", "is an array of date32[day]", "only arrays of numbers"],
        ),
        (
            "if(id = 3, array(1.0D, 2.0D), features)",
            ["argument 2 (list<element: double>): row 3 has", "2 elements but row 0 has 8",
             "pad or truncate the arrays"],
        ),
    ],
    ids=["struct", "timestamp", "array-of-dates", "ragged-array"],
)
def test_unsupported_argument(spark, bad, argument, fragments):
    """An argument column the function cannot take: InputError naming the argument and a fix."""
    ten_rows(spark)
    text = job_failure(spark.sql(f"select model_bad(0, {argument}) from err_events"))
    assert "InputError" in text
    assert "model_bad: " in text
    for fragment in fragments:
        assert fragment in text


def test_null_input_refused_by_default(spark, bad):
    """on_null='error': a null argument fails the job naming the argument, the row and the fix."""
    ten_rows(spark)
    text = job_failure(
        spark.sql("select model_bad(0, if(id = 4, null, features)) from err_events")
    )
    assert "InputError" in text
    assert "model_bad: argument 2 (list<element: double>): row 4 is null" in text
    assert "register the function with on_null='skip'" in text


def test_null_input_skipped(spark, linear_table):
    """on_null='skip': rows with a null argument give null, others the model's prediction."""
    with register_ray_model(
        spark, linear_table.table, "model_skip", init_linear, apply_linear,
        return_type="bigint", num_actors=1, on_null="skip",
    ):
        # partition 0 (ids 0..19) is null throughout, partition 1 has every third row null
        df = spark.range(0, 40, 1, 2).selectExpr(
            "id", f"if(id < 20 or id % 3 = 0, null, {features_sql()}) as features"
        )
        df.createOrReplaceTempView("err_nulls")
        rows = spark.sql("select id, model_skip(features) as label from err_nulls order by id").collect()
    ids = [r.id for r in rows]
    want = expected_classes(linear_table.model, ids)
    expected = [None if i < 20 or i % 3 == 0 else w for i, w in zip(ids, want)]
    assert [r.label for r in rows] == expected
    assert any(v is not None for v in expected) and any(v is None for v in expected[20:])


# --- refused on the driver, before any table or actor -------------------------------------------


@pytest.mark.parametrize(
    ("return_type", "message"),
    [
        ("not a type", "return_type 'not a type' is not a Spark type"),
        ("timestamp", "return_type timestamp[us, tz=UTC] is not supported; use double, float"),
        ("map<string,double>", "is not supported; use double, float, bigint, int"),
        ("label bigint, at date", "return_type field 'at' date32[day] is not supported"),
        (42, "return_type must be a DDL string or a pyspark DataType (got 42"),
    ],
    ids=["unparsable", "timestamp", "map", "struct-with-date", "not-a-type"],
)
def test_bad_return_type_refused_on_driver(spark, ray_address, return_type, message):
    """An unsupported return_type is a TypeError at registration, before the table is read."""
    start = time.monotonic()
    with pytest.raises(TypeError) as info:
        # the table does not exist: reading it would raise ModelNotFoundError instead
        register_ray_model(
            spark, "ai_model.never_read", "model_typed_bad", init_linear, apply_linear,
            return_type=return_type,
        )
    assert message in str(info.value)
    assert time.monotonic() - start < FAST_S
    assert helpers.pool_namespaces("model_typed_bad") == []


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_actors": 0}, ValueError, "num_actors must be a positive int (got 0)"),
        ({"num_actors": True}, ValueError, "num_actors must be a positive int (got True)"),
        ({"num_actors": 1.5}, ValueError, "num_actors must be a positive int (got 1.5)"),
        ({"name": "model-predict"}, ValueError, "name must be a SQL identifier like 'model_predict' (got 'model-predict')"),
        ({"name": "1model"}, ValueError, "name must be a SQL identifier"),
        ({"name": ""}, ValueError, "name must be a SQL identifier"),
        ({"name": None}, ValueError, "name must be a SQL identifier"),
        ({"on_null": "ignore"}, ValueError, "on_null must be 'error' or 'skip' (got 'ignore')"),
        ({"model_source": "s3"}, ValueError, "model_source must be 'auto', 'storage' or 'object_store' (got 's3')"),
        ({"max_in_flight": 0}, ValueError, "max_in_flight must be a positive int (got 0)"),
        ({"max_retries": -1}, ValueError, "max_retries must be a non-negative int (got -1)"),
        ({"call_timeout_s": 0}, ValueError, "call_timeout_s must be a positive number of seconds"),
        ({"init_timeout_s": "10"}, ValueError, "init_timeout_s must be a positive number of seconds"),
        ({"init_func": "init_linear"}, TypeError, "init_func and apply_func must be callables"),
        ({"conf": {1: "x"}}, TypeError, "conf keys must be strings (got [1])"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_options_refused_on_driver(spark, ray_address, options, error, message):
    """Bad options raise at registration with the option, the value got and what is expected."""
    kwargs: dict[str, Any] = {
        "name": "model_opts", "init_func": init_linear, "apply_func": apply_linear, **options,
    }
    name, init_func, apply_func = kwargs.pop("name"), kwargs.pop("init_func"), kwargs.pop("apply_func")
    with pytest.raises(error) as info:
        register_ray_model(spark, "ai_model.never_read", name, init_func, apply_func, **kwargs)
    assert message in str(info.value)
    assert helpers.pool_namespaces("model_opts") == []


# --- Ray unreachable -----------------------------------------------------------------------------


def test_check_reachable_closed_port_fails_fast():
    """A port nobody listens on: RayUnavailableError naming the address and the fix, at once."""
    address = f"127.0.0.1:{helpers.free_port()}"
    start = time.monotonic()
    with pytest.raises(RayUnavailableError) as info:
        check_reachable(address, who="model_predict")
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert text.startswith(f"model_predict: Ray is unreachable at {address}")
    assert "fix ray_address/RAY_ADDRESS" in text
    assert isinstance(info.value, ConnectionError)
    assert elapsed < FAST_S


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_worker_and_driver_connect_fail_fast_in_fresh_process():
    """In a process without Ray, connect_worker and ensure_ray to a closed port fail fast."""
    port = helpers.free_port()
    proc = _run_python(
        f"""
        import time
        import ray
        from spark_ray_udf import RayUnavailableError
        from spark_ray_udf._ray import connect_worker, ensure_ray

        for name, call in [
            ("connect_worker", lambda: connect_worker("127.0.0.1:{port}", who="model_predict")),
            ("ensure_ray", lambda: ensure_ray("127.0.0.1:{port}")),
        ]:
            start = time.monotonic()
            try:
                call()
            except RayUnavailableError as exc:
                print(name, round(time.monotonic() - start, 3), "|", exc)
            else:
                print(name, "connected?!")
        print("initialized", ray.is_initialized())
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    for name in ("connect_worker", "ensure_ray"):
        seconds, _, message = lines[name].partition(" | ")
        assert float(seconds) < FAST_S, lines[name]
        assert f"Ray is unreachable at 127.0.0.1:{port}" in message
    assert lines["connect_worker"].split(" | ")[1].startswith("model_predict: ")
    assert lines["initialized"] == "False"


def test_register_with_unreachable_ray_address(spark, linear_table):
    """register_ray_model(ray_address=<closed port>) fails fast; the session's Ray keeps working."""
    import ray

    address = f"127.0.0.1:{helpers.free_port()}"
    start = time.monotonic()
    with pytest.raises(RayUnavailableError, match=f"Ray is unreachable at {address}"):
        register_ray_model(
            spark, linear_table.table, "model_far", init_linear, apply_linear,
            return_type="bigint", num_actors=1, ray_address=address,
        )
    assert time.monotonic() - start < FAST_S
    assert helpers.pool_namespaces("model_far") == []
    assert ray.is_initialized()


def test_register_with_another_ray_address(spark, linear_table):
    """A reachable ray_address other than the connected Ray is refused, not silently ignored."""
    import socket

    with socket.socket() as listener:  # something listens there, but it is not our Ray
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(RayUnavailableError, match="already connected to the Ray at") as info:
            register_ray_model(
                spark, linear_table.table, "model_far", init_linear, apply_linear,
                return_type="bigint", num_actors=1, ray_address=address,
            )
    assert f"ray_address={address!r} names another cluster" in str(info.value)
    assert helpers.pool_namespaces("model_far") == []


@pytest.mark.filterwarnings("ignore:It is preferred to specify type hints:UserWarning")
def test_sql_with_pool_address_on_closed_port_fails_fast(spark, bad):
    """A task whose pool address points at a closed port fails fast with RayUnavailableError."""
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    from spark_ray_udf.client import predict_batches

    address = bad.address._replace(ray_address=f"127.0.0.1:{helpers.free_port()}")

    def predict(batches):
        return predict_batches(address, batches)

    far = arrow_udf(predict, "double", ArrowUDFType.SCALAR_ITER)
    df = ten_rows(spark).select(far("id", "features"))
    start = time.monotonic()
    text = job_failure(df)
    assert time.monotonic() - start < FAST_S
    assert "RayUnavailableError" in text
    # a fresh Python worker cannot reach the port; one already connected to the session's Ray
    # refuses a second cluster: both name the address
    assert f"127.0.0.1:{address.ray_address.rsplit(':', 1)[1]}" in text
    assert "model_bad: " in text
