"""Run by tests/engines in the engines venv: SGLang's own loader reads moeplace's SGLang files.

argv[1]: a JSON list of cases {"file", "architecture", "hf_config", "ep_size", "redundant"}; prints
a JSON list of what SGLang built: {"num_layers", "physical_to_logical_map", "num_valid"}.
"""

import json
import pathlib
import sys
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sglang_setup import configure, expert_location  # noqa: E402


def load(case: dict) -> dict:
    configure(case["architecture"], case["file"], case["ep_size"], case["redundant"])
    config = SimpleNamespace(**case["hf_config"])
    metadata = expert_location.compute_initial_expert_location_metadata(
        SimpleNamespace(hf_config=config), moe_ep_rank=0)
    return {
        "num_layers": metadata.num_layers,
        "physical_to_logical_map": metadata.physical_to_logical_map.tolist(),
        "num_valid": metadata.logical_to_all_physical_map_num_valid.tolist(),
    }


print(json.dumps([load(case) for case in json.loads(sys.argv[1])]))
