"""``moeplace plan`` / ``bench`` on bad input: one line naming the field, exit 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def moeplace(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'agent'}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "moeplace.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, Path]:
    from moe_placement.traces import Trace, save_trace

    folder = tmp_path_factory.mktemp("traces")
    rng = np.random.default_rng(0)
    good = Trace(rng.integers(0, 64, (26, 512, 6)), 64, np.array([0, 256, 512]), ("a", "b"))
    save_trace(good, folder / "good.npz")
    np.savez(folder / "bad-ids.npz", expert_ids=np.full((26, 8, 6), 70), num_experts=64)
    np.savez(folder / "empty.npz", expert_ids=np.zeros((26, 0, 6), dtype=np.int64), num_experts=64)
    (folder / "garbage.npz").write_bytes(b"not a trace")
    return {path.stem: path for path in folder.iterdir()}


@pytest.mark.parametrize(
    "args, field",
    [
        (["--model", "llama"], "model: unknown 'llama'"),
        (["--topology", "3x3"], "redundant_slots: 64 experts + 0 redundant slots"),
        (["--topology", "two-by-four"], "topology: 'two-by-four' is not NODESxGPUS"),
        (["--topology", "1x8:a100"], "gpu: unknown 'a100'"),
        (["--redundant-slots", "3"], "redundant_slots"),
        (["--policy", "fastest"], "policy: unknown 'fastest'"),
        (["--trace", "missing.npz"], "missing.npz: no such file"),
        (["--trace", "{bad-ids}"], "expert_ids"),
        (["--trace", "{empty}"], "expert_ids: empty trace"),
        (["--trace", "{garbage}"], "garbage.npz: unknown file kind"),
        (["--trace", "{good}", "--model", "mixtral-8x7b", "--topology", "1x8"], "does not match the model"),
        (["--trace", "{good}", "--task", "c"], "task: unknown domain 'c'"),
    ],
)
def test_plan_rejects_bad_input_in_one_line(args, field, traces, tmp_path):
    args = [arg.format(**{name: str(path) for name, path in traces.items()}) for arg in args]
    if "--trace" not in args:
        args += ["--trace", str(traces["good"])]
    result = moeplace("plan", *args, "--out", str(tmp_path / "p.json"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error: ") and field in lines[0], lines


def test_bench_rejects_an_unknown_router(tmp_path, traces):
    result = moeplace("bench", "--trace", str(traces["good"]), "--router", "psychic", cwd=tmp_path)
    assert result.returncode == 2 and "router: unknown ['psychic']" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_writes_moeplace_and_sglang_files(tmp_path, traces):
    out = tmp_path / "placement.json"
    result = moeplace("plan", "--trace", str(traces["good"]), "--redundant-slots", "16", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from moe_placement.files import read_placement

    placement_file = read_placement(out)
    assert placement_file.policy == "eplb" and set(placement_file.predicted) == {"prefill", "decode"}
    sglang = tmp_path / "sglang.json"
    result = moeplace("plan", "--trace", str(traces["good"]), "--redundant-slots", "16", "--format", "sglang",
                      "--out", str(sglang), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from moe_placement.files import moe_rows

    rows = np.asarray(json.loads(sglang.read_text())["physical_to_logical_map"])
    model = placement_file.model
    # every transformer layer (DeepSeek-V2-Lite: 27, the first dense), indexed by layer id
    assert rows.shape == (model.num_hidden_layers, placement_file.topology.num_slots) == (27, 80)
    assert (rows >= 0).all()
    assert np.array_equal(moe_rows(rows, model), placement_file.physical_to_logical_map)


def test_plan_with_previous_writes_the_operators_migration_plan(tmp_path, traces):
    from moe_placement.files import read_placement
    from moe_placement.migration_plan import plan_migration
    from moe_placement.presets import model_preset, parse_topology

    common = ["--trace", str(traces["good"]), "--redundant-slots", "16"]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert moeplace("plan", *common, "--policy", "linear", "--out", str(old), cwd=tmp_path).returncode == 0
    result = moeplace(
        "plan", *common, "--previous", str(old), "--max-copies-per-stage", "4", "--out", str(new), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "migration from" in result.stdout
    before, after = read_placement(old), read_placement(new)
    record = after.migration
    model = model_preset("deepseek-v2-lite")
    expected = plan_migration(
        before.placement(), after.placement(), model, parse_topology("2x4", 64, 16), max_copies_per_stage=4
    )
    assert len(record.stages) == len(expected.stages) and record.bytes_moved == expected.bytes_moved
    live = before.placement().physical_to_logical_map.copy()
    for stage in record.stages:
        assert len(stage.copies) <= 4
        for layer, expert, source, target in stage.copies:
            assert live[layer, source] == expert and live[layer, target] == -1
            live[layer, target] = expert
        for layer, slot in stage.retired:
            live[layer, slot] = -1
    assert np.array_equal(live, after.physical_to_logical_map)
    assert record.estimated_seconds > 0 and set(record.bytes_per_link)


def test_a_command_imports_only_the_packages_up_to_its_own(tmp_path):
    """``moeplace plan`` registers moe_placement's commands alone (the others' imports cost it
    time); ``moeplace --help`` and an unknown command still see every package's commands."""
    probe = (
        "import sys; from moeplace import cli; parser = cli.build_parser(sys.argv[1] or None); "
        "print(sorted(parser._subparsers._group_actions[0].choices), 'moe_router.cli' in sys.modules)"
    )
    env = {"PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'agent'}", "PATH": "/usr/bin:/bin"}

    def commands(command: str) -> str:
        done = subprocess.run([sys.executable, "-c", probe, command], env=env, capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout
    assert commands("plan") == "['bench', 'plan'] False\n"
    every = commands("")
    assert "'agent'" in every and "'router'" in every and every.endswith("True\n")
    assert commands("no-such-command") == every
    unknown = moeplace("no-such-command", cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'no-such-command'" in unknown.stderr
