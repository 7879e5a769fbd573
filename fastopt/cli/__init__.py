"""The ``fastopt`` command line: ``fastopt COMMAND [options]`` (also ``python -m fastopt.cli``).

Each command is a module of this package with ``HELP`` (one line for the command list),
``DESCRIPTION`` and ``EPILOG`` (``--help`` text), ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`COMMANDS` lists them. A command adds itself by adding a line there (``train`` and
``predict`` will). Modules import their heavy dependencies inside ``run`` so ``fastopt --help``
stays fast.

Errors: bad input (an unknown name, a malformed ``key=value``, a missing or unreadable file, an
out-of-range number) raises :class:`UsageError`; ``main`` prints it as ONE line on stderr,
``fastopt COMMAND: error: ...``, and returns 2. A missing optional dependency
(:class:`MissingDependency`) returns 1, with one line saying what to install. Anything else is a
bug: one line and exit code 1 (``FASTOPT_DEBUG=1`` shows the traceback).
"""

import argparse
import importlib
import os
import re
import sys

__all__ = ["COMMANDS", "MissingDependency", "UsageError", "build_parser", "main"]

COMMANDS = (
    ("info", "fastopt.cli.info"),
    ("bench", "fastopt.cli.bench"),
    ("playground", "fastopt.cli.playground"),
    ("train", "fastopt.cli.train"),
    ("predict", "fastopt.cli.predict"),
)
"""(command, module) in the order ``fastopt --help`` lists them."""

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

_NEGATIVE_VALUE = re.compile(r"^-[\d.]")
_VALUE_OPTIONS = frozenset(("--start",))
"""Options whose value may start with '-' (``--start -5,-2``): argparse would take it for an
option, so ``main`` glues it on as ``--start=-5,-2``."""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2. ``prog`` (optional) names the
    command it belongs to (``fastopt bench``)."""

    def __init__(self, message, prog=None):
        super().__init__(message)
        self.prog = prog


class MissingDependency(Exception):
    """An optional dependency the command needs is not installed: one line, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')", prog=self.prog)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)

    def add_argument(self, action):
        super().add_argument(action)
        # argparse measures the command names one indent short: widen so they fit on one line
        for sub in getattr(action, "_choices_actions", ()):
            self._action_max_length = max(
                self._action_max_length, len(sub.metavar or sub.dest) + self._current_indent + 6
            )


def build_parser():
    from .. import __version__

    parser = ArgumentParser(
        prog="fastopt",
        description="fastopt: compiled-kernel optimizers with torch.optim semantics.",
        epilog="Run 'fastopt COMMAND --help' for a command's options.\n"
        "Exit codes: 0 success, 1 error (missing dependency, failure), 2 bad input.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"fastopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.DESCRIPTION,
            epilog=getattr(module, "EPILOG", None),
            formatter_class=_Formatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _glue_negative_values(argv):
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in _VALUE_OPTIONS and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _say(prog, kind, message):
    message = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: {kind}{message}", file=sys.stderr)


def main(argv=None):
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = _glue_negative_values(argv)
    prog = "fastopt"
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.command is not None:
            prog = f"fastopt {args.command}"
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{prog} --help')")
        if args.command is None:
            raise UsageError(
                "no command given; commands: "
                + ", ".join(n for n, _ in COMMANDS)
                + " (see 'fastopt --help')"
            )
        return int(args._run(args) or 0)
    except UsageError as exc:
        _say(exc.prog or prog, "error: ", exc)
        return EXIT_USAGE
    except MissingDependency as exc:
        _say(prog, "error: ", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say(prog, "", "interrupted")
        return 130
    except BrokenPipeError:
        # stdout closed early (fastopt bench | head): not an error worth a message
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_ERROR
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_ERROR)
    except Exception as exc:
        if os.environ.get("FASTOPT_DEBUG"):
            raise
        _say(
            prog,
            "internal error: ",
            f"{type(exc).__name__}: {exc} (FASTOPT_DEBUG=1 shows the traceback; please report it)",
        )
        return EXIT_ERROR


def split_list(text, what):
    """``"a,b, c"`` -> ``["a", "b", "c"]``; UsageError for an empty item."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UsageError(f"{what}: {text!r} is not a comma-separated list")
    return items


def require_matplotlib(what):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency(
            f"{what} needs matplotlib: pip install 'fastopt[plot]' (or pip install matplotlib)"
        ) from None
