"""Run by tests/engines in the engines venv: moeplace's SGLang plugin hooks around SGLang's own
expert-location code.

sglang/srt/eplb/eplb_manager.py cannot be imported here (it imports expert_distribution.py, which
imports triton, the GPU kernel compiler), so ``EPLBManager`` is a stand-in with the two methods the
hooks wrap, doing what SGLang's do on one rank: ``rebalance`` (a generator) gets its metadata from
``_compute_expert_location_metadata`` and, once the weights moved (``update_expert_location``),
installs it with ``ExpertLocationMetadata.update``. Everything else is SGLang's: the loader,
``init_by_mapping``, ``update``, and the global metadata.
argv[1]: JSON {"placement_dir", "engine_dir", "hf_config", "ep_size", "redundant", "second"};
prints JSON results.
"""

import json
import os
import pathlib
import sys
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sglang_setup import configure, expert_location  # noqa: E402

args = json.loads(sys.argv[1])
os.environ["MOEPLACE_PLACEMENT_DIR"] = args["placement_dir"]
os.environ["MOEPLACE_ENGINE_DIR"] = args["engine_dir"]
from moe_agent.engines import contract, sglang_plugin  # noqa: E402

configure("deepseek", str(pathlib.Path(args["placement_dir"]) / "physical_to_logical_map.json"),
          args["ep_size"], args["redundant"])
model_config = SimpleNamespace(hf_config=SimpleNamespace(**args["hf_config"]))
expert_location.set_global_expert_location_metadata(
    expert_location.compute_initial_expert_location_metadata(model_config, moe_ep_rank=0))
sglang_plugin.set_metadata_hook(None)
started = contract.read_status(pathlib.Path(args["engine_dir"]), 0)

own_algorithm_calls = []


class EPLBManager:
    _model_config = model_config

    def _compute_expert_location_metadata(self, logical_count):
        return sglang_plugin.compute_hook(own_algorithm, self, logical_count)

    def rebalance(self):
        metadata = self._compute_expert_location_metadata(logical_count=None)
        yield
        current = expert_location.get_global_expert_location_metadata()
        current.update(metadata, update_layer_ids=list(range(current.num_layers)))


def own_algorithm(manager, logical_count):
    own_algorithm_calls.append(1)
    return expert_location.get_global_expert_location_metadata()  # "SGLang's algorithm": no change


def rebalance():
    manager = EPLBManager()
    list(sglang_plugin.rebalance_hook(EPLBManager.rebalance, manager))


rebalance()  # the published map is already live: nothing moves, SGLang's algorithm is not asked
unchanged_calls = len(own_algorithm_calls)
contract.write_published(pathlib.Path(args["placement_dir"]), args["second"])
rebalance()  # a new map: SGLang installs it through init_by_mapping + update
moved = contract.read_status(pathlib.Path(args["engine_dir"]), 0)
live_full = expert_location.get_global_expert_location_metadata().physical_to_logical_map.tolist()
for name in ("placement.json", "generation", "hash", "physical_to_logical_map.json"):
    (pathlib.Path(args["placement_dir"]) / name).unlink()
rebalance()  # nothing published: SGLang's own algorithm decides
print(json.dumps({
    "started": started.model_dump(), "unchanged_calls": unchanged_calls, "moved": moved.model_dump(),
    "live_full": live_full, "own_algorithm_calls": len(own_algorithm_calls),
}))
