"""Teacher-forced scoring: per-position top-k log-probs, and llama-perplexity's perplexity."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .generate import plural


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(axis=1, keepdims=True)
    return lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))


def score_ids(model, ids: Sequence[int], top_k: int = 8) -> list[dict]:
    """Teacher forcing over ids: for every position i, "top", the top_k [id, logprob] of the
    distribution predicting token i+1, and (all but the last position) "id" and "logprob", that
    next token of ids and its log-prob."""
    lp = _log_softmax_rows(model.forward_all(ids, 0))
    top = np.argsort(-lp, axis=1, kind="stable")[:, :top_k]
    out = []
    for i in range(len(ids)):
        entry = {"id": int(ids[i + 1]), "logprob": float(lp[i, ids[i + 1]])} \
            if i + 1 < len(ids) else {}
        entry["top"] = [[int(t), float(lp[i, t])] for t in top[i]]
        out.append(entry)
    return out


def perplexity(model, ids: Sequence[int], n_ctx: int, bos_id: int | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> tuple[float, int]:
    """llama-perplexity's method: chunks of n_ctx tokens (the first replaced by BOS when the model
    adds one); in each, positions n_ctx/2 .. n_ctx-2 predict the next token. Needs 2 * n_ctx
    tokens, as llama-perplexity does. After each chunk, on_chunk(chunks done, chunks, perplexity
    so far). Returns (perplexity, tokens scored)."""
    ids = list(ids)
    if n_ctx < 4 or len(ids) < 2 * n_ctx:
        raise ValueError(f"text has {plural(len(ids))}; perplexity at context {n_ctx} needs at "
                         f"least {2 * n_ctx} (and a context of at least 4)")
    nll, count, first = 0.0, 0, n_ctx // 2
    n_chunks = len(ids) // n_ctx
    for c in range(n_chunks):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx]
        if bos_id is not None:
            chunk[0] = bos_id
        lp = _log_softmax_rows(model.forward_all(chunk, 0))
        nxt = np.asarray(chunk[first + 1:])
        nll -= float(lp[np.arange(first, n_ctx - 1), nxt].sum())
        count += len(nxt)
        if on_chunk is not None:
            on_chunk(c + 1, n_chunks, math.exp(nll / count))
    return math.exp(nll / count), count
