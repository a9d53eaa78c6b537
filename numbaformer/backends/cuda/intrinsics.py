"""Device-side helpers for the CUDA kernels: vector loads, f16 -> f32, float bit casts, int8 dot,
byte permute, funnel shift, and warp shuffles that also run under the simulator.

Each helper is a plain Python function, the exact reference and what runs under NUMBA_ENABLE_CUDASIM=1
(the simulator calls kernels as Python), with an `@overload` for the CUDA target that emits the one PTX
instruction named in its docstring. Kernels call them by the same name on both:

    from numbaformer.backends.cuda.intrinsics import load_u32x4, dp4a
    w0, w1, w2, w3 = load_u32x4(qweight, i)          # one ld.global.nc.v4.u32

Inline asm (not LLVM intrinsics) is used because NVVM keeps it verbatim, so the instruction is
guaranteed. The asm is pure (no side effects, no memory clobber): LLVM may hoist, merge or drop it like
any arithmetic; that is right for the loads only because they read data the kernel does not write.

numba's cache keys a kernel on its own file only, not on this one (docs/numba-cuda-notes.md, "cache=True").
"""
import threading

import numpy as np
from ._sim import SIMULATOR

_U32 = 0xFFFFFFFF


def _s32(x):
    """Python int -> numpy int32, wrapping modulo 2**32 like the hardware."""
    return np.int32(((x + 0x80000000) & _U32) - 0x80000000)


class MisalignedLoad(RuntimeError):
    """A vector load's address is not a multiple of its size (the GPU's misaligned-address fault)."""


def _aligned(arr, j, nbytes):
    """Under the simulator, what the GPU faults on: element j of arr not at a multiple of nbytes.
    Host arrays (malloc) start 16-byte aligned, as device allocations (256) do, so an offset that
    breaks the alignment on the GPU breaks it here too (a row of a (n, 198) float32 array...)."""
    a = getattr(arr, "_ary", arr)
    addr = a.__array_interface__["data"][0] + j * a.itemsize
    if addr % nbytes:
        raise MisalignedLoad(f"{nbytes}-byte load at an address {addr % nbytes} bytes past "
                             f"alignment (element {j} of an array of {a.shape})")


def load_u32x4(arr, i):
    """Words arr[4i .. 4i+3] of a 1-D C-contiguous uint32 array, as a tuple of 4 uint32.

    PTX: one `ld.global.nc.v4.u32` (16 bytes). The caller guarantees the address is 16-byte aligned
    (arr starts at a device allocation, 256-byte aligned, or an offset that is a multiple of 4 words)
    and that arr is not written by the same kernel (.nc is the read-only path). The simulator checks
    the alignment (MisalignedLoad), as do the other vector loads.
    """
    j = 4 * i
    _aligned(arr, j, 16)
    return arr[j], arr[j + 1], arr[j + 2], arr[j + 3]


def load_u32x2(arr, i):
    """Words arr[2i], arr[2i+1] of a 1-D C-contiguous uint32 array: one `ld.global.nc.v2.u32`, 8-byte
    aligned; same contract as load_u32x4."""
    j = 2 * i
    _aligned(arr, j, 8)
    return arr[j], arr[j + 1]


def as_f32(u):
    """The float32 whose bit pattern is the low 32 bits of integer u (a bit cast, no instruction)."""
    return np.uint32(int(u) & _U32).view(np.float32)


def f32_bits(x):
    """The bit pattern of float32 x as uint32 (a bit cast, no instruction)."""
    return np.float32(x).view(np.uint32)


def load_f32x4(arr, i):
    """arr[4i .. 4i+3] of a 1-D C-contiguous float32 array (global or shared) as one 16-byte vector
    load; the caller guarantees 16-byte alignment."""
    j = 4 * i
    _aligned(arr, j, 16)
    return arr[j], arr[j + 1], arr[j + 2], arr[j + 3]


def load_u32x4_shared(arr, i):
    """load_f32x4 for a uint32 array: words arr[4i .. 4i+3] (global or shared, plain ld.v4: the
    array may be written by the kernel, e.g. staged activations in shared memory)."""
    j = 4 * i
    _aligned(arr, j, 16)
    return arr[j], arr[j + 1], arr[j + 2], arr[j + 3]


def f16_bits_to_f32(h):
    """float32 value of the IEEE half whose bits are the low 16 bits of integer h (higher bits are
    ignored, so `w >> 16` and `w & 0xFFFF` of a uint32 word are the two halves). PTX: `cvt.f32.f16`,
    exact for every input (subnormals, infinities; NaN stays NaN)."""
    return np.float32(np.uint16(int(h) & 0xFFFF).view(np.float16))


def dp4a(a, b, c):
    """c + sum over k of int8 byte k of a times int8 byte k of b, as int32 (wrapping). a and b are
    32-bit words of 4 packed signed bytes (any integer type; the low 32 bits are used). PTX:
    `dp4a.s32.s32`."""
    a, b, acc = int(a) & _U32, int(b) & _U32, int(c)
    for k in range(0, 32, 8):
        x, y = (a >> k) & 0xFF, (b >> k) & 0xFF
        acc += (x - ((x & 0x80) << 1)) * (y - ((y & 0x80) << 1))
    return _s32(acc)


def prmt(a, b, sel):
    """Byte permute, PTX `prmt.b32` (default mode), as uint32. The 8 source bytes are a (bytes 0-3)
    then b (bytes 4-7); nibble k of sel picks result byte k: its low 3 bits select a source byte, its
    bit 3 replaces that byte by its sign (0xFF or 0x00). Uses: byte-table lookups from 3-bit indices
    (a 16-entry table, as IQ4_NL's, takes one prmt per 8-entry half and a select on bit 3),
    sign-extending bytes, gathering bytes."""
    src = ((int(b) & _U32) << 32) | (int(a) & _U32)
    out = 0
    for k in range(4):
        s = (int(sel) >> (4 * k)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return np.uint32(out)


def shf_r(lo, hi, n):
    """Funnel shift right, PTX `shf.r.wrap.b32`: the low 32 bits of the 64-bit (hi:lo) shifted right by
    n & 31, as uint32. Reads a bit field that straddles two words (5- and 6-bit quants)."""
    return np.uint32(((((int(hi) & _U32) << 32) | (int(lo) & _U32)) >> (int(n) & 31)) & _U32)


# Warp shuffles: on the GPU these are numba's cuda.shfl_*_sync (value int32, int64, float32 or
# float64; cast a uint32 first). The simulator has none (numba issue 8433), so here every participating
# lane posts its value in a slot of its warp and waits on a barrier per (block, warp, mask), then reads
# its source lane's slot. The slots are double-buffered by the parity of the lane's call count: a
# lane may post its next call's value while others still read this call's, and cannot get two calls
# ahead, since the next barrier waits for every lane. As on the hardware, every lane named in mask
# must make the same calls; a source lane outside mask is an error (undefined on the GPU). The warp
# and lane come from the simulator's BlockThread (thread_id, _manager: numba-cuda 0.30.4
# simulator/kernel.py).

_SIM_LOCK = threading.Lock()
_SIM_TIMEOUT_S = 60.0


def _sim_warp(mask, value):
    """Post value for this lane and wait for the lanes of mask: (lane, lanes, slots of this call,
    the warp's shared state). The state's "memo" lets one lane compute a warp-wide result."""
    t = threading.current_thread()  # the simulator's BlockThread for this CUDA thread
    warp, lane = divmod(t.thread_id, 32)
    nthreads = int(np.prod(t._manager._block_dim))
    lanes = int(mask) & ((1 << min(32, nthreads - 32 * warp)) - 1)
    with _SIM_LOCK:
        warps = t._manager.__dict__.setdefault("_nf_warps", {})
        if (warp, lanes) not in warps:
            warps[warp, lanes] = {"barrier": threading.Barrier(bin(lanes).count("1"),
                                                               timeout=_SIM_TIMEOUT_S),
                                  "slots": ([None] * 32, [None] * 32), "memo": [None, None],
                                  "lock": threading.Lock()}
        state = warps[warp, lanes]
    calls = t.__dict__.setdefault("_nf_calls", {})
    n = calls.get((warp, lanes), 0)
    calls[warp, lanes] = n + 1
    slots = state["slots"][n & 1]
    slots[lane] = value
    state["barrier"].wait()
    return lane, lanes, n, slots, state


def _sim_exchange(mask, value, src_of):
    lane, lanes, _, slots, _ = _sim_warp(mask, value)
    src = src_of(lane)
    if not (lanes >> lane) & 1 or not (lanes >> src) & 1:
        raise RuntimeError(f"shuffle: lane {lane} -> {src} outside mask {int(mask):#x} of the warp")
    return slots[src]


def _sim_warp_op(value, compute):
    """Under the simulator: every lane of the warp posts value; compute(values of lanes 0..31) runs
    once for the warp (by whichever lane gets there first) and each lane gets (its lane, the
    result). mma.py's warp-wide emulations (mma, ldmatrix) use it. All 32 lanes must call it, as
    .sync.aligned instructions require of a full warp."""
    lane, lanes, n, slots, state = _sim_warp(0xFFFFFFFF, value)
    if lanes != 0xFFFFFFFF:
        raise RuntimeError("warp-wide emulation needs whole warps (blockDim a multiple of 32)")
    with state["lock"]:
        memo = state["memo"][n & 1]
        if memo is None or memo[0] != n:
            memo = (n, compute(slots))
            state["memo"][n & 1] = memo
    return lane, memo[1]


def syncwarp():
    """Barrier for the 32 lanes of the warp (cuda.syncwarp()): orders their shared-memory writes
    before the reads that follow."""
    _sim_exchange(0xFFFFFFFF, 0, lambda lane: lane)


def shfl_sync(mask, value, src_lane):
    """value from lane src_lane & 31 (cuda.shfl_sync)."""
    return _sim_exchange(mask, value, lambda lane: int(src_lane) & 31)


def shfl_xor_sync(mask, value, lane_mask):
    """value from lane (lane ^ lane_mask), butterfly reductions (cuda.shfl_xor_sync)."""
    return _sim_exchange(mask, value, lambda lane: lane ^ (int(lane_mask) & 31))


def shfl_down_sync(mask, value, delta):
    """value from lane + delta, or the lane's own value past lane 31 (cuda.shfl_down_sync)."""
    return _sim_exchange(mask, value, lambda lane: lane + delta if lane + delta < 32 else lane)


def shfl_up_sync(mask, value, delta):
    """value from lane - delta, or the lane's own value below lane 0 (cuda.shfl_up_sync)."""
    return _sim_exchange(mask, value, lambda lane: lane - delta if lane >= delta else lane)


if not SIMULATOR:
    from llvmlite import ir
    from numba import cuda, types
    from numba.cuda.core.errors import NumbaTypeError
    from numba.cuda.extending import intrinsic, overload

    _i32 = ir.IntType(32)

    def _vector_load(n):
        """Intrinsic: n consecutive words arr[n*i ...] by one ld.global.nc.v{n}.u32."""
        regs = ", ".join(f"${k}" for k in range(n))
        asm = f"ld.global.nc.v{n}.u32 {{{regs}}}, [${n}];"

        @intrinsic
        def load(typingctx, arr, i):
            if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
                    and arr.dtype == types.uint32 and isinstance(i, types.Integer)):
                raise NumbaTypeError(f"load_u32x{n} needs a 1-D C-contiguous uint32 array and an "
                                     f"integer index, got {arr}, {i}")
            rettype = types.UniTuple(types.uint32, n)

            def codegen(context, builder, sig, args):
                ary = context.make_array(sig.args[0])(context, builder, args[0])
                idx = context.cast(builder, args[1], sig.args[1], types.intp)
                ptr = builder.gep(ary.data, [builder.mul(idx, context.get_constant(types.intp, n))])
                fnty = ir.FunctionType(ir.LiteralStructType([_i32] * n), [ptr.type])
                words = builder.call(ir.InlineAsm(fnty, asm, ",".join(["=r"] * n + ["l"])), [ptr])
                return context.make_tuple(builder, rettype,
                                          [builder.extract_value(words, k) for k in range(n)])

            return rettype(arr, i), codegen

        return load

    _ld_v4, _ld_v2 = _vector_load(4), _vector_load(2)

    @intrinsic
    def _bitcast_f32(typingctx, u):
        if not isinstance(u, types.Integer):
            raise NumbaTypeError(f"as_f32 needs an integer, got {u}")

        def codegen(context, builder, sig, args):
            bits = context.cast(builder, args[0], sig.args[0], types.uint32)
            return builder.bitcast(bits, ir.FloatType())

        return types.float32(u), codegen

    @intrinsic
    def _bits_of_f32(typingctx, x):
        if not isinstance(x, types.Float):
            raise NumbaTypeError(f"f32_bits needs a float, got {x}")

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(v, _i32)

        return types.uint32(x), codegen

    @intrinsic
    def _ld_x4(typingctx, arr, i):
        """4 consecutive 32-bit elements (float32 or uint32) by one plain 16-byte vector load."""
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
                and arr.dtype in (types.float32, types.uint32) and isinstance(i, types.Integer)):
            raise NumbaTypeError(f"a 16-byte load needs a 1-D C-contiguous float32 or uint32 "
                                 f"array, got {arr}")
        rettype = types.UniTuple(arr.dtype, 4)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = builder.gep(ary.data, [builder.mul(idx, context.get_constant(types.intp, 4))])
            vty = ir.VectorType(context.get_value_type(sig.args[0].dtype), 4)
            vec = builder.load(builder.bitcast(ptr, vty.as_pointer(ptr.type.addrspace)), align=16)
            return context.make_tuple(builder, rettype, [
                builder.extract_element(vec, ir.Constant(_i32, k)) for k in range(4)])

        return rettype(arr, i), codegen

    @intrinsic
    def _cvt_f32_f16(typingctx, h):
        if not isinstance(h, types.Integer):
            raise NumbaTypeError(f"f16_bits_to_f32 needs an integer, got {h}")

        def codegen(context, builder, sig, args):
            bits = builder.trunc(context.cast(builder, args[0], sig.args[0], types.uint32),
                                 ir.IntType(16))
            fnty = ir.FunctionType(ir.FloatType(), [ir.IntType(16)])
            return builder.call(ir.InlineAsm(fnty, "cvt.f32.f16 $0, $1;", "=f,h"), [bits])

        return types.float32(h), codegen

    def _asm_intrinsic(asm, restype):
        """Intrinsic over three integer operands (cast to 32 bits) -> one 32-bit result."""

        @intrinsic
        def op(typingctx, a, b, c):
            if not all(isinstance(t, types.Integer) for t in (a, b, c)):
                raise NumbaTypeError(f"{asm.split()[0]} needs integers, got {a}, {b}, {c}")

            def codegen(context, builder, sig, args):
                ops = [context.cast(builder, v, t, types.uint32) for v, t in zip(args, sig.args)]
                fnty = ir.FunctionType(_i32, [_i32] * 3)
                return builder.call(ir.InlineAsm(fnty, asm, "=r,r,r,r"), ops)

            return restype(a, b, c), codegen

        return op

    _dp4a = _asm_intrinsic("dp4a.s32.s32 $0, $1, $2, $3;", types.int32)
    _prmt = _asm_intrinsic("prmt.b32 $0, $1, $2, $3;", types.uint32)
    _shf_r = _asm_intrinsic("shf.r.wrap.b32 $0, $1, $2, $3;", types.uint32)

    @overload(load_u32x4, target="cuda")
    def _ol_load_u32x4(arr, i):
        return lambda arr, i: _ld_v4(arr, i)

    @overload(load_u32x2, target="cuda")
    def _ol_load_u32x2(arr, i):
        return lambda arr, i: _ld_v2(arr, i)

    @overload(as_f32, target="cuda")
    def _ol_as_f32(u):
        return lambda u: _bitcast_f32(u)

    @overload(f32_bits, target="cuda")
    def _ol_f32_bits(x):
        return lambda x: _bits_of_f32(x)

    @overload(load_f32x4, target="cuda")
    def _ol_load_f32x4(arr, i):
        return lambda arr, i: _ld_x4(arr, i)

    @overload(load_u32x4_shared, target="cuda")
    def _ol_load_u32x4_shared(arr, i):
        return lambda arr, i: _ld_x4(arr, i)

    @overload(f16_bits_to_f32, target="cuda")
    def _ol_f16_bits_to_f32(h):
        return lambda h: _cvt_f32_f16(h)

    @overload(dp4a, target="cuda")
    def _ol_dp4a(a, b, c):
        return lambda a, b, c: _dp4a(a, b, c)

    @overload(prmt, target="cuda")
    def _ol_prmt(a, b, sel):
        return lambda a, b, sel: _prmt(a, b, sel)

    @overload(shf_r, target="cuda")
    def _ol_shf_r(lo, hi, n):
        return lambda lo, hi, n: _shf_r(lo, hi, n)

    @overload(syncwarp, target="cuda")
    def _ol_syncwarp():
        return lambda: cuda.syncwarp()

    @overload(shfl_sync, target="cuda")
    def _ol_shfl_sync(mask, value, src_lane):
        return lambda mask, value, src_lane: cuda.shfl_sync(mask, value, src_lane)

    @overload(shfl_xor_sync, target="cuda")
    def _ol_shfl_xor_sync(mask, value, lane_mask):
        return lambda mask, value, lane_mask: cuda.shfl_xor_sync(mask, value, lane_mask)

    @overload(shfl_down_sync, target="cuda")
    def _ol_shfl_down_sync(mask, value, delta):
        return lambda mask, value, delta: cuda.shfl_down_sync(mask, value, delta)

    @overload(shfl_up_sync, target="cuda")
    def _ol_shfl_up_sync(mask, value, delta):
        return lambda mask, value, delta: cuda.shfl_up_sync(mask, value, delta)
