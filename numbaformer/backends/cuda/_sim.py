"""Whether the numba.cuda this process imported is the simulator: fixed at that import (by
NUMBA_ENABLE_CUDASIM then). numba re-reads config.ENABLE_CUDASIM from the environment later (its
config reloads), so in a process whose environment changes after the import (the CLI tests run
commands in-process under other variables) the flag and the module can disagree; every run-time
check in this package asks this instead."""
from numba import cuda

SIMULATOR: bool = cuda.jit.__module__.startswith("numba.cuda.simulator")
