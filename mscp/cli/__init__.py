"""The `mscp` command line: one module per command, each with `HELP`, `add_arguments(parser)` and
`run(args)`. Building the parser imports no torch, so `mscp --help` is instant.

Bad input ends with one line on stderr, `mscp: error: ...`, and exit code 2; nothing is written.
SIGINT ends with exit code 130 and SIGTERM with 143, each after the same clean-up and with one
line saying what was written. (A signal in the first tenth of a second, while Python itself starts
and before `main` runs, gets Python's own handling; nothing has been written then.)
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings

from mscp.errors import MSCPError, MSCPWarning

COMMANDS = ("patch", "tune", "continual", "eval", "demo", "organism", "synth", "bench")


class _Parser(argparse.ArgumentParser):
    """Usage errors become MSCPError: one line, exit code 2, like every other bad input."""

    def error(self, message):
        raise MSCPError(f"{self.prog.removeprefix('mscp ')}: {message}" if self.prog != "mscp" else message)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so both unwind through the same clean-up."""


def _terminate(signum, frame):
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    from mscp import __version__

    from mscp.paths import CACHE_ROOT_HELP

    parser = _Parser(prog="mscp", description="Training-free safety repair of LoRA adapters (MSCP).",
                     epilog=f"Caches: {CACHE_ROOT_HELP}.")
    parser.add_argument("--version", action="version", version=f"mscp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                help="one of the commands below; mscp COMMAND --help tells more")
    for name in COMMANDS:
        module = importlib.import_module(f"mscp.cli.{name}" if name != "eval" else "mscp.cli.eval")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def one_line(text: str) -> str:
    """`text` with its line breaks escaped: an error names user data (tensor names, paths) verbatim."""
    lines = str(text).splitlines()
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return "\\n".join(lines)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, MSCPWarning):
        print(f"mscp: warning: {one_line(message)}", file=sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def _close_progress_bars() -> None:
    """Finish the progress bars still drawn (an error unwinds past their owners), so the error line
    that follows stands on its own line and no bar is redrawn after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _report_interrupt(e: KeyboardInterrupt, written_before: int) -> int:
    from mscp.core.atomic import written

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _close_progress_bars()
    done = written[written_before:]
    what = "nothing was written" if not done else f"wrote only {', '.join(str(p) for p in done)}"
    print(f"mscp: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; {what}", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def main(argv=None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    saved = {}
    for signum, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _terminate)):
        if in_main_thread and signal.getsignal(signum) is not signal.SIG_IGN:  # ignored stays ignored (nohup, &)
            saved[signum] = signal.signal(signum, handler)
    written_before = len(sys.modules["mscp.core.atomic"].written) if "mscp.core.atomic" in sys.modules else 0
    showwarning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        try:
            args = build_parser().parse_args(argv)
            from mscp.core.streaming import mmap_large_allocations

            mmap_large_allocations()  # resident memory flat in depth (streaming.py)
            return args.run(args)
        except MSCPError as e:
            _close_progress_bars()
            print(f"mscp: error: {one_line(e)}", file=sys.stderr)
            return 2
        except OSError as e:  # permissions, a vanished file...: not bad input, but still one line
            _close_progress_bars()
            print(f"mscp: error: {one_line(e)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            return _report_interrupt(e, written_before)
    except KeyboardInterrupt as e:  # a signal while an error above was being reported
        return _report_interrupt(e, written_before)
    finally:
        warnings.showwarning = showwarning
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
