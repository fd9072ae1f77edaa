"""On-device routing recorder: tokens per expert, layer-to-layer transitions, co-activation.

Counting happens on the device of the routing tensors with scatter-adds into preallocated counters,
so recording never copies to the host nor waits for the device: ``torch.bincount`` would, since on
CUDA it reads the input's maximum back to size its output. A counter of pairs is a bincount over the
pair key ``first * E + second``.

What is counted, per window (the definitions of ``moe_placement.traces.Trace.profile``):
    load [L, E]: (token, choice) pairs per expert.
    transitions [L-1, E, E]: for a token, every (expert at l, expert at l+1) pair of its k x k
        choices counts 1, so layer l's counts sum to T*k*k.
    coactivation [L, E, E]: for a token, every pair of its k choices at one layer, first < second.

Windows roll: counts go to the current window; once it is ``window_seconds`` old it becomes the
previous window and a fresh one starts. A snapshot sums both, so it always covers between one and two
windows of traffic (``RecorderSnapshot.window_seconds`` says exactly how long).

``attach(model)`` finds the MoE blocks of a torch model (any module with ``gate`` and ``experts``
children: Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, vLLM's MoE blocks, and
``moe_agent.model``) and records what their gates choose through forward hooks. A hook never breaks
its host: any failure in it is counted (``RoutingRecorder.hook_errors``, logged once per kind) and
the forward pass goes on untouched.

Shapes: L MoE layers, E experts, T tokens, k experts per token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_placement.models import PlacementError, SparsePairs

logger = logging.getLogger("moe_agent.recorder")


@dataclass(frozen=True)
class RecorderSnapshot:
    """The recorder's window on the host.

    load: [L, E] int64; transitions, coactivation: the top pairs per layer (counts as float64);
    tokens: tokens recorded at layer 0; window_seconds: time the counts cover.
    """

    load: np.ndarray
    transitions: SparsePairs
    coactivation: SparsePairs
    tokens: int
    window_seconds: float


class _Window:
    """Counters of one window, on the recorder's device."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device, pairs: bool, now: float):
        pair_bins = num_experts * num_experts if pairs else 0
        self.load = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.transitions = torch.zeros(max(num_layers - 1, 0), pair_bins, dtype=torch.int64, device=device)
        self.coactivation = torch.zeros(num_layers, pair_bins, dtype=torch.int64, device=device)
        self.tokens = 0
        self.started = now

    def clear(self, now: float) -> None:
        self.load.zero_()
        self.transitions.zero_()
        self.coactivation.zero_()
        self.tokens = 0
        self.started = now


class RoutingRecorder:
    """Counts the experts chosen per layer, on the device, in rolling windows.

    Call ``record(layer, topk_ids)`` for each MoE layer of a forward pass in layer order (or let
    ``attach`` do it). Transitions l -> l+1 are counted when layer l+1 is recorded right after layer
    l with the same number of tokens, which is what a forward pass does.

    Thread-safe: an engine may record from its thread while a server takes snapshots from another.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        device: torch.device | str = "cpu",
        window_seconds: float = 60.0,
        record_pairs: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_layers <= 0 or num_experts <= 0:
            raise PlacementError(f"recorder: need layers and experts > 0, got {num_layers}, {num_experts}")
        if window_seconds <= 0:
            raise PlacementError(f"window_seconds: {window_seconds} must be > 0")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.window_seconds = float(window_seconds)
        self.record_pairs = record_pairs
        self._clock = clock
        now = clock()
        self._current = _Window(num_layers, num_experts, self.device, record_pairs, now)
        self._previous: _Window | None = None
        self._lock = threading.Lock()
        # The ids recorded last, to pair them with the next layer's: (layer, ids [T, k]).
        self._last: tuple[int, torch.Tensor] | None = None
        self._pair_index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.hook_errors = 0
        self._logged_errors: set[str] = set()

    # -- recording ---------------------------------------------------------------------------

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count one layer's choices. topk_ids: [T, k] (or [..., k]) integer expert ids."""
        if not 0 <= layer < self.num_layers:
            raise PlacementError(f"layer: {layer} not in 0..{self.num_layers - 1}")
        ids = topk_ids.detach().reshape(-1, topk_ids.shape[-1]).to(self.device, torch.int64)
        with self._lock:
            self._roll(self._clock())
            window = self._current
            flat = ids.reshape(-1)
            window.load[layer].index_add_(0, flat, torch.ones_like(flat))
            if layer == 0:
                window.tokens += ids.shape[0]
            if self.record_pairs:
                self._count_pairs(window, layer, ids)
            self._last = (layer, ids)

    def _count_pairs(self, window: _Window, layer: int, ids: torch.Tensor) -> None:
        num_experts = self.num_experts
        first, second = self._pairs_of(ids.shape[1])
        if len(first):
            low = torch.minimum(ids[:, first], ids[:, second])
            high = torch.maximum(ids[:, first], ids[:, second])
            keys = (low * num_experts + high).reshape(-1)
            window.coactivation[layer].index_add_(0, keys, torch.ones_like(keys))
        last = self._last
        if last is not None and last[0] == layer - 1 and last[1].shape[0] == ids.shape[0]:
            keys = (last[1][:, :, None] * num_experts + ids[:, None, :]).reshape(-1)
            window.transitions[layer - 1].index_add_(0, keys, torch.ones_like(keys))

    def _pairs_of(self, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column indices (i, j), i < j, of the k x k choice pairs of one token, cached per k."""
        if top_k not in self._pair_index:
            first, second = torch.triu_indices(top_k, top_k, offset=1, device=self.device)
            self._pair_index[top_k] = (first, second)
        return self._pair_index[top_k]

    def _roll(self, now: float) -> None:
        age = now - self._current.started
        if age < self.window_seconds:
            return
        # Reuse the previous window's buffers for the new current one: no allocation per window.
        stale = self._previous
        self._previous = self._current
        if stale is None:
            self._current = _Window(
                self.num_layers, self.num_experts, self.device, self.record_pairs, now
            )
        else:
            stale.clear(now)
            self._current = stale
        if age >= 2 * self.window_seconds:
            # Nothing was recorded for a whole window: the old counts are out of the window too.
            self._previous.clear(now - self.window_seconds)
        self._last = None

    # -- reading -----------------------------------------------------------------------------

    def window_age_seconds(self) -> float:
        """Age of the current window."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            return now - self._current.started

    def snapshot(self, top_pairs: int = 256) -> RecorderSnapshot:
        """The counts of the previous and the current window; ``top_pairs`` largest pairs per layer
        (ties by the lower pair key). This is the one place that copies counters to the host."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            windows = [w for w in (self._previous, self._current) if w is not None]
            load = sum(w.load for w in windows)
            transitions = sum(w.transitions for w in windows)
            coactivation = sum(w.coactivation for w in windows)
            tokens = sum(w.tokens for w in windows)
            started = windows[0].started
        return RecorderSnapshot(
            load=load.cpu().numpy(),
            transitions=top_pairs_per_layer(transitions, self.num_experts, top_pairs),
            coactivation=top_pairs_per_layer(coactivation, self.num_experts, top_pairs),
            tokens=int(tokens),
            window_seconds=max(now - started, 0.0),
        )

    def reset(self) -> None:
        """Drop all counts and start a fresh window."""
        with self._lock:
            now = self._clock()
            self._current.clear(now)
            self._previous = None
            self._last = None

    # -- hooks -------------------------------------------------------------------------------

    def add_hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        """Keep a hook handle so that ``detach`` removes it."""
        self._hooks.append(handle)

    def hook_failed(self, layer: int, error: Exception) -> None:
        """Count a failure inside a forward hook; log the first of each kind."""
        kind = f"{type(error).__name__}: {error}"
        with self._lock:
            self.hook_errors += 1
            first = kind not in self._logged_errors
            self._logged_errors.add(kind)
        if first:
            logger.warning("recorder: layer %d not recorded (%s); the forward pass goes on", layer, kind)

    def detach(self) -> None:
        """Remove the forward hooks ``attach`` installed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def top_pairs_per_layer(counts: torch.Tensor, num_experts: int, top: int) -> SparsePairs:
    """The ``top`` largest non-zero pairs of each layer of counts [L', E*E] (ties: lower key first)."""
    if counts.numel() == 0 or top <= 0:
        return SparsePairs.empty()
    counts = counts.cpu().numpy()
    layers, firsts, seconds, values = [], [], [], []
    for layer, row in enumerate(counts):
        keys = np.nonzero(row)[0]
        if len(keys) > top:
            keys = keys[np.lexsort((keys, -row[keys]))[:top]]
        keys = np.sort(keys)
        layers.append(np.full(len(keys), layer, dtype=np.int64))
        firsts.append(keys // num_experts)
        seconds.append(keys % num_experts)
        values.append(row[keys].astype(np.float64))
    return SparsePairs(
        np.concatenate(layers), np.concatenate(firsts), np.concatenate(seconds), np.concatenate(values)
    )


# -- attaching to models -------------------------------------------------------------------------


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MoE blocks of a model in forward (registration) order: modules with ``gate`` and
    ``experts`` children. Dense layers (DeepSeek's first layers) have neither and are skipped, so
    index i is the i-th MoE layer, as in ``ModelShape.num_layers``."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(found + ".") for found, _ in blocks):
            continue
        children = dict(module.named_children())
        if "gate" in children and "experts" in children:
            blocks.append((name, module))
    return blocks


def _block_experts_and_top_k(block: nn.Module) -> tuple[int, int]:
    """(E, k) of a MoE block, from its gate or the block itself."""
    gate = block.gate
    num_experts = getattr(gate, "num_experts", None)
    if num_experts is None and isinstance(getattr(gate, "weight", None), torch.Tensor):
        num_experts = gate.weight.shape[0]
    top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None) or getattr(block.experts, "top_k", None)
    if num_experts is None or top_k is None:
        raise PlacementError(
            f"attach: cannot read the experts and top_k of {type(block).__name__} "
            "(expected gate.num_experts or gate.weight, and gate.top_k, block.top_k or experts.top_k)"
        )
    return int(num_experts), int(top_k)


@dataclass(frozen=True)
class Routing:
    """How a block turns its gate's logits into top-k choices, when the gate returns logits only.

    softmax: Mixtral, Qwen-MoE, DeepSeek-V2. sigmoid + correction bias [E] + group-limited top-k
    (top ``topk_group`` of ``num_groups`` groups, each scored by its two best experts): DeepSeek-V3,
    as vLLM's ``grouped_topk`` (vllm/model_executor/layers/fused_moe/router/grouped_topk_router.py)
    and Hugging Face's ``DeepseekV3TopkRouter`` compute it.
    """

    top_k: int
    scoring: str = "softmax"
    bias: torch.Tensor | None = None
    num_groups: int = 1
    topk_group: int = 1

    def topk_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [T, E] -> ids [T, k]."""
        logits = logits.reshape(-1, logits.shape[-1]).float()
        scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        if self.bias is not None:
            scores = scores + self.bias.to(scores.device, torch.float32)
        if self.num_groups > 1:
            tokens, experts = scores.shape
            grouped = scores.view(tokens, self.num_groups, experts // self.num_groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1) if self.bias is not None else grouped.amax(-1)
            chosen = torch.topk(group_scores, self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            scores = scores.masked_fill(~keep.repeat_interleave(experts // self.num_groups, dim=1), float("-inf"))
        return torch.topk(scores, self.top_k, dim=-1).indices


def _first_attr(objects: tuple[object, ...], *names: str) -> object:
    for candidate in objects:
        for name in names:
            value = getattr(candidate, name, None)
            if value is not None:
                return value
    return None


def routing_of(block: nn.Module, top_k: int) -> Routing:
    """The routing a block applies to its gate's logits: read from the gate, the experts and the
    experts' router (Hugging Face: ``gate.{num_group, topk_group, e_score_correction_bias}``; vLLM:
    ``gate.e_score_correction_bias``, ``experts.router.{num_expert_group, topk_group, scoring_func}``)."""
    experts = getattr(block, "experts", None)
    parts = (block.gate, experts, getattr(experts, "router", None), block)
    bias = _first_attr(parts, "e_score_correction_bias")
    scoring = _first_attr(parts, "scoring_func") or ("sigmoid" if bias is not None else "softmax")
    num_groups = _first_attr(parts, "num_expert_group", "num_group", "n_group") or 1
    topk_group = _first_attr(parts, "topk_group") or num_groups
    return Routing(
        top_k=top_k, scoring=str(scoring), bias=bias if isinstance(bias, torch.Tensor) else None,
        num_groups=int(num_groups), topk_group=int(topk_group),
    )


def topk_ids_of_gate_output(output: object, routing: Routing) -> torch.Tensor:
    """The [T, k] expert ids a gate's output stands for.

    Gates that choose (Hugging Face 5.x routers return (logits, weights, ids); DeepSeek's original
    code returns (ids, weights, aux)) give the ids themselves, so the recorder sees exactly what the
    model used. A gate that is a linear layer returns logits [T, E] (vLLM's ``ReplicatedLinear``:
    the tuple (logits, bias)); the ids are then the block's routing of them (``Routing``).
    """
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and not item.is_floating_point() and item.dim() >= 2:
                return item
        output = next((item for item in output if isinstance(item, torch.Tensor)), None)
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return routing.topk_ids(output)
    raise PlacementError(f"attach: the gate returned no expert ids nor logits ({type(output).__name__})")


def attach(
    model: nn.Module,
    recorder: RoutingRecorder | None = None,
    *,
    window_seconds: float = 60.0,
    record_pairs: bool = True,
    device: torch.device | str | None = None,
) -> RoutingRecorder:
    """Record what every MoE block of ``model`` routes, through forward hooks on their gates.

    Returns the recorder (a new one sized from the model unless one is given); ``recorder.detach()``
    removes the hooks. The recorder's device defaults to that of the model's first parameter.
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise PlacementError(
            f"attach: no MoE block (a module with 'gate' and 'experts' children) in {type(model).__name__}"
        )
    shapes = [_block_experts_and_top_k(block) for _, block in blocks]
    num_experts = shapes[0][0]
    if any(experts != num_experts for experts, _ in shapes):
        raise PlacementError(f"attach: MoE blocks differ in expert count: {sorted(set(shapes))}")
    if recorder is None:
        if device is None:
            first_parameter = next(model.parameters(), None)
            device = first_parameter.device if first_parameter is not None else "cpu"
        recorder = RoutingRecorder(
            len(blocks), num_experts, device=device, window_seconds=window_seconds, record_pairs=record_pairs
        )
    elif (recorder.num_layers, recorder.num_experts) != (len(blocks), num_experts):
        raise PlacementError(
            f"attach: recorder is {recorder.num_layers} x {recorder.num_experts}, "
            f"model has {len(blocks)} MoE layers x {num_experts} experts"
        )
    for layer, ((_, block), (_, top_k)) in enumerate(zip(blocks, shapes)):
        hook = _gate_hook(recorder, layer, routing_of(block, top_k))
        recorder.add_hook(block.gate.register_forward_hook(hook))
    return recorder


def _gate_hook(recorder: RoutingRecorder, layer: int, routing: Routing) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        try:
            with torch.no_grad():
                recorder.record(layer, topk_ids_of_gate_output(output, routing))
        except Exception as error:  # noqa: BLE001 - the host's forward pass must never fail here
            recorder.hook_failed(layer, error)

    return hook
