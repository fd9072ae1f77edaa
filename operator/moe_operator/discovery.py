"""Where a MoEDeployment's agents are: the agents Service's EndpointSlices (``discovery.k8s.io/v1``)
or, on API servers that do not serve that version (1.20 serves only v1beta1), its Endpoints; the
choice is made by API discovery, once per client.

The rank mapping, from either object:

* every port named ``rank-<r>`` is local rank ``r`` at that port;
* an address whose ``targetRef`` (or ``hostname``) names a pod is placed by the pod's name:

  - StatefulSet pods (the operator's engine, or a ``workloadRef`` StatefulSet) end in ``-<ordinal>``:
    node ``ordinal`` of group 0;
  - LeaderWorkerSet pods are named ``<lws>-<group>`` (the leader, worker 0) and
    ``<lws>-<group>-<worker>``: node ``worker`` of group ``group``. Each group is its own
    expert-parallel group with its own ranks; the operator applies one placement to every group.

  global rank = node * gpusPerNode + r, counted inside the group;
  The controller keys the agents of every group by ``group * GPUs + rank`` (``plan_runner.GroupLayout``,
  as many groups as the LeaderWorkerSet's ``spec.replicas``) and runs one migration on all of them;
* an address without a pod is node 0 of group 0: global rank = ``r`` (the local demo announces its
  agent processes as one address with ports ``rank-0`` .. ``rank-<G-1>``).

Only addresses that are ready count (a Service with ``publishNotReadyAddresses`` marks all ready).
Endpoints and EndpointSlices carry no pod labels, so the pod name is what places an agent; for
LeaderWorkerSets it is the name LWS gives the pod of ``group-index`` g and ``worker-index`` w.

The ``moeplace.io/agent-host`` annotation (agents on the operator's own machine, announced under a
placeholder address because Kubernetes refuses loopback addresses) redirects every address of the
object to the annotated host. It is honoured only when the operator runs with
``--agent-host-override``: otherwise whoever may write an Endpoints object could send the operator's
calls, and the deployment's token, to any host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_operator import builders, settings
from moe_operator.crd import ResolvedSpec, WorkloadRef
from moe_operator.kube import Kube
from moe_operator.plan_runner import GroupLayout

SLICES_GROUP = "discovery.k8s.io"
SLICES_VERSION = "v1"
_ORDINAL = re.compile(r"-(\d+)$")

AgentObjects = Literal["EndpointSlice", "Endpoints"]


class EndpointsError(ValueError):
    """The agents' Endpoints or EndpointSlices do not map to ranks cleanly (duplicate rank, bad port
    name, a pod that is not the workload's)."""


@dataclass(frozen=True)
class AgentGroups:
    """The announced agents: group -> global rank (inside the group) -> base URL ``http://ip:port``.

    A group is one expert-parallel group (one per LeaderWorkerSet replica; group 0 otherwise)."""

    source: AgentObjects
    groups: dict[int, dict[int, str]] = field(default_factory=dict)

    def group(self, index: int = 0) -> dict[int, str]:
        return self.groups.get(index, {})

    @property
    def count(self) -> int:
        return sum(len(agents) for agents in self.groups.values())

    def keyed(self, layout: GroupLayout) -> KeyedAgents:
        """The agents keyed as ``layout`` keys them (``group * ranks + rank``). One group announced as
        group 0: its ranks as they are (ranks beyond the GPUs included; the caller reports them).
        Otherwise an agent outside the layout (a rank beyond a group's GPUs, a group beyond the
        LeaderWorkerSet's replicas) is left out and named in ``stray``."""
        if layout.groups == 1 and set(self.groups) <= {0}:
            return KeyedAgents(dict(self.group(0)), layout)
        agents: dict[int, str] = {}
        stray = []
        for group, ranks in sorted(self.groups.items()):
            for rank, url in sorted(ranks.items()):
                if group < layout.groups and rank < layout.ranks:
                    agents[layout.key(group, rank)] = url
                else:
                    stray.append(f"group {group} rank {rank}")
        return KeyedAgents(agents, layout, tuple(stray))


@dataclass(frozen=True)
class KeyedAgents:
    """Agents keyed by ``layout`` (key -> base URL), and the announced agents it has no key for."""

    agents: dict[int, str]
    layout: GroupLayout
    stray: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Address:
    ip: str
    pod: str


def pod_position(pod: str, workload: WorkloadRef | None) -> tuple[int, int] | None:
    """(group, node) of the pod named ``pod``; None when the name carries no position (ranks are then
    global). Raises EndpointsError for a pod a LeaderWorkerSet cannot have made."""
    if workload is not None and workload.kind == "LeaderWorkerSet":
        prefix = f"{workload.name}-"
        parts = pod[len(prefix):].split("-") if pod.startswith(prefix) else []
        if len(parts) in (1, 2) and all(part.isdigit() for part in parts):
            return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0
        raise EndpointsError(
            f"pod {pod!r} is not named as LeaderWorkerSet {workload.name} names its pods "
            f"({workload.name}-<group> or {workload.name}-<group>-<worker>)"
        )
    match = _ORDINAL.search(pod)
    return (0, int(match.group(1))) if match else None


def _rank_ports(ports: Iterable[Mapping[str, Any]]) -> list[tuple[int, int]]:
    found = []
    for port in ports:
        name = port.get("name") or ""
        if not name.startswith(builders.RANK_PORT_PREFIX):
            continue
        local = name[len(builders.RANK_PORT_PREFIX):]
        if not local.isdigit():
            raise EndpointsError(f"port {name!r}: expected rank-<integer>")
        found.append((int(local), int(port["port"])))
    return found


def _host_override(obj: Mapping[str, Any] | None) -> str | None:
    if not settings.current().agent_host_override:
        return None
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(builders.ANNOTATION_AGENT_HOST)


def _place(
    groups: dict[int, dict[int, str]],
    addresses: Sequence[_Address],
    ports: Sequence[tuple[int, int]],
    gpus_per_node: int,
    workload: WorkloadRef | None,
    host_override: str | None,
) -> None:
    for address in addresses:
        position = pod_position(address.pod, workload) if address.pod else None
        group, node = position if position is not None else (0, 0)
        ip = host_override or address.ip
        host = f"[{ip}]" if ":" in ip else ip
        for local, port in ports:
            rank = node * gpus_per_node + local if position is not None else local
            url = f"http://{host}:{port}"
            agents = groups.setdefault(group, {})
            if agents.get(rank, url) != url:
                where = f"group {group} rank {rank}" if workload is not None and workload.kind == "LeaderWorkerSet" else f"rank {rank}"
                raise EndpointsError(f"{where} announced twice ({agents[rank]} and {url})")
            agents[rank] = url


def _pod_of(entry: Mapping[str, Any]) -> str:
    return (entry.get("targetRef") or {}).get("name") or entry.get("hostname") or ""


def agents_from_endpoints(
    endpoints: Mapping[str, Any] | None, gpus_per_node: int, workload: WorkloadRef | None = None
) -> AgentGroups:
    """The agents announced in a v1 Endpoints object (ready ``addresses`` only)."""
    groups: dict[int, dict[int, str]] = {}
    override = _host_override(endpoints)
    for subset in (endpoints or {}).get("subsets") or []:
        addresses = [_Address(a["ip"], _pod_of(a)) for a in subset.get("addresses") or []]
        _place(groups, addresses, _rank_ports(subset.get("ports") or []), gpus_per_node, workload, override)
    return AgentGroups("Endpoints", groups)


def agents_from_endpoint_slices(
    slices: Sequence[Mapping[str, Any]], gpus_per_node: int, workload: WorkloadRef | None = None
) -> AgentGroups:
    """The agents announced in a Service's EndpointSlices (ready endpoints only). Dual-stack Services
    have one slice family per address type: the IPv4 slices are used when there are any."""
    families = {s.get("addressType") for s in slices}
    family = "IPv4" if "IPv4" in families else "IPv6"
    groups: dict[int, dict[int, str]] = {}
    for piece in slices:
        if piece.get("addressType") != family:
            continue
        addresses = [
            _Address(entry["addresses"][0], _pod_of(entry))
            for entry in piece.get("endpoints") or []
            if entry.get("addresses") and (entry.get("conditions") or {}).get("ready") is not False
        ]
        override = _host_override(piece)
        _place(groups, addresses, _rank_ports(piece.get("ports") or []), gpus_per_node, workload, override)
    return AgentGroups("EndpointSlice", groups)


async def agent_objects(kube: Kube) -> AgentObjects:
    """EndpointSlice when the server serves ``discovery.k8s.io/v1``, else Endpoints."""
    return "EndpointSlice" if SLICES_VERSION in await kube.served_versions(SLICES_GROUP) else "Endpoints"


async def discover_agents(kube: Kube, namespace: str, name: str, resolved: ResolvedSpec) -> AgentGroups:
    """The agents of MoEDeployment ``namespace/name``, from its agents Service's EndpointSlices or
    Endpoints (chosen by ``agent_objects``)."""
    service = builders.agents_service_name(name)
    gpus = resolved.topology.gpus_per_node
    workload = resolved.spec.serving.workload_ref
    if await agent_objects(kube) == "EndpointSlice":
        return agents_from_endpoint_slices(await kube.list_endpoint_slices(namespace, service), gpus, workload)
    return agents_from_endpoints(await kube.get_endpoints(namespace, service), gpus, workload)
