"""CUDA backend: numba.cuda.jit kernels over the same op table as the CPU backend.

Importing this package applies the numpy shim numba-cuda 0.30 needs on numpy 2.5 (np.row_stack was
removed there; numba-cuda issue 907) before anything imports numba.cuda, and registers the block decoders of quants.py with numba-cuda (they
are plain Python functions registered with numba's CPU registry there; under the simulator kernels
call them as the Python they are).
"""
import numpy as _np

if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack

from numba.cuda.core import config as _config  # noqa: E402

if not _config.ENABLE_CUDASIM:
    from numba.cuda.extending import register_jitable as _register_jitable

    from ...quants import JITABLES as _JITABLES

    for _fn, _fast in _JITABLES:
        _register_jitable(forceinline=True)(_fn)
