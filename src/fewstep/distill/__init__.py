"""Distillation methods, one module each (sfd, sfddm, progressive), all plugged into fewstep.train."""
