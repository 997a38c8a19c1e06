"""Types of command-line values: each parses one option value, and refuses what it cannot be — not a
number, not finite, out of range — with a message that says what was expected (argparse puts the
option's name in front of it)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fewstep.errors import FewstepError

MAX_NFE = 10_000          # more network evaluations per sample than any sampler needs
MAX_RESOLUTION = 4096
MAX_SEED = 2**62


def _describe(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def integer(lo: int | None = None, hi: int | None = None):
    """An integer (decimal digits only: no '1.5', '1e3' or 'nan') within [lo, hi]."""
    what = _describe(lo, hi)
    expected = f"expected an integer{' ' + what if what else ''}"

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite number within the given bounds (open or closed)."""
    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            value = math.nan
        bad = not math.isfinite(value)
        if not bad and lo is not None:
            bad = value <= lo if lo_open else value < lo
        if not bad and hi is not None:
            bad = value >= hi if hi_open else value > hi
        if bad:
            what = _describe(lo, hi, lo_open, hi_open)
            raise argparse.ArgumentTypeError(f"expected a finite number{' ' + what if what else ''}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


positive_int = integer(1)
iterations = integer(1, 10**9)  # beyond this a run would not end in a lifetime
batch = integer(1, 10**6)
count = integer(0)
seed = integer(0, MAX_SEED)
nfe = integer(1, MAX_NFE)
resolution = integer(1, MAX_RESOLUTION)
positive = real(0, lo_open=True)
non_negative = real(0)
probability = real(0, 1, hi_open=True)     # dropout
decay = real(0, 1, lo_open=True, hi_open=True)  # EMA


def int_list(lo: int = 1, hi: int | None = None):
    """A comma-separated list of distinct integers within [lo, hi] (one value is a list of one)."""
    one = integer(lo, hi)

    def parse(text: str) -> list[int]:
        parts = [p for p in str(text).split(",")]
        if not text or any(not p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list of integers, got {text!r}")
        values = [one(p) for p in parts]
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"expected distinct values, got {text!r}")
        return values
    parse.__name__ = "list"
    return parse


nfe_list = int_list(1, MAX_NFE)


class Parser(argparse.ArgumentParser):
    """argparse with fewstep's error contract: one line on stderr that names the option and what
    was expected, and exit status 2 (argparse would print the whole usage first). Options are taken only
    as written: with dozens of them per command, argparse's prefix matching let a typo such as `--b` stand
    for `--batch`, and a flag added later could change what a short form means."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # a command's own parser refuses what it does not know, so the message points at that command's
        # --help (argparse hands the words up to `fewstep`, whose error names only the top-level help)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message):
        command = self.prog.removeprefix("fewstep").strip()
        where = f"{command}: " if command else ""
        print(f"fewstep: error: {where}{message} (see: {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def output_path(text: str) -> str:
    """A path fewstep writes and records in its JSON files: it must be valid UTF-8 (bytes that are not arrive
    as surrogates, which no JSON file can hold and no later command could open again)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty value")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8; "
                                         "choose a path of UTF-8 characters") from None
    return text


def _no_file_above(text: str) -> None:
    """Refuse a path that would have to go through a file (checked before any work, not when writing)."""
    blocking = next((p for p in Path(text).parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {blocking} is a file, not a folder")


def output_file(text: str) -> str:
    """A file fewstep writes (a picture, a JSON file): not a folder, and under folders (new or existing)."""
    text = output_path(text)
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file name")
    _no_file_above(text)
    return text


SAMPLE_FILE_SUFFIXES = (".npz", ".npy")
SAMPLE_FILE_NAMES = "a file name ending in .npz (the samples with their info) or .npy (the array alone)"


def samples_file(text: str) -> str:
    """Where `fewstep sample` writes its samples: a .npz (the samples with their sampler info and labels) or a
    .npy (the array alone)."""
    text = output_file(text)
    if Path(text).suffix.lower() not in SAMPLE_FILE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {SAMPLE_FILE_NAMES}")
    return text


def folder(text: str) -> str:
    """A folder to create or reuse: anything but an existing file, nor under one."""
    text = output_path(text)
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder (new or existing)")
    _no_file_above(text)
    return text


def clip_bound(text: str):
    """An x0 clipping bound: a positive number, 'none' (no clip) or 'auto' (the method decides)."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, 'none' or 'auto', got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive clipping bound, got {text!r}")
    return v


guidance = real(1.0, 1000.0)  # a classifier-free guidance scale: 1 is the prompt alone


def add_prompt_args(p: argparse.ArgumentParser, what: str = "the prompt of every sample", many: str = ""):
    """--prompt, --prompts FILE, --negative-prompt and --guidance for text-conditioned models."""
    g = p.add_argument_group("text-conditioned models")
    g.add_argument("--prompt", action="append", default=None, help=f"{what} (repeat for several)")
    g.add_argument("--prompts", default=None, help=f"a text file, one prompt a line{many}")
    g.add_argument("--negative-prompt", default=None, help="the prompt guidance steers away from (default: the "
                                                           "card's, usually empty)")
    g.add_argument("--guidance", type=guidance, default=None,
                   help="classifier-free guidance scale (default: the card's, 7.5 for an imported Stable Diffusion)")


def read_prompts(prompts: list[str] | None, path: str | None) -> list[str] | None:
    """The prompts of --prompt (repeated) and --prompts FILE (one a line, blank lines skipped), or None."""
    out = list(prompts or [])
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise FewstepError(f"--prompts {path}: cannot read it ({e.strerror})") from None
        except UnicodeDecodeError:
            raise FewstepError(f"--prompts {path}: not UTF-8 text") from None
        out += [line.strip() for line in lines if line.strip()]
        if not out:
            raise FewstepError(f"--prompts {path}: no prompts in it (one a line)")
    return out or None


# ---- the same types for Python callers ----------------------------------------------------------------

def choice(values):
    """One of `values` (a string)."""
    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, values))}, got {text!r}")
        return text
    parse.__name__ = "choice"
    parse.choices = tuple(values)
    return parse


def flag(value) -> bool:
    """True or False (Python callers only; the command line spells a flag as an option without a value)."""
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
    return value


def device(text: str) -> str:
    """A torch device name: auto, cpu, cuda, cuda:N, mps."""
    name = str(text)
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return name


def check(name: str, value, parse):
    """A Python caller's value through the command line's type `parse`: the same rules and the same message,
    naming the argument (`nfe=2.5: expected an integer ...`). Lists become the comma lists the command line
    reads (so nfe=2 and nfe=[2] are both a list of one where a list is expected); booleans pass only where a
    flag is expected, and strings only where a string is."""
    if parse is flag:
        text = value
    elif isinstance(value, bool) or (isinstance(value, str) and getattr(parse, "__name__", "") in
                                     ("integer", "number", "list")):
        return _refuse(name, value, f"expected {_expected(parse)}")
    elif isinstance(value, (list, tuple)):
        if getattr(parse, "__name__", "") != "list":
            return _refuse(name, value, f"expected {_expected(parse)}")
        text = ",".join(str(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v) for v in value)
    elif isinstance(value, float) and getattr(parse, "__name__", "") in ("integer", "list"):
        return _refuse(name, value, f"expected {_expected(parse)}")
    else:
        text = str(value)
    try:
        return parse(text)
    except argparse.ArgumentTypeError as e:
        return _refuse(name, value, str(e))


def _expected(parse) -> str:
    return {"integer": "an integer", "number": "a number", "list": "an integer or a list of integers",
            "choice": "a string"}.get(getattr(parse, "__name__", ""), "another value")


def _refuse(name: str, value, why: str):
    raise FewstepError(f"{name}={value!r}: {why}")
