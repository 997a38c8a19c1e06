"""The house in layers (docs/architecture.md): every fewstep module imports only modules of its own layer or
below, at the top of the file or inside a function, and no imports form a circle."""
import ast
from pathlib import Path

import pytest

from fewstep.registry import METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "fewstep"

# lowest first; a module may import its own layer and every layer before it
LAYERS = {
    "foundations": ["errors", "hashing", "files", "argtypes", "recipe", "method", "flow_grid", "schedule", "nets",
                    "userdata", "data"],
    "models": ["denoiser", "solvers", "components", "lora", "checkpoint", "sampling", "viz", "show"],
    "around a model": ["featnet", "perceptual", "distances", "features", "metrics", "compare", "interop", "interop.*", "models"],
    "training loop": ["devices", "train_config", "timing", "runfolder", "loop_signals", "train"],
    "shared by methods": ["distill", "distill.*"],
    # and every package fewstep.registry lists (a new method needs no line here)
    "methods": ["registry"] + [p for e in METHODS for p in (e.package.removeprefix("fewstep."),
                                                            e.package.removeprefix("fewstep.") + ".*")],
    "bench": ["benchspec", "report", "results_page", "bench_rows", "bench"],
    "api": ["api"],
    "command line": ["cli", "cli.*", "__main__"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(name: str) -> int | None:
    """A module's layer: named in LAYERS, or inside a package listed as "package.*" (a method's package is
    listed from the registry). The package's own __init__ is below everything: it holds the version
    and forwards the API's names by string, on first use (so `import fewstep` loads nothing else)."""
    if name == "":
        return -1
    for i, mods in enumerate(LAYERS.values()):
        if name in mods or any(m.endswith(".*") and name.startswith(m[:-1]) for m in mods):
            return i
    return None


LAYER_OF = {name: layer_of(name) for name in MODULES}


def fewstep_imports(path: Path) -> set[str]:
    """The fewstep modules a file imports, anywhere in it (a name imported from a package counts when it is
    one of the package's modules)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fewstep":
            base = node.module.removeprefix("fewstep").lstrip(".")
            found.add(base)
            found |= {f"{base}.{a.name}".lstrip(".") for a in node.names
                      if f"{base}.{a.name}".lstrip(".") in LAYER_OF}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("fewstep").lstrip(".") for a in node.names
                      if a.name.split(".")[0] == "fewstep"}
    return found


def test_every_module_has_a_layer():
    assert [n for n, layer in LAYER_OF.items() if layer is None] == [], "add new modules to LAYERS and to " \
                                                                         "docs/architecture.md"
    named = {m for mods in LAYERS.values() for m in mods if not m.endswith(".*")}
    assert sorted(named - set(MODULES)) == [], "LAYERS names modules that no longer exist"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_upward_import(name):
    upward = sorted(t for t in fewstep_imports(MODULES[name]) if LAYER_OF[t] > LAYER_OF[name])
    assert upward == [], f"fewstep.{name} imports {upward} from a layer above its own"


def test_no_circles():
    graph = {name: fewstep_imports(path) - {name, ""} for name, path in MODULES.items()}
    # a package imports its own modules (interop/__init__ re-exports them); that is not a circle
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself: a low module importing the bench, inside a function, is found."""
    path = tmp_path / "schedule.py"
    path.write_text("def f():\n    from fewstep.bench import Bench\n    from fewstep import report\n")
    assert fewstep_imports(path) == {"bench", "", "report"}
