"""Tensor-core primitives: mma.sync (bf16 and f16 with f32 accumulators, s8 with s32), ldmatrix,
cp.async (+ commit, wait), and the packing and 16-byte shared-memory accesses around them.

The scheme of intrinsics.py: each is a plain Python function, which is what runs under
NUMBA_ENABLE_CUDASIM=1, with an `@overload` for the CUDA target emitting one inline-PTX instruction
(llvmlite `ir.InlineAsm`; an mma returns a struct of four registers, unpacked into a tuple):

    from numbaformer.backends.cuda.mma import ldmatrix_x4, mma_bf16
    a0, a1, a2, a3 = ldmatrix_x4(xs, chunk)            # ldmatrix.sync.aligned.m8n8.x4.shared.b16
    d0, d1, d2, d3 = mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

Under the simulator the warp-level primitives (mma_*, ldmatrix_*) are emulated for the whole warp:
every lane posts its operands (intrinsics._sim_warp_op, as the shuffles exchange values), one lane
assembles the tile from the 32 fragments by the layout below and computes it in NumPy, and each
lane takes its own fragment of the result. Like `.sync.aligned` on the GPU, all 32 lanes of the warp must make the same
call. cp.async copies are held per thread until the cp_async_wait that completes their group, so a
kernel that reads a stage before waiting for it reads stale data under the simulator too.

Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" and "mma.m16n8k32"), with
lane = 4 g + t (g = lane >> 2, the group; t = lane & 3, the thread in the group). A 32-bit register
holds two 16-bit values (low half: the lower column or k index) or four 8-bit ones (byte i: index
+ i). A is row-major M x K, B is K x N given by columns (the `.col`: W (N, K) row-major is B), C and
D are M x N:

    bf16 / f16 m16n8k16   A regs 0-3: A[g, 2t:2t+2], A[g+8, 2t:2t+2], A[g, 2t+8:2t+10], A[g+8, 2t+8:2t+10]
                          B regs 0-1: B[2t:2t+2, g], B[2t+8:2t+10, g]
    s8 m16n8k32           A regs 0-3: A[g, 4t:4t+4], A[g+8, 4t:4t+4], A[g, 4t+16:4t+20], A[g+8, 4t+16:4t+20]
                          B regs 0-1: B[4t:4t+4, g], B[4t+16:4t+20, g]
    s8 m16n8k16           A regs 0-1: A[g, 4t:4t+4], A[g+8, 4t:4t+4];  B reg 0: B[4t:4t+4, g]
    C, D (all)            c0, c1 = C[g, 2t], C[g, 2t+1];  c2, c3 = C[g+8, 2t], C[g+8, 2t+1]

Addresses: every 16-byte primitive takes an array and a *chunk* index i, the address being the
array's start plus 16 i bytes (the array must start 16-byte aligned: a device allocation, or the
dynamic shared memory with nothing static before it). Shared-memory arrays are numba's
`cuda.shared.array` (or slices of one); their 32-bit shared-window address is taken by an address
space cast.
"""
from __future__ import annotations

import threading

import numpy as np
from ._sim import SIMULATOR

from .intrinsics import _sim_warp_op

_U32 = 0xFFFFFFFF


# ---- the simulator's implementations: fragments <-> tiles -------------------------------------------

def _positions(kind):
    """(rows, cols) index arrays (32, n) of each lane's n fragment elements in its tile, register by
    register, low half / low byte first. kind: 'a16', 'b16' (m16n8k16, 16-bit), 'a8', 'b8'
    (m16n8k32, s8), 'a8k16', 'b8k16' (m16n8k16, s8), 'c'."""
    lane = np.arange(32)[:, None]
    g, t = lane >> 2, lane & 3
    if kind == "a16":
        e = np.arange(8)[None, :]
        r, h = e >> 1, e & 1
        return g + 8 * (r & 1), 2 * t + h + 8 * (r >> 1)
    if kind == "b16":
        e = np.arange(4)[None, :]
        r, h = e >> 1, e & 1
        return 2 * t + h + 8 * r, np.broadcast_to(g, (32, 4))
    if kind in ("a8", "a8k16"):
        e = np.arange(16 if kind == "a8" else 8)[None, :]
        r, i = e >> 2, e & 3
        return g + 8 * (r & 1), 4 * t + i + 16 * (r >> 1)
    if kind in ("b8", "b8k16"):
        e = np.arange(8 if kind == "b8" else 4)[None, :]
        r, i = e >> 2, e & 3
        return 4 * t + i + 16 * r, np.broadcast_to(g, (32, e.shape[1]))
    if kind == "c":
        e = np.arange(4)[None, :]
        return g + 8 * (e >> 1), 2 * t + (e & 1)
    raise ValueError(kind)


_POS = {k: _positions(k) for k in ("a16", "b16", "a8", "b8", "a8k16", "b8k16", "c")}


def _elements(regs, elem):
    """(32, n_regs) uint32 registers -> (32, n_elements) values: elem 'bf16', 'f16' or 's8'."""
    w = np.ascontiguousarray(regs, dtype=np.uint32)
    if elem == "s8":
        return w.view(np.int8).reshape(32, -1).astype(np.int64)
    half = w.view(np.uint16).reshape(32, -1)                  # little-endian: low half first
    if elem == "f16":
        return half.view(np.float16).astype(np.float64)
    return (half.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _tile(kind, values, shape):
    out = np.zeros(shape, dtype=values.dtype)
    rows, cols = _POS[kind]
    out[rows, cols] = values
    return out


def _sim_mma(a, b, c, elem, akind, bkind, k):
    def compute(frags):
        A = _tile(akind, _elements([f[0] for f in frags], elem), (16, k))
        B = _tile(bkind, _elements([f[1] for f in frags], elem), (k, 8))
        if elem == "s8":
            C = _tile("c", np.array([f[2] for f in frags], dtype=np.int64), (16, 8))
            return (A @ B + C).astype(np.int32)                     # wraps like the hardware
        C = _tile("c", np.array([f[2] for f in frags], dtype=np.float64), (16, 8))
        return (A @ B + C).astype(np.float32)

    lane, D = _sim_warp_op((a, b, c), compute)
    rows, cols = _POS["c"]
    return tuple(D[rows[lane], cols[lane]])


def _row16(arr, i):
    """The 8 16-bit values of the 16 bytes at chunk i of arr (a simulated array)."""
    raw = arr.reshape(-1).view(np.uint8)
    if (raw.ctypes.data + 16 * int(i)) % 16:
        raise RuntimeError("16-byte access not 16-byte aligned")
    return raw[16 * int(i):16 * int(i) + 16].view(np.uint16)


def _sim_ldmatrix(arr, i, n, trans):
    lane, rows = _sim_warp_op((arr, int(i)), lambda addrs: [_row16(*a).copy() for a in addrs])
    g, t = lane >> 2, lane & 3
    out = []
    for m in range(n):
        if trans:
            lo, hi = rows[8 * m + 2 * t][g], rows[8 * m + 2 * t + 1][g]
        else:
            lo, hi = rows[8 * m + g][2 * t], rows[8 * m + g][2 * t + 1]
        out.append(np.uint32(int(lo) | (int(hi) << 16)))
    return out[0] if n == 1 else tuple(out)


# ---- mma.sync ----------------------------------------------------------------------------------------

def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """D = A B + C for a 16 x 8 tile, k = 16: `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`.
    a*, b*: uint32 registers of two bf16 each, c*: float32; returns (d0, d1, d2, d3) float32, laid
    out as c (module docstring). Products are exact, the sum in f32."""
    return _sim_mma((a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3), "bf16", "a16", "b16", 16)


def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """mma_bf16 with f16 operands: `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`."""
    return _sim_mma((a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3), "f16", "a16", "b16", 16)


def mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """D = A B + C for a 16 x 8 tile, k = 32, int8 operands (four per register), int32 c and d:
    `mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32` (wrapping, no .satfinite)."""
    return _sim_mma((a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3), "s8", "a8", "b8", 32)


def mma_s8_k16(a0, a1, b0, c0, c1, c2, c3):
    """mma_s8 with k = 16 (one 16-value sub-block): `mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32`,
    two A registers and one B register."""
    return _sim_mma((a0, a1), (b0,), (c0, c1, c2, c3), "s8", "a8k16", "b8k16", 16)


# ---- ldmatrix ----------------------------------------------------------------------------------------

def ldmatrix_x4(arr, i):
    """Four 8 x 8 matrices of 16-bit values from shared memory:
    `ldmatrix.sync.aligned.m8n8.x4.shared.b16`. Lane l gives the address (chunk i of the shared array
    arr, 16 bytes: one row of 8 values) of row l & 7 of matrix l >> 3; it receives one uint32 per
    matrix m, holding row g, values 2t and 2t+1 of matrix m (low half first). So a 16 x 16 A tile
    whose rows are addressed by lanes 0-15 (k 0-7) and 16-31 (k 8-15) arrives as the four A
    registers of mma_bf16, and two 8-row groups of W (N, K) as two n-tiles' B registers."""
    return _sim_ldmatrix(arr, i, 4, False)


def ldmatrix_x2(arr, i):
    """Two matrices (`...m8n8.x2.shared.b16`): lanes 0-15 give the row addresses."""
    return _sim_ldmatrix(arr, i, 2, False)


def ldmatrix_x1(arr, i):
    """One matrix (`...m8n8.x1.shared.b16`): lanes 0-7 give the row addresses; returns one uint32."""
    return _sim_ldmatrix(arr, i, 1, False)


def ldmatrix_x4_trans(arr, i):
    """ldmatrix_x4 transposed (`...m8n8.x4.trans.shared.b16`): lane (g, t) receives values
    (row 2t, column g) and (row 2t+1, column g) of each matrix, low half first; the B registers
    of mma_bf16 from a K-major (k rows, n contiguous) tile."""
    return _sim_ldmatrix(arr, i, 4, True)


def ldmatrix_x2_trans(arr, i):
    """ldmatrix_x2 transposed (`...m8n8.x2.trans.shared.b16`)."""
    return _sim_ldmatrix(arr, i, 2, True)


# ---- cp.async ----------------------------------------------------------------------------------------

def _cp_state():
    t = threading.current_thread()
    return t.__dict__.setdefault("_nf_cp_async", {"open": [], "groups": []})


def cp_async16(dst, di, src, si):
    """Copy 16 bytes, chunk si of the global array src, to chunk di of the shared array dst,
    asynchronously: `cp.async.cg.shared.global [dst], [src], 16` (L2 only, bypassing L1). The
    data is there for this thread after the cp_async_wait that completes its group, and for
    the other threads after a barrier that follows that wait."""
    data = _row16(src, si).copy()
    _row16(dst, di)                                                  # the alignment check
    _cp_state()["open"].append((dst, int(di), data))


def cp_async_commit():
    """Close the group of this thread's cp.async copies issued since the last commit:
    `cp.async.commit_group`."""
    state = _cp_state()
    state["groups"].append(state["open"])
    state["open"] = []


def cp_async_wait(n):
    """Wait until at most n (a compile-time constant) of this thread's committed groups are
    pending, the newest ones: `cp.async.wait_group n`. cp_async_wait(0) waits for all of them."""
    groups = _cp_state()["groups"]
    while len(groups) > int(n):
        for dst, di, data in groups.pop(0):
            dst.reshape(-1).view(np.uint8)[16 * di:16 * di + 16] = data.view(np.uint8)


# ---- packing, shared 16-byte accesses ---------------------------------------------------------------

def _bf16_bits(x):
    bits = int(np.float32(x).view(np.uint32))
    if np.isnan(np.float32(x)):
        return 0x7FFF
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def pack_bf16x2(lo, hi):
    """Two float32 rounded to bf16 (to nearest, even), packed: lo in the low half.
    `cvt.rn.bf16x2.f32` (which takes the high value first)."""
    return np.uint32(_bf16_bits(lo) | (_bf16_bits(hi) << 16))


def pack_f16x2(lo, hi):
    """Two float32 rounded to f16 (to nearest, even), packed, lo in the low half:
    `cvt.rn.f16x2.f32`."""
    with np.errstate(over="ignore"):                                 # overflow rounds to inf
        h = np.array([lo, hi], dtype=np.float32).astype(np.float16).view(np.uint16)
    return np.uint32(int(h[0]) | (int(h[1]) << 16))


def load_shared_u32x4(arr, i):
    """Chunk i (16 bytes) of a shared uint32 array as 4 uint32: one `ld.shared.v4.u32`."""
    j = 4 * int(i)
    return arr[j], arr[j + 1], arr[j + 2], arr[j + 3]


def store_shared_u32x4(arr, i, a, b, c, d):
    """Store 4 words as chunk i (16 bytes) of a shared uint32 array: one `st.shared.v4.u32`."""
    j = 4 * int(i)
    arr[j], arr[j + 1], arr[j + 2], arr[j + 3] = a, b, c, d


def store_u32x4(arr, i, a, b, c, d):
    """Store 4 words as chunk i (16 bytes) of a C-contiguous uint32 array in global memory: one
    `st.global.v4.u32`; the chunk must be 16-byte aligned (the simulator checks it)."""
    _row16(arr, i)                                                   # the alignment check
    j = 4 * int(i)
    flat = arr.reshape(-1)
    flat[j], flat[j + 1], flat[j + 2], flat[j + 3] = a, b, c, d


if not SIMULATOR:
    from llvmlite import ir
    from numba import types
    from numba.cuda.core.errors import NumbaTypeError
    from numba.cuda.cudadrv import nvvm
    from numba.cuda.extending import intrinsic, overload

    _i8, _i32, _f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()

    def _check_array(name, arr, i):
        if not (isinstance(arr, types.Array) and arr.layout == "C" and isinstance(i, types.Integer)):
            raise NumbaTypeError(f"{name} needs a C-contiguous array and an integer chunk index, "
                                 f"got {arr}, {i}")

    def _byte_ptr(context, builder, arrty, arr, ity, i):
        """Generic i8* to chunk i (16 bytes) of the array."""
        ary = context.make_array(arrty)(context, builder, arr)
        idx = context.cast(builder, i, ity, types.int64)
        base = builder.bitcast(ary.data, ir.PointerType(_i8))
        return builder.gep(base, [builder.mul(idx, ir.Constant(ir.IntType(64), 16))])

    def _shared_addr(context, builder, arrty, arr, ity, i):
        """32-bit shared-window address of chunk i of a shared array (cvta.to.shared)."""
        ptr = _byte_ptr(context, builder, arrty, arr, ity, i)
        sptr = builder.addrspacecast(ptr, ir.PointerType(_i8, nvvm.ADDRSPACE_SHARED))
        return builder.ptrtoint(sptr, _i32)

    def _regs(context, builder, tup, tupty, to):
        return [context.cast(builder, builder.extract_value(tup, k), ty, to)
                for k, ty in enumerate(tupty)]

    def _mma_intrinsic(shape, elem, acc, n_a, n_b):
        """Intrinsic (a tuple, b tuple, c tuple) -> UniTuple(acc, 4) emitting one mma.sync."""
        d_ty = "f32" if acc == types.float32 else "s32"
        ops = [f"${k}" for k in range(4 + n_a + n_b + 4)]
        asm = (f"mma.sync.aligned.{shape}.row.col.{d_ty}.{elem}.{elem}.{d_ty} "
               f"{{{','.join(ops[:4])}}}, {{{','.join(ops[4:4 + n_a])}}}, "
               f"{{{','.join(ops[4 + n_a:4 + n_a + n_b])}}}, {{{','.join(ops[4 + n_a + n_b:])}}};")
        c_con = "f" if acc == types.float32 else "r"
        constraints = ",".join([f"={c_con}"] * 4 + ["r"] * (n_a + n_b) + [c_con] * 4)

        @intrinsic
        def mma(typingctx, a, b, c):
            for name, tup, n in (("a", a, n_a), ("b", b, n_b), ("c", c, 4)):
                if not (isinstance(tup, types.BaseTuple) and len(tup) == n
                        and all(isinstance(e, (types.Integer, types.Float)) for e in tup)):
                    raise NumbaTypeError(f"{asm.split()[0]}: {name} must be {n} numbers, got {tup}")
            rettype = types.UniTuple(acc, 4)

            def codegen(context, builder, sig, args):
                llacc = context.get_value_type(acc)
                regs = (_regs(context, builder, args[0], sig.args[0], types.uint32)
                        + _regs(context, builder, args[1], sig.args[1], types.uint32)
                        + _regs(context, builder, args[2], sig.args[2], acc))
                fnty = ir.FunctionType(ir.LiteralStructType([llacc] * 4),
                                       [_i32] * (n_a + n_b) + [llacc] * 4)
                res = builder.call(ir.InlineAsm(fnty, asm, constraints), regs)
                return context.make_tuple(builder, rettype,
                                          [builder.extract_value(res, k) for k in range(4)])

            return rettype(a, b, c), codegen

        return mma

    _mma_bf16 = _mma_intrinsic("m16n8k16", "bf16", types.float32, 4, 2)
    _mma_f16 = _mma_intrinsic("m16n8k16", "f16", types.float32, 4, 2)
    _mma_s8 = _mma_intrinsic("m16n8k32", "s8", types.int32, 4, 2)
    _mma_s8_k16 = _mma_intrinsic("m16n8k16", "s8", types.int32, 2, 1)

    def _ldmatrix_intrinsic(n, trans):
        regs = ",".join(f"${k}" for k in range(n))
        asm = (f"ldmatrix.sync.aligned.m8n8.x{n}{'.trans' if trans else ''}.shared.b16 "
               f"{{{regs}}}, [${n}];")

        @intrinsic
        def ld(typingctx, arr, i):
            _check_array(asm.split()[0], arr, i)
            rettype = types.uint32 if n == 1 else types.UniTuple(types.uint32, n)

            def codegen(context, builder, sig, args):
                addr = _shared_addr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
                if n == 1:
                    fnty = ir.FunctionType(_i32, [_i32])
                    return builder.call(ir.InlineAsm(fnty, asm, "=r,r", side_effect=True), [addr])
                fnty = ir.FunctionType(ir.LiteralStructType([_i32] * n), [_i32])
                res = builder.call(ir.InlineAsm(fnty, asm, ",".join(["=r"] * n + ["r"]),
                                                side_effect=True), [addr])
                return context.make_tuple(builder, rettype,
                                          [builder.extract_value(res, k) for k in range(n)])

            return rettype(arr, i), codegen

        return ld

    _ldm = {(n, tr): _ldmatrix_intrinsic(n, tr) for n in (1, 2, 4) for tr in (False, True)}

    @intrinsic
    def _cp_async16(typingctx, dst, di, src, si):
        _check_array("cp.async", dst, di)
        _check_array("cp.async", src, si)

        def codegen(context, builder, sig, args):
            saddr = _shared_addr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            gptr = _byte_ptr(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            fnty = ir.FunctionType(ir.VoidType(), [_i32, gptr.type])
            builder.call(ir.InlineAsm(fnty, "cp.async.cg.shared.global [$0], [$1], 16;",
                                      "r,l,~{memory}", side_effect=True), [saddr, gptr])
            return context.get_dummy_value()

        return types.void(dst, di, src, si), codegen

    def _asm_statement(asm):
        @intrinsic
        def stmt(typingctx):
            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.VoidType(), [])
                builder.call(ir.InlineAsm(fnty, asm, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()
            return types.void(), codegen
        return stmt

    _commit = _asm_statement("cp.async.commit_group;")
    _waits = {n: _asm_statement(f"cp.async.wait_group {n};") for n in range(8)}

    def _pack_intrinsic(asm):
        @intrinsic
        def pack(typingctx, lo, hi):
            if not all(isinstance(v, (types.Float, types.Integer)) for v in (lo, hi)):
                raise NumbaTypeError(f"{asm.split()[0]} needs two numbers, got {lo}, {hi}")

            def codegen(context, builder, sig, args):
                vals = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
                fnty = ir.FunctionType(_i32, [_f32, _f32])
                return builder.call(ir.InlineAsm(fnty, asm, "=r,f,f"), [vals[1], vals[0]])

            return types.uint32(lo, hi), codegen
        return pack

    _pack_bf16x2 = _pack_intrinsic("cvt.rn.bf16x2.f32 $0, $1, $2;")
    _pack_f16x2 = _pack_intrinsic("cvt.rn.f16x2.f32 $0, $1, $2;")

    def _shared_vec_ptr(context, builder, arrty, arr, ity, i):
        ptr = _byte_ptr(context, builder, arrty, arr, ity, i)
        vty = ir.VectorType(_i32, 4)
        return builder.addrspacecast(ptr, ir.PointerType(_i8, nvvm.ADDRSPACE_SHARED)), vty

    @intrinsic
    def _ld_shared_v4(typingctx, arr, i):
        _check_array("ld.shared.v4", arr, i)
        rettype = types.UniTuple(types.uint32, 4)

        def codegen(context, builder, sig, args):
            sptr, vty = _shared_vec_ptr(context, builder, sig.args[0], args[0], sig.args[1],
                                        args[1])
            vec = builder.load(builder.bitcast(sptr, ir.PointerType(vty, nvvm.ADDRSPACE_SHARED)),
                               align=16)
            return context.make_tuple(builder, rettype, [
                builder.extract_element(vec, ir.Constant(_i32, k)) for k in range(4)])

        return rettype(arr, i), codegen

    @intrinsic
    def _st_shared_v4(typingctx, arr, i, a, b, c, d):
        _check_array("st.shared.v4", arr, i)

        def codegen(context, builder, sig, args):
            sptr, vty = _shared_vec_ptr(context, builder, sig.args[0], args[0], sig.args[1],
                                        args[1])
            vec = ir.Constant(vty, ir.Undefined)
            for k in range(4):
                word = context.cast(builder, args[2 + k], sig.args[2 + k], types.uint32)
                vec = builder.insert_element(vec, word, ir.Constant(_i32, k))
            builder.store(vec, builder.bitcast(sptr, ir.PointerType(vty, nvvm.ADDRSPACE_SHARED)),
                          align=16)
            return context.get_dummy_value()

        return types.void(arr, i, a, b, c, d), codegen

    @intrinsic
    def _st_global_v4(typingctx, arr, i, a, b, c, d):
        _check_array("st.global.v4", arr, i)

        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            vty = ir.VectorType(_i32, 4)
            vec = ir.Constant(vty, ir.Undefined)
            for k in range(4):
                word = context.cast(builder, args[2 + k], sig.args[2 + k], types.uint32)
                vec = builder.insert_element(vec, word, ir.Constant(_i32, k))
            gptr = builder.addrspacecast(ptr, ir.PointerType(_i8, nvvm.ADDRSPACE_GLOBAL))
            builder.store(vec, builder.bitcast(gptr, ir.PointerType(vty, nvvm.ADDRSPACE_GLOBAL)),
                          align=16)
            return context.get_dummy_value()

        return types.void(arr, i, a, b, c, d), codegen

    @overload(mma_bf16, target="cuda")
    def _ol_mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return lambda a0, a1, a2, a3, b0, b1, c0, c1, c2, c3: _mma_bf16(
            (a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3))

    @overload(mma_f16, target="cuda")
    def _ol_mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return lambda a0, a1, a2, a3, b0, b1, c0, c1, c2, c3: _mma_f16(
            (a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3))

    @overload(mma_s8, target="cuda")
    def _ol_mma_s8(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return lambda a0, a1, a2, a3, b0, b1, c0, c1, c2, c3: _mma_s8(
            (a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3))

    @overload(mma_s8_k16, target="cuda")
    def _ol_mma_s8_k16(a0, a1, b0, c0, c1, c2, c3):
        return lambda a0, a1, b0, c0, c1, c2, c3: _mma_s8_k16((a0, a1), (b0,), (c0, c1, c2, c3))

    def _ol_ldmatrix(n, trans):
        ld = _ldm[n, trans]
        return lambda arr, i: (lambda arr, i: ld(arr, i))

    for _fn, _n, _tr in ((ldmatrix_x4, 4, False), (ldmatrix_x2, 2, False), (ldmatrix_x1, 1, False),
                         (ldmatrix_x4_trans, 4, True), (ldmatrix_x2_trans, 2, True)):
        overload(_fn, target="cuda")(_ol_ldmatrix(_n, _tr))

    @overload(cp_async16, target="cuda")
    def _ol_cp_async16(dst, di, src, si):
        return lambda dst, di, src, si: _cp_async16(dst, di, src, si)

    @overload(cp_async_commit, target="cuda")
    def _ol_cp_async_commit():
        return lambda: _commit()

    @overload(cp_async_wait, target="cuda", prefer_literal=True)
    def _ol_cp_async_wait(n):
        if not isinstance(n, types.IntegerLiteral) or n.literal_value not in _waits:
            raise NumbaTypeError(f"cp_async_wait needs a constant 0..7, got {n}")
        wait = _waits[n.literal_value]
        return lambda n: wait()

    @overload(pack_bf16x2, target="cuda")
    def _ol_pack_bf16x2(lo, hi):
        return lambda lo, hi: _pack_bf16x2(lo, hi)

    @overload(pack_f16x2, target="cuda")
    def _ol_pack_f16x2(lo, hi):
        return lambda lo, hi: _pack_f16x2(lo, hi)

    @overload(load_shared_u32x4, target="cuda")
    def _ol_load_shared_u32x4(arr, i):
        return lambda arr, i: _ld_shared_v4(arr, i)

    @overload(store_shared_u32x4, target="cuda")
    def _ol_store_shared_u32x4(arr, i, a, b, c, d):
        return lambda arr, i, a, b, c, d: _st_shared_v4(arr, i, a, b, c, d)

    @overload(store_u32x4, target="cuda")
    def _ol_store_u32x4(arr, i, a, b, c, d):
        return lambda arr, i, a, b, c, d: _st_global_v4(arr, i, a, b, c, d)
