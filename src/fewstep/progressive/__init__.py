"""Progressive distillation (Salimans & Ho, ICLR 2022): the multi-fold baseline, folds that halve the steps.

One concern per module:
  recipe   each fold's training, the loop's recipe, the bench settings
  fold     one fold: the two-step DDIM target, the output heads, the fold's TrainMethod
  method   the chain of folds and `distill_progressive`
  cli      `fewstep distill progressive`
  bench    its rows in `fewstep bench`
  report   its reading (no torch)
This file loads no torch.
"""
from fewstep.method import Method
from fewstep.progressive.recipe import ProgressiveBench
from fewstep.progressive.report import headline, reading

METHOD = Method(command="fewstep.progressive.cli", bench="fewstep.progressive.bench", bench_methods=("progressive",),
                settings=ProgressiveBench, reading=reading, headline=headline)
