"""The synthetic generator: shapes, determinism, knobs, and calibration against the real traces."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_placement.models import PlacementError, WorkloadProfile
from moe_placement.presets import MODEL_PRESETS
from moe_placement.synthetic import (
    SYNTHETIC_PRESETS,
    SyntheticConfig,
    generate,
    gini,
    measure,
    measure_profile,
    rank_correlation,
    shifted,
)
from moe_placement.synthetic import _draw_without_replacement as draw_without_replacement
from moe_placement.traces import Trace, expert_load, load_profile, load_trace, smallest_per_row

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"{TRACES} is absent")
SMALL = {"num_sequences": 8, "tokens_per_sequence": 32}
# FLAME-MoE-290M's shape and trace size (no model preset), knobs tuned on its trace: the generator
# also reaches a flatter, less predictable router.
FLAME_LIKE = SyntheticConfig(
    name="flame-moe-290m",
    num_layers=8,
    num_experts=64,
    top_k=6,
    num_sequences=32,
    tokens_per_sequence=64,
    domains=("",),
    domain_weights=(1.0,),
    popularity_skew=0.193,  # FLAME: load Gini 0.115; synthetic 0.112
    sequence_affinity=0.381,  # FLAME: first 32 tokens activate 0.923; synthetic 0.922
    layer_follow=0.229,  # FLAME: top-1 follow 0.242; synthetic 0.247
)


@pytest.fixture(scope="module")
def lite() -> Trace:
    return generate(SYNTHETIC_PRESETS["deepseek-v2-lite"])


@pytest.mark.parametrize("name", sorted(SYNTHETIC_PRESETS))
def test_presets_match_the_model_shapes(name: str) -> None:
    config = SYNTHETIC_PRESETS[name]
    model = MODEL_PRESETS[name]
    assert (config.num_layers, config.num_experts, config.top_k) == (
        model.num_layers,
        model.num_experts,
        model.top_k,
    )
    trace = generate(replace(config, **SMALL))
    assert trace.expert_ids.shape == (model.num_layers, 8 * 32, model.top_k)
    assert trace.expert_ids.min() >= 0 and trace.expert_ids.max() < model.num_experts
    ordered = np.sort(trace.expert_ids, axis=2)
    assert np.all(ordered[..., 1:] != ordered[..., :-1]), "a token's k experts must be distinct"
    np.testing.assert_array_equal(trace.seq_offsets, np.arange(9) * 32)
    assert set(trace.domains) <= set(config.domains) and trace.phase == "prefill"


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    config = replace(SYNTHETIC_PRESETS["deepseek-v2-lite"], **SMALL)
    a, b, c = generate(config, seed=3), generate(config, seed=3), generate(config, seed=4)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert a.domains == b.domains
    assert not np.array_equal(a.expert_ids, c.expert_ids)


def test_domains_follow_their_weights() -> None:
    config = replace(
        SYNTHETIC_PRESETS["deepseek-v2-lite"], domains=("a", "b", "c"), domain_weights=(2, 1, 1)
    )
    trace = generate(replace(config, **SMALL))
    assert [trace.domains.count(name) for name in "abc"] == [4, 2, 2]


def test_decode_is_close_to_prefill_of_the_same_seed(lite: Trace) -> None:
    config = SYNTHETIC_PRESETS["deepseek-v2-lite"]
    decode = generate(replace(config, phase="decode"))
    assert decode.phase == "decode"
    other_seed = generate(replace(config, phase="decode"), seed=1)
    prefill_load, decode_load, other_load = (
        expert_load(trace.expert_ids, 64) for trace in (lite, decode, other_seed)
    )
    same, other = rank_correlation(prefill_load, decode_load), rank_correlation(
        prefill_load, other_load
    )
    assert 0.70 <= same <= 0.92  # prefill predicts decode (Spearman 0.70-0.92 in the literature)
    assert other < 0.3


def test_shift_changes_domain_half_way() -> None:
    config = replace(SYNTHETIC_PRESETS["deepseek-v2-lite"], **SMALL)
    trace = shifted(config, "intent", "law")
    before, after = trace.windows(2)
    assert set(before.domains) == {"intent"} and set(after.domains) == {"law"}
    with pytest.raises(PlacementError, match="^domains: unknown domain 'code'"):
        shifted(config, "intent", "code")


def test_knobs_move_their_figures() -> None:
    base = replace(SYNTHETIC_PRESETS["deepseek-v2-lite"], num_sequences=32, tokens_per_sequence=64)
    flat, hot = (measure(generate(replace(base, popularity_skew=skew))) for skew in (0.0, 1.5))
    assert flat["load_gini"] < 0.1 < 0.4 < hot["load_gini"]
    assert hot["decode32_active"] < flat["decode32_active"]
    loose, tight = (measure(generate(replace(base, layer_follow=follow))) for follow in (0.0, 1.0))
    assert loose["top1_follow"] < 0.3 and tight["top1_follow"] > 0.95
    same, apart = (measure(generate(replace(base, domain_drift=drift))) for drift in (0.0, 1.0))
    assert same["domain_cosine"] > apart["domain_cosine"] + 0.1
    mixed, personal = (measure(generate(replace(base, sequence_affinity=a))) for a in (0.0, 1.5))
    assert personal["prefill32_active"] < mixed["prefill32_active"] - 0.1


def test_skew_per_layer() -> None:
    config = replace(
        SYNTHETIC_PRESETS["deepseek-v2-lite"], num_layers=2, popularity_skew=(0.0, 2.0)
    )
    trace = generate(replace(config, sequence_affinity=0.0))
    first, second = gini(expert_load(trace.expert_ids, 64))
    assert first < 0.1 < 0.5 < second


@pytest.mark.parametrize(
    "change, message",
    [
        ({"top_k": 65}, "^top_k: 65 exceeds"),
        ({"num_sequences": 0}, "^num_sequences: "),
        ({"popularity_skew": (1.0, 2.0)}, "^popularity_skew: "),
        ({"popularity_skew": -1.0}, "^popularity_skew: "),
        ({"domain_weights": (1.0,)}, "^domain_weights: 1 weights for 2 domains"),
        ({"domain_weights": (0.0, 0.0)}, "^domain_weights: "),
        ({"domains": ("a", "a")}, "^domains: names repeat"),
        ({"domain_drift": 1.5}, "^domain_drift: "),
        ({"layer_follow": -0.1}, "^layer_follow: "),
        ({"sequence_affinity": -1.0}, "^sequence_affinity: "),
        ({"phase": "train"}, "^phase: "),
    ],
)
def test_bad_configs_name_the_knob(change: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        replace(SYNTHETIC_PRESETS["deepseek-v2-lite"], **change)


def test_measures_of_known_loads() -> None:
    even = WorkloadProfile(load=np.full((2, 4), 8.0), top_k=1)
    figures = measure_profile(even)
    assert figures["load_gini"] == pytest.approx(0.0) and figures[
        "load_max_over_mean"
    ] == pytest.approx(1.0)
    assert figures["decode32_active"] == pytest.approx(1 - 0.75**32)
    assert np.isnan(figures["domain_cosine"])
    assert gini(np.array([[0.0, 0.0, 0.0, 1.0]]))[0] == pytest.approx(0.75)
    load = np.array([[1.0, 2, 3, 4]])
    assert rank_correlation(load, load) == pytest.approx(1.0)
    assert rank_correlation(load, load[:, ::-1]) == pytest.approx(-1.0)
    with pytest.raises(PlacementError, match="^load: shapes"):
        rank_correlation(load, load.T)


def test_deepseek_v3_size_is_quick() -> None:
    config = SYNTHETIC_PRESETS["deepseek-v3"]
    start = time.process_time()  # CPU time: other processes on the machine do not count
    trace = generate(config)
    elapsed = time.process_time() - start
    assert trace.expert_ids.shape == (58, config.num_sequences * config.tokens_per_sequence, 8)
    assert trace.num_tokens >= 16000
    assert elapsed < 10.0  # about 1 s


# --- calibration against the real traces (docs/traces.md has the table) -----------------------


def assert_near(
    synthetic: dict[str, float], real: dict[str, float], tolerances: dict[str, float]
) -> None:
    for figure, tolerance in tolerances.items():
        assert (
            abs(synthetic[figure] - real[figure]) <= tolerance
        ), f"{figure}: synthetic {synthetic[figure]:.3f}, real {real[figure]:.3f}"


@needs_traces
def test_deepseek_v2_lite_is_calibrated_on_esft(lite: Trace) -> None:
    real = measure(load_trace(TRACES / "esft_lite_intent_law_top6.npz"))
    assert_near(
        measure(lite),
        real,
        {
            "load_gini": 0.02,
            "load_max_over_mean": 0.3,
            "top10_share": 0.02,
            "domain_cosine": 0.03,
            "decode32_active": 0.02,
            "prefill32_active": 0.02,
            "top1_follow": 0.02,
        },
    )


@needs_traces
def test_mixtral_is_calibrated_on_its_counts() -> None:
    real = measure_profile(
        load_profile(TRACES / "olmoe_mixtral_routing_counts.npz", model="mixtral")
    )
    synthetic = measure(generate(SYNTHETIC_PRESETS["mixtral-8x7b"]))
    assert_near(
        synthetic, real, {"load_gini": 0.01, "domain_cosine": 0.005, "decode32_active": 0.01}
    )


@needs_traces
def test_qwen3_is_calibrated_on_its_decode_heat() -> None:
    real = measure_profile(load_profile(TRACES / "qwen3_30b_a3b_decode_heat.json"))
    config = replace(SYNTHETIC_PRESETS["qwen3-30b-a3b"], phase="decode")
    assert_near(measure(generate(config)), real, {"load_gini": 0.03, "decode32_active": 0.04})


@needs_traces
def test_the_knobs_reach_flame_too() -> None:
    real = measure(load_trace(TRACES / "flame_moe_290m_prefill_top6.npz"))
    synthetic = measure(generate(FLAME_LIKE))
    assert_near(synthetic, real, {"load_gini": 0.02, "top1_follow": 0.03, "prefill32_active": 0.02})


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 8), distinct=st.booleans())
def test_smallest_per_row_is_argpartition_then_argsort(seed, k, distinct):
    rng = np.random.default_rng(seed)
    # distinct keys, or few values so that rows tie at the k-th smallest
    keys = (rng.random((64, 20)) if distinct else rng.integers(0, 4, (64, 20))).astype(np.float32)
    chosen = smallest_per_row(keys, k)
    assert np.array_equal(np.take_along_axis(keys, chosen, 1), np.sort(keys, axis=1)[:, :k])
    assert all(len(set(row)) == k for row in chosen.tolist())
    if distinct:
        top = np.argpartition(keys, k - 1, axis=1)[:, :k]
        reference = np.take_along_axis(top, np.argsort(np.take_along_axis(keys, top, 1), 1), 1)
        assert np.array_equal(chosen, reference)


def test_draws_without_replacement_follow_plackett_luce():
    """Ordered pairs (first, second) of 5 experts: drawn as often as Plackett-Luce says,
    w_i / W * w_j / (W - w_i), within 4 standard errors, for two sequences of other popularities."""
    logits = np.log(np.array([[4.0, 2.0, 1.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2, 3.2]]))
    draws = 20_000
    sequence_of_token = np.repeat([0, 1], draws)
    chosen = draw_without_replacement(
        logits, sequence_of_token, np.full(2 * draws, -1), 2, np.random.default_rng(7)
    )
    for sequence, weights in enumerate(np.exp(logits)):
        total = weights.sum()
        expected = weights[:, None] / total * weights[None, :] / (total - weights[:, None])
        np.fill_diagonal(expected, 0.0)
        pairs = chosen[sequence_of_token == sequence]
        observed = np.zeros((5, 5))
        np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1.0 / draws)
        standard_error = np.sqrt(expected * (1 - expected) / draws)
        assert np.all(np.abs(observed - expected) <= 4 * standard_error + 1e-12), (observed, expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 6))
def test_draws_keep_the_forced_expert_first_and_never_repeat(seed, k):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (3, 7))  # hot experts: many draws land on one already held
    sequence_of_token = np.repeat(np.arange(3), 50)
    forced = np.where(rng.random(150) < 0.5, rng.integers(0, 7, 150), -1)
    chosen = draw_without_replacement(logits, sequence_of_token, forced, k, rng)
    assert chosen.shape == (150, k) and chosen.min() >= 0 and chosen.max() < 7
    assert np.array_equal(chosen[forced >= 0, 0], forced[forced >= 0])
    assert all(len(set(row)) == k for row in chosen.tolist())
