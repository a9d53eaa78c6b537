"""bench --kernels' per-op decode profile: every op of a step is timed, and the bytes it reads are
counted exactly (weights as stored, the KV cache up to the position, activations), on the CPU and
on the CUDA backend (the simulator on CI)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf_builder import N_LAYER, tiny_llama

from numbaformer.loader import load_model_file
from numbaformer.model import Model
from numbaformer.profile import profile_decode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_llama().write(tmp_path_factory.mktemp("profile") / "tiny.gguf")
    mf = load_model_file(path, tokenizer=False)
    yield mf
    mf.close()


def _backend(name):
    if name == "cpu":
        from numbaformer.backends.cpu import CPUBackend
        return CPUBackend()
    from numbaformer.backends.cuda.backend import CUDABackend
    return CUDABackend()


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_profile_counts_every_op_and_byte(tiny, backend, cuda_toy_shapes):
    cfg = tiny.config
    m = Model(tiny, _backend(backend), n_ctx=32, n_batch=4, kv_type="f32")
    pos = 9
    prof = profile_decode(m, pos, reps=1)
    rows, step_us, bw = prof.ops, prof.step_us, prof.copy_gbps
    by_op = {r.op: r for r in rows}
    # one step: the embedding row, per layer five fused ops, the head and the argmax
    assert sum(r.calls for r in rows) == 1 + 5 * N_LAYER + 2
    key = next(k for k in by_op if k.startswith("qkv_rope:attn_q"))
    assert by_op["attention"].calls == by_op[key].calls == N_LAYER
    kv_row = cfg.n_head_kv * cfg.head_dim * 4                     # f32 K (or V) of one position
    act = 4 * cfg.q_dim * 2                                        # q in, attention out
    assert by_op["attention"].nbytes == N_LAYER * (2 * kv_row * (pos + 1) + act + 4)
    weights = {t.name: t for t in m.w.layers[0].__dict__.values() if hasattr(t, "qtype")}
    qkv = sum(weights[f"blk.0.attn_{k}.weight"].data.nbytes for k in "qkv")
    assert by_op[key].nbytes >= N_LAYER * qkv                      # + x, norm weights, outputs
    assert by_op[key].nbytes - N_LAYER * qkv < N_LAYER * 4 * 16 * cfg.n_embd
    emb = next(r for k, r in by_op.items() if k.startswith("embed:"))
    assert emb.nbytes == m.w.token_embd.data.nbytes // cfg.n_vocab + 4 * cfg.n_embd + 4
    assert all(r.us > 0 for r in rows) and step_us > 0 and bw > 0
    table = prof.table("decode")
    assert table.count("\n") == len(rows) + 3 and "| total | " in table
    assert np.isclose(sum(r.us for r in rows), float(table.split("| total | ")[1].split("|")[1]),
                      rtol=1e-3, atol=0.1)
    d = prof.as_dict()
    assert d["position"] == pos and [o["op"] for o in d["ops"]] == [r.op for r in rows]


def test_profile_refuses_a_position_outside_the_context(tiny):
    from numbaformer.backends.cpu import CPUBackend
    m = Model(tiny, CPUBackend(), n_ctx=16, n_batch=4)
    with pytest.raises(ValueError, match="outside the context"):
        profile_decode(m, 16)
