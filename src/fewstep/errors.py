"""The one exception type for mistakes a user can make (bad path, bad shape, bad option), and how messages
name an option: as the keyword a Python caller passed (`nfe=[]`) or, inside a `fewstep` command, as its flag
(`--nfe []`).

The CLI prints its message without a traceback; library users can catch it like a ValueError.
"""
from __future__ import annotations

import contextlib
import contextvars

_ON_COMMAND_LINE = contextvars.ContextVar("fewstep_on_command_line", default=False)
_UNSET = object()
# keywords whose flag is not the keyword with dashes (tests/test_cli.py checks every named flag exists)
FLAGS = {"class_label": "--class", "prompts": "--prompt", "final_denoise": "--final-denoise / --no-final-denoise"}


class FewstepError(ValueError):
    """A user-caused error, with a message that names the input and what was expected."""


@contextlib.contextmanager
def command_line():
    """Inside: messages name options by their flags (the `fewstep` command runs its call in this)."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def option(name: str, value=_UNSET, *, shown: str | None = None) -> str:
    """An option as the user gave it: `name` is its Python keyword. With a value, `nfe=[2]` from Python and
    `--nfe [2]` on the command line; `shown` is written as it is in both (a placeholder such as "N")."""
    if on_command_line():
        flag = flag_of(name)
        if shown is not None:
            return f"{flag} {shown}"
        if value is True:  # a switch: its flag alone (the first of a --x / --no-x pair)
            return flag.partition(" / ")[0]
        return flag if value is _UNSET else f"{flag} {value}"
    if shown is not None:
        return f"{name}={shown}"
    return name if value is _UNSET else f"{name}={value!r}"


def flag_of(name: str) -> str:
    """The command-line flag of the keyword `name`."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def options(*names: str) -> str:
    """Several options named together: "prompts / guidance" or "--prompt / --guidance"."""
    return " / ".join(option(n) for n in names)


def on_command_line() -> bool:
    """Whether a `fewstep` command is running (for the few hints with no keyword twin, such as --yes)."""
    return _ON_COMMAND_LINE.get()
