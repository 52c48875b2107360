"""The README's example, run as written (with temporary paths)."""

from __future__ import annotations

import numpy as np

from spark_ray_udf import register_ray_model, save_model
from spark_ray_udf.testing import apply_linear, init_linear, make_linear_model


def test_readme_example(spark, ray_address, tmp_path):
    """The README lines register a model and serve it from SQL and the DataFrame API."""
    model_dir = tmp_path / "model"
    linear = make_linear_model(model_dir, n_features=8)
    spark.sql("CREATE DATABASE IF NOT EXISTS ai_model")
    version = save_model(spark, model_dir, "ai_model.linear_readme")
    assert version == 0
    with register_ray_model(spark, "ai_model.linear_readme", "model_predict_readme",
                            init_linear, apply_linear,
                            return_type="bigint", num_actors=2) as model:
        spark.range(1000).selectExpr("id", "array_repeat(cast(id as double), 8) as features") \
            .createOrReplaceTempView("events_readme")
        rows = spark.sql(
            "select id, model_predict_readme(features) as predicted from events_readme"
        ).collect()
        frame = spark.table("events_readme").select("id", model("features").alias("p")).collect()
    x = np.repeat(np.arange(1000, dtype=np.float64)[:, None], 8, axis=1)
    expected = linear.predict(x)
    assert sorted((r.id, r.predicted) for r in rows) == list(enumerate(expected.tolist()))
    assert sorted((r.id, r.p) for r in frame) == list(enumerate(expected.tolist()))
