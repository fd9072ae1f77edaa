"""Replay engine and agent core in process: every rank's share of a batch adds up to the global
routing of the numpy reference and to the cost model's bytes; activations move the load."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import generate_latest

from moe_placement.cost import layer_cost
from moe_placement.models import ModelShape, Placement
from moe_placement.presets import parse_topology
from moe_placement.routing import ROUTERS as NUMPY_ROUTERS
from moe_placement.routing import replica_layouts
from moe_placement.synthetic import SyntheticConfig, generate
from moe_placement.traces import expert_load
from moe_agent.agent import AgentCore, AgentError, Fetched
from moe_agent.model import ReplayMoEModel
from moe_agent.recorder import attach
from moe_agent.replay import ReplayEngine, TokenStream
from moe_agent.store import ExpertStore, sha256_hex

from agent_helpers import HOLES_MAP, TINY

BATCH = 64
CONFIG = SyntheticConfig(
    name="tiny", num_layers=TINY.num_layers, num_experts=TINY.num_experts, top_k=TINY.top_k,
    num_sequences=12, tokens_per_sequence=24,
)


def build_rank(rank: int, placement: Placement, topology, stream: TokenStream, router: str = "metro") -> ReplayEngine:
    model = ReplayMoEModel(TINY.num_layers, TINY.hidden_size, TINY.num_experts, TINY.top_k, seed=0)
    store = ExpertStore(TINY, topology.slots_per_gpu, rank)
    core = AgentCore(TINY, topology, rank, store, placement, attach(model))
    return ReplayEngine(
        core, model, stream, tokens_per_second=1000.0, batch_tokens=BATCH, router=router, seed=5, start_time=0.0,
        forward_budget=16,
    )


def reference_routing(engine: ReplayEngine, placement: Placement, topology, ids: np.ndarray, attention: np.ndarray, batch_index: int):
    """Slots [L, B, k] and source GPUs [L, B] by the numpy reference routers, with the engine's draws."""
    layouts = replica_layouts(placement, topology)
    uniform = engine._uniform(batch_index, ids.shape).numpy()
    route = NUMPY_ROUTERS[engine.router_name]
    slots, sources, source = [], [], attention
    for layer, layout in enumerate(layouts):
        sources.append(source)
        slots.append(route(layout, ids[layer], source, uniform[layer]))
        source = layout.gpu_of_slot[slots[-1][:, 0]]
    return np.stack(slots), np.stack(sources), layouts


@pytest.mark.parametrize("router", ["metro", "random", "local_first"])
def test_ranks_add_up_to_the_global_routing(router):
    topology = parse_topology("2x2", TINY.num_experts, 4)  # 4 GPUs on 2 nodes, 3 slots each
    rng = np.random.default_rng(7)
    rows = [rng.permutation(np.concatenate([np.arange(8), rng.integers(-1, 8, 4)])) for _ in range(TINY.num_layers)]
    placement = Placement(np.array(rows), TINY.num_experts, topology.slots_per_gpu)
    stream = TokenStream(generate(CONFIG, seed=1))
    engines = [build_rank(rank, placement, topology, stream, router) for rank in range(topology.num_gpus)]
    for batch_index in (0, 7):  # batch 7 wraps around the 288-token trace
        ids, sequence = stream.batch(batch_index * BATCH, BATCH)
        attention = sequence % topology.num_gpus
        slots, sources, layouts = reference_routing(engines[0], placement, topology, ids, attention, batch_index)
        gpu = layouts[0].gpu_of_slot[slots]
        results = [engine.step(batch_index) for engine in engines]

        total = sum(result.served for result in results)
        np.testing.assert_array_equal(total, expert_load(ids, TINY.num_experts))
        for rank, result in enumerate(results):
            mine = gpu == rank
            served = np.zeros((TINY.num_layers, TINY.num_experts))
            layer = np.broadcast_to(np.arange(TINY.num_layers)[:, None, None], ids.shape)
            np.add.at(served, (layer[mine], ids[mine]), 1)
            np.testing.assert_array_equal(result.served, served)
            used = [len(np.unique(slots[l][mine[l]])) for l in range(TINY.num_layers)]
            assert result.activated.tolist() == used
            assert result.own_tokens == int((attention == rank).sum())
            assert 0 < result.forward_pairs <= 16 * TINY.num_layers or not mine.any()
        cross = [
            layer_cost(slots[l], sources[l], layouts[l], TINY, topology) for l in range(TINY.num_layers)
        ]
        assert sum(r.cross_gpu_bytes for r in results) == pytest.approx(sum(c.cross_gpu_bytes for c in cross))
        assert sum(r.cross_node_bytes for r in results) == pytest.approx(sum(c.cross_node_bytes for c in cross))

    # The recorders saw exactly the tokens of their own attention: together, every token.
    recorded = sum(engine.core.recorder.snapshot().load for engine in engines)
    all_ids = np.concatenate([stream.batch(i * BATCH, BATCH)[0] for i in (0, 7)], axis=1)
    np.testing.assert_array_equal(recorded, expert_load(all_ids, TINY.num_experts))


def _fetch_from(store: ExpertStore, layer: int, expert: int, corrupt: bool = False):
    async def fetch():
        data = store.initial_weights(layer, expert).to_bytes()
        digest = sha256_hex(data)
        if corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return Fetched(data, digest, sha256_hex(data))

    return fetch


def test_activation_moves_the_load_and_the_metrics():
    topology = parse_topology("1x2", TINY.num_experts, 2)
    placement = Placement(np.array(HOLES_MAP), TINY.num_experts, topology.slots_per_gpu)
    stream = TokenStream(generate(CONFIG, seed=2))
    rank0, rank1 = (build_rank(rank, placement, topology, stream) for rank in (0, 1))
    before = rank0.step(0).served
    assert before[:, 5].sum() == 0  # expert 5 lives on rank 1 only

    # Move expert 5 of every layer from slot 6 (rank 1) to slot 4 (rank 0): stage, then activate.
    moved = np.array(HOLES_MAP)
    moved[:, 4], moved[:, 6] = 5, -1
    with pytest.raises(AgentError) as refused:
        rank0.core.activate(1, moved.tolist())
    assert refused.value.status == 409
    for layer in range(TINY.num_layers):
        answer = asyncio.run(rank0.core.stage(layer, 4, 5, _fetch_from(rank1.core.store, layer, 5)))
        assert answer.state == "staged"
    for engine in (rank0, rank1):
        answer = engine.core.activate(1, moved.tolist())
        assert answer.generation == 1 and engine.core.live.generation == 1

    ids, _ = stream.batch(BATCH, BATCH)
    after0, after1 = rank0.step(1).served, rank1.step(1).served
    np.testing.assert_array_equal(after0[:, 5], expert_load(ids, TINY.num_experts)[:, 5])
    assert after1[:, 5].sum() == 0
    text = generate_latest(rank0.core.metrics.registry).decode()
    assert 'moeplace_expert_tokens_total{expert="5",layer="0",rank="0"}' in text
    assert 'moeplace_placement_generation{rank="0"} 1.0' in text
    assert 'moeplace_slots{rank="0",state="live"} 15.0' in text
    assert 'expert="5"' not in generate_latest(rank1.core.metrics.registry).decode()  # no longer hosted
    assert 'moeplace_migration_steps_total' in text


def test_failed_stages_leave_the_slot_empty():
    topology = parse_topology("1x2", TINY.num_experts, 2)
    placement = Placement(np.array(HOLES_MAP), TINY.num_experts, topology.slots_per_gpu)
    core = build_rank(0, placement, topology, TokenStream(generate(CONFIG, seed=2))).core
    peer = ExpertStore(TINY, topology.slots_per_gpu, 1)
    wide = ExpertStore(ModelShape(**{**TINY.model_dump(), "expert_intermediate_size": 256}), 5, 1)

    async def gone():
        raise AgentError(502, "peer: vanished")

    cases = [
        (_fetch_from(peer, 0, 5, corrupt=True), "sha256: mismatch"),
        (_fetch_from(wide, 0, 5), "weights:"),
        (gone, "peer: vanished"),
    ]
    for fetch, message in cases:
        with pytest.raises(AgentError) as error:
            asyncio.run(core.stage(0, 4, 5, fetch))
        assert error.value.status == 502 and error.value.message.startswith(message)
        assert core.store.slot(0, 4).state == "empty" and not core.store.slot(0, 4).reserved
    assert asyncio.run(core.stage(0, 4, 5, _fetch_from(peer, 0, 5))).state == "staged"


def test_token_stream_loops_and_shifts():
    trace = generate(CONFIG, seed=3)
    law, intent = trace.select_domain("law"), trace.select_domain("intent")
    looped = TokenStream(intent)
    ids, sequence = looped.batch(intent.num_tokens - 2, 4)
    np.testing.assert_array_equal(ids[:, 2:], intent.expert_ids[:, :2])
    assert sequence.tolist()[2:] == [intent.num_sequences, intent.num_sequences]  # second loop
    shifted = TokenStream(intent, law, shift_at=100)
    ids, _ = shifted.batch(98, 4)
    np.testing.assert_array_equal(ids[:, :2], intent.expert_ids[:, 98:100])
    np.testing.assert_array_equal(ids[:, 2:], law.expert_ids[:, :2])


def test_replay_paces_batches_on_the_wall_clock():
    topology = parse_topology("1x2", TINY.num_experts, 2)
    placement = Placement(np.array(HOLES_MAP), TINY.num_experts, topology.slots_per_gpu)
    engine = build_rank(0, placement, topology, TokenStream(generate(CONFIG, seed=2)))
    assert engine.batch_due(0) == pytest.approx(BATCH / 1000.0)
    assert engine.current_batch(0.0) == 0 and engine.current_batch(10 * BATCH / 1000.0 + 1e-9) == 10
