"""Run the operator: ``moeplace operator`` and ``python -m moe_operator`` share these arguments."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("MOEPLACE_LIVENESS"),
        metavar="URL",
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("MOEPLACE_METRICS_PORT", "0")) or None,
        help="serve the operator's Prometheus metrics on this port (/metrics)",
    )
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address of the metrics server")
    parser.add_argument(
        "--prometheus-url",
        default=os.environ.get("MOEPLACE_PROMETHEUS_URL", "http://prometheus-operated.monitoring.svc:9090"),
        help="Prometheus of MoEDeployments whose spec.metrics.prometheusUrl is empty",
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("MOEPLACE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"], help="log level (default info)",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig (default: $KUBECONFIG, in-cluster)")
    parser.add_argument(
        "--agent-token-file",
        default=None,
        help="bearer token of the agents when a MoEDeployment names no tokenSecretRef",
    )
    parser.add_argument(
        "--solver-workers",
        type=int,
        default=None,
        help="solver worker processes (0: a thread of the operator; default 1)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging (= --log-level debug)")


def run(args: argparse.Namespace) -> int:
    """Start kopf with the moeplace handlers; returns when the operator stops."""
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.agent_token_file:
        os.environ["MOEPLACE_AGENT_TOKEN_FILE"] = args.agent_token_file
    if args.solver_workers is not None:
        os.environ["MOEPLACE_SOLVER_WORKERS"] = str(args.solver_workers)
    os.environ["MOEPLACE_PROMETHEUS_URL"] = args.prometheus_url
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import warnings

    import urllib3

    # A kubeconfig with insecure-skip-tls-verify (the local control plane) warns on every request.
    warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    import kopf

    from moe_operator import handlers  # noqa: F401 - registers the handlers
    from moe_operator import metrics

    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    namespaces = list(args.namespace or [])
    try:
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness,
        )
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_operator", description="Run the moeplace operator.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
