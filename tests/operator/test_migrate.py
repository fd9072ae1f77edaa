"""The migration executor against in-process fake agents: completes, resumes, retries, rolls back,
and never leaves an expert without a live replica."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_agents import TOKEN, FakeCluster
from moe_operator.agents import AgentClient
from moe_operator.migrate import ExecOptions, Executor, Progress, converge, execute, snapshot, union_map
from moe_placement.baselines import linear_placement
from moe_placement.models import ModelShape, Placement, WorkloadProfile
from moe_placement.policies import plan
from moe_placement.presets import parse_topology

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


async def run_plan(cluster, plan_obj, progress, options=None, should_stop=lambda: False, agents=None):
    client = AgentClient(token=TOKEN, timeout_s=5)
    recorded: list[Progress] = []

    async def record(state: Progress) -> None:
        recorded.append(state)

    executor = Executor(
        client=client, agents=agents or cluster.urls, slots_per_gpu=3, num_experts=8,
        options=options or ExecOptions(max_concurrent_transfers=2, retries=1, backoff_s=0.01),
        record=record, should_stop=should_stop,
    )
    try:
        outcome = await execute(executor, source().physical_to_logical_map if not recorded else None, plan_obj, progress)
    finally:
        await client.close()
    return outcome, recorded


def test_union_map_only_fills_empty_slots():
    prev = np.array([[0, 1, -1, 2]])

    class Copy:
        layer, expert, source_slot, target_slot = 0, 1, 1, 2

    assert union_map(prev, [Copy()]).tolist() == [[0, 1, 1, 2]]

    class Bad:
        layer, expert, source_slot, target_slot = 0, 1, 1, 3

    with pytest.raises(ValueError):
        union_map(prev, [Bad()])


def test_full_migration(planner):
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        try:
            target = target_for(1)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=3)
            progress = Progress(plan_id="p", stages=len(plan_obj.stages))
            outcome, recorded = await run_plan(cluster, plan_obj, progress)
            assert outcome.state == "Completed", outcome.message
            assert np.array_equal(outcome.live_map, target.physical_to_logical_map)
            assert all(np.array_equal(agent.map, target.physical_to_logical_map) for agent in cluster.agents)
            assert all(state == "live" for agent in cluster.agents for _, state in agent.slots.values())
            assert recorded[-1].stage == len(plan_obj.stages) and recorded[-1].bytes_moved > 0
            assert outcome.generation == max(agent.generation for agent in cluster.agents)
            assert cluster.violations == []
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_interrupt_then_resume_and_replay_is_idempotent(planner):
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        try:
            target = target_for(2)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=2)
            assert len(plan_obj.stages) >= 2
            progress = Progress(plan_id="p", stages=len(plan_obj.stages))
            outcome, recorded = await run_plan(cluster, plan_obj, progress, should_stop=lambda: True)
            assert outcome.state == "Interrupted" and outcome.progress.stage == 1
            assert np.array_equal(outcome.live_map, plan_obj.stages[0].physical_to_logical_map)
            # A restarted operator resumes from the recorded progress, replaying the last stage as
            # if its record had been lost (stage 0, step "") -- nothing is done twice.
            calls_before = sum(len(agent.calls) for agent in cluster.agents)
            stale = Progress(plan_id="p", stages=len(plan_obj.stages), stage=0, step="")
            outcome, _ = await run_plan(cluster, plan_obj, stale)
            assert outcome.state == "Completed", outcome.message
            assert all(np.array_equal(agent.map, target.physical_to_logical_map) for agent in cluster.agents)
            assert sum(len(agent.calls) for agent in cluster.agents) > calls_before
            assert cluster.violations == []
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_failed_copy_is_retried_then_succeeds(planner):
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        try:
            target = target_for(3)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=4)
            first_target = copies_of(plan_obj)[0].target_slot // 3
            cluster.agents[first_target].fail_stage = 1
            outcome, _ = await run_plan(cluster, plan_obj, Progress("p", len(plan_obj.stages)))
            assert outcome.state == "Completed", outcome.message
            assert cluster.violations == []
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_failing_copies_roll_the_stage_back(planner):
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        try:
            target = target_for(4)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=4)
            copies = copies_of(plan_obj)
            bad = copies[-1].target_slot // 3
            cluster.agents[bad].fail_stage = 100
            outcome, _ = await run_plan(cluster, plan_obj, Progress("p", len(plan_obj.stages)))
            assert outcome.state == "RolledBack" and "rolled back" in outcome.message
            failing = next(i for i, stage in enumerate(plan_obj.stages) if stage.copies)
            before = plan_obj.stages[failing - 1].physical_to_logical_map if failing else source().physical_to_logical_map
            assert np.array_equal(outcome.live_map, before)
            for agent in cluster.agents:
                assert np.array_equal(agent.map, before)
                assert all(state == "live" for _, state in agent.slots.values()), "staged slots retired"
            assert cluster.violations == []
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_dead_agent_mid_migration_rolls_back_and_keeps_maps_valid(planner):
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        try:
            target = target_for(5)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=2)
            victim = copies_of(plan_obj, 1)[0].target_slot // 3
            stops = {"n": 0}

            def stop_after_first() -> bool:
                stops["n"] += 1
                return False

            client = AgentClient(token=TOKEN, timeout_s=2)
            progress_log = []

            async def record(state):
                progress_log.append(state)
                if state.stage == 1 and cluster.agents[victim].alive:
                    await cluster.agents[victim].stop()

            executor = Executor(client, cluster.urls, 3, 8, ExecOptions(retries=1, backoff_s=0.01), record, stop_after_first)
            outcome = await execute(executor, source().physical_to_logical_map, plan_obj, Progress("p", len(plan_obj.stages)))
            await client.close()
            assert outcome.state in ("RolledBack", "Stalled"), outcome.state
            alive = [agent for agent in cluster.agents if agent.alive]
            for agent in alive:
                Placement(agent.map, 8, 3)  # every served map holds every expert
            assert cluster.violations == []
        finally:
            await cluster.stop()

    asyncio.run(main())


def test_converge_brings_a_lagging_agent_up():
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        client = AgentClient(token=TOKEN, timeout_s=2)
        try:
            for agent in cluster.agents[1:]:
                agent.generation = 5
            view = await snapshot(client, cluster.urls)
            problems = await converge(client, cluster.urls, source().physical_to_logical_map, 5, view)
            assert problems == [] and {agent.generation for agent in cluster.agents} == {5}
            other = np.roll(source().physical_to_logical_map, 3, axis=1)
            problems = await converge(client, cluster.urls, other, 6, await snapshot(client, cluster.urls))
            assert problems and "needs expert" in problems[0]
        finally:
            await client.close()
            await cluster.stop()

    asyncio.run(main())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), per_stage=st.integers(1, 6))
def test_property_no_expert_loses_its_last_replica(planner, seed, per_stage):
    async def main():
        cluster = FakeCluster(source().physical_to_logical_map, 8, 3)
        await cluster.start()
        try:
            target = target_for(seed)
            plan_obj = planner(source(), target, MODEL, TOPOLOGY, max_copies_per_stage=per_stage)
            outcome, _ = await run_plan(cluster, plan_obj, Progress("p", len(plan_obj.stages)))
            assert outcome.state == "Completed", outcome.message
            assert cluster.violations == []
            assert cluster.maps() == {__import__("moe_placement").placement_hash(target.physical_to_logical_map)}
        finally:
            await cluster.stop()

    asyncio.run(main())
