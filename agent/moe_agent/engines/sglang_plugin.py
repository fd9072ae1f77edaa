"""SGLang: its EPLB manager applies the operator's published map, and reports what it serves.

Enabled by installing moeplace into the SGLang image: ``register`` is an ``sglang.srt.plugins``
entry point, which SGLang runs in every scheduler process (``sglang/srt/plugins/__init__.py``,
``load_plugins``, called from ``sglang/srt/managers/scheduler.py``), and serving with
``--enable-eplb --eplb-rebalance-num-iterations N`` (docs/engines.md). Through SGLang's
``HookRegistry`` it wraps ``EPLBManager.rebalance`` (``sglang/srt/eplb/eplb_manager.py``), which the
manager runs every N forward passes on every rank in lockstep:

* rank 0 reads the published map and broadcasts it to every rank (the ConfigMap update reaches the
  pods at different times; the ranks must agree, as the weight move is collective);
* the same map as the live one: nothing moves (and the recorder is not drained);
* a new map: ``_compute_expert_location_metadata`` answers ``ExpertLocationMetadata.init_by_mapping``
  of it instead of SGLang's algorithm (``init_by_eplb``), and SGLang's own ``rebalance`` moves the
  weights (``update_expert_location``: P2P between GPUs, ``--eplb-rebalance-layers-per-chunk``
  layers per forward pass);
* nothing published, or a map that does not fit: SGLang's own algorithm, with a log line;

and at start (``set_global_expert_location_metadata``) and after each rebalance writes this rank's
live map (MoE rows) to ``status-rank<r>.json``. SGLang rebalances only after N forward passes: an
idle engine applies a new map with its next N requests' worth of passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from moe_agent.engines import contract
from moe_placement.files import moe_rows, sglang_physical_to_logical_map
from moe_placement.models import PlacementError, placement_hash

logger = logging.getLogger("moeplace.sglang")

TARGET = "_moeplace_target"
_log_once = contract.FallbackLog(logger, "SGLang's own EPLB algorithm decides")


def rank0_target(live: np.ndarray) -> np.ndarray | None:
    """On rank 0: the published map as SGLang's full map [num_hidden_layers, P] when it fits the live
    one (same shape), else None with a log line."""
    published = contract.published_for_engine(_log_once)
    if published is None:
        return None
    try:
        full = sglang_physical_to_logical_map(published.target, published.model)
    except PlacementError as error:
        _log_once(f"the published placement does not fit ({error})")
        return None
    if full.shape != live.shape:
        _log_once(f"the published map has shape {full.shape}, this engine serves {live.shape}")
        return None
    return full


def agree(live: Any, rank: int, torch: Any, dist: Any) -> np.ndarray | None:
    """Every rank's copy of rank 0's decision: the full map to serve, or None (SGLang decides).

    live: the live map tensor [num_hidden_layers, P] on this rank's device; one broadcast of
    [1 + num_hidden_layers * P] int64 (flag, map) from rank 0.
    """
    message = torch.zeros(1 + live.numel(), dtype=torch.int64, device=live.device)
    if rank == 0:
        try:
            full = rank0_target(live.cpu().numpy())
        except Exception:  # rank 0 must reach the broadcast, or every other rank waits forever
            logger.exception("moeplace: reading the published placement failed")
            full = None
        if full is not None:
            message[0] = 1
            message[1:] = torch.from_numpy(full.reshape(-1)).to(live.device)
    if dist.is_initialized():
        dist.broadcast(message, src=0)
    if int(message[0]) == 0:
        return None
    return message[1:].reshape(live.shape).cpu().numpy()


def write_live(rank: int) -> None:
    """Write this rank's status from SGLang's global expert location metadata: generation and
    source ``published`` when it serves the published map, else 0 and ``engine``."""
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    metadata = get_global_expert_location_metadata()
    published = contract.read_published(contract.placement_dir())
    if metadata is None or published is None:
        return  # without the published model shape, dense rows cannot be told from MoE rows
    live = moe_rows(metadata.physical_to_logical_map_cpu.numpy(), published.model)
    if placement_hash(live) == published.hash:
        status = contract.EngineStatus.of("sglang", rank, published.generation, "published", live)
    else:
        status = contract.EngineStatus.of("sglang", rank, 0, "engine", live)
    contract.write_status(contract.engine_dir(), status)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _report(rank: int) -> None:
    try:
        write_live(rank)
    except Exception:  # a report must never break serving
        logger.exception("moeplace: writing the engine status failed")


def set_metadata_hook(result: Any, *args: Any, **kwargs: Any) -> None:
    """After ``set_global_expert_location_metadata``: the map the engine starts with is live."""
    _report(_rank())


def rebalance_hook(original: Any, manager: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
    """Around ``EPLBManager.rebalance`` (a generator: it yields between layer chunks)."""
    import torch
    import torch.distributed as dist
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    rank = _rank()
    live = get_global_expert_location_metadata().physical_to_logical_map
    full = agree(live, rank, torch, dist)
    if full is None:
        yield from original(manager, *args, **kwargs)
    elif not np.array_equal(full, live.cpu().numpy()):
        setattr(manager, TARGET, full)
        try:
            yield from original(manager, *args, **kwargs)
        finally:
            setattr(manager, TARGET, None)
    _report(rank)


def compute_hook(original: Any, manager: Any, logical_count: Any, *args: Any, **kwargs: Any) -> Any:
    """Around ``EPLBManager._compute_expert_location_metadata``: the agreed map, when there is one."""
    full = getattr(manager, TARGET, None)
    if full is None:
        return original(manager, logical_count, *args, **kwargs)
    import torch
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    # no moe_ep_rank, as init_by_eplb (the call this replaces) builds its metadata
    return ExpertLocationMetadata.init_by_mapping(manager._model_config, torch.from_numpy(full))


def register() -> None:
    """The ``sglang.srt.plugins`` entry point."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    manager = "sglang.srt.eplb.eplb_manager.EPLBManager"
    HookRegistry.register(f"{manager}.rebalance", rebalance_hook, HookType.AROUND)
    HookRegistry.register(f"{manager}._compute_expert_location_metadata", compute_hook, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.eplb.expert_location.set_global_expert_location_metadata", set_metadata_hook, HookType.AFTER
    )
    logger.info("moeplace: SGLang EPLB applies the placement published in %s", contract.placement_dir())
