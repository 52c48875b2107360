"""Keeping every actor busy: a task's large batch is cut into pieces for the idle actors and the
results are put back in order; ``min_split_rows=None`` sends it whole."""

from __future__ import annotations

import pytest

from spark_ray_udf import register_ray_model
from tests import helpers


@pytest.mark.parametrize(("min_split_rows", "actors_used"), [(500, 2), (None, 1)])
def test_one_partition_keeps_both_actors_busy(spark, linear_table, tmp_path, min_split_rows, actors_used):
    """One partition of 3,000 rows (one Arrow batch) with 2 actors: cut in two pieces, one per
    actor, predictions exact and in order; without splitting one actor does it all."""
    progress = tmp_path / "progress"
    progress.mkdir()
    spark.sql(
        f"select id, {helpers.features_sql()} as features from range(3000)"
    ).coalesce(1).createOrReplaceTempView("split_events")
    with register_ray_model(
        spark, linear_table.table, "split_fn", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=2, min_split_rows=min_split_rows,
        conf={"sleep_s": 0.2, "progress_dir": str(progress)},
    ) as model:
        rows = spark.sql(
            "select id, split_fn(features) as p from split_events"
        ).collect()
        assert [r["id"] for r in rows] == list(range(3000))
        assert [r["p"] for r in rows] == helpers.expected_classes(linear_table.model, list(range(3000)))
        used = set(helpers.progress_pids(progress))
        assert len(used) == actors_used and used <= set(model.actor_pids())
        stats = model.stats()
        assert stats["rows"]["sql"] == 3000 and stats["batches"]["sql"] == actors_used
