"""`fewstep train` and `fewstep distill METHOD`: the registry's methods on the command line. Each method
declares its own options and how it runs; the training loop's options are added here, with its defaults."""
from __future__ import annotations

import functools

from fewstep.cli.common import COMMAND_HELP, add_train_args
from fewstep.registry import METHODS


def register(sub):
    distill = None
    for entry in METHODS:
        method = entry.load()
        if entry.command == "train":
            p = sub.add_parser(entry.name, help=entry.help, **method.parser_options)
        else:
            if distill is None:
                d = sub.add_parser("distill", help=COMMAND_HELP["distill"])
                distill = d.add_subparsers(dest="method", required=True, metavar="METHOD")
            p = distill.add_parser(entry.name, help=entry.help, **method.parser_options)
        method.add_arguments(p, functools.partial(add_train_args, p))
        p.set_defaults(func=method.run)
