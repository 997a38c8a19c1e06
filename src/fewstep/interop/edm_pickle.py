"""Reading NVlabs/edm network snapshots (`network-snapshot-*.pkl`) without running anything in them.

EDM writes snapshots with plain pickle. Its networks are "persistent" objects: each one reduces to
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version, module_src,
class_name, state}, and a plain unpickler would run `module_src` as Python code. This module's
unpickler resolves every global through an allow-list instead:

- the persistent-object hook becomes `EDMRecord(class_name, init_args, init_kwargs, state)`;
  the embedded source is kept as inert text and never run;
- torch containers (ModuleDict, ModuleList, Sequential) become `ModuleRecord`s holding their state;
- tensors and parameters are rebuilt by torch's own rebuild functions; a storage's bytes (pickled
  through `torch.storage._load_from_bytes`) are read with `torch.load(..., weights_only=True)`;
- numpy scalars (EDM keeps e.g. skip_scale = np.sqrt(0.5)), dtypes without Python objects,
  `collections.OrderedDict`, `dnnlib.util.EasyDict` (read as a dict), set and frozenset.

Anything else is refused with a FewstepError naming `module.name`, before it could be called.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch._utils

from fewstep.checkpoint import plain_load_refusal
from fewstep.errors import FewstepError

PERSISTENT_HOOK = ("torch_utils.persistence", "_reconstruct_persistent_obj")
CONTAINERS = {("torch.nn.modules.container", n) for n in ("ModuleDict", "ModuleList", "Sequential")}


@dataclass
class EDMRecord:
    """One persistent EDM object, as data: its class name, constructor arguments and state."""
    class_name: str
    init_args: tuple = ()
    init_kwargs: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    version: int | None = None
    source_sha256: str | None = None  # of the source code the pickle stores for the class (never run)


class ModuleRecord:
    """A plain torch container module (e.g. ModuleDict) from the pickle; only its state is kept.
    The unpickler hands out one subclass per container name, so `cls.__new__(cls)` makes a record."""
    class_name = "ModuleRecord"
    state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise FewstepError(f"EDM snapshot: {self.class_name} has a malformed state ({type(state).__name__})")
        self.state = state


def _persistent_record(meta) -> EDMRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise FewstepError("EDM snapshot: a persistent object has malformed metadata (expected type 'class' "
                           "with a class name)")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise FewstepError(f"EDM snapshot: {meta['class_name']} has a malformed state")
    args, kwargs = state.get("_init_args") or (), state.get("_init_kwargs") or {}
    src = meta.get("module_src")
    digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest() if isinstance(src, str) else None
    return EDMRecord(meta["class_name"], tuple(args), dict(kwargs), state, meta.get("version"), digest)


def _storage_from_bytes(data: bytes):
    if not isinstance(data, (bytes, bytearray)):
        raise FewstepError("EDM snapshot: a tensor storage is not stored as bytes")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted unpickler raises its own error types
        raise FewstepError(f"EDM snapshot: a tensor storage is not plain tensor data ({plain_load_refusal(e)}); "
                           "nothing from it was run") from None


def _np_scalar(dtype, data=None):

    # the dtype's pickled state (applied after _np_dtype) could describe fields or objects: accept only
    # plain numbers, and read the bytes with a freshly made dtype of the same kind and byte order
    if (not isinstance(dtype, np.dtype) or dtype.names is not None or dtype.subdtype is not None
            or dtype.kind not in "biufc" or not isinstance(data, (bytes, bytearray))):
        raise FewstepError("EDM snapshot: only numeric numpy scalars are accepted")
    fresh = np.dtype(dtype.str)
    if len(data) != fresh.itemsize:
        raise FewstepError("EDM snapshot: a numpy scalar has the wrong number of bytes")
    return np.frombuffer(bytes(data), dtype=fresh, count=1)[0]


def _np_dtype(name, *args):

    if not isinstance(name, str):
        raise FewstepError("EDM snapshot: a numpy dtype is not named by a string")
    d = np.dtype(name)
    if d.hasobject or d.kind not in "biufc":
        raise FewstepError(f"EDM snapshot: numpy dtype {name!r} is not a plain number type; refused")
    return d


class _EasyDict(dict):
    """dnnlib's EasyDict read as a plain dict (pickle rebuilds dict subclasses with cls.__new__)."""


class _Call:
    """An allowed function as the unpickler hands it out: callable, but a BUILD opcode aimed at it
    is refused (on the bare function it would set attributes, e.g. __defaults__, for this process)."""
    __slots__ = ("fn", "name")

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise FewstepError(f"EDM snapshot: the file tries to modify {self.name}; this is not an EDM pickle")


def _allowed():


    table = {
        PERSISTENT_HOOK: _persistent_record,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("numpy", "dtype"): _np_dtype,
        ("numpy.core.multiarray", "scalar"): _np_scalar,
        ("numpy._core.multiarray", "scalar"): _np_scalar,
    }
    table = {k: _Call(v, ".".join(k)) for k, v in table.items()}
    for name in ("float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool"):
        table[("torch", name)] = getattr(torch, name)
    return table


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self._table = _allowed()

    def find_class(self, module, name):
        if (module, name) in self._table:
            return self._table[(module, name)]
        # classes are handed out fresh on every lookup, so nothing the file does to one outlives it
        if (module, name) in CONTAINERS:
            return type(name, (ModuleRecord,), {"class_name": name})
        if (module, name) == ("dnnlib.util", "EasyDict"):
            return type("EasyDict", (_EasyDict,), {})
        raise FewstepError(f"EDM snapshot: refused to load '{module}.{name}': it is not on the list of what "
                           "a network snapshot may contain (tensors, containers, EDM's persistent networks); "
                           "nothing from the file was run")

    def persistent_load(self, pid):
        raise FewstepError(f"EDM snapshot: unexpected persistent id {str(pid)[:40]!r}; this is not an EDM pickle")


def load_snapshot(path: str | Path):
    """The unpickled snapshot: dicts, lists, tensors, EDMRecords and ModuleRecords, nothing else."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"EDM snapshot {str(path)!r}: no such file")
    with open(path, "rb") as f:
        try:
            return _AllowListUnpickler(f).load()
        except FewstepError as e:
            raise FewstepError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
                RuntimeError, MemoryError, RecursionError) as e:
            raise FewstepError(f"{path}: not a readable EDM network snapshot ({type(e).__name__}: {e})") from None


def module_state_dict(rec, prefix: str = "") -> dict[str, torch.Tensor]:
    """The nn.Module state dict (parameters and persistent buffers, by their dotted names) held in an
    EDMRecord / ModuleRecord tree, as torch's `state_dict()` would name them."""
    if not isinstance(rec, (EDMRecord, ModuleRecord)):
        raise FewstepError(f"EDM snapshot: expected a network module at {prefix.rstrip('.') or 'the top'}, "
                           f"found {type(rec).__name__}")
    state = rec.state
    out = {}
    for k, v in (state.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for k, v in (state.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[prefix + k] = v
    for k, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{k}."))
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise FewstepError(f"EDM snapshot: {k} is not a tensor ({type(v).__name__})")
    return out
