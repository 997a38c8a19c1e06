"""What the distillation methods share, below every method's package (fewstep.sfd, fewstep.sfddm,
fewstep.progressive): the training data of the data-based methods (common), the teacher-trajectory cache
(trajectory_cache), the step table of the step-table students (step_table: index sets, the teacher's chain on
them, the ceiling rows) and those rows in a report (ceilings)."""
