"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

A decode step of a small model is dominated by kernel launches (a dozen per layer), not by
math: replaying a captured graph removes them. :class:`DecodeGraphs` captures the model's
forward plus ``compute_logits`` for one decode token per sequence at each bucket size, over
static input buffers; a step pads its batch up to the next bucket (padding rows write no KV:
slot ``-1``; attend to nothing: context length 0). The paged Triton backend runs inside the
graph with a fixed partition count, so one capture serves every context length up to
``max_model_len``.

:class:`CudaGraphModelRunner` is a :class:`ModelRunner` that uses it for decode-only steps and
falls back to the eager path for steps with prefill chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slaq.gpu_workers.engine.attention import AttentionMetadata
from slaq.gpu_workers.engine.config import EngineConfig
from slaq.gpu_workers.engine.model_runner import ModelRunner
from slaq.gpu_workers.engine.models import ModelConfig
from slaq.gpu_workers.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sampler import SampleRequest, greedy_argmax

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
            block_tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[len(token_ids), vocab]`` for one decode token per sequence, and their
        greedy argmax ``[len(token_ids)]``."""
        n = len(token_ids)
        size = next(s for s in self.sizes if s >= n)
        width = max(len(t) for t in block_tables)
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
        if (g is None or out.is_empty or len(out.scheduled) > g.max_batch_size
                or any(s.num_new_tokens != 1 or not s.sample for s in out.scheduled)):
            return super().execute(out, overlap)
        return self._execute_decode(out.scheduled, overlap)

    def _execute_decode(self, scheduled: list[ScheduledSequence],
                        overlap: Callable[[], None] | None) -> RunnerOutput:
        assert self.graphs is not None
        bs = self.block_size
        ids, positions, slots, tables, rows = [], [], [], [], []
        for s in scheduled:
            seq, pos = s.seq, s.start
            assert pos < self.max_model_len, "sequence longer than max_model_len"
            table = seq.block_table
            ids.append(seq.token_id_at(pos))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table[:pos // bs + 1])
            p = seq.params
            rows.append(SampleRequest(seq.request_id, p,
                                      seq.token_ids if p.repetition_penalty != 1.0 else ()))
        logits, greedy_ids = self.graphs.run(ids, positions, slots, tables)
        if overlap is not None:
            overlap()  # the replay is queued: host work here hides behind it
        sampled = self.sampler.sample(logits, rows, greedy_ids)
        result = RunnerOutput()
        for row, token_id, lp in zip(rows, sampled.token_ids, sampled.logprobs, strict=True):
            result.sampled_token_ids[row.request_id] = token_id
            if lp is not None:
                result.logprobs[row.request_id] = lp
        return result
