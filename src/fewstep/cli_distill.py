"""`fewstep distill {sfd, sfddm, progressive}`, `compare` and `interpolate`: wiring of the distillation
methods to the command line. Each method's section registers its own sub-command."""
from __future__ import annotations

import argparse


def register(sub):
    d = sub.add_parser("distill", help="distil a teacher into a few-step student")
    methods = d.add_subparsers(dest="method", required=True, metavar="METHOD")
    for add in (add_sfd, add_sfddm, add_progressive):
        add(methods)
    add_compare(sub)
    add_interpolate(sub)


# ---- SFD ------------------------------------------------------------------------------------------
def add_sfd(methods):
    pass


# ---- SFDDM ----------------------------------------------------------------------------------------
def add_sfddm(methods):
    pass


# ---- progressive distillation -----------------------------------------------------------------------
def add_progressive(methods):
    pass


# ---- compare / interpolate ------------------------------------------------------------------------
def add_compare(sub):
    pass


def add_interpolate(sub):
    pass
