"""Named model shapes and GPUs, and the ``NODESxGPUS[:gpu]`` topology syntax of the CLI."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from moe_placement.models import (
    GpuSpec,
    ModelShape,
    PlacementError,
    Topology,
    format_validation_error,
    lookup,
)

# Routed experts only (shared experts are dense and never move). Sizes and dense layers from the
# models' config.json: DeepSeek-V2-Lite has 27 transformer layers, the first dense; DeepSeek-V3 61,
# the first 3 dense; Mixtral and Qwen3-MoE have no dense layer.
MODEL_PRESETS: dict[str, ModelShape] = {
    "mixtral-8x7b": ModelShape(
        name="mixtral-8x7b", num_layers=32, num_experts=8, top_k=2,
        hidden_size=4096, expert_intermediate_size=14336,
    ),
    "deepseek-v2-lite": ModelShape(
        name="deepseek-v2-lite", num_layers=26, first_k_dense_replace=1, num_experts=64, top_k=6,
        hidden_size=2048, expert_intermediate_size=1408,
    ),
    "deepseek-v3": ModelShape(
        name="deepseek-v3", num_layers=58, first_k_dense_replace=3, num_experts=256, top_k=8,
        hidden_size=7168, expert_intermediate_size=2048,
    ),
    "qwen3-30b-a3b": ModelShape(
        name="qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8,
        hidden_size=2048, expert_intermediate_size=768,
    ),
    "qwen3-235b-a22b": ModelShape(
        name="qwen3-235b-a22b", num_layers=94, num_experts=128, top_k=8,
        hidden_size=4096, expert_intermediate_size=1536,
    ),
}

# Datasheet figures (SXM parts): HBM bandwidth, dense bf16 peak, capacity.
GPU_PRESETS: dict[str, GpuSpec] = {
    "h100": GpuSpec(name="h100", hbm_bandwidth_gb_s=3350.0, peak_tflops=989.0, memory_gib=80.0),
    "h200": GpuSpec(name="h200", hbm_bandwidth_gb_s=4800.0, peak_tflops=989.0, memory_gib=141.0),
}

_TOPOLOGY_SPEC = re.compile(r"^(\d+)x(\d+)(?::([a-z0-9-]+))?$")


def model_preset(name: str) -> ModelShape:
    """The preset model shape called ``name``."""
    return lookup(MODEL_PRESETS, name, "model")


def model_shape(spec: str) -> ModelShape:
    """A preset by name, a ModelShape JSON file, or inline ModelShape JSON."""
    if spec in MODEL_PRESETS:
        return MODEL_PRESETS[spec]
    text = spec if spec.lstrip().startswith("{") else None
    if text is None:
        path = Path(spec)
        if not path.is_file():
            raise PlacementError(
                f"model: {spec!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a file"
            )
        text = path.read_text()
    try:
        return ModelShape.model_validate_json(text)
    except ValidationError as error:
        raise PlacementError(format_validation_error(error, "model")) from None


def gpu_preset(name: str) -> GpuSpec:
    """The preset GPU called ``name``."""
    return lookup(GPU_PRESETS, name, "gpu")


def slots_per_gpu(num_experts: int, num_gpus: int, redundant_slots: int) -> int:
    """Slots each GPU needs so that the EP group holds every expert plus ``redundant_slots`` extra."""
    if redundant_slots < 0:
        raise PlacementError(f"redundant_slots: {redundant_slots} must be >= 0")
    total = num_experts + redundant_slots
    if total % num_gpus:
        raise PlacementError(
            f"redundant_slots: {num_experts} experts + {redundant_slots} redundant slots = {total} "
            f"slots do not divide evenly over {num_gpus} GPUs"
        )
    return total // num_gpus


def parse_topology(spec: str, num_experts: int, redundant_slots: int = 0) -> Topology:
    """Topology from ``NODESxGPUS[:gpu]`` (``2x4``, ``8x8:h200``); slots follow from the experts."""
    match = _TOPOLOGY_SPEC.match(spec.strip().lower())
    if not match:
        raise PlacementError(f"topology: {spec!r} is not NODESxGPUS[:gpu], e.g. 2x4 or 8x8:h200")
    num_nodes, gpus_per_node = int(match[1]), int(match[2])
    if num_nodes == 0 or gpus_per_node == 0:
        raise PlacementError(f"topology: {spec!r} has zero nodes or GPUs")
    gpu = gpu_preset(match[3] or "h100")
    return Topology(
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        slots_per_gpu=slots_per_gpu(num_experts, num_nodes * gpus_per_node, redundant_slots),
        gpu=gpu,
    )
