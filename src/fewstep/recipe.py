"""The training loop's options, as `fewstep.train_teacher` / `fewstep.distill_*` take them and `fewstep train` /
`fewstep distill` spell them (--iters, --batch, ...): their types, the defaults every method starts from, and
how a method writes its own recipe over them. Imports nothing heavy: the command line builds its options from it.
"""
from __future__ import annotations

from dataclasses import MISSING, fields

from fewstep import argtypes as A
from fewstep.errors import FewstepError

LR_SCHEDULES = ("constant", "step", "cosine")
AMP_MODES = ("none", "bf16", "fp16")
LOG_KINDS = ("jsonl", "tensorboard")

# Each option's type (the command line's) and default. In a method's recipe iters and lr may be None: the method
# derives them (SFD from its trajectory budget and mode, SFDDM from the teacher's card), and so may grad_clip (SFD,
# by mode); a grad_clip of 0 is none.
LOOP_OPTIONS = {
    "iters": (A.iterations, 1000), "batch": (A.batch, 64), "lr": (A.positive, 2e-4),
    "lr_schedule": (A.choice(LR_SCHEDULES), "constant"), "warmup": (A.count, 0), "ema": (A.decay, None),
    "grad_clip": (A.non_negative, 1.0), "amp": (A.choice(AMP_MODES), "none"), "grad_checkpoint": (A.flag, False),
    "seed": (A.seed, 0), "device": (A.device, "auto"), "log_every": (A.positive_int, 50),
    "log": (A.choice(LOG_KINDS), "jsonl"), "sample_every": (A.count, 0), "ckpt_every": (A.count, 500),
    "ckpt_minutes": (A.non_negative, 30.0), "progress": (A.flag, True),
}


def loop_recipe(**method_defaults) -> dict:
    """A method's defaults for the training loop: LOOP_OPTIONS' own with the method's over them. The one place
    they are written: the method's command line shows them and its API call uses them."""
    unknown = set(method_defaults) - set(LOOP_OPTIONS)
    if unknown:
        raise TypeError(f"not training-loop options: {', '.join(sorted(unknown))}")
    return {**{k: default for k, (_, default) in LOOP_OPTIONS.items()}, **method_defaults}


def check_loop_options(options: dict, what: str) -> dict:
    """The training-loop options a caller gave, checked one by one (a clear FewstepError naming the option for a
    wrong type or value, or an unknown name)."""
    unknown = [k for k in options if k not in LOOP_OPTIONS]
    if unknown:
        raise FewstepError(f"{what}: unknown option(s) {', '.join(unknown)}; expected the method's own options or "
                           f"training-loop options ({', '.join(LOOP_OPTIONS)})")
    return {k: v if v is None else A.check(k, v, LOOP_OPTIONS[k][0]) for k, v in options.items()}


def loop_options_from_args(args) -> dict:
    """The training-loop options of a parsed command line (fewstep.cli.common.add_train_args)."""
    return {k: (not args.no_progress) if k == "progress" else getattr(args, k) for k in LOOP_OPTIONS}


def run_info(call: str, options: dict) -> dict:
    """What a run started from Python records (as `fewstep.train.run_record` does for a command line): the call
    and its options, which a resumed run compares with its own."""
    def plain(v):
        if isinstance(v, (int, float, str, bool, type(None))):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(getattr(v, "path", None) or v)
    args = {k: plain(v) for k, v in options.items()}
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return {"command": f"fewstep.{call}({shown})", "args": args}


def config_defaults(config_class) -> dict:
    """A method config dataclass's defaults by field name: what its command line's options default to."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(config_class)}


def take_config_options(config_class, options: dict, exclude: tuple = ()) -> dict:
    """The keyword options that are `config_class`'s fields (less `exclude`), taken out of `options`: what is
    left are the training loop's."""
    names = {f.name for f in fields(config_class)} - set(exclude)
    return {k: options.pop(k) for k in list(options) if k in names}


def method_config(config_class, config, given: dict, what: str, **fixed):
    """A method call's config: `config` as the caller made it, or one made from the keyword options `given`
    (and `fixed`); both at once is refused, as is a config of another class."""
    if config is None:
        return config_class(**given, **fixed)
    if given:
        raise FewstepError(f"{what}: {', '.join(given)} given beside config=; give {config_class.__name__}'s "
                           "options one way")
    if not isinstance(config, config_class):
        raise FewstepError(f"config={config!r}: expected {config_class.__name__}")
    return config
