"""Plain NumPy float64 reference: every op and the whole forward, from dequantized weights.

Independent of the engine: weights are dequantized with gguf.quants.dequantize, arithmetic is float64,
rope follows llama.cpp's layouts (llama: adjacent pairs; qwen2: NeoX halves).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize


def dequant(t) -> np.ndarray:
    """A QTensor (or raw rows + type) -> float64 (rows, cols) via gguf's reference decoder."""
    raw = np.asarray(t.data)
    return gguf_dequantize(raw, GGMLQuantizationType(t.qtype)).astype(np.float64).reshape(t.rows, t.cols)


def rmsnorm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def inv_freq(rope_dim, base, freq_scale=1.0, factors=None):
    f = freq_scale * base ** (-2.0 * np.arange(rope_dim // 2) / rope_dim)
    return f if factors is None else f / np.asarray(factors, np.float64)


def rope(x, pos, n_heads, head_dim, rope_dim, freqs, neox):
    """x (n, n_heads*head_dim); rotate the first rope_dim dims of each head by pos * freqs."""
    x = np.array(x, np.float64).reshape(len(pos), n_heads, head_dim)
    theta = np.asarray(pos, np.float64)[:, None] * freqs[None, :]          # (n, rope_dim/2)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    half = rope_dim // 2
    if neox:
        a, b = x[..., :half].copy(), x[..., half:rope_dim].copy()
        x[..., :half], x[..., half:rope_dim] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:rope_dim:2].copy(), x[..., 1:rope_dim:2].copy()
        x[..., 0:rope_dim:2], x[..., 1:rope_dim:2] = a * c - b * s, a * s + b * c
    return x.reshape(len(pos), n_heads * head_dim)


def attention(q, k, v, q_pos, k_pos, n_head, n_kv, head_dim):
    """Causal GQA: q (n, n_head*hd) at q_pos attends to keys k, v (m, n_kv*hd) with k_pos <= q_pos."""
    n, group = len(q_pos), n_head // n_kv
    qh = q.reshape(n, n_head, head_dim)
    kh = k.reshape(len(k_pos), n_kv, head_dim)
    vh = v.reshape(len(k_pos), n_kv, head_dim)
    out = np.zeros((n, n_head, head_dim))
    for h in range(n_head):
        g = h // group
        s = qh[:, h] @ kh[:, g].T / np.sqrt(head_dim)                          # (n, m)
        s = np.where(np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None], s, -np.inf)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (s / s.sum(axis=1, keepdims=True)) @ vh[:, g]
    return out.reshape(n, n_head * head_dim)


def q8_activations(x) -> np.ndarray:
    """x (n,) as the 8-bit mat-vec sees it (llama.cpp's q8_1): per 32 values d = max|x| / 127 and
    q = rint(x / d) in float32, returned dequantized as float64 (q * d)."""
    g = np.asarray(x, np.float32).reshape(-1, 32)
    d = (np.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(g * inv[:, None])
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * d[:, None]).reshape(-1)


def q8_tie_slack(x, within: float = 1e-3) -> np.ndarray:
    """Per value of x (n,): its group's d where x / d lies within `within` of a rounding tie (a
    kernel that computed x in another order may round it the other way), else 0."""
    g = np.asarray(x, np.float64).reshape(-1, 32)
    d = np.abs(g).max(axis=1) / 127
    t = g / np.where(d > 0, d, 1)[:, None]
    near = np.abs(t - np.floor(t) - 0.5) < within
    return (near * d[:, None]).reshape(-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


class ReferenceModel:
    """Float64 forward of a whole model; weights dequantized once (fine for small models)."""

    def __init__(self, mf):
        self.cfg, w = mf.config, mf.weights
        self.embd = dequant(w.token_embd)
        self.out = self.embd if w.output is w.token_embd else dequant(w.output)
        self.out_norm = w.output_norm.astype(np.float64)
        self.freqs = inv_freq(self.cfg.rope_dim, self.cfg.rope_base, self.cfg.rope_freq_scale,
                              w.rope_freqs)
        self.layers = []
        for L in w.layers:
            d = {k: dequant(getattr(L, k)) for k in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                     "ffn_gate", "ffn_up", "ffn_down")}
            for k in ("attn_norm", "ffn_norm", "attn_q_bias", "attn_k_bias", "attn_v_bias"):
                val = getattr(L, k)
                d[k] = None if val is None else val.astype(np.float64)
            self.layers.append(d)

    def forward(self, ids) -> np.ndarray:
        """Logits (n, n_vocab) float64 for tokens ids at positions 0..n-1."""
        c = self.cfg
        pos = np.arange(len(ids))
        x = self.embd[np.asarray(ids)]
        for L in self.layers:
            h = rmsnorm(x, L["attn_norm"], c.norm_eps)
            q, k, v = h @ L["attn_q"].T, h @ L["attn_k"].T, h @ L["attn_v"].T
            if L["attn_q_bias"] is not None:
                q, k, v = q + L["attn_q_bias"], k + L["attn_k_bias"], v + L["attn_v_bias"]
            q = rope(q, pos, c.n_head, c.head_dim, c.rope_dim, self.freqs, c.rope_neox)
            k = rope(k, pos, c.n_head_kv, c.head_dim, c.rope_dim, self.freqs, c.rope_neox)
            a = attention(q, k, v, pos, pos, c.n_head, c.n_head_kv, c.head_dim)
            x = x + a @ L["attn_output"].T
            h = rmsnorm(x, L["ffn_norm"], c.norm_eps)
            x = x + (silu(h @ L["ffn_gate"].T) * (h @ L["ffn_up"].T)) @ L["ffn_down"].T
        return rmsnorm(x, self.out_norm, c.norm_eps) @ self.out.T


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


# --- sampling: Philox-4x32-10 and the whole chain, written from their definitions ------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(ctr, key):
    """Random123's philox4x32_R(10, ctr, key): a round with the key, then the key bumped before
    each of rounds 2..10. Counter words are Python ints or numpy uint64 arrays (one counter per
    element), key words Python ints."""
    ctr, key = list(ctr), list(key)
    for r in range(10):
        if r:
            key = [(key[0] + PHILOX_W[0]) % 2**32, (key[1] + PHILOX_W[1]) % 2**32]
        p0, p1 = PHILOX_M[0] * ctr[0], PHILOX_M[1] * ctr[2]
        ctr = [(p1 >> 32) ^ ctr[1] ^ key[0], p1 % 2**32, (p0 >> 32) ^ ctr[3] ^ key[1], p0 % 2**32]
    return tuple(ctr)


def gumbel(seed, index, token):
    """-log(-log(u)), u = (top 24 bits of Philox word token % 4 of counter (token // 4, index, 0, 0)
    under key (seed % 2^32, seed // 2^32)) + 1/2) / 2^24; token an id or an array of ids."""
    token, seed = np.asarray(token).astype(np.uint64), int(seed)
    zero = token * 0
    words = philox4x32_10((token // 4, zero + int(index), zero, zero), (seed % 2**32, seed >> 32))
    word = np.choose((token % 4).astype(np.intp), words)
    return -np.log(-np.log(((word >> 8) + 0.5) / 2**24))


def sample_chain(logits, recent, *, temperature, top_k=0, top_p=1.0, min_p=0.0,
                 repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, seed=0, index=0):
    """The sampling chain in float64: llama.cpp's penalties over the ids `recent` (the window), then
    (temperature > 0) candidates in order of decreasing logit (ties: smaller id first), top-k,
    top-p (the shortest prefix with mass >= top_p of the top-k set's), min-p (p >= min_p * p_max),
    and the argmax of logit / temperature + gumbel(seed, index, id) over them.
    Returns (id, margins): how far the inputs are from changing each decision, for the tests to
    skip near-ties: {"top_k": the logit gap at the cut, "top_p": the relative mass gap at the cut,
    "min_p": the log-ratio gap at the cut, "draw": the gap between the two best perturbed scores,
    "greedy": the top-2 logit gap}, inf where there is no such decision."""
    x = np.asarray(logits, np.float64).copy()
    for t, c in Counter(int(t) for t in recent).items():
        v = x[t] / repeat_penalty if x[t] > 0 else x[t] * repeat_penalty
        x[t] = v - c * frequency_penalty - presence_penalty
    order = np.lexsort((np.arange(len(x)), -x))
    gaps = dict.fromkeys(("top_k", "top_p", "min_p", "draw", "greedy"), np.inf)
    if temperature == 0:
        gaps["greedy"] = x[order[0]] - x[order[1]]
        return int(order[0]), gaps
    k = top_k if 0 < top_k < len(x) else len(x)
    if k < len(x):
        gaps["top_k"] = x[order[k - 1]] - x[order[k]]
    keep = k
    w = np.exp(x[order] - x[order[0]])
    if top_p < 1.0:
        cum = np.cumsum(w[:k]) / w[:k].sum()
        cut = next(r for r in range(k) if cum[r] >= top_p)
        keep = min(keep, cut + 1)
        gaps["top_p"] = min(cum[cut] - top_p, top_p - cum[cut - 1] if cut else np.inf)
    if min_p > 0:
        ratio = np.log(w[:keep])                   # log(p / p_max)
        keep = min(keep, max(1, int(np.sum(ratio >= np.log(min_p)))))
        gaps["min_p"] = np.abs(ratio - np.log(min_p)).min()
    cand = order[:keep]
    scores = (x[cand] - x[order[0]]) / temperature + gumbel(seed, index, cand)
    best = np.lexsort((cand, -scores))                    # the best score, then the smaller id
    if keep > 1:
        gaps["draw"] = scores[best[0]] - scores[best[1]]
    return int(cand[best[0]]), gaps
