"""The inner loop of the 8-bit mat-vec as LLVM vector code: 16 weight rows against q8 activations.

LLVM vectorizes an 8-bit dot product written as a numba loop, but only through 32-bit lanes
(vpmovzxbd + vpmaddwd: about 2 weights per instruction), and never into AVX-512 VNNI's vpdpbusd,
which multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 products into one of 16 int32
lanes. So this one loop is written as LLVM IR, one intrinsic per kind (dot_q4_0, dot_q4_1,
dot_q8_0; `dot_rows16(kind, ...)` picks one by KIND_ID at run time):

    dot(res, w, g, xq, xd, xsq)

that leaves in res[0:16] the dot products of the 16 rows of row group g of a packed matrix
(layout.py: w (G, n_blocks * block_bytes(kind)) uint8, each block its quants then 16 f16 scales d
and, for q4_1, 16 f16 mins m) with the quantized activations (xq (cols,) int8; per 32-value block
b: scale xd[b] f32, sum of quants xsq[b] int32). Lane i of the int32 accumulator is row i of the
group; each 64-byte load of quants holds 4 values of every row, and the 4 activation bytes that
pair with them are broadcast to all lanes:

    kind "q4_0"  y = d*(q-8):  4 loads per block; low nibbles pair with x[4k:4k+4], high with
                 x[16+4k:20+4k]; row sum += (xd * (dot - 8*xsq)) * d
    kind "q4_1"  y = d*q + m:  as q4_0; row sum += (xd * dot) * d + (xd * xsq) * m
    kind "q8_0"  y = d*q:      8 loads per block of bytes q+128 (unsigned); row sum +=
                 (xd * (dot - 128*xsq)) * d

The integer sums are exact; the float steps are float32, in this order, each `+ a * b` one fused
multiply-add. Each block also prefetches the bytes PREFETCH ahead of it. On a CPU without AVX-512
VNNI the same IR spells vpdpbusd out as widening multiplies and adds, which LLVM lowers for the
host (slower, the same bits: tested). The choice follows the CPU numba compiles for
(NUMBA_CPU_NAME / NUMBA_CPU_FEATURES), by which numba's cache keys kernels too.
"""
from __future__ import annotations

import llvmlite.binding as ll
from llvmlite import ir
from numba.core import cgutils, config, types
from numba.extending import intrinsic, register_jitable

R = 16                                   # rows per group: the int32 lanes of one 512-bit vector
KINDS = {"q4_0": (4, 8), "q4_1": (4, 0), "q8_0": (8, 128)}   # kind -> (64-byte loads per block,
#                                                               offset of the unsigned quants)

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VI = ir.VectorType(_I32, R)
_VF = ir.VectorType(ir.FloatType(), R)
_VH = ir.VectorType(ir.HalfType(), R)
_FMA = ("contract",)                     # a * b + c may fuse; nothing is reassociated
PREFETCH = 4096                          # bytes ahead of the block in use to prefetch (0: none)


def block_bytes(kind: str) -> int:
    """Bytes of one packed block of 16 rows x 32 values: quants, d, (m)."""
    return 64 * KINDS[kind][0] + (64 if kind == "q4_1" else 32)


def has_vnni() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI (vpdpbusd on 512-bit vectors)."""
    if config.CPU_FEATURES is not None:
        feats = config.CPU_FEATURES
    elif config.CPU_NAME not in (None, "host"):
        return False                     # a named generic CPU: assume nothing
    else:
        feats = ll.get_host_cpu_features().flatten()
    return all(f"+{f}" in feats.split(",") for f in ("avx512f", "avx512bw", "avx512vnni"))


def _dpbusd(builder, acc, w, x, vnni: bool):
    """acc + per int32 lane the sum of the 4 products u8(w byte) * i8(x byte) of that lane."""
    if vnni:
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512",
                                              fnty=ir.FunctionType(_VI, [_VI, _VI, _VI]))
        return builder.call(fn, [acc, w, x])
    v64 = ir.VectorType(_I32, 4 * R)
    b64 = ir.VectorType(_I8, 4 * R)
    p = builder.mul(builder.zext(builder.bitcast(w, b64), v64),
                    builder.sext(builder.bitcast(x, b64), v64))
    for j in range(4):
        lanes = ir.Constant(_VI, list(range(j, 4 * R, 4)))
        acc = builder.add(acc, builder.shuffle_vector(p, ir.Constant(v64, None), lanes))
    return acc


def _splat(builder, value, vec_ty):
    v = builder.insert_element(ir.Constant(vec_ty, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vec_ty, None), ir.Constant(_VI, [0] * R))


def _row(builder, arr, g, ty):
    """Pointer (to `ty`) to row g of a 2-D array, by its row stride in bytes."""
    base = builder.bitcast(arr.data, _I8.as_pointer())
    p = builder.gep(base, [builder.mul(g, builder.extract_value(arr.strides, 0))])
    return builder.bitcast(p, ty.as_pointer())


def _at(builder, base, offset, ty):
    """Unaligned load of a `ty` at base + offset (elements of base's type)."""
    return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=1)


def _i64(v: int):
    return ir.Constant(_I64, v)


def _prefetch(builder, wb, nbytes: int) -> None:
    """Prefetch the nbytes (a block's) PREFETCH bytes past wb: the blocks after the one in use,
    across row groups and matrices (an arena holds them in the order they are read)."""
    fn = builder.module.declare_intrinsic(
        "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]))
    for line in range(0, nbytes, 64):          # read, keep in all cache levels, data
        builder.call(fn, [builder.gep(wb, [_i64(PREFETCH + line)]), ir.Constant(_I32, 0),
                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _block_dot(builder, wb, xb, loads: int, vnni: bool):
    """Per lane (row) i the int32 dot of the block's unsigned quants at wb with the 32 int8
    activations at xb: two chains of vpdpbusd (so that they overlap), then added."""
    nib = ir.Constant(_VI, [0x0F0F0F0F] * R)
    dots = [ir.Constant(_VI, [0] * R)] * 2
    for k in range(loads):
        v = _at(builder, wb, _i64(64 * k), _VI)
        if loads == 4:              # nibbles: low ones pair with x[4k..], high ones with x[16+4k..]
            lo = builder.and_(v, nib)
            hi = builder.and_(builder.lshr(v, ir.Constant(_VI, [4] * R)), nib)
            for c, (half, q) in enumerate(((0, lo), (16, hi))):
                xw = _splat(builder, _at(builder, xb, _i64(half + 4 * k), _I32), _VI)
                dots[c] = _dpbusd(builder, dots[c], q, xw, vnni)
        else:                       # bytes: load k pairs with x[4k..]
            xw = _splat(builder, _at(builder, xb, _i64(4 * k), _I32), _VI)
            dots[k & 1] = _dpbusd(builder, dots[k & 1], v, xw, vnni)
    return builder.add(dots[0], dots[1])


def _dot_rows16(kind: str, vnni: bool):
    """The intrinsic dot(res, w, g, xq, xd, xsq) for one packed kind (see the module doc)."""
    loads, offset = KINDS[kind]
    bb, d_at = block_bytes(kind), 64 * loads          # bytes per block; where its d (then m) are

    def body(context, builder, sig, args):
        arrs = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a
                for t, a in zip(sig.args, args)]
        res, xq, xd, xsq = (arrs[i].data for i in (0, 3, 4, 5))
        w = _row(builder, arrs[1], args[2], _I8)
        n_blocks = builder.extract_value(arrs[4].shape, 0)
        acc_slot = cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * R))
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            wb = builder.gep(w, [builder.mul(b, _i64(bb))])
            if PREFETCH:
                _prefetch(builder, wb, bb)
            dot = _block_dot(builder, wb, builder.gep(xq, [builder.mul(b, _i64(32))]), loads,
                             vnni)
            sq = _splat(builder, builder.load(builder.gep(xsq, [b])), _VI)
            if offset:                                                       # dot - off * xsq
                dot = builder.sub(dot, builder.mul(sq, ir.Constant(_VI, [offset] * R)))
            xdb = _splat(builder, builder.load(builder.gep(xd, [b])), _VF)
            dv = builder.fpext(_at(builder, wb, _i64(d_at), _VH), _VF)
            t = builder.fmul(xdb, builder.sitofp(dot, _VF))                  # xd * dot
            acc = builder.fadd(builder.load(acc_slot), builder.fmul(t, dv, flags=_FMA),
                               flags=_FMA)                                   # acc + t * d
            if kind == "q4_1":                                               # acc + xd*xsq * m
                mv = builder.fpext(_at(builder, wb, _i64(d_at + 32), _VH), _VF)
                xs = builder.fmul(xdb, builder.sitofp(sq, _VF))
                acc = builder.fadd(acc, builder.fmul(xs, mv, flags=_FMA), flags=_FMA)
            builder.store(acc, acc_slot)
        builder.store(builder.load(acc_slot), builder.bitcast(res, _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    @intrinsic
    def dot(typingctx, res, w, g, xq, xd, xsq):
        return types.void(res, w, types.intp, xq, xd, xsq), body

    return dot


# Module globals, not closure cells: numba keys a cached kernel by the pickled contents of its
# closure, and an intrinsic pickles differently in every process (the kernel would never load).
VNNI = has_vnni()
dot_q4_0, dot_q4_1, dot_q8_0 = (_dot_rows16(kind, VNNI) for kind in KINDS)
KIND_ID = {kind: i for i, kind in enumerate(KINDS)}
GENERIC_ROWS16 = {kind: _dot_rows16(kind, False) for kind in KINDS}  # the portable IR, for tests


@register_jitable(inline="always")
def dot_rows16(kind, res, w, g, xq, xd, xsq):
    """The dot of kind KIND_ID `kind` (a branch per row group: the kernels serve every kind)."""
    if kind == 0:
        dot_q4_0(res, w, g, xq, xd, xsq)
    elif kind == 1:
        dot_q4_1(res, w, g, xq, xd, xsq)
    else:
        dot_q8_0(res, w, g, xq, xd, xsq)


# --- two activation rows per weight load (a batched step's decode rows) ------------------------

def _dot_rows16_x2(kind: str, vnni: bool, n_rows: int = 2):
    """dot2(res, w, g, xq, xd, xsq, t): res (n_rows, 16) f32 <- rows t .. t + n_rows - 1 (2 or
    4) of xq (n, cols) int8, xd, xsq (n, cols/32) against row group g of w, each row's arithmetic
    exactly dot(res[r], w, g, xq[t + r], xd[t + r], xsq[t + r]) (the same integer dot, the same
    float steps in the same order); each 64-byte load of weights (and its nibble split) serves
    every row."""
    loads, offset = KINDS[kind]
    bb, d_at = block_bytes(kind), 64 * loads
    nib = ir.Constant(_VI, [0x0F0F0F0F] * R)

    def block_dots(builder, wb, xbs):
        quants = []
        for k in range(loads):
            v = _at(builder, wb, _i64(64 * k), _VI)
            if loads == 4:
                quants.append((builder.and_(v, nib), builder.and_(
                    builder.lshr(v, ir.Constant(_VI, [4] * R)), nib)))
            else:
                quants.append((v,))
        out = []
        for xb in xbs:                   # _block_dot's order: two chains, then added
            dots = [ir.Constant(_VI, [0] * R)] * 2
            for k in range(loads):
                if loads == 4:
                    for c, (half, q) in enumerate(((0, quants[k][0]), (16, quants[k][1]))):
                        xw = _splat(builder, _at(builder, xb, _i64(half + 4 * k), _I32), _VI)
                        dots[c] = _dpbusd(builder, dots[c], q, xw, vnni)
                else:
                    xw = _splat(builder, _at(builder, xb, _i64(4 * k), _I32), _VI)
                    dots[k & 1] = _dpbusd(builder, dots[k & 1], quants[k][0], xw, vnni)
            out.append(builder.add(dots[0], dots[1]))
        return out

    def body(context, builder, sig, args):
        arrs = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a
                for t, a in zip(sig.args, args)]
        w = _row(builder, arrs[1], args[2], _I8)
        rows = [builder.add(args[6], _i64(r)) for r in range(n_rows)]
        xqs = [_row(builder, arrs[3], r, _I8) for r in rows]
        xds = [_row(builder, arrs[4], r, ir.FloatType()) for r in rows]
        xsqs = [_row(builder, arrs[5], r, _I32) for r in rows]
        n_blocks = builder.extract_value(arrs[4].shape, 1)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * R))
                 for _ in range(n_rows)]
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            wb = builder.gep(w, [builder.mul(b, _i64(bb))])
            if PREFETCH:
                _prefetch(builder, wb, bb)
            dots = block_dots(builder, wb, [builder.gep(x, [builder.mul(b, _i64(32))])
                                            for x in xqs])
            dv = builder.fpext(_at(builder, wb, _i64(d_at), _VH), _VF)
            mv = builder.fpext(_at(builder, wb, _i64(d_at + 32), _VH), _VF) \
                if kind == "q4_1" else None
            for r in range(n_rows):
                dot = dots[r]
                sq = _splat(builder, builder.load(builder.gep(xsqs[r], [b])), _VI)
                if offset:
                    dot = builder.sub(dot, builder.mul(sq, ir.Constant(_VI, [offset] * R)))
                xdb = _splat(builder, builder.load(builder.gep(xds[r], [b])), _VF)
                t = builder.fmul(xdb, builder.sitofp(dot, _VF))
                acc = builder.fadd(builder.load(slots[r]), builder.fmul(t, dv, flags=_FMA),
                                   flags=_FMA)
                if mv is not None:
                    xs = builder.fmul(xdb, builder.sitofp(sq, _VF))
                    acc = builder.fadd(acc, builder.fmul(xs, mv, flags=_FMA), flags=_FMA)
                builder.store(acc, slots[r])
        res = _row(builder, arrs[0], _i64(0), _I8)
        for r in range(n_rows):
            dst = builder.gep(res, [builder.mul(_i64(r), builder.extract_value(arrs[0].strides,
                                                                                0))])
            builder.store(builder.load(slots[r]), builder.bitcast(dst, _VF.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    @intrinsic
    def dot2(typingctx, res, w, g, xq, xd, xsq, t):
        return types.void(res, w, types.intp, xq, xd, xsq, types.intp), body

    return dot2


dot2_q4_0, dot2_q4_1, dot2_q8_0 = (_dot_rows16_x2(kind, VNNI) for kind in KINDS)
GENERIC_ROWS16_X2 = {kind: _dot_rows16_x2(kind, False) for kind in KINDS}  # for tests
# four rows a weight pass (a batched step's decode rows, 4 and more: the weights' loads and nibble
# splits shared by twice the rows; SmolLM2 on 2 cores, a 4-row step's products 6.25 -> 5.65 ms)
dot4_q4_0, dot4_q4_1, dot4_q8_0 = (_dot_rows16_x2(kind, VNNI, 4) for kind in KINDS)
GENERIC_ROWS16_X4 = {kind: _dot_rows16_x2(kind, False, 4) for kind in KINDS}  # for tests


@register_jitable(inline="always")
def dot2_rows16(kind, res, w, g, xq, xd, xsq, t):
    """dot_rows16 of rows t and t + 1 of xq (n, cols) into res (2, 16), one weight pass."""
    if kind == 0:
        dot2_q4_0(res, w, g, xq, xd, xsq, t)
    elif kind == 1:
        dot2_q4_1(res, w, g, xq, xd, xsq, t)
    else:
        dot2_q8_0(res, w, g, xq, xd, xsq, t)


@register_jitable(inline="always")
def dot4_rows16(kind, res, w, g, xq, xd, xsq, t):
    """dot_rows16 of rows t .. t + 3 of xq (n, cols) into res (4, 16), one weight pass."""
    if kind == 0:
        dot4_q4_0(res, w, g, xq, xd, xsq, t)
    elif kind == 1:
        dot4_q4_1(res, w, g, xq, xd, xsq, t)
    else:
        dot4_q8_0(res, w, g, xq, xd, xsq, t)
