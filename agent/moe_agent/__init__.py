"""In-pod agent (torch): routing recorder, token -> replica routers, expert weight store and migration
API, metrics exporter, and a replay engine. See docs/agent.md and docs/agent-api.md.

Imports ``moe_placement`` (the contracts and the reference routers), never the operator.
"""

import importlib
from typing import Any

# Resolved on first use (PEP 562): `moeplace` imports moe_agent.cli for every command, and importing
# torch there would cost seconds.
_EXPORTS = {
    "RecorderSnapshot": "moe_agent.recorder",
    "RoutingRecorder": "moe_agent.recorder",
    "attach": "moe_agent.recorder",
    "find_moe_blocks": "moe_agent.recorder",
    "TorchLayout": "moe_agent.router",
    "get_router": "moe_agent.router",
    "route_local_first": "moe_agent.router",
    "route_metro": "moe_agent.router",
    "route_random": "moe_agent.router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
