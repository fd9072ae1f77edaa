"""Placement policies by name: each turns a workload profile into a placement with its solver status.

One module per policy, each defining ``policy_<name>`` with the ``PolicyFn`` signature of
``moe_placement.policies.base``; ``POLICIES`` below names them. ``plan`` validates the inputs, times
the call and wraps the result.
"""

from __future__ import annotations

import time

from moe_placement.models import (
    ModelShape,
    Placement,
    Topology,
    WorkloadProfile,
    check_fits,
    lookup,
)
from moe_placement.policies import (
    auto,
    eplb,
    eplb_global,
    grouped,
    ilp,
    linear,
    locality,
    metro_aware,
    migration_aware,
    round_robin,
)
from moe_placement.policies.base import PlanResult, PolicyFn, PolicyOptions, SolverInfo

POLICIES: dict[str, PolicyFn] = {
    "linear": linear.policy_linear,
    "round_robin": round_robin.policy_round_robin,
    "eplb": eplb.policy_eplb,
    "eplb_global": eplb_global.policy_eplb_global,
    "ilp": ilp.policy_ilp,
    "metro_aware": metro_aware.policy_metro_aware,
    "locality": locality.policy_locality,
    "auto": auto.policy_auto,
    "migration_aware": migration_aware.policy_migration_aware,
    "grouped": grouped.policy_grouped,
}

# Policies that read a profile's load (and domain loads) only, never its transitions or
# coactivation: whoever builds a profile for one of them may leave the pairs out, the costliest part
# of a profile from a trace. A policy missing here is given pairs.
LOAD_ONLY_POLICIES = frozenset({"linear", "round_robin", "eplb", "eplb_global", "grouped"})

__all__ = [
    "LOAD_ONLY_POLICIES", "POLICIES", "PlanResult", "PolicyFn", "PolicyOptions", "SolverInfo",
    "get_policy", "plan",
]


def get_policy(name: str) -> PolicyFn:
    """The policy called ``name``."""
    return lookup(POLICIES, name, "policy")


def plan(
    policy: str,
    profile: WorkloadProfile,
    model: ModelShape,
    topology: Topology,
    options: PolicyOptions | None = None,
) -> PlanResult:
    """Run ``policy`` on ``profile`` and return a validated placement."""
    policy_fn = get_policy(policy)
    profile.check_model(model)
    check_fits(model, topology)
    options = options or PolicyOptions()
    if options.previous is not None:
        options.previous.check_topology(model, topology)
    started = time.perf_counter()
    mapping, solver = policy_fn(profile, model, topology, options)
    elapsed = time.perf_counter() - started
    placement = Placement(mapping, model.num_experts, topology.slots_per_gpu)
    placement.check_topology(model, topology)
    return PlanResult(policy=policy, placement=placement, solver=solver, solve_seconds=elapsed)
