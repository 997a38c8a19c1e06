"""Teacher training (`fewstep train`): the model every distillation starts from.

  method   the TrainMethod (DDPM's or EDM's loss), the default networks and `train_teacher`
  cli      `fewstep train`
This file loads no torch.
"""
from fewstep.method import Method

METHOD = Method(command="fewstep.teacher.cli")
