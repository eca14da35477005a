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
which we accept, as vLLM did for years with the same scheme. :func:`block_hashes` computes the
same chain from token ids alone, so a prefill worker can tell which decode worker holds a
prompt's prefix.

Hand-offs (disaggregation): :meth:`BlockManager.pin_prefix` takes references on the leading
cached blocks of a prompt whose KV is about to arrive from a prefill worker, so that only the
rest is pulled; :meth:`BlockManager.allocate_prefilled` then builds the sequence's block table
from the pinned blocks plus fresh ones. A pinned block has a reference, so it cannot be
evicted between the lookup and its use. :meth:`BlockManager.prefix_summary` lists a bounded
number of chain hashes of recently used cached prefixes, which decode workers publish in their
heartbeat (prefix-affinity routing).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from itertools import islice

from slaq.gpu_workers.engine.sequence import Sequence

ROOT_HASH = 0x5D1A0  # parent hash of a sequence's first block
# Chain hashes kept for prefix_summary(): 64-bit ints, ~2.5 kB of heartbeat JSON. On the
# Mooncake conversation trace (slaq.bench.handoff) 64 remembered too few conversations between
# their turns and 256 did no better than 128.
PREFIX_SUMMARY_SIZE = 128


def iter_block_hashes(token_ids: Seq[int], block_size: int) -> Iterator[int]:
    """Chain hashes of the full blocks of ``token_ids``, lazily (a lookup that misses early in a
    long prompt stops the hashing there). The values :class:`BlockManager` registers cached
    blocks under, for the same block size: the ``i``-th stands for the whole prefix
    ``token_ids[: (i + 1) * block_size]``."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    parent = ROOT_HASH
    for i in range(len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        yield parent


def block_hashes(token_ids: Seq[int], block_size: int, num_blocks: int | None = None) -> list[int]:
    """The first ``num_blocks`` (default: all) of :func:`iter_block_hashes`."""
    return list(islice(iter_block_hashes(token_ids, block_size), num_blocks))


def summary_depths(num_blocks: int, num_prompt_blocks: int) -> list[int]:
    """Chain depths (1-based, ascending) a leaving sequence with ``num_blocks`` committed
    blocks records for the summary: its prompt's last full block (a retried or edited next
    turn shares the prompt but not the answer) and its deepest block (the next turn of the
    conversation starts with prompt and answer). One hash stands for its whole prefix, so
    shallower depths would only take room: on the Mooncake trace, recording depths 1, 4, 16..
    as well moved 2.5 to 5 points more of the blocks at summary sizes 128 to 64."""
    return sorted({d for d in (min(num_prompt_blocks, num_blocks), num_blocks) if d > 0})


class BlockManager:
    """The only mutator of free lists, ref counts, the prefix-hash map and ``seq.block_table``.

    Not thread-safe: one engine thread owns it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 summary_size: int = PREFIX_SUMMARY_SIZE):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if summary_size < 0:
            raise ValueError("summary_size must be >= 0")
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
        # Cached blocks pinned for hand-offs not allocated yet (key: the coming request id).
        self._pins: dict[str, list[int]] = {}
        # Chain hashes for prefix_summary(), least recently recorded first.
        self.summary_size = summary_size
        self._recent_hashes: OrderedDict[int, None] = OrderedDict()
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0
        # Hand-offs: blocks of transferred KV that prefilled sequences needed, and how many of
        # them were cached here already (their KV was not pulled).
        self.num_handoff_blocks = 0
        self.num_handoff_reused_blocks = 0

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

        The blocks :meth:`pin_prefix` pinned under ``seq.request_id`` (if any) lead the block
        table with their KV already there; every other block is fresh, so the transferred KV
        can be written into it unconditionally. Sets ``seq.num_computed_tokens`` and registers
        the full computed blocks in the prefix cache at once, so the caller must write the KV
        into the returned blocks before the next engine step. Leaves ``num_cached_tokens``
        alone. Returns the blocks that must receive KV: those of computed tokens past the
        pinned ones (a slice of ``seq.block_table``; empty when all were pinned).
        Raises ValueError (releasing the pin) when the pinned blocks are not ``seq``'s prompt
        prefix, RuntimeError when there is no room.
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if not 0 < num_computed_tokens <= seq.num_tokens:
            raise ValueError("num_computed_tokens must be in 1..num_tokens")
        self.check_pins(seq, num_computed_tokens)
        pinned = self._pins.get(seq.request_id, [])
        num_computed_blocks = self.num_blocks_for(num_computed_tokens)
        num_new = self.num_prefilled_new_blocks(seq)
        if num_new > self.num_free_blocks:
            raise RuntimeError(f"{seq.request_id}: no room for {num_new} blocks")
        self._pins.pop(seq.request_id, None)  # the pins' references pass to the sequence
        seq.block_table = pinned + [self._take_free_block() for _ in range(num_new)]
        seq.num_computed_tokens = num_computed_tokens
        self._num_committed[seq.request_id] = len(pinned)  # registered already
        self._holders[seq.request_id] = seq
        self.commit_full_blocks(seq)
        self.num_handoff_blocks += num_computed_blocks
        self.num_handoff_reused_blocks += len(pinned)
        return seq.block_table[len(pinned):num_computed_blocks]

    def num_prefilled_new_blocks(self, seq: Sequence) -> int:
        """Fresh blocks :meth:`allocate_prefilled` takes for ``seq`` (all its tokens' blocks
        but those pinned for it)."""
        return self.num_blocks_for(seq.num_tokens) - self.num_pinned(seq.request_id)

    def num_prefilled_kv_blocks(self, key: str, num_computed_tokens: int) -> int:
        """How many blocks :meth:`allocate_prefilled` returns to receive transferred KV: those
        of the first ``num_computed_tokens`` past the ones pinned under ``key``."""
        return max(0, self.num_blocks_for(num_computed_tokens) - self.num_pinned(key))

    def check_pins(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Raise ValueError (releasing the pin) when the blocks pinned under
        ``seq.request_id`` are not ``seq``'s prompt prefix within its first
        ``num_computed_tokens``; :meth:`allocate_prefilled` calls it, and a caller that must
        not act on a hand-off doomed to fail (preempt for it) calls it first."""
        pinned = self._pins.get(seq.request_id, [])
        if pinned and not self._is_prefix_of(pinned, seq, num_computed_tokens):
            self.unpin(seq.request_id)
            self._chains.pop(seq.request_id, None)
            raise ValueError(f"{seq.request_id}: the pinned blocks are not its prompt prefix")

    # ---------------------------------------------------------- hand-off pins

    def pin_prefix(self, key: str, token_ids: Seq[int]) -> int:
        """Pin the leading full blocks of ``token_ids`` found in the prefix cache for a
        hand-off; returns how many (their KV need not be transferred).

        ``key`` is the request id the sequence will have in :meth:`allocate_prefilled`, which
        takes the pinned blocks over; :meth:`unpin` gives them back if it never comes. Each
        pinned block gets a reference (an evictable one leaves the LRU), so nothing can evict
        or overwrite it meanwhile.
        """
        if key in self._pins or key in self._holders:
            raise ValueError(f"{key!r} already holds or pins blocks")
        if not self.enable_prefix_caching:
            return 0
        lookup = self._hash_to_block.get
        pinned: list[int] = []
        for h in iter_block_hashes(token_ids, self.block_size):
            block = lookup(h)
            if block is None:
                break
            pinned.append(block)
        if not pinned:
            return 0
        for block in pinned:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        self._pins[key] = pinned
        return len(pinned)

    def num_pinned(self, key: str) -> int:
        """Blocks pinned under ``key`` (0 when none)."""
        return len(self._pins.get(key, ()))

    def pinned_keys(self) -> set[str]:
        """Keys with pinned blocks (hand-offs not allocated yet)."""
        return set(self._pins)

    def unpin(self, key: str) -> int:
        """Release the blocks pinned under ``key`` (no-op when none); returns how many."""
        pinned = self._pins.pop(key, [])
        for block in reversed(pinned):
            self._release(block)
        return len(pinned)

    def prefix_summary(self) -> list[int]:
        """Chain hashes of cached prefixes, most recently recorded first, at most
        ``summary_size``: for each sequence freed recently, its deepest committed block and
        its prompt's last full block (:func:`summary_depths`). Hashes evicted since are left
        out.
        """
        stale = [h for h in self._recent_hashes if h not in self._hash_to_block]
        for h in stale:
            del self._recent_hashes[h]
        return list(reversed(self._recent_hashes))

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
        self._record_summary(seq)
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        self._chains.pop(seq.request_id, None)
        self._num_committed.pop(seq.request_id, None)
        self._holders.pop(seq.request_id, None)

    def uncache(self, block_ids: list[int]) -> int:
        """Take ``block_ids`` out of the prefix cache (their KV is not what their hash says: a
        hand-off whose KV write failed); they stay held. Returns how many were registered."""
        n = 0
        for block in block_ids:
            h = self._block_hash[block]
            if h is not None and self._hash_to_block.get(h) == block:
                del self._hash_to_block[h]
                self._block_hash[block] = None
                n += 1
        return n

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
        for key, pinned in self._pins.items():
            assert key not in self._holders, f"{key}: pinned and holding"
            assert len(set(pinned)) == len(pinned), f"{key}: duplicate pinned block"
            for block in pinned:
                assert self._block_hash[block] is not None, f"pinned block {block} lacks hash"
                refs[block] += 1
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

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        assert self._ref_counts[block] >= 0
        if self._ref_counts[block] == 0:
            if self._block_hash[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def _is_prefix_of(self, pinned: list[int], seq: Sequence, num_computed_tokens: int) -> bool:
        n = len(pinned)
        if n * self.block_size > min(num_computed_tokens, seq.num_prompt_tokens):
            return False
        chain = self._chain(seq, n)
        return all(self._block_hash[b] == h for b, h in zip(pinned, chain, strict=False))

    def _record_summary(self, seq: Sequence) -> None:
        """Remember a leaving sequence's cached prefix for :meth:`prefix_summary`."""
        if not self.summary_size:
            return
        num = self._num_committed.get(seq.request_id, 0)
        chain = self._chains.get(seq.request_id, [])
        recent = self._recent_hashes
        num = min(num, len(chain))
        for depth in summary_depths(num, seq.num_prompt_tokens // self.block_size):
            h = chain[depth - 1]
            if h in self._hash_to_block:  # computed here or by another holder of that prefix
                recent[h] = None
                recent.move_to_end(h)
        while len(recent) > self.summary_size:
            recent.popitem(last=False)

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
