"""Run a module that stops for good right after it writes a given checkpoint, so that a test's
SIGKILL lands there, whatever the machine's load (no race with a short epoch):

    python -m tests.stop_at WORKDIR/tickets/sp80.000__1ep/checkpoint.npz lottery retrain ...

The module runs as ``python -m MODULE ARGS...`` would; every checkpoint goes through
``lottery.training.save_checkpoint``."""
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    path, module, *args = sys.argv[1:]
    stop = Path(path).resolve()
    from lottery import training

    save = training.save_checkpoint

    def save_then_wait(target, *rest, **kwargs):
        save(target, *rest, **kwargs)
        if Path(target).resolve() == stop:
            time.sleep(3600)  # until the test's SIGKILL

    training.save_checkpoint = save_then_wait
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
