"""Run the operator: ``moeplace operator`` and ``python -m moe_operator`` share these arguments."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from moe_operator import settings


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
        "--inherited-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label every object the operator creates carries (repeatable), e.g. release=kube-prometheus-stack "
        "so that kube-prometheus-stack selects the per-deployment PodMonitor and PrometheusRule",
    )
    parser.add_argument(
        "--runbook-base-url",
        default=settings.DEFAULT_RUNBOOK_BASE_URL,
        metavar="URL",
        help="prefix of the runbook_url of the per-deployment alerts (default: the repository's docs/runbooks/)",
    )
    parser.add_argument(
        "--agent-host-override",
        action="store_true",
        help="honour the moeplace.io/agent-host annotation of agents' Endpoints (agents on the operator's own "
        "machine: the local demo and tests). Off by default: it lets whoever writes Endpoints redirect the "
        "operator's calls, and a deployment's agent token, to any host",
    )
    tls = parser.add_argument_group("Prometheus TLS and authentication")
    tls.add_argument(
        "--prometheus-ca-file", default=None, metavar="PEM",
        help="CA bundle an https Prometheus's certificate must chain to (default: the system's CAs)",
    )
    tls.add_argument(
        "--prometheus-insecure-skip-verify", action="store_true",
        help="accept any certificate from an https Prometheus (not recommended)",
    )
    tls.add_argument(
        "--prometheus-bearer-token-file", default=None, metavar="FILE",
        help="send this file's token as Authorization: Bearer (re-read on every query) to --prometheus-url's "
        "server only, never to a MoEDeployment's own spec.metrics.prometheusUrl",
    )
    tls.add_argument(
        "--prometheus-service-account-auth", action="store_true",
        help=f"authenticate with the pod's service-account token ({settings.SERVICE_ACCOUNT_TOKEN}), as "
        "thanos-querier and OpenShift monitoring expect; without --prometheus-ca-file the CA is the "
        "service-ca.crt next to that token when present (OpenShift), else the system's CAs",
    )
    parser.add_argument(
        "--solver-workers",
        type=int,
        default=None,
        help="solver worker processes (0: a thread of the operator; default 1)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging (= --log-level debug)")


def settings_from_args(args: argparse.Namespace) -> settings.OperatorSettings:
    """The operator-wide settings of parsed flags; ValueError names the bad flag value."""
    bearer = args.prometheus_bearer_token_file
    ca_file = args.prometheus_ca_file
    if args.prometheus_service_account_auth:
        bearer = bearer or settings.SERVICE_ACCOUNT_TOKEN
        service_ca = os.path.join(os.path.dirname(settings.SERVICE_ACCOUNT_TOKEN), "service-ca.crt")
        if ca_file is None and os.path.exists(service_ca):
            ca_file = service_ca
    return settings.build_settings(
        inherited_labels=settings.parse_label_pairs(args.inherited_label),
        runbook_base_url=args.runbook_base_url,
        agent_host_override=args.agent_host_override,
        prometheus_url=args.prometheus_url,
        prometheus={
            "ca_file": ca_file,
            "insecure_skip_verify": args.prometheus_insecure_skip_verify,
            "bearer_token_file": bearer,
        },
    )


def run(args: argparse.Namespace) -> int:
    """Start kopf with the moeplace handlers; returns when the operator stops."""
    try:
        settings.configure(settings_from_args(args))
    except ValueError as error:
        print(f"moeplace operator: {error}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
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
