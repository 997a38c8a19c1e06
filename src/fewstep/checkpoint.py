"""Self-describing checkpoints: a directory with `model.safetensors` and a `fewstep.json` card.

The card describes the model completely (network, parameterization, schedule, default sampler,
the method that produced it, its teacher and data), so `fewstep sample CKPT` needs no other flag.
Nothing is unpickled: weights are safetensors, the card is JSON, and resumable training state
(`train_state.pt`) is read with `torch.load(weights_only=True)`, which only admits tensors and
plain containers. Every file is written atomically (temp file, fsync, rename).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import fewstep
from fewstep.components import components_from_card, place_components
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError, option
# re-exported: most writers of fewstep's files import them from here
from fewstep.files import atomic_write, remove_orphan_temp_files, write_json  # noqa: F401
from fewstep.hashing import sha256_file
from fewstep.nets import build_net
from fewstep.schedule import Schedule

CARD_NAME = "fewstep.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "train_state.pt"
FORMAT = "fewstep-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded model: its denoiser, its card, and where it came from."""

    denoiser: Denoiser
    card: dict
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sampler(self) -> dict:
        return self.card.get("sampler", {})


LOCK_NAME = ".fewstep.lock"


class RunLock:
    """An exclusive lock on a run folder, held for the run's life: a second process on the same folder is
    refused at once, and the operating system releases the lock when the holder dies (kill -9 included).
    The lock file itself stays (removing it could let two processes lock two different files)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.file = None

    def acquire(self) -> "RunLock":
        f = open(self.folder / LOCK_NAME, "a+")
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): runs are not guarded against each other
            self.file = f
            return self
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(64).strip() or "?"
            f.close()
            raise FewstepError(f"{self.folder} is in use by another fewstep process (pid {holder}); wait for it "
                               f"to finish or choose another folder for {option('out')}") from None
        self.file = f
        return self

    def sign(self):
        """Write this process's id into the lock file, for the message a second process gets (done when the
        run starts, so a run refused for its settings leaves the folder untouched)."""
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(str(os.getpid()))
            self.file.flush()

    def release(self):
        if self.file is not None:
            self.file.close()  # closing drops the lock
            self.file = None

    __del__ = release


def remove_stale_temp_files(folder: Path) -> list[str]:
    """Delete the temp files of atomic writes that a killed process left in `folder` (never read:
    the file they were meant to replace is still the previous complete version). Only the holder of the
    folder's RunLock may call it: another live process's temp file looks the same."""
    removed = []
    for f in Path(folder).glob(".*.tmp"):
        if f.is_file():
            f.unlink()
            removed.append(f.name)
    return removed


# ---- save / load --------------------------------------------------------------------------------

def save_checkpoint(out_dir: str | Path, denoiser: Denoiser, card: dict, state_dict: dict | None = None) -> Path:
    """Write weights (from `state_dict`, default the denoiser's net) and the card. Returns the dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else denoiser.net.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(sd, p))
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "fewstep_version": fewstep.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "net": denoiser.net.config, "denoiser": denoiser.describe(), **card,
            "weights_sha256": sha256_file(out_dir / WEIGHTS_NAME)}
    if denoiser.codec is not None or denoiser.text is not None:
        full["components"] = place_components(out_dir, denoiser.codec, denoiser.text)
    if denoiser.text is not None:  # the guidance it samples with by default (a distilled student: 1)
        full["text"] = {**(card.get("text") or {}), "guidance": denoiser.guidance}
        if getattr(denoiser.text, "settings", None):  # several encoders, and how their outputs combine
            full["text"]["encoders"] = denoiser.text.settings
    write_json(out_dir / CARD_NAME, full)
    return out_dir


def checkpoint_folder(path: str | Path) -> Path:
    """A fewstep checkpoint folder (names of built-in models and foreign files are resolved by
    `fewstep.models`, above this module)."""
    path = Path(path)
    if not path.is_dir():
        raise FewstepError(f"{path}: not a checkpoint folder" + (" (it is a file)" if path.exists() else
                                                                 " (no such folder)"))
    return path


def refuse_to_overwrite(out: Path) -> None:
    """Refuse a folder that already holds a readable fewstep model (a broken one, e.g. an interrupted cache
    entry, may be replaced): writing a new model there would lose it."""
    if (Path(out) / CARD_NAME).is_file():
        try:
            read_card(out)
        except FewstepError:
            return
        raise FewstepError(f"{option('out', out)}: the folder already holds a fewstep model; choose another folder")


def finished_run(path: str | Path) -> bool:
    """Whether `path` holds a model whose card says its training finished."""
    try:
        return bool((read_card(path).get("training") or {}).get("finished"))
    except FewstepError:
        return False


def _unfinished_run(path: Path) -> str:
    """Advice for a run folder (its config.json written when the run began) stopped before its first model was
    saved."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(config, dict) or "train" not in config:
        return ""
    command = config.get("command")
    stopped = "; it holds a run stopped before its first model was saved"
    if isinstance(command, str) and command.startswith("fewstep "):  # started on the command line
        again = command if " --resume" in command else command + " --resume"
        return f"{stopped}: continue it with `{again}`"
    if isinstance(command, str) and command.startswith("fewstep.") and command.endswith(")"):  # from Python
        again = command if "resume=True" in command else command[:-1] + ", resume=True)"
        return f"{stopped}: continue it with `{again}`"
    return f"{stopped}: start it again with {option('resume', True)} to continue it"


def read_card(path: str | Path) -> dict:
    path = checkpoint_folder(path)
    card_path = path / CARD_NAME
    if not card_path.is_file():
        raise FewstepError(f"{path}: not a fewstep checkpoint (no {CARD_NAME} inside)" + _unfinished_run(path))
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewstepError(f"{card_path}: the model card is not valid JSON ({e}); the checkpoint is corrupted") from None
    except RecursionError:
        raise FewstepError(f"{card_path}: the model card is nested too deeply to be a fewstep card") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise FewstepError(f"{card_path}: not a fewstep model card (format field is {card.get('format') if isinstance(card, dict) else None!r})")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise FewstepError(f"{card_path}: written by a newer fewstep (format {card['format_version']}); upgrade fewstep")
    return card


def load_checkpoint(name_or_path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Load a checkpoint folder into a ready Denoiser (eval mode); `fewstep.models.load_model` also takes
    built-in names and foreign teachers."""
    path = checkpoint_folder(name_or_path)
    card = read_card(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FewstepError(f"{path}: missing {WEIGHTS_NAME}")
    if verify and card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise FewstepError(f"{weights}: content hash does not match the card; the file is corrupted or was replaced")
    try:
        sd = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise FewstepError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        denoiser = denoiser_from_card(card)
    except FewstepError as e:
        raise FewstepError(f"{path / CARD_NAME}: {e}") from None
    try:
        missing, unexpected = denoiser.net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # strict=False still raises on shape mismatches
        raise FewstepError(f"{weights}: weights do not fit the network in the card "
                           f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    if missing or unexpected:
        raise FewstepError(f"{weights}: weights do not fit the network in the card "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    denoiser.codec, denoiser.text = components_from_card(card, path)
    if denoiser.text is not None:  # the card's defaults of every sampling call that gives none
        denoiser.guidance = float((card.get("text") or {}).get("guidance", 1.0))
        denoiser.negative_prompt = str((card.get("text") or {}).get("negative_prompt") or "")
    denoiser.to(device).eval()
    for p in denoiser.parameters():
        p.requires_grad_(False)
    return Checkpoint(denoiser, card, path)


def denoiser_from_card(card: dict) -> Denoiser:
    try:
        d = card["denoiser"]
        return Denoiser(build_net(card["net"]), Schedule.from_dict(d["schedule"]), d["param"],
                        exact_table=d.get("exact_table", False))
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or truncated card
        raise FewstepError(f"model card: missing or malformed entry {e}; expected the 'net' and 'denoiser' "
                           "sections a fewstep checkpoint writes") from None


def teacher_reference(path: Path) -> dict:
    """How a student names its teacher (a checkpoint folder): its absolute path (every method records it the
    same way), name, and the weights' content hash."""
    path = checkpoint_folder(path).resolve()
    ref = {"path": str(path), "name": path.name, "sha256": sha256_file(path / WEIGHTS_NAME)}
    try:
        source = read_card(path).get("source")
    except FewstepError:
        source = None
    if isinstance(source, dict):  # an imported teacher: also the foreign file it was read from
        ref["source"] = {k: source.get(k) for k in ("format", "path", "sha256")}
    return ref


# ---- training state -----------------------------------------------------------------------------

def save_train_state(out_dir: str | Path, state: dict) -> None:
    atomic_write(Path(out_dir) / STATE_NAME, lambda p: torch.save(state, p))


def plain_load_refusal(e: Exception) -> str:
    """One line on why `torch.load(weights_only=True)` refused a file, without torch's advice to load it
    unrestricted: that would run whatever code the file holds, which fewstep never does."""
    text = str(e).strip()
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it names {m.group(1)}, which is not a tensor or plain container"
    if "Weights only load failed" in text:
        return "it holds objects other than tensors and plain containers"
    if not text:
        return type(e).__name__
    # the first sentence: torch's internal error messages go on with paragraphs of advice
    return re.split(r"(?<=[a-z0-9)])\. ", text.splitlines()[0])[0].rstrip(".")


def load_train_state(out_dir: str | Path) -> dict:
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        raise FewstepError(f"{option('resume')}: {path} does not exist; nothing to resume from (start without "
                           f"{option('resume')})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        state = e
    if not isinstance(state, dict) or "step" not in state:
        reason = plain_load_refusal(state) if isinstance(state, Exception) else "not a fewstep training state"
        raise FewstepError(f"{path} cannot be read ({reason}), so this run cannot be resumed; train again in "
                           f"another folder for {option('out')} (or delete {Path(out_dir)} first)")
    return state
