"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

A decode step of a small model is dominated by kernel launches (a dozen per layer), not by
math: replaying a captured graph removes them. :class:`DecodeGraphs` captures the model's
forward plus ``compute_logits`` for one decode token per sequence at each bucket size, over
static input buffers; a step pads its batch up to the next bucket (padding rows write no KV:
slot ``-1``; attend to nothing: context length 0). The paged Triton backend runs inside the
graph with a fixed partition count, so one capture serves every context length up to
``max_model_len``.

:class:`CudaGraphModelRunner` is a :class:`ModelRunner` that uses it for decode steps and for
steps whose prefill chunks are short (:func:`graph_rows`: one row per token), and falls back to
the eager path for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slaq.gpu_workers.engine.attention import AttentionMetadata
from slaq.gpu_workers.engine.config import EngineConfig
from slaq.gpu_workers.engine.model_runner import (
    LaunchedStep,
    ModelRunner,
    fill_placeholders,
    index_tensor,
)
from slaq.gpu_workers.engine.models import ModelConfig
from slaq.gpu_workers.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sampler import SampleRequest, greedy_argmax
from slaq.gpu_workers.engine.sequence import PLACEHOLDER_TOKEN_ID

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512)


def bucket_sizes(max_batch_size: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    """The capture sizes for batches up to ``max_batch_size`` (the largest is included)."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    sizes = [b for b in buckets if b < max_batch_size]
    return [*sizes, max_batch_size]


class DecodeGraphs:
    """One captured graph per bucket; :meth:`run` pads, copies inputs in and replays."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 max_model_len: int, max_batch_size: int, fuse_layer_ops: bool = True) -> None:
        from slaq.gpu_workers.engine.paged_attention import TritonPagedBackend

        assert kv_cache.device.type == "cuda", "CUDA graphs need a CUDA pool"
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.fuse_layer_ops = fuse_layer_ops
        self.width = -(-max_model_len // block_size)
        self.sizes = bucket_sizes(max_batch_size)
        self.backend = TritonPagedBackend(max_context=self.width * block_size)
        n, dev = self.sizes[-1], kv_cache.device
        self._tokens = torch.zeros((3, n), dtype=torch.long, device=dev)  # ids, positions, slots
        self._tables = torch.zeros((n, self.width), dtype=torch.int32, device=dev)
        self._lens = torch.zeros(n, dtype=torch.int32, device=dev)
        # Pinned host mirrors: the input copies are then truly asynchronous (a pageable
        # source makes each one a blocking staging copy). They are rewritten only once the
        # previous step's copies are done (``_copied``).
        self._host_tokens = torch.zeros((3, n), dtype=torch.long).pin_memory()
        self._host_tables = torch.zeros(n * self.width, dtype=torch.int32).pin_memory()
        self._host_lens = torch.zeros(n, dtype=torch.int32).pin_memory()
        self._copied = torch.cuda.Event()
        # Per bucket: the graph, its logits and their greedy argmax (computed in the graph).
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.num_replays = 0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _forward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        meta = AttentionMetadata(
            block_size=self.block_size, slot_mapping=self._tokens[2, :n], prefills=[],
            num_prefill_tokens=0, decode_block_tables=self._tables[:n],
            decode_context_lens=self._lens[:n])
        hidden = self.model(self._tokens[0, :n], self._tokens[1, :n], self.kv_cache, meta,
                            self.backend)
        logits = self.model.compute_logits(hidden)
        return logits, greedy_argmax(logits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs reuse its memory pool)."""
        self._tokens.zero_()
        self._tokens[2].fill_(-1)  # capture writes no KV ...
        self._lens.zero_()  # ... and attends to nothing
        from slaq.gpu_workers.engine.models.layer_ops import compiled_ops

        stream = torch.cuda.Stream(self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
        # Fused element-wise ops only inside the graphs (decode is launch-bound); eager
        # prefill keeps the plain ops, so no prefill shape ever waits for a compile.
        eager_ops = self.model.ops
        if self.fuse_layer_ops:
            self.model.ops = compiled_ops()
        try:
            self._capture_all(stream)
        finally:
            self.model.ops = eager_ops
        torch.cuda.current_stream(self.kv_cache.device).wait_stream(stream)
        torch.cuda.synchronize(self.kv_cache.device)

    def _capture_all(self, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            for n in reversed(self.sizes):
                for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                    self._forward(n)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    logits, greedy_ids = self._forward(n)
                self._graphs[n] = (graph, logits, greedy_ids)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            block_tables: list[list[int]],
            fill: Callable[[torch.Tensor], None] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[len(token_ids), vocab]`` for one decode token per sequence, and their
        greedy argmax ``[len(token_ids)]``. ``fill`` may rewrite the input token ids (the
        graph's buffer) on the device before the replay."""
        n = len(token_ids)
        size = next(s for s in self.sizes if s >= n)
        width = max(len(t) for t in block_tables)
        assert width <= self.width, "sequence longer than max_model_len"
        self._copied.synchronize()  # the pinned mirrors are free to rewrite
        tokens = self._host_tokens.numpy()
        tokens[0, :n], tokens[1, :n], tokens[2, :n] = token_ids, positions, slots
        tokens[:2, n:size] = 0
        tokens[2, n:size] = -1
        host_tables = self._host_tables[:n * width].view(n, width)
        tables = host_tables.numpy()
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = t
        lens = self._host_lens.numpy()
        lens[:n] = positions
        lens[:n] += 1
        lens[n:size] = 0
        # Whole (small, contiguous) token and length buffers; of the tables only [:n, :width]
        # moves: entries past a context are never read.
        self._tokens.copy_(self._host_tokens, non_blocking=True)
        self._tables[:n, :width].copy_(host_tables, non_blocking=True)
        self._lens.copy_(self._host_lens, non_blocking=True)
        self._copied.record()
        if fill is not None:
            fill(self._tokens[0])
        graph, logits, greedy_ids = self._graphs[size]
        graph.replay()
        self.num_replays += 1
        return logits[:n], greedy_ids[:n]


class CudaGraphModelRunner(ModelRunner):
    """:class:`ModelRunner` with the paged Triton backend and graph-replayed decode steps."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        from slaq.gpu_workers.engine.paged_attention import TritonPagedBackend

        super().__init__(config, model_config)
        if self.device.type != "cuda":
            raise ValueError("CudaGraphModelRunner needs a CUDA device")
        self.backend = TritonPagedBackend()
        # Context tokens a step's prefill rows may read in the decode graph (graph_rows): as
        # many as make up half the weights' bytes in KV.
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.max_graph_context_reads = int(weight_bytes / 2
                                           / (self.bytes_per_block / self.block_size))
        self.graphs: DecodeGraphs | None = None
        if config.use_cuda_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size,
                                       self.max_model_len, config.scheduler.max_num_seqs,
                                       config.fuse_layer_ops)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                overlap: Callable[[], None] | None = None) -> RunnerOutput:
        g = self.graphs
        rows = None
        if g is not None and not out.is_empty:
            rows = graph_rows(out.scheduled, self.block_size, g.max_batch_size,
                              self.max_graph_context_reads)
        if rows is None:
            return super().execute(out, overlap)
        return self._execute_rows(rows, overlap)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: LaunchedStep | None) -> LaunchedStep:
        """:meth:`ModelRunner.launch` through the decode graphs where the step fits them."""
        g = self.graphs
        rows = None if g is None else graph_rows(out.scheduled, self.block_size,
                                                 g.max_batch_size, self.max_graph_context_reads)
        if rows is None:
            return super().launch(out, prev)
        assert g is not None
        _logits, greedy_ids = g.run(
            rows.token_ids, rows.positions, rows.slots, rows.block_tables,
            fill=lambda ids: fill_placeholders(ids, rows.placeholder_rows, prev))
        if len(rows.sample_indices) != len(rows.token_ids):
            greedy_ids = greedy_ids.index_select(0, index_tensor(rows.sample_indices,
                                                                 greedy_ids.device))
        # No copy of the graph's output buffer is needed: the next replay overwrites it, but
        # both its readers (the copy to the host, the next step's fill) come first in the
        # stream.
        return LaunchedStep.start([r.request_id for r in rows.requests], greedy_ids)

    def _execute_rows(self, rows: GraphRows, overlap: Callable[[], None] | None) -> RunnerOutput:
        assert self.graphs is not None
        logits, greedy_ids = self.graphs.run(rows.token_ids, rows.positions, rows.slots,
                                             rows.block_tables)
        if len(rows.sample_indices) != len(rows.token_ids):
            # Not blocking, or ``overlap`` would no longer hide behind the replay.
            idx = index_tensor(rows.sample_indices, logits.device)
            logits, greedy_ids = logits.index_select(0, idx), greedy_ids.index_select(0, idx)
        if overlap is not None:
            overlap()  # the replay is queued: host work here hides behind it
        result = RunnerOutput()
        if not rows.requests:
            return result
        sampled = self.sampler.sample(logits, rows.requests, greedy_ids)
        for row, token_id, lp in zip(rows.requests, sampled.token_ids, sampled.logprobs,
                                     strict=True):
            result.sampled_token_ids[row.request_id] = token_id
            if lp is not None:
                result.logprobs[row.request_id] = lp
        return result


@dataclass(slots=True)
class GraphRows:
    """A step laid out as decode-graph rows: one row per token computed."""

    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)  # rows whose logits are sampled
    requests: list[SampleRequest] = field(default_factory=list)  # one per sampled row
    # (row, request id) of tokens the previous launched step samples (placeholders)
    placeholder_rows: list[tuple[int, str]] = field(default_factory=list)


def graph_rows(scheduled: list[ScheduledSequence], block_size: int, max_rows: int,
               max_context_reads: int) -> GraphRows | None:
    """Lay a step out as rows of the decode graph, or None when it belongs to the eager path.

    A decode is one row. A short prefill chunk becomes one row per token: row ``i`` attends to
    the sequence's first ``start + i + 1`` tokens, whose KV is in the pool once the layer has
    stored the whole step's K/V, so the rows compute exactly the chunk's causal attention.
    That replaces an eager forward (hundreds of kernel launches, the most of a short chunk's
    time on a GPU: a 32-token chunk behind a cached 1,024-token prefix) with one replay. Each
    row reads its whole context, so a step goes to the graph only while its prefill rows read
    at most ``max_context_reads`` context tokens in all, and it has at most ``max_rows`` rows.
    """
    # Decide before building anything: a mixed step's decode rows come first, and building
    # them only to meet a long chunk after them would be host time thrown away.
    if sum(item.num_new_tokens for item in scheduled) > max_rows:
        return None
    reads = sum(item.num_new_tokens * (2 * item.start + item.num_new_tokens + 1) // 2
                for item in scheduled if item.num_new_tokens > 1)
    if reads > max_context_reads:
        return None
    rows = GraphRows()
    for item in scheduled:
        seq, start, end = item.seq, item.start, item.start + item.num_new_tokens
        table = seq.block_table
        if end == start + 1:  # a decode (most rows): the loop below, without its overhead
            block = start // block_size
            rows.token_ids.append(seq.token_id_at(start))
            rows.block_tables.append(table[:block + 1])
            rows.positions.append(start)
            rows.slots.append(table[block] * block_size + start % block_size)
        else:
            for pos in range(start, end):
                rows.token_ids.append(seq.token_id_at(pos))
                rows.block_tables.append(table[:pos // block_size + 1])
            rows.positions += range(start, end)
            rows.slots += seq.slots(start, end, block_size)
        if item.sample:
            rows.sample_indices.append(len(rows.token_ids) - 1)
            rows.requests.append(SampleRequest.of(seq))
            if seq.last_token_id == PLACEHOLDER_TOKEN_ID:
                rows.placeholder_rows.append((len(rows.token_ids) - 1, seq.request_id))
    return rows
