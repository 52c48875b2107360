"""Can Ray place a pool's actors? The request per actor, checked against the cluster.

Pure decisions, tested without Ray: :func:`actor_request` turns actor options into the
resources Ray asks per actor (the way Ray does: ``accelerator_type="A100"`` asks
``accelerator_type:A100: 0.001``); :func:`unfit_reason` says why a request can never be placed
(no node has that much in total, the node of a hard node affinity is gone, a placement group's
bundle is too small), and :func:`placement_message` writes the error: the request, what the
cluster has in total and free, which registered functions hold it, and the fix.

:class:`PlacementWatch` feeds them Ray's own view (the GCS actor table and resource state, read
in :mod:`spark_ray_udf._ray`) for ``pool.start_actors``: an impossible request fails before any actor starts; an actor that no
node takes while no node has room for it fails the pool after :data:`FULL_GRACE_S`, unless an
autoscaler runs (then it waits, up to ``init_timeout_s``, and logs what it waits for).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spark_ray_udf.errors import PlacementError

if TYPE_CHECKING:
    from spark_ray_udf._ray import ClusterResources

log = logging.getLogger(__name__)

Resources = Mapping[str, float]

FULL_GRACE_S = 10.0  # an unplaced actor with no room anywhere for this long: the cluster is full
EPS = 1e-6
_SHOWN = ("CPU", "GPU", "memory")
FIX_FULL = (
    "close() a function you no longer need, lower actor_options={'num_cpus': ...} or "
    "num_actors, or add nodes to the Ray cluster"
)
FIX_NEVER = (
    "ask less of each actor (actor_options num_cpus, num_gpus, memory, resources, "
    "accelerator_type, scheduling_strategy), or add a node that has it to the Ray cluster"
)  # always shown in messages, beside the keys asked for


@dataclass(frozen=True)
class Holder:
    """A registered function holding cluster resources: ``num_actors`` actors of ``per_actor``."""

    function: str
    num_actors: int
    per_actor: Resources


@dataclass(frozen=True)
class Node:
    """One alive Ray node's resources."""

    node_id: str
    total: Resources
    free: Resources


def actor_request(options: Mapping[str, Any]) -> dict[str, float]:
    """The resources Ray reserves for one actor with these ``.options()`` (zero amounts left out).

    >>> actor_request({"num_cpus": 0.25, "max_restarts": -1})
    {'CPU': 0.25}
    >>> actor_request({"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A100",
    ...                "resources": {"tpu": 2}, "memory": 2**30})
    {'CPU': 1.0, 'GPU': 1.0, 'memory': 1073741824.0, 'tpu': 2.0, 'accelerator_type:A100': 0.001}
    """
    asked: dict[str, float] = {
        # Ray schedules an actor without num_cpus on 1 CPU (and runs it on 0)
        "CPU": float(options.get("num_cpus", 1) or 0),
        "GPU": float(options.get("num_gpus", 0) or 0),
        "memory": float(options.get("memory", 0) or 0),
    }
    for key, value in (options.get("resources") or {}).items():
        asked[str(key)] = float(value)
    if options.get("accelerator_type"):
        asked[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return {k: v for k, v in asked.items() if v > 0}


def fits(request: Resources, capacity: Resources) -> bool:
    """True if ``capacity`` holds at least ``request`` of every resource.

    >>> fits({"CPU": 0.5}, {"CPU": 2.0}), fits({"GPU": 1.0}, {"CPU": 2.0})
    (True, False)
    """
    return all(capacity.get(k, 0.0) + EPS >= v for k, v in request.items())


def _strategy_kind(strategy: Any) -> str:
    """``"node"`` (hard node affinity), ``"group"`` (placement group) or ``"any"``."""
    if strategy is None or isinstance(strategy, str):  # "DEFAULT", "SPREAD"
        return "any"
    if hasattr(strategy, "placement_group"):
        return "group"
    if hasattr(strategy, "node_id") and not getattr(strategy, "soft", False):
        return "node"
    return "any"


def unfit_reason(
    request: Resources,
    nodes: Sequence[Node],
    *,
    strategy: Any = None,
    bundles: Sequence[Resources] | None = None,
    bundle_index: int = -1,
) -> str | None:
    """Why no node could ever hold one actor of ``request``, or None when one could.

    ``strategy`` is the actor's ``scheduling_strategy``: a string (``"DEFAULT"``, ``"SPREAD"``)
    allows every node; a hard ``NodeAffinitySchedulingStrategy`` only its node; with a
    ``PlacementGroupSchedulingStrategy`` the actor runs inside a bundle of the group
    (``bundles``), so the request must fit that bundle (``bundle_index=-1``: any of them).

    >>> n = [Node("a", {"CPU": 2.0}, {"CPU": 0.0})]
    >>> unfit_reason({"CPU": 1.0}, n) is None
    True
    >>> unfit_reason({"CPU": 64.0}, n)
    'no node has CPU 64 (the largest node has CPU 2)'
    >>> unfit_reason({"CPU": 1.0}, n, bundles=[{"CPU": 0.5}], strategy="PG")
    'it runs in a bundle of its placement group, and no bundle has CPU 1 (bundles: [CPU 0.5])'
    """
    if bundles is not None:
        chosen = list(bundles) if bundle_index < 0 else list(bundles[bundle_index : bundle_index + 1])
        if not any(fits(request, b) for b in chosen):
            which = "no bundle has" if bundle_index < 0 else f"bundle {bundle_index} lacks"
            return (
                f"it runs in a bundle of its placement group, and {which} {format_resources(request)}"
                f" (bundles: [{'; '.join(format_resources(b) for b in bundles)}])"
            )
        return None
    candidates = list(nodes)
    if _strategy_kind(strategy) == "node":
        wanted = str(getattr(strategy, "node_id", ""))
        candidates = [n for n in nodes if n.node_id == wanted]
        if not candidates:
            return f"its NodeAffinitySchedulingStrategy names node {wanted}, which is not alive"
    if any(fits(request, n.total) for n in candidates):
        return None
    if not candidates:
        return "the cluster has no alive node"
    largest = max(candidates, key=lambda n: sum(min(n.total.get(k, 0.0) / v, 1.0) for k, v in request.items()))
    lacking = {k: v for k, v in request.items() if largest.total.get(k, 0.0) + EPS < v}
    has = {k: largest.total.get(k, 0.0) for k in lacking}
    return (
        f"no node has {format_resources(lacking)} (the largest node has "
        f"{format_resources(has, keep_zero=True)})"
    )


def group_unfit_reason(bundles: Sequence[Resources], strategy: str, nodes: Sequence[Node]) -> str | None:
    """Why a placement group's bundles could never be placed on ``nodes``, or None.

    >>> n = [Node("a", {"CPU": 2.0}, {}), Node("b", {"CPU": 2.0}, {})]
    >>> group_unfit_reason([{"CPU": 1.0}] * 3, "STRICT_SPREAD", n)
    'STRICT_SPREAD puts its 3 bundles on 3 different nodes; 2 nodes can hold one'
    >>> group_unfit_reason([{"CPU": 1.0}] * 3, "PACK", n) is None
    True
    """
    if strategy == "STRICT_PACK":
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        if not any(fits(need, n.total) for n in nodes):
            return f"STRICT_PACK puts all bundles on one node, and no node has {format_resources(need)}"
        return None
    for b in bundles:
        if not any(fits(b, n.total) for n in nodes):
            return f"no node has {format_resources(b)} for one of its bundles"
    if strategy == "STRICT_SPREAD":
        able = [n for n in nodes if any(fits(b, n.total) for b in bundles)]
        if len(able) < len(bundles):
            return (
                f"STRICT_SPREAD puts its {len(bundles)} bundles on {len(bundles)} different nodes; "
                f"{len(able)} nodes can hold one"
            )
    return None


def sum_resources(parts: Iterable[Resources]) -> dict[str, float]:
    """Add resource maps key by key.

    >>> sum_resources([{"CPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}])
    {'CPU': 1.5, 'GPU': 1.0}
    """
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def format_resources(res: Resources, *, keys: Iterable[str] | None = None, keep_zero: bool = False) -> str:
    """``CPU 0.25, memory 1.0 GiB`` (``keys`` picks and orders; memory in GiB).

    >>> format_resources({"CPU": 0.25, "memory": 2**30, "GPU": 0.0})
    'CPU 0.25, memory 1 GiB'
    """
    names = list(keys) if keys is not None else list(res)
    parts = []
    for k in names:
        v = float(res.get(k, 0.0))
        if v == 0 and not keep_zero:
            continue
        if k in ("memory", "object_store_memory"):
            parts.append(f"{k} {v / 2**30:.3g} GiB")
        else:
            parts.append(f"{k} {v:.4g}")
    return ", ".join(parts) if parts else "nothing"


def placement_message(
    *,
    function: str,
    where: str,
    request: Resources,
    num_actors: int,
    waiting: int,
    nodes: Sequence[Node],
    holders: Sequence[Holder],
    reason: str,
    demand: Sequence[tuple[Resources, int]] = (),
    fix: str = FIX_FULL,
) -> str:
    """The text of a :class:`~spark_ray_udf.errors.PlacementError`.

    >>> print(placement_message(function="f", where="t@v1", request={"CPU": 0.25}, num_actors=2,
    ...     waiting=1, nodes=[Node("a", {"CPU": 2.0}, {"CPU": 0.0})],
    ...     holders=[Holder("g", 8, {"CPU": 0.25})], reason="the cluster is full"))
    f: Ray cannot place 1 of the 2 actors loading t@v1 (each asks CPU 0.25): the cluster is full.
    The cluster has CPU 2 in total, CPU 0 free, on 1 node.
    Registered functions of this driver hold: g: 8 x CPU 0.25 = CPU 2.
    Fix: close() a function you no longer need, lower actor_options={'num_cpus': ...} or num_actors, or add nodes to the Ray cluster.
    """
    keys = [k for k in _SHOWN if k in request or k == "CPU"] + [k for k in request if k not in _SHOWN]
    total = sum_resources(n.total for n in nodes)
    free = sum_resources(n.free for n in nodes)
    lines = [
        f"{function}: Ray cannot place {waiting} of the {num_actors} actors loading {where} "
        f"(each asks {format_resources(request)}): {reason}.",
        f"The cluster has {format_resources(total, keys=keys, keep_zero=True)} in total, "
        f"{format_resources(free, keys=keys, keep_zero=True)} free, on {len(nodes)} "
        f"node{'s' if len(nodes) != 1 else ''}.",
    ]
    held = [h for h in holders if h.num_actors > 0]
    if held:
        lines.append(
            "Registered functions of this driver hold: "
            + "; ".join(
                f"{h.function}: {h.num_actors} x {format_resources(h.per_actor)} = "
                f"{format_resources({k: v * h.num_actors for k, v in h.per_actor.items()})}"
                for h in held
            )
            + "."
        )
    else:
        lines.append("No registered function of this driver holds any of it.")
    others = [(shape, count) for shape, count in demand if dict(shape) != dict(request)]
    if others:
        lines.append(
            "Ray also waits to place: "
            + "; ".join(f"{count} x {format_resources(shape)}" for shape, count in others)
            + "."
        )
    lines.append(f"Fix: {fix}.")
    return "\n".join(lines)


class PlacementWatch:
    """Checks, with Ray's own view, that a generation's actors can be placed: the rules above,
    fed by the GCS reads of :mod:`spark_ray_udf._ray` (which says why not the state API).
    ``pool.start_actors`` calls :meth:`before_start`, then :meth:`check` between its waits."""

    def __init__(
        self,
        function: str,
        where: str,
        opts: Mapping[str, Any],
        num_actors: int,
        holders: Callable[[], Sequence[Holder]] | None,
    ) -> None:
        self.function, self.where, self.num_actors, self.holders = function, where, num_actors, holders
        self.request = actor_request(opts)
        self.strategy = opts.get("scheduling_strategy")
        self.group = getattr(self.strategy, "placement_group", None)
        self.blocked_since: float | None = None
        self.autoscaler: bool | None = None

    def _nodes(self) -> tuple[list[Node], ClusterResources]:
        from spark_ray_udf import _ray

        view = _ray.cluster_resources()
        return [Node(i, t, f) for i, t, f in view.nodes], view

    def _group(self) -> tuple[list[dict[str, float]], int, str, str]:
        import ray

        table = ray.util.placement_group_table(self.group)
        index = int(getattr(self.strategy, "placement_group_bundle_index", -1) or -1)
        return list(self.group.bundle_specs), index, str(table.get("state")), str(table.get("strategy"))

    def _has_autoscaler(self) -> bool:
        if self.autoscaler is None:
            from spark_ray_udf import _ray

            self.autoscaler = _ray.autoscaler_running()
        return self.autoscaler

    def _fail(self, waiting: int, reason: str, view: ClusterResources, nodes: list[Node], fix: str) -> None:
        raise PlacementError(
            placement_message(
                function=self.function, where=self.where, request=self.request,
                num_actors=self.num_actors, waiting=waiting, nodes=nodes,
                holders=list(self.holders()) if self.holders else [], reason=reason,
                demand=view.demand, fix=fix,
            )
        )

    def before_start(self) -> None:
        """Refuse a request no node (or bundle) could ever hold, before any actor starts."""
        nodes, view = self._nodes()
        if self.group is not None:
            bundles, index, state, strategy = self._group()
            why = unfit_reason(self.request, nodes, bundles=bundles, bundle_index=index)
            if why is None and state != "CREATED":
                why = group_unfit_reason(bundles, strategy, nodes)
        else:
            why = unfit_reason(self.request, nodes, strategy=self.strategy)
        if why is None:
            return
        if self._has_autoscaler():
            log.warning(
                "%s: %s; an autoscaler runs, so the pool waits (up to init_timeout_s) for it to "
                "add such a node", self.function, why,
            )
            return
        self._fail(self.num_actors, why, view, nodes, FIX_NEVER)

    def check(self, waiting: list[Any], waited_s: float) -> str:
        """Raise :class:`PlacementError` when the actors still waiting cannot be placed; else
        say what they wait for."""
        from spark_ray_udf import _ray

        unplaced = [p for p in (_ray.actor_placement(a) for a in waiting) if not p.placed and p.state != "DEAD"]
        if not unplaced:
            self.blocked_since = None
            return "placed, loading the model"
        nodes, view = self._nodes()
        required = unplaced[0].required or self.request
        why = unfit_reason(required, nodes, strategy=self.strategy if self.group is None else None)
        if self.group is not None:
            _, _, state, _ = self._group()
            if state != "CREATED":
                why = None if waited_s < FULL_GRACE_S else f"its placement group is still {state}"
            elif why is not None:
                why = None  # the group's bundle resources exist only on its nodes: "full" below
        if why is None and any(fits(required, n.free) for n in nodes):
            self.blocked_since = None
            return f"{len(unplaced)} being placed"
        now = time.monotonic()
        self.blocked_since = self.blocked_since or now
        if self._has_autoscaler():
            return (
                f"{len(unplaced)} not placed: no node has room for "
                f"{format_resources(self.request)}; waiting for the autoscaler to add one"
            )
        if why is not None:
            self._fail(len(unplaced), why, view, nodes, FIX_NEVER)
        if now - self.blocked_since >= FULL_GRACE_S:
            self._fail(
                len(unplaced),
                f"no node has room for one more for {now - self.blocked_since:.0f}s and no "
                "autoscaler runs (a reload or re-registration starts its new actors beside the "
                "old ones)",
                view, nodes, FIX_FULL,
            )
        return f"{len(unplaced)} not placed: no node has room now"
