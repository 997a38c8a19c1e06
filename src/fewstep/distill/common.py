"""What the data-based distillations (SFDDM, progressive distillation) share on the command line: the
training data at the teacher's resolution and split, and its class labels for a conditional teacher."""
from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fewstep.checkpoint import Checkpoint, atomic_write
from fewstep.data import Dataset, load_dataset
from fewstep.errors import FewstepError, option
from fewstep.interop.sources import cache_dir
from fewstep.sampling import sample_shape


def distill_data(data, resolution: int | None, data_seed: int | None, teacher: Checkpoint) -> tuple[Dataset, dict]:
    """(data set, its description for the card) from --data / --resolution / --data-seed (None: the teacher's
    size and split). A latent teacher's data are images of its autoencoder's size, encoded once into latents
    (cached by content)."""
    given_resolution = resolution
    net = teacher.card["net"]
    tdata = teacher.card.get("data") or {}
    den = teacher.denoiser
    if den.text is not None:
        raise FewstepError(f"{option('teacher')} is a text-to-image model: SFDDM and progressive distillation train "
                           "on data, and each image would need its caption, which fewstep does not read; distil it "
                           "data-free with `fewstep distill sfd` (prompts from --prompts or the shipped list)")
    want = list(tdata["shape"]) if den.codec is not None else list(sample_shape(teacher.card))
    is_image = "resolution" in net
    if resolution is None and is_image:
        resolution = want[-1]
    seed = data_seed if data_seed is not None else int(tdata.get("split_seed") or 0)
    ds = load_dataset(data, resolution=resolution if is_image or given_resolution else None,
                      split="train", seed=seed)
    if list(ds.shape) != want:
        hint = f"; pass {option('resolution', want[-1])}" if len(want) == 3 and len(ds.shape) == 3 else ""
        raise FewstepError(f"{option('data', data)}: samples of shape {list(ds.shape)}, but the teacher draws "
                           f"{want}{' images' if den.codec is not None else ''}{hint}")
    info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "split_seed": seed}
    if den.codec is not None:
        latents, info["latents"] = encoded_latents(ds.x, den.codec)
        ds = Dataset(latents, ds.name, ds.kind, tuple(latents.shape[1:]), ds.info, ds.labels)
    return ds, info


def encoded_latents(images: torch.Tensor, codec) -> tuple[torch.Tensor, dict]:
    """The images' latents under the codec, computed once and kept in fewstep's cache, keyed by the images'
    and the autoencoder's content."""
    x = images.contiguous().float()
    key = hashlib.sha256(x.numpy().tobytes() + str(tuple(x.shape)).encode() + codec.entry["sha256"].encode()).hexdigest()
    path = cache_dir() / "latents" / f"{key[:32]}.safetensors"
    about = {"images": len(x), "cache": str(path), "autoencoder_sha256": codec.entry["sha256"]}
    if path.is_file():
        try:
            latents = load_file(str(path))["latents"]
            return latents, {**about, "shape": list(latents.shape[1:]), "cached": True}
        except Exception:  # noqa: BLE001 - a damaged cache entry is encoded again
            pass
    bar = tqdm(total=len(x), desc="encoding the data into latents", unit="img", leave=False)
    parts = []
    for i in range(0, len(x), 256):
        parts.append(codec.encode(x[i:i + 256]))
        bar.update(len(parts[-1]))
    bar.close()
    latents = torch.cat(parts).contiguous()
    atomic_write(path, lambda p: save_file({"latents": latents}, p))
    return latents, {**about, "shape": list(latents.shape[1:]), "cached": False}


def check_trained_shape(data_info: dict, teacher_shape: list) -> None:
    """Refuse data whose training shape (the data's, or its latents' for a latent teacher) is not the teacher's
    sample shape, naming the resolution to pass where they are images."""
    shape = (data_info.get("latents") or {}).get("shape") or data_info.get("shape")
    if shape is not None and list(shape) != list(teacher_shape):
        hint = f"; pass {option('resolution', teacher_shape[-1])}" if len(teacher_shape) == 3 else ""
        raise FewstepError(f"data shape {list(shape)} does not match the teacher's sample shape "
                           f"{list(teacher_shape)}{hint}")


def distill_labels(teacher: Checkpoint, ds: Dataset):
    """The data's class labels when the teacher is class-conditional (else None)."""
    k = teacher.denoiser.num_classes
    if not k:
        return None
    if ds.labels is None:
        raise FewstepError(f"{option('data', ds.name)}: the teacher is class-conditional ({k} classes) but this data "
                           "set has no class labels (an image folder needs one sub-folder per class)")
    return teacher.denoiser.check_labels(ds.labels)
