"""CUDA backend: numba.cuda.jit kernels over the same op table as the CPU backend.

Importing this package applies the numpy shim numba-cuda 0.30 needs on numpy 2.5 (np.row_stack was
removed there; numba-cuda issue 907) before anything imports numba.cuda (decoders.py gives the
kernels their numba-cuda copies of quants.py's block decoders).
"""
import numpy as _np

if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack
