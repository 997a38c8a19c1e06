"""The training loop's profile: per-iteration parts that add up, the network floor timed alone, the card's
summary; the floor changes nothing a run computes."""
import json

import pytest
import torch

from fewstep.checkpoint import WEIGHTS_NAME, load_checkpoint, read_card
from fewstep.data import sample_toy
from fewstep.progressive.fold import ProgressiveFold, teacher_grid
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.sfddm.config import SFDDMConfig
from fewstep.sfddm.method import SFDDM
from fewstep.timing import PROFILE_SECTIONS, Profiler, profile_summary
from fewstep.train import TrainConfig, Trainer


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_profile(out, iterations, logged):
    recs = _records(out)
    assert len(recs) == logged
    for r in recs:
        parts = sum(r[f"time_{k}_s"] for k in PROFILE_SECTIONS) + r["time_rest_s"]
        assert r["time_iter_s"] == pytest.approx(parts, abs=1e-5)
        assert r["floor_s"] == pytest.approx(r["floor_teacher_s"] + r["floor_student_s"], abs=1e-5)
        assert r["floor_teacher_s"] > 0 and r["floor_student_s"] > 0 and r["time_teacher_s"] > 0
        assert r["time_student_s"] > 0 and r["time_optimizer_s"] > 0
    prof = read_card(out)["training"]["profile"]
    assert prof["iterations_measured"] == logged
    assert prof["overhead"] == pytest.approx(sum(r["time_iter_s"] for r in recs) / sum(r["floor_s"] for r in recs),
                                             rel=1e-4)
    total = sum(prof[f"{k}_s"] for k in PROFILE_SECTIONS) + prof["rest_s"]
    # the card rounds each part to 1e-6 s: their sum may differ from the rounded total by a few of those
    assert prof["iter_s"] == pytest.approx(total, rel=1e-4, abs=1e-5)
    # the floor is not training time: the card's wall time is the iterations' own
    assert read_card(out)["training"]["wall_time_s"] <= recs[-1]["wall_s"] + 0.01


def _sfd(teacher, nfe):
    return SFD(load_checkpoint(teacher), SFDConfig(nfe=nfe))


@pytest.mark.parametrize("nfe", [[2], [1, 3]])
def test_sfd_profile_adds_up(tiny_gmm8_teacher, tmp_path, nfe):
    Trainer(_sfd(tiny_gmm8_teacher, nfe), TrainConfig(steps=6, batch=32, lr=1e-3, progress=False, log_every=2,
                                                     n_preview=0), tmp_path).run()
    _check_profile(tmp_path, 6, 3)


def test_sfddm_and_progressive_profiles_add_up(tiny_gmm8_teacher, tmp_path):
    data = sample_toy("gmm8", 256, seed=0)
    teacher = load_checkpoint(tiny_gmm8_teacher)
    Trainer(SFDDM(teacher.denoiser, SFDDMConfig(steps=4)), TrainConfig(steps=4, batch=32, progress=False,
            log_every=2, n_preview=0), tmp_path / "sfddm", data=data).run()
    _check_profile(tmp_path / "sfddm", 4, 2)
    fold = ProgressiveFold(teacher.denoiser, teacher_grid(teacher.denoiser, 16))
    Trainer(fold, TrainConfig(steps=4, batch=32, progress=False, log_every=2, n_preview=0), tmp_path / "pd",
            data=data).run()
    _check_profile(tmp_path / "pd", 4, 2)


def test_floor_changes_no_bits(tiny_gmm8_teacher, tmp_path):
    """Measuring the floor (at every iteration) leaves the weights exactly those of a run without it."""
    outs = []
    for profile in (True, False):
        out = tmp_path / str(profile)
        Trainer(_sfd(tiny_gmm8_teacher, [1, 3]), TrainConfig(steps=5, batch=32, lr=1e-3, progress=False, log_every=1,
                                                             n_preview=0, profile=profile), out).run()
        outs.append((out / WEIGHTS_NAME).read_bytes())
        assert ("floor_s" in _records(out)[0]) == profile
    assert outs[0] == outs[1]


def test_profiler_sections_and_summary():
    p = Profiler(torch.device("cpu"))
    with p.section("teacher"):
        with p.section("student"):  # nested: counted once, by the outer section
            sum(range(10000))
    assert p.times["student"] == 0 and p.times["teacher"] > 0
    with pytest.raises(ValueError, match="expected one of"):
        with p.section("nonsense"):
            pass
    rec = p.record(wall=p.times["teacher"] + 0.5)
    assert rec["time_rest_s"] == pytest.approx(0.5, abs=1e-5)
    assert profile_summary([{"step": 1, "loss": 1.0}]) is None
    s = profile_summary([{"time_iter_s": 2.0, "floor_s": 1.0, "time_teacher_s": 1.0, "time_rest_s": 1.0},
                         {"time_iter_s": 4.0, "floor_s": 3.0, "time_teacher_s": 2.0, "time_rest_s": 2.0}])
    assert s["overhead"] == pytest.approx(1.5) and s["teacher_s"] == pytest.approx(1.5) and s["iterations_measured"] == 2


def test_channels_last_copy_gives_the_same_outputs_and_leaves_the_original():
    from fewstep.nets import UNet, channels_last_copy
    torch.manual_seed(0)
    net = UNet(8, channels=16, attn_resolutions=[4]).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a non-zero output
    fast = channels_last_copy(net)
    assert fast is not net and net.conv_in.weight.is_contiguous()
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(16, 1, 8, 8), torch.rand(16) * 1000
    with torch.no_grad():
        a, fa = net(x, t, return_features=True)
        b, fb = fast(x, t, return_features=True)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4) and torch.allclose(fa, fb, atol=1e-5, rtol=1e-4)
    assert not torch.equal(a, torch.zeros_like(a))
    from fewstep.nets import MLP
    mlp = MLP()
    assert channels_last_copy(mlp) is mlp  # nothing to gain without 4-D weights


def test_channels_last_teacher_in_a_run_and_its_resume(tiny_digits_teacher, tmp_path):
    """With channels_last on (or auto, on CPU) an SFD run on an image teacher uses the channels-last copy; a
    resumed run gives the same bits as an uninterrupted one. A run started under 'auto' (the old default) and
    resumed with today's default keeps 'auto'; resuming with another explicit setting is refused."""
    from fewstep.errors import FewstepError

    def run(out, steps, resume=False, **kw):
        method = _sfd(tiny_digits_teacher, [2])
        cfg = TrainConfig(steps=steps, batch=8, lr=1e-3, progress=False, log_every=1, n_preview=0, **kw)
        tr = Trainer(method, cfg, out, resume=resume)
        assert method.traj.den is not method.teacher.denoiser
        tr.run()
        return out
    whole = run(tmp_path / "whole", 4, channels_last="auto")
    part = run(tmp_path / "part", 2, channels_last="auto")
    run(part, 4, resume=True)
    assert (whole / WEIGHTS_NAME).read_bytes() == (part / WEIGHTS_NAME).read_bytes()
    with pytest.raises(FewstepError, match="channels_last"):
        Trainer(_sfd(tiny_digits_teacher, [2]), TrainConfig(steps=6, batch=8, progress=False, channels_last="on"),
                part, resume=True)
    with pytest.raises(FewstepError, match="expected auto, on or off"):
        TrainConfig(channels_last="yes").validate()
    # the default is the teacher as it is
    method = _sfd(tiny_digits_teacher, [2])
    Trainer(method, TrainConfig(steps=1, batch=8, progress=False), tmp_path / "default")
    assert TrainConfig().channels_last == "off" and method.traj.den is method.teacher.denoiser


def test_snapshots_along_a_run_survive_a_resume(tiny_gmm8_teacher, tmp_path):
    from safetensors.torch import load_file

    def cfg(steps):
        return TrainConfig(steps=steps, batch=16, lr=1e-3, progress=False, n_preview=0, snapshot_every=1)
    Trainer(_sfd(tiny_gmm8_teacher, [2]), cfg(2), tmp_path).run()
    log = tmp_path / "snapshots" / "snapshots.jsonl"
    with open(log, "a") as f:  # a snapshot written after the saved state, before a kill
        f.write(json.dumps({"step": 3, "wall_s": 9.0, "file": "step-0000003.safetensors"}) + "\n")
    Trainer(_sfd(tiny_gmm8_teacher, [2]), cfg(4), tmp_path, resume=True).run()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    walls = [e["wall_s"] for e in entries]
    assert walls == sorted(walls) and walls[2] < 9.0
    final = load_file(tmp_path / "snapshots" / entries[-1]["file"])
    assert all(torch.equal(final[k], v) for k, v in load_file(tmp_path / WEIGHTS_NAME).items())
    with pytest.raises(Exception, match="snapshot_every"):
        TrainConfig(snapshot_every=-1).validate()
