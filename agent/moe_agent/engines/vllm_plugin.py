"""vLLM: its EPLB applies the operator's published map, and reports what it serves and its loads.

Enabled by installing moeplace into the vLLM image: ``register`` is a ``vllm.general_plugins`` entry
point, which vLLM runs in every process (``vllm/plugins/__init__.py``, ``load_general_plugins``),
and serving with ``--enable-eplb`` (docs/engines.md). ``register``:

* puts ``MoeplaceEplbPolicy`` under ``EPLB_POLICIES["default"]``
  (``vllm/distributed/eplb/policy/__init__.py``), the class ``EplbState`` picks for the default
  ``--eplb-config '{"policy": "default"}'``. Every ``step_interval`` steps ``EplbState.rearrange``
  calls ``rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_ranks,
  old_global_expert_indices)``; the policy answers the published map when it fits, else vLLM's
  ``DefaultEplbPolicy`` (with a log line), and vLLM moves the weights
  (``rearrange_expert_weights_inplace``).
* wraps ``EplbState.add_model``, ``EplbState.rearrange`` and ``eplb_state._move_to_workspace`` (async
  EPLB's commit) to write this rank's live map to ``status-rank<r>.json`` after each change.
* adds every window's global load (the policy's ``weight``, all-reduced over ranks) to
  ``loads-rank<r>.json``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import numpy as np

from moe_agent.engines import contract
from moe_placement.models import placement_hash

logger = logging.getLogger("moeplace.vllm")

_lock = threading.Lock()
_state: dict[str, Any] = {"applied": None, "loads": None, "windows": 0}
_log_once = contract.FallbackLog(logger, "vLLM's default EPLB policy decides")


def _ep_rank() -> int:
    from vllm.distributed.parallel_state import get_ep_group

    try:
        return int(get_ep_group().rank_in_group)
    except AssertionError:  # no EP group: a single-rank engine
        return 0


def published_target(num_layers: int, num_experts: int, num_replicas: int, num_ranks: int) -> contract.PublishedMap | None:
    """The published map when it fits this engine ([num_layers, num_replicas] over num_ranks), else
    None with a log line naming why."""
    published = contract.published_for_engine(_log_once)
    if published is None:
        return None
    target = published.target
    fits = (target.num_layers, target.num_slots, target.num_experts, target.num_gpus) == (
        num_layers, num_replicas, num_experts, num_ranks)
    if not fits:
        _log_once(
            f"the published placement (generation {published.generation}: {target.num_layers} layers x "
            f"{target.num_slots} slots of {target.num_experts} experts on {target.num_gpus} GPUs) does not "
            f"fit this engine ({num_layers} x {num_replicas} of {num_experts} on {num_ranks})"
        )
        return None
    return published


def record_load(weight: np.ndarray) -> None:
    """Add one window's global load [L, E] to this rank's loads file."""
    weight = np.asarray(weight, dtype=np.float64)
    with _lock:
        total = _state["loads"]
        _state["loads"] = weight.copy() if total is None or total.shape != weight.shape else total + weight
        _state["windows"] += 1
        loads = contract.EngineLoads(
            engine="vllm", rank=_ep_rank(), windows=_state["windows"],
            expert_tokens_total=_state["loads"].tolist(), updated_unix=time.time(),
        )
    contract.write_loads(contract.engine_dir(), loads)


def write_live(physical_to_logical_map: Any) -> contract.EngineStatus:
    """Write this rank's status for the live map [L, num_replicas] (a tensor or array)."""
    live = np.asarray(physical_to_logical_map.cpu() if hasattr(physical_to_logical_map, "cpu") else physical_to_logical_map)
    applied: contract.PublishedMap | None = _state["applied"]
    if applied is not None and applied.hash == placement_hash(live):
        status = contract.EngineStatus.of("vllm", _ep_rank(), applied.generation, "published", live)
    else:
        status = contract.EngineStatus.of("vllm", _ep_rank(), 0, "engine", live)
    contract.write_status(contract.engine_dir(), status)
    return status


def make_policy(default_policy: type) -> type:
    """The moeplace policy class, a subclass of vLLM's ``DefaultEplbPolicy`` (its fallback)."""
    import torch

    class MoeplaceEplbPolicy(default_policy):
        """Answers the operator's published map; vLLM's default policy when none fits."""

        @classmethod
        def rebalance_experts(
            cls,
            weight: torch.Tensor,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: torch.Tensor | None = None,
        ) -> torch.Tensor:
            """weight: [L, E] load; returns physical_to_logical_map [L, num_replicas]."""
            record_load(weight.float().numpy())
            num_layers, num_experts = weight.shape
            published = published_target(num_layers, num_experts, num_replicas, num_ranks)
            if published is None:
                return super().rebalance_experts(
                    weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices
                )
            _state["applied"] = published
            return torch.from_numpy(published.target.physical_to_logical_map.copy())

    return MoeplaceEplbPolicy


def _after(original: Any, report: Any) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            report(*args, **kwargs)
        except Exception:  # a report must never break serving
            logger.exception("moeplace: writing the engine status failed")
        return result

    wrapper.__moeplace_wrapped__ = True
    return wrapper


def _report_model(eplb_state: Any, *_: Any, **__: Any) -> None:
    model_state = next(iter(eplb_state.model_states.values()), None)
    if model_state is not None:
        write_live(model_state.physical_to_logical_map)


def _report_workspace(model_state: Any, *_: Any, **__: Any) -> None:
    if not model_state.rebalanced:  # the last layer of an async rearrangement is committed
        write_live(model_state.physical_to_logical_map)


def register() -> None:
    """The ``vllm.general_plugins`` entry point; idempotent (vLLM may call it more than once).

    vLLM does not catch a plugin's errors here, so the reports, which patch vLLM internals, are
    installed under a guard: if they fail, the policy still applies the published maps.
    """
    from vllm.distributed.eplb import policy as eplb_policy

    policies = eplb_policy.EPLB_POLICIES
    if getattr(policies["default"], "__name__", "") != "MoeplaceEplbPolicy":
        policies["default"] = make_policy(eplb_policy.DefaultEplbPolicy)
    try:
        _wrap_reports()
    except Exception:
        logger.exception("moeplace: live-map reports are off (vLLM's EplbState could not be wrapped)")
    logger.info("moeplace: vLLM EPLB applies the placement published in %s", contract.placement_dir())


def _wrap_reports() -> None:
    from vllm.distributed.eplb import eplb_state

    state_class = eplb_state.EplbState
    for name in ("add_model", "rearrange"):
        method = getattr(state_class, name)
        if not getattr(method, "__moeplace_wrapped__", False):
            setattr(state_class, name, _after(method, _report_model))
    if not getattr(eplb_state._move_to_workspace, "__moeplace_wrapped__", False):
        eplb_state._move_to_workspace = _after(eplb_state._move_to_workspace, _report_workspace)
