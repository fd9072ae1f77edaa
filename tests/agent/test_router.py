"""The torch routers give exactly the slots of the numpy reference (moe_placement.routing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_placement.models import Placement, PlacementError
from moe_placement.presets import parse_topology
from moe_placement.routing import ROUTERS as NUMPY_ROUTERS
from moe_placement.routing import replica_layouts
from moe_agent.router import ROUTERS, TorchLayout, get_router


@st.composite
def routing_cases(draw):
    """A random placement (every expert at least once, random extra replicas and holes) and a batch."""
    num_nodes = draw(st.integers(1, 3))
    gpus_per_node = draw(st.integers(1, 3))
    num_experts = draw(st.integers(2, 12))
    num_gpus = num_nodes * gpus_per_node
    slots_per_gpu = draw(st.integers(-(-num_experts // num_gpus), -(-num_experts // num_gpus) + 3))
    topology = parse_topology(f"{num_nodes}x{gpus_per_node}", num_experts, num_gpus * slots_per_gpu - num_experts)
    num_layers = draw(st.integers(1, 3))
    num_slots = topology.num_slots
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(-1, num_experts, num_slots - num_experts)
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    placement = Placement(np.array(rows), num_experts, topology.slots_per_gpu)
    batch = draw(st.integers(1, 48))
    top_k = draw(st.integers(1, min(num_experts, 4)))
    distinct = draw(st.booleans())
    if distinct:
        ids = np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(batch)] for _ in range(num_layers)])
    else:
        ids = rng.integers(0, num_experts, (num_layers, batch, top_k))
    source = rng.integers(0, num_gpus, (num_layers, batch))
    uniform = rng.random((num_layers, batch, top_k))
    if draw(st.booleans()):
        uniform = uniform.astype(np.float32)
    return placement, topology, ids, source, uniform


@settings(max_examples=100, deadline=None)
@given(routing_cases(), st.sampled_from(sorted(ROUTERS)))
def test_torch_routers_equal_numpy_reference(case, name):
    placement, topology, ids, source, uniform = case
    layouts = replica_layouts(placement, topology)
    expected = np.stack(
        [NUMPY_ROUTERS[name](layouts[l], ids[l], source[l], uniform[l]) for l in range(placement.num_layers)]
    )
    layout = TorchLayout.from_placement(placement, topology)
    got = ROUTERS[name](layout, torch.as_tensor(ids), torch.as_tensor(source), torch.as_tensor(uniform))
    np.testing.assert_array_equal(got.numpy(), expected)
    # One layer at a time gives the same slots.
    for layer in range(placement.num_layers):
        one = ROUTERS[name](
            layout.layer(layer),
            torch.as_tensor(ids[layer : layer + 1]),
            torch.as_tensor(source[layer : layer + 1]),
            torch.as_tensor(uniform[layer : layer + 1]),
        )
        np.testing.assert_array_equal(one[0].numpy(), expected[layer])


def test_metro_balances_activated_experts():
    # Expert 0 on GPUs 0 and 1; GPU 0 already serves experts 1 and 2: expert 0 goes to GPU 1.
    topology = parse_topology("1x2", 4, 2)
    placement = Placement(np.array([[0, 1, 2, 0, 3, -1]]), 4, topology.slots_per_gpu)
    ids = torch.tensor([[[0, 1], [0, 2], [0, 3]]])
    slots = get_router("metro")(TorchLayout.from_placement(placement, topology), ids, torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3, 2))
    assert slots[0, :, 0].tolist() == [3, 3, 3]


def test_router_errors():
    with pytest.raises(PlacementError, match="router"):
        get_router("nope")
    topology = parse_topology("1x2", 4, 0)
    layout = TorchLayout.from_placement(Placement(np.array([[0, 1, 2, 3]] * 2), 4, 2), topology)
    with pytest.raises(PlacementError, match="expert_ids"):
        get_router("random")(layout, torch.zeros(4, 2, dtype=torch.int64), torch.zeros(1, 4), torch.zeros(4, 2))
