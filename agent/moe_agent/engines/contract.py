"""The files an engine, its sidecars and the operator share.

Directories (both inside the engine pod):

* the published placement, ``MOEPLACE_PLACEMENT_DIR`` (default ``/etc/moeplace/placement``): the
  operator's ``<name>-placement`` ConfigMap, mounted; keys ``placement.json`` (moeplace's placement
  file: model shape, topology, map with MoE rows), ``generation`` and ``hash``.
* the engine directory, ``MOEPLACE_ENGINE_DIR`` (default ``/var/run/moeplace/engine``, an emptyDir
  shared by the engine container and the sidecars): ``status-rank<r>.json`` (``EngineStatus``, what
  rank r serves), ``loads-rank<r>.json`` (``EngineLoads``, vLLM) and SGLang's recorder dumps
  (``expert_distribution_recorder_<time>.pt``, when ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``
  points here).

Maps here have MoE rows only, [L, G*S], and no empty slot: an engine serves every slot, so the map it
goes live with is ``fill_empty_slots(published)``, and the operator waits for that map's hash.

Files are written to a temporary name and renamed, so a reader sees a whole file or the old one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moe_placement.agent_api import PlacementAnswer, SlotEntry
from moe_placement.files import fill_empty_slots
from moe_placement.models import (
    ModelShape,
    Placement,
    PlacementError,
    Topology,
    format_validation_error,
    placement_hash,
)

PLACEMENT_DIR_ENV = "MOEPLACE_PLACEMENT_DIR"
ENGINE_DIR_ENV = "MOEPLACE_ENGINE_DIR"
DEFAULT_PLACEMENT_DIR = "/etc/moeplace/placement"
DEFAULT_ENGINE_DIR = "/var/run/moeplace/engine"
PLACEMENT_FILE = "placement.json"
SGLANG_DUMP_GLOB = "expert_distribution_recorder_*.pt"

EngineKind = Literal["sglang", "vllm", "standin"]


def placement_dir() -> Path:
    return Path(os.environ.get(PLACEMENT_DIR_ENV, DEFAULT_PLACEMENT_DIR))


def engine_dir() -> Path:
    return Path(os.environ.get(ENGINE_DIR_ENV, DEFAULT_ENGINE_DIR))


def status_path(directory: Path, rank: int) -> Path:
    return directory / f"status-rank{rank}.json"


def loads_path(directory: Path, rank: int) -> Path:
    return directory / f"loads-rank{rank}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class _PublishedDocument(BaseModel):
    """The parts of moeplace's placement file an engine needs (the file has more)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelShape
    topology: Topology
    physical_to_logical_map: list[list[int]]


@dataclass(frozen=True)
class PublishedMap:
    """The operator's published placement as an engine applies it.

    target: the published map with every slot filled, [L, G*S] (MoE rows).
    """

    generation: int
    model: ModelShape
    topology: Topology
    target: Placement

    @property
    def hash(self) -> str:
        return placement_hash(self.target.physical_to_logical_map)


def read_published(directory: Path) -> PublishedMap | None:
    """The published placement in ``directory``, or None when nothing is published there yet.

    Raises PlacementError when the files are there but wrong (the message names the file and field),
    or when ``hash`` disagrees with the map (a ConfigMap update seen half-way: read again later).
    """
    document_path = directory / PLACEMENT_FILE
    if not document_path.exists():
        return None
    try:
        document = _PublishedDocument.model_validate_json(document_path.read_text())
    except ValidationError as error:
        raise PlacementError(f"{document_path}: {format_validation_error(error)}") from None
    placement = Placement(
        np.asarray(document.physical_to_logical_map, dtype=np.int64),
        document.model.num_experts,
        document.topology.slots_per_gpu,
    )
    placement.check_topology(document.model, document.topology)
    generation_path, hash_path = directory / "generation", directory / "hash"
    generation_text = generation_path.read_text().strip() if generation_path.exists() else "0"
    if not generation_text.isdigit():
        raise PlacementError(f"{generation_path}: {generation_text!r} is not a generation number")
    if hash_path.exists():
        published_hash = hash_path.read_text().strip()
        if published_hash != placement_hash(placement.physical_to_logical_map):
            raise PlacementError(f"{hash_path}: {published_hash} is not the hash of {document_path}'s map")
    return PublishedMap(int(generation_text), document.model, document.topology, fill_empty_slots(placement))


class FallbackLog:
    """Says once per reason why an engine's plugin falls back to the engine's own algorithm (the
    plugins run every rebalance: the same reason would otherwise be logged at every one)."""

    def __init__(self, logger: logging.Logger, fallback: str):
        self.logger = logger
        self.fallback = fallback
        self.reasons: set[str] = set()

    def __call__(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.add(reason)
            self.logger.warning("moeplace: %s; %s", reason, self.fallback)


def published_for_engine(fallback: FallbackLog) -> PublishedMap | None:
    """The published placement in ``placement_dir()`` as a plugin applies it, or None (logged through
    ``fallback``) when nothing is published or the files cannot be read."""
    directory = placement_dir()
    try:
        published = read_published(directory)
    except (PlacementError, OSError) as error:
        fallback(f"the published placement is unreadable ({error})")
        return None
    if published is None:
        fallback(f"no placement published in {directory}")
    return published


class EngineStatus(BaseModel):
    """What one rank of an engine serves (``status-rank<r>.json``).

    generation: the published generation the engine applied; 0 while it serves a map of its own
    (its initial one, or its own algorithm's when nothing fit). physical_to_logical_map: the whole
    live map, MoE rows [L, G*S]; hash: its ``placement_hash``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineKind
    rank: int = Field(ge=0)
    generation: int = Field(ge=0)
    source: Literal["published", "engine"]
    hash: str
    physical_to_logical_map: list[list[int]]
    updated_unix: float

    @staticmethod
    def of(engine: EngineKind, rank: int, generation: int, source: Literal["published", "engine"],
           live: np.ndarray) -> EngineStatus:
        live = np.asarray(live, dtype=np.int64)
        return EngineStatus(
            engine=engine, rank=rank, generation=generation, source=source, hash=placement_hash(live),
            physical_to_logical_map=live.tolist(), updated_unix=time.time(),
        )


def write_status(directory: Path, status: EngineStatus) -> None:
    write_atomic(status_path(directory, status.rank), status.model_dump_json())


def read_status(directory: Path, rank: int) -> EngineStatus | None:
    """Rank ``rank``'s status, or None before the engine wrote one; PlacementError when malformed."""
    path = status_path(directory, rank)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return EngineStatus.model_validate_json(text)
    except ValidationError as error:
        raise PlacementError(f"{path}: {format_validation_error(error)}") from None


class EngineLoads(BaseModel):
    """Global load seen by an engine since it started (``loads-rank<r>.json``).

    expert_tokens_total: [L, E] (token, choice) pairs of all ranks per logical expert, cumulative;
    windows: how many load windows it sums.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineKind
    rank: int = Field(ge=0)
    windows: int = Field(ge=0)
    expert_tokens_total: list[list[float]]
    updated_unix: float


def write_loads(directory: Path, loads: EngineLoads) -> None:
    write_atomic(loads_path(directory, loads.rank), loads.model_dump_json())


def read_loads(directory: Path, rank: int) -> EngineLoads | None:
    path = loads_path(directory, rank)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return EngineLoads.model_validate_json(text)
    except ValidationError as error:
        raise PlacementError(f"{path}: {format_validation_error(error)}") from None


def read_sglang_dumps(directory: Path, model: ModelShape) -> np.ndarray | None:
    """Sum of the SGLang recorder dumps in ``directory`` (then deleted), MoE rows [L, E]; None if none.

    A stat-mode dump (``sglang/srt/eplb/expert_distribution.py``, ``_StatAccumulator.dump``) is
    ``torch.save(dict(rank, logical_count, average_utilization_rate_over_window))`` with
    logical_count [buffered steps, num_hidden_layers, E], all-reduced over ranks, written by rank 0.
    """
    paths = sorted(directory.glob(SGLANG_DUMP_GLOB))
    if not paths:
        return None
    import torch  # the sidecar of an SGLang pod runs in the agent image, which has torch

    from moe_placement.files import moe_rows

    total = np.zeros((model.num_layers, model.num_experts), dtype=np.float64)
    for path in paths:
        dump = torch.load(path, weights_only=True, map_location="cpu")
        counts = dump["logical_count"].to(torch.float64).sum(dim=0).numpy()
        if counts.shape[1] != model.num_experts:
            raise PlacementError(f"{path}: logical_count has {counts.shape[1]} experts, model has {model.num_experts}")
        total += moe_rows(counts, model)
        path.unlink()
    return total


def split_by_rank(load: np.ndarray, live: Placement) -> np.ndarray:
    """Each rank's share of a global load: an expert's count split evenly over its replicas.

    load: [L, E] global counts; live: the served placement. Returns [G, L, E]; sums over G to load.
    """
    on_gpu = live.gpu_expert_matrix().astype(np.float64)  # [L, G, E]
    replicas = on_gpu.sum(axis=1, keepdims=True)
    share = np.divide(on_gpu, replicas, out=np.zeros_like(on_gpu), where=replicas > 0)
    return np.transpose(share * np.asarray(load, dtype=np.float64)[:, None, :], (1, 0, 2))


def placement_answer(status: EngineStatus, model: ModelShape, topology: Topology) -> PlacementAnswer:
    """The agent contract's answer for one rank's engine status (its slots are all live)."""
    live = np.asarray(status.physical_to_logical_map, dtype=np.int64)
    if live.shape != (model.num_layers, topology.num_slots):
        raise PlacementError(
            f"physical_to_logical_map: rank {status.rank} reports shape {live.shape}, the published "
            f"placement has {(model.num_layers, topology.num_slots)}"
        )
    first = status.rank * topology.slots_per_gpu
    own = live[:, first: first + topology.slots_per_gpu]
    slots = [
        SlotEntry(layer=int(layer), slot=first + int(slot), expert=int(own[layer, slot]), state="live")
        for layer, slot in zip(*np.nonzero(own >= 0))
    ]
    return PlacementAnswer(
        rank=status.rank, generation=status.generation, hash=status.hash, num_layers=model.num_layers,
        num_experts=model.num_experts, slots_per_gpu=topology.slots_per_gpu, num_gpus=topology.num_gpus,
        physical_to_logical_map=status.physical_to_logical_map, slots=slots,
    )


def write_published(directory: Path, data: dict[str, str]) -> None:
    """Write a placement ConfigMap's ``data`` as files, as the kubelet mounts it (one file per key).

    The kubelet swaps the whole directory at once; here each file is renamed into place, the hash
    last, so a reader that checks ``hash`` against the map sees either generation whole.
    """
    for key in sorted(data, key=lambda key: key == "hash"):
        write_atomic(directory / key, data[key])
