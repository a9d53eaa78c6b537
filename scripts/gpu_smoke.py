#!/usr/bin/env python3
"""GPU vs CPU on one model: teacher-forced log-probs and greedy tokens. usage: gpu_smoke.py MODEL"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

from numbaformer.backends.cpu import CPUBackend  # noqa: E402
from numbaformer.backends.cuda.backend import CUDABackend  # noqa: E402
from numbaformer.loader import load_model_file  # noqa: E402
from numbaformer.model import Model  # noqa: E402
from numbaformer.sampling import log_softmax  # noqa: E402


def main(path: str, n_gen: int = 24) -> None:
    mf = load_model_file(path)
    ids = mf.tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
    ids = ids + list(np.random.default_rng(0).integers(0, mf.config.n_vocab, 40))
    for kv in ("f32", "f16"):
        t = time.time()
        gpu = Model(mf, CUDABackend(), n_ctx=256, n_batch=64, kv_type=kv)
        gpu.warmup()
        t_gpu = time.time() - t
        cpu = Model(mf, CPUBackend(), n_ctx=256, n_batch=64, kv_type=kv)
        lg_c, lg_g = cpu.forward_all(ids), gpu.forward_all(ids)
        lp_c = np.stack([log_softmax(r) for r in lg_c])
        lp_g = np.stack([log_softmax(r) for r in lg_g])
        print(f"kv {kv}: load+warmup {t_gpu:.1f}s; teacher-forced {len(ids)} tokens: max "
              f"|dlogprob| {np.abs(lp_c - lp_g).max():.2e}, top1 agree "
              f"{(lg_c.argmax(1) == lg_g.argmax(1)).mean():.3f}")
    outs = []
    for m in (cpu, gpu):
        toks, p = [ids[0]], 0
        for i in range(n_gen):
            m.forward([toks[-1]], p, greedy=True)
            toks.append(m.greedy_token())
            p += 1
        outs.append(toks)
    print("greedy decode equal:", outs[0] == outs[1], outs[0][:12], outs[1][:12])


if __name__ == "__main__":
    main(sys.argv[1])
