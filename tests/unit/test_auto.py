"""``policy: auto``: its choice does not follow the seed, ties are named, ``grouped`` joins the
candidates with the router's groups, phase ``both`` is one joint objective, and ``moeplace plan``
predicts with (and names) the router auto recommends."""

from dataclasses import replace

import numpy as np
import pytest
from moe_placement.models import ModelShape, PlacementError, Topology
from moe_placement.policies import PolicyOptions, plan
from moe_placement.policies.auto import TIE_TOLERANCE, choose_with_ties
from moe_placement.presets import gpu_preset
from moe_placement.synthetic import SyntheticConfig, generate

from test_placement_cli import moeplace

MODEL = ModelShape(
    num_layers=4, num_experts=16, top_k=2, hidden_size=256, expert_intermediate_size=128
)
TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2, slots_per_gpu=5, gpu=gpu_preset("h100"))


@pytest.fixture(scope="module")
def trace():
    """Two domains (intent, law) with different favourite experts, 64 sequences of 32 tokens."""
    config = SyntheticConfig(
        num_layers=4, num_experts=16, top_k=2, num_sequences=64, tokens_per_sequence=32,
        popularity_skew=1.2, domain_drift=0.9,
    )
    return generate(config, seed=1)


def _auto(profile, seed, phases=(), request_router="signature"):
    options = PolicyOptions(time_limit_s=10, seed=seed, phases=phases, request_router=request_router)
    return plan("auto", profile, MODEL, TOPOLOGY, options)


def test_the_choice_is_the_same_for_every_seed_and_ties_are_named(trace):
    profile = trace.profile(batch_size=512, phase="prefill")
    results = [_auto(profile, seed) for seed in range(4)]
    first = results[0]
    assert {r.placement.physical_to_logical_map.tobytes() for r in results} == {
        first.placement.physical_to_logical_map.tobytes()
    }
    assert {(tuple(r.solver.tied), r.solver.router) for r in results} == {
        (tuple(first.solver.tied), first.solver.router)
    }
    tie_notes = [note for note in first.solver.notes if note.startswith("tie: ")]
    assert len(tie_notes) == (len(first.solver.tied) > 1)
    assert first.solver.tied[0] in first.solver.notes[0]


def test_close_candidates_are_a_named_tie_won_by_the_first_in_order():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.002, 8)
    objectives = {  # per-batch objectives of three candidates, in candidate order
        "eplb": 1.000 + noise,
        "ilp": 0.995 + noise,  # 0.5% better than eplb: a tie
        "locality": 0.900 + noise,
    }
    assert choose_with_ties(objectives, list(objectives)) == ("locality", ["locality"])
    del objectives["locality"]
    chosen, tied = choose_with_ties(objectives, list(objectives))
    assert chosen == "eplb" and tied == ["eplb", "ilp"]
    # Far apart but noisy: two standard errors of the paired difference make it a tie too.
    noisy = {"eplb": np.array([1.0, 1.2, 0.8, 1.1]), "ilp": np.array([0.9, 1.25, 0.7, 1.1])}
    assert choose_with_ties(noisy, ["eplb", "ilp"])[1] == ["eplb", "ilp"]
    assert TIE_TOLERANCE <= 0.01


def test_grouped_is_a_candidate_only_with_the_routers_groups(trace):
    profile = trace.profile(batch_size=512, phase="prefill")
    assert "grouped:" in _auto(profile, 0).solver.notes[1]
    assert "grouped:" not in _auto(replace(profile, domain_loads={}), 0).solver.notes[1]
    assert "grouped:" not in _auto(profile, 0, request_router="round_robin").solver.notes[1]


def test_bad_options_name_the_field():
    with pytest.raises(PlacementError, match="request_router: 'psychic'"):
        PolicyOptions(request_router="psychic")
    with pytest.raises(PlacementError, match="phases: "):
        PolicyOptions(phases=("both",))


def test_phase_both_is_one_joint_objective(trace):
    both = _auto(trace.profile(batch_size=512, phase="prefill"), 0, phases=("prefill", "decode"))
    assert set(both.solver.phase_routers) == {"prefill", "decode"}
    assert both.solver.router == both.solver.phase_routers["prefill"]
    assert "prefill+decode" in both.solver.objective_name
    assert both.solver.notes[0].startswith("prefill: ") and " | decode: " in both.solver.notes[0]
    # The joint objective is relative to eplb+random: below 1 when auto beats it on average.
    assert 0 < both.solver.objective < 1
    # Same answer whichever phase the profile was taken for: the objective is the joint one.
    from_decode = _auto(trace.profile(batch_size=512, phase="decode"), 0, phases=("prefill", "decode"))
    assert from_decode.solver.phase_routers == both.solver.phase_routers


def test_plan_predicts_with_the_recommended_router_and_names_it(tmp_path):
    from moe_placement.files import read_placement
    from moe_placement.traces import save_trace

    config = SyntheticConfig(  # DeepSeek-V2-Lite's shape, two domains
        num_layers=26, num_experts=64, top_k=6, num_sequences=32, tokens_per_sequence=64,
        domain_drift=0.9,
    )
    path = tmp_path / "trace.npz"
    save_trace(generate(config, seed=2), path)
    out = tmp_path / "auto.json"
    result = moeplace(
        "plan", "--trace", str(path), "--model", "deepseek-v2-lite", "--policy", "auto",
        "--phase", "both", "--requests", "signature", "--time-limit", "20", "--out", str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    placement_file = read_placement(out)
    recommended = placement_file.solver.notes[2]
    for phase in ("prefill", "decode"):
        router = placement_file.predicted_routers[phase]
        assert f"{phase} {router}" in recommended
        assert f"({router})" in result.stdout
    assert np.isfinite(placement_file.predicted["prefill"]["moe_ms"])
