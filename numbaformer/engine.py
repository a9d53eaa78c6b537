"""Load a model onto a backend (the one entry point the CLI commands share), and the engine loop
over many sequences: add_request() / abort() / step(), each step the scheduler's batch run by the
model in one forward (nano-vllm's schedule() -> run() -> postprocess()).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .backends import select_backend
from .blocks import BLOCK_SIZE, BlockManager
from .loader import ModelFile, load_model_file
from .model import Model
from .scheduler import Scheduler, Sequence

DEFAULT_CTX = 4096
BATCH_CTX_BLOCKS = 1024 // BLOCK_SIZE   # default pool: this many blocks per sequence (or n_ctx's)
# greedy decode steps a replay when every running sequence decodes greedily and none waits
# (Scheduler.schedule_steps, Model.run_batch_steps; backends with graphs): the host's turn
# between steps (scheduling, reading the picks) paid once for them; 1 turns it off
BATCH_STEPS = int(os.environ.get("NUMBAFORMER_BATCH_STEPS", "8"))
# a batched step's sampled rows picked on the device (device_sampled); 0: on the host, from a
# copy of their logits (the A/B, and the path of samplers that record log-probs)
DEVICE_ROWS_SAMPLING = os.environ.get("NUMBAFORMER_DEVICE_ROWS_SAMPLING", "1") == "1"
WARMUP_PROMPT = 80      # the batched warm-up's long prompt: past the row counts under which a
                        # backend takes other kernels (the CPU's serial rope and K/V store: 64)


@dataclass
class Batching:
    """The batched path: a model with a paged cache (sharing the weights), its block manager and
    scheduler."""

    model: Model
    blocks: BlockManager
    scheduler: Scheduler
    seqs: dict = field(default_factory=dict)          # seq_id -> Sequence, until finished


def device_sampled(seq: Sequence, model) -> bool:
    """Whether a batched step picks seq's token on the device (Model.batch_sample_ids): its
    sampler says it can be (make_sampler's chain, with a server's logit_bias; not one that
    records log-probs) and the backend samples rows. The pick is the host sampler's either way;
    only the logits it no longer copies differ."""
    return (DEVICE_ROWS_SAMPLING and getattr(seq.sampler, "device_ok", False)
            and model.samples_rows_on_device)


@dataclass
class Engine:
    mf: ModelFile
    model: Model
    load_s: float
    batching: Batching | None = None

    def start_batching(self, max_seqs: int = 16, max_batched_tokens: int = 512,
                       kv_blocks: int | None = None) -> Batching:
        """Build the batched path (once; later calls return it): a paged KV cache of kv_blocks
        blocks (default: max_seqs x 1024 positions, at least one full context), up to max_seqs
        sequences and max_batched_tokens rows a step. The single-sequence model is untouched."""
        if self.batching is None:
            m = self.model
            per_seq = -(-m.n_ctx // BLOCK_SIZE)
            kv_blocks = kv_blocks or max(per_seq, max_seqs * min(per_seq, BATCH_CTX_BLOCKS))
            m.ops.check_batch_memory(self.config, max(per_seq, kv_blocks) * BLOCK_SIZE,
                                     max_batched_tokens, max_seqs, m.kv.kv_type)
            model = Model(self.mf, m.ops, m.n_ctx, max_batched_tokens, kv_type=m.kv.kv_type,
                          max_seqs=max_seqs, kv_blocks=kv_blocks)
            bm = BlockManager(kv_blocks, BLOCK_SIZE)
            self.batching = Batching(model, bm, Scheduler(bm, m.n_ctx, max_seqs,
                                                          model.n_batch))
        return self.batching

    def add_request(self, prompt_ids, max_tokens: int = 64, sampler=None,
                    stop_ids=None) -> int:
        """Queue a sequence (prompt token ids; sampler: make_sampler's callable, None: greedy;
        stop_ids: default the tokenizer's end-of-generation ids); returns its id."""
        b = self.start_batching()
        stop = self.tokenizer.eog_ids if stop_ids is None else frozenset(stop_ids)
        seq = Sequence(list(prompt_ids), max_tokens=max_tokens, stop_ids=stop, sampler=sampler)
        b.scheduler.add(seq)
        b.seqs[seq.seq_id] = seq
        return seq.seq_id

    def abort(self, seq_id: int) -> bool:
        """Drop a queued or running sequence (its blocks freed)."""
        b = self.start_batching()
        b.seqs.pop(seq_id, None)
        return b.scheduler.abort(seq_id)

    def warmup_batching(self) -> None:
        """Compile (or load from the cache) what the batched path's steps run, before the first
        request does: a prompt of WARMUP_PROMPT tokens (fewer in a small context or step) alone,
        then its decode row beside a 2-token prompt's rows (the decode product and the prefill
        product in one step; after it when one sequence runs at a time), then both decoding, then
        the first alone; the second samples (the default chain: on a GPU, the batched sampling
        kernel). Their blocks are freed; the long prompt's full block stays in the prefix cache,
        as any finished prompt's does."""
        from .sampling import SamplingParams, make_sampler
        b = self.start_batching()
        bos = self.tokenizer.bos_id or 0
        n = max(1, min(WARMUP_PROMPT, b.model.n_batch, self.model.n_ctx - 4))
        self.add_request([bos] * n, max_tokens=4, stop_ids=())
        self.step()
        self.add_request([bos] * 2, max_tokens=2, sampler=make_sampler(SamplingParams(seed=0)),
                         stop_ids=())
        while self.has_unfinished():
            self.step()

    def has_unfinished(self) -> bool:
        return self.batching is not None and not self.batching.scheduler.is_finished()

    def step(self, max_steps: int | None = None) -> list[Sequence]:
        """One step: schedule, run the batch in one forward, pick each emitting sequence's token,
        postprocess; returns the sequences that finished in it. When every running sequence
        decodes greedily and none waits, up to max_steps (default BATCH_STEPS) such steps in one
        replay (on a backend with graphs), each sequence taking its picks until it finishes."""
        b = self.start_batching()
        k = BATCH_STEPS if max_steps is None else max_steps
        if k > 1 and b.model.ops.multi_step and \
                all(s.sampler is None for s in b.scheduler.running):
            plan = b.scheduler.schedule_steps(k)
            if plan is not None:
                batch, k = plan
                done = b.scheduler.postprocess_steps(batch, b.model.run_batch_steps(batch, k))
                for s in done:
                    b.seqs.pop(s.seq_id, None)
                return done
        batch = b.scheduler.schedule()
        if batch is None:
            return []
        model = b.model
        model.run_batch(batch)
        m = len(batch.seqs)
        greedy = model.batch_greedy_ids(m)                # the device's argmax of each row
        tokens = [int(greedy[i]) if e and s.sampler is None else -1
                  for i, (s, e) in enumerate(zip(batch.seqs, batch.emits))]
        sampled = [i for i, (s, e) in enumerate(zip(batch.seqs, batch.emits))
                   if e and s.sampler is not None]
        on_device = [i for i in sampled if device_sampled(batch.seqs[i], model)]
        if on_device:                                     # one launch, the ids back
            seqs = [batch.seqs[i] for i in on_device]
            picks = model.batch_sample_ids(on_device, [s.sampler for s in seqs],
                                           [len(s.token_ids) for s in seqs],
                                           [s.token_ids for s in seqs])
            for i, t in zip(on_device, picks):
                tokens[i] = int(t)
        on_host = [i for i in sampled if tokens[i] < 0]
        if on_host:                                       # their rows' span to the host
            lo, hi = on_host[0], on_host[-1] + 1
            logits = model.ops.to_host(model.buf.batch_logits[lo:hi])
            for i in on_host:
                tokens[i] = self._pick(batch.seqs[i], logits[i - lo])
        done = b.scheduler.postprocess(batch, tokens)
        for s in done:
            b.seqs.pop(s.seq_id, None)
        return done

    @staticmethod
    def _pick(seq: Sequence, logits: np.ndarray) -> int:
        if seq.sampler is None:
            return int(np.argmax(logits))
        return int(seq.sampler(logits, seq.token_ids, len(seq.token_ids)))

    def generate_batch(self, prompts, max_tokens: int = 64, samplers=None) -> list[Sequence]:
        """Run prompts (lists of token ids) to the end together; their Sequences, in order."""
        ids = [self.add_request(p, max_tokens, samplers[i] if samplers else None)
               for i, p in enumerate(prompts)]
        seqs = [self.batching.seqs[i] for i in ids]
        while self.has_unfinished():
            self.step()
        return seqs

    @property
    def config(self):
        return self.mf.config

    @property
    def tokenizer(self):
        return self.mf.tokenizer

    @property
    def backend(self):
        return self.model.ops

    def close(self) -> None:
        self.mf.close()


def resolve_model_path(path: str | None, quiet: bool = False, offline: bool = False) -> str:
    """The local GGUF path that `path` names: a file as given; a hub model (ORG/REPO[:QUANT],
    hf://..., see hub.hub_ref) pulled into the hub's cache and verified; None: the default model
    (SmolLM2-135M-Instruct Q4_1), fetched on first use. offline: caches only (no network)."""
    if path:
        from .hub import resolve
        return str(resolve(path, offline=offline, quiet=quiet) or path)
    from .fetch import cached_path, fetch_model
    if not cached_path().is_file() and not quiet and not offline:
        print("no model given: using the default, SmolLM2-135M-Instruct Q4_1", file=sys.stderr)
    return str(fetch_model(quiet=quiet, offline=offline))


def load_engine(path: str | None = None, *, device: str = "auto", gpu: int = 0,
                threads: int | None = None, n_ctx: int | None = None, n_batch: int | None = None,
                kv_type: str | None = None, quiet: bool = False, exact: bool = False,
                announce_compiles: bool | None = None) -> Engine:
    """Validate the file, pick the backend, upload, allocate, and warm up (compiling kernels once;
    cached afterwards). kv_type: "f16" | "f32" (default: the backend's, f16 on CUDA, f32 on the
    CPU). n_batch: prompt tokens a forward pass takes at once (default: the backend's, 2048 on
    CUDA, 512 on the CPU). exact: decode mat-vecs with f32 activations (the backend's default otherwise: 8-bit
    activations on CUDA's fast path). quiet: no notes on stderr; announce_compiles (default: not quiet): a line on stderr
    before a kernel that is not cached compiles, now or later in the process. Raises GGUFError /
    BackendError / ValueError with one-line messages."""
    from .backends import kernel_cache

    path = resolve_model_path(path, quiet)
    t0 = time.perf_counter()
    mf = load_model_file(path)
    try:
        cfg = mf.config
        n_ctx = n_ctx or min(cfg.n_ctx_train, DEFAULT_CTX)
        if not 1 <= n_ctx <= cfg.n_ctx_train:
            raise ValueError(f"context {n_ctx} is outside 1..{cfg.n_ctx_train} (the model's "
                             f"training context)")
        ops = select_backend(device, gpu=gpu, threads=threads, quiet=quiet, exact=exact)
        n_batch = n_batch or ops.default_n_batch
        ops.check_memory(mf, n_ctx, n_batch)
        if announce_compiles if announce_compiles is not None else not quiet:
            kernel_cache.announce_compiles(ops.name)   # a line before any kernel compiles
        model = Model(mf, ops, n_ctx, n_batch, kv_type=kv_type)
        model.warmup()
        return Engine(mf, model, time.perf_counter() - t0)
    except BaseException:
        mf.close()
        raise
