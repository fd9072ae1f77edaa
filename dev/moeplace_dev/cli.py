"""``moeplace`` subcommands of the local dev stack: ``cluster up | env | down``, ``demo`` and
``demo-router``."""

from __future__ import annotations

import argparse
import sys

from moeplace_dev import cluster, demo, router_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``moeplace cluster``, ``moeplace demo`` and ``moeplace demo-router`` to the top-level
    ``moeplace`` parser."""
    cluster_parser = subparsers.add_parser(
        "cluster", help="run a local kube-apiserver + etcd + Prometheus on loopback"
    )
    actions = cluster_parser.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start the local cluster in the background (no-op if it is up)")
    up.add_argument(
        "--use-existing-kubeconfig",
        action="store_true",
        help="keep $KUBECONFIG instead of starting an apiserver "
        f"(or set {cluster.USE_EXISTING_KUBECONFIG_ENV}=1)",
    )
    up.set_defaults(func=_cluster_up)
    env = actions.add_parser(
        "env", help='print shell exports for the running cluster: eval "$(moeplace cluster env)"'
    )
    env.set_defaults(func=_cluster_env)
    down = actions.add_parser("down", help="stop the local cluster and delete its data")
    down.set_defaults(func=_cluster_down)
    demo.register(subparsers)
    router_demo.register(subparsers)


def _fail(error: cluster.ClusterError) -> int:
    print(f"moeplace: error: {error}", file=sys.stderr)
    return 1


def _cluster_up(args: argparse.Namespace) -> int:
    try:
        use_existing = args.use_existing_kubeconfig or cluster.use_existing_kubeconfig_from_env()
        state, started = cluster.cluster_up(use_existing_kubeconfig=use_existing)
    except cluster.ClusterError as error:
        return _fail(error)
    if not started:
        print(f"moeplace: cluster already up (state in {cluster.state_file()}); nothing to do")
        return 0
    if state["server"]:
        print(f"moeplace: kube-apiserver {state['server']}")
    else:
        print(f"moeplace: using existing KUBECONFIG={state['kubeconfig']}")
    print(f"moeplace: prometheus {state['prometheus']['url']}")
    print('moeplace: run  eval "$(moeplace cluster env)"  to use it')
    return 0


def _cluster_env(args: argparse.Namespace) -> int:
    try:
        state = cluster.read_state()
        if state is None:
            raise cluster.ClusterError("no local cluster is up: run `moeplace cluster up`")
        if not cluster.is_up(state):
            raise cluster.ClusterError(
                "the local cluster has stopped running: `moeplace cluster up` restarts it"
            )
    except cluster.ClusterError as error:
        return _fail(error)
    print("\n".join(cluster.cluster_env_lines(state)))
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    try:
        was_up = cluster.cluster_down()
    except cluster.ClusterError as error:
        return _fail(error)
    print("moeplace: cluster stopped" if was_up else "moeplace: no local cluster was up")
    return 0
