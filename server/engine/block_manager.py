"""Paged KV-cache bookkeeping: which physical blocks each sequence owns.

The tensors live in `fusionserve.models.decoder.KVCache`; this module only hands out block
ids. Blocks are reference counted so full prompt blocks can be shared (prefix
caching across requests, n>1 choices of one request). A full block is
identified by a hash chain over its tokens and every token before it, so equal
hashes mean equal KV contents. Freed blocks that carry a hash stay cached and
are evicted least-recently-freed first, only when no never-cached block is left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation is attempted without checking capacity first (a scheduler bug)."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()  # kept to rule out hash collisions on a prefix hit


@dataclass
class BlockTable:
    """One sequence's view of the cache: its physical blocks and how many leading ones are hashed."""

    blocks: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: int | None = None


def chain_hash(prev: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full block given the hash of everything before it."""
    return hash((prev, tuple(tokens)))


class BlockManager:
    """Free-list allocator with refcounts and an LRU prefix cache over full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-cached blocks (a stack)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._by_hash: dict[int, int] = {}
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0  # ... and found

    # -- capacity ----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (never-cached plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        """New blocks required for `table` to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def can_hold(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    # -- allocation --------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            bid = self._free.pop()
        elif self._evictable:
            bid, _ = self._evictable.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self._by_hash.get(block.hash) == bid:
                del self._by_hash[block.hash]
            block.hash, block.tokens = None, ()
        else:
            raise OutOfBlocksError("no free KV-cache block")
        self.blocks[bid].ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self._evictable.pop(bid, None)
        block.ref_count += 1

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Append blocks so `table` covers `num_tokens` tokens; caller checked `can_hold`."""
        need = self.blocks_needed(table, num_tokens)
        if need > self.num_free:
            raise OutOfBlocksError(f"need {need} blocks, {self.num_free} free")
        table.blocks.extend(self._take() for _ in range(need))

    def match_prefix(self, token_ids: Sequence[int]) -> BlockTable:
        """A table of the cached full blocks that start `token_ids`, each referenced once more.

        The last token is never served from the cache: its logits must be computed.
        """
        table = BlockTable()
        if not self.enable_prefix_caching:
            return table
        bs = self.block_size
        prev: int | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, tokens)
            self.prefix_queries += 1
            bid = self._by_hash.get(h)
            if bid is None or self.blocks[bid].tokens != tokens:
                self.prefix_queries += (len(token_ids) - 1) // bs - i - 1
                break
            self.prefix_hits += 1
            self._ref(bid)
            table.blocks.append(bid)
            table.num_hashed, table.last_hash, prev = i + 1, h, h
        return table

    def commit(self, table: BlockTable, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the newly completed full blocks of a sequence in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(table.num_hashed, min(num_computed // bs, len(table.blocks))):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(table.last_hash, tokens)
            block = self.blocks[table.blocks[i]]
            if block.hash is None:
                block.hash, block.tokens = h, tokens
                self._by_hash.setdefault(h, block.block_id)
            table.num_hashed, table.last_hash = i + 1, h

    def fork(self, table: BlockTable, num_tokens: int) -> tuple[BlockTable, tuple[int, int] | None]:
        """A child table sharing every full block of `table` (refcount +1).

        A partly filled last block cannot be shared (both would append to it), so
        the child gets a fresh block and the returned (src, dst) pair says which
        block's KV the caller must copy. The caller checks `num_free >= 1` first.
        """
        full = num_tokens // self.block_size
        shared = list(table.blocks[:full])
        if table.num_hashed <= full:
            child = BlockTable(shared, table.num_hashed, table.last_hash)
        else:  # cannot happen for a table hashed only up to num_tokens; stay correct anyway
            child = BlockTable(shared)
        for bid in shared:
            self._ref(bid)
        copy = None
        if num_tokens % self.block_size:
            dst = self._take()
            child.blocks.append(dst)
            copy = (table.blocks[full], dst)
        return child, copy

    def free(self, table: BlockTable) -> None:
        """Drop one reference to each block; the tail goes first so prefixes stay cached longest."""
        for bid in reversed(table.blocks):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {bid} freed twice")
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[bid] = None
                else:
                    self._free.append(bid)
        table.blocks.clear()
        table.num_hashed, table.last_hash = 0, None

    def check_all_free(self) -> bool:
        """True when no block is referenced (used by tests and at shutdown)."""
        return self.num_free == self.num_blocks and all(b.ref_count == 0 for b in self.blocks)
