"""Run one `fewstep` command in this process and kill it at a chosen point (crash tests).

    python crashrun.py '{"at": "iteration", "n": 3, "signal": "kill"}' train --data gmm8 ...

`at`: "iteration" (right after the n-th training iteration, before its log or checkpoint),
"optimizer" (just before the n-th optimizer step, inside an iteration), "weights" / "card" / "state"
(inside the n-th write of model.safetensors / fewstep.json / train_state.pt, after the temp file is
written and before it is renamed), or "none".
`signal`: "kill" (SIGKILL: nothing runs after it), "int" (SIGINT, as Ctrl-C), "int2" / "term2" (two
SIGINTs / SIGTERMs at once: a stop request, then a stop at once). `hold`: a file; after each iteration the
run waits while it exists (to keep a run alive while another process tries its folder).

`python crashrun.py --serve` answers runs one a line, each in a forked child (see `serve`).
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import fewstep.checkpoint as checkpoint  # noqa: E402
import fewstep.cli.methods  # noqa: E402,F401  (the commands' modules, imported once before any fork)
import fewstep.train as train  # noqa: E402
from fewstep.cli import main  # noqa: E402


def prepare(spec: dict):
    """Patch this process for one run: where it kills itself (see the module's docstring)."""
    at, n = spec.get("at", "none"), int(spec.get("n", 1))
    name = spec.get("signal", "kill")
    sig = {"kill": signal.SIGKILL, "int": signal.SIGINT, "int2": signal.SIGINT, "term2": signal.SIGTERM}[name]
    hits = [0]
    hold = spec.get("hold")

    def hit():
        hits[0] += 1
        if hits[0] == n:
            os.kill(os.getpid(), sig)
            if name.endswith("2"):
                os.kill(os.getpid(), sig)

    if at == "iteration" or hold:
        class Bar(train.tqdm):
            def update(self, k=1):
                out = super().update(k)
                while hold and os.path.exists(hold):
                    time.sleep(0.02)
                if at == "iteration":
                    hit()
                return out

        train.tqdm = Bar
    if at == "optimizer":
        update = train.StepContext._update

        def _update(self, opt):
            hit()
            return update(self, opt)

        train.StepContext._update = _update
    if at in ("weights", "card", "state"):
        target = {"weights": checkpoint.WEIGHTS_NAME, "card": checkpoint.CARD_NAME, "state": checkpoint.STATE_NAME}[at]
        original = checkpoint.atomic_write

        def atomic_write(path, write_fn):
            def write_then_maybe_die(tmp):
                write_fn(tmp)
                if Path(path).name == target:
                    hit()
            return original(path, write_then_maybe_die)

        # every module that writes files holds the same function (fewstep.files'): replace it in each
        for module in [m for mod_name, m in sys.modules.items() if mod_name.startswith("fewstep")]:
            if getattr(module, "atomic_write", None) is original:
                module.atomic_write = atomic_write
    elif at not in ("none", "iteration", "optimizer"):
        raise SystemExit(f"unknown kill point {at!r}")


def serve():
    """One request a line on stdin ({"spec", "argv", "stdout", "stderr"}): fork, run it in the child with its
    output in those files, answer {"returncode"} (minus the signal that ended it, as subprocess does). The
    imports are paid once, not once a run."""
    # what each run would otherwise import for itself (about 1.2 s of its 2): torch's first optimizer imports
    # torch._dynamo (and sympy with it), the end-of-run previews matplotlib on fewstep's Agg backend
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch._dynamo  # noqa: F401
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with open(os.devnull) as null, open(job["stdout"], "w") as out, open(job["stderr"], "w") as err:
                    os.dup2(null.fileno(), 0)
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    sys.stdin, sys.stdout, sys.stderr = open(os.devnull), os.fdopen(1, "w"), os.fdopen(2, "w")
                    try:
                        prepare(job["spec"])
                        main(job["argv"])
                        code = 0
                    except SystemExit as e:
                        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    except BaseException:
                        import traceback
                        traceback.print_exc()
                    sys.stdout.flush()
                    sys.stderr.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        prepare(json.loads(sys.argv[1]))
        main(sys.argv[2:])
