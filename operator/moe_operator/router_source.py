"""The request router's groups, for the rebalance cycle (``spec.placement.routerUrl``).

``GET <routerUrl>/router/v1/state`` (``moe_router.api.RouterState``) gives the groups the router
learned (domains: signature [L][E], requests behind it, share of its requests per node). The cycle
adds them to the profile as ``domain_loads`` (``grouped`` and ``auto`` place by them) and compares
their ``node_demand`` with the one the last solve used: the operator re-solves when they drift.

Shapes: L layers, E experts, N nodes, D groups.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from moe_placement.request_routing import node_demand
from moe_router.api import RouterState


class RouterUnavailable(Exception):
    """The router could not be read, or its answer does not fit the deployment; names why."""


@dataclass(frozen=True)
class RouterGroups:
    """domain_loads: [L, E] per group (signature x requests); demand: ``node_demand`` [N, E]."""

    domain_loads: dict[str, np.ndarray]
    demand: np.ndarray

    @property
    def count(self) -> int:
        return len(self.domain_loads)


def parse_router_state(state: RouterState, num_layers: int, num_experts: int, num_nodes: int) -> RouterGroups | None:
    """The groups of a router's state; None before it learned any. RouterUnavailable when its
    model or topology is not the deployment's."""
    shape = (state.num_layers, state.num_experts, state.num_nodes)
    if shape != (num_layers, num_experts, num_nodes):
        raise RouterUnavailable(
            f"router: {shape[0]} layers x {shape[1]} experts on {shape[2]} nodes, deployment has "
            f"{num_layers} x {num_experts} on {num_nodes}"
        )
    if not state.domains:
        return None
    signatures = np.array([domain.signature for domain in state.domains], dtype=np.float64)
    weights = np.array([domain.requests for domain in state.domains], dtype=np.float64)
    share = np.array([domain.node_share for domain in state.domains], dtype=np.float64)
    loads = {f"group-{domain.domain}": signatures[i] * weights[i] for i, domain in enumerate(state.domains)}
    return RouterGroups(loads, node_demand(signatures, weights, share))


def fetch_router_groups(
    url: str, num_layers: int, num_experts: int, num_nodes: int, timeout_s: float = 10.0
) -> RouterGroups | None:
    """``parse_router_state`` of ``GET <url>/router/v1/state`` (blocking: run it in a thread)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/router/v1/state", timeout=timeout_s) as response:
            state = RouterState.model_validate_json(response.read())
    except (urllib.error.URLError, OSError) as error:
        raise RouterUnavailable(f"router: {url}: {getattr(error, 'reason', error)}") from None
    except (ValueError, ValidationError) as error:
        raise RouterUnavailable(f"router: {url}: not a router state ({str(error)[:200]})") from None
    return parse_router_state(state, num_layers, num_experts, num_nodes)
