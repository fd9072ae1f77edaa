"""The plan runner against in-process fake agents: completes, resumes, retries, undoes a failed
stage, uses request ids unique per execution, and never leaves an expert without a live replica."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_agents import TOKEN, FakeCluster
from moe_operator.agents import AgentClient
from moe_operator.plan_runner import (
    AgentsView,
    GroupLayout,
    PlanRunner,
    Progress,
    RunOptions,
    RunState,
    build_group_status,
    converge,
    read_agents,
    union_map,
)
from moe_placement.agent_api import PlacementAnswer
from moe_placement.baselines import linear_placement
from moe_placement.migration_plan import ExpertCopy
from moe_placement.models import ModelShape, Placement, WorkloadProfile, placement_hash
from moe_placement.policies import plan
from moe_placement.presets import parse_topology

pytestmark = pytest.mark.anyio

MODEL = ModelShape(name="t", num_layers=3, num_experts=8, top_k=2, hidden_size=32, expert_intermediate_size=16)
TOPOLOGY = parse_topology("2x2", 8, 4)  # 12 slots, 3 per GPU


def target_for(seed: int) -> Placement:
    rng = np.random.default_rng(seed)
    load = rng.pareto(1.2, size=(MODEL.num_layers, MODEL.num_experts)) * 100 + 1
    profile = WorkloadProfile(load=load, top_k=2)
    return plan("eplb", profile, MODEL, TOPOLOGY).placement


def copies_of(plan_obj, start=0):
    """The copies of the first stage at or after ``start`` that has any."""
    return next(stage.copies for stage in plan_obj.stages[start:] if stage.copies)


def source() -> Placement:
    return Placement(linear_placement(3, 8, 12), 8, 3)


@pytest.fixture
async def cluster():
    fakes = FakeCluster(source().physical_to_logical_map, 8, 3)
    await fakes.start()
    yield fakes
    await fakes.stop()


@pytest.fixture
async def client():
    agent_client = AgentClient(token=TOKEN, timeout_s=5)
    yield agent_client
    await agent_client.close()


def runner(client, cluster, options=None, should_stop=lambda: False, record=None):
    recorded: list[Progress] = []

    async def keep(state: Progress) -> None:
        recorded.append(state)

    plan_runner = PlanRunner(
        client=client, agents=cluster.urls, slots_per_gpu=3,
        options=options or RunOptions(max_concurrent_transfers=2, retries=1, backoff_s=0.01),
        record=record or keep, should_stop=should_stop,
    )
    return plan_runner, recorded


async def run_plan(client, cluster, plan_obj, progress, **kwargs):
    plan_runner, recorded = runner(client, cluster, **kwargs)
    return await plan_runner.run(plan_obj, progress), recorded


def test_union_map_only_fills_empty_slots():
    prev = np.array([[0, 1, -1, 2]])
    assert union_map(prev, [ExpertCopy(0, 1, 1, 2, 1.0)]).tolist() == [[0, 1, 1, 2]]
    with pytest.raises(ValueError):
        union_map(prev, [ExpertCopy(0, 1, 1, 3, 1.0)])


async def test_full_migration(planner, cluster, client):
    target = target_for(1)
    plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=3)
    outcome, recorded = await run_plan(client, cluster, plan_obj, Progress(plan_id="p", stages=len(plan_obj.stages)))
    assert outcome.state == RunState.COMPLETED, outcome.message
    assert np.array_equal(outcome.live_map, target.physical_to_logical_map)
    assert all(np.array_equal(agent.map, target.physical_to_logical_map) for agent in cluster.agents)
    assert all(state == "live" for agent in cluster.agents for _, state in agent.slots.values())
    assert recorded[-1].stage == len(plan_obj.stages) and recorded[-1].bytes_moved > 0
    assert outcome.generation == max(agent.generation for agent in cluster.agents)
    assert cluster.violations == []


async def test_interrupt_then_resume_and_replay_is_idempotent(planner, cluster, client):
    target = target_for(2)
    plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=2)
    assert len(plan_obj.stages) >= 2
    outcome, _ = await run_plan(
        client, cluster, plan_obj, Progress(plan_id="p", stages=len(plan_obj.stages)), should_stop=lambda: True
    )
    assert outcome.state == RunState.INTERRUPTED and outcome.progress.stage == 1
    assert np.array_equal(outcome.live_map, plan_obj.map_after(0))
    # A restarted operator resumes from the recorded progress, replaying the last stage as if its
    # record had been lost (stage 0, step "") -- nothing is done twice.
    calls_before = sum(len(agent.calls) for agent in cluster.agents)
    stale = Progress(plan_id="p", stages=len(plan_obj.stages), stage=0, step="")
    outcome, _ = await run_plan(client, cluster, plan_obj, stale)
    assert outcome.state == RunState.COMPLETED, outcome.message
    assert all(np.array_equal(agent.map, target.physical_to_logical_map) for agent in cluster.agents)
    assert sum(len(agent.calls) for agent in cluster.agents) > calls_before
    assert cluster.violations == []


async def test_failed_copy_is_retried_then_succeeds(planner, cluster, client):
    plan_obj = planner(source(), target_for(3), MODEL, TOPOLOGY, max_copies_per_stage=4)
    cluster.agents[copies_of(plan_obj)[0].target_slot // 3].fail_stage = 1
    outcome, _ = await run_plan(client, cluster, plan_obj, Progress("p", len(plan_obj.stages)))
    assert outcome.state == RunState.COMPLETED, outcome.message
    assert cluster.violations == []


async def test_a_failing_stage_is_undone(planner, cluster, client):
    plan_obj = planner(source(), target_for(4), MODEL, TOPOLOGY, max_copies_per_stage=4)
    cluster.agents[copies_of(plan_obj)[-1].target_slot // 3].fail_stage = 100
    outcome, _ = await run_plan(client, cluster, plan_obj, Progress("p", len(plan_obj.stages)))
    assert outcome.state == RunState.FAILED and "undone" in outcome.message
    failing = next(i for i, stage in enumerate(plan_obj.stages) if stage.copies)
    before = plan_obj.map_after(failing - 1) if failing else source().physical_to_logical_map
    assert np.array_equal(outcome.live_map, before)
    for agent in cluster.agents:
        assert np.array_equal(agent.map, before)
        assert all(state == "live" for _, state in agent.slots.values()), "staged slots retired"
    assert cluster.violations == []


async def test_two_executions_of_one_plan_never_share_a_request_id(planner, cluster, client):
    """The same plan id run twice in one process (a second migration between the same maps, as after
    a domain shift back): every call is answered for itself, none with a remembered answer."""
    target = target_for(6)
    there = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=3)
    back = planner(target, source(), MODEL, TOPOLOGY, max_copies_per_stage=3)
    for _ in range(2):
        outcome, _ = await run_plan(client, cluster, there, Progress("same-plan", len(there.stages)))
        assert outcome.state == RunState.COMPLETED, outcome.message
        assert cluster.maps() == {placement_hash(target.physical_to_logical_map)}
        plan_runner, _ = runner(client, cluster)
        outcome = await plan_runner.run(back, Progress("same-back", len(back.stages)))
        assert outcome.state == RunState.COMPLETED, outcome.message
        assert cluster.maps() == {placement_hash(source().physical_to_logical_map)}
    assert cluster.violations == []


async def test_a_copy_past_its_timeout_leaves_no_staged_slot(planner, cluster, client):
    plan_obj = planner(source(), target_for(7), MODEL, TOPOLOGY, max_copies_per_stage=4)
    slow = copies_of(plan_obj)[0].target_slot // 3
    cluster.agents[slow].stage_delay = 2.0
    options = RunOptions(max_concurrent_transfers=2, retries=1, backoff_s=0.01, step_timeout_s=0.3)
    outcome, _ = await run_plan(client, cluster, plan_obj, Progress("p", len(plan_obj.stages)), options=options)
    assert outcome.state == RunState.FAILED and "timeout_seconds" in outcome.message
    assert not any(state == "staged" for agent in cluster.agents for _, state in agent.slots.values())
    assert not any(agent.reserved for agent in cluster.agents)


async def test_orphan_staged_slots_are_retired_before_a_run(planner, cluster, client):
    target = target_for(8)
    plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=2)
    outcome, _ = await run_plan(
        client, cluster, plan_obj, Progress("p", len(plan_obj.stages)), should_stop=lambda: True
    )
    assert outcome.state == RunState.INTERRUPTED
    index = next(i for i, stage in enumerate(plan_obj.stages) if i >= outcome.progress.stage and stage.copies)
    copy = plan_obj.stages[index].copies[0]
    # A dead execution left another expert staged in the slot this plan copies into next.
    cluster.agents[copy.target_slot // 3].slots[(copy.layer, copy.target_slot)] = ((copy.expert + 1) % 8, "staged")
    outcome, _ = await run_plan(client, cluster, plan_obj, outcome.progress)
    assert outcome.state == RunState.COMPLETED, outcome.message
    assert cluster.maps() == {placement_hash(target.physical_to_logical_map)}
    assert not any(state == "staged" for agent in cluster.agents for _, state in agent.slots.values())


async def test_dead_agent_mid_migration_keeps_maps_valid(planner, cluster, client):
    plan_obj = planner(source(), target_for(5), MODEL, TOPOLOGY, max_copies_per_stage=2)
    victim = copies_of(plan_obj, 1)[0].target_slot // 3

    async def record(state):
        if state.stage == 1 and cluster.agents[victim].alive:
            await cluster.agents[victim].stop()

    plan_runner, _ = runner(client, cluster, options=RunOptions(retries=1, backoff_s=0.01), record=record)
    outcome = await plan_runner.run(plan_obj, Progress("p", len(plan_obj.stages)))
    assert outcome.state in (RunState.FAILED, RunState.STALLED), outcome.state
    for agent in cluster.agents:
        if agent.alive:
            Placement(agent.map, 8, 3)  # every served map holds every expert
    assert cluster.violations == []


async def test_converge_brings_a_lagging_agent_up(cluster, client):
    for agent in cluster.agents[1:]:
        agent.generation = 5
    view = await read_agents(client, cluster.urls)
    problems = await converge(client, cluster.urls, source().physical_to_logical_map, 5, view)
    assert problems == [] and {agent.generation for agent in cluster.agents} == {5}
    other = np.roll(source().physical_to_logical_map, 3, axis=1)
    problems = await converge(client, cluster.urls, other, 6, await read_agents(client, cluster.urls))
    assert problems and "needs expert" in problems[0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), per_stage=st.integers(1, 6))
def test_property_no_expert_loses_its_last_replica(planner, seed, per_stage):
    import asyncio

    async def main():
        fakes = FakeCluster(source().physical_to_logical_map, 8, 3)
        await fakes.start()
        agent_client = AgentClient(token=TOKEN, timeout_s=5)
        try:
            target = target_for(seed)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=per_stage)
            outcome, _ = await run_plan(agent_client, fakes, plan_obj, Progress("p", len(plan_obj.stages)))
            assert outcome.state == RunState.COMPLETED, outcome.message
            assert fakes.violations == []
            assert fakes.maps() == {placement_hash(target.physical_to_logical_map)}
        finally:
            await agent_client.close()
            await fakes.stop()

    asyncio.run(main())


@pytest.fixture
async def second_group():
    """A second expert-parallel group of fake agents serving the same map as ``cluster``."""
    fakes = FakeCluster(source().physical_to_logical_map, 8, 3)
    await fakes.start()
    yield fakes
    await fakes.stop()


def grouped_runner(client, groups):
    layout = GroupLayout(ranks=4, groups=len(groups))
    agents = {layout.key(g, agent.rank): agent.url for g, fakes in enumerate(groups) for agent in fakes.agents}

    async def keep(state: Progress) -> None:
        pass

    return PlanRunner(
        client=client, agents=agents, slots_per_gpu=3, record=keep, layout=layout,
        options=RunOptions(max_concurrent_transfers=2, retries=1, backoff_s=0.01),
    )


async def test_one_plan_runs_on_every_group_with_copies_inside_each_group(planner, cluster, second_group, client):
    target = target_for(5)
    plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=3)
    outcome = await grouped_runner(client, [cluster, second_group]).run(plan_obj, Progress("p", len(plan_obj.stages)))
    assert outcome.state == RunState.COMPLETED, outcome.message
    copies = sum(len(stage.copies) for stage in plan_obj.stages)
    for fakes in (cluster, second_group):
        assert all(np.array_equal(agent.map, target.physical_to_logical_map) for agent in fakes.agents)
        assert len({agent.generation for agent in fakes.agents}) == 1
        own = {agent.url for agent in fakes.agents}
        peers = [peer for agent in fakes.agents for peer in agent.peers]
        assert len(peers) == copies and set(peers) <= own, "each group copies from its own agents"
        assert fakes.violations == []
    assert outcome.generation == cluster.agents[0].generation == second_group.agents[0].generation


async def test_a_stage_failing_in_one_group_is_undone_in_every_group(planner, cluster, second_group, client):
    plan_obj = planner(source(), target_for(4), MODEL, TOPOLOGY, max_copies_per_stage=4)
    second_group.agents[copies_of(plan_obj)[-1].target_slot // 3].fail_stage = 100
    outcome = await grouped_runner(client, [cluster, second_group]).run(plan_obj, Progress("p", len(plan_obj.stages)))
    assert outcome.state == RunState.FAILED and "group 1 rank" in outcome.message
    failing = next(i for i, stage in enumerate(plan_obj.stages) if stage.copies)
    before = plan_obj.map_after(failing - 1) if failing else source().physical_to_logical_map
    for fakes in (cluster, second_group):
        for agent in fakes.agents:
            assert np.array_equal(agent.map, before)
            assert all(state == "live" for _, state in agent.slots.values()), "staged slots retired"
        assert fakes.violations == []


def test_group_layout_keys_names_and_group_status():
    layout = GroupLayout(ranks=4, groups=2)
    assert [layout.key(1, 2), layout.keys_of(3), list(layout.keys)] == [6, [3, 7], list(range(8))]
    assert layout.name(6) == "group 1 rank 2" and layout.names([1, 6]) == "group 0 rank 1, group 1 rank 2"
    assert GroupLayout(ranks=4).name(3) == "rank 3" and GroupLayout(ranks=4).names([1, 2]) == "ranks [1, 2]"

    def answer(digest: str, generation: int) -> PlacementAnswer:
        return PlacementAnswer(rank=0, generation=generation, hash=digest, num_layers=1, num_experts=1,
                               slots_per_gpu=1, num_gpus=1, physical_to_logical_map=[[0]])

    view = AgentsView({key: answer("h", 3) for key in range(4)} | {4: answer("h", 2), 5: answer("old", 2)})
    agents = {key: f"http://a{key}" for key in range(7)}
    assert build_group_status(layout, agents, view, "h", 3) == [
        {"index": 0, "agents": 4, "reachable": 4, "generation": 3, "serving": True},
        {"index": 1, "agents": 3, "reachable": 2, "generation": 2, "serving": False},
    ]
