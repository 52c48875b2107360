"""Bad input through the whole path (SQL -> Spark's Arrow batches -> Ray actor -> apply_func), and
hostile model tables, pool isolation and network exposure (the end of the file).

One test per case. Each either fails the Spark job with our error naming the function, the
argument (or apply_func) and the row or batch rows, and saying how to fix it; or returns the
documented result (docs/reliability.md, "Bad input"). Pure conversion cases without Spark are in
tests/test_arrow.py; the cases in tests/test_udf_errors.py (a struct argument, a timestamp with
time zone, an array of dates, a ragged array in the first batch, a null array, apply_func raising
or returning one value too few or strings for double) are not repeated here.

The functions all use ``tests.helpers.apply_modes``: its first argument (the first value of each
batch) picks what it returns, so four pools serve every case.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from spark_ray_udf import RayModel, register_ray_model
from spark_ray_udf.testing import init_linear
from tests import helpers
from tests.helpers import spark_conf

BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"


def job_failure(df: Any) -> str:
    """Run ``df`` and return the text of the exception the Spark job fails with."""
    from pyspark.errors import PySparkException

    with pytest.raises(PySparkException) as info:
        df.collect()
    return str(info.value)


def register(spark: Any, table: str, name: str, return_type: str, **kw: Any) -> RayModel:
    return register_ray_model(
        spark, table, name, init_linear, helpers.apply_modes,
        return_type=return_type, num_actors=1, **kw,
    )


@pytest.fixture(scope="module")
def pools(spark: Any, linear_table: Any) -> Iterator[dict[str, RayModel]]:
    """``bi_double`` (nulls refused), ``bi_skip`` (nulls skipped), ``bi_bigint``, ``bi_string``."""
    models = {
        "bi_double": register(spark, linear_table.table, "bi_double", "double"),
        "bi_skip": register(spark, linear_table.table, "bi_skip", "double", on_null="skip"),
        "bi_bigint": register(spark, linear_table.table, "bi_bigint", "bigint"),
        "bi_string": register(spark, linear_table.table, "bi_string", "string"),
    }
    try:
        yield models
    finally:
        for model in models.values():
            model.close()


@pytest.fixture()
def rows20(spark: Any, pools: Any) -> Any:
    """``bi_rows``: ids 0..19 in one partition (so batch rows are task rows), batches of 5."""
    spark.range(0, 20, 1, 1).createOrReplaceTempView("bi_rows")
    with spark_conf(spark, BATCH_KEY, "5"):
        yield spark


def values(spark: Any, sql: str) -> list[Any]:
    return [r[0] for r in spark.sql(sql).collect()]


# --- nulls ---------------------------------------------------------------------------------------


def test_null_scalar_in_a_later_batch_names_the_task_row(rows20):
    """on_null='error': a null in batch 3 names argument 2 and its row counted from the task."""
    text = job_failure(rows20.sql(
        "select bi_double(0, if(id = 13, null, cast(id as double))) from bi_rows"
    ))
    assert "InputError" in text
    assert "bi_double: argument 2 (double): row 13 is null" in text
    assert "filter or coalesce nulls in SQL, or register the function with on_null='skip'" in text


def test_null_skip_returns_null_for_those_rows(rows20):
    """on_null='skip': rows with a null argument give null; the others their prediction."""
    got = values(rows20, "select bi_skip(0, if(id % 4 = 1, null, cast(id as double))) from bi_rows")
    assert got == [None if i % 4 == 1 else float(i) for i in range(20)]


def test_null_skip_checks_every_argument(rows20):
    """on_null='skip': a null in any argument makes that row null."""
    got = values(rows20, """
        select bi_skip(0, if(id = 2, null, cast(id as double)), if(id = 7, null, 1D)) from bi_rows
    """)
    assert got == [None if i in (2, 7) else float(i) + 1.0 for i in range(20)]


def test_null_skip_whole_batch_null_gives_nulls(rows20):
    """on_null='skip': a batch of only nulls gives nulls (apply_func is not called)."""
    got = values(rows20, "select bi_skip(0, if(id < 10, null, 1D)) from bi_rows")
    assert got == [None] * 10 + [1.0] * 10


def test_null_element_inside_array_refused_even_when_skipping(rows20):
    """A null inside an array is not a null row: refused under 'skip' too, naming the row."""
    text = job_failure(rows20.sql("""
        select bi_skip(0, if(id = 7, array(1D, cast(null as double)), array(1D, 2D))) from bi_rows
    """))
    assert "InputError" in text
    assert "bi_skip: argument 2 (list<element: double>): row 7 holds a null element" in text
    assert "transform(col, x -> coalesce(x, 0.0))" in text


# --- shapes and types of arguments ---------------------------------------------------------------


def test_ragged_array_in_a_later_batch_names_both_rows(rows20):
    """Arrays of different lengths within a batch: the odd row and the reference row, by task row."""
    text = job_failure(rows20.sql(
        "select bi_double(0, if(id = 12, array(1D), array(1D, 2D))) from bi_rows"
    ))
    assert "InputError" in text
    assert "bi_double: argument 2 (list<element: double not null>): row 12 has an array of 1 " \
        "elements but row 10 has 2" in text
    assert "pad or truncate the arrays, or filter the odd rows in SQL" in text


def test_array_length_may_change_between_batches(rows20):
    """Documented: the fixed shape is per batch; batches of other lengths each get their own."""
    got = values(rows20, "select bi_string(9, if(id < 5, array(1D, 2D), array(1D, 2D, 3D))) from bi_rows")
    assert got[:5] == ["float64 (5, 2)"] * 5
    assert got[5:] == ["float64 (5, 3)"] * 15


def test_array_of_strings_refused(rows20):
    """array<string> where numbers are expected: InputError naming the element type and a cast."""
    text = job_failure(rows20.sql("select bi_double(0, array('a', 'b')) from bi_rows"))
    assert "InputError" in text
    assert "bi_double: argument 2 (list<element: string not null>) is an array of string" in text
    assert "only arrays of numbers (or of such arrays) are supported: cast it in SQL" in text


def test_array_of_structs_refused(rows20):
    """array<struct> where an array of numbers is expected: InputError naming the struct."""
    text = job_failure(rows20.sql(
        "select bi_double(0, array(named_struct('x', 1D), named_struct('x', 2D))) from bi_rows"
    ))
    assert "InputError" in text
    assert "bi_double: argument 2 (list<element: struct<x: double not null> not null>) is an " \
        "array of struct<x: double not null>" in text


@pytest.mark.parametrize(
    ("sql_arg", "arrow_type"),
    [
        ("map('a', 1D)", "map<string, double>"),
        ("cast(id as decimal(10, 2))", "decimal128(10, 2)"),
        ("to_timestamp_ntz('2024-01-01 00:00:00')", "timestamp[us]"),
        ("date'2024-01-01'", "date32[day]"),
    ],
    ids=["map", "decimal", "timestamp_ntz", "date"],
)
def test_unsupported_scalar_type_refused_with_cast_hint(rows20, sql_arg, arrow_type):
    """map, decimal, timestamp_ntz, date: InputError naming the argument's type and a cast."""
    text = job_failure(rows20.sql(f"select bi_double(0, {sql_arg}) from bi_rows"))
    assert "InputError" in text
    assert f"bi_double: argument 2 ({arrow_type}" in text
    assert f"has the unsupported type {arrow_type}" in text
    assert "cast it in SQL, e.g. cast(col as double)" in text


def test_strings_and_binary_arrive_as_object_arrays(rows20):
    """Documented: string and binary arguments reach apply_func as numpy object arrays."""
    got = values(rows20, "select bi_string(9, cast(id as string), cast('ab' as binary)) from bi_rows")
    assert set(got) == {"object (5,) | object (5,)"}


def test_numeric_dtypes_are_kept(rows20):
    """Documented: int, tinyint, float and boolean keep their numpy dtype; float arrays stay float32."""
    got = values(rows20, """
        select bi_string(9, cast(id as int), cast(id as tinyint), cast(id as float), id > 3,
                         array(cast(id as float), 1F)) from bi_rows
    """)
    assert set(got) == {"int32 (5,) | int8 (5,) | float32 (5,) | bool (5,) | float32 (5, 2)"}


def test_nested_arrays_become_3d(rows20):
    """Documented: array<array<double>> of fixed shape reaches apply_func as a 3-D array."""
    got = values(rows20, "select bi_string(9, array(array(1D, 2D), array(3D, id))) from bi_rows")
    assert set(got) == {"float64 (5, 2, 2)"}


def test_nan_and_infinity_pass_through(rows20):
    """Documented: NaN and infinity are values, not nulls; they reach apply_func and come back."""
    got = values(rows20, """
        select bi_double(0, if(id = 3, cast('NaN' as double), cast(id as double)),
                         if(id = 4, array(cast('Infinity' as double), 0D), array(0D, 0D)))
        from bi_rows
    """)
    assert math.isnan(got[3]) and got[4] == math.inf
    assert [g for i, g in enumerate(got) if i not in (3, 4)] == [float(i) for i in range(20) if i not in (3, 4)]


def test_call_without_arguments_refused(rows20):
    """A call without any column: InputError naming the function and showing a call."""
    text = job_failure(rows20.sql("select bi_double() from bi_rows"))
    assert "InputError" in text
    assert "bi_double: called without arguments; pass the columns apply_func takes, e.g. " \
        "bi_double(features)" in text


# --- the size and shape of the data --------------------------------------------------------------


def test_empty_partitions(spark, pools):
    """Most partitions empty (6 rows over 16 partitions): every row predicted, none invented."""
    spark.range(0, 6, 1, 2).repartition(16).createOrReplaceTempView("bi_sparse")
    rows = spark.sql("select id, bi_double(0, cast(id as double)) as s from bi_sparse").collect()
    assert sorted((r.id, r.s) for r in rows) == [(i, float(i)) for i in range(6)]


def test_empty_dataframe(spark, pools):
    """No rows at all: an empty result, no error."""
    spark.range(0, 10, 1, 2).where("id < 0").createOrReplaceTempView("bi_empty")
    assert spark.sql("select bi_double(0, cast(id as double)) from bi_empty").collect() == []


def test_batches_of_one_row(spark, pools):
    """maxRecordsPerBatch=1: every batch is one row, each predicted on its own row."""
    spark.range(0, 7, 1, 2).createOrReplaceTempView("bi_ones")
    with spark_conf(spark, BATCH_KEY, "1"):
        rows = spark.sql("select id, bi_double(0, cast(id as double)) as s from bi_ones").collect()
    assert sorted((r.id, r.s) for r in rows) == [(i, float(i)) for i in range(7)]


def test_very_large_rows(spark, pools):
    """Rows of 200,000-element arrays go through whole (a few MB per batch)."""
    spark.range(0, 6, 1, 2).createOrReplaceTempView("bi_wide")
    rows = spark.sql("""
        select id, bi_double(0, array_repeat(cast(id as double), 200000)) as s from bi_wide
    """).collect()
    assert sorted((r.id, r.s) for r in rows) == [(i, 200000.0 * i) for i in range(6)]


# --- what apply_func returns ---------------------------------------------------------------------


def test_one_value_too_many(rows20):
    """apply_func returning n+1 values: ModelApplyError naming the batch's task rows."""
    text = job_failure(rows20.sql("select bi_double(if(id >= 5, 2, 0), 1D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_double: apply_func's result for rows 5..9: expected 5 values (one per row), got 6" in text
    assert "apply_func must return one prediction per input row" in text


def test_2d_result_for_a_scalar_type(rows20):
    """A 2-D array for a double function: ModelApplyError with both fixes."""
    text = job_failure(rows20.sql("select bi_double(3, 1D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_double: apply_func's result for rows 0..4: got an array of shape (5, 2) for " \
        "return type double" in text
    assert "reduce it to one value per row (e.g. .argmax(axis=1)) or declare " \
        "return_type='array<double>'" in text


def test_strings_for_bigint(rows20):
    """Strings for a bigint function: ModelApplyError naming both types."""
    text = job_failure(rows20.sql("select bi_bigint(4, 1D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_bigint: apply_func's result for rows 0..4: got values of type string for return " \
        "type int64; return numbers or change return_type" in text


def test_numbers_for_string(rows20):
    """Numbers for a string function: ModelApplyError asking for strings."""
    text = job_failure(rows20.sql("select bi_string(0, 1D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_string: apply_func's result for rows 0..4: got values of type double for return " \
        "type string; return strings or change return_type" in text


def test_fractional_floats_for_bigint(rows20):
    """Floats with a fraction for a bigint function: refused, never silently truncated."""
    text = job_failure(rows20.sql("select bi_bigint(0, 0.5D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_bigint: apply_func's result for rows 0..4: values of type double do not fit " \
        "return type int64" in text
    assert "round or clip them, or change return_type" in text


def test_integral_floats_for_bigint_accepted(rows20):
    """Documented: floats without a fraction are accepted for bigint and converted exactly."""
    assert values(rows20, "select bi_bigint(8, 1D) from bi_rows") == [0, 1, 2, 3, 4] * 4


def test_none_result(rows20):
    """apply_func returning None: ModelApplyError saying one value per row was expected."""
    text = job_failure(rows20.sql("select bi_double(5, 1D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_double: apply_func's result for rows 0..4: expected 5 values (one per row), got " \
        "NoneType" in text


def test_scalar_result(rows20):
    """apply_func returning one number for the whole batch: ModelApplyError."""
    text = job_failure(rows20.sql("select bi_double(6, 1D) from bi_rows"))
    assert "ModelApplyError" in text
    assert "bi_double: apply_func's result for rows 0..4: expected 5 values (one per row), got " \
        "float64 with shape ()" in text


def test_list_with_none_gives_null_rows(rows20):
    """Documented: a Python list result may hold None, which becomes a null prediction."""
    got = values(rows20, "select bi_double(7, cast(id as double)) from bi_rows")
    assert got == [None if i % 5 == 2 else float(i) for i in range(20)]


def test_raising_in_one_batch_names_its_rows(rows20):
    """apply_func raising on batch 3 only: ModelApplyError for rows 10..14 with the traceback."""
    text = job_failure(rows20.sql(
        "select bi_double(if(id >= 10 and id < 15, 1, 0), 1D) from bi_rows"
    ))
    assert "ModelApplyError" in text
    assert "bi_double: apply_func tests.helpers.apply_modes raised on actor 0" in text
    assert "for rows 10..14 of the task" in text
    assert "ValueError: apply_modes refused the batch (on purpose)" in text


# --- hostile model tables, isolation, network (docs/security.md) ---------------------------------


def test_malicious_pickle_in_a_model_is_copied_never_unpickled(spark, ray_address, tmp_path):
    """A model folder holding a malicious pickle: save, load and serve copy its bytes only."""
    import hashlib
    import pickle

    from spark_ray_udf import load_model, save_model
    from spark_ray_udf.testing import make_linear_model

    marker = tmp_path / "unpickled-by-someone"
    folder = tmp_path / "model"
    make_linear_model(folder)
    payload = pickle.dumps(helpers.Touch(str(marker)))
    (folder / "model.pkl").write_bytes(payload)
    table = str(tmp_path / "table")
    save_model(spark, folder, table)
    load_model(spark, table, tmp_path / "loaded")
    assert (tmp_path / "loaded" / "model.pkl").read_bytes() == payload
    with register_ray_model(
        spark, table, "bi_pickle", helpers.init_digests, helpers.apply_digest,
        return_type="string", num_actors=1,
    ):
        got = values(spark, "select bi_pickle('model.pkl') from range(2)")
    assert got == [hashlib.sha256(payload).hexdigest()] * 2, "the actor got the exact bytes"
    assert not marker.exists(), "nothing in save/load/register/serve unpickled the model"
    pickle.loads(payload)  # the payload is live: unpickling it anywhere creates the marker
    assert marker.exists()


def test_library_source_has_no_unpickling_call():
    """No pickle/cloudpickle/joblib/torch load and no allow_pickle=True in spark_ray_udf."""
    import re
    from pathlib import Path

    import spark_ray_udf

    pattern = re.compile(
        r"pickle\.loads?\(|joblib\.load|torch\.load|allow_pickle\s*=\s*True|dill\.loads?\("
    )
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for path in Path(spark_ray_udf.__file__).parent.glob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def _rewrite_paths(spark: Any, table: str, old: str, new: str) -> None:
    """Commit a new version of ``table`` whose rows of file ``old`` claim the path ``new``."""
    df = spark.read.format("delta").load(table)
    rows = [r.asDict() for r in df.collect()]
    for r in rows:
        if r["kind"] == "file" and r["path"] == old:
            r["path"] = new
    spark.createDataFrame(rows, schema=df.schema).write.format("delta").mode("overwrite").save(table)


def test_table_with_escaping_path_refused_at_registration(spark, ray_address, tmp_path):
    """A crafted table whose file path climbs out ('..'): refused before any actor starts."""
    from spark_ray_udf import ModelTableError, save_model
    from spark_ray_udf.testing import make_linear_model

    make_linear_model(tmp_path / "model")
    table = str(tmp_path / "table")
    save_model(spark, tmp_path / "model", table)
    _rewrite_paths(spark, table, "weights.npy", "../escape.npy")
    with pytest.raises(ModelTableError) as info:
        register_ray_model(spark, table, "bi_escape", init_linear, helpers.apply_modes)
    assert f"{table}@v1: stored path '../escape.npy' escapes the model folder ('..')" in str(info.value)
    assert helpers.pool_namespaces("bi_escape") == []
    assert helpers.work_roots("bi_escape") == []


@pytest.mark.parametrize(
    "bad_path", ["../escape.bin", "sub/../../escape.bin", "ABSOLUTE"], ids=["dotdot", "inner-dotdot", "absolute"]
)
def test_actor_rechecks_every_path_before_writing(ray_address, tmp_path, bad_path):
    """A manifest that skipped the driver's checks: the actor refuses it and writes nothing."""
    import hashlib

    import pyarrow as pa
    import ray

    from spark_ray_udf import ModelTableError
    from spark_ray_udf.pool import WorkerSpec, start_actors
    from spark_ray_udf.store import Manifest, ModelFile, StoredModel

    if bad_path == "ABSOLUTE":
        bad_path = str(tmp_path / "escape.bin")
    data = b"evil"
    manifest = Manifest(
        files=(ModelFile(bad_path, len(data), hashlib.sha256(data).hexdigest(), 1),),
        dirs=(), chunk_size=1024,
    )
    root = tmp_path / "pools" / "spark-ray-udf.bi_actor_check.0"
    spec = WorkerSpec(
        function="bi_actor_check", table="crafted", version=0, manifest=manifest,
        init_func=init_linear, apply_func=helpers.apply_modes, conf={},
        return_type=pa.float64(), on_null="error", work_root=str(root), fetch_timeout_s=30,
    )
    stored = StoredModel("crafted", 0, manifest, {(bad_path, 0): ray.put(data)})
    with pytest.raises(ModelTableError, match=r"^crafted@v0: stored path .* (escapes|is absolute)"):
        start_actors(spec, stored, num_actors=1, options={}, timeout_s=120)
    assert [p for p in tmp_path.rglob("escape.bin")] == []


def test_each_pool_in_its_own_namespace(pools):
    """Every registered function has its own Ray namespace: its actors are named there only."""
    import ray

    namespaces = {name: model.namespace for name, model in pools.items()}
    assert len(set(namespaces.values())) == len(pools)
    for name, namespace in namespaces.items():
        assert namespace.startswith(f"spark-ray-udf.{name}.")
        actor_names = [info.name for info in pools[name].actors]
        assert all(n.startswith(f"{name}-") for n in actor_names) and actor_names
        assert ray.get_actor(actor_names[0], namespace=namespace) is not None
        for other, other_namespace in namespaces.items():
            if other != name:
                with pytest.raises(ValueError):
                    ray.get_actor(actor_names[0], namespace=other_namespace)


def test_embedded_ray_and_spark_listen_on_loopback_only(spark, ray_address, pools):
    """Every port the session's own Ray (and Spark) listens on is on 127.0.0.1; no dashboard."""
    import psutil

    from spark_ray_udf._ray import is_loopback

    assert is_loopback(ray_address), ray_address
    mine: dict[int, str] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            mine[proc.pid] = proc.name()
        except psutil.NoSuchProcess:
            pass
    listening = [
        c for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in mine
    ]
    names = {mine[c.pid] for c in listening}
    assert {"gcs_server", "raylet"} <= names, names
    wide = [
        (mine[c.pid], c.laddr.ip, c.laddr.port)
        for c in listening
        if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    ]
    assert wide == [], f"listening beyond loopback: {wide}"
    assert 8265 not in {c.laddr.port for c in listening}, "the dashboard is off"
