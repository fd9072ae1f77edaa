"""Expert weight store: the weights in this rank's slots, their state, and their wire form.

An expert is three real tensors (SwiGLU FFN, as Mixtral and DeepSeek have them):
    w_gate [I', H], w_up [I', H], w_down [H, I']
with H the model's hidden size and I' = ceil(I / expert_scale) its expert width divided by the
``--expert-scale`` divisor, so a replay of a large model fits in a small machine's memory while
weights of a realistic size still move. Initial weights are a deterministic function of (seed,
layer, expert), so every agent that starts with an expert holds the very same bytes.

On the wire and on disk an expert is a safetensors file (tensors ``w_gate``, ``w_up``, ``w_down``),
identified by the sha256 of its bytes. A checkpoint directory holds ``layer{L}_expert{E}.safetensors``
and, beside each, ``layer{L}_expert{E}.safetensors.sha256`` with the hex digest.

A slot is ``empty``, ``staged`` (weights present and verified, not serving) or ``live``. While a
transfer into an empty slot runs, the slot is *reserved*: still empty to everyone else, but no second
transfer may start into it. A live slot that an activation drops is *retired*: empty, but its weights
are kept for a grace period so that activating the previous map again brings them back without a copy
(an activation that went wrong can be undone). A staged slot that no activation claims within its
time to live is dropped (the plan that staged it is gone).

Shapes: L layers, S slots of this rank per layer.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from moe_placement.models import ModelShape, PlacementError

SlotState = Literal["empty", "staged", "live"]
TENSOR_NAMES = ("w_gate", "w_up", "w_down")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class WeightsError(ValueError):
    """Bytes that are not a valid expert of this store's shape; the message says what is wrong."""


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's tensors: w_gate [I', H], w_up [I', H], w_down [H, I']."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_gate, self.w_up, self.w_down))

    def to_bytes(self) -> bytes:
        """The safetensors file of this expert (deterministic: same tensors, same bytes)."""
        return safetensors_save({name: getattr(self, name).contiguous() for name in TENSOR_NAMES})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The expert's FFN on hidden [n, H] -> [n, H]: down(silu(gate x) * up x)."""
        gate = torch.nn.functional.linear(hidden, self.w_gate)
        up = torch.nn.functional.linear(hidden, self.w_up)
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.w_down)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Slot:
    """A slot of this rank: its state, expert (-1 when empty), weights and the sha256 of their
    safetensors bytes (known once verified or first served; None until then)."""

    state: SlotState = "empty"
    expert: int = -1
    weights: ExpertWeights | None = None
    sha256: str | None = None
    reserved: bool = False
    since: float = field(default_factory=time.monotonic)


class SlotBusy(Exception):
    """The slot is not free (live, staged, or a transfer into it is running)."""


class ExpertStore:
    """The weights of the S slots per layer that rank ``rank`` owns.

    Slots are addressed by their global index (the column of ``physical_to_logical_map``); this rank
    owns ``rank*S .. rank*S+S-1``.
    """

    def __init__(
        self,
        shape: ModelShape,
        slots_per_gpu: int,
        rank: int,
        *,
        expert_scale: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> None:
        if expert_scale < 1:
            raise PlacementError(f"expert_scale: {expert_scale} must be >= 1")
        self.shape = shape
        self.slots_per_gpu = slots_per_gpu
        self.rank = rank
        self.expert_scale = expert_scale
        self.dtype = dtype
        self.seed = seed
        self.hidden_size = shape.hidden_size
        self.intermediate_size = math.ceil(shape.expert_intermediate_size / expert_scale)
        self._slots = [[Slot() for _ in range(slots_per_gpu)] for _ in range(shape.num_layers)]
        self._retired: dict[tuple[int, int], Slot] = {}

    # -- shapes and initial weights -------------------------------------------------------------

    @property
    def first_slot(self) -> int:
        return self.rank * self.slots_per_gpu

    def owns(self, slot: int) -> bool:
        return self.first_slot <= slot < self.first_slot + self.slots_per_gpu

    def tensor_shapes(self) -> dict[str, tuple[int, int]]:
        hidden, width = self.hidden_size, self.intermediate_size
        return {"w_gate": (width, hidden), "w_up": (width, hidden), "w_down": (hidden, width)}

    @property
    def expert_nbytes(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * torch.tensor([], dtype=self.dtype).element_size()

    def initial_weights(self, layer: int, expert: int) -> ExpertWeights:
        """The deterministic weights expert ``expert`` of ``layer`` starts with (same on every agent)."""
        digest = hashlib.sha256(f"moeplace:{self.seed}:{layer}:{expert}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        # Scaled as a trained FFN roughly is, so that forward outputs stay finite in bf16.
        tensors = {
            name: (torch.randn(size, generator=generator) / math.sqrt(size[1])).to(self.dtype)
            for name, size in self.tensor_shapes().items()
        }
        return ExpertWeights(**tensors)

    def parse_weights(self, data: bytes) -> ExpertWeights:
        """Weights from safetensors bytes, checked against this store's tensor names, shapes and dtype."""
        try:
            tensors = safetensors_load(data)
        except (SafetensorError, ValueError) as error:
            raise WeightsError(f"not a safetensors file ({error})") from None
        expected = self.tensor_shapes()
        if set(tensors) != set(expected):
            raise WeightsError(f"tensors {sorted(tensors)}, expected {sorted(expected)}")
        for name, size in expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != size or tensor.dtype != self.dtype:
                raise WeightsError(
                    f"{name}: {tuple(tensor.shape)} {tensor.dtype}, expected {size} {self.dtype}"
                )
        return ExpertWeights(**tensors)

    # -- slots -----------------------------------------------------------------------------------

    def slot(self, layer: int, slot: int) -> Slot:
        """The slot with global index ``slot`` of ``layer`` (must be this rank's)."""
        return self._slots[layer][slot - self.first_slot]

    def load_live(self, layer: int, slot: int, expert: int) -> None:
        """Put the initial weights of ``expert`` in a slot, live (at start)."""
        self._slots[layer][slot - self.first_slot] = Slot("live", expert, self.initial_weights(layer, expert))

    def reserve(self, layer: int, slot: int) -> None:
        """Claim an empty slot for a transfer; SlotBusy unless it is empty and unclaimed."""
        entry = self.slot(layer, slot)
        if entry.state != "empty" or entry.reserved:
            what = "a transfer into it is running" if entry.reserved else f"it is {entry.state}"
            raise SlotBusy(f"slot: {slot} of layer {layer} is not free ({what})")
        entry.reserved = True

    def release(self, layer: int, slot: int) -> None:
        """Give up a reservation: the slot stays empty."""
        self.slot(layer, slot).reserved = False

    def stage(self, layer: int, slot: int, expert: int, weights: ExpertWeights, sha256: str) -> None:
        """Fill a reserved slot with verified weights, as staged."""
        self._slots[layer][slot - self.first_slot] = Slot("staged", expert, weights, sha256)

    def drop(self, layer: int, slot: int, keep: bool = False) -> None:
        """Empty a slot; ``keep``: remember a live slot's weights as retired (see ``restore``)."""
        entry = self.slot(layer, slot)
        if keep and entry.state == "live":
            self._retired[(layer, slot)] = Slot("staged", entry.expert, entry.weights, entry.sha256)
        self._slots[layer][slot - self.first_slot] = Slot()

    def restore(self, layer: int, slot: int, expert: int) -> bool:
        """Put a retired slot's weights back, staged, when they are ``expert``'s and the slot is free."""
        retired = self._retired.get((layer, slot))
        entry = self.slot(layer, slot)
        if retired is None or retired.expert != expert or entry.state != "empty" or entry.reserved:
            return False
        del self._retired[(layer, slot)]
        self._slots[layer][slot - self.first_slot] = Slot("staged", expert, retired.weights, retired.sha256)
        return True

    def retired(self) -> Iterator[tuple[int, int, Slot]]:
        """(layer, global slot, retired weights) kept for the grace period."""
        for (layer, slot), entry in sorted(self._retired.items()):
            yield layer, slot, entry

    def collect(self, retired_grace_seconds: float, staged_ttl_seconds: float) -> int:
        """Forget retired weights older than the grace period and drop staged slots older than their
        time to live; returns how many staged slots were dropped."""
        now = time.monotonic()
        for key, entry in list(self._retired.items()):
            if now - entry.since > retired_grace_seconds:
                del self._retired[key]
        expired = [
            (layer, slot) for layer, slot, entry in self.items()
            if entry.state == "staged" and now - entry.since > staged_ttl_seconds
        ]
        for layer, slot in expired:
            self.drop(layer, slot)
        return len(expired)

    def set_live(self, layer: int, slot: int) -> None:
        """Make a staged slot live."""
        entry = self.slot(layer, slot)
        entry.state, entry.since = "live", time.monotonic()

    def holding(self, layer: int, expert: int) -> Slot | None:
        """A live slot holding ``expert`` of ``layer``, else a staged one, else None."""
        found = [entry for entry in self._slots[layer] if entry.expert == expert and entry.weights is not None]
        found.sort(key=lambda entry: entry.state != "live")
        return found[0] if found else None

    def items(self) -> Iterator[tuple[int, int, Slot]]:
        """(layer, global slot, slot) of every slot of this rank."""
        for layer, row in enumerate(self._slots):
            for index, entry in enumerate(row):
                yield layer, self.first_slot + index, entry

    def occupancy(self) -> dict[SlotState, int]:
        """Slots per state over all layers."""
        counts: dict[SlotState, int] = {"live": 0, "staged": 0, "empty": 0}
        for _, _, entry in self.items():
            counts[entry.state] += 1
        return counts


# -- checkpoint directories ---------------------------------------------------------------------


def checkpoint_path(directory: str | Path, layer: int, expert: int) -> Path:
    return Path(directory) / f"layer{layer}_expert{expert}.safetensors"


def write_checkpoint(directory: str | Path, layer: int, expert: int, weights: ExpertWeights) -> str:
    """Write one expert and its sha256 file into a checkpoint directory; returns the sha256."""
    path = checkpoint_path(directory, layer, expert)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = weights.to_bytes()
    digest = sha256_hex(data)
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(digest + "\n")
    return digest


def read_checkpoint(directory: str | Path, layer: int, expert: int) -> tuple[bytes, str]:
    """(bytes, sha256 the checkpoint records) of one expert of a checkpoint directory;
    FileNotFoundError if either file is missing."""
    path = checkpoint_path(directory, layer, expert)
    data = path.read_bytes()
    recorded = path.with_name(path.name + ".sha256").read_text().split()
    if not recorded:
        raise WeightsError(f"{path.name}.sha256 is empty")
    return data, recorded[0].lower()
