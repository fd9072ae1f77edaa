"""The ``agent`` subcommand: registration in ``moeplace``, flags, model and stream resolution."""

from __future__ import annotations

import argparse
import json

import pytest

from moe_placement.models import PlacementError
from moe_agent import cli

from agent_helpers import HOLES_MAP, TINY


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_moeplace_has_the_agent_subcommand():
    moeplace_cli = pytest.importorskip("moeplace.cli")
    args = moeplace_cli.build_parser().parse_args(
        ["agent", "--replay", "synthetic", "--model", "deepseek-v2-lite", "--topology", "2x4",
         "--redundant-slots", "16", "--rank", "3", "--port", "0", "--expert-scale", "16"]
    )
    assert args.func is cli.run and args.rank == 3 and args.expert_scale == 16


def test_python_m_accepts_the_word_agent(capsys):
    for argv in (["--help"], ["agent", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
    assert "--tokens-per-second" in capsys.readouterr().out


def test_model_from_preset_file_or_operator_env(tmp_path, monkeypatch):
    assert cli.load_model_shape("deepseek-v2-lite").num_experts == 64
    path = tmp_path / "shape.json"
    path.write_text(TINY.model_dump_json())
    assert cli.load_model_shape(str(path)) == TINY
    # The operator sets MOEPLACE_MODEL to the shape in camelCase.
    monkeypatch.setenv(cli.MODEL_ENV, json.dumps(TINY.model_dump(by_alias=True)))
    assert cli.load_model_shape(parse("--topology", "1x2", "--rank", "0", "--port", "0").model) == TINY
    with pytest.raises(PlacementError, match="model"):
        cli.load_model_shape("no-such-model")
    with pytest.raises(PlacementError, match="model.numExperts|model.num_experts"):
        cli.load_model_shape('{"name": "x", "numLayers": 1}')


def test_initial_placement(tmp_path):
    topology = cli.parse_topology("1x2", TINY.num_experts, 2)
    assert cli.load_initial_placement(None, TINY, topology).physical_to_logical_map[0].tolist() == [
        0, 1, 2, 3, 4, 5, 6, 7, 0, 1
    ]
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"physical_to_logical_map": HOLES_MAP}))
    assert cli.load_initial_placement(path, TINY, topology).physical_to_logical_map.tolist() == HOLES_MAP
    path.write_text(json.dumps({"physical_to_logical_map": HOLES_MAP[:1]}))
    with pytest.raises(PlacementError, match="layers"):
        cli.load_initial_placement(path, TINY, topology)


def test_stream_with_a_domain_shift(tmp_path):
    path = tmp_path / "shape.json"
    path.write_text(TINY.model_dump_json())
    args = parse("--replay", "synthetic", "--model", str(path), "--topology", "1x2", "--rank", "0",
                 "--port", "0", "--tokens-per-second", "100", "--shift-after-seconds", "30")
    stream = cli.build_stream(args, TINY)
    assert stream.shift_at == 3000 and stream.after is not None
    assert set(stream.before.domains) == {"intent"} and set(stream.after.domains) == {"law"}
    wrong = parse("--replay", "synthetic", "--model", "x", "--topology", "1x2", "--rank", "0", "--port", "0",
                  "--shift-after-seconds", "1", "--task", "law", "--shift-to", "law")
    with pytest.raises(PlacementError, match="shift_to"):
        cli.build_stream(wrong, TINY)
