"""Typed, validated configuration values shared by the engine, the workers and the simulator.

IO-free: no torch imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# EngineConfig.cpu_decode_attention's values (see attention.get_attention_backend).
CPU_DECODE_ATTENTION = ("auto", "paged", "copy")

MAX_STOP_STRINGS = 4


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy.

    ``seed`` makes sampling reproducible per request whatever else shares its batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top logprobs to return per token; None = off

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """Whether the logits' argmax alone gives the token: greedy, unpenalised, no logprobs
        (the sampler then needs no float copy; asynchronous scheduling may run ahead)."""
        return self.greedy and self.repetition_penalty == 1.0 and self.logprobs is None

    def to_dict(self) -> dict:
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos,
            "repetition_penalty": self.repetition_penalty, "logprobs": self.logprobs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        d = dict(d)
        d["stop"] = tuple(d.get("stop") or ())
        d["stop_token_ids"] = tuple(d.get("stop_token_ids") or ())
        return cls(**d)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache shape. ``num_blocks=None`` lets the runner size the pool from memory."""

    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # Fraction of free device memory (GPU) the pool may take when num_blocks is None.
    memory_fraction: float = 0.8
    # CPU: bytes the pool may take when num_blocks is None.
    cpu_pool_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything needed to build an :class:`~slaq.gpu_workers.engine.llm_engine.LLMEngine`."""

    model: str  # path to an HF-style directory (config.json, tokenizer, safetensors)
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Name of a POSIX shared-memory file for the KV pool on CPU, so that a decode worker
    # on the same host can map it (shm transport). None = private memory.
    kv_shm_name: str | None = None
    use_cuda_graphs: bool = True
    # Build a step's outputs during the next step's forward (see llm_engine). None: on for
    # the torch runner on CUDA, where the forward runs asynchronously to the host.
    async_output: bool | None = None
    # Schedule and launch step N+1 before reading step N's tokens where every sampled row is
    # plain greedy (see llm_engine): the device never waits for the host between steps.
    # None: on for model runners on CUDA. It replaces async_output where it applies.
    async_scheduling: bool | None = None
    # Fuse each layer's element-wise ops (see models/layer_ops): on CUDA with torch.compile,
    # on CPU (fp32) with C kernels compiled at first use.
    fuse_layer_ops: bool = True
    # CPU fp32 linears: "ieee" keeps strict fp32 through oneDNN with the weights prepacked
    # once; "bf16" runs them unpacked under oneDNN's bf16 math mode where the CPU has bf16
    # instructions and a probe shows the mode keeps fp32 accuracy (see models/cpu_linear). On
    # stop 14's AVX512-BF16 EPYC the packed strict path was the faster of the two at every
    # row count, with bitwise the same outputs as the mode gives packed weights.
    cpu_matmul_precision: str = "ieee"
    # CPU decode attention: "paged" reads K/V in place from the pool with a C kernel compiled
    # at first use (fp32; see cpu_kernels), "copy" runs batched matmuls over a contiguous copy
    # of the batch's K/V (decode_cache), "auto" the kernel where it applies (fp32, a head
    # layout it takes, a C compiler that builds it), else the copy.
    cpu_decode_attention: str = "auto"
    # CPU fp32, with the paged decode kernel: prefill chunks attend causally through a C
    # kernel too (cpu_kernels/prefill_attention.c; after cached tokens over the gathered
    # blocks), where it builds and takes the head layout. False keeps torch's SDPA.
    cpu_prefill_kernel: bool = True

    def __post_init__(self) -> None:
        if self.cpu_decode_attention not in CPU_DECODE_ATTENTION:
            raise ValueError(f"cpu_decode_attention must be one of {CPU_DECODE_ATTENTION}, "
                             f"got {self.cpu_decode_attention!r}")
        if self.cpu_matmul_precision not in ("ieee", "bf16"):
            raise ValueError("cpu_matmul_precision must be 'ieee' or 'bf16', "
                             f"got {self.cpu_matmul_precision!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
