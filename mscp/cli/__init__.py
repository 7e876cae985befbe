"""The `mscp` command line: one module per command, each with `HELP`, `add_arguments(parser)` and
`run(args)`. Building the parser imports no torch, so `mscp --help` is instant.

Bad input ends with one line on stderr, `mscp: error: ...`, and exit code 2; nothing is written.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mscp.errors import MSCPError

COMMANDS = ("patch", "continual", "eval", "demo", "organism", "synth", "bench")


class _Parser(argparse.ArgumentParser):
    """Usage errors become MSCPError: one line, exit code 2, like every other bad input."""

    def error(self, message):
        raise MSCPError(f"{self.prog.removeprefix('mscp ')}: {message}" if self.prog != "mscp" else message)


def build_parser() -> argparse.ArgumentParser:
    from mscp import __version__

    parser = _Parser(prog="mscp", description="Training-free safety repair of LoRA adapters (MSCP).")
    parser.add_argument("--version", action="version", version=f"mscp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                help="one of the commands below; mscp COMMAND --help tells more")
    for name in COMMANDS:
        module = importlib.import_module(f"mscp.cli.{name}" if name != "eval" else "mscp.cli.eval")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from mscp.core.streaming import mmap_large_allocations

        mmap_large_allocations()  # resident memory flat in depth (streaming.py)
        return args.run(args)
    except MSCPError as e:
        print(f"mscp: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions...: not bad input, but still one line
        print(f"mscp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mscp: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
