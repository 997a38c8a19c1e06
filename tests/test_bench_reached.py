"""A bench that measures long runs as far as they have got (`as_reached`): it trains nothing, takes each run's
latest weights (its snapshot where that is later than its checkpoint), says how far each run got, and leaves
out the runs not started."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fewstep.bench import Bench, BenchSpec
from fewstep.checkpoint import load_checkpoint
from fewstep.errors import FewstepError
from fewstep.report import reached_note, results_table
from fewstep.sampling import sample
from fewstep.train import Trainer


def _spec(teacher, methods=("teacher", "sfd", "sfd-v")):
    # SFD at NFE 2 on 8 iterations of 128 with a snapshot every 2; SFD-v is planned but never trained here
    return BenchSpec.from_fields(teacher=str(teacher), data="gmm8", methods=list(methods), nfe=[2],
                                 sfd_nfe=[2], sfdv_nfe=[2, 3], n_samples=200, seeds=[0], ref_nfe=16,
                                 sfd_trajectories=1024, sfd_batch=128, sfd_lr=1e-3, curve_points=4)


def _train_sfd(bench, monkeypatch, stop_at=None, die_at=None):
    """Bench-train SFD-2 and stop it: at `stop_at` as Ctrl-C does (a checkpoint there), or at `die_at` as a
    kill does (nothing saved after the last checkpoint, the snapshots before it kept)."""
    real_stop, real_save = Trainer._agreed_stop, Trainer.save

    def stop(self, requests):
        return self.step == stop_at or real_stop(self, requests)

    def save(self, final=False):
        if die_at is not None and self.step >= die_at:
            raise SystemExit(137)
        return real_save(self, final)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_agreed_stop", stop)
        m.setattr(Trainer, "save", save)
        with pytest.raises(SystemExit):
            bench.distill()


def test_a_run_is_measured_as_far_as_it_has_got_and_nothing_is_trained(tiny_gmm8_teacher, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    spec, sfd_alone = _spec(tiny_gmm8_teacher), _spec(tiny_gmm8_teacher, ["sfd"])
    _train_sfd(Bench(sfd_alone, out, progress=False), monkeypatch, stop_at=5)   # checkpoint at 5, snapshots at 2, 4

    summary = Bench(spec, out, progress=False, as_reached=True).run()
    rows = {r["key"]: r for r in summary["rows"]}
    assert summary["not_started"] == ["sfdv-2_3-2", "sfdv-2_3-3"]
    assert not (out / "models" / "sfdv-2_3").exists()  # measured as reached, nothing trains
    sfd = rows["sfd-2"]
    assert sfd["budget"]["iterations"] == 5 and sfd["budget"]["planned_iterations"] == 8
    assert [p["step"] for p in sfd["cost_curve"]] == [2, 4]
    assert {"sfd-ceiling-2", "sfd-ceiling-3"} <= set(rows)  # SFD-v's ceilings are the teacher's: measured
    assert "| 5 × 128 of 8 (unfinished) |" in results_table(summary)
    assert reached_note(summary) == (
        "Measured as reached (`--as-reached`): each distillation as far as it had trained, from its latest "
        "snapshot; unfinished when measured: `sfd-2` at 5 of 8 iterations; no checkpoint yet, so not in the table: "
        "sfdv-2_3-2, sfdv-2_3-3.")
    assert "Measured as reached (`--as-reached`)" in (out / "report.md").read_text()

    # the run goes on and is killed after its snapshot at 6, before any checkpoint: the snapshot is measured
    _train_sfd(Bench(sfd_alone, out, progress=False), monkeypatch, stop_at=7, die_at=7)
    card = json.loads((out / "models" / "sfd-2" / "fewstep.json").read_text())
    assert card["training"]["iterations"] == 5 and not card["training"]["finished"]
    sfd = {r["key"]: r for r in Bench(spec, out, progress=False, as_reached=True).run()["rows"]}["sfd-2"]
    assert sfd["budget"]["iterations"] == 6 and [p["step"] for p in sfd["cost_curve"]] == [2, 4, 6]
    ckpt = load_checkpoint(out / "models" / "sfd-2")
    ckpt.denoiser.net.load_state_dict(load_file(out / "models" / "sfd-2" / "snapshots" / "step-0000006.safetensors"))
    noise = torch.randn((200, 2), generator=torch.Generator().manual_seed(1000))  # the bench's seed-0 noise
    expected = sample(ckpt, 200, seed=0, noise=noise, progress=False)
    kept = np.load(out / "rows" / "sfd-2.npy")
    assert np.allclose(kept, expected[:len(kept)].numpy(), atol=1e-6)

    # a bench that trains finishes it; measured as reached, it is then the finished row
    Bench(sfd_alone, out, progress=False).distill()
    summary = Bench(spec, out, progress=False, as_reached=True).run()
    sfd = {r["key"]: r for r in summary["rows"]}["sfd-2"]
    assert sfd["budget"]["iterations"] == 8 and "planned_iterations" not in sfd["budget"]
    assert "every run it measured had finished; no checkpoint yet, so not in the table: sfdv-2_3-2" in reached_note(summary)


def test_measuring_as_reached_refuses_to_train_too(tiny_gmm8_teacher, tmp_path):
    import fewstep
    with pytest.raises(FewstepError, match="distill_only trains and as_reached measures without training"):
        fewstep.run_bench(tmp_path, teacher=str(tiny_gmm8_teacher), data="gmm8", distill_only=True, as_reached=True)
