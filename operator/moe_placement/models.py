"""The contracts every part of moeplace computes with.

ModelShape and Topology are pydantic models: they cross boundaries (the CRD spec, placement files,
HTTP payloads) and take camelCase or snake_case keys. WorkloadProfile and Placement hold numpy arrays
and validate their shapes on construction. Every error is a ``PlacementError`` naming the field.

Array shapes: L layers, E logical experts, G GPUs, S slots per GPU, k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Literal, TypeVar

import hashlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

Phase = Literal["prefill", "decode"]
RegistryValue = TypeVar("RegistryValue")
PHASES: tuple[Phase, ...] = ("prefill", "decode")


class PlacementError(ValueError):
    """Bad input to the placement library; the message names the field and the problem."""


def lookup(registry: Mapping[str, RegistryValue], name: str, field: str) -> RegistryValue:
    """``registry[name]``, or a PlacementError naming ``field`` and the known names."""
    try:
        return registry[name]
    except KeyError:
        raise PlacementError(f"{field}: unknown {name!r}; known: {', '.join(registry)}") from None


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, ``field.path: message``, for pydantic errors."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        name = f"{prefix}.{location}" if prefix and location else (prefix or location)
        lines.append(f"{name}: {problem['msg']}")
    return "; ".join(lines)


class BoundaryModel(BaseModel):
    """Frozen pydantic model that reads and writes camelCase (Kubernetes style) and snake_case."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )


class ModelShape(BoundaryModel):
    """The shape of a MoE model's routed experts."""

    name: str = Field("custom", description="Model name, for reports.")
    num_layers: int = Field(gt=0, le=1024, description="Number of MoE layers.")
    first_k_dense_replace: int = Field(
        0, ge=0, le=1024,
        description="Leading dense (non-MoE) transformer layers (DeepSeek's first_k_dense_replace).",
    )
    dense_layers: tuple[int, ...] = Field(
        (), description="Absolute ids of further dense transformer layers (Qwen's mlp_only_layers)."
    )
    num_experts: int = Field(gt=0, le=4096, description="Routed experts per MoE layer.")
    top_k: int = Field(gt=0, le=64, description="Experts each token is routed to.")
    hidden_size: int = Field(gt=0, description="Model width (size of a token's activation).")
    expert_intermediate_size: int = Field(gt=0, description="Width of one expert's FFN.")
    weight_bytes: float = Field(2.0, gt=0, le=8, description="Bytes per expert weight (2 = bf16).")
    activation_bytes: float = Field(
        2.0, gt=0, le=8, description="Bytes per activation value sent between GPUs."
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> ModelShape:
        if self.top_k > self.num_experts:
            raise ValueError(f"topK ({self.top_k}) exceeds numExperts ({self.num_experts})")
        dense = sorted(self.dense_layers)
        if len(set(dense)) != len(dense):
            raise ValueError(f"denseLayers: {list(self.dense_layers)} repeats a layer")
        if dense and not self.first_k_dense_replace <= dense[0] <= dense[-1] < self.num_hidden_layers:
            raise ValueError(
                f"denseLayers: {list(self.dense_layers)} must lie in {self.first_k_dense_replace}.."
                f"{self.num_hidden_layers - 1} (after the firstKDenseReplace leading dense layers)"
            )
        return self

    @property
    def num_hidden_layers(self) -> int:
        """Transformer layers, dense and MoE (the model config's ``num_hidden_layers``)."""
        return self.num_layers + self.first_k_dense_replace + len(self.dense_layers)

    def moe_layer_ids(self) -> np.ndarray:
        """Transformer layer id of every MoE layer, shape [L]: row l of an [L, ...] array is layer
        ``moe_layer_ids()[l]`` of the model (the engines index their maps by this id)."""
        dense = np.zeros(self.num_hidden_layers, dtype=bool)
        dense[: self.first_k_dense_replace] = True
        dense[list(self.dense_layers)] = True
        return np.flatnonzero(~dense)

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert's three matrices (gate, up, down)."""
        return 3.0 * self.hidden_size * self.expert_intermediate_size * self.weight_bytes

    @property
    def flops_per_token(self) -> float:
        """FLOP one token costs in one expert (three matmuls, multiply-add = 2 FLOP)."""
        return 6.0 * self.hidden_size * self.expert_intermediate_size

    @property
    def token_bytes(self) -> float:
        """Bytes of one token's activation crossing a link."""
        return self.hidden_size * self.activation_bytes


class GpuSpec(BoundaryModel):
    """Datasheet figures of one GPU kind."""

    name: str = Field("custom", description="GPU name, for reports.")
    hbm_bandwidth_gb_s: float = Field(gt=0, description="HBM bandwidth, GB/s.")
    peak_tflops: float = Field(gt=0, description="Dense bf16 peak, TFLOP/s.")
    memory_gib: float = Field(80.0, gt=0, description="HBM capacity, GiB.")


class Topology(BoundaryModel):
    """Nodes x GPUs per node, each GPU with a fixed number of expert slots per layer.

    GPU g owns slots g*S .. g*S+S-1; its node is g // gpus_per_node.
    """

    num_nodes: int = Field(gt=0, le=4096, description="Number of nodes.")
    gpus_per_node: int = Field(gt=0, le=64, description="GPUs per node.")
    slots_per_gpu: int = Field(gt=0, le=4096, description="Expert slots per GPU per layer.")
    gpu: GpuSpec = Field(description="The GPU kind (all GPUs alike).")
    intra_node_gb_s: float = Field(
        450.0, gt=0, description="Per-GPU link bandwidth inside a node (NVLink), GB/s per direction."
    )
    inter_node_gb_s: float = Field(
        50.0, gt=0, description="Per-GPU link bandwidth between nodes (InfiniBand), GB/s."
    )

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    def gpu_of_slot(self) -> np.ndarray:
        """GPU index of every slot, shape [G*S]."""
        return np.repeat(np.arange(self.num_gpus), self.slots_per_gpu)

    def node_of_gpu(self) -> np.ndarray:
        """Node index of every GPU, shape [G]."""
        return np.repeat(np.arange(self.num_nodes), self.gpus_per_node)


def check_fits(model: ModelShape, topology: Topology) -> None:
    """Raise PlacementError unless every expert can have at least one slot."""
    if topology.num_slots < model.num_experts:
        raise PlacementError(
            f"topology: {topology.num_gpus} GPUs x {topology.slots_per_gpu} slots = "
            f"{topology.num_slots} slots cannot hold {model.num_experts} experts"
        )


def _as_array(name: str, value: object, ndim: int, dtype: type) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise PlacementError(f"{name}: not a numeric array ({error})") from None
    if array.ndim != ndim:
        raise PlacementError(f"{name}: expected {ndim} dimensions, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class SparsePairs:
    """Sparse counts of expert pairs, per layer.

    For transitions, ``first`` is the expert a token chose at ``layer`` and ``second`` the one it
    chose at ``layer + 1``. For co-activation, both are chosen by one token at ``layer`` and
    ``first < second``.

    Shapes: layer, first, second, count are all [N].
    """

    layer: np.ndarray
    first: np.ndarray
    second: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        lengths = {len(np.asarray(a)) for a in (self.layer, self.first, self.second, self.count)}
        if len(lengths) != 1:
            raise PlacementError("pairs: layer, first, second and count differ in length")

    @staticmethod
    def empty() -> SparsePairs:
        zero = np.zeros(0, dtype=np.int64)
        return SparsePairs(zero, zero, zero, np.zeros(0, dtype=np.float64))

    def dense(self, layer: int, num_experts: int) -> np.ndarray:
        """The counts of one layer as a dense matrix, shape [E, E]."""
        matrix = np.zeros((num_experts, num_experts), dtype=np.float64)
        mask = self.layer == layer
        np.add.at(matrix, (self.first[mask], self.second[mask]), self.count[mask])
        return matrix

    @staticmethod
    def from_dense(matrices: np.ndarray, min_count: float = 0.0) -> SparsePairs:
        """Sparse form of per-layer dense counts, shape [L', E, E]; keeps counts > min_count."""
        layer, first, second = np.nonzero(matrices > min_count)
        return SparsePairs(layer, first, second, matrices[layer, first, second].astype(np.float64))


def _checked_load(load: object) -> np.ndarray:
    """``load`` as a float64 [L, E] array of token counts; PlacementError if it is empty, has a
    negative or non-finite count, or no tokens at all."""
    load = _as_array("load", load, 2, np.float64)
    if load.shape[0] == 0 or load.shape[1] == 0:
        raise PlacementError(f"load: empty, shape {load.shape}")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise PlacementError("load: counts must be finite and >= 0")
    if load.sum() <= 0:
        raise PlacementError("load: no tokens (all counts are zero)")
    return load


def _check_pairs(name: str, pairs: SparsePairs | None, max_layer: int, num_experts: int) -> None:
    """PlacementError unless every layer of ``pairs`` is in 0..max_layer - 1 and both experts of
    every pair in 0..num_experts - 1 (no pairs at all is fine)."""
    if pairs is None or len(pairs.layer) == 0:
        return
    if pairs.layer.min() < 0 or pairs.layer.max() >= max_layer:
        raise PlacementError(f"{name}: layer index out of range 0..{max_layer - 1}")
    for side in (pairs.first, pairs.second):
        if side.min() < 0 or side.max() >= num_experts:
            raise PlacementError(f"{name}: expert id out of range 0..{num_experts - 1}")


@dataclass(frozen=True)
class WorkloadProfile:
    """What the experts see over a window of tokens.

    load: [L, E] tokens routed to each expert per layer (a token counts once in each of its k experts).
    transitions: tokens that chose ``first`` at layer l and ``second`` at l+1 (optional).
    coactivation: tokens that chose both ``first`` and ``second`` at one layer (optional).
    domain_loads: per task domain, [L, E] (optional).
    phase: prefill or decode; batch_size: tokens in one forward step of the whole EP group.
    """

    load: np.ndarray
    top_k: int
    transitions: SparsePairs | None = None
    coactivation: SparsePairs | None = None
    domain_loads: dict[str, np.ndarray] = field(default_factory=dict)
    phase: Phase = "prefill"
    batch_size: int = 4096

    def __post_init__(self) -> None:
        load = _checked_load(self.load)
        object.__setattr__(self, "load", load)
        if self.top_k <= 0 or self.top_k > load.shape[1]:
            raise PlacementError(f"top_k: {self.top_k} not in 1..{load.shape[1]}")
        if self.phase not in ("prefill", "decode"):
            raise PlacementError(f"phase: {self.phase!r} is not prefill or decode")
        if self.batch_size <= 0:
            raise PlacementError(f"batch_size: {self.batch_size} must be > 0")
        # Transitions run from layer l to l + 1, so the last layer starts none.
        _check_pairs("transitions", self.transitions, load.shape[0] - 1, load.shape[1])
        _check_pairs("coactivation", self.coactivation, load.shape[0], load.shape[1])
        for domain, domain_load in self.domain_loads.items():
            if np.shape(domain_load) != load.shape:
                raise PlacementError(
                    f"domain_loads[{domain}]: shape {np.shape(domain_load)} != load {load.shape}"
                )

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @property
    def num_tokens(self) -> float:
        """Tokens in the window (each layer sees every token k times)."""
        return float(self.load[0].sum() / self.top_k)

    def check_model(self, model: ModelShape) -> None:
        """Raise PlacementError when this profile does not fit the model's shape."""
        if self.load.shape != (model.num_layers, model.num_experts):
            raise PlacementError(
                f"load: shape {self.load.shape} does not match the model "
                f"({model.num_layers} layers x {model.num_experts} experts)"
            )
        if self.top_k != model.top_k:
            raise PlacementError(f"top_k: profile has {self.top_k}, model has {model.top_k}")


@dataclass(frozen=True)
class Placement:
    """Which logical expert each physical slot holds, per layer.

    physical_to_logical_map: [L, G*S] expert id per slot, -1 for an empty slot (SGLang's
    ``physical_to_logical_map``). GPU g owns slots g*S .. g*S+S-1.
    """

    physical_to_logical_map: np.ndarray
    num_experts: int
    slots_per_gpu: int

    def __post_init__(self) -> None:
        mapping = _as_array("physical_to_logical_map", self.physical_to_logical_map, 2, np.int64)
        num_layers, num_slots = mapping.shape
        if num_layers == 0 or num_slots == 0:
            raise PlacementError(f"physical_to_logical_map: empty, shape {mapping.shape}")
        if self.slots_per_gpu <= 0 or num_slots % self.slots_per_gpu:
            raise PlacementError(
                f"slots_per_gpu: {num_slots} slots are not divisible into GPUs of "
                f"{self.slots_per_gpu} slots"
            )
        if mapping.min() < -1 or mapping.max() >= self.num_experts:
            raise PlacementError(
                f"physical_to_logical_map: expert ids must be in -1..{self.num_experts - 1}, "
                f"found {mapping.min()}..{mapping.max()}"
            )
        counts = self._count(mapping)
        missing = np.argwhere(counts == 0)
        if len(missing):
            layer, expert = missing[0]
            raise PlacementError(
                f"physical_to_logical_map: expert {expert} of layer {layer} has no replica "
                f"({len(missing)} (layer, expert) pairs without one)"
            )
        mapping = mapping.copy()  # frozen below; the caller's array stays theirs
        mapping.setflags(write=False)
        object.__setattr__(self, "physical_to_logical_map", mapping)

    def _count(self, mapping: np.ndarray) -> np.ndarray:
        counts = np.zeros((mapping.shape[0], self.num_experts), dtype=np.int64)
        layer_index, slot = np.nonzero(mapping >= 0)
        np.add.at(counts, (layer_index, mapping[layer_index, slot]), 1)
        return counts

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical_map.shape[0]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical_map.shape[1]

    @property
    def num_gpus(self) -> int:
        return self.num_slots // self.slots_per_gpu

    def replica_count(self) -> np.ndarray:
        """Replicas of each expert, shape [L, E]."""
        return self._count(self.physical_to_logical_map)

    def logical_to_physical_map(self) -> np.ndarray:
        """Slots holding each expert, shape [L, E, R] with R the most replicas; -1 pads."""
        counts = self.replica_count()
        result = np.full((self.num_layers, self.num_experts, int(counts.max())), -1, np.int64)
        for layer in range(self.num_layers):
            row = self.physical_to_logical_map[layer]
            slots = np.nonzero(row >= 0)[0]
            order = slots[np.argsort(row[slots], kind="stable")]
            experts = row[order]
            starts = np.searchsorted(experts, np.arange(self.num_experts))
            rank = np.arange(len(order)) - starts[experts]
            result[layer, experts, rank] = order
        return result

    def gpu_expert_matrix(self) -> np.ndarray:
        """Replicas of each expert on each GPU, shape [L, G, E]."""
        num_layers, num_gpus = self.num_layers, self.num_gpus
        grid = self.physical_to_logical_map.reshape(num_layers, num_gpus, self.slots_per_gpu)
        matrix = np.zeros((num_layers, num_gpus, self.num_experts), dtype=np.int64)
        layer_index, gpu, slot = np.nonzero(grid >= 0)
        np.add.at(matrix, (layer_index, gpu, grid[layer_index, gpu, slot]), 1)
        return matrix

    def check_topology(self, model: ModelShape, topology: Topology) -> None:
        """Raise PlacementError when this placement does not fit the model and topology."""
        if self.num_layers != model.num_layers:
            raise PlacementError(
                f"physical_to_logical_map: {self.num_layers} layers, model has {model.num_layers}"
            )
        if self.num_experts != model.num_experts:
            raise PlacementError(
                f"num_experts: placement has {self.num_experts}, model has {model.num_experts}"
            )
        if self.num_slots != topology.num_slots or self.slots_per_gpu != topology.slots_per_gpu:
            raise PlacementError(
                f"physical_to_logical_map: {self.num_slots} slots of {self.slots_per_gpu} per GPU, "
                f"topology has {topology.num_slots} of {topology.slots_per_gpu}"
            )

    def moved_experts(self, other: Placement) -> int:
        """Replicas that ``other`` places on a GPU that does not hold them here (per layer, summed)."""
        added = np.clip(other.gpu_expert_matrix() - self.gpu_expert_matrix(), 0, None)
        return int(added.sum())


@dataclass(frozen=True)
class RoutingBatch:
    """One forward step of the whole EP group: every token's experts at every layer.

    expert_ids: [L, B, k] logical expert ids, column 0 the token's first choice.
    source_gpu: [B] each token's home GPU: the attention data-parallel rank its request was sent to
        (by a request router, or round robin of sequences over GPUs when none decides).
    """

    expert_ids: np.ndarray
    source_gpu: np.ndarray

    def __post_init__(self) -> None:
        expert_ids = _as_array("expert_ids", self.expert_ids, 3, np.int64)
        source_gpu = _as_array("source_gpu", self.source_gpu, 1, np.int64)
        if expert_ids.shape[1] != source_gpu.shape[0]:
            raise PlacementError(
                f"source_gpu: {source_gpu.shape[0]} tokens, expert_ids has {expert_ids.shape[1]}"
            )
        if expert_ids.shape[1] == 0:
            raise PlacementError("expert_ids: empty batch")
        object.__setattr__(self, "expert_ids", expert_ids)
        object.__setattr__(self, "source_gpu", source_gpu)


def placement_hash(physical_to_logical_map: np.ndarray) -> str:
    """Identity of a map [L, N]: sha256 of its int64 little-endian bytes, first 16 hex digits."""
    data = np.ascontiguousarray(np.asarray(physical_to_logical_map, dtype="<i8"))
    digest = hashlib.sha256(f"{data.shape}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()[:16]
