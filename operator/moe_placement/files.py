"""Placement files: moeplace's JSON, and the JSON SGLang's ``--init-expert-location`` reads.

moeplace JSON (``format: moeplace.placement/v1``)::

    {"format": "moeplace.placement/v1", "policy": "eplb",
     "model": {ModelShape}, "topology": {Topology},
     "physical_to_logical_map": [[expert id per slot, -1 empty] per layer],
     "solver": {"status", "objective", "lower_bound", "gap", "objective_name", "solve_seconds", "notes"},
     "predicted": {"prefill": {metric: value}, "decode": {...}},
     "predicted_routers": {"prefill": router, "decode": router},
     "migration": {from a previous placement: stages of copies and retirements, bytes, time}}

SGLang JSON: ``{"physical_to_logical_map": [[...] per transformer layer]}``: SGLang indexes the map by
absolute layer id (``ExpertLocationMetadata.num_layers`` is the model's ``num_hidden_layers``), so
dense layers get a row too (SGLang's own trivial row, ``arange(slots) % E``), and it reads a ``-1``
as the last expert (``_compute_logical_to_all_physical_map`` appends the slot to
``map[layer][-1]``), so every slot is filled. vLLM's maps have MoE rows only and no empty slot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from moe_placement.models import (
    ModelShape,
    Placement,
    PlacementError,
    Topology,
    format_validation_error,
)
from moe_placement.migration_plan import MigrationPlan
from moe_placement.policies import PlanResult

PLACEMENT_FORMAT = "moeplace.placement/v1"


class SolverReport(BaseModel):
    """SolverInfo and the solve time, as written to files and status."""

    model_config = ConfigDict(extra="forbid")

    status: str
    objective: float | None = None
    lower_bound: float | None = None
    gap: float | None = None
    objective_name: str = ""
    solve_seconds: float = 0.0
    notes: list[str] = []


class MigrationStageRecord(BaseModel):
    """One stage: copies as [layer, expert, source_slot, target_slot], then retired slots as
    [layer, slot]."""

    model_config = ConfigDict(extra="forbid")

    copies: list[tuple[int, int, int, int]]
    retired: list[tuple[int, int]]


class MigrationRecord(BaseModel):
    """The migration plan from a previous placement, as ``moe_placement.migration_plan`` made it."""

    model_config = ConfigDict(extra="forbid")

    previous_hash: str
    max_copies_per_stage: int
    stages: list[MigrationStageRecord]
    copies: int
    bytes_moved: float
    bytes_per_link: dict[str, float]
    estimated_seconds: float
    planning_seconds: float


def migration_record(
    plan: MigrationPlan,
    previous_hash: str,
    max_copies_per_stage: int,
    estimated_seconds: float,
    planning_seconds: float,
) -> MigrationRecord:
    """The file form of a migration plan."""
    return MigrationRecord(
        previous_hash=previous_hash,
        max_copies_per_stage=max_copies_per_stage,
        stages=[
            MigrationStageRecord(
                copies=[(c.layer, c.expert, c.source_slot, c.target_slot) for c in stage.copies],
                retired=[(int(layer), int(slot)) for layer, slot in stage.retired],
            )
            for stage in plan.stages
        ],
        copies=sum(len(stage.copies) for stage in plan.stages),
        bytes_moved=plan.bytes_moved,
        bytes_per_link=plan.bytes_per_link,
        estimated_seconds=estimated_seconds,
        planning_seconds=planning_seconds,
    )


class PlacementFile(BaseModel):
    """moeplace's placement file."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["moeplace.placement/v1"] = PLACEMENT_FORMAT
    policy: str
    model: ModelShape
    topology: Topology
    physical_to_logical_map: list[list[int]]
    solver: SolverReport
    predicted: dict[str, dict[str, float]] = {}
    predicted_routers: dict[str, str] = {}
    migration: MigrationRecord | None = None

    def placement(self) -> Placement:
        """The placement, validated against the file's model and topology."""
        placement = Placement(
            self.physical_to_logical_map, self.model.num_experts, self.topology.slots_per_gpu
        )
        placement.check_topology(self.model, self.topology)
        return placement


def solver_report(result: PlanResult) -> SolverReport:
    """The file form of a plan's solver information."""
    solver = result.solver
    return SolverReport(
        status=solver.status,
        objective=solver.objective,
        lower_bound=solver.lower_bound,
        gap=solver.gap,
        objective_name=solver.objective_name,
        solve_seconds=result.solve_seconds,
        notes=list(solver.notes),
    )


def build_placement_file(
    result: PlanResult,
    model: ModelShape,
    topology: Topology,
    predicted: dict[str, dict[str, float]] | None = None,
    migration: MigrationRecord | None = None,
    predicted_routers: dict[str, str] | None = None,
) -> PlacementFile:
    """The placement file of a plan; ``predicted_routers`` names the token router each phase of
    ``predicted`` was scored with (the policy's recommendation)."""
    return PlacementFile(
        policy=result.policy,
        model=model,
        topology=topology,
        physical_to_logical_map=result.placement.physical_to_logical_map.tolist(),
        solver=solver_report(result),
        predicted=predicted or {},
        predicted_routers=dict(predicted_routers or {}),
        migration=migration,
    )


def write_placement(path: str | Path, placement_file: PlacementFile) -> None:
    """Write moeplace's JSON."""
    Path(path).write_text(placement_file.model_dump_json(indent=1) + "\n")


def read_placement(path: str | Path) -> PlacementFile:
    """Read and validate moeplace's JSON."""
    text = Path(path).read_text()
    try:
        placement_file = PlacementFile.model_validate_json(text)
    except ValidationError as error:
        raise PlacementError(f"{path}: {format_validation_error(error)}") from None
    placement_file.placement()
    return placement_file


def fill_empty_slots(placement: Placement, load: np.ndarray | None = None) -> Placement:
    """The placement with every empty slot (-1) holding one more replica of a hot expert.

    Each empty slot, in slot order, goes to the expert of its layer with the most load per replica
    (load: [L, E]; without one, replica counts stand in for the load, as the policies replicate the
    hot experts, and the most-replicated experts win the ties), skipping experts its GPU already
    holds while another is left. Deterministic: ties go to the lower expert id. A full placement is returned
    as is.
    """
    mapping = placement.physical_to_logical_map
    if (mapping >= 0).all():
        return placement
    num_layers, num_experts = placement.num_layers, placement.num_experts
    if load is not None and np.shape(load) != (num_layers, num_experts):
        raise PlacementError(f"load: shape {np.shape(load)} != placement ({num_layers}, {num_experts})")
    original = placement.replica_count()
    weight = original.astype(np.float64) if load is None else np.asarray(load, dtype=np.float64)
    filled = mapping.copy()
    counts = original.copy()
    grid = placement.gpu_expert_matrix()
    slots_per_gpu = placement.slots_per_gpu
    expert_ids = np.arange(num_experts)
    for layer, slot in zip(*np.nonzero(mapping < 0)):
        gpu = slot // slots_per_gpu
        per_replica = weight[layer] / counts[layer]
        # lexsort: last key first; maximise per-replica load, then original replicas, then low id
        order = np.lexsort((expert_ids, -original[layer], -per_replica))
        absent = order[grid[layer, gpu, order] == 0]
        expert = int(absent[0] if len(absent) else order[0])
        filled[layer, slot] = expert
        counts[layer, expert] += 1
        grid[layer, gpu, expert] += 1
    return Placement(filled, num_experts, slots_per_gpu)


def sglang_physical_to_logical_map(
    placement: Placement, model: ModelShape, load: np.ndarray | None = None
) -> np.ndarray:
    """SGLang's map, shape [num_hidden_layers, G*S]: MoE layers from the filled placement, dense
    layers SGLang's trivial row."""
    if placement.num_layers != model.num_layers:
        raise PlacementError(
            f"physical_to_logical_map: {placement.num_layers} layers, model has {model.num_layers} MoE layers"
        )
    filled = fill_empty_slots(placement, load).physical_to_logical_map
    rows = np.tile(np.arange(placement.num_slots) % placement.num_experts, (model.num_hidden_layers, 1))
    rows[model.moe_layer_ids()] = filled
    return rows


def moe_rows(engine_map: np.ndarray, model: ModelShape) -> np.ndarray:
    """The MoE rows [L, G*S] of a map indexed by transformer layer, shape [num_hidden_layers, G*S]
    (SGLang's); a map that already has L rows (vLLM's) is returned as is."""
    engine_map = np.asarray(engine_map, dtype=np.int64)
    if engine_map.ndim == 2 and engine_map.shape[0] == model.num_layers:
        return engine_map
    if engine_map.ndim != 2 or engine_map.shape[0] != model.num_hidden_layers:
        raise PlacementError(
            f"physical_to_logical_map: shape {engine_map.shape}, expected {model.num_layers} MoE rows "
            f"or {model.num_hidden_layers} transformer-layer rows"
        )
    return engine_map[model.moe_layer_ids()]


def sglang_json(placement: Placement, model: ModelShape, load: np.ndarray | None = None) -> str:
    """The ``{"physical_to_logical_map": [[...]]}`` JSON of ``sglang_physical_to_logical_map``."""
    rows = sglang_physical_to_logical_map(placement, model, load)
    return json.dumps({"physical_to_logical_map": rows.tolist()}, separators=(",", ":"))


def write_sglang(
    path: str | Path, placement: Placement, model: ModelShape, load: np.ndarray | None = None
) -> None:
    """Write the JSON that SGLang's ``--init-expert-location`` reads (see ``sglang_json``)."""
    Path(path).write_text(sglang_json(placement, model, load) + "\n")
