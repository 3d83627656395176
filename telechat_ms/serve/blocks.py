"""Host-side bookkeeping of the paged kv cache: a free list of blocks, reference counts, and the prefix cache.

A full block is keyed by the hash of the tokens up to and including it (its parent block's hash, its own tokens)
and by the rotary tables its keys were computed with (the NTK tag: the released incremental rule gives a token the
tables of a total length, so a block cached under one length is reused only by a prompt whose tokens would take
the same tables: exactly what one-sequence `generate` computes). Blocks whose last user ended stay cached, in
least-recently-used order, until a new allocation needs them (eviction). Block 0 (telechat_ms.infer.paged) is the
null block and is never handed out.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable, Iterable

from telechat_ms.infer.paged import NULL_BLOCK


class NoFreeBlocks(Exception):
    """Every block is in use by a running sequence."""


def block_hashes(tokens: list[int], block_size: int, tag: Hashable, parent: int | None = None,
                 start: int = 0) -> list[int]:
    """Chained hashes of the full blocks of tokens[start * block_size:] (block i: hash of block i - 1's hash, its
    tokens and the NTK tag)."""
    out, h = [], parent
    for i in range(start, len(tokens) // block_size):
        h = hash((h, tuple(tokens[i * block_size:(i + 1) * block_size]), tag))
        out.append(h)
    return out


class BlockManager:
    """Blocks 1..num_blocks-1: allocation from a free list, reference counts, LRU prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = int(num_blocks), int(block_size), prefix_caching
        self.free: deque[int] = deque(b for b in range(self.num_blocks) if b != NULL_BLOCK)
        self.ref = [0] * self.num_blocks
        self.hash_of: dict[int, int] = {}              # cached block -> its key
        self.by_hash: dict[int, int] = {}              # key -> cached block
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached blocks nobody uses, oldest first
        self.evictions = 0

    @property
    def usable(self) -> int:
        """Blocks that can hold tokens (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free or cached but unused)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    def allocate(self) -> int:
        """A block with reference count 1: a free one, else the least recently used cached one (evicted)."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
            self.evictions += 1
        else:
            raise NoFreeBlocks(f"all {self.usable} kv-cache blocks are in use")
        self.ref[block] = 1
        return block

    def lookup(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each with its reference count taken."""
        found = []
        if self.prefix_caching:
            for h in hashes:
                block = self.by_hash.get(h)
                if block is None:
                    break
                found.append(block)
        for block in found:
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
        return found

    def register(self, block: int, key: int) -> None:
        """Offer a full block to the prefix cache under `key` (a block already cached under it stays)."""
        if self.prefix_caching and key not in self.by_hash and block not in self.hash_of:
            self.by_hash[key] = block
            self.hash_of[block] = key

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; unused cached blocks become evictable (most recent last)."""
        for block in reversed(list(blocks)):   # a sequence's tail first: its head is the likelier shared prefix
            self.ref[block] -= 1
            if self.ref[block] < 0:
                raise AssertionError(f"block {block} released more often than taken")
            if self.ref[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def clear_cache(self) -> None:
        """Forget every unused cached block (they become free)."""
        for block in list(self.evictable):
            del self.by_hash[self.hash_of.pop(block)]
            self.free.append(block)
        self.evictable.clear()
