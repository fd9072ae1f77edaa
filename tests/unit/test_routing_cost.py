import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_placement.cost import evaluate, layer_cost
from moe_placement.models import ModelShape, Placement, PlacementError, RoutingBatch, Topology
from moe_placement.presets import gpu_preset
from moe_placement.routing import ROUTERS, get_router, replica_layouts, route_local_first
from reference_cost import reference_layer_cost, reference_route_local_first

MODEL = ModelShape(
    num_layers=3, num_experts=12, top_k=2, hidden_size=256, expert_intermediate_size=128
)


def topology(num_nodes: int, gpus_per_node: int, slots: int) -> Topology:
    return Topology(
        num_nodes=num_nodes, gpus_per_node=gpus_per_node, slots_per_gpu=slots, gpu=gpu_preset("h100")
    )


@st.composite
def scenarios(draw):
    """A placement of MODEL on 1-2 nodes, and a batch of tokens choosing distinct experts."""
    num_nodes = draw(st.integers(1, 2))
    gpus_per_node = draw(st.sampled_from([1, 2, 3]))
    num_gpus = num_nodes * gpus_per_node
    slots = -(-MODEL.num_experts // num_gpus) + draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    mapping = np.empty((MODEL.num_layers, num_gpus * slots), dtype=np.int64)
    for layer in range(MODEL.num_layers):
        order = rng.permutation(num_gpus * slots)
        mapping[layer, order[: MODEL.num_experts]] = np.arange(MODEL.num_experts)
        mapping[layer, order[MODEL.num_experts :]] = rng.integers(
            0, MODEL.num_experts, num_gpus * slots - MODEL.num_experts
        )
    num_tokens = draw(st.integers(1, 64))
    expert_ids = np.argsort(rng.random((MODEL.num_layers, num_tokens, MODEL.num_experts)), -1)[..., :2]
    batch = RoutingBatch(expert_ids, rng.integers(0, num_gpus, num_tokens))
    return Placement(mapping, MODEL.num_experts, slots), topology(num_nodes, gpus_per_node, slots), batch


@given(scenarios(), st.sampled_from(sorted(ROUTERS)))
@settings(max_examples=80, deadline=None)
def test_routers_send_every_token_to_a_replica_of_its_expert(scenario, router):
    placement, topo, batch = scenario
    route = get_router(router)
    rng = np.random.default_rng(0)
    for layer, layout in enumerate(replica_layouts(placement, topo)):
        ids = batch.expert_ids[layer]
        slots = route(layout, ids, batch.source_gpu, rng.random(ids.shape))
        assert slots.shape == ids.shape
        assert (placement.physical_to_logical_map[layer, slots] == ids).all()


@given(scenarios())
@settings(max_examples=40, deadline=None)
def test_local_first_uses_a_local_replica_when_there_is_one(scenario):
    placement, topo, batch = scenario
    layout = replica_layouts(placement, topo)[0]
    ids = batch.expert_ids[0]
    slots = get_router("local_first")(layout, ids, batch.source_gpu, np.full(ids.shape, 0.5))
    gpu_has = placement.gpu_expert_matrix()[0] > 0
    local_available = gpu_has[batch.source_gpu[:, None], ids]
    chosen_gpu = layout.gpu_of_slot[slots]
    assert (chosen_gpu[local_available] == np.broadcast_to(batch.source_gpu[:, None], ids.shape)[local_available]).all()


@given(scenarios())
@settings(max_examples=40, deadline=None)
def test_metro_sends_all_tokens_of_an_expert_to_one_replica(scenario):
    placement, topo, batch = scenario
    layout = replica_layouts(placement, topo)[0]
    ids = batch.expert_ids[0]
    slots = get_router("metro")(layout, ids, batch.source_gpu, np.zeros(ids.shape))
    for expert in np.unique(ids):
        assert len(np.unique(slots[ids == expert])) == 1


@given(scenarios(), st.sampled_from(["random", "metro"]))
@settings(max_examples=60, deadline=None)
def test_more_gpus_never_raise_modelled_compute_time(scenario, router):
    """Splitting every GPU in two (same slots, same routing) never makes the slowest GPU slower."""
    placement, topo, batch = scenario
    if topo.slots_per_gpu % 2:
        return
    split = Placement(placement.physical_to_logical_map, MODEL.num_experts, topo.slots_per_gpu // 2)
    split_topology = topology(topo.num_nodes, topo.gpus_per_node * 2, topo.slots_per_gpu // 2)
    if router == "metro":  # metro's choices depend on GPUs: compare with random draws only
        router = "random"
    before = evaluate(placement, MODEL, topo, [batch], router, seed=3)
    after = evaluate(split, MODEL, split_topology, [batch], router, seed=3)
    assert after.compute_time_s <= before.compute_time_s + 1e-15


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_tokens_whose_experts_share_their_gpu_cross_no_link(num_nodes, gpus_per_node, seed):
    rng = np.random.default_rng(seed)
    num_gpus = num_nodes * gpus_per_node
    slots = 4
    num_experts = num_gpus * slots
    model = MODEL.model_copy(update={"num_experts": num_experts})
    mapping = np.tile(rng.permutation(num_experts), (MODEL.num_layers, 1))
    placement = Placement(mapping, num_experts, slots)
    source = rng.integers(0, num_gpus, 32)
    own = mapping[0].reshape(num_gpus, slots)[source]  # [B, slots] experts on each token's GPU
    picks = np.argsort(rng.random((MODEL.num_layers, 32, slots)), -1)[..., :2]
    expert_ids = np.take_along_axis(np.broadcast_to(own, (MODEL.num_layers, 32, slots)), picks, -1)
    report = evaluate(placement, model, topology(num_nodes, gpus_per_node, slots), [RoutingBatch(expert_ids, source)])
    assert report.cross_gpu_bytes == 0 and report.cross_node_bytes == 0 and report.comm_time_s == 0


def test_cross_node_traffic_is_sent_once_per_node():
    """One token on GPU 0 (node 0) choosing two experts on node 1's two GPUs: one inter-node
    transfer, one NVLink forward, both counted for dispatch and combine."""
    model = ModelShape(num_layers=1, num_experts=4, top_k=2, hidden_size=100, expert_intermediate_size=8)
    placement = Placement([[0, 1, 2, 3]], 4, 1)
    report = evaluate(placement, model, topology(2, 2, 1), [RoutingBatch([[[2, 3]]], [0])])
    assert report.cross_node_bytes == 2 * model.token_bytes
    assert report.cross_gpu_bytes == 4 * model.token_bytes


def test_unknown_router_and_empty_batches():
    placement = Placement([[0, 1, 2, 3]], 4, 1)
    model = ModelShape(num_layers=1, num_experts=4, top_k=1, hidden_size=8, expert_intermediate_size=8)
    with pytest.raises(PlacementError, match="router: unknown 'fastest'"):
        evaluate(placement, model, topology(1, 4, 1), [RoutingBatch([[[0]]], [0])], "fastest")
    with pytest.raises(PlacementError, match="batches: nothing"):
        evaluate(placement, model, topology(1, 4, 1), [])


@settings(max_examples=100, deadline=None)
@given(scenario=scenarios(), seed=st.integers(0, 2**31))
def test_local_first_and_layer_cost_equal_the_reference(scenario, seed):
    placement, topo, batch = scenario
    rng = np.random.default_rng(seed)
    source_gpu = batch.source_gpu
    for layer, layout in enumerate(replica_layouts(placement, topo)):
        ids = batch.expert_ids[layer]
        uniform = rng.random(ids.shape)
        slots = route_local_first(layout, ids, source_gpu, uniform)
        assert np.array_equal(slots, reference_route_local_first(layout, ids, source_gpu, uniform))
        cost = layer_cost(slots, source_gpu, layout, MODEL, topo)
        expected = reference_layer_cost(slots, source_gpu, layout, MODEL, topo)
        for name, value in vars(expected).items():
            assert np.array_equal(getattr(cost, name), value), name
        source_gpu = layout.gpu_of_slot[slots[:, 0]]
