"""Signatures of finished requests, reported to the request router (``moeplace router``).

When a replayed sequence (one request) finishes on this rank, the agent reports its routed experts
as a signature [L, E] (each layer sums to k) with its prompt to ``POST /router/v1/signatures``, so
the router learns online which prompts use which experts. A trace holds no token ids, so the replay
names a prompt by what stands for its tokens: the experts its first half chose at layer 0 (the
first gate sees little more than the token itself). Reports go from a background thread, through a
bounded queue: the replay never waits on the router, and a report that finds the queue full or the
router down is counted and dropped (the router learns from the next ones).

Shapes: L layers, E experts, T tokens, k choices.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from moe_placement.grouping import expert_signature
from moe_placement.traces import Trace

log = logging.getLogger("moe_agent.signatures")

PROMPT_FRACTION = 0.5  # of a sequence's tokens that stand for its prompt


def request_report(trace: Trace, sequence: int) -> dict:
    """The report of sequence ``sequence`` of ``trace``: its signature [L][E] over all its tokens,
    and its prompt's stand-in token ids (layer-0 choices of its first ``PROMPT_FRACTION``)."""
    start, stop = int(trace.seq_offsets[sequence]), int(trace.seq_offsets[sequence + 1])
    ids = trace.expert_ids[:, start:stop]
    prompt = ids[0, : max(int(round((stop - start) * PROMPT_FRACTION)), 1)]
    return {
        "signature": expert_signature(ids, trace.num_experts).tolist(),
        "prompt": prompt.ravel().tolist(),
    }


@dataclass
class ReportCounts:
    sent: int = 0
    dropped: int = 0
    failed: int = 0


class SignatureReporter:
    """Posts reports to ``<router_url>/router/v1/signatures`` from a daemon thread."""

    def __init__(self, router_url: str, timeout_s: float = 5.0, max_queued: int = 1024) -> None:
        self.url = router_url.rstrip("/") + "/router/v1/signatures"
        self.timeout_s = timeout_s
        self.counts = ReportCounts()
        self._queue: queue.Queue[dict | None] = queue.Queue(max_queued)
        self._thread = threading.Thread(target=self._run, name="signatures", daemon=True)
        self._thread.start()

    def report(self, trace: Trace, sequence: int) -> None:
        """Queue the report of a finished sequence; never blocks."""
        try:
            self._queue.put_nowait(request_report(trace, sequence))
        except queue.Full:
            self.counts.dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop after the reports already queued."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (report := self._queue.get()) is not None:
            request = urllib.request.Request(
                self.url, data=json.dumps(report).encode(), method="POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s):
                    self.counts.sent += 1
            except (urllib.error.URLError, OSError) as error:
                self.counts.failed += 1
                if self.counts.failed in (1, 100) or self.counts.failed % 1000 == 0:
                    log.warning("signatures: %s: %s (%d failed)", self.url, error, self.counts.failed)

