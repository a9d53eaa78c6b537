"""quants.py's block decoders, as numba-cuda device functions.

numba-cuda also consults numba's CPU registry, where quants.py registers the decoders for
numba-IR inlining; once the CPU backend has compiled them, numba-cuda would pick those CPU
templates and fail to inline them. So the CUDA backend compiles its own copies: the same code
objects, bound to a copy of quants.py's globals in which every decoder helper (and f16_to_f32, the
hardware cvt.f32.f16 here) is the CUDA copy. Under the simulator the copies run as plain Python.
"""
from __future__ import annotations

import types as pytypes

from ._sim import SIMULATOR

from ... import quants
from .intrinsics import f16_bits_to_f32


def _copy(fn, namespace):
    c = pytypes.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    c.__qualname__, c.__doc__ = fn.__qualname__, fn.__doc__
    return c


def _build():
    namespace = dict(vars(quants))
    copies = {fn.__name__: _copy(fn, namespace) for fn in quants.JITABLES}
    namespace.update(copies)
    if not SIMULATOR:
        import numpy as np
        from numba.cuda.extending import register_jitable

        def f16(lo, hi):
            return f16_bits_to_f32(np.uint32(lo) | (np.uint32(hi) << np.uint32(8)))
        namespace["f16_to_f32"] = f16
        for fn in [f16, *copies.values()]:
            register_jitable(forceinline=True)(fn)
    return copies, {t: (copies[dq.__name__], copies[dot.__name__])
                    for t, (dq, dot) in quants.DECODERS.items()}


HELPERS, DECODERS = _build()   # HELPERS: every quants.py jitable by name (_k_scale_min, _f16, ...)
