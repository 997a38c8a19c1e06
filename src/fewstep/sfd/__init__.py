"""SFD — Simple and Fast Distillation (Zhou et al., NeurIPS 2024): SFD, SFD-v and the 1-NFE stage.

One concern per module:
  recipe      the authors' budgets and optimizer, the loop's recipe, the recipe settings, the bench settings
  config      SFDConfig: what a run distils
  trajectory  the teacher's side: the nested grids and the teacher states at the student's timestamps
  loss        the objective: the student's Euler steps against those states (the paper's equations)
  method      the SFD TrainMethod and `distill_sfd`, the call the command line and Python share
  cli         `fewstep distill sfd`
  bench       its rows in `fewstep bench`
  report      its reading and its "SFD recipe" section (no torch)

This file loads no torch: `METHOD` names the modules that train, imported when they run.
"""
from fewstep.method import Method
from fewstep.sfd.recipe import SFDBench
from fewstep.sfd.report import LABELS, across, headline, reading, report_section

METHOD = Method(command="fewstep.sfd.cli", bench="fewstep.sfd.bench", bench_methods=tuple(LABELS), settings=SFDBench,
                reading=reading, report_section=report_section, headline=headline, across=across)
