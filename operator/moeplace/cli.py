"""``moeplace``: subcommands registered by each package.

Each package's ``cli.register(subparsers)`` adds its subcommands with ``set_defaults(func=...)``;
``func(args) -> int`` is the exit status. Registration imports no optional dependency (torch is
imported by the agent's command when it runs), so a missing one is reported when its command runs.
The local dev stack's commands (``cluster``, ``demo``) come from the ``moeplace-dev`` distribution of a
git checkout (``dev/``); where it is not installed, as in the operator image, they are absent.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from moe_placement.models import PlacementError

COMMAND_MODULES = ("moe_placement.cli", "moe_agent.cli", "moe_operator.cli", "moe_router.cli")
DEV_PACKAGE = "moeplace_dev"
OPTIONAL_DEPENDENCIES = {"torch": "agent", "safetensors": "agent"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every package's subcommands, or, given the ``command`` to run, the packages' up to the one
    that registers it (a command pays only for the imports of the packages before its own)."""
    parser = argparse.ArgumentParser(
        prog="moeplace", description="Expert placement for Mixture-of-Experts serving."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = list(COMMAND_MODULES)
    if importlib.util.find_spec(DEV_PACKAGE) is not None:
        modules.append(f"{DEV_PACKAGE}.cli")
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
        if command is not None and command in subparsers.choices:
            break
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    command = arguments[0] if arguments and not arguments[0].startswith("-") else None
    args = build_parser(command).parse_args(arguments)
    try:
        return int(args.func(args) or 0)
    except PlacementError as error:
        print(f"moeplace: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"moeplace: error: {error.filename}: no such file", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name not in OPTIONAL_DEPENDENCIES:
            raise
        extra = OPTIONAL_DEPENDENCIES[error.name]
        print(f"moeplace: error: this command needs {error.name}: pip install 'moeplace[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
