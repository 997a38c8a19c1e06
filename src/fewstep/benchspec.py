"""What a bench runs: its spec (teacher, data, methods, NFEs, sample counts, seeds, metrics, plus one settings
object per registered method, defined in that method's package) and the presets.

Rows of the bench's own (the data floor, the teacher reference, the training-free solvers) and the rows each
registered method adds (its `bench_methods`) are what `methods` may name. A method's settings are read by its
rows as `spec.<field>` (their names are unique across methods), and results.json records the spec flat, every
field beside the others, as it always has. Loads no torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from fewstep.errors import FewstepError, option
from fewstep.registry import METHODS
from fewstep.registry import methods as registered_methods

SOLVER_ROWS = ("ddim", "dpmpp2m", "dpmpp3m", "heun", "ipndm")
# the bench's own rows: real samples disjoint from the reference scored like a method's (what a perfect sampler
# scores), the teacher at its own setting, and the training-free solvers
OWN_ROWS = ("data", "teacher") + SOLVER_ROWS


def bench_methods() -> tuple:
    """Every name `methods` may hold: the bench's own rows, then each registered method's."""
    return OWN_ROWS + tuple(name for m in registered_methods() for name in m.bench_methods)


def method_settings() -> dict:
    """{method name: its settings class} of every registered method that has bench settings."""
    return {e.name: m.settings for e, m in zip(METHODS, registered_methods()) if m.settings is not None}


@dataclass
class BenchSpec:
    teacher: str
    data: str
    resolution: int | None = None
    methods: list = field(default_factory=lambda: list(bench_methods()))
    nfe: list = field(default_factory=lambda: [2, 4, 8])
    ref_nfe: int = 256
    ref_sampler: str = "dpmpp2m"
    reference: str = "train"                          # split every row is compared with (as FID is measured)
    n_samples: int = 1000
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    seed: int = 0
    fd_intervals: int = 0                             # >0: random halves drawn for 95 % intervals of Fréchet distances
    curve_points: int = 8                             # snapshots along each distillation for quality vs time (0: none)
    note: str = ""                                    # said first in the report (e.g. that budgets are short)
    # method name -> its settings (a dict is laid over the settings' defaults)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        given, self.settings = self.settings, {}
        known = method_settings()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise FewstepError(f"bench settings for {', '.join(unknown)}: expected settings of {', '.join(known)}")
        for name, cls in known.items():
            value = given.get(name) or {}
            self.settings[name] = value if isinstance(value, cls) else _settings(cls, value, name)

    def __getattr__(self, name: str):
        # a method's setting, by its field name (called only for names that are not the spec's own)
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        for settings in self.__dict__.get("settings", {}).values():
            if name in settings.__dataclass_fields__:
                return getattr(settings, name)
        raise AttributeError(f"BenchSpec has no setting {name!r}")

    def record(self) -> dict:
        """The spec as results.json keeps it: every field flat, the methods' settings beside the bench's own."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        for settings in self.settings.values():
            own.update(asdict(settings))
        return own

    @classmethod
    def from_fields(cls, **given) -> "BenchSpec":
        """A spec from flat fields (`sfd_batch=64`, as `fewstep.api.run_bench` keywords, presets and older
        results.json files name them) and/or nested ones (`sfd={"sfd_batch": 64}`, a method's name with a dict
        or its settings object)."""
        own, known, owner = cls._field_names()
        spec, nested = {}, {}
        for key, value in given.items():
            if key in own:
                spec[key] = value
            elif key in known:
                nested.setdefault(key, {})
                if isinstance(value, known[key]):
                    value = asdict(value)
                if not isinstance(value, dict):
                    raise FewstepError(f"bench: {key}={value!r}: expected a dict of {key}'s settings")
                nested[key].update(value)
            elif key in owner:
                nested.setdefault(owner[key], {})[key] = value
            elif key != "settings":
                raise FewstepError(f"bench: unknown setting {key!r}; expected one of "
                                   f"{', '.join(sorted(own | set(owner) | set(known)))}")
        for key, value in (given.get("settings") or {}).items():
            nested.setdefault(key, {}).update(asdict(value) if not isinstance(value, dict) else value)
        return cls(**spec, settings=nested)

    @classmethod
    def from_record(cls, record: dict) -> "BenchSpec":
        """The spec a results.json describes (older files included; settings no longer known are left out)."""
        own, _, owner = cls._field_names()
        return cls.from_fields(**{k: v for k, v in record.items() if k in own or k in owner})

    @classmethod
    def _field_names(cls) -> tuple[set, dict, dict]:
        """(the spec's own field names, {method: its settings class}, {setting name: its method})."""
        known = method_settings()
        owner = {name: method for method, settings in known.items() for name in settings.field_names()}
        return {f.name for f in fields(cls)} - {"settings"}, known, owner


def _settings(cls, value, method: str):
    if not isinstance(value, dict):
        raise FewstepError(f"{method} bench settings {value!r}: expected a dict or a {cls.__name__}")
    names = cls.field_names()
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise FewstepError(f"{method} bench settings {', '.join(unknown)}: expected some of {', '.join(names)}")
    return cls(**value)


LONG_NOTE = ("The SFD family at the authors' budgets: SFD on 200,000 teacher trajectories (1,563 iterations of 128) "
             "at each NFE, SFD-v on four times and the 1-NFE stage on ten times that, with fewstep's defaults. Days "
             "on one CPU thread: `--distill-only` trains the runs (split by --methods / --nfe to train several side "
             "by side into the same --out) and `--as-reached` measures each as far as it has got.")

PRESETS = {
    "toy": dict(teacher="gmm8-teacher", data="gmm8", nfe=[1, 2, 4, 8], n_samples=4000, ref_nfe=256,
                sfd=dict(sfdv_nfe=[2, 3, 4, 5], sfd_trajectories=64_000, sfd_batch=256, sfd_lr=2e-4),
                sfddm=dict(sfddm_steps=[4, 8, 16], sfddm_variants=["trailing/random", "trailing/teacher"],
                           sfddm_batch=256, sfddm_lr=1e-3),
                progressive=dict(pd_steps=[4, 8, 16], pd_start_steps=128, pd_batch=256, pd_lr=3e-4)),
    # SFD at 320 iterations of 128 trajectories (a fifth of the authors' 1,563), every SFD recipe setting measured
    # both ways; 10,000 samples of one seed, Fréchet distances with 95 % intervals, paired distances to the
    # teacher's samples; every SFDDM variant at T' = 10, the default one at 32 (a T' of 128 costs over an hour of
    # 10,000-sample rows, curves and ceilings on 2 CPU cores: `--sfddm-steps 10,32,128` adds it)
    "digits": dict(teacher="digits-teacher", data="digits", nfe=[2, 3, 4, 5, 10], n_samples=10_000, seeds=[0],
                   fd_intervals=200, ref_nfe=256,
                   sfd=dict(sfd_nfe=[2, 3, 4, 5], sfdv_nfe=[2, 3, 4, 5], sfd_trajectories=40_960,
                            sfd_recipe=["grad-clip", "grad-clip-sfdv", "final-orders", "sfdv-budget", "step-condition",
                                        "stage2-lr", "stage2-budget", "stage2-perceptual", "stage2-condition"]),
                   sfddm=dict(sfddm_steps=[10, 32], sfddm_variants_at=[10],
                              sfddm_variants=["trailing/random", "trailing/teacher", "leading/random",
                                              "leading/teacher"]),
                   progressive=dict(pd_steps=[8, 32], pd_start_steps=256)),
    # the digits preset's SFD family with fewstep's defaults (SFD and SFD-v clipped at norm 1) instead of the
    # authors' whole recipe, which the digits preset measures every setting from
    "digits-defaults": dict(teacher="digits-teacher", data="digits", methods=["teacher", "sfd", "sfd-v", "sfd-stage2"],
                            nfe=[2, 3, 4, 5], n_samples=10_000, seeds=[0], fd_intervals=200, ref_nfe=256,
                            curve_points=0,
                            sfd=dict(sfd_nfe=[2, 3, 4, 5], sfdv_nfe=[2, 3, 4, 5], sfd_trajectories=40_960)),
    # the shipped MNIST 16x16 teacher: SFD at 64 iterations of 128 (a 24th of the authors'), every recipe setting
    # both ways, one T' for SFDDM plus its long run
    "mnist": dict(teacher="mnist16-teacher", data="mnist", resolution=16,
                  methods=["data", "teacher", "ddim", "dpmpp3m", "ipndm", "sfd", "sfd-v", "sfd-stage2", "sfddm",
                           "progressive"],
                  nfe=[2, 3, 4, 5, 10], n_samples=10_000, seeds=[0], fd_intervals=200, ref_nfe=100, curve_points=6,
                  sfd=dict(sfd_nfe=[2, 3, 4, 5], sfdv_nfe=[2, 3, 4, 5], sfd_trajectories=8_192,
                           sfd_recipe=["grad-clip", "grad-clip-sfdv", "final-orders", "sfdv-budget", "step-condition",
                                       "stage2-lr", "stage2-budget", "stage2-perceptual", "stage2-condition"]),
                  sfddm=dict(sfddm_steps=[10], sfddm_variants=["trailing/random"], sfddm_long_fraction=0.25),
                  progressive=dict(pd_steps=[8], pd_start_steps=256)),
    # SFD at NFE 2 and SFD-v on the MNIST 16x16 teacher at the authors' budgets
    "mnist-authors": dict(teacher="mnist16-teacher", data="mnist", resolution=16, methods=["teacher", "sfd", "sfd-v"],
                          nfe=[2], n_samples=10_000, seeds=[0], fd_intervals=200, ref_nfe=100, curve_points=25,
                          note=LONG_NOTE, sfd=dict(sfd_nfe=[2], sfdv_nfe=[2, 3, 4, 5], sfd_trajectories=200_000)),
    # the quick tour (4-5 min on 2 CPU cores): every row at a short budget, and the report says so (docs/bench.md)
    "demo": dict(teacher="digits-teacher", data="digits", methods=["data", "teacher", "ddim", "dpmpp3m", "sfd", "sfddm"],
                 nfe=[2, 10], n_samples=500, ref_nfe=64, seeds=[0, 1, 2], curve_points=4,
                 note="Demo budgets, to show every part in a few minutes: the teacher reference at 64 NFE, SFD at 150 "
                      "iterations of 64 trajectories (the authors' budget is 1,563 of 128), SFDDM started from the "
                      "teacher's weights (its `trailing/teacher` variant) for 200 iterations (the authors' schedule "
                      "trains a random student for 2,502), 3 x 500 samples. docs/results.md has every method at its "
                      "full budget, with intervals on 10,000 samples.",
                 sfd=dict(sfd_nfe=[2], sfd_trajectories=9_600, sfd_batch=64, sfd_lr=1e-4),
                 sfddm=dict(sfddm_steps=[10], sfddm_variants=["trailing/teacher"], sfddm_iters=200)),
}

# the digits-defaults preset at the authors' budgets (SFD 1,563 iterations of 128 at every NFE, SFD-v 4x, the 1-NFE
# stage 10x), each scored along its run against its ceiling: days on one CPU thread, so its runs are trained apart
# (--distill-only, one process each) and measured as they get there (--as-reached)
PRESETS["digits-authors"] = {**PRESETS["digits-defaults"], "curve_points": 25, "note": LONG_NOTE,
                             "sfd": {**PRESETS["digits-defaults"]["sfd"], "sfd_trajectories": 200_000}}


def preset(name: str, **overrides) -> BenchSpec:
    """The preset's spec with `overrides` (flat or nested fields; None: keep the preset's) laid over it."""
    if name not in PRESETS:
        raise FewstepError(f"{option('preset', name)}: expected one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    base = BenchSpec.from_fields(**PRESETS[name])
    return BenchSpec.from_fields(**{**base.record(), **given})
