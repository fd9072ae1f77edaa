"""Traces: the adapters on every real file, native round trips, windows, batches and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_placement.models import PlacementError, WorkloadProfile
from moe_placement.traces import (
    Trace,
    concatenate,
    expert_load,
    load_profile,
    load_trace,
    sample_batches,
    sample_tokens,
    save_profile,
    save_trace,
)
from moe_placement.traces import _largest_codes as largest_codes

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
ESFT = TRACES / "esft_lite_intent_law_top6.npz"
FLAME = TRACES / "flame_moe_290m_prefill_top6.npz"
OLMOE = TRACES / "olmoe_mixtral_routing_counts.npz"
QWEN = TRACES / "qwen3_30b_a3b_decode_heat.json"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"{TRACES} is absent")


def random_trace(
    num_layers: int = 3,
    num_experts: int = 8,
    top_k: int = 2,
    lengths: tuple[int, ...] = (5, 3, 4, 6),
    domains: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Trace:
    """A small trace of distinct random experts per token."""
    rng = np.random.default_rng(seed)
    num_tokens = sum(lengths)
    ids = np.argsort(rng.random((num_layers, num_tokens, num_experts)), axis=2)[:, :, :top_k]
    return Trace(
        expert_ids=ids,
        num_experts=num_experts,
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]),
        domains=domains if domains is not None else ("",) * len(lengths),
        name="random",
    )


def assert_same_trace(a: Trace, b: Trace) -> None:
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.seq_offsets, b.seq_offsets)
    assert (a.num_experts, a.domains, a.phase) == (b.num_experts, b.domains, b.phase)


@pytest.fixture(scope="module")
def esft() -> Trace:
    return load_trace(ESFT)


# --- the real files ---------------------------------------------------------------------------


@needs_traces
def test_esft_holds_both_tasks_with_first_choice_by_gate_weight(esft: Trace) -> None:
    assert esft.expert_ids.shape == (26, 8222 + 8327, 6)
    assert esft.num_experts == 64 and esft.phase == "prefill"
    assert esft.domain_names == ("intent", "law")
    assert esft.domains.count("intent") == 127 and esft.domains.count("law") == 33
    assert esft.expert_ids.min() >= 0 and esft.expert_ids.max() < 64
    with np.load(ESFT) as raw:
        weights, ids = raw["law_gate_weights"], raw["law_expert_ids"]
    top = np.take_along_axis(ids, weights.argmax(axis=2)[..., None], axis=2)[..., 0]
    law = esft.select_domain("law")
    np.testing.assert_array_equal(law.expert_ids[:, :, 0], top)
    assert law.num_tokens == 8327 and law.num_sequences == 33
    assert np.all(np.sort(law.expert_ids, axis=2) == np.sort(ids, axis=2))


@needs_traces
def test_esft_task_selects_one_domain() -> None:
    intent = load_trace(ESFT, task="intent")
    assert intent.num_tokens == 8222 and set(intent.domains) == {"intent"}
    with pytest.raises(PlacementError, match="task: unknown domain 'chat'.*'intent', 'law'"):
        load_trace(ESFT, task="chat")


@needs_traces
def test_flame_sequences_every_64_tokens() -> None:
    flame = load_trace(FLAME)
    assert flame.expert_ids.shape == (8, 32 * 64, 6)
    np.testing.assert_array_equal(flame.seq_offsets, np.arange(33) * 64)
    assert flame.domains == ("",) * 32 and flame.num_experts == 64
    with np.load(FLAME) as raw:
        np.testing.assert_array_equal(flame.expert_ids[3, 64 * 5 : 64 * 6], raw["expert_ids"][3, 5])


@needs_traces
@pytest.mark.parametrize(
    "model, experts, top_k",
    [("olmoe", 64, 8), ("mistral", 8, 2), ("mixtral", 8, 2), ("mixtral-8x7b", 8, 2)],
)
def test_olmoe_mixtral_counts(model: str, experts: int, top_k: int) -> None:
    profile = load_profile(OLMOE, model=model)
    assert profile.load.shape == (3, experts) and profile.top_k == top_k
    assert list(profile.domain_loads) == ["arxiv", "book", "c4", "github", "wikipedia"]
    np.testing.assert_allclose(sum(profile.domain_loads.values()), profile.load)
    np.testing.assert_allclose(profile.load.sum(axis=1), 5 * 208896 * top_k)
    assert set(profile.transitions.layer.tolist()) == {0, 1}
    for layer in (0, 1):
        np.testing.assert_allclose(
            profile.transitions.dense(layer, experts).sum(axis=1), profile.load[layer]
        )
    github = load_profile(OLMOE, task="github", model=model)
    assert github.domain_loads == {}
    np.testing.assert_allclose(github.load, profile.domain_loads["github"])


@needs_traces
def test_olmoe_needs_a_known_model_and_task() -> None:
    with pytest.raises(PlacementError, match="^model: .*'olmoe' or 'mistral'"):
        load_profile(OLMOE)
    with pytest.raises(PlacementError, match="^model: "):
        load_profile(OLMOE, model="llama")
    with pytest.raises(PlacementError, match="^task: unknown domain 'law'.*arxiv"):
        load_profile(OLMOE, task="law", model="olmoe")
    with pytest.raises(PlacementError, match="^model: .*got 'deepseek-v2-lite'"):
        load_profile(OLMOE, model="deepseek-v2-lite")
    assert load_profile(QWEN, model="qwen3-30b-a3b").top_k == 8  # single-model files ignore it


@needs_traces
def test_qwen3_heat() -> None:
    profile = load_profile(QWEN)
    assert profile.load.shape == (48, 128) and profile.top_k == 8 and profile.phase == "decode"
    assert profile.num_tokens == pytest.approx(75773)
    pairs = profile.coactivation
    assert len(pairs.layer) > 0 and np.all(pairs.first < pairs.second)
    assert pairs.layer.max() == 47 and profile.transitions is None
    with pytest.raises(PlacementError, match="^task: "):
        load_profile(QWEN, task="code")


@needs_traces
@pytest.mark.parametrize("path", [OLMOE, QWEN], ids=["olmoe", "qwen3"])
def test_counts_files_are_not_traces(path: Path) -> None:
    with pytest.raises(PlacementError, match="holds counts only, use load_profile"):
        load_trace(path)


@needs_traces
def test_profile_of_a_per_token_file(esft: Trace) -> None:
    profile = load_profile(ESFT)
    np.testing.assert_array_equal(profile.load, expert_load(esft.expert_ids, 64))
    np.testing.assert_allclose(profile.load.sum(axis=1), esft.num_tokens * 6)
    np.testing.assert_allclose(sum(profile.domain_loads.values()), profile.load)
    # 64 x 64 pairs fit in the default 4096 kept per layer: rows sum to k * load.
    for layer in (0, 12, 24):
        np.testing.assert_allclose(
            profile.transitions.dense(layer, 64).sum(axis=1), 6 * profile.load[layer]
        )
    assert set(profile.transitions.layer.tolist()) == set(range(25))
    assert np.all(profile.coactivation.first < profile.coactivation.second)
    kept = esft.profile(max_pairs_per_layer=10).transitions
    assert np.all(np.bincount(kept.layer) == 10)
    assert load_profile(ESFT, task="law").domain_loads == {}


@needs_traces
def test_real_batches(esft: Trace) -> None:
    rng = np.random.default_rng(0)
    for phase in ("prefill", "decode"):
        batches = sample_batches(esft, 8, 256, 3, phase, rng)
        assert len(batches) == 3
        for batch in batches:
            assert batch.expert_ids.shape == (26, 2048, 6)
            assert batch.source_gpu.min() >= 0 and batch.source_gpu.max() < 8


@needs_traces
def test_sampled_tokens_of_counts_keep_the_load() -> None:
    heat = load_profile(QWEN)
    tokens = sample_tokens(heat, 10000, np.random.default_rng(0))
    assert tokens.expert_ids.shape == (48, 10000, 8) and tokens.phase == "decode"
    share = expert_load(tokens.expert_ids, 128) / 10000
    np.testing.assert_allclose(share, heat.load / heat.num_tokens, atol=0.02)
    olmoe = sample_tokens(load_profile(OLMOE, model="olmoe"), 5000, np.random.default_rng(1))
    assert olmoe.domain_names and set(olmoe.domains) == {
        "arxiv",
        "book",
        "c4",
        "github",
        "wikipedia",
    }
    fit, score = olmoe.split(0.5)
    assert fit.num_tokens == score.num_tokens == 2500


# --- native formats ---------------------------------------------------------------------------


def test_native_trace_round_trip(tmp_path: Path) -> None:
    trace = random_trace(domains=("a", "b", "a", "c"))
    trace = Trace(trace.expert_ids, 8, trace.seq_offsets, trace.domains, "decode", "mine")
    save_trace(trace, tmp_path / "t.npz")
    loaded = load_trace(tmp_path / "t.npz")
    assert_same_trace(trace, loaded)
    assert loaded.name == "mine"
    assert_same_trace(load_trace(tmp_path / "t.npz", task="a"), trace.select_domain("a"))


def test_native_trace_with_only_the_required_keys(tmp_path: Path) -> None:
    ids = random_trace().expert_ids
    np.savez(tmp_path / "bare.npz", expert_ids=ids.astype(np.uint8), num_experts=8)
    loaded = load_trace(tmp_path / "bare.npz")
    np.testing.assert_array_equal(loaded.seq_offsets, [0, ids.shape[1]])
    assert loaded.domains == ("",) and loaded.phase == "prefill" and loaded.name == "bare"


def test_native_profile_round_trip(tmp_path: Path) -> None:
    profile = random_trace(domains=("a", "b", "a", "b")).profile(batch_size=64, phase="decode")
    save_profile(profile, tmp_path / "p.npz")
    loaded = load_profile(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.load, profile.load)
    assert (loaded.top_k, loaded.phase, loaded.batch_size) == (2, "decode", 64)
    for name in ("transitions", "coactivation"):
        for part in ("layer", "first", "second", "count"):
            np.testing.assert_array_equal(
                getattr(getattr(loaded, name), part), getattr(getattr(profile, name), part)
            )
    assert list(loaded.domain_loads) == ["a", "b"]
    np.testing.assert_array_equal(loaded.domain_loads["b"], profile.domain_loads["b"])
    only_a = load_profile(tmp_path / "p.npz", task="a")
    np.testing.assert_array_equal(only_a.load, profile.domain_loads["a"])
    with pytest.raises(PlacementError, match="^task: unknown domain 'z'"):
        load_profile(tmp_path / "p.npz", task="z")


def test_profile_without_pairs_round_trips(tmp_path: Path) -> None:
    profile = WorkloadProfile(load=np.ones((2, 4)), top_k=1)
    save_profile(profile, tmp_path / "p.npz")
    loaded = load_profile(tmp_path / "p.npz")
    assert loaded.transitions is None and loaded.coactivation is None and loaded.domain_loads == {}
    with pytest.raises(PlacementError, match="holds counts only"):
        load_trace(tmp_path / "p.npz")


# --- windows, splits, profiles ----------------------------------------------------------------


def test_split_keeps_every_domain_share() -> None:
    domains = ("a", "b") * 6 + ("c",) * 4
    trace = random_trace(lengths=tuple(range(1, 17)), domains=domains)
    first, second = trace.split(0.5)
    for half in (first, second):
        assert (
            half.domains.count("a") == 3
            and half.domains.count("b") == 3
            and half.domains.count("c") == 2
        )
    assert first.num_sequences + second.num_sequences == 16
    # In order: the first half holds the first sequences of every domain.
    np.testing.assert_array_equal(first.expert_ids[:, :1], trace.expert_ids[:, :1])
    with pytest.raises(PlacementError, match="^fraction: "):
        trace.split(1.0)
    with pytest.raises(PlacementError, match="^domains: domain 'x' has 1 sequence"):
        random_trace(domains=("a", "a", "a", "x")).split()


def test_windows_are_consecutive_and_cover_the_trace() -> None:
    trace = random_trace(lengths=(10, 1, 1, 1, 10, 2, 7), domains=tuple("abcdefg"))
    windows = trace.windows(3)
    assert [window.num_tokens for window in windows] == [11, 12, 9]  # cuts nearest 32/3, 64/3
    assert_same_trace(concatenate(windows), trace)
    assert len(trace.windows(7)) == 7
    with pytest.raises(PlacementError, match="^num_windows: "):
        trace.windows(8)


def test_select_sequences_in_given_order() -> None:
    trace = random_trace()
    picked = trace.select_sequences(np.array([2, 0]))
    np.testing.assert_array_equal(picked.seq_offsets, [0, 4, 9])
    np.testing.assert_array_equal(picked.expert_ids[:, :4], trace.expert_ids[:, 8:12])
    np.testing.assert_array_equal(picked.expert_ids[:, 4:], trace.expert_ids[:, :5])
    with pytest.raises(PlacementError, match="^sequence_indices: "):
        trace.select_sequences(np.array([4]))
    with pytest.raises(PlacementError, match="^sequence_indices: empty"):
        trace.select_sequences(np.array([], dtype=int))


def test_profile_counts_pairs() -> None:
    ids = np.array([[[0, 1], [2, 0]], [[3, 2], [1, 2]]])  # [L=2, T=2, k=2]
    trace = Trace(ids, 4, np.array([0, 2]), ("",))
    profile = trace.profile()
    np.testing.assert_array_equal(profile.load, [[2, 1, 1, 0], [0, 1, 2, 1]])
    expected = np.zeros((4, 4))
    for a, b in [(0, 3), (0, 2), (1, 3), (1, 2), (2, 1), (2, 2), (0, 1), (0, 2)]:
        expected[a, b] += 1
    np.testing.assert_array_equal(profile.transitions.dense(0, 4), expected)
    co = profile.coactivation
    assert list(zip(co.layer, co.first, co.second, co.count)) == [
        (0, 0, 1, 1),
        (0, 0, 2, 1),
        (1, 1, 2, 1),
        (1, 2, 3, 1),
    ]
    assert profile.domain_loads == {}


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=12),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_split_then_concatenate_gives_the_trace_back(
    lengths: list[int], fraction: float, seed: int
) -> None:
    trace = random_trace(lengths=tuple(lengths), seed=seed)
    assert_same_trace(concatenate(trace.split(fraction)), trace)
    windows = trace.windows(min(3, len(lengths)))
    assert_same_trace(concatenate(windows), trace)


@settings(max_examples=30, deadline=None)
@given(
    domains=st.lists(st.sampled_from("abc"), min_size=1, max_size=12),
    top_k=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_profile_load_sums_to_tokens_times_k(domains: list[str], top_k: int, seed: int) -> None:
    lengths = tuple(np.random.default_rng(seed).integers(1, 5, len(domains)))
    trace = random_trace(
        num_experts=6, top_k=top_k, lengths=lengths, domains=tuple(domains), seed=seed
    )
    profile = trace.profile(max_pairs_per_layer=5)
    np.testing.assert_array_equal(profile.load.sum(axis=1), trace.num_tokens * top_k)
    if len(set(domains)) > 1:
        np.testing.assert_array_equal(sum(profile.domain_loads.values()), profile.load)
        for domain, load in profile.domain_loads.items():
            np.testing.assert_array_equal(load, trace.select_domain(domain).profile().load)
    assert np.all(np.bincount(profile.transitions.layer) <= 5)
    without = trace.profile(pairs=False)
    assert without.transitions is None and without.coactivation is None
    np.testing.assert_array_equal(without.load, profile.load)


def test_a_trace_copies_ids_unless_they_are_its_own_read_only_array() -> None:
    ids = np.zeros((2, 3, 1), dtype=np.int64)
    copied = Trace(ids, 2, np.array([0, 3]), ("",))
    ids[0, 0, 0] = 1  # the caller's writable array: the trace kept a copy
    assert copied.expert_ids[0, 0, 0] == 0 and not copied.expert_ids.flags.writeable
    ids.setflags(write=False)
    assert Trace(ids, 2, np.array([0, 3]), ("",)).expert_ids is ids
    view = ids[:, :2]  # read-only but not its own memory: copied
    assert Trace(view, 2, np.array([0, 2]), ("",)).expert_ids is not view
    narrow = np.zeros((2, 3, 1), dtype=np.int16)
    narrow.setflags(write=False)
    assert Trace(narrow, 2, np.array([0, 3]), ("",)).expert_ids.dtype == np.int64


# --- batches and sampled tokens ---------------------------------------------------------------


def test_prefill_batches_put_each_sequence_on_one_gpu() -> None:
    trace = random_trace(lengths=(5, 3, 4, 6))
    batches = sample_batches(trace, 2, 4, 3, "prefill", np.random.default_rng(0))
    stream = np.concatenate([batch.expert_ids for batch in batches], axis=1)
    # Consecutive batches read the wrapped token stream.
    start = int(
        np.nonzero((trace.expert_ids[:, :, None] == stream[:, None, :1]).all(axis=(0, 3)))[0][0]
    )
    positions = (start + np.arange(24)) % trace.num_tokens
    np.testing.assert_array_equal(stream, trace.expert_ids[:, positions])
    for batch, chunk in zip(batches, positions.reshape(3, 8)):
        sequence = trace.sequence_of_token()[chunk]
        for index in np.unique(sequence):
            runs = batch.source_gpu[sequence == index]
            assert (
                len(set(runs.tolist())) <= 2
            )  # one GPU per run; a sequence may wrap into two runs


def test_decode_batches_use_distinct_positions_and_dp_rank() -> None:
    trace = random_trace(lengths=(1,) * 40, num_experts=16)
    (batch,) = sample_batches(trace, 4, 8, 1, "decode", np.random.default_rng(0))
    assert batch.expert_ids.shape == (3, 32, 2)
    codes = {tuple(column.ravel()) for column in batch.expert_ids.transpose(1, 0, 2)}
    assert len(codes) == 32
    assert set(batch.source_gpu.tolist()) <= {0, 1, 2, 3}


def test_small_trace_is_sampled_with_replacement() -> None:
    trace = random_trace()
    for phase in ("prefill", "decode"):
        (batch,) = sample_batches(trace, 4, 16, 1, phase, np.random.default_rng(0))
        assert batch.expert_ids.shape == (3, 64, 2)


def test_sample_tokens_matches_expected_load() -> None:
    load = np.array([[50.0, 30, 15, 5, 0, 0], [20, 20, 20, 20, 10, 10]])
    profile = WorkloadProfile(load=load, top_k=1)
    tokens = sample_tokens(profile, 40000, np.random.default_rng(0))
    np.testing.assert_allclose(tokens.profile().load / 40000, load / 100, atol=0.01)
    skewed = WorkloadProfile(load=np.array([[90.0, 5, 3, 1, 1]]), top_k=2)  # expert 0 capped at 1
    ids = sample_tokens(skewed, 10000, np.random.default_rng(1)).expert_ids
    assert np.all(ids[0, :, 0] != ids[0, :, 1])
    assert np.mean(np.any(ids[0] == 0, axis=1)) == 1.0
    with pytest.raises(PlacementError, match="^load: 1 experts with load, top_k is 2"):
        sample_tokens(
            WorkloadProfile(load=np.array([[4.0, 0, 0]]), top_k=2), 10, np.random.default_rng(0)
        )
    with pytest.raises(PlacementError, match="^num_tokens: "):
        sample_tokens(profile, 0, np.random.default_rng(0))


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"expert_ids": np.zeros((2, 3), dtype=int)}, "^expert_ids: expected 3 dimensions"),
        ({"expert_ids": np.full((1, 3, 1), 8)}, "^expert_ids: ids must be in 0..7"),
        ({"expert_ids": np.full((1, 3, 1), -1)}, "^expert_ids: ids must be in 0..7"),
        ({"expert_ids": np.zeros((1, 3, 1))}, "^expert_ids: dtype float64"),
        (
            {"expert_ids": np.zeros((1, 0, 1), dtype=int), "seq_offsets": [0, 0]},
            "^expert_ids: empty trace",
        ),
        ({"expert_ids": np.zeros((1, 3, 9), dtype=int)}, "^expert_ids: top_k 9 exceeds"),
        (
            {"seq_offsets": [0, 2, 1, 3], "domains": ("", "", "")},
            "^seq_offsets: not strictly increasing",
        ),
        ({"seq_offsets": [0, 2]}, "^seq_offsets: must run from 0 to T=3"),
        ({"seq_offsets": [[0, 3]]}, "^seq_offsets: expected 1 dimensions"),
        ({"domains": ("a", "b")}, "^domains: 2 names for 1 sequences"),
        ({"phase": "train"}, "^phase: "),
        ({"num_experts": 0}, "^num_experts: "),
    ],
)
def test_bad_traces_name_the_field(change: dict, message: str) -> None:
    fields = {
        "expert_ids": np.zeros((1, 3, 1), dtype=int),
        "num_experts": 8,
        "seq_offsets": [0, 3],
        "domains": ("",),
    }
    with pytest.raises(PlacementError, match=message):
        Trace(**{**fields, **change})


def test_unknown_domain_names_the_known_ones() -> None:
    with pytest.raises(
        PlacementError, match="^task: unknown domain 'z' in trace 'random'; known: 'a', 'b'"
    ):
        random_trace(domains=("a", "b", "a", "b")).select_domain("z")


def test_concatenate_mismatches() -> None:
    trace = random_trace()
    with pytest.raises(PlacementError, match=r"^traces\[1\]: 4 layers, traces\[0\] has 3"):
        concatenate([trace, random_trace(num_layers=4)])
    with pytest.raises(PlacementError, match=r"^traces\[1\]: top_k 3"):
        concatenate([trace, random_trace(top_k=3)])
    with pytest.raises(PlacementError, match="^traces: nothing"):
        concatenate([])


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 4, 1, "prefill"), "^num_gpus: "),
        ((2, 0, 1, "decode"), "^tokens_per_gpu: "),
        ((2, 4, 0, "decode"), "^num_batches: "),
        ((2, 4, 1, "train"), "^phase: "),
    ],
)
def test_bad_batch_arguments(args: tuple, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        sample_batches(random_trace(), *args, np.random.default_rng(0))


def test_bad_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(PlacementError, match="other.npz: unknown file kind .keys: weights"):
        load_trace(tmp_path / "other.npz")
    (tmp_path / "other.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(PlacementError, match="other.json: unknown file kind"):
        load_profile(tmp_path / "other.json")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PlacementError, match="notes.txt: unknown file kind"):
        load_trace(tmp_path / "notes.txt")
    with pytest.raises(PlacementError, match="missing.npz: no such file"):
        load_trace(tmp_path / "missing.npz")
    np.savez(tmp_path / "noexperts.npz", expert_ids=np.zeros((1, 2, 1), dtype=np.uint8))
    with pytest.raises(PlacementError, match="noexperts.npz: missing key 'num_experts'"):
        load_trace(tmp_path / "noexperts.npz")
    np.savez(tmp_path / "flat.npz", expert_ids=np.zeros((2, 1), dtype=np.uint8), num_experts=4)
    with pytest.raises(PlacementError, match="flat.npz: expert_ids: expected 3 dimensions"):
        load_trace(tmp_path / "flat.npz")
    np.savez(
        tmp_path / "range.npz", expert_ids=np.full((1, 2, 1), 9, dtype=np.uint8), num_experts=4
    )
    with pytest.raises(PlacementError, match="range.npz: expert_ids: ids must be in 0..3"):
        load_trace(tmp_path / "range.npz")
    heat = {"k": 2, "layers": [{"heat": [1, 2, 3]}, {"heat": [1, 2]}]}
    (tmp_path / "ragged.json").write_text(json.dumps(heat))
    with pytest.raises(PlacementError, match="ragged.json: layers"):
        load_profile(tmp_path / "ragged.json")
    (tmp_path / "nok.json").write_text(json.dumps({"layers": [{"heat": [1, 2, 3]}]}))
    with pytest.raises(PlacementError, match="nok.json: missing key 'k'"):
        load_profile(tmp_path / "nok.json")


def test_esft_kind_with_a_missing_key(tmp_path: Path) -> None:
    ids = np.zeros((2, 3, 1), dtype=np.uint8)
    np.savez(
        tmp_path / "esft.npz", law_expert_ids=ids, law_seq_offsets=np.array([0, 3]), num_experts=4
    )
    with pytest.raises(PlacementError, match="esft.npz: missing key 'law_gate_weights'"):
        load_trace(tmp_path / "esft.npz")
    np.savez(
        tmp_path / "esft.npz",
        law_expert_ids=ids,
        law_seq_offsets=np.array([0, 2]),
        law_gate_weights=np.ones((2, 3, 1)),
        num_experts=4,
    )
    with pytest.raises(PlacementError, match="esft.npz: seq_offsets: must run from 0 to T=3"):
        load_trace(tmp_path / "esft.npz")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), keep=st.integers(1, 40), top=st.integers(1, 6))
def test_largest_codes_are_a_stable_sort_of_the_counts(seed, keep, top):
    """The pairs a profile keeps: the same as sorting every present pair by count (ties by code)."""
    histogram = np.random.default_rng(seed).integers(0, top, 200)
    present = np.nonzero(histogram)[0]
    reference = np.sort(present[np.argsort(-histogram[present], kind="stable")[:keep]])
    assert np.array_equal(largest_codes(histogram, keep), reference)
