"""Run by tests/engines in the engines venv: moeplace's vLLM plugin through vLLM's own code.

Registers moeplace's ``vllm.general_plugins`` entry point, as pyproject.toml declares it, in a
temporary dist-info; lets ``vllm.plugins.load_general_plugins`` load it; calls the policy through
vLLM's ``EPLB_POLICIES`` registry and ``AbstractEplbPolicy.rebalance_experts`` signature.
argv[1]: JSON {"workdir", "placement_dir", "num_layers", "num_experts", "num_replicas", "num_ranks"};
prints JSON results.
"""

import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
args = json.loads(sys.argv[1])
workdir = Path(args["workdir"])

entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
dist_info = workdir / "site" / "moeplace_engines_test-0.dist-info"
dist_info.mkdir(parents=True)
(dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: moeplace-engines-test\nVersion: 0\n")
(dist_info / "entry_points.txt").write_text(
    "[vllm.general_plugins]\n"
    + "".join(f"{name} = {value}\n" for name, value in entry_points["vllm.general_plugins"].items())
)
sys.path.insert(0, str(workdir / "site"))
os.environ["VLLM_PLUGINS"] = "moeplace"
os.environ["MOEPLACE_PLACEMENT_DIR"] = args["placement_dir"]
os.environ["MOEPLACE_ENGINE_DIR"] = str(workdir / "engine")

log = []
handler = logging.Handler()
handler.emit = lambda record: log.append(record.getMessage())
logging.getLogger("moeplace.vllm").addHandler(handler)
logging.getLogger("moeplace.vllm").setLevel(logging.INFO)

from vllm.distributed.eplb.policy import EPLB_POLICIES, AbstractEplbPolicy, DefaultEplbPolicy  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()
policy = EPLB_POLICIES["default"]
assert issubclass(policy, AbstractEplbPolicy)

torch.manual_seed(0)
L, E, R, G = args["num_layers"], args["num_experts"], args["num_replicas"], args["num_ranks"]
weight = torch.randint(0, 1000, (L, E))
old = torch.arange(R).remainder(E).repeat(L, 1)
published = policy.rebalance_experts(weight, R, 1, 1, G, old)
# 2 more slots per rank than published: the map does not fit, vLLM's default policy decides
misfit = policy.rebalance_experts(weight, R + 2 * G, 1, 1, G, torch.arange(R + 2 * G).remainder(E).repeat(L, 1))
default = DefaultEplbPolicy.rebalance_experts(weight, R + 2 * G, 1, 1, G, torch.arange(R + 2 * G).remainder(E).repeat(L, 1))
os.environ["MOEPLACE_PLACEMENT_DIR"] = str(workdir / "nothing-published")
unpublished = policy.rebalance_experts(weight, R, 1, 1, G, old)
unpublished_default = DefaultEplbPolicy.rebalance_experts(weight, R, 1, 1, G, old)
os.environ["MOEPLACE_PLACEMENT_DIR"] = args["placement_dir"]

# vllm.distributed.eplb.eplb_state imports vllm.config, whose structured-output backends need
# xgrammar and apache-tvm-ffi (native libraries of vLLM's full install, not in this venv), so the
# plugin's wrappers of EplbState are not installed here (it logs that and keeps the policy). The
# wrappers' report is called on a stand-in of EplbState.model_states with the field it reads,
# EplbModelState.physical_to_logical_map: (num_moe_layers, num_physical_experts) (eplb_state.py).
from moe_agent.engines import vllm_plugin  # noqa: E402

state = SimpleNamespace(model_states={"model": SimpleNamespace(physical_to_logical_map=published.clone())})
vllm_plugin._report_model(state)
status = json.loads((workdir / "engine" / "status-rank0.json").read_text())
state.model_states["model"].physical_to_logical_map = unpublished
vllm_plugin._report_model(state)
status_after_default = json.loads((workdir / "engine" / "status-rank0.json").read_text())
loads = json.loads((workdir / "engine" / "loads-rank0.json").read_text())

print(json.dumps({
    "policy": policy.__name__,
    "published": published.tolist(),
    "misfit_equals_default": bool(torch.equal(misfit, default)),
    "unpublished_equals_default": bool(torch.equal(unpublished, unpublished_default)),
    "status": status,
    "status_after_default": status_after_default,
    "loads": loads,
    "weight": weight.tolist(),
    "log": log,
}))
