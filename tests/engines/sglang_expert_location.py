"""Run by tests/engines in the engines venv: SGLang's own loader reads moeplace's SGLang files.

argv[1]: a JSON list of cases {"file", "architecture", "hf_config", "ep_size", "redundant"}; prints
a JSON list of what SGLang built: {"num_layers", "physical_to_logical_map", "num_valid"}.
"""

import importlib.util
import json
import pathlib
import sys
import types
from types import SimpleNamespace

# sglang/__init__.py runs sglang.srt.utils.common, which imports triton (the GPU kernel compiler, a
# 1 GB wheel) at its top; expert_location.py itself needs torch only. The two packages are
# registered without running their __init__, so the real submodules below load from the wheel.
root = pathlib.Path(importlib.util.find_spec("sglang").submodule_search_locations[0])
for name, path in (("sglang", root), ("sglang.srt", root / "srt")):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package

from sglang.srt.eplb import expert_location  # noqa: E402

# SGLang publishes its runtime context from ServerArgs (sglang/srt/runtime_context.py), whose import
# needs triton too. These stand in for exactly the fields expert_location.py reads:
# get_exec().moe.{init_expert_location, ep_num_redundant_experts, moe_a2a_backend,
# ep_dispatch_algorithm}, get_parallel().{ep_size, nnodes, elastic_ep_initial_size},
# get_device().device.
# ModelConfigForExpertLocation.from_model_config imports the model class (CUDA kernels); the
# architectures' own get_model_config_for_expert_location is a three-field read of the HF config:
# deepseek_v2.py (DeepseekV2ForCausalLM, also V3): num_hidden_layers, n_routed_experts, n_group;
# qwen3_moe.py (Qwen3MoeForCausalLM): num_hidden_layers, num_experts, None.
EXPERT_COUNT_KEY = {"deepseek": ("n_routed_experts", "n_group"), "qwen3_moe": ("num_experts", None)}


def load(case: dict) -> dict:
    config = SimpleNamespace(**case["hf_config"])
    count_key, group_key = EXPERT_COUNT_KEY[case["architecture"]]
    expert_location.ModelConfigForExpertLocation.from_model_config = staticmethod(
        lambda model_config: expert_location.ModelConfigForExpertLocation(
            num_layers=model_config.hf_config.num_hidden_layers,
            num_logical_experts=getattr(model_config.hf_config, count_key),
            num_groups=getattr(model_config.hf_config, group_key) if group_key else None,
        )
    )
    moe = SimpleNamespace(
        init_expert_location=case["file"], ep_num_redundant_experts=case["redundant"],
        moe_a2a_backend="none", ep_dispatch_algorithm=None,
    )
    expert_location.get_exec = lambda: SimpleNamespace(moe=moe)
    expert_location.get_parallel = lambda: SimpleNamespace(
        ep_size=case["ep_size"], nnodes=1, elastic_ep_initial_size=None)
    expert_location.get_device = lambda: SimpleNamespace(device="cpu")
    metadata = expert_location.compute_initial_expert_location_metadata(
        SimpleNamespace(hf_config=config), moe_ep_rank=0)
    return {
        "num_layers": metadata.num_layers,
        "physical_to_logical_map": metadata.physical_to_logical_map.tolist(),
        "num_valid": metadata.logical_to_all_physical_map_num_valid.tolist(),
    }


print(json.dumps([load(case) for case in json.loads(sys.argv[1])]))
