"""Class-conditional teachers: labels reach every network call of sampling, SFD, SFDDM and
progressive distillation, and a mismatch between teacher and student labels would show."""
import numpy as np
import pytest
import torch

from fewstep.checkpoint import load_checkpoint, save_checkpoint
from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.denoiser import Denoiser
from fewstep.progressive.fold import ProgressiveFold, teacher_grid
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.sfddm.config import SFDDMConfig
from fewstep.sfddm.method import SFDDM
from fewstep.errors import FewstepError
from fewstep.nets import UNet
from fewstep.sampling import sample
from fewstep.schedule import Schedule
from fewstep.train import StepContext, TrainConfig, Trainer

K = 3


@pytest.fixture(scope="module")
def cond_teacher(tmp_path_factory):
    """A random (untrained) 8×8 U-Net with 3 classes whose output depends on its label."""
    torch.manual_seed(0)
    net = UNet(resolution=8, in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0, num_classes=K)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised output would hide the label
    with torch.no_grad():
        net.class_emb.weight.mul_(5)
    den = Denoiser(net, Schedule.vp("linear", 1024), "eps")
    card = {"method": {"name": "teacher"}, "teacher": None,
            "sampler": {"name": "ddim", "nfe": 8, "grid": "logsnr", "final_zero": True, "clip": None},
            "data": {"kind": "image", "shape": [1, 8, 8], "name": "digits"}}
    return save_checkpoint(tmp_path_factory.mktemp("cond-teacher"), den, card)


def test_sampling_takes_a_class_and_records_it(cond_teacher):
    ck = load_checkpoint(cond_teacher)
    a, ia = sample(ck, 6, seed=1, class_label=0, progress=False, return_info=True)
    b = sample(ck, 6, seed=1, class_label=2, progress=False)
    assert ia["class"] == 0 and ia["labels"] == [0] * 6
    assert (a - b).abs().max() > 1e-3, "the class label does not reach the network"
    # default: uniform classes from the seed, reproducible, and per batch the right labels
    u, iu = sample(ck, 7, seed=1, progress=False, return_info=True, batch_size=3)
    assert iu["class"] == "uniform" and len(iu["labels"]) == 7
    per = torch.cat([sample(ck, 1, seed=1, class_label=c, progress=False, noise=u_noise[None])
                     for c, u_noise in zip(iu["labels"], torch.randn((7, 1, 8, 8),
                                                                    generator=torch.Generator().manual_seed(1)))])
    # float32 agreement relative to the samples' scale (an untrained ε-net's samples reach hundreds; batch
    # size and thread count change the rounding), far below the ~65 a wrong label makes here
    assert (u - per).abs().max() <= 1e-6 * u.abs().max()
    with pytest.raises(FewstepError, match="class_label=3"):
        sample(ck, 2, class_label=K, progress=False)


def test_unconditional_model_refuses_a_class(tiny_digits_teacher):
    with pytest.raises(FewstepError, match="not class-conditional"):
        sample(load_checkpoint(tiny_digits_teacher), 2, class_label=1, progress=False)


def test_cli_sample_class_writes_labels(cond_teacher, tmp_path):
    out = tmp_path / "s.npz"
    main(["sample", str(cond_teacher), "--n", "4", "--class", "1", "--out", str(out)])
    with np.load(out) as f:
        assert f["samples"].shape == (4, 1, 8, 8)
        assert f["labels"].tolist() == [1, 1, 1, 1]


def test_sfd_teacher_copy_has_zero_loss_only_with_shared_labels(cond_teacher, tmp_path):
    """K = 1 with an Euler teacher: the student copy reproduces the teacher's trajectory exactly, which
    holds only if both see the same (uniformly drawn) labels in every call."""
    teacher = load_checkpoint(cond_teacher)
    method = SFD(teacher, SFDConfig(nfe=[2], afs=False, m=0, teacher_solver="euler"))
    # channels-last teacher copies (the CPU default) round differently from the student; exact zero
    # needs the same memory format on both sides
    tr = Trainer(method, TrainConfig(steps=1, batch=8, lr=1e-3, progress=False, channels_last="off"), tmp_path)
    logs = method.train_step(StepContext(tr), None, torch.Generator().manual_seed(0))
    assert logs["loss_step0"] == 0.0 and logs["loss_step1"] == 0.0
    assert method.card()["method"]["class_distribution"] == "uniform"
    # the same step with the student's labels shifted by one class is not free
    shifted = method._labels

    def shifted_labels(ctx, B, gen):
        labels, text, student_text = shifted(ctx, B, gen)
        return (labels + 1) % K, text, student_text
    method._labels = shifted_labels
    orig_states = method.traj.states
    method.traj.states = lambda x, g, pos, labels, text=None: orig_states(x, g, pos, (labels - 1) % K, text)
    logs = method.train_step(StepContext(tr), None, torch.Generator().manual_seed(0))
    assert logs["loss_step0"] > 0


def test_sfddm_and_progressive_use_data_labels(cond_teacher):
    teacher = load_checkpoint(cond_teacher).denoiser
    ds = load_dataset("digits")
    x0, labels = ds.x[:8], ds.labels[:8] % K
    s = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(x0)
    m = SFDDM(teacher, SFDDMConfig(steps=4, init="teacher"), {"kind": "image", "shape": [1, 8, 8]})
    loss, _ = m.losses(x0, s, eps, class_labels=labels)
    assert float(loss.detach()) == 0.0  # a teacher copy on φ, fed the same labels
    other, _ = m.losses(x0, s, eps, student=_relabelled(m.student), class_labels=labels)
    assert float(other.detach()) > 0
    with pytest.raises(FewstepError, match="class-conditional"):
        m.losses(x0, s, eps)
    fold = ProgressiveFold(teacher, teacher_grid(teacher, 8), {"kind": "image", "shape": [1, 8, 8]})
    j = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))
    a, _ = fold.losses(x0, j, eps, class_labels=labels)
    b, _ = fold.losses(x0, j, eps, class_labels=(labels + 1) % K)
    assert float(a.detach()) != float(b.detach())


def _relabelled(student: Denoiser) -> Denoiser:
    """The student with its label embedding rolled by one class: same weights, other labels."""
    import copy
    twin = copy.deepcopy(student)
    with torch.no_grad():
        twin.net.class_emb.weight.copy_(student.net.class_emb.weight.roll(1, 0))
    return twin


def test_distill_cli_needs_labels_for_a_conditional_teacher(cond_teacher, tmp_path, capsys):
    arr = tmp_path / "x.npy"
    np.save(arr, np.zeros((16, 1, 8, 8), dtype=np.float32))
    with pytest.raises(SystemExit) as e:
        main(["distill", "sfddm", "--teacher", str(cond_teacher), "--data", str(arr), "--steps", "4",
              "--iters", "1", "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    assert "has no class labels" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
