"""`fewstep` command line: parsing and wiring only; every algorithm lives in the library.

One module per group of commands (`methods`: train and distill, from the registry; `models`: sample, info,
eval, classifier, compare, interpolate; `bench`: bench and demo; `interop`: import and export), each with a
`register(sub)` that adds its commands; `common` holds what they share. Only the group of the command on
the line is imported, so `fewstep --help` lists the commands without loading torch.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from fewstep import __version__
from fewstep import argtypes as A
from fewstep.cli.common import COMMAND_HELP
from fewstep.errors import FewstepError, command_line

GROUPS = {"fewstep.cli.methods": ("train", "distill"),
          "fewstep.cli.models": ("sample", "info", "eval", "classifier", "compare", "interpolate"),
          "fewstep.cli.bench": ("bench", "demo"),
          "fewstep.cli.interop": ("import", "export")}
# errors of the user's file system, not of fewstep: one line, not a traceback
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EEXIST}


def _command(argv: list[str]) -> str | None:
    """The command named on the line (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. With `argv`, only the group of its command is built in full (the others by name and help);
    without, every command is."""
    p = A.Parser(prog="fewstep", description="Distil diffusion models into few-step samplers.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _command(argv)
    for module, commands in GROUPS.items():
        if argv is None or chosen in commands:
            importlib.import_module(module).register(sub)
        else:
            for name in commands:
                sub.add_parser(name, help=COMMAND_HELP[name])
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser(argv).parse_args(argv)
    args._argv = argv
    try:
        with command_line():
            args.func(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # Ctrl-C where no training loop turns it into a clean stop (sample, eval, ...)
        print("\nfewstep: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except MemoryError:  # numpy's and torch's allocation failures on the user's input sizes
        print("fewstep: error: out of memory; ask for fewer samples, a smaller --batch or a smaller --resolution",
              file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"fewstep: error: cannot use{where}: {e.strerror}", file=sys.stderr)
        raise SystemExit(2)
