"""Pools that Ray cannot place fail fast and say why; placement options pass through to Ray.

Real Spark, Ray and Delta (the session's embedded Ray). The pure rules of
``spark_ray_udf.placement`` are tested first, without Ray.
"""

from __future__ import annotations

import time

import pytest

from spark_ray_udf import PlacementError, register_ray_model
from spark_ray_udf import _ray, placement
from spark_ray_udf.placement import Node
from spark_ray_udf.testing import apply_linear, init_linear
from tests import helpers

# --- the rules, without Ray ----------------------------------------------------------------------

NODES = [Node("a", {"CPU": 4.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.0}), Node("b", {"CPU": 2.0}, {"CPU": 2.0})]


class _Affinity:  # the attributes Ray's NodeAffinitySchedulingStrategy has
    def __init__(self, node_id: str, soft: bool) -> None:
        self.node_id, self.soft = node_id, soft


@pytest.mark.parametrize(
    "request_, strategy, expected",
    [
        ({"CPU": 4.0}, None, None),
        ({"CPU": 4.0}, "SPREAD", None),
        ({"CPU": 4.0}, _Affinity("b", soft=False), "no node has CPU 4 (the largest node has CPU 2)"),
        ({"CPU": 4.0}, _Affinity("b", soft=True), None),
        ({"CPU": 1.0}, _Affinity("gone", soft=False), "names node gone, which is not alive"),
        ({"CPU": 1.0, "GPU": 2.0}, None, "no node has GPU 2 (the largest node has GPU 1)"),
        ({"accelerator_type:A100": 0.001}, None, "no node has accelerator_type:A100 0.001"),
    ],
)
def test_unfit_reason(request_, strategy, expected):
    """A request fits when one allowed node has it all in total, whatever is free now."""
    why = placement.unfit_reason(request_, NODES, strategy=strategy)
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why


def test_placement_group_rules():
    """An actor in a placement group must fit its bundle; the group must fit the nodes."""
    bundles = [{"CPU": 1.0}, {"CPU": 2.0}]
    assert placement.unfit_reason({"CPU": 2.0}, NODES, bundles=bundles) is None
    assert "bundle 0 lacks CPU 2" in str(placement.unfit_reason({"CPU": 2.0}, NODES, bundles=bundles, bundle_index=0))
    assert placement.group_unfit_reason([{"CPU": 2.0}] * 2, "STRICT_SPREAD", NODES) is None
    assert "3 bundles on 3 different nodes; 2 nodes" in str(
        placement.group_unfit_reason([{"CPU": 1.0}] * 3, "STRICT_SPREAD", NODES)
    )
    assert "no node has CPU 5" in str(placement.group_unfit_reason([{"CPU": 2.5}] * 2, "STRICT_PACK", NODES))
    assert placement.group_unfit_reason([{"CPU": 2.5}] * 2, "PACK", NODES) is None


# --- Ray's own view (private accessors in _ray.py) -----------------------------------------------


def test_private_ray_accessors(ray_address):
    """The GCS accessors in _ray.py read what Ray holds: fails when Ray changes them."""
    import ray

    probe = ray.remote(helpers.Probe)
    placed = probe.options(num_cpus=0.25).remote()
    stuck = probe.options(num_cpus=0.125, resources={"h3_no_such_resource": 1}).remote()
    try:
        ray.get(placed.ready.remote(), timeout=60)
        ok = _ray.actor_placement(placed)
        assert ok.state == "ALIVE" and ok.placed and ok.required == {"CPU": 0.25}
        assert ok.placement_group_id == ""
        helpers.wait_for(lambda: _ray.actor_placement(stuck).state == "PENDING_CREATION", 30, "pending")
        pending = _ray.actor_placement(stuck)
        assert not pending.placed
        assert pending.required == {"CPU": 0.125, "h3_no_such_resource": 1.0}
        view = _ray.cluster_resources()
        assert len(view.nodes) == len([n for n in ray.nodes() if n["Alive"]])
        assert sum(t.get("CPU", 0) for _, t, _ in view.nodes) == ray.cluster_resources()["CPU"]
        assert all(0 <= f.get("CPU", 0) <= t.get("CPU", 0) for _, t, f in view.nodes)
        helpers.wait_for(
            lambda: ({"CPU": 0.125, "h3_no_such_resource": 1.0}, 1) in _ray.cluster_resources().demand,
            30, "the stuck actor's shape in Ray's pending demand",
        )
        assert _ray.autoscaler_running() is False  # the embedded Ray has no autoscaler
    finally:
        ray.kill(placed)
        ray.kill(stuck)


# --- impossible requests fail at registration ----------------------------------------------------


def _impossible_cases():
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return [
        pytest.param({"num_cpus": 64}, "CPU 64", id="num_cpus=64"),
        pytest.param({"num_gpus": 1}, "GPU 1", id="num_gpus=1"),
        pytest.param({"resources": {"tpu_v9": 1}}, "tpu_v9 1", id="unknown-resource"),
        pytest.param({"accelerator_type": "H3X"}, "accelerator_type:H3X", id="accelerator_type"),
        pytest.param(
            {"scheduling_strategy": NodeAffinitySchedulingStrategy("ab" * 28, soft=False)},
            "which is not alive", id="node-affinity",
        ),
    ]


@pytest.mark.parametrize("options, asked", _impossible_cases())
def test_impossible_request_fails_in_seconds(spark, linear_table, options, asked):
    """A request no node could ever hold fails before any actor starts, naming what was asked,
    what the cluster has and the fix; no pool is left behind."""
    import ray

    if options.get("num_cpus") == 64 and ray.cluster_resources()["CPU"] >= 64:
        options = {"num_cpus": 4 * ray.cluster_resources()["CPU"]}
        asked = f"CPU {options['num_cpus']:g}"
    start = time.monotonic()
    with pytest.raises(PlacementError) as info:
        register_ray_model(
            spark, linear_table.table, "place_never", init_linear, apply_linear,
            return_type="bigint", actor_options=options,
        )
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert f"place_never: Ray cannot place 2 of the 2 actors loading {linear_table.table}@v" in text
    assert asked in text
    assert "in total" in text and "free, on 1 node" in text
    assert "Fix: ask less of each actor" in text
    assert helpers.pool_namespaces("place_never") == []


def test_strict_spread_group_on_one_node_fails_in_seconds(spark, linear_table):
    """A placement group that one node cannot hold (STRICT_SPREAD of 2 bundles) fails fast."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.25}] * 2, strategy="STRICT_SPREAD")
    try:
        start = time.monotonic()
        with pytest.raises(PlacementError, match="STRICT_SPREAD puts its 2 bundles on 2 different"):
            register_ray_model(
                spark, linear_table.table, "place_group", init_linear, apply_linear,
                return_type="bigint",
                actor_options={"scheduling_strategy": PlacementGroupSchedulingStrategy(pg)},
            )
        assert time.monotonic() - start < 10
    finally:
        remove_placement_group(pg)


# --- placement options pass through --------------------------------------------------------------


def test_placement_options_pass_through(spark, linear_table):
    """memory, a PACK placement group and a SPREAD strategy reach Ray as asked, and serve."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ids = list(range(40))
    df = spark.range(0, 40, 1, 2).selectExpr("id", helpers.features_sql() + " as features")
    pg = placement_group([{"CPU": 0.25, "memory": 2**26}] * 2, strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    cases = {
        "place_memory": {"num_cpus": 0.25, "memory": 2**26},
        "place_spread": {"scheduling_strategy": "SPREAD"},
        "place_pack": {"memory": 2**26, "scheduling_strategy": PlacementGroupSchedulingStrategy(pg)},
    }
    try:
        for name, options in cases.items():
            with register_ray_model(
                spark, linear_table.table, name, init_linear, apply_linear,
                return_type="bigint", actor_options=options,
            ) as model:
                rows = sorted(df.select("id", model("features").alias("c")).collect())
                assert [r.c for r in rows] == helpers.expected_classes(linear_table.model, ids)
                seen = [_ray.actor_placement(a) for a in model._pool.generation.actors]
                if name == "place_memory":
                    assert all(p.required == {"CPU": 0.25, "memory": 2.0**26} for p in seen)
                if name == "place_pack":
                    assert all(p.placement_group_id == pg.id.hex() for p in seen)
    finally:
        remove_placement_group(pg)


# --- a full cluster ------------------------------------------------------------------------------


def test_full_cluster_fails_within_30s_naming_holders(spark, linear_table):
    """When the registered functions hold the cluster, the next pool (and a reload) fails in
    under 30 s naming who holds what; the old pool keeps serving."""
    import ray

    def stable_free() -> float:  # pools of earlier tests may still be releasing theirs
        before = -1.0
        while True:
            now = ray.available_resources().get("CPU", 0.0)
            if now == before:
                return now
            before = now
            time.sleep(1.0)

    free = stable_free()
    hog = register_ray_model(
        spark, linear_table.table, "place_hog", init_linear, apply_linear,
        return_type="bigint", num_actors=1, actor_options={"num_cpus": round(free - 0.25, 4)},
    )
    try:
        small = register_ray_model(
            spark, linear_table.table, "place_small", init_linear, apply_linear,
            return_type="bigint", num_actors=1,
        )
        with small:
            start = time.monotonic()
            with pytest.raises(PlacementError) as info:
                register_ray_model(
                    spark, linear_table.table, "place_late", init_linear, apply_linear,
                    return_type="bigint", num_actors=2,
                )
            elapsed = time.monotonic() - start
            text = str(info.value)
            assert elapsed < 30, f"took {elapsed:.1f}s"
            assert "place_late: Ray cannot place 2 of the 2 actors" in text
            assert "(each asks CPU 0.25)" in text and "no node has room for one more" in text
            assert f"place_hog: 1 x CPU {round(free - 0.25, 4):g}" in text
            assert "place_small: 1 x CPU 0.25 = CPU 0.25" in text
            assert "Fix: close() a function you no longer need" in text
            assert helpers.pool_namespaces("place_late") == []
            # a reload needs room beside the serving actors: refused the same way, old one serves
            start = time.monotonic()
            with pytest.raises(PlacementError, match="place_small: Ray cannot place 1 of the 1"):
                small._pool.swap(
                    small._pool.spec, small._pool.stored, num_actors=1, actor_options={},
                    init_timeout_s=600,
                )
            assert time.monotonic() - start < 30
            df = spark.range(0, 20, 1, 1).selectExpr("id", helpers.features_sql() + " as features")
            rows = sorted(df.select("id", small("features").alias("c")).collect())
            assert [r.c for r in rows] == helpers.expected_classes(linear_table.model, range(20))
    finally:
        hog.close()


# --- many models in one session ------------------------------------------------------------------


@pytest.mark.slow
def test_sixteen_models_of_two_actors(spark, linear_table):
    """The embedded Ray holds 16 functions of 2 default actors at once, all answering; a 64-CPU
    actor is then still refused in seconds with the placement message."""
    import ray

    ids = list(range(30))
    expected = helpers.expected_classes(linear_table.model, ids)
    df = spark.range(0, 30, 1, 1).selectExpr("id", helpers.features_sql() + " as features")
    models = []
    try:
        for i in range(16):
            models.append(
                register_ray_model(
                    spark, linear_table.table, f"many_{i}", init_linear, apply_linear,
                    return_type="bigint",
                )
            )
        for model in models:
            assert len(model.actor_pids()) == 2
            rows = sorted(df.select("id", model("features").alias("c")).collect())
            assert [r.c for r in rows] == expected, model.name
        cpus = max(64, 4 * ray.cluster_resources()["CPU"])
        start = time.monotonic()
        with pytest.raises(PlacementError, match=f"each asks CPU {cpus:g}") as info:
            register_ray_model(
                spark, linear_table.table, "many_big", init_linear, apply_linear,
                return_type="bigint", actor_options={"num_cpus": cpus},
            )
        assert time.monotonic() - start < 10
        assert "many_15: 2 x CPU 0.25 = CPU 0.5" in str(info.value)
    finally:
        for model in models:
            model.close()
