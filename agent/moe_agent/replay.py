"""Replay engine: a routing trace (or the synthetic generator) played through the live placement.

Every agent of an EP group replays the same token stream, cut into the same batches at the same
moments: batch i holds stream tokens i*B .. i*B+B-1 and is due at ``start_time + (i+1) * B / rate``,
so agents given one ``start_time`` step in lockstep and route every batch identically. Each agent
routes the whole batch with its live placement (token t's attention rank is its sequence's index mod
G, or the home a request router chose: ``TokenStream.homes``) and does only its own share:

* counts the (layer, expert) pairs its slots serve (``moeplace_expert_tokens_total``: summed over
  the agents, the global load) and the slots it activates;
* runs its gates on the tokens its attention produced (``moe_agent.model``; the recorder, attached to
  the model, counts their loads, transitions and co-activation) and accounts the all-to-all bytes
  those tokens send, as ``moe_placement.cost`` does;
* runs the real expert FFNs of its slots, with the weights in its store, on up to
  ``forward_budget`` of the (token, choice) pairs routed to it per layer (a CPU budget; the counts
  above cover every pair).

When an activation changes the placement, the next batch is routed with it, so the metrics follow.
With a ``SignatureReporter``, the rank that ran a sequence reports its signature to the request
router when its last token has been replayed (``moe_agent.signatures``).

Shapes: L layers, B tokens per batch, k choices, E experts, G GPUs, S slots of this rank, H hidden.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from moe_placement.cost import DATA_FLOWS, DataFlow
from moe_placement.models import PlacementError
from moe_placement.traces import Trace
from moe_agent.agent import AgentCore, LiveView
from moe_agent.model import ReplayMoEModel
from moe_agent.router import get_router
from moe_agent.signatures import SignatureReporter

log = logging.getLogger("moe_agent.replay")

# Distinct hidden states the replay feeds its gates and experts (token t uses row t mod this).
HIDDEN_POOL = 512
# A batch more than this late is skipped rather than replayed (keeps the agent in real time).
MAX_LAG_SECONDS = 5.0


@dataclass(frozen=True)
class TokenStream:
    """An endless stream of tokens: a trace looped, or one trace until ``shift_at`` and another after
    (``alternate``: the two take turns, ``shift_at`` tokens each, for as long as the stream runs).

    Stream token p is trace token p mod T; its sequence number (for the attention rank) counts the
    sequences of the earlier loops too, so sequences spread over ranks the same way in every loop.
    A sequence's attention rank is its number mod G (round-robin, an engine's default), or with
    ``homes`` [S] (one trace, no shift: what a request router chose, ``moeplace route``'s
    ``home_gpu``) the home of the trace sequence it replays.
    """

    before: Trace
    after: Trace | None = None
    shift_at: int | None = None
    alternate: bool = False
    homes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.homes is None:
            return
        if self.after is not None or len(self.homes) != self.before.num_sequences:
            raise PlacementError(
                f"homes: {len(self.homes)} homes for a stream of {self.before.num_sequences} "
                "sequences of one trace (a home per sequence, no shift)"
            )

    def attention_rank(self, sequence: np.ndarray, num_gpus: int) -> np.ndarray:
        """Attention rank (home GPU) of stream sequence numbers [B]."""
        if self.homes is None:
            return sequence % num_gpus
        return np.asarray(self.homes)[sequence % self.before.num_sequences] % num_gpus

    def batch(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens start .. start+count-1: expert_ids [L, B, k] and sequence numbers [B]."""
        position = np.arange(start, start + count)
        if self.after is None or self.shift_at is None:
            return _take(self.before, position)
        if self.alternate:
            early = (position // self.shift_at) % 2 == 0
            offset = 0
        else:
            early = position < self.shift_at
            offset = self.shift_at
        ids_before, seq_before = _take(self.before, position[early])
        ids_after, seq_after = _take(self.after, position[~early] - offset)
        return (
            np.concatenate([ids_before, ids_after], axis=1),
            np.concatenate([seq_before, seq_after]),
        )


    def finished(self, start: int, count: int) -> list[tuple[Trace, int, int]]:
        """Sequences whose last token is one of tokens start .. start+count-1: (trace, sequence of
        that trace, stream sequence number), in stream order."""
        position = np.arange(start, start + count)
        if self.after is None or self.shift_at is None:
            return _finished(self.before, position)
        early = (position // self.shift_at) % 2 == 0 if self.alternate else position < self.shift_at
        offset = 0 if self.alternate else self.shift_at
        return _finished(self.before, position[early]) + _finished(self.after, position[~early] - offset)


def _finished(trace: Trace, position: np.ndarray) -> list[tuple[Trace, int, int]]:
    loop, token = np.divmod(position, trace.num_tokens)
    sequence = trace.sequence_of_token()[token]
    last = trace.seq_offsets[sequence + 1] - 1 == token
    numbers = loop[last] * trace.num_sequences + sequence[last]
    return [(trace, int(s), int(n)) for s, n in zip(sequence[last], numbers)]


def _take(trace: Trace, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    loop, token = np.divmod(position, trace.num_tokens)
    sequence = loop * trace.num_sequences + trace.sequence_of_token()[token]
    return trace.expert_ids[:, token], sequence


@dataclass
class StepResult:
    """What one replayed batch did on this rank (host values, for logs and tests).

    served: [L, E] pairs this rank's slots served; activated: [L] distinct slots used;
    own_tokens: tokens of this rank's attention; forward_pairs: pairs the expert FFNs ran on.
    """

    served: np.ndarray
    activated: np.ndarray
    own_tokens: int
    cross_gpu_bytes: float
    cross_node_bytes: float
    forward_pairs: int


class ReplayEngine:
    """Replays a token stream on one rank. ``step(i)`` does batch i; ``run`` paces them in real time."""

    def __init__(
        self,
        core: AgentCore,
        model: ReplayMoEModel,
        stream: TokenStream,
        *,
        tokens_per_second: float,
        batch_tokens: int = 256,
        router: str = "metro",
        seed: int = 0,
        start_time: float | None = None,
        forward_budget: int = 8,
        data_flow: DataFlow = "home",
        reporter: SignatureReporter | None = None,
    ) -> None:
        if tokens_per_second <= 0 or batch_tokens <= 0:
            raise ValueError("tokens_per_second and batch_tokens must be > 0")
        self.core = core
        self.model = model
        self.stream = stream
        self.tokens_per_second = float(tokens_per_second)
        self.batch_tokens = batch_tokens
        self.router_name = router
        self.router = get_router(router)
        if data_flow not in DATA_FLOWS:
            raise ValueError(f"data_flow: {data_flow!r} is not one of {', '.join(DATA_FLOWS)}")
        self.data_flow = data_flow
        self.seed = seed
        self.start_time = time.time() if start_time is None else float(start_time)
        self.forward_budget = forward_budget
        self.reporter = reporter
        device = core.device
        generator = torch.Generator().manual_seed(seed)
        self._hidden = torch.randn(HIDDEN_POOL, core.shape.hidden_size, generator=generator).to(device)
        topology = core.topology
        self._node_of_gpu = torch.arange(topology.num_gpus, device=device) // topology.gpus_per_node
        # Bytes of one (token, GPU) or (token, node) transfer, dispatch and combine (cost model's).
        self._transfer_bytes = 2.0 * core.shape.token_bytes

    # -- one batch -------------------------------------------------------------------------------

    def _uniform(self, batch_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The batch's uniform draws, the same on every agent."""
        digest = hashlib.sha256(f"moeplace-replay:{self.seed}:{batch_index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(self.core.device)

    def _route(self, view: LiveView, ids: torch.Tensor, attention_gpu: torch.Tensor, uniform: torch.Tensor):
        """Slots [L, B, k] and each layer's source GPU [L, B], as in the cost model: the attention
        rank at every layer (``home``), or at layer 0 and then the GPU of the token's first choice
        at the layer before (``follow``)."""
        layout = view.layout
        num_layers = ids.shape[0]
        if self.data_flow == "home":
            sources = attention_gpu.expand(num_layers, -1)
            return self.router(layout, ids, sources, uniform), sources
        if self.router_name == "local_first":
            # Its choice depends on where the token is, which depends on the previous layer's.
            slots, sources, source = [], [], attention_gpu
            for layer in range(num_layers):
                sources.append(source)
                routed = self.router(layout.layer(layer), ids[layer : layer + 1], source[None], uniform[layer : layer + 1])
                slots.append(routed[0])
                source = layout.gpu_of_slot[routed[0, :, 0]]
            return torch.stack(slots), torch.stack(sources)
        slots = self.router(layout, ids, attention_gpu.expand(num_layers, -1), uniform)
        first_gpu = layout.gpu_of_slot[slots[:, :, 0]]
        return slots, torch.cat([attention_gpu[None], first_gpu[:-1]])

    def step(self, batch_index: int) -> StepResult:
        """Replay batch ``batch_index`` on this rank."""
        core = self.core
        view = core.live
        rank, num_gpus = core.rank, core.topology.num_gpus
        slots_per_gpu = core.topology.slots_per_gpu
        device = core.device
        start = batch_index * self.batch_tokens
        ids_np, sequence = self.stream.batch(start, self.batch_tokens)
        ids = torch.as_tensor(ids_np, device=device)
        num_layers, batch, top_k = ids.shape
        attention_gpu = torch.as_tensor(self.stream.attention_rank(sequence, num_gpus), device=device)
        slots, sources = self._route(view, ids, attention_gpu, self._uniform(batch_index, (num_layers, batch, top_k)))
        gpu_of_slot = view.layout.gpu_of_slot
        destination = gpu_of_slot[slots]  # [L, B, k]

        # This rank's slots: the pairs they serve, per expert, and the distinct slots activated.
        on_me = destination == rank
        served = torch.zeros(num_layers, core.shape.num_experts, dtype=torch.int64, device=device)
        served.scatter_add_(1, ids.reshape(num_layers, -1), on_me.reshape(num_layers, -1).to(torch.int64))
        local_slot = (slots - rank * slots_per_gpu).clamp(0, slots_per_gpu - 1)
        slot_pairs = torch.zeros(num_layers, slots_per_gpu, dtype=torch.int64, device=device)
        slot_pairs.scatter_add_(1, local_slot.reshape(num_layers, -1), on_me.reshape(num_layers, -1).to(torch.int64))
        activated = (slot_pairs > 0).sum(dim=1)

        # This rank's attention: gates (recorded through the hooks) and all-to-all bytes.
        mine = attention_gpu == rank
        own_tokens = int(mine.sum())
        cross_gpu = cross_node = 0.0
        if own_tokens:
            own_index = torch.nonzero(mine).squeeze(1)
            hidden = self._hidden[(start + own_index) % HIDDEN_POOL]
            for layer, block in enumerate(self.model.layers):
                block.gate(hidden, forced_ids=ids[layer, own_index])
            cross_gpu, cross_node = self._cross_bytes(destination[:, own_index], sources[:, own_index], num_gpus)

        forward_pairs = self._forward(view, ids, on_me, local_slot, start)
        result = StepResult(
            served=served.cpu().numpy(),
            activated=activated.cpu().numpy(),
            own_tokens=own_tokens,
            cross_gpu_bytes=cross_gpu,
            cross_node_bytes=cross_node,
            forward_pairs=forward_pairs,
        )
        core.metrics.add_step(result.served, result.activated, own_tokens, cross_gpu, cross_node)
        if self.reporter is not None:
            for trace, sequence, number in self.stream.finished(start, self.batch_tokens):
                # The rank whose attention ran the request reports it.
                if self.stream.attention_rank(np.array([number]), num_gpus)[0] == rank:
                    self.reporter.report(trace, sequence)
        return result

    def _cross_bytes(self, destination: torch.Tensor, source: torch.Tensor, num_gpus: int) -> tuple[float, float]:
        """All-to-all bytes of tokens with destination GPUs [L, b, k] leaving source GPUs [L, b].

        A token goes once to each GPU it needs and once to each other node, there to the GPU with its
        source's local index, which forwards it over NVLink (the cost model's rail-aligned DeepEP
        accounting): cross-GPU transfers = distinct remote (token, GPU) pairs plus one relay hop per
        needed node whose relay GPU is not itself a destination; cross-node transfers = distinct
        (token, remote node) pairs.
        """
        num_layers, tokens, _ = destination.shape
        needs = torch.zeros(num_layers, tokens, num_gpus, dtype=torch.bool, device=destination.device)
        needs.scatter_(2, destination, True)
        gpu = torch.arange(num_gpus, device=destination.device)
        remote = needs & (gpu != source[..., None])
        # GPUs of a node are consecutive: a node is needed when any of its GPUs is.
        num_nodes = self.core.topology.num_nodes
        node_needs = remote.reshape(num_layers, tokens, num_nodes, -1).any(dim=-1)
        source_node = self._node_of_gpu[source]
        node_needs &= torch.arange(num_nodes, device=destination.device) != source_node[..., None]
        gpus_per_node = self.core.topology.gpus_per_node
        relay = torch.arange(num_nodes, device=destination.device) * gpus_per_node + (source % gpus_per_node)[..., None]
        relay_hops = node_needs & ~needs.gather(2, relay)
        return (
            float(remote.sum() + relay_hops.sum()) * self._transfer_bytes,
            float(node_needs.sum()) * self._transfer_bytes,
        )

    def _forward(
        self, view: LiveView, ids: torch.Tensor, on_me: torch.Tensor, local_slot: torch.Tensor, start: int
    ) -> int:
        """Expert FFNs of this rank's slots on up to ``forward_budget`` routed pairs per layer."""
        pairs = 0
        top_k = ids.shape[2]
        for layer, block in enumerate(self.model.layers):
            flat = torch.nonzero(on_me[layer].reshape(-1)).squeeze(1)[: self.forward_budget]
            if flat.numel() == 0:
                continue
            token = flat // top_k
            hidden = self._hidden[(start + token) % HIDDEN_POOL]
            weight = torch.full((flat.numel(),), 1.0 / top_k, device=hidden.device)
            block.experts(hidden, local_slot[layer].reshape(-1)[flat], weight, view.slot_weights[layer])
            pairs += flat.numel()
        return pairs

    # -- pacing ----------------------------------------------------------------------------------

    def batch_due(self, batch_index: int) -> float:
        """Wall-clock time (epoch seconds) at which batch ``batch_index`` is complete."""
        return self.start_time + (batch_index + 1) * self.batch_tokens / self.tokens_per_second

    def current_batch(self, now: float) -> int:
        """The batch being produced at ``now`` (the first one not yet due)."""
        elapsed = max(now - self.start_time, 0.0)
        return int(elapsed * self.tokens_per_second // self.batch_tokens)

    def run(self, stop: threading.Event) -> None:
        """Replay batches as they fall due until ``stop`` is set."""
        batch_index = self.current_batch(time.time())
        while not stop.is_set():
            wait = self.batch_due(batch_index) - time.time()
            if wait > 0:
                stop.wait(wait)
                continue
            if -wait > MAX_LAG_SECONDS:
                caught_up = self.current_batch(time.time())
                log.warning("replay: %d s behind; skipping %d batches", int(-wait), caught_up - batch_index)
                batch_index = caught_up
                continue
            try:
                self.step(batch_index)
            except Exception:  # a bad step must not kill the agent; the log says why
                log.exception("replay: batch %d failed", batch_index)
            batch_index += 1
