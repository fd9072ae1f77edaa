"""``moeplace route`` (offline: home GPU of each request of a trace) and ``moeplace router`` (the
HTTP service). Both build their ``RequestRouter`` with ``build_router``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moe_placement.files import read_placement
from moe_placement.models import Placement, PlacementError
from moe_placement.presets import MODEL_PRESETS, model_shape, parse_topology
from moe_placement.request_routing import (
    LOAD_CAP,
    RequestRouter,
    domain_signatures_of_profile,
    route_prompts,
    tokens_per_gpu_imbalance,
)
from moe_placement.traces import load_profile, load_trace


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``route`` and ``router``."""
    route = subparsers.add_parser(
        "route", help="Home GPU (data-parallel rank) of each request of a trace of prompts."
    )
    _add_router_arguments(route)
    route.add_argument(
        "--requests", required=True, type=Path,
        help="native trace npz; each sequence holds one request's prompt tokens, in arrival order",
    )
    route.add_argument("--out", required=True, type=Path, help='JSON to write: {"home_gpu": [R]}')
    route.set_defaults(func=run_route)

    router = subparsers.add_parser(
        "router", help="HTTP request router in front of an engine's data-parallel ranks."
    )
    _add_router_arguments(router)
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8300)
    backends = router.add_mutually_exclusive_group(required=True)
    backends.add_argument(
        "--backend", help="one engine URL; the rank goes in the X-Data-Parallel-Rank header"
    )
    backends.add_argument(
        "--backends", help="comma-separated engine URLs, one per rank (rank order)"
    )
    router.add_argument(
        "--retry-after", type=float, default=5.0,
        help="seconds a backend that refused a connection is left out",
    )
    router.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a backend may take to answer"
    )
    router.set_defaults(func=run_router)


def _add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="deepseek-v2-lite",
        help=f"a preset ({', '.join(MODEL_PRESETS)}) or a ModelShape JSON file",
    )
    parser.add_argument("--topology", default="2x4", help="NODESxGPUS[:gpu], e.g. 2x4")
    parser.add_argument(
        "--placement", type=Path,
        help="placement JSON (moeplace's or SGLang's): which node hosts which experts",
    )
    parser.add_argument(
        "--profile", type=Path,
        help="trace or profile file of a past window whose domains the router starts from",
    )
    parser.add_argument(
        "--load-cap", type=float, default=LOAD_CAP,
        help="most outstanding tokens a rank may hold, as a multiple of the mean",
    )


def read_any_placement(path: Path, num_experts: int, num_gpus: int) -> Placement:
    """A placement from moeplace's JSON or SGLang's (``physical_to_logical_map`` only)."""
    document = json.loads(Path(path).read_text())
    if isinstance(document, dict) and "format" in document:
        return read_placement(path).placement()
    if not isinstance(document, dict) or "physical_to_logical_map" not in document:
        raise PlacementError(f"{path}: no physical_to_logical_map")
    mapping = np.asarray(document["physical_to_logical_map"])
    if mapping.ndim != 2 or mapping.shape[1] % num_gpus:
        raise PlacementError(
            f"{path}: physical_to_logical_map shape {mapping.shape} does not split over {num_gpus} GPUs"
        )
    return Placement(mapping, num_experts, mapping.shape[1] // num_gpus)


def build_router(args: argparse.Namespace) -> RequestRouter:
    """The router of the command line: model, topology, placement, starting domains."""
    model = model_shape(args.model)
    placement = None
    topology = parse_topology(args.topology, model.num_experts)
    if args.placement is not None:
        placement = read_any_placement(args.placement, model.num_experts, topology.num_gpus)
        topology = parse_topology(
            args.topology, model.num_experts, placement.num_slots - model.num_experts
        )
        placement.check_topology(model, topology)
    router = RequestRouter(
        topology, model.num_layers, model.num_experts, placement=placement, load_cap=args.load_cap
    )
    if args.profile is not None:
        profile = load_profile(args.profile, model=args.model)
        profile.check_model(model)
        _, signatures, tokens = domain_signatures_of_profile(profile)
        router.add_domains(signatures, tokens)
    return router


def run_route(args: argparse.Namespace) -> int:
    router = build_router(args)
    requests = load_trace(args.requests)
    if (requests.num_layers, requests.num_experts) != (router.num_layers, router.num_experts):
        raise PlacementError(
            f"requests: {requests.num_layers} layers x {requests.num_experts} experts, model "
            f"{args.model} has {router.num_layers} x {router.num_experts}"
        )
    homes = route_prompts(router, requests.expert_ids, requests.seq_offsets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"home_gpu": homes.tolist()}) + "\n")
    lengths = np.diff(requests.seq_offsets)
    print(
        f"{args.out}: {len(homes)} requests on {router.topology.num_gpus} GPUs, "
        f"{len(router.signatures)} domains, prompt tokens per GPU max/mean "
        f"{tokens_per_gpu_imbalance(homes, lengths, router.topology.num_gpus):.3f}"
    )
    return 0


def run_router(args: argparse.Namespace) -> int:
    from moe_router.service import BackendSet, serve

    router = build_router(args)
    num_ranks = router.topology.num_gpus
    if args.backend:
        backends = BackendSet.by_header(args.backend, num_ranks, args.retry_after)
    else:
        backends = BackendSet.by_url(args.backends.split(","), num_ranks, args.retry_after)
    serve(router, backends, args.host, args.port, args.timeout)
    return 0
