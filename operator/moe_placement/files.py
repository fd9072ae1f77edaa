"""Placement files: moeplace's JSON, and the JSON SGLang's ``--init-expert-location`` reads.

moeplace JSON (``format: moeplace.placement/v1``)::

    {"format": "moeplace.placement/v1", "policy": "eplb",
     "model": {ModelShape}, "topology": {Topology},
     "physical_to_logical_map": [[expert id per slot, -1 empty] per layer],
     "solver": {"status", "objective", "lower_bound", "gap", "objective_name", "solve_seconds", "notes"},
     "predicted": {"prefill": {metric: value}, "decode": {...}},
     "migration": {from a previous placement: stages of copies and retirements, bytes, time}}

SGLang JSON: ``{"physical_to_logical_map": [[...] per layer]}`` with every slot filled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

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
) -> PlacementFile:
    """The placement file of a plan."""
    return PlacementFile(
        policy=result.policy,
        model=model,
        topology=topology,
        physical_to_logical_map=result.placement.physical_to_logical_map.tolist(),
        solver=solver_report(result),
        predicted=predicted or {},
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


def write_sglang(path: str | Path, placement: Placement) -> None:
    """Write the ``physical_to_logical_map`` JSON that SGLang's ``--init-expert-location`` reads."""
    if (placement.physical_to_logical_map < 0).any():
        raise PlacementError(
            "physical_to_logical_map: SGLang needs every slot filled; this placement has empty slots"
        )
    payload = {"physical_to_logical_map": placement.physical_to_logical_map.tolist()}
    Path(path).write_text(json.dumps(payload) + "\n")
