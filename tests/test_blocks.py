"""The block manager alone (no model): admission, reference counts, prefix reuse through the hash
chain, LRU eviction of unreferenced cached blocks; every cycle leaves the pool's books balanced."""
from __future__ import annotations

import numpy as np
import pytest

from numbaformer.blocks import BlockManager
from numbaformer.scheduler import Sequence

B = 4


def seq(ids):
    return Sequence(list(ids))


def computed(bm, s):
    """As the scheduler does once s's K/V is written: register its full blocks."""
    bm.commit(s, len(s.token_ids))


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, B)
    a, b = seq(range(10)), seq(range(100, 105))
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.n_free == 3
    bm.check()
    bm.free(a)
    bm.free(b)
    assert bm.n_free == 8 and a.block_table == [] and b.block_table == []
    bm.check()


def test_admission_refused_when_blocks_run_out():
    bm = BlockManager(3, B)
    a = seq(range(9))                       # 3 blocks
    assert bm.can_allocate(a)
    bm.allocate(a)
    b = seq([1])
    assert not bm.can_allocate(b)
    with pytest.raises(MemoryError):
        bm.allocate(b)
    assert b.block_table == []
    bm.check()


def test_append_grows_the_table_a_block_at_a_time():
    bm = BlockManager(3, B)
    a = seq(range(4))
    bm.allocate(a)
    assert len(a.block_table) == 1
    bm.append(a, 4)
    assert len(a.block_table) == 1
    bm.append(a, 5)
    assert len(a.block_table) == 2
    assert bm.can_append(a, 12) and not bm.can_append(a, 13)
    bm.check()


def test_prefix_is_reused_and_shared():
    bm = BlockManager(8, B)
    a = seq(list(range(9)))                 # blocks [0..3], [4..7], [8]
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)) + [50, 51])      # same two full blocks, then its own
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    c = seq([0, 1, 2, 3, 9, 9, 9, 9, 9])    # only the first block matches: the chain breaks
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]
    bm.check()
    for s in (a, b, c):
        bm.free(s)
    assert bm.n_free == 8
    bm.check()


def test_the_last_token_is_never_served_from_the_cache():
    bm = BlockManager(8, B)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(8))                       # all of it cached: the last block is computed again
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    computed(bm, b)                         # its second block's key is taken: it stays private
    bm.free(b)
    bm.free(a)
    bm.check()


def test_a_released_prefix_survives_until_evicted_lru():
    bm = BlockManager(4, B)
    a = seq(range(5))
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)                              # block of [0..3] now cached and unreferenced
    assert bm.n_free == 4
    b = seq(range(6))
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.hits == 1
    computed(bm, b)
    bm.free(b)
    c = seq(range(200, 216))                # needs all 4 blocks: evicts the cached ones
    bm.allocate(c)
    assert c.num_cached_tokens == 0 and len(c.block_table) == 4
    bm.check()
    bm.free(c)
    d = seq(range(6))
    bm.allocate(d)
    assert d.num_cached_tokens == 0          # the prefix was evicted
    bm.free(d)
    bm.check()


def test_random_cycles_leave_the_pool_intact():
    rng = np.random.default_rng(0)
    bm = BlockManager(16, B)
    prefixes = [list(rng.integers(0, 50, 8)) for _ in range(3)]
    live = []
    for step in range(400):
        if live and (rng.random() < 0.4 or bm.n_free == 0):
            s = live.pop(rng.integers(len(live)))
            computed(bm, s)
            bm.free(s)
        else:
            ids = prefixes[rng.integers(3)][:rng.integers(0, 9)] + \
                list(rng.integers(0, 50, rng.integers(1, 12)))
            s = seq(ids)
            if bm.can_allocate(s):
                bm.allocate(s)
                if bm.can_append(s, len(ids) + 3):
                    bm.append(s, len(ids) + 3)
                live.append(s)
        bm.check()
    for s in live:
        bm.free(s)
    bm.check()
    assert bm.n_free == 16 and bm.hits > 0
    assert all(b.ref_count == 0 for b in bm.blocks)
