"""A failed Spark query whose cause is the library's error: explain() and library_errors()."""

from __future__ import annotations

import pytest

from spark_ray_udf import register_ray_model
from spark_ray_udf.errors import InputError, explain, library_errors
from spark_ray_udf.testing import apply_linear, init_linear
from tests.helpers import features_sql, spark_conf

NULL_ROW_SQL = f"select explain_nulls(if(id = 1, null, {features_sql()})) as c from range(3)"


@pytest.fixture(scope="module")
def nulls_model(spark, ray_address, linear_table):
    with register_ray_model(
        spark, linear_table.table, "explain_nulls", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    ) as model:
        yield model


def test_explain_finds_the_library_error_in_the_spark_exception(spark, nulls_model):
    """PySpark's exception starts with its own words; explain() returns the InputError."""
    with pytest.raises(Exception) as info:
        spark.sql(NULL_ROW_SQL).collect()
    assert not str(info.value).startswith("explain_nulls")  # what PySpark gives
    found = explain(info.value)
    assert isinstance(found, InputError)
    assert str(found).startswith("explain_nulls: argument 1 ("), str(found)
    assert "is null" in str(found) and "on_null='skip'" in str(found)
    assert "Traceback" not in str(found) and "\n" not in str(found)


def test_library_errors_reraises_as_the_library_error(spark, nulls_model):
    """Inside ``library_errors()`` the caught exception is the InputError, Spark's its cause."""
    with pytest.raises(InputError) as info:
        with library_errors():
            spark.sql(NULL_ROW_SQL).collect()
    assert str(info.value).startswith("explain_nulls: argument 1 (")
    assert type(info.value.__cause__).__name__ == "PythonException"


def test_other_errors_pass_unchanged(spark):
    """A query that fails for another reason is not turned into a library error."""
    with pytest.raises(Exception) as info:
        with library_errors():
            spark.sql("select no_such_function_anywhere(1)").collect()
    assert explain(info.value) is None
    assert "no_such_function_anywhere" in str(info.value)


def test_hide_traceback_leaves_only_the_message(spark, nulls_model):
    """With PySpark's hideTraceback conf the driver's message is one line of ours after
    PySpark's prefix (no executor stack)."""
    with spark_conf(spark, "spark.sql.execution.pyspark.udf.hideTraceback.enabled", "true"):
        with pytest.raises(Exception) as info:
            spark.sql(NULL_ROW_SQL).collect()
    text = str(info.value)
    assert "Traceback" not in text, text[:2000]
    assert "spark_ray_udf.errors.InputError: explain_nulls: argument 1 (" in text
    assert str(explain(info.value)).startswith("explain_nulls: argument 1 (")
