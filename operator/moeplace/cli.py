"""``moeplace``: subcommands registered by each package.

Each package's ``cli.register(subparsers)`` adds its subcommands with ``set_defaults(func=...)``;
``func(args) -> int`` is the exit status. Packages whose optional dependencies are missing (the agent
without torch) are left out, and their subcommands say how to install them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_placement.models import PlacementError

COMMAND_MODULES = ("moe_placement.cli", "moe_agent.cli", "moe_operator.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeplace", description="Expert placement for Mixture-of-Experts serving."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and error.name.startswith(module_name.split(".")[0]):
                continue
            missing = error.name
            stub = subparsers.add_parser(
                module_name.split(".")[0].removeprefix("moe_"),
                help=f"(unavailable: {missing} is not installed)",
            )
            stub.set_defaults(func=lambda _args, missing=missing: _unavailable(missing))
            continue
        module.register(subparsers)
    return parser


def _unavailable(missing: str) -> int:
    print(f"moeplace: this command needs {missing}: pip install 'moeplace[agent]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PlacementError as error:
        print(f"moeplace: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"moeplace: error: {error.filename}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
