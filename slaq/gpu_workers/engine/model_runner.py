"""The model runner: the only engine code that touches torch devices.

It owns the model, the paged KV pool ``[num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]`` and the sampler. ``execute`` turns a :class:`SchedulerOutput` into one forward over
all scheduled tokens (prefill chunks and decodes flattened together) and samples a token for
every sequence whose ``sample`` flag is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slaq.gpu_workers.engine.attention import (
    AttentionMetadata,
    PrefillSpan,
    get_attention_backend,
)
from slaq.gpu_workers.engine.config import EngineConfig
from slaq.gpu_workers.engine.decode_cache import DecodeKVCache
from slaq.gpu_workers.engine.kv_pool import allocate_pool, open_shm_pool, unlink_shm_pool
from slaq.gpu_workers.engine.loader import load_model, load_model_config, torch_dtype
from slaq.gpu_workers.engine.models import ModelConfig
from slaq.gpu_workers.engine.models.cpu_linear import (
    bf16_linears,
    pack_linears,
)
from slaq.gpu_workers.engine.models.layer_ops import cpu_kernel_ops
from slaq.gpu_workers.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from slaq.gpu_workers.engine.sampler import Sampler, SampleRequest, greedy_argmax
from slaq.gpu_workers.engine.sequence import PLACEHOLDER_TOKEN_ID

__all__ = ["LaunchedStep", "ModelRunner", "fill_placeholders", "index_tensor", "open_shm_pool"]

# CPU: bytes the contiguous copy of the decode batch's K/V may take (see decode_cache).
DECODE_KV_BYTES = 2 * 1024 ** 3


@dataclass(slots=True)
class _Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the flattened tokens whose logits are sampled
    sample_rows: list[SampleRequest]
    # (row, request id) of input tokens the previous launched step samples (placeholders)
    placeholder_rows: list[tuple[int, str]]


@dataclass(slots=True)
class LaunchedStep:
    """A greedy step queued on the device whose tokens the host has not read yet.

    ``token_ids`` (on the device, one per sampled row, in ``request_ids`` order) feed the
    next launched step's placeholders without a host round trip; ``host_token_ids`` is
    their copy on its way to pinned host memory, complete once ``ready`` has happened.
    """

    request_ids: list[str]
    token_ids: torch.Tensor
    host_token_ids: torch.Tensor
    ready: torch.cuda.Event | None

    @classmethod
    def start(cls, request_ids: list[str], token_ids: torch.Tensor) -> LaunchedStep:
        if token_ids.device.type != "cuda":
            return cls(request_ids, token_ids, token_ids, None)
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(request_ids, token_ids, host, ready)

    def collect(self) -> RunnerOutput:
        """Wait for the tokens and hand them over."""
        if self.ready is not None:
            self.ready.synchronize()
        return RunnerOutput(sampled_token_ids=dict(zip(
            self.request_ids, self.host_token_ids.tolist(), strict=True)))


def fill_placeholders(input_ids: torch.Tensor, placeholder_rows: list[tuple[int, str]],
                      prev: LaunchedStep | None) -> None:
    """Copy, on the device, the previous step's sampled tokens into the input rows that
    hold placeholders for them (asynchronous scheduling)."""
    if not placeholder_rows:
        return
    assert prev is not None, "placeholder tokens but no launched step to take them from"
    row_of = {rid: i for i, rid in enumerate(prev.request_ids)}
    idx = index_tensor([[row for row, _ in placeholder_rows],
                        [row_of[rid] for _, rid in placeholder_rows]], input_ids.device)
    input_ids.index_copy_(0, idx[0], prev.token_ids.index_select(0, idx[1]))


def index_tensor(indices: list[int] | list[list[int]], device: torch.device) -> torch.Tensor:
    """``indices`` as a long tensor on ``device``; to a GPU from pinned memory without
    blocking (a plain ``torch.tensor(..., device=cuda)`` is a blocking copy that would wait
    for the step running there)."""
    cuda = device.type == "cuda"
    return torch.tensor(indices, dtype=torch.long, pin_memory=cuda).to(device, non_blocking=cuda)


class ModelRunner:
    """Loads the model named by ``config.model`` onto ``config.device`` and runs steps."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.model_config = model_config or load_model_config(config.model)
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len
        self.model = load_model(config.model, self.model_config, self.device, self.dtype)
        self.model.rotary.build(self.max_model_len, self.device, self.dtype)
        # CPU fp32 linears: oneDNN with the weights packed once (MKL's F.linear re-packs them
        # on every call; 1.6x at decode's 32 rows), or, asked for and accurate here, oneDNN's
        # bf16 math mode on unpacked weights. See models/cpu_linear.
        self.matmul_precision: str | None = None
        if self.device.type == "cpu" and self.dtype == torch.float32:
            if config.cpu_matmul_precision == "bf16" and bf16_linears(self.model):
                self.matmul_precision = "bf16"
            else:
                self.matmul_precision = "ieee"
                pack_linears(self.model)
            if config.fuse_layer_ops:
                self.model.ops = cpu_kernel_ops() or self.model.ops
        mc = self.model_config
        self.backend = get_attention_backend(self.device, config.cpu_decode_attention,
                                             mc.num_heads, mc.num_kv_heads, mc.head_dim,
                                             self.dtype, config.cpu_prefill_kernel)
        self.sampler = Sampler(self.device)
        self.num_blocks = config.cache.num_blocks or self._blocks_from_memory()
        self.kv_cache = allocate_pool(self.kv_shape, self.dtype, self.device, config.kv_shm_name)
        # Paged kernels read the pool in place; without one, on CPU a persistent copy of the
        # decode batch's K/V beats a gather.
        self.decode_kv = (DecodeKVCache(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype,
                                        self.device, DECODE_KV_BYTES)
                          if self.device.type == "cpu" and not self.backend.reads_pool
                          else None)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        mc = self.model_config
        return (mc.num_layers, 2, self.num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)

    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return mc.num_layers * 2 * self.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _blocks_from_memory(self) -> int:
        cache = self.config.cache
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * cache.memory_fraction)
        else:
            budget = cache.cpu_pool_bytes
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"no room for a single KV block ({self.bytes_per_block} bytes)")
        return num_blocks

    def close(self) -> None:
        """Drop the pool; removes its shared-memory file if it has one."""
        if self.config.kv_shm_name:
            unlink_shm_pool(self.config.kv_shm_name)

    def free_request_state(self, request_id: str) -> None:
        """Forget per-request state (the seeded generator) once a request is done."""
        self.sampler.forget(request_id)

    # -- KV blocks, for disaggregation -------------------------------------------------------

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks: ``[L, 2, n, block_size, kv_heads, head_dim]``."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(2, idx)

    def check_blocks(self, kv: torch.Tensor) -> None:
        """Raise ValueError unless ``kv`` holds blocks of this pool's shape (any count): a
        hand-off from a worker with another block size or model is refused before anything
        is allocated for it."""
        pool = self.kv_shape
        if kv.dim() != len(pool) or tuple(kv.shape[:2]) != pool[:2] or \
                tuple(kv.shape[3:]) != pool[3:]:
            raise ValueError(f"kv blocks shaped {tuple(kv.shape)} do not fit this engine's "
                             f"pool {tuple(pool)} (another block size or model?)")

    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Store ``kv`` (shaped as :meth:`read_blocks` returns) into the given blocks."""
        self.check_blocks(kv)
        if kv.shape[2] != len(block_ids):
            raise ValueError(f"kv has shape {tuple(kv.shape)}: {kv.shape[2]} blocks for "
                             f"{len(block_ids)} block ids")
        from slaq.gpu_workers.kv_transfer.block_copy import scatter_blocks

        # On CUDA a Triton block-copy kernel (2.3x index_copy_ on an H100); index_copy_ on CPU.
        scatter_blocks(kv.to(device=self.device, dtype=self.dtype).contiguous(), self.kv_cache,
                       block_ids)
        if self.decode_kv is not None:
            self.decode_kv.invalidate()

    # -- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput,
                overlap: Callable[[], None] | None = None) -> RunnerOutput:
        """Run every scheduled token in one forward; sample where ``sample`` is set.

        ``overlap`` is called once the forward is queued on the device and before the host
        waits for it (host work to hide behind device work; on CPU nothing overlaps).
        """
        if out.is_empty:
            if overlap is not None:
                overlap()
            return RunnerOutput()
        batch = self._prepare(out.scheduled)
        hidden = self._forward(batch)
        result = RunnerOutput()
        if not batch.sample_rows:
            if overlap is not None:
                overlap()
            return result
        logits = self._sampled_logits(batch, hidden)
        if overlap is not None:
            overlap()
        sampled = self.sampler.sample(logits, batch.sample_rows)
        for row, token_id, lp in zip(batch.sample_rows, sampled.token_ids, sampled.logprobs,
                                     strict=True):
            result.sampled_token_ids[row.request_id] = token_id
            if lp is not None:
                result.logprobs[row.request_id] = lp
        return result

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: LaunchedStep | None) -> LaunchedStep:
        """Queue a step whose every sampled row is greedy (unpenalised, no logprobs) and
        return without waiting for it; input tokens that are placeholders come from
        ``prev``'s sampled tokens on the device. :meth:`LaunchedStep.collect` gives the
        :class:`RunnerOutput`. (On CPU the step runs before this returns.)"""
        assert not out.is_empty
        batch = self._prepare(out.scheduled)
        fill_placeholders(batch.input_ids, batch.placeholder_rows, prev)
        logits = self._sampled_logits(batch, self._forward(batch))
        return LaunchedStep.start([r.request_id for r in batch.sample_rows],
                                  greedy_argmax(logits))

    def _forward(self, batch: _Batch) -> torch.Tensor:
        return self.model(batch.input_ids, batch.positions, self.kv_cache, batch.meta,
                          self.backend)

    def _sampled_logits(self, batch: _Batch, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden.index_select(0, batch.sample_indices))

    def _prepare(self, scheduled: list[ScheduledSequence]) -> _Batch:
        # Multi-token chunks go first (one attention call each), single tokens last (batched).
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        dkv = self.decode_kv
        if dkv is not None:
            if any(dkv.touches(s.seq) for s in prefills):
                dkv.invalidate()  # its KV is being recomputed: the copy may not follow it
            # Longest context first, so that the dense decode attention can cut the batch into
            # groups that read keys only up to their own longest row; rows the dense copy
            # holds keep their places (it appends to them and gathers only newcomers).
            decodes = dkv.arrange(decodes, seq=lambda s: s.seq, context_len=lambda s: s.start + 1,
                                  order=lambda s: (-s.start, s.seq.request_id))
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[PrefillSpan] = []
        sample_idx: list[int] = []
        rows: list[SampleRequest] = []
        holes: list[tuple[int, str]] = []
        for s in prefills + decodes:
            seq, end = s.seq, s.start + s.num_new_tokens
            assert 0 < s.num_new_tokens and end <= seq.num_tokens, "bad schedule"
            assert end <= self.max_model_len, "sequence longer than max_model_len"
            assert len(seq.block_table) * bs >= end, "KV slots not allocated"
            token_start = len(input_ids)
            if s.num_new_tokens == 1:
                input_ids.append(seq.token_id_at(s.start))
            else:
                input_ids += seq.token_ids[s.start:end]
                spans.append(PrefillSpan(
                    token_start, s.num_new_tokens, s.start,
                    index_tensor(seq.block_table[:-(-end // bs)], self.device)))
            positions += range(s.start, end)
            slots += seq.slots(s.start, end, bs)
            if s.sample:
                sample_idx.append(len(input_ids) - 1)
                rows.append(SampleRequest.of(seq))
                if seq.last_token_id == PLACEHOLDER_TOKEN_ID:
                    holes.append((len(input_ids) - 1, seq.request_id))
        dev = self.device
        # index_tensor, not torch.tensor(..., device=cuda): a step launched ahead must not
        # wait here for the one still running on the device.
        meta = AttentionMetadata(
            block_size=bs, slot_mapping=index_tensor(slots, dev), prefills=spans,
            num_prefill_tokens=len(input_ids) - len(decodes))
        if decodes:
            self._add_decode_meta(meta, decodes)
        return _Batch(index_tensor(input_ids, dev), index_tensor(positions, dev), meta,
                      index_tensor(sample_idx, dev), rows, holes)

    def _add_decode_meta(self, meta: AttentionMetadata,
                         decodes: list[ScheduledSequence]) -> None:
        bs = self.block_size
        context_lens = [s.start + 1 for s in decodes]
        num_blocks = [-(-c // bs) for c in context_lens]
        width = max(num_blocks)
        # Padding entries point at block 0; the mask (or the kernel's lengths) hides them.
        tables = [s.seq.block_table[:n] + [0] * (width - n)
                  for s, n in zip(decodes, num_blocks, strict=True)]
        lens = index_tensor(context_lens, self.device)
        meta.decode_block_tables = index_tensor(tables, self.device)
        meta.decode_context_lens = lens
        dkv = self.decode_kv
        if dkv is not None and dkv.plan([s.seq for s in decodes], context_lens):
            meta.decode_kv = dkv
            return
        if self.backend.reads_pool:
            return
        key_pos = torch.arange(width * bs, device=self.device)
        meta.decode_mask = (key_pos[None, :] < lens[:, None])[:, None, None, :]
