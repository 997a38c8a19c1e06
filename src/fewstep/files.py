"""Files written so that nothing is lost: atomically (a temp file beside the target, fsync, rename), with the
temp files of killed writers cleaned up. Loads no torch, so reports and the command line can write too."""
from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from fewstep.errors import FewstepError


def atomic_write(path: Path, write_fn) -> None:
    """Write through `write_fn(tmp_path)` to a temp file in the same folder, fsync, then rename. A write the
    system refuses (no permission, a full disk, a file-size limit) is a FewstepError naming the file; the
    earlier version of the file, if any, is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphan_temp_files(path)
        # the writer's pid in the name tells a later writer whether the file is an orphan of a killed process
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        blocking = next((p for p in path.parents if p.exists()), None)
        reason = (f"{blocking} is a file, not a folder" if blocking is not None and not blocking.is_dir()
                  else e.strerror or str(e))
        raise FewstepError(f"cannot write {path}: {reason}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write_fn(tmp)
        # mkstemp makes 0600 files, and some writers re-create the file: outputs are meant to be shared
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        _unlink_quietly(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise FewstepError(f"could not write {path} ({reason}); its earlier version, if any, is unchanged") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def remove_orphan_temp_files(path: Path) -> list[str]:
    """Delete the temp files that killed writers of `path` left beside it: those named for a process that no
    longer runs (a live writer's, or one whose process cannot be told, is left alone)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    removed = []
    for f in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.match(f.name)
        if m and not _process_alive(int(m.group(1))):
            _unlink_quietly(f)
            removed.append(f.name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (PermissionError), or no such pid to ask about
        return True
    return True


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))
