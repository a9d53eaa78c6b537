"""Block manager: the KV cache's blocks, who holds them, and the prefix cache.

The cache (kvcache.py) is a pool of n_blocks blocks of block_size positions. A sequence holds a
block table (its list of block ids: position p lives in slot table[p // B] * B + p % B). Blocks are
reference counted; a full block whose K/V has been computed is registered under a hash chained over
its token ids and every token before it (hash(previous block's hash, its ids)), so a new sequence
that starts with the same tokens takes those blocks (reference count + 1) and skips their prefill.
A cached block nobody references stays cached until a fresh block is needed: then the least
recently released one is evicted (its hash dropped) and reused. (nano-vllm's BlockManager, with
vLLM's LRU eviction of unreferenced cached blocks.)

The manager only keeps books: it touches no device. It reads and writes three fields of a sequence
(scheduler.Sequence): token_ids, block_table, num_cached_tokens.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

BLOCK_SIZE = 64               # positions per block: the decode attention's span


def chain_hash(prev: int, ids) -> int:
    """The prefix cache's key of a full block: its token ids and, through prev, all before it."""
    return hash((prev, tuple(int(t) for t in ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1                        # -1: not in the prefix cache
    token_ids: tuple = field(default=())  # the ids of a cached block (checked on a hit)


class BlockManager:
    """Free list, reference counts and prefix cache over n_blocks blocks of block_size."""

    def __init__(self, n_blocks: int, block_size: int = BLOCK_SIZE):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one position, not {n_blocks} x "
                             f"{block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(n_blocks)]
        self._free: deque[int] = deque(range(n_blocks))      # clean blocks, never cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._cached: dict[int, int] = {}                     # hash -> block id
        self.hits = 0                                         # blocks reused by allocate()

    # --- counting ------------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        """Blocks a sequence could take now (clean ones and evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    def blocks_for(self, n_positions: int) -> int:
        return -(-n_positions // self.block_size)

    def _prefix_hits(self, seq) -> list[int]:
        """Ids of the cached blocks that begin seq's tokens, each full and before its last token
        (the last token is always computed: its logits are the step's output)."""
        B, ids, hits, h = self.block_size, seq.token_ids, [], -1
        for i in range((len(ids) - 1) // B):
            chunk = tuple(ids[i * B:(i + 1) * B])
            h = chain_hash(h, chunk)
            bid = self._cached.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq) -> bool:
        """Whether seq's tokens fit now (its prefix-cache hits counted as free)."""
        hits = self._prefix_hits(seq)
        need = self.blocks_for(len(seq.token_ids)) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return need <= self.n_free - revived

    # --- taking and giving back ----------------------------------------------------------------
    def allocate(self, seq) -> None:
        """Give seq (empty block table) blocks for all its tokens: cached ones for its prefix
        (seq.num_cached_tokens set to what they cover), fresh ones for the rest."""
        if seq.block_table:
            raise ValueError("sequence already holds blocks")
        if not self.can_allocate(seq):
            raise MemoryError("not enough free KV blocks")
        hits = self._prefix_hits(seq)
        for bid in hits:
            self._take(bid)
        seq.block_table = list(hits)
        seq.num_cached_tokens = len(hits) * self.block_size
        self.hits += len(hits)
        for _ in range(self.blocks_for(len(seq.token_ids)) - len(hits)):
            seq.block_table.append(self._fresh())

    def can_append(self, seq, n_positions: int) -> bool:
        """Whether seq can grow to n_positions."""
        return self.blocks_for(n_positions) - len(seq.block_table) <= self.n_free

    def append(self, seq, n_positions: int) -> None:
        """Grow seq's table to cover n_positions."""
        if not self.can_append(seq, n_positions):
            raise MemoryError("not enough free KV blocks")
        while len(seq.block_table) < self.blocks_for(n_positions):
            seq.block_table.append(self._fresh())

    def commit(self, seq, n_computed: int) -> None:
        """Register in the prefix cache the full blocks of seq whose K/V is now computed (the
        first n_computed positions). A block whose key is already cached stays private."""
        B, h = self.block_size, -1
        for i in range(min(n_computed // B, len(seq.block_table))):
            chunk = tuple(seq.token_ids[i * B:(i + 1) * B])
            h = chain_hash(h, chunk)
            b = self.blocks[seq.block_table[i]]
            if b.hash == -1 and h not in self._cached:
                b.hash, b.token_ids = h, chunk
                self._cached[h] = b.block_id

    def free(self, seq) -> None:
        """Release seq's blocks (last first, so a prefix outlives its tails in the LRU)."""
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref_count -= 1
            if b.ref_count == 0:
                if b.hash != -1:
                    self._evictable[bid] = None
                else:
                    self._free.append(bid)
        seq.block_table = []

    def _take(self, bid: int) -> None:
        b = self.blocks[bid]
        if b.ref_count == 0:
            del self._evictable[bid]
        b.ref_count += 1

    def _fresh(self) -> int:
        """A clean block, else the least recently released cached one (evicted)."""
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)
            b = self.blocks[bid]
            del self._cached[b.hash]
            b.hash, b.token_ids = -1, ()
        self.blocks[bid].ref_count = 1
        return bid

    def check(self) -> None:
        """Assert the books balance (tests): every block free, evictable or referenced, once."""
        free, ev = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & ev
        for b in self.blocks:
            assert b.ref_count >= 0
            assert (b.ref_count == 0) == (b.block_id in free or b.block_id in ev), b
            assert (b.block_id in ev) <= (b.hash != -1)
            assert b.hash == -1 or self._cached.get(b.hash) == b.block_id
        assert len(self._cached) == sum(b.hash != -1 for b in self.blocks)
