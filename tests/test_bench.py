"""The benchmark: every method end to end on a tiny teacher, its caching, and the report's arithmetic."""
import json
import shutil

import pytest
import torch

from fewstep.bench import SOLVER_GRIDS, Bench, BenchSpec, bench_methods
from fewstep.benchspec import preset
from fewstep.errors import FewstepError
from fewstep.report import fmt_time, reading, results_table


def tiny_spec(teacher, **kw):
    """Every method at toy budgets: seconds, not minutes."""
    spec = dict(teacher=str(teacher), data="gmm8", methods=list(bench_methods()), nfe=[2], sfd_nfe=[2], sfdv_nfe=[1, 3],
                sfddm_steps=[4], sfddm_variants=["trailing/random"], n_samples=200, seeds=[0, 1], ref_nfe=16,
                sfd_trajectories=512, sfd_batch=128, sfd_lr=1e-3, sfdv_trajectory_factor=1.0,
                sfd_stage2_trajectory_factor=0.5, sfddm_iters=20, sfddm_batch=64, pd_steps=[4], pd_start_steps=16,
                pd_iters_per_fold=5, pd_batch=64, curve_points=3, sfddm_long_fraction=0.25, sfddm_long_curve_points=4,
                sfd_recipe=["grad-clip", "stage2-condition"])
    spec.update(kw)
    return BenchSpec.from_fields(**spec)


@pytest.fixture(scope="module")
def bench_run(tiny_gmm8_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = Bench(tiny_spec(tiny_gmm8_teacher), out, progress=False).run()
    return out, summary


def test_every_method_gets_a_row_with_quality_and_timing(bench_run):
    out, summary = bench_run
    rows = {r["key"]: r for r in summary["rows"]}
    assert set(rows) == {"data-floor", "teacher-dpmpp2m-16", "ddim-2", "dpmpp2m-2", "dpmpp3m-2", "heun-2", "ipndm-2",
                         "sfd-2", "sfdv-1_3-1", "sfdv-1_3-3", "sfd-stage2-1", "sfddm-4-trailing-random",
                         "ddim-trailing-4", "progressive-4", "teacher-on-phi-4-trailing-ddpm",
                         "teacher-on-phi-4-trailing-ddim", "sfddm-4-trailing-random-long",
                         "sfd-2~grad-clip", "sfd-stage2~stage2-condition-1", "sfd-ceiling-1", "sfd-ceiling-2",
                         "sfd-ceiling-3"}
    for key, r in rows.items():
        assert r["quality"]["swd"]["mean"] > 0 and r["quality"]["swd"]["std"] >= 0, key
        assert r["row_wall_s"] > 0, key
        if r["method"] != "data":
            assert r["sample_s_per_1000"] > 0 and r["forward_s_per_1000"] > 0, key
    # NFE is what the sampler really spent, AFS included
    assert rows["sfd-2"]["nfe"] == 2 and rows["sfd-stage2-1"]["nfe"] == 1 and rows["heun-2"]["nfe"] == 2
    # the solvers count NFE as the field does (no final denoise), each on its own authors' grid
    for name in ("ddim", "dpmpp2m", "dpmpp3m", "heun", "ipndm"):
        r = rows[f"{name}-2"]
        assert r["final_zero"] is False and r["grid"] == SOLVER_GRIDS[name], name
    # every row but the references is paired with the teacher's samples from the same noises
    for key, r in rows.items():
        if r["method"] in ("data", "teacher"):
            assert "paired" not in r, key
        else:
            p = r["paired"]["rmse"]
            assert 0 < p["ci_low"] < p["mean"] < p["ci_high"] and r["paired"]["n"] == 400, key
    # the recipe's other values: the same run with one setting changed
    assert rows["sfd-2~grad-clip"]["budget"] == {**rows["sfd-2"]["budget"], "grad_clip": 1.0}
    assert rows["sfd-2"]["budget"]["grad_clip"] is None
    clipped = json.loads((out / "models" / "sfd-2~grad-clip" / "config.json").read_text())["train"]
    assert clipped["grad_clip"] == 1.0
    assert json.loads((out / "models" / "sfd-2" / "config.json").read_text())["train"]["grad_clip"] is None
    assert rows["sfd-2~grad-clip"]["trajectory_cache"]["hits"] == 4  # the authors' run's trajectories
    for key in ("sfd-2", "sfdv-1_3-3", "sfddm-4-trailing-random", "progressive-4"):
        assert rows[key]["distill_wall_s"] > 0 and rows[key]["distill_vs_teacher_training"] > 0, key
    # SFD's teacher trajectories go to the bench's cache (SFD-v at another NFE reads none of them)
    assert rows["sfd-2"]["trajectory_cache"]["misses"] == 4 and any((out / "trajectory-cache").glob("*/*.safetensors"))
    assert rows["sfdv-1_3-1"]["trajectory_cache"]["hits"] == 0
    # the stage-2 cost includes the first stage it started from
    assert rows["sfd-stage2-1"]["distill_wall_s"] > rows["sfdv-1_3-3"]["distill_wall_s"]
    # real samples sit far below a 2-step DDIM on eight separated modes
    assert rows["data-floor"]["quality"]["swd"]["mean"] < 0.5 * rows["ddim-2"]["quality"]["swd"]["mean"]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))


def test_outputs_for_people(bench_run):
    out, summary = bench_run
    for name in ("quality-vs-nfe.png", "quality-vs-cost.png", "samples.png", "sfddm-consistency.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    assert "Data floor" in report and "figures/quality-vs-nfe.png" in report and "PSNR of matched pairs" in report
    # every SFDDM / progressive row is read next to its ceiling, the teacher's own chain on the same phi
    assert "teacher on phi (ceiling) (trailing, ddpm)" in report
    assert report.count("4-step chain on the same phi scores DDIM") == 3  # sfddm, its long run, progressive
    table = (out / "results.md").read_text()
    # the best row at each NFE in bold, every one of them where rows tie (DDIM and DPM-Solver++ share a grid, so at
    # their lowest NFEs, where DPM-Solver++ runs at first order, they are the same sampler)
    # (reference rows, the teacher and the ceilings, set levels and are never "best")
    scored = [r for r in summary["rows"] if not r.get("apart") and not r.get("reference")]
    best = {n: min(r["quality"]["swd"]["mean"] for r in scored if r["nfe"] == n) for n in {r["nfe"] for r in scored}}
    assert table.count("**") == 2 * sum(r["quality"]["swd"]["mean"] == best[r["nfe"]] for r in scored)
    assert all(f"| {n} | **" in table for n in best)
    assert "~ grad-clip" not in table  # the recipe's other values have their own table
    assert "## SFD recipe" in report and "| gradient clipping (SFD) | none | norm 1 | 2 |" in report
    clip_line = next(line for line in report.splitlines() if line.startswith("| gradient clipping (SFD) |"))
    assert clip_line.endswith("| norm 1 |")  # fewstep's default: the other value
    assert next(line for line in report.splitlines() if line.startswith("| 1-NFE stage step condition |")).endswith(
        "| its own N = 3 |")
    assert "With fewstep's defaults" not in report  # SFD-v was not clipped in this bench
    assert "| 1-NFE stage step condition | its own N = 3 | the first stage's mode, N = 7 | 1 |" in report
    assert (out / "figures" / "sfd-recipe.png").stat().st_size > 1000
    assert "1-NFE stage / SFD at NFE 2 (SWD; target ≤ 1.3" in report and "SFD at NFE 2 / teacher (SWD" in report


def test_rerun_reuses_models_and_rows(bench_run, tiny_gmm8_teacher):
    out, summary = bench_run
    stamps = {p: p.stat().st_mtime_ns for p in list(out.glob("models/**/model.safetensors")) + list(out.glob("rows/*.json"))}
    assert len(stamps) == 22 + 10  # rows (3 of them SFD ceilings); sfd, sfd-v, stage 2, 2 recipe runs, sfddm and its long run, the
    # progressive chain + 2 folds
    again = Bench(tiny_spec(tiny_gmm8_teacher), out, progress=False).run()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["quality"] for r in again["rows"]] == [r["quality"] for r in summary["rows"]]
    # other sample seeds re-measure the rows but never retrain a model
    models = {p: t for p, t in stamps.items() if p.name == "model.safetensors"}
    third = Bench(tiny_spec(tiny_gmm8_teacher, methods=["sfd", "data"], seeds=[5, 6]), out, progress=False).run()
    assert {p: p.stat().st_mtime_ns for p in models} == models
    assert all(r["seeds"] == [5, 6] for r in third["rows"])
    assert (out / "rows" / "sfd-2.json").stat().st_mtime_ns != stamps[out / "rows" / "sfd-2.json"]
    # a model distilled with another budget is neither reused nor overwritten
    with pytest.raises(FewstepError, match="sfddm-4-trailing-random was distilled with .*'iterations': 20.* "
                                           "asks for .*'iterations': 21"):
        Bench(tiny_spec(tiny_gmm8_teacher, methods=["sfddm"], sfddm_iters=21), out, progress=False).run()
    # ... nor one distilled with another gradient clip: measuring recipe settings, every SFD row runs the authors'
    # recipe (no clip); without, fewstep's defaults (SFD clipped at norm 1)
    with pytest.raises(FewstepError, match="sfd-2 was distilled with .*'grad_clip': None.* asks for .*'grad_clip': 1.0"):
        Bench(tiny_spec(tiny_gmm8_teacher, methods=["sfd"], sfd_recipe=[]), out, progress=False).run()
    assert {p: p.stat().st_mtime_ns for p in models} == models


def test_bench_nfe_flag_sets_the_solvers_and_sfd_alike():
    import argparse
    from fewstep.cli.bench import _spec, register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    spec = _spec(parser.parse_args(["bench", "--preset", "digits", "--nfe", "2,16", "--out", "x"]))
    assert spec.nfe == [2, 16] and spec.sfd_nfe == [2]
    assert _spec(parser.parse_args(["bench", "--preset", "digits", "--out", "x"])).sfd_nfe == [2, 3, 4, 5]
    # SFD's recipe can be changed without leaving the preset
    spec = _spec(parser.parse_args(["bench", "--preset", "demo", "--sfd-batch", "128", "--sfd-lr", "2e-4",
                                    "--sfd-trajectories", "19200", "--out", "x"]))
    assert (spec.sfd_batch, spec.sfd_lr, spec.sfd_trajectories, spec.sfd_nfe) == (128, 2e-4, 19200, [2])
    assert _spec(parser.parse_args(["bench", "--preset", "demo", "--out", "x"])).sfd_batch == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--preset", "demo", "--sfd-batch", "0", "--out", "x"])
    # a subset of the recipe settings (or none), and no quality-against-time curve
    spec = _spec(parser.parse_args(["bench", "--preset", "mnist", "--recipe", "grad-clip,sfdv-budget",
                                    "--curve-points", "0", "--out", "x"]))
    assert spec.sfd_recipe == ["grad-clip", "sfdv-budget"] and spec.curve_points == 0
    assert _spec(parser.parse_args(["bench", "--preset", "mnist", "--recipe", "none", "--out", "x"])).sfd_recipe == []
    assert len(_spec(parser.parse_args(["bench", "--preset", "mnist", "--out", "x"])).sfd_recipe) == 9
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--preset", "mnist", "--recipe", "grad-clip,nope", "--out", "x"])


def test_bad_bench_input_is_named():
    with pytest.raises(FewstepError, match="preset='nope'"):
        preset("nope")
    with pytest.raises(FewstepError, match="unknown \\['sfdd'\\]"):
        Bench(BenchSpec(teacher="gmm8-teacher", data="gmm8", methods=["sfdd"]), "/nonexistent-never-written")


# the labels and roles a bench writes beside each row (see fewstep.bench and the methods' rows)
LABELS = {"data": "data floor (real samples)", "teacher": "teacher (reference), dpmpp2m", "sfd": "SFD",
          "ddim": "DDIM", "dpmpp3m": "DPM-Solver++(3M)", "heun": "Heun", "sfd-v": "SFD-v", "sfd-stage2": "SFD 2nd stage"}


def _row(method, nfe, fcd, **kw):
    return {"key": f"{method}-{nfe}", "method": method, "nfe": nfe, "label": LABELS[method],
            "reference": method in ("data", "teacher"), "quality": {
        "fcd": {"mean": fcd, "std": 1.0}, "kid": {"mean": 0.0, "std": 0.0},
        "precision": {"mean": 0.9, "std": 0.0}, "recall": {"mean": 0.9, "std": 0.0}},
        "sample_s_per_1000": None if method == "data" else 1.0, "forward_s_per_1000": None if method == "data" else 0.5,
        "sampler_overhead": None if method == "data" else 2.0, **kw}


def test_reading_measures_gaps_over_the_data_floor():
    rows = [_row("data", 0, 70.0), _row("teacher", 256, 80.0, sampler="dpmpp2m"),
            _row("sfd", 2, 95.0, distill_wall_s=30.0, distill_vs_teacher_training=0.01),
            _row("ddim", 2, 150.0), _row("sfd", 4, 110.0, distill_wall_s=30.0, distill_vs_teacher_training=0.05,
                                         budget={"iterations": 313, "batch": 128})]
    summary = {"quality_key": "fcd", "rows": rows}
    lines = "\n".join(reading(summary))
    # 95 is 1.19x the teacher's 80, but 25 over the floor of 70 against the teacher's 10: 2.5x
    assert "SFD at NFE 2: FCD 95 = 1.19× the teacher's; over the floor 25 vs the teacher's 10 (2.5×)" in lines
    assert "(fewstep's target ≤ 2×: met); distillation cost 1.0 % of teacher training " \
           "(fewstep's target ≤ 2 %: met)" in lines
    assert "SFD at NFE 4: FCD 110 = 1.38× the teacher's; over the floor 40 vs the teacher's 10 (4.0×) " \
           "(fewstep's target ≤ 1.5×: met; trained on 40,064 trajectories, 0.2× the authors' 200,000); " \
           "distillation cost 5.0 % of teacher training " \
           "(fewstep's target ≤ 2 %: not met)" in lines
    assert "NFE 2: best is SFD" in lines and "NFE 0" not in lines
    table = results_table(summary).splitlines()
    data_line = next(line for line in table if line.startswith("| data floor"))
    assert "| – |" in data_line and "**" not in data_line
    assert next(line for line in table if line.startswith("| SFD | 2 |")).count("**") == 2
    assert "**" not in next(line for line in table if line.startswith("| DDIM | 2 |"))


def _with_interval(row: dict, half: float) -> dict:
    m = row["quality"]["fcd"]["mean"]
    row["quality"].update(fcd_ci_low={"mean": m - half}, fcd_ci_high={"mean": m + half})
    return row


def test_reading_names_the_solvers_that_get_worse_with_more_nfe():
    rows = [_row("teacher", 256, 5.0, sampler="dpmpp2m"),
            *[_with_interval(_row("ddim", n, q, label="DDIM, time-uniform grid"), 30.0)
              for n, q in ((2, 900.0), (3, 600.0), (4, 620.0), (5, 300.0))],  # 600 -> 620: within the intervals
            *[_with_interval(_row("heun", n, q, label="Heun, EDM ρ=7 grid"), 30.0)
              for n, q in ((2, 1844.0), (4, 1971.0), (6, 283.0))]]
    lines = reading({"quality_key": "fcd", "rows": rows})
    assert "- DDIM: better at every added NFE, or level within the intervals." in lines
    heun = next(line for line in lines if line.startswith("- Heun"))
    assert "is not monotone in NFE (FCD: NFE 4 1.97e+03 ± 30 against NFE 2 1.84e+03 ± 30)" in heun
    assert "(σ_prev − σ_min) / σ_min" in heun and "NFE 6" not in heun
    # without intervals, twice the combined spread over seeds decides (std 1 each: 3 apart is beyond it)
    plain = [_row("ddim", 2, 10.0, label="DDIM"), _row("ddim", 3, 13.0, label="DDIM")]
    assert any("DDIM is not monotone" in line for line in reading({"quality_key": "fcd", "rows": plain}))
    plain[1]["quality"]["fcd"]["mean"] = 12.0
    assert "- DDIM: better at every added NFE, or level within the intervals." in \
        reading({"quality_key": "fcd", "rows": plain})


def test_a_row_shows_its_progress_while_it_runs(tiny_gmm8_teacher, tmp_path, capsys):
    Bench(tiny_spec(tiny_gmm8_teacher, methods=["data", "ddim"], seeds=[0]), tmp_path, progress=True).run()
    out = capsys.readouterr()
    # a bar per row while it samples, ticking once per network evaluation, not only the bar over rows
    assert "ddim-2 seed 0: sampling" in out.err and "eval/s" in out.err
    assert "bench row 2/2: ddim-2" in out.err + out.out


def test_the_row_progress_bar_leaves_the_samples_alone(tiny_gmm8_teacher, tmp_path, monkeypatch):
    """tqdm's update returns True when it redraws; the bar ticks from a forward hook, whose return value
    would replace the network's output. Force a redraw on every tick: the samples must not change."""
    import fewstep.bench
    from fewstep.sampling import sample
    bench = Bench(tiny_spec(tiny_gmm8_teacher, methods=["ddim"], seeds=[0]), tmp_path, progress=True)
    plain = sample(bench.teacher, 200, noise=bench.noise[0], progress=False, nfe=4, sampler="ddim")
    monkeypatch.setattr(fewstep.bench.tqdm, "update", lambda self, n=1: True)
    with fewstep.bench.sampling_bar("ddim-2 seed 0: sampling", bench.teacher, 4, progress=True):
        ticked = sample(bench.teacher, 200, noise=bench.noise[0], progress=False, nfe=4, sampler="ddim")
    assert torch.equal(plain, ticked)


def test_distillation_rows_carry_their_profile_and_quality_along_the_run(bench_run, tiny_gmm8_teacher, capsys):
    out, summary = bench_run
    rows = {r["key"]: r for r in summary["rows"]}
    for key in ("sfd-2", "sfdv-1_3-3", "sfd-stage2-1", "sfddm-4-trailing-random", "progressive-4"):
        prof = rows[key]["distill_profile"]
        assert prof["iterations_measured"] >= 1 and prof["floor_s"] > 0, key
        assert prof["overhead"] == pytest.approx(prof["iter_s"] / prof["floor_s"], rel=1e-3), key
        parts = prof["teacher_s"] + prof["student_s"] + prof["optimizer_s"] + prof["rest_s"]
        assert prof["iter_s"] == pytest.approx(parts, rel=1e-3), key
        curve = rows[key]["cost_curve"]
        assert len(curve) >= 2 and all(p["quality"]["swd"] > 0 for p in curve), key
        walls = [p["wall_s"] for p in curve]
        assert walls == sorted(walls) and walls[-1] <= rows[key]["distill_wall_s"] + 0.01, key
    # the last snapshot is the finished model: its quality is the row's first seed's
    sfd = rows["sfd-2"]["cost_curve"]
    assert sfd[-1]["step"] == 4  # 512 trajectories in batches of 128
    # stage 2 starts where its first stage ended
    assert rows["sfd-stage2-1"]["cost_curve"][0]["wall_s"] > rows["sfdv-1_3-3"]["distill_wall_s"]
    # progressive: one point per fold, its student at its own steps, down to the row's
    assert [p["nfe"] for p in rows["progressive-4"]["cost_curve"]] == [8, 4]
    table = (out / "results.md").read_text()
    assert "distill overhead" in table and "| sfd-2 | " in table and "student fwd+bwd s" in table
    assert "Distillation time against its network floor" in (out / "report.md").read_text()
    from fewstep.cli.bench import run_bench
    run_bench(tiny_spec(tiny_gmm8_teacher, methods=["sfd"]), out, "cpu", False, profile=True)
    printed = capsys.readouterr().out
    assert "against its network floor" in printed and "| sfd-2 |" in printed


def test_the_long_sfddm_run_is_read_along_the_run_against_its_ceiling(bench_run, tiny_gmm8_teacher):
    out, summary = bench_run
    rows = {r["key"]: r for r in summary["rows"]}
    long, short = rows["sfddm-4-trailing-random-long"], rows["sfddm-4-trailing-random"]
    card = json.loads((out / "models" / "sfddm-4-trailing-random-long" / "fewstep.json").read_text())
    teacher_iters = json.loads((tiny_gmm8_teacher / "fewstep.json").read_text())["training"]["iterations"]
    n = round(teacher_iters / 4)  # a quarter of the teacher's training
    assert card["training"]["iterations"] == n and long["made_from"] != short["made_from"]
    assert [p["step"] for p in long["cost_curve"]] == [n // 4 * k for k in (1, 2, 3, 4)] + ([n] if n % 4 else [])
    assert long["budget"]["iterations"] > short["budget"]["iterations"]  # (wall times depend on the machine's load)
    report = "\n".join(reading(summary))  # (report.md itself is rewritten by the rerun test)
    ceiling = rows["teacher-on-phi-4-trailing-ddpm"]["quality"]["swd"]["mean"]
    first, last = (long["cost_curve"][i]["quality"]["swd"] for i in (0, -1))
    assert (f"SFDDM (trailing/random, long run), NFE 4: SWD along the run (first sample seed) "
            f"{first:.3g} at iteration {n // 4}, ") in report
    assert (f"The gap to the teacher's own 4-step chain on phi (DDPM {ceiling:.3g}) went from "
            f"{first - ceiling:.3g} to {last - ceiling:.3g}") in report
    # and read against that chain scored on the points' own samples
    level = rows["teacher-on-phi-4-trailing-ddpm"]["curve_quality"]["swd"]
    assert f"  - along its run (5 snapshots, 200 samples each; its ceiling on the same samples {level:.3g}): " in report


def test_separation_of_teacher_sfd2_and_dpmpp3m5_is_read_out():
    rows = [_row("teacher", 100, 20.0, sampler="dpmpp2m"), _row("sfd", 2, 40.0), _row("dpmpp3m", 5, 41.5)]
    lines = "\n".join(reading({"quality_key": "fcd", "rows": rows}))
    assert "SFD vs DPM-Solver++(3M) 1.5 apart (> the larger spread 1)" in lines
    assert "All three told apart." in lines
    rows[2]["quality"]["fcd"]["std"] = 2.0
    lines = "\n".join(reading({"quality_key": "fcd", "rows": rows}))
    assert "SFD vs DPM-Solver++(3M) 1.5 apart (≤ the larger spread 2)" in lines and "Not all told apart." in lines
    # without the three rows there is nothing to read
    assert "Separation" not in "\n".join(reading({"quality_key": "fcd", "rows": rows[:2]}))


def test_the_sfd_targets_are_read_for_the_authors_recipe_and_for_fewsteps_defaults():
    from fewstep.sfd.report import targets_reading
    rows = [_row("teacher", 100, 20.0, sampler="dpmpp2m"), _row("sfd", 2, 60.0), _row("sfd-v", 2, 90.0),
            _row("sfd-stage2", 1, 45.0), _row("sfd", 2, 50.0, recipe="grad-clip"),
            _row("sfd-v", 2, 52.0, recipe="grad-clip-sfdv"), _row("sfd-v", 3, 40.0, recipe="grad-clip-sfdv")]
    lines = "\n".join(targets_reading({"quality_key": "fcd", "rows": rows}))
    assert "SFD-v / SFD (FCD; target ≤ 1.10 at every NFE, the paper's 0.94–0.97): NFE 2 1.50 (not met)" in lines
    assert "1-NFE stage / SFD at NFE 2 (FCD; target ≤ 1.3, the paper's 1.29): 0.75 (met)" in lines
    assert "SFD at NFE 2 / teacher (FCD; target ≤ 2.3, the paper's 2.3): 3.00 (not met)" in lines
    # the clipped runs are fewstep's defaults, read at the NFE both were measured at
    assert "With fewstep's defaults (SFD and SFD-v clipped at norm 1" in lines
    assert "FCD: SFD-v / SFD at NFE 2 1.04, SFD at NFE 2 / teacher 2.50." in lines and "NFE 3 0." not in lines
    # the paper's ratios are for the authors' budgets: a shorter run is named as no test of them
    rows[1]["budget"] = {"iterations": 320, "batch": 128}
    lines = "\n".join(targets_reading({"quality_key": "fcd", "rows": rows}))
    assert ("SFD at NFE 2 / teacher (FCD; target ≤ 2.3, the paper's 2.3): 3.00 (outside the target at a shorter "
            "budget than the paper's, so not a test of it; trained on 40,960 trajectories, 0.2× the authors' "
            "200,000)") in lines
    assert "1-NFE stage / SFD at NFE 2 (FCD; target ≤ 1.3, the paper's 1.29): 0.75 (within the target at a" in lines
    # nor is a longer one
    rows[1]["budget"] = {"iterations": 3125, "batch": 128}
    lines = "\n".join(targets_reading({"quality_key": "fcd", "rows": rows}))
    assert ("3.00 (outside the target at a larger budget than the paper's, so not a test of it; trained on "
            "400,000 trajectories, 2× the authors' 200,000)") in lines


def test_the_trajectory_cache_line_counts_the_iterations_its_numbers_cover():
    """The cache counts are the checkpoint's: a run measured as reached from a later snapshot says so."""
    from fewstep.sfd.report import reading
    sfdv = [_row("sfd-v", n, 40.0, model="sfdv-2_3", trajectory_cache={"hits": 199, "misses": 493},
                 budget={"iterations": 750, "batch": 128, "planned_iterations": 6250}) for n in (2, 3)]
    lines = reading({"quality_key": "fcd", "rows": [_row("teacher", 100, 20.0, sampler="dpmpp2m"), *sfdv]})
    assert sum("of the 692 iterations to its last checkpoint read their teacher" in line for line in lines) == 1
    for r in sfdv:
        r["budget"]["iterations"] = 692
    assert any("- SFD-v: 199 of its 692 iterations read" in line
               for line in reading({"quality_key": "fcd", "rows": sfdv}))


def test_results_page_gathers_finished_benches_and_names_the_missing(bench_run, tmp_path):
    from fewstep.results_page import write_results_doc
    out, summary = bench_run
    toy = tmp_path / "toy"  # the fixture's own results (its folder is rerun with other rows by another test)
    shutil.copytree(out / "figures", toy / "figures")
    (toy / "results.json").write_text(json.dumps(summary))
    page = write_results_doc({"toy": toy, "mnist": tmp_path / "never-run"}, tmp_path / "docs",
                             {"mnist": "fewstep bench --preset mnist --out bench/mnist"})
    text = page.read_text()
    assert "## toy" in text and results_table(summary) in text and "Reading:" in text
    total = sum(r["row_wall_s"] for r in summary["rows"])
    assert f"Wall time of the {len(summary['rows'])} rows: {fmt_time(total)} (distillations included" in text
    # the fixture is not the toy preset: the page says where it differs
    assert "**Not the whole `toy` preset**: " in text and "n_samples 200 where the preset has 4000" in text
    assert "## mnist\n\nNot measured yet. Run: `fewstep bench --preset mnist --out bench/mnist`" in text
    figures = tmp_path / "docs" / "figures"
    for name in ("quality-vs-nfe", "quality-vs-cost", "samples"):
        assert f"](figures/toy-{name}.png)" in text
        assert (figures / f"toy-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the sample grid is the bench's own; the plots are drawn again from the numbers
    assert (figures / "toy-samples.png").read_bytes() == (toy / "figures" / "samples.png").read_bytes()
    # the consistency measured by the report is kept in results.json, so the page reads it too
    assert "PSNR of matched pairs" in text
    # the page keeps the bench's numbers: with its folder gone, the section is written again, not dropped
    assert json.loads((tmp_path / "docs" / "data" / "toy.json").read_text()) == summary
    shutil.rmtree(toy)
    for name in ("quality-vs-nfe", "quality-vs-cost"):
        (figures / f"toy-{name}.png").unlink()
    again = write_results_doc({"toy": toy, "mnist": tmp_path / "never-run"}, tmp_path / "docs",
                              {"mnist": "fewstep bench --preset mnist --out bench/mnist"}).read_text()
    assert again == text
    for name in ("quality-vs-nfe", "quality-vs-cost", "samples"):  # the plots drawn again, the grid kept
        assert (figures / f"toy-{name}.png").is_file()
    # a kept section of an older row format is named as such, with the command that measures it again
    old = {**summary, "rows": [{k: v for k, v in r.items() if k != "label"} for r in summary["rows"]]}
    (tmp_path / "docs" / "data" / "toy.json").write_text(json.dumps(old))
    stale = write_results_doc({"toy": toy}, tmp_path / "docs", {"toy": "fewstep bench --preset toy --out bench/toy"})
    assert ("## toy\n\nMeasured by an older fewstep whose rows this page no longer reads (`data/toy.json` keeps "
            "them; its solver rows counted a final denoise as one NFE). Run: `fewstep bench --preset toy --out "
            "bench/toy`") in stale.read_text()


def test_time_to_quality_is_read_off_each_run():
    curve = [{"wall_s": 30.0, "step": 1, "quality": {"fcd": 120.0}}, {"wall_s": 90.0, "step": 2, "quality": {"fcd": 84.0}},
             {"wall_s": 150.0, "step": 3, "quality": {"fcd": 79.0}}]
    rows = [_row("data", 0, 70.0), _row("teacher", 100, 80.0, sampler="dpmpp2m"),
            _row("sfd", 2, 79.0, cost_curve=curve), _row("sfd", 3, 90.0, cost_curve=curve[:2])]
    lines = "\n".join(reading({"quality_key": "fcd", "rows": rows}))
    # 1.5x the teacher's 10 over the floor of 70: 85, first met at the 90 s point
    assert ("SFD, NFE 2, along its run: the teacher's FCD (80) reached after 2.5 min; 1.5× the teacher's gap over "
            "the floor FCD (85) reached after 90 s (best 79 at 2.5 min).") in lines
    assert "SFD, NFE 3, along its run: the teacher's FCD (80) not reached within 90 s; 1.5×" in lines


RENDER_DOCS_PAGE = """
import shutil, sys
from pathlib import Path
from fewstep.results_page import RESULT_PRESETS, bench_command, write_results_doc
docs, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(docs / "data", out / "data")
shutil.copytree(docs / "figures", out / "figures")
page = write_results_doc({n: out / "no-bench" / n for n in RESULT_PRESETS}, out,
                         {n: bench_command(n) for n in RESULT_PRESETS})
print(sorted(m for m in ("torch", "fewstep.train", "fewstep.bench", "fewstep.sfd.method") if m in sys.modules))
"""


def test_the_results_page_renders_again_byte_for_byte_from_its_data_and_without_torch(tmp_path):
    """docs/results.md is written again from docs/data/*.json alone (the benches' results.json as they were
    written, older flat specs included) to the same bytes, by a process that never imports torch or any
    training code."""
    import subprocess
    import sys
    from pathlib import Path
    docs = Path(__file__).resolve().parents[1] / "docs"
    r = subprocess.run([sys.executable, "-c", RENDER_DOCS_PAGE, str(docs), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"rendering the report imported {r.stdout.strip()}"
    assert (tmp_path / "out" / "results.md").read_bytes() == (docs / "results.md").read_bytes()


def test_a_spec_reads_flat_and_nested_settings_and_records_them_flat():
    """Each method's settings live in its own package; a spec takes them flat (as results.json and run_bench
    keywords name them) or nested under the method's name, and writes them flat."""
    from fewstep.sfd.recipe import SFDBench
    flat = BenchSpec.from_fields(teacher="t", data="d", sfd_batch=32, sfddm_steps=[4], pd_lr=1e-3)
    nested = BenchSpec.from_fields(teacher="t", data="d", sfd={"sfd_batch": 32}, sfddm={"sfddm_steps": [4]},
                                   progressive={"pd_lr": 1e-3})
    assert flat.record() == nested.record()
    assert isinstance(flat.settings["sfd"], SFDBench) and flat.sfd_batch == 32 and flat.sfddm_steps == [4]
    assert BenchSpec.from_record(flat.record()).record() == flat.record()
    # a preset's nested settings, overridden flat
    assert preset("demo", sfd_batch=16).record() == {**preset("demo").record(), "sfd_batch": 16}
    with pytest.raises(FewstepError, match="bench: unknown setting 'sfd_bach'"):
        BenchSpec.from_fields(teacher="t", data="d", sfd_bach=32)
    with pytest.raises(FewstepError, match="sfd bench settings sfddm_steps"):
        BenchSpec(teacher="t", data="d", settings={"sfd": {"sfddm_steps": [4]}})
    # no two methods name a setting alike, and none shadows the spec's own fields
    from dataclasses import fields
    from fewstep.benchspec import method_settings
    names = [n for cls in method_settings().values() for n in cls.field_names()]
    assert len(names) == len(set(names)) and not set(names) & {f.name for f in fields(BenchSpec)}


def test_sfd_rows_are_read_against_their_ceiling(bench_run, tiny_gmm8_teacher):
    """Each SFD / SFD-v NFE gets the teacher's own trajectory it learns as a reference row: the teacher's solver
    over SFD's refined grid from the same noises, its last state, at the NFE the teacher spends there."""
    import numpy as np
    from fewstep.models import load_model
    from fewstep.sfd.config import SFDConfig
    from fewstep.sfd.trajectory import sfd_grids
    from fewstep.solvers import solve
    out, summary = bench_run
    rows = {r["key"]: r for r in summary["rows"]}
    ceiling = rows["sfd-ceiling-2"]
    assert ceiling["reference"] and ceiling["student_nfe"] == 2 and ceiling["nfe"] == 12  # (2 + 2 - 1) * (3 + 1)
    den = load_model(str(tiny_gmm8_teacher)).denoiser
    _, t_grid = sfd_grids(den, SFDConfig(nfe=2), 2)
    noise = torch.randn((200, 2), generator=torch.Generator().manual_seed(1000))  # the bench's seed-0 noise
    with torch.no_grad():
        expected = solve("dpmpp3m", den, noise * float(t_grid[0]), t_grid, lower_order_final="always").x
    kept = np.load(out / "rows" / "sfd-ceiling-2.npy")
    assert np.allclose(kept, expected[:len(kept)].numpy(), atol=1e-5)
    text = "\n".join(reading(summary))
    assert "SFD at NFE 2: SWD" in text and "its ceiling (the teacher's 12-NFE trajectory it learns" in text
    assert "SFD-v at NFE 3" in text and "× the authors' 800,000" in text
    # along the run, against the ceiling scored on the points' own samples (the first seed's first ones)
    assert ceiling["curve_quality"]["swd"] > 0
    assert (f"  - along its run (4 snapshots, 200 samples each; its ceiling on the same samples "
            f"{ceiling['curve_quality']['swd']:.3g}): ") in text
    # and drawn: the report's section on SFD against its ceiling along the run, with its figure
    report = (out / "report.md").read_text()
    assert "## SFD against its ceiling along the run" in report
    assert (out / "figures" / "sfd-along-the-run.png").stat().st_size > 10_000


def test_sfd_runs_are_drawn_against_their_ceiling_on_the_same_samples(tmp_path):
    """Each point of an SFD / SFD-v run is its quality over its ceiling's on the points' samples, placed at the
    trajectories trained on; the final row over the ceiling's final row; rows without a scored ceiling, the 1-NFE
    stage and recipe rows are left out, and with no curve there is no section."""
    from fewstep.sfd.report import _curves_to_ceiling, report_section
    curve = [{"step": s, "wall_s": 60.0 * s, "n": 2000, "quality": {"fcd": q}} for s, q in ((10, 30.0), (20, 12.0))]
    rows = [_row("teacher", 256, 4.0),
            _row("sfd", 2, 10.0, budget={"iterations": 20, "batch": 128}, cost_curve=curve),
            _row("sfd", 3, 9.0, budget={"iterations": 20, "batch": 128}, cost_curve=curve),  # no scored ceiling
            _row("sfd", 2, 8.0, budget={"iterations": 20, "batch": 128}, cost_curve=curve, recipe="grad-clip"),
            _row("sfd-stage2", 1, 14.0, budget={"iterations": 20, "batch": 128}, cost_curve=curve),
            {**_row("teacher", 12, 8.0, curve_quality={"fcd": 10.0}), "method": "sfd-ceiling", "student_nfe": 2},
            {**_row("teacher", 16, 6.0), "method": "sfd-ceiling", "student_nfe": 3}]
    summary = {"quality_key": "fcd", "rows": rows}
    [(row, points, final)] = _curves_to_ceiling(summary)
    assert (row["nfe"], row.get("recipe"), points, final) == (2, None, [(1280, 3.0), (2560, 1.2)], 1.25)
    [(title, lines)] = report_section(summary, tmp_path, prefix="x-")
    assert title == "SFD against its ceiling along the run" and "(figures/x-sfd-along-the-run.png)" in lines[-1]
    assert (tmp_path / "x-sfd-along-the-run.png").is_file()
    rows[-2]["curve_quality"] = None
    assert report_section(summary, tmp_path) == []


def test_a_run_is_read_against_its_ceiling_along_the_way():
    """From the snapshots: the budget at which a run first comes within 1.5x and 1.2x its ceiling (scored on the
    same samples as the points) and from which it stays there."""
    from fewstep.show import along_the_run
    points = [(1, 30.0), (2, 14.0), (3, 25.0), (4, 11.0), (5, 13.0), (6, 11.5)]
    row = {"nfe": 2, "cost_curve": [
        {"step": s, "wall_s": 60.0 * s, "nfe": 2, "n": 2000, "quality": {"fcd": q}} for s, q in points]}
    assert along_the_run(row, 10.0, "fcd", per_step=100, unit="trajectories") == (
        "  - along its run (6 snapshots, 2,000 samples each; its ceiling on the same samples 10): within 1.5× "
        "from 200 trajectories (2.0 min), and at every point from 400 trajectories (4.0 min); within 1.2× from "
        "400 trajectories (4.0 min), and at every point from 600 trajectories (6.0 min).")
    row["cost_curve"][-1]["quality"]["fcd"] = 12.5
    assert "within 1.2× from iteration 4 (4.0 min), but not at its last point" in along_the_run(row, 10.0, "fcd")
    assert "within 1.5× from iteration 4 (4.0 min), and at every point since" in along_the_run(row, 9.0, "fcd")
    assert along_the_run(row, None, "fcd") is None  # no level on the points' samples


def test_a_ceiling_that_beats_the_teacher_is_said_to_flatter_the_ratios_to_the_teacher():
    """Where the teacher's coarse trajectory scores better than its many-step reference beyond the intervals, the
    ratios to the teacher flatter the students and the reading says so; overlapping intervals say nothing."""
    from fewstep.sfd.report import ceiling_reading

    def with_interval(row, lo, hi):
        row["quality"].update(fcd_ci_low={"mean": lo, "std": 0.0}, fcd_ci_high={"mean": hi, "std": 0.0})
        return row

    teacher = with_interval(_row("teacher", 100, 20.8, sampler="dpmpp2m"), 18.9, 22.7)
    ceiling = with_interval({**_row("teacher", 12, 15.5), "method": "sfd-ceiling", "student_nfe": 2}, 14.2, 16.8)
    rows = [teacher, _row("sfd", 2, 28.8, budget={"iterations": 1563, "batch": 128}), ceiling]
    text = "\n".join(ceiling_reading({"quality_key": "fcd", "rows": rows}))
    assert "SFD at NFE 2: FCD 28.8 ± 1 = 1.86× its ceiling" in text and "1.38× the teacher" in text
    assert ("- The teacher's own trajectory at student NFE 2 (the ceiling) scores better than the teacher reference "
            "(FCD 20.8 ± 1.9) beyond their intervals: on this teacher a coarse trajectory scores better than many "
            "steps, so the ratios to the teacher flatter the students") in text
    with_interval(ceiling, 14.2, 19.0)  # the intervals overlap: not told apart
    assert "flatter" not in "\n".join(ceiling_reading({"quality_key": "fcd", "rows": rows}))
    for r in (teacher, ceiling):  # no intervals: apart by more than twice the combined spread over seeds (2.8)
        del r["quality"]["fcd_ci_low"], r["quality"]["fcd_ci_high"]
    assert "(FCD 20.8 ± 1) by more than twice their spread over seeds: on this teacher" in "\n".join(
        ceiling_reading({"quality_key": "fcd", "rows": rows}))
    ceiling["quality"]["fcd"]["mean"] = 20.0
    assert "flatter" not in "\n".join(ceiling_reading({"quality_key": "fcd", "rows": rows}))


def test_the_opening_gives_the_sfd_family_against_teacher_and_ceiling_with_its_budget():
    from fewstep.sfd.report import headline
    rows = [_row("teacher", 256, 4.0, sampler="dpmpp2m"),
            _row("sfd", 2, 10.0, budget={"iterations": 1563, "batch": 128}),
            _row("sfd-v", 2, 12.0, budget={"iterations": 3000, "batch": 128, "planned_iterations": 6250}),
            _row("sfd-stage2", 1, 14.0, budget={"iterations": 1563, "batch": 128}),
            {**_row("teacher", 12, 8.0), "method": "sfd-ceiling", "student_nfe": 2}]
    assert headline({"quality_key": "fcd", "rows": rows}) == [
        "SFD at NFE 2: 2.50× the teacher, 1.25× its ceiling (1× the authors' budget)",
        "SFD-v at NFE 2: 3.00× the teacher, 1.50× its ceiling (0.48× the authors' budget, unfinished)",
        "SFD 2nd stage at NFE 1: 3.50× the teacher (0.1× the authors' budget)"]
