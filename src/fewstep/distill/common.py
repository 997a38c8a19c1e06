"""What the data-based distillations (SFDDM, progressive distillation) share on the command line: the
training data at the teacher's resolution and split, and its class labels for a conditional teacher."""
from __future__ import annotations

from fewstep.checkpoint import Checkpoint
from fewstep.data import Dataset, load_dataset
from fewstep.errors import FewstepError
from fewstep.sampling import sample_shape


def distill_data(args, teacher: Checkpoint) -> tuple[Dataset, dict]:
    """(data set, its description for the card) from --data / --resolution / --data-seed."""
    net = teacher.card["net"]
    tdata = teacher.card.get("data") or {}
    resolution = args.resolution
    is_image = "resolution" in net
    if resolution is None and is_image:
        resolution = net["resolution"]
    seed = args.data_seed if args.data_seed is not None else int(tdata.get("split_seed") or 0)
    ds = load_dataset(args.data, resolution=resolution if is_image or args.resolution else None,
                      split="train", seed=seed)
    want = list(sample_shape(teacher.card))
    if list(ds.shape) != want:
        hint = f"; pass --resolution {want[-1]}" if len(want) == 3 and len(ds.shape) == 3 else ""
        raise FewstepError(f"--data {args.data}: samples of shape {list(ds.shape)}, but the teacher draws "
                           f"{want}{hint}")
    info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "split_seed": seed}
    return ds, info


def distill_labels(teacher: Checkpoint, ds: Dataset):
    """The data's class labels when the teacher is class-conditional (else None)."""
    k = teacher.denoiser.num_classes
    if not k:
        return None
    if ds.labels is None:
        raise FewstepError(f"--data {ds.name}: the teacher is class-conditional ({k} classes) but this data set "
                           "has no class labels (an image folder needs one sub-folder per class)")
    return teacher.denoiser.check_labels(ds.labels)
