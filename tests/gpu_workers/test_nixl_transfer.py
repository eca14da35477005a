"""NIXL (UCX) transport between two real processes on CPU memory, leases in real Redis."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid

import pytest
import redis
import torch

from slaq.gpu_workers.kv_transfer.base import TransferError
from slaq.gpu_workers.kv_transfer.lease import Lease, LeaseStore
from slaq.gpu_workers.kv_transfer.nixl import block_runs, nixl_available

pytestmark = pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")

SHAPE = (3, 2, 16, 4, 2, 8)  # layers, k/v, blocks, block_size, kv heads, head dim


def _pool(dtype: torch.dtype) -> torch.Tensor:
    # Every element distinct, so a row from the wrong block or plane cannot pass.
    return torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32).view(SHAPE).to(dtype)


def _owner(redis_url: str, request_id: str, block_ids: list[int], dtype_name: str,
           ready: mp.Event, done: mp.Event) -> None:
    """The prefill side: registers its pool, writes the lease, waits until told to exit."""
    from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

    pool = _pool(getattr(torch, dtype_name))
    owner = NixlTransport("prefill-test", pool=pool)
    store = LeaseStore(redis.Redis.from_url(redis_url), ttl_s=60)
    store.write(Lease(request_id=request_id, attempt=1, prefill_worker="prefill-test",
                      transport="nixl", block_ids=block_ids, num_tokens=len(block_ids) * 4,
                      first_token_id=7, expires_at=store.new_expiry(),
                      descriptor=owner.describe()))
    ready.set()
    done.wait(60)
    owner.close()


def _start_owner(redis_url: str, block_ids: list[int], dtype: str = "float32"):
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    request_id = f"nixl-{uuid.uuid4().hex[:8]}"
    proc = ctx.Process(target=_owner, args=(redis_url, request_id, block_ids, dtype, ready,
                                            done), daemon=True)
    proc.start()
    assert ready.wait(60), "owner process did not come up"
    return proc, done, request_id


def test_block_runs_merge_consecutive_ids():
    assert block_runs([3, 4, 5, 9, 1, 2]) == [(3, 0, 3), (9, 3, 1), (1, 4, 2)]
    assert block_runs([0]) == [(0, 0, 1)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pull_reads_leased_rows_from_another_process(redis_url, dtype):
    from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

    block_ids = [5, 6, 7, 2, 15, 0]
    proc, done, request_id = _start_owner(redis_url, block_ids, dtype)
    puller = NixlTransport("decode-test")
    try:
        store = LeaseStore(redis.Redis.from_url(redis_url), ttl_s=60)
        lease = store.read(request_id)
        assert lease is not None and lease.transport == "nixl"
        kv = puller.pull(lease)
        expected = _pool(getattr(torch, dtype))[:, :, block_ids]
        assert kv.shape == expected.shape and kv.dtype == expected.dtype
        assert torch.equal(kv, expected)
        # A second pull reuses the loaded remote agent and sees the same rows.
        assert torch.equal(puller.pull(lease), expected)
        assert store.release(request_id)
    finally:
        done.set()
        proc.join(30)
        puller.close()
    assert proc.exitcode == 0


def test_pull_from_a_dead_owner_raises(redis_url):
    from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

    proc, done, request_id = _start_owner(redis_url, [1, 2])
    lease = LeaseStore(redis.Redis.from_url(redis_url), ttl_s=60).read(request_id)
    assert lease is not None
    proc.kill()
    proc.join(30)
    # The dead owner never releases its lease; drop it so other tests see a clean Redis.
    LeaseStore(redis.Redis.from_url(redis_url), ttl_s=60).release(request_id)
    puller = NixlTransport("decode-test", timeout_s=3.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            puller.pull(lease)
        assert time.monotonic() - t0 < 30
    finally:
        puller.close()


def test_bad_descriptor_and_out_of_range_blocks(redis_url):
    from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

    puller = NixlTransport("decode-test")
    bad = Lease(request_id="x", attempt=1, prefill_worker="p", transport="nixl",
                block_ids=[1], num_tokens=4, first_token_id=0, expires_at=time.time() + 5,
                descriptor={"agent": "p"})
    with pytest.raises(TransferError):
        puller.pull(bad)
    owner = NixlTransport("owner-test", pool=_pool(torch.float32))
    try:
        far = Lease(request_id="y", attempt=1, prefill_worker="p", transport="nixl",
                    block_ids=[SHAPE[2]], num_tokens=4, first_token_id=0,
                    expires_at=time.time() + 5, descriptor=owner.describe())
        with pytest.raises(TransferError):
            puller.pull(far)
    finally:
        owner.close()
        puller.close()
    with pytest.raises(ValueError):
        NixlTransport("x", timeout_s=0)
