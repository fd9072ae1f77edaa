"""Loading SGLang's expert_location.py in the engines venv (no GPU, no triton); used by the scripts."""

import importlib.util
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

from sglang.srt.eplb import expert_location  # noqa: E402,F401

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




def configure(architecture: str, init_expert_location: str, ep_size: int, redundant: int) -> None:
    """Point expert_location's runtime-context getters and model-config lookup at these values."""
    count_key, group_key = EXPERT_COUNT_KEY[architecture]
    expert_location.ModelConfigForExpertLocation.from_model_config = staticmethod(
        lambda model_config: expert_location.ModelConfigForExpertLocation(
            num_layers=model_config.hf_config.num_hidden_layers,
            num_logical_experts=getattr(model_config.hf_config, count_key),
            num_groups=getattr(model_config.hf_config, group_key) if group_key else None,
        )
    )
    moe = SimpleNamespace(
        init_expert_location=init_expert_location, ep_num_redundant_experts=redundant,
        moe_a2a_backend="none", ep_dispatch_algorithm=None,
    )
    expert_location.get_exec = lambda: SimpleNamespace(moe=moe)
    expert_location.get_parallel = lambda: SimpleNamespace(ep_size=ep_size, nnodes=1, elastic_ep_initial_size=None)
    expert_location.get_device = lambda: SimpleNamespace(device="cpu")
