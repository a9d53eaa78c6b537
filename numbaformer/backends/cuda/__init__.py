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
    from numba.cuda.extending import overload as _overload
    from numba.cuda.extending import register_jitable as _register_jitable

    from ...quants import JITABLES as _JITABLES
    from ...quants import f16_to_f32 as _f16_to_f32
    from .intrinsics import f16_bits_to_f32 as _cvt

    for _fn in _JITABLES:
        _register_jitable(forceinline=True)(_fn)

    @_overload(_f16_to_f32, target="cuda")
    def _ol_f16_to_f32(lo, hi):
        """Halves on the GPU: the hardware cvt.f32.f16."""
        return lambda lo, hi: _cvt(np_uint32(lo) | (np_uint32(hi) << 8))

    from numpy import uint32 as np_uint32
