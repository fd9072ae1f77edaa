"""In-pod agent (torch): routing recorder, token -> replica routers, expert weight store and migration
API, metrics exporter, and a replay engine. See docs/agent.md and docs/agent-api.md.

Imports ``moe_placement`` (the contracts and the reference routers), never the operator.
"""

from moe_agent.recorder import RecorderSnapshot, RoutingRecorder, attach, find_moe_blocks
from moe_agent.router import TorchLayout, get_router, route_local_first, route_metro, route_random

__all__ = [
    "RecorderSnapshot",
    "RoutingRecorder",
    "TorchLayout",
    "attach",
    "find_moe_blocks",
    "get_router",
    "route_local_first",
    "route_metro",
    "route_random",
]
