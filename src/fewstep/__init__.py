"""fewstep: turn a many-step diffusion model into a fast few-step sampler.

    import fewstep
    teacher = fewstep.load("digits-teacher")
    student = fewstep.distill_sfd(teacher, "runs/sfd2", nfe=2, iters=50)
    fewstep.sample(student, 64).picture("sfd2.png")

The public calls live in `fewstep.api` and are loaded on first use, so `import fewstep` (and `fewstep --help`)
stays light; docs/api.md has one example per task.
"""
__version__ = "0.1.0"

# name -> module holding it; each is a documented call of the Python API
_API = {
    "load": "fewstep.api", "sample": "fewstep.api", "Samples": "fewstep.api", "evaluate": "fewstep.api",
    "compare_models": "fewstep.api", "Comparison": "fewstep.api", "import_model": "fewstep.api",
    "export_model": "fewstep.api", "run_bench": "fewstep.api", "interpolate": "fewstep.api",
    "Interpolation": "fewstep.api", "train_classifier": "fewstep.api",
    "train_teacher": "fewstep.teacher.method",
    "distill_sfd": "fewstep.sfd.method", "SFDConfig": "fewstep.sfd.config",
    "distill_sfddm": "fewstep.sfddm.method", "SFDDMConfig": "fewstep.sfddm.config",
    "distill_progressive": "fewstep.progressive.method",
    "FewstepError": "fewstep.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
