#!/usr/bin/env python3
"""Where a fast mat-vec's time goes: the same kernel timed with one stage left out or changed.

usage: python scripts/gpu_probe.py [--types Q4_K,Q8_0] [--variants base,nostage,...]
Variants (each against the copy bandwidth measured in the same run, both Llama-3-8B shapes):
  base      today's launch (grid capped at the blocks that are resident at once)
  fullgrid  the grid of BLOCKS_PER_SM blocks per SM whatever the kernel's occupancy
  nostage   the activations are not staged (the weights stream and are dotted with garbage)
  nocompute the unit dots replaced by an XOR of the loaded words (loads and loop only)
  unroll4   4 units per row and lane in flight (2 today)
  split2    two warps share every row pair, each half its units
  prequant  x quantized by a kernel of its own (timed with it), every block reading it from L2
  pq-splitN prequant, and N warps of a block share each row pair (shorter chains for long rows)
  pairs     Q4_K/Q5_K: a lane takes two adjacent units with one scale decode (prequant implies it)
Prints the kernel's registers and resident blocks per SM beside each row; a table last.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench as B  # noqa: E402

from numbaformer.backends.cuda import gemv as G  # noqa: E402
from numbaformer.backends.cuda import gemv_q8 as Q8  # noqa: E402
from numbaformer.quants import TYPE_IDS  # noqa: E402

VARIANTS = {   # name -> module settings (GEMV_WARPS, BLOCKS_PER_SM, UNROLL, SPLIT, SPLIT_BELOW, PROBE)
    "base": {}, "fullgrid": {"fullgrid": True}, "nostage": {"PROBE": 1},
    "nocompute": {"PROBE": 2}, "unroll4": {"UNROLL": 4},
    "split2": {"SPLIT": 2, "SPLIT_BELOW": 1 << 30}, "prequant": {"PREQUANT": True},
    "pq-split2": {"PREQUANT": True, "SPLIT": 2, "SPLIT_BELOW": 1 << 30},
    "pq-split4": {"PREQUANT": True, "SPLIT": 4, "SPLIT_BELOW": 1 << 30},
    "pq-split8": {"PREQUANT": True, "SPLIT": 8, "SPLIT_BELOW": 1 << 30},
    "pairs": {"PAIR_UNITS": True},   # (prequant implies pair units for Q4_K/Q5_K)
}


def run_variant(name: str, qtype: int, shape, bw: float) -> tuple[float, str]:
    v = VARIANTS[name]
    saved = (Q8.UNROLL, Q8.SPLIT, Q8.SPLIT_BELOW, Q8.PROBE, G.grid_cap, G.PREQUANT,
             Q8.PAIR_UNITS, G.PREQUANT_MIN_COLS)
    G.PREQUANT = v.get("PREQUANT", False)       # (at every shape: no PREQUANT_MIN_COLS)
    G.PREQUANT_MIN_COLS = 0
    Q8.PAIR_UNITS = v.get("PAIR_UNITS", False)
    Q8.UNROLL = v.get("UNROLL", Q8.UNROLL)
    Q8.SPLIT = v.get("SPLIT", Q8.SPLIT)
    Q8.SPLIT_BELOW = v.get("SPLIT_BELOW", Q8.SPLIT_BELOW)
    Q8.PROBE = v.get("PROBE", 0)
    if v.get("fullgrid"):
        G.grid_cap = lambda k, t, s: G._n_sms() * G.BLOCKS_PER_SM
    try:
        r = B.bench_gemv(qtype, *shape, exact=False)
        k = Q8.q8_kernel(qtype, 1, False, 0, G.GEMV_WARPS, Q8.UNROLL,     # gemv()'s own key
                         Q8.SPLIT if Q8.SPLIT_BELOW else 1, Q8.PROBE, 0, False, G.PREQUANT,
                         (Q8.PAIR_UNITS or G.PREQUANT) and qtype in Q8.PAIR_DOTS)
        regs = max(k.get_regs_per_thread().values()) if hasattr(k, "overloads") else 0
        smem = 0 if G.PREQUANT else G.smem_bytes(qtype, shape[1], False)
        per_sm = min(kk.max_cooperative_grid_blocks(G.GEMV_WARPS * 32, smem)
                     for kk in k.overloads.values()) // G._n_sms()
        return 100 * r["GB/s"] / bw, f"{regs} regs, {per_sm} blocks/SM"
    finally:
        (Q8.UNROLL, Q8.SPLIT, Q8.SPLIT_BELOW, Q8.PROBE, G.grid_cap, G.PREQUANT,
         Q8.PAIR_UNITS, G.PREQUANT_MIN_COLS) = saved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q4_K,Q8_0,Q4_1,Q6_K,Q5_K")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    bw = B.copy_bandwidth()
    rows = []
    for tn in a.types.split(","):
        for name in a.variants.split(","):
            pct, info = zip(*(run_variant(name, TYPE_IDS[tn], shape, bw)
                              for shape in ((14336, 4096), (4096, 14336))))
            line = f"{tn:5s} {name:10s} {pct[0]:5.1f}% {pct[1]:5.1f}%   {info[0]}"
            print(line, flush=True)
            rows.append(line)
    print(f"\nprobe: % of copy bandwidth ({bw:.0f} GB/s), shapes 14336x4096 4096x14336")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
