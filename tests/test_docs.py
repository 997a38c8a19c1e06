"""docs/api.md runs as written: its Python blocks, in order, in a fresh folder, print the text blocks shown
after them."""
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MARK = "----8<---- block {} ----8<----"


def examples(text: str) -> list[tuple[str, str | None]]:
    """(code, expected output or None) for each python block, the output from a text block right after it."""
    blocks = re.findall(r"```(python|text)\n(.*?)```", text, flags=re.S)
    out = []
    for i, (kind, body) in enumerate(blocks):
        if kind == "python":
            follows = blocks[i + 1] if i + 1 < len(blocks) else None
            out.append((body, follows[1] if follows and follows[0] == "text" else None))
    return out


def test_api_page_runs_as_written(tmp_path):
    blocks = examples(DOC.read_text())
    assert len(blocks) >= 8
    script = "\n".join(f"print({MARK.format(i)!r})\n{code}" for i, (code, _) in enumerate(blocks))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout.split("\n")
    for i, (code, expected) in enumerate(blocks):
        start = printed.index(MARK.format(i)) + 1
        end = printed.index(MARK.format(i + 1)) if i + 1 < len(blocks) else len(printed)
        got = [line for line in printed[start:end] if line.strip()]
        if expected is not None:
            assert got == expected.strip().splitlines(), f"block {i}:\n{code}"
