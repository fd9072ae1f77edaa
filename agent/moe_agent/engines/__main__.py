"""``python -m moe_agent.engines sidecar|standin ...`` (see ``sidecar`` and ``standin``)."""

import argparse
import logging
import sys

from moe_agent.engines import sidecar, standin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_agent.engines")
    commands = parser.add_subparsers(dest="command", required=True)
    sidecar.add_arguments(commands.add_parser("sidecar", help="serve one rank's engine status and loads"))
    standin.add_arguments(commands.add_parser("standin", help="a stand-in engine with its sidecars (tests)"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return sidecar.run(args) if args.command == "sidecar" else standin.run(args)


sys.exit(main())
