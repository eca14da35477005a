"""Paged KV block accounting with prefix caching. IO-free (no torch).

The pool has ``num_blocks`` blocks of ``block_size`` token slots. A sequence's ``block_table``
lists its blocks in token order: token ``i`` lives in slot ``i % block_size`` of block
``block_table[i // block_size]``.

Prefix caching: once a block is FULL and its KV computed, it is registered under a chained
hash ``hash((parent_hash, tuple(token_ids_of_block)))`` (the first block's parent is
``ROOT_HASH``), so equal hashes mean equal token prefixes up to that block. A later sequence
whose prompt starts with the same blocks takes them by reference (ref counts). A registered
block whose ref count drops to zero is not forgotten: it joins an LRU of *evictable cached*
blocks, which count as free; a fresh block comes from the plain free list first, then by
evicting the least recently freed cached block (dropping its hash).

Only full, computed blocks are ever shared, and a sequence only writes past its computed
tokens, so no block is written while shared (no copy-on-write needed).

Hashes are Python's built-in 64-bit hashes of int tuples: deterministic across processes
(ints are not salted), fast, with a collision probability of ~2**-64 per pair of blocks,
which we accept, as vLLM did for years with the same scheme.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from slaq.gpu_workers.engine.sequence import Sequence

ROOT_HASH = 0x5D1A0  # parent hash of a sequence's first block


class BlockManager:
    """The only mutator of free lists, ref counts, the prefix-hash map and ``seq.block_table``.

    Not thread-safe: one engine thread owns it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts: list[int] = [0] * num_blocks
        # Hash a block is registered under in ``_hash_to_block`` (None: not registered).
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; LRU first
        # Per sequence (by request id): hash chain of its full blocks by token content (computed
        # lazily, kept while the sequence is known) and how many leading blocks were committed.
        self._chains: dict[str, list[int]] = {}
        self._num_committed: dict[str, int] = {}
        self._holders: dict[str, Sequence] = {}  # sequences that hold blocks
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ------------------------------------------------------------------ sizes

    @property
    def num_free_blocks(self) -> int:
        """Blocks available for allocation: never-used/plain free plus evictable cached."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0..1 (``vllm:kv_cache_usage_perc``)."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` token slots."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ allocation

    def lookup_prefix(self, seq: Sequence) -> int:
        """Tokens of ``seq`` that the prefix cache would supply now (no side effects).

        Never the whole sequence: the last token is always left to compute, so that there is
        a logit to sample; hits are whole blocks.
        """
        return len(self._hit_blocks(seq)) * self.block_size

    def num_blocks_to_allocate(self, seq: Sequence) -> int:
        """How many of :attr:`num_free_blocks` :meth:`allocate` would take for ``seq`` now.

        Fresh blocks plus prefix hits that sit in the evictable LRU (they count as free but
        are taken by reference).
        """
        hits = self._hit_blocks(seq)
        num_new = self.num_blocks_for(seq.num_tokens) - len(hits)
        return num_new + sum(1 for b in hits if self._ref_counts[b] == 0)

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether :meth:`allocate` would succeed now."""
        return self.num_blocks_to_allocate(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all ``seq.num_tokens`` tokens.

        Leading full blocks found in the prefix cache are shared; ``seq.num_computed_tokens``
        becomes the hit length and ``seq.num_cached_tokens`` its prompt part. Counts the query
        and the hit in ``num_prefix_queries_tokens`` / ``num_prefix_hit_tokens``.
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        assert seq.num_computed_tokens == 0
        hits = self._hit_blocks(seq)
        num_new = self.num_blocks_for(seq.num_tokens) - len(hits)
        assert self.can_allocate(seq), "allocate() without room; call can_allocate() first"
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(num_new)]
        num_hit_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = num_hit_tokens
        seq.num_cached_tokens = min(num_hit_tokens, seq.num_prompt_tokens)
        self._num_committed[seq.request_id] = len(hits)
        self._holders[seq.request_id] = seq
        if self.enable_prefix_caching:
            self.num_prefix_queries_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += num_hit_tokens

    def allocate_prefilled(self, seq: Sequence, num_computed_tokens: int) -> list[int]:
        """Blocks for a sequence whose first ``num_computed_tokens`` KV arrive by transfer.

        No prefix-cache lookup: every block is fresh, so the transferred KV can be written
        into all of them unconditionally. Sets ``seq.num_computed_tokens`` and registers the
        full computed blocks in the prefix cache at once, so the caller must write the KV into
        the returned blocks before the next engine step. Leaves ``num_cached_tokens`` alone.
        Returns the blocks that hold the computed tokens (a prefix of ``seq.block_table``).
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if not 0 < num_computed_tokens <= seq.num_tokens:
            raise ValueError("num_computed_tokens must be in 1..num_tokens")
        num_needed = self.num_blocks_for(seq.num_tokens)
        if num_needed > self.num_free_blocks:
            raise RuntimeError(f"{seq.request_id}: no room for {num_needed} blocks")
        seq.block_table = [self._take_free_block() for _ in range(num_needed)]
        seq.num_computed_tokens = num_computed_tokens
        self._num_committed[seq.request_id] = 0
        self._holders[seq.request_id] = seq
        self.commit_full_blocks(seq)
        return seq.block_table[: self.num_blocks_for(num_computed_tokens)]

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether there is room for ``num_tokens`` more tokens past the computed ones."""
        return self._num_missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq.block_table`` to hold ``num_computed_tokens + num_tokens`` tokens."""
        num_missing = self._num_missing_blocks(seq, num_tokens)
        assert num_missing <= self.num_free_blocks, "append_slots() without room"
        for _ in range(num_missing):
            seq.block_table.append(self._take_free_block())

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed since the last call.

        Called after ``seq.num_computed_tokens`` advanced. A block whose hash is already
        registered (another sequence computed the same prefix meanwhile) stays unregistered and
        returns to the plain free list when freed; the hash chain goes on regardless.
        """
        if not self.enable_prefix_caching:
            return
        start = self._num_committed[seq.request_id]
        end = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if end <= start:
            return
        chain = self._chain(seq, end)
        for i in range(start, end):
            block, h = seq.block_table[i], chain[i]
            if self._block_hash[block] is None and h not in self._hash_to_block:
                self._block_hash[block] = h
                self._hash_to_block[h] = block
        self._num_committed[seq.request_id] = end

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references and forget it (also for a sequence that holds none).

        Blocks are released tail first, so that a sequence's later blocks are evicted before
        its prefix, which other requests are more likely to share.
        """
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0
            if self._ref_counts[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        self._chains.pop(seq.request_id, None)
        self._num_committed.pop(seq.request_id, None)
        self._holders.pop(seq.request_id, None)

    def num_exclusive_blocks(self, seq: Sequence) -> int:
        """Blocks that freeing ``seq`` would return to the pool (those only it references)."""
        return sum(1 for b in seq.block_table if self._ref_counts[b] == 1)

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (benchmarks: cold cache). Returns how many."""
        n = len(self._evictable)
        for block in self._evictable:
            h = self._block_hash[block]
            assert h is not None
            del self._hash_to_block[h]
            self._block_hash[block] = None
            self._free.append(block)
        self._evictable.clear()
        return n

    # --------------------------------------------------------------- checks

    def check_integrity(self) -> None:
        """Assert that ref counts, free lists, the hash map and block tables agree. O(pool)."""
        refs = [0] * self.num_blocks
        for rid, seq in self._holders.items():
            assert seq.request_id == rid
            assert len(set(seq.block_table)) == len(seq.block_table), f"{rid}: duplicate block"
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens, rid
            assert self._num_committed[rid] <= len(seq.block_table), rid
            for block in seq.block_table:
                refs[block] += 1
        assert refs == self._ref_counts, "ref counts disagree with block tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "duplicate in free list"
        assert not free & evictable, "block both free and evictable"
        for block in range(self.num_blocks):
            in_pool = block in free or block in evictable
            assert in_pool == (refs[block] == 0), (
                f"block {block}: used={refs[block]} free={in_pool}"
            )
            if block in free:
                assert self._block_hash[block] is None, f"free block {block} has a hash"
            if block in evictable:
                assert self._block_hash[block] is not None, f"evictable block {block} lacks hash"
        for h, block in self._hash_to_block.items():
            assert self._block_hash[block] == h, f"hash map points at block {block} wrongly"
        num_hashed = sum(1 for h in self._block_hash if h is not None)
        assert num_hashed == len(self._hash_to_block), "block hashes missing from the map"

    # -------------------------------------------------------------- helpers

    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            h = self._block_hash[block]
            assert h is not None
            del self._hash_to_block[h]
            self._block_hash[block] = None
        assert self._ref_counts[block] == 0
        self._ref_counts[block] = 1
        return block

    def _num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_tokens)
        return max(0, needed - len(seq.block_table))

    def _hit_blocks(self, seq: Sequence) -> list[int]:
        """Leading cached blocks of ``seq``, at most ``(num_tokens - 1) // block_size``."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        if max_blocks == 0:
            return hits
        chain, lookup = self._chain(seq, max_blocks), self._hash_to_block.get
        for i in range(max_blocks):
            block = lookup(chain[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def _chain(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Hashes of ``seq``'s first ``num_full_blocks`` full blocks, extended lazily."""
        chain = self._chains.setdefault(seq.request_id, [])
        bs = self.block_size
        prompt, outputs = seq.prompt_token_ids, seq.output_token_ids
        n_prompt = len(prompt)
        while len(chain) < num_full_blocks:
            start = len(chain) * bs
            end = start + bs
            if end <= n_prompt:
                tokens = tuple(prompt[start:end])
            elif start >= n_prompt:
                tokens = tuple(outputs[start - n_prompt : end - n_prompt])
            else:
                tokens = tuple(prompt[start:]) + tuple(outputs[: end - n_prompt])
            assert len(tokens) == bs, "hashing a block that is not full"
            parent = chain[-1] if chain else ROOT_HASH
            chain.append(hash((parent, tokens)))
        return chain
