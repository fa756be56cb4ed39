"""Run a module with N logical CPU devices, to test data parallelism (MirroredStrategy on
TensorFlow, keras.distribution.DataParallel on JAX) on a CPU machine:

    python -m tests.logical_cpus N lottery dense --config ...

splits the CPU before the module runs (and so before the backend initialises), then runs it as
``python -m MODULE ARGS...`` would."""
import runpy
import sys

from lottery.data import runtime


def main() -> None:
    count, module, *args = sys.argv[1:]
    runtime.split_cpu(int(count))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
