"""Block allocator: free list, refcounts, prefix cache hash chains and LRU eviction."""

from __future__ import annotations

import pytest

from fusionserve.server.engine.block_manager import BlockManager, BlockTable, OutOfBlocksError


def test_grow_and_free_return_every_block():
    bm = BlockManager(8, 4)
    t = BlockTable()
    bm.grow(t, 9)  # 3 blocks
    assert len(t.blocks) == 3 and bm.num_free == 5
    bm.grow(t, 12)  # still 3
    assert len(t.blocks) == 3
    assert not bm.can_hold(t, 4 * 9)
    with pytest.raises(OutOfBlocksError):
        bm.grow(t, 4 * 9)
    bm.free(t)
    assert bm.check_all_free() and t.blocks == []


def test_prefix_hit_shares_blocks_and_skips_last_token():
    bm = BlockManager(16, 4)
    tokens = list(range(10))
    a = BlockTable()
    bm.grow(a, 10)
    bm.commit(a, tokens, 10)  # blocks 0,1 full → hashed
    assert a.num_hashed == 2
    b = bm.match_prefix(tokens)
    assert b.blocks == a.blocks[:2]
    assert bm.blocks[a.blocks[0]].ref_count == 2
    # exactly two full blocks: the last token must be computed, so only one block is served
    c = bm.match_prefix(tokens[:8])
    assert c.blocks == a.blocks[:1]
    # a different first block breaks the chain even if the second block is equal
    d = bm.match_prefix([99] + tokens[1:])
    assert d.blocks == []
    for t in (a, b, c, d):
        bm.free(t)
    assert bm.check_all_free()
    assert 0 < bm.prefix_hit_rate < 1


def test_cached_blocks_survive_free_and_are_evicted_lru():
    bm = BlockManager(4, 2)
    old, new = BlockTable(), BlockTable()
    bm.grow(old, 3)
    bm.commit(old, [1, 2, 3], 3)
    bm.free(old)  # block with [1,2] stays cached (evictable), the partial one returns to the free list
    bm.grow(new, 3)
    bm.commit(new, [5, 6, 7], 3)
    bm.free(new)
    assert bm.num_free == 4
    hit = bm.match_prefix([1, 2, 3])
    assert len(hit.blocks) == 1  # still cached
    bm.free(hit)
    # taking all 4 blocks must evict both cached ones, the least recently freed first
    t = BlockTable()
    bm.grow(t, 6)
    assert bm.match_prefix([5, 6, 7]).blocks == []
    bm.free(t)


def test_leaked_refs_are_caught():
    bm = BlockManager(2, 2)
    t = BlockTable()
    bm.grow(t, 2)
    bid = t.blocks[0]
    bm.free(t)
    t.blocks = [bid]
    with pytest.raises(RuntimeError):
        bm.free(t)


def test_fork_shares_full_blocks_and_copies_partial():
    bm = BlockManager(8, 4)
    parent = BlockTable()
    bm.grow(parent, 10)
    bm.commit(parent, list(range(10)), 10)
    child, copy = bm.fork(parent, 10)
    assert child.blocks[:2] == parent.blocks[:2]
    assert copy == (parent.blocks[2], child.blocks[2]) and child.blocks[2] != parent.blocks[2]
    assert bm.blocks[parent.blocks[0]].ref_count == 2
    aligned, none = bm.fork(parent, 8)
    assert none is None and aligned.blocks == parent.blocks[:2]
    for t in (parent, child, aligned):
        bm.free(t)
    assert bm.check_all_free()


def test_prefix_caching_disabled_never_matches():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    t = BlockTable()
    bm.grow(t, 8)
    bm.commit(t, list(range(8)), 8)
    assert bm.match_prefix(list(range(9))).blocks == []
    bm.free(t)
    assert bm.check_all_free()


def computed(bm: BlockManager, tokens: list[int]) -> BlockTable:
    """A table holding `tokens`, its full blocks registered in the prefix cache (as after a step)."""
    table = BlockTable()
    bm.grow(table, len(tokens))
    bm.commit(table, tokens, len(tokens))
    return table


def test_never_cached_blocks_go_before_cached_ones_are_evicted():
    """A freed, hashed block stays a prefix-cache hit until no never-cached block is left."""
    bm = BlockManager(4, 2)
    a = computed(bm, [1, 2, 3, 4])
    cached = list(a.blocks)
    bm.free(a)
    b = BlockTable()
    bm.grow(b, 4)  # the two never-cached blocks
    assert not set(b.blocks) & set(cached)
    assert bm.match_prefix([1, 2, 3, 4, 5]).blocks == cached  # still served (and referenced again)


def test_commit_is_idempotent_and_hit_rate_counts_full_blocks():
    bm = BlockManager(8, 2)
    a = computed(bm, list(range(6)))
    bm.commit(a, list(range(6)), 6)  # nothing new: the same hashes, no double registration
    assert a.num_hashed == 3
    hit = bm.match_prefix(list(range(7)))  # 3 full blocks before the last token: all hit
    miss = bm.match_prefix([9] + list(range(1, 7)))  # the chain breaks at the first block
    assert len(hit.blocks) == 3 and miss.blocks == []
    assert bm.prefix_queries == 6 and bm.prefix_hits == 3 and bm.prefix_hit_rate == 0.5
    for t in (a, hit, miss):
        bm.free(t)
    assert bm.check_all_free()


def test_usage_tracks_referenced_blocks():
    bm = BlockManager(10, 4)
    t = BlockTable()
    bm.grow(t, 12)
    assert bm.usage == pytest.approx(0.3)
    bm.free(t)
    assert bm.usage == 0.0
