"""SFDDM — Single-fold Distillation (Hong et al., ECML PKDD 2025): a T'-step student whose chain is the teacher's
on an index subsequence phi, trained in one fold on outputs and hidden features.

One concern per module:
  recipe   the authors' schedule, the loop's recipe, the bench settings
  config   SFDDMConfig: what a run distils
  chain    the student chain and the pieces of the loss (table, KL weight, feature hook, step bins)
  method   the SFDDM TrainMethod (its loss) and `distill_sfddm`
  cli      `fewstep distill sfddm`
  bench    its rows in `fewstep bench` and its extra measurements
  report   its reading (no torch)
The index set, the teacher's chain on it and the ceiling rows are shared with progressive distillation
(fewstep.distill.step_table). This file loads no torch.
"""
from fewstep.method import Method
from fewstep.sfddm.recipe import SFDDMBench
from fewstep.sfddm.report import headline, reading

METHOD = Method(command="fewstep.sfddm.cli", bench="fewstep.sfddm.bench", bench_methods=("sfddm",),
                settings=SFDDMBench, reading=reading, headline=headline)
