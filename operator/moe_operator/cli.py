"""``moeplace`` subcommands of the operator package; each just wires argparse to a library function."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``moeplace operator`` and ``moeplace crd`` to the top-level ``moeplace`` parser."""
    from moe_operator import run as operator_run

    operator_parser = subparsers.add_parser(
        "operator", help="run the MoEDeployment operator (kopf) against $KUBECONFIG or in-cluster"
    )
    operator_run.add_arguments(operator_parser)
    operator_parser.set_defaults(func=operator_run.run)
    crd_parser = subparsers.add_parser("crd", help="print the MoEDeployment CRD YAML (generated from the models)")
    crd_parser.add_argument("--output", "-o", help="write it to this file instead of stdout")
    crd_parser.add_argument(
        "--check", action="store_true", help="exit 1 when --output differs from the generated YAML"
    )
    crd_parser.add_argument(
        "--reference", action="store_true", help="print the spec's fields as a Markdown table instead"
    )
    crd_parser.set_defaults(func=_crd)


def _crd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_operator.crd import crd_yaml, manifest_reference

    if args.reference:
        sys.stdout.write(manifest_reference())
        return 0
    text = crd_yaml()
    if args.check:
        if not args.output:
            print("moeplace: error: --check needs --output FILE", file=sys.stderr)
            return 2
        path = Path(args.output)
        if not path.exists() or path.read_text() != text:
            print(f"moeplace: {path} differs from the models: run `moeplace crd -o {path}`", file=sys.stderr)
            return 1
        return 0
    if args.output:
        Path(args.output).write_text(text)
        print(f"moeplace: wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0
