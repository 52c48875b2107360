"""The SQL function end to end: real local Spark, real Ray, real Delta; no mocks.

Every test compares what the function returns through Spark with what the model predicts
in-process on the very same rows (see ``tests.helpers.features_sql``/``features_np``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from spark_ray_udf import PoolClosedError, RayModel, register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, apply_linear_scores, init_linear, make_linear_model
from tests import helpers
from tests.helpers import expected_classes, features_np, features_sql


@pytest.fixture(scope="module")
def predict(spark: Any, linear_table: Any) -> Iterator[RayModel]:
    """``model_predict``: the linear model's classes (bigint), served by 2 actors."""
    with register_ray_model(
        spark,
        linear_table.table,
        "model_predict",
        init_linear,
        apply_linear,
        return_type="bigint",
        num_actors=2,
    ) as model:
        yield model


def events(spark: Any, n: int, partitions: int = 2) -> Any:
    """``id`` and ``features`` (array<double>, 8 values) for ids 0..n-1 in ``partitions``."""
    return spark.range(0, n, 1, partitions).selectExpr("id", f"{features_sql()} as features")


# --- calling the function ------------------------------------------------------------------------


def test_sql_call_equals_in_process_predictions(spark, linear_table, predict):
    """select id, model_predict(features) returns the model's own predictions for each row."""
    events(spark, 200, 3).createOrReplaceTempView("udf_events")
    rows = spark.sql(
        "select id, model_predict(features) as label from udf_events order by id"
    ).collect()
    ids = [r.id for r in rows]
    assert ids == list(range(200))
    assert [r.label for r in rows] == expected_classes(linear_table.model, ids)


def test_dataframe_call_equals_in_process_predictions(spark, linear_table, predict):
    """df.select(model("features")) and model(col) give the same predictions as SQL and numpy."""
    from pyspark.sql import functions as F

    df = events(spark, 150, 2)
    rows = df.select("id", predict("features").alias("a"), predict(F.col("features")).alias("b"))
    rows = sorted(rows.collect())
    expected = expected_classes(linear_table.model, [r.id for r in rows])
    assert [r.a for r in rows] == expected
    assert [r.b for r in rows] == expected


def test_100k_rows_exactly_equal(spark, linear_table, predict):
    """100,000 rows over 8 partitions: every prediction equals the in-process one."""
    n = 100_000
    pdf = events(spark, n, 8).select("id", predict("features").alias("label")).toPandas()
    assert len(pdf) == n
    pdf = pdf.sort_values("id")
    assert pdf["id"].tolist() == list(range(n))
    expected = apply_linear(linear_table.model, features_np(np.arange(n)))
    np.testing.assert_array_equal(pdf["label"].to_numpy(), expected)


def test_order_kept_with_small_batches(spark, linear_table, predict):
    """With 100-row Arrow batches over 10 partitions, each result stays on its own row."""
    with helpers.spark_conf(spark, "spark.sql.execution.arrow.maxRecordsPerBatch", "100"):
        df = events(spark, 6_000, 10).select(
            "id", "features", predict("features").alias("label")
        )
        rows = df.collect()
    # The rows come back partition by partition, in their original order within each.
    assert [r.id for r in rows] == list(range(6_000))
    expected = expected_classes(linear_table.model, [r.id for r in rows])
    assert [r.label for r in rows] == expected
    # the features Spark shipped are the ones the model saw (same numbers both sides)
    np.testing.assert_array_equal(np.array([r.features for r in rows[:50]]), features_np(range(50)))


def test_several_argument_columns(spark, linear_table):
    """An apply_func of 2 or 3 arguments gets them in order: arrays and scalars, float and double."""
    with register_ray_model(
        spark,
        linear_table.table,
        "model_concat",
        init_linear,
        helpers.apply_concat,
        return_type="bigint",
        num_actors=1,
    ) as model:
        df = spark.range(0, 300, 1, 3).selectExpr(
            "id",
            f"{features_sql(5)} as head",
            f"{features_sql(3, start=5)} as tail",
            f"slice({features_sql(2, start=5)}, 1, 2) as mid",
            f"element_at({features_sql(1, start=7)}, 1) as last",
        )
        df.createOrReplaceTempView("udf_split")
        two = spark.sql("select id, model_concat(head, tail) as label from udf_split").collect()
        three = df.select(
            "id", model("head", _as_float_array("mid"), "last").alias("label")
        ).collect()
    two_ids = [r.id for r in two]
    assert [r.label for r in two] == expected_classes(linear_table.model, two_ids)
    # the float32 argument loses precision the same way on both sides
    ids = np.array([r.id for r in three])
    x = features_np(ids)
    x[:, 5:7] = x[:, 5:7].astype(np.float32).astype(np.float64)
    assert [r.label for r in three] == apply_linear(linear_table.model, x).tolist()


def _as_float_array(name: str) -> Any:
    """``name`` cast to array<float> (an Arrow list of float32, a float32 matrix in the actor)."""
    from pyspark.sql import functions as F

    return F.col(name).cast("array<float>")


RETURN_TYPES = [
    ("double", helpers.apply_top_score, "close"),
    ("float", helpers.apply_top_score_f32, "close32"),
    ("bigint", apply_linear, "exact"),
    ("int", apply_linear, "exact"),
    ("string", helpers.apply_label, "exact"),
    ("array<double>", apply_linear_scores, "close"),
    ("label bigint, scores array<double>", helpers.apply_struct_dict, "struct"),
    ("label int, name string, score double", helpers.apply_struct_frame, "struct"),
]


@pytest.mark.parametrize(
    ("return_type", "apply_func", "compare"),
    RETURN_TYPES,
    ids=[t[0] for t in RETURN_TYPES[:-2]] + ["struct-from-dict", "struct-from-dataframe"],
)
def test_return_types(spark, linear_table, return_type, apply_func, compare):
    """Each return type comes back with the values apply_func computes in-process."""
    from pyspark.sql.types import DataType

    with register_ray_model(
        spark,
        linear_table.table,
        "model_typed",
        init_linear,
        apply_func,
        return_type=return_type,
        num_actors=1,
    ) as model:
        assert model.return_type == DataType.fromDDL(return_type)
        events(spark, 120, 2).createOrReplaceTempView("udf_typed")
        df = spark.sql("select id, model_typed(features) as out from udf_typed order by id")
        assert df.schema["out"].dataType == DataType.fromDDL(return_type)
        rows = df.collect()
    got = [r.out for r in rows]
    want = apply_func(linear_table.model, features_np([r.id for r in rows]))
    if compare == "exact":
        assert got == want.tolist()
    elif compare == "close":  # the same arithmetic, but a matmul may round differently per batch
        np.testing.assert_allclose(np.array(got), want, rtol=1e-12, atol=0)
    elif compare == "close32":
        assert all(isinstance(v, float) for v in got)
        np.testing.assert_allclose(np.array(got, dtype=np.float32), want, rtol=1e-6, atol=0)
    else:  # a struct: field by field, as apply_func returned each
        for field in DataType.fromDDL(return_type).names:
            got_field = [r.out[field] for r in rows]
            want_field = np.asarray(want[field])
            if want_field.dtype.kind == "f":
                np.testing.assert_allclose(np.array(got_field), want_field, rtol=1e-12, atol=0)
            else:
                assert got_field == want_field.tolist()


# --- the pool's life cycle -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_versions(spark: Any, tmp_path_factory: Any) -> tuple[str, Any, Any]:
    """A table ``ai_model.tests_versions`` whose v0 and v1 hold two different linear models."""
    table = "ai_model.tests_versions"
    root = tmp_path_factory.mktemp("versions")
    spark.sql(f"drop table if exists {table}")
    m0 = make_linear_model(root / "v0", seed=1)
    m1 = make_linear_model(root / "v1", seed=2)
    assert save_model(spark, root / "v0", table) == 0
    assert save_model(spark, root / "v1", table) == 1
    return table, m0, m1


def _register_versioned(spark: Any, table: str, version: int | None) -> RayModel:
    return register_ray_model(
        spark,
        table,
        "model_versioned",
        init_linear,
        apply_linear,
        return_type="bigint",
        num_actors=2,
        version=version,
    )


def _sql_classes(spark: Any, n: int = 60) -> tuple[list[int], list[int]]:
    events(spark, n, 2).createOrReplaceTempView("udf_versioned")
    rows = spark.sql(
        "select id, model_versioned(features) as label from udf_versioned order by id"
    ).collect()
    return [r.id for r in rows], [r.label for r in rows]


def test_register_again_reuses_or_replaces_pool(spark, two_versions):
    """Same version: same object and actors; another version: new actors, the old ones gone."""
    table, m0, m1 = two_versions
    first = _register_versioned(spark, table, 0)
    latest = None
    try:
        pids = sorted(first.actor_pids())
        assert len(pids) == 2 and helpers.running(pids) == pids
        assert sorted(i.pid for i in first.actors) == pids
        ids, labels = _sql_classes(spark)
        assert labels == expected_classes(m0, ids)

        again = _register_versioned(spark, table, 0)
        assert again is first
        assert sorted(again.actor_pids()) == pids
        assert helpers.pool_namespaces("model_versioned") == [first.namespace]

        latest = _register_versioned(spark, table, None)
        assert latest is not first and latest.version == 1
        assert first.closed and not latest.closed
        new_pids = sorted(latest.actor_pids())
        assert not set(new_pids) & set(pids)
        assert helpers.wait_gone(pids) == []
        assert helpers.pool_namespaces("model_versioned") == [latest.namespace]
        ids, labels = _sql_classes(spark)
        assert labels == expected_classes(m1, ids)
        assert labels != expected_classes(m0, ids)  # the two versions do differ
        with pytest.raises(PoolClosedError, match="model_versioned: the model was closed"):
            first("features")
    finally:
        for model in (first, latest):
            if model is not None:
                model.close()


def test_close_stops_actors_and_removes_folders(spark, two_versions):
    """close() ends every actor, removes the directory entry and the model folders; idempotent."""
    table, m0, _ = two_versions
    model = _register_versioned(spark, table, 0)
    infos = model.actors
    pids = [i.pid for i in infos]
    assert all(os.path.isdir(i.model_dir) for i in infos)
    assert all(os.path.isfile(os.path.join(i.model_dir, "weights.npy")) for i in infos)
    assert helpers.work_roots("model_versioned") != []
    assert helpers.pool_namespaces("model_versioned") == [model.namespace]
    model.close()
    assert model.closed
    assert helpers.wait_gone(pids) == []
    assert helpers.pool_namespaces("model_versioned") == []
    # the machine's shared copy goes with its last holder; other pools may still hold it
    assert [i.model_dir for i in infos if not helpers.model_dir_released(i.model_dir, pids)] == []
    assert helpers.work_roots("model_versioned") == []
    model.close()  # idempotent
    with pytest.raises(PoolClosedError, match="register it again"):
        model("features")
    with pytest.raises(PoolClosedError):
        model.actor_pids()


def test_sql_after_close_names_the_fix(spark, two_versions):
    """The SQL function of a closed model fails with PoolClosedError telling to register again."""
    table, _, _ = two_versions
    with _register_versioned(spark, table, 0):
        _sql_classes(spark, 10)
    with pytest.raises(Exception) as info:
        _sql_classes(spark, 10)
    text = str(info.value)
    assert "PoolClosedError" in text
    assert "model_versioned" in text and "register_ray_model() again" in text


def test_context_manager_closes(spark, linear_table):
    """Leaving the with block closes the model: actors and folders gone."""
    with register_ray_model(
        spark, linear_table.table, "model_scoped", init_linear, apply_linear,
        return_type="bigint", num_actors=1,
    ) as model:
        infos = model.actors
        assert not model.closed and len(infos) == 1
    assert model.closed
    assert helpers.wait_gone([i.pid for i in infos]) == []
    assert helpers.model_dir_released(infos[0].model_dir, [i.pid for i in infos])
    assert helpers.pool_namespaces("model_scoped") == []


# --- where the actors get the model from ---------------------------------------------------------


def test_model_sources_give_the_same_predictions(spark, two_versions):
    """'storage' (what 'auto' picks for a local table and a one-machine Ray): the actors read
    the version's Parquet files and the driver holds no chunk; 'object_store': the driver reads
    the rows and pins them in Ray's object store. Same predictions; reload keeps the source."""
    table, m0, m1 = two_versions
    for source in ("auto", "storage", "object_store"):
        with register_ray_model(
            spark, table, "model_versioned", init_linear, apply_linear,
            return_type="bigint", num_actors=1, version=0, model_source=source,
        ) as model:
            stored = model._pool.stored
            if source == "object_store":
                assert not stored.files and len(stored.chunks) == len(stored.manifest.files)
            else:
                assert stored.files and stored.chunks == {}
            ids, labels = _sql_classes(spark)
            assert labels == expected_classes(m0, ids)
            assert model.reload(1) == 1
            assert bool(model._pool.stored.files) == (source != "object_store")
            ids, labels = _sql_classes(spark)
            assert labels == expected_classes(m1, ids)


def test_storage_source_refused_for_a_table_with_deletion_vectors(spark, tmp_path):
    """model_source='storage' on a table the actors cannot read as plain Parquet says why and
    what to pass instead; 'auto' falls back to the object store and serves."""
    from spark_ray_udf import ModelTableError

    model = make_linear_model(tmp_path / "m", seed=3)
    table = str(tmp_path / "dv_table")
    save_model(spark, tmp_path / "m", table)
    spark.sql(f"ALTER TABLE delta.`{table}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    with pytest.raises(ModelTableError, match=r"model_source='storage' .* deletion vectors.*pass model_source='auto' or 'object_store'"):
        register_ray_model(spark, table, "model_dv", init_linear, apply_linear, return_type="bigint", num_actors=1, model_source="storage")
    assert helpers.pool_namespaces("model_dv") == []
    with register_ray_model(spark, table, "model_dv", init_linear, apply_linear, return_type="bigint", num_actors=1) as served:
        assert served._pool.stored.chunks and not served._pool.stored.files
        ids = list(range(40))
        events(spark, 40, 2).createOrReplaceTempView("udf_dv")
        rows = spark.sql("select id, model_dv(features) as label from udf_dv order by id").collect()
        assert [r.label for r in rows] == expected_classes(model, ids)
