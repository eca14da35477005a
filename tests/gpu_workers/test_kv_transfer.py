"""KV transports (local, shm) and the lease store, on real Redis and real shared memory."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import redis
import torch

from slaq.gpu_workers.engine.kv_pool import allocate_pool, unlink_shm_pool
from slaq.gpu_workers.kv_transfer.base import TransferError
from slaq.gpu_workers.kv_transfer.lease import Lease, LeaseStore
from slaq.gpu_workers.kv_transfer.local import LocalTransport
from slaq.gpu_workers.kv_transfer.shm import ShmTransport

SHAPE = (2, 2, 8, 4, 2, 3)  # layers, k/v, blocks, block_size, kv heads, head dim


def _lease(request_id: str = "r1", attempt: int = 0, blocks: list[int] | None = None,
           transport: str = "shm", descriptor: dict[str, str] | None = None) -> Lease:
    return Lease(request_id=request_id, attempt=attempt, prefill_worker="pre-0",
                 transport=transport, block_ids=blocks or [5, 1, 6], num_tokens=10,
                 first_token_id=42, expires_at=time.time() + 30,
                 descriptor=descriptor or {})


@pytest.fixture()
def shm_pool():
    name = f"slaq-test-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pool = allocate_pool(SHAPE, torch.float32, torch.device("cpu"), shm_name=name)
    pool.copy_(torch.arange(pool.numel(), dtype=torch.float32).view(SHAPE))
    yield name, pool
    unlink_shm_pool(name)


def test_shm_pull_copies_the_leased_rows(shm_pool):
    name, pool = shm_pool
    owner = ShmTransport(name, SHAPE, torch.float32)
    lease = _lease(descriptor=owner.describe())
    puller = ShmTransport()
    kv = puller.pull(lease)
    assert kv.shape == (2, 2, 3, 4, 2, 3)
    assert torch.equal(kv, pool[:, :, [5, 1, 6]])
    # The copy is the caller's: later writes by the owner do not reach it.
    pool[:, :, 5].fill_(-1.0)
    assert not torch.equal(kv[:, :, 0], pool[:, :, 5])
    # ... but a second pull sees the owner's current pages through the same mapping.
    assert torch.equal(puller.pull(lease)[:, :, 0], pool[:, :, 5])


def test_a_tail_of_the_lease_pulls_only_its_blocks(shm_pool):
    name, pool = shm_pool
    owner = ShmTransport(name, SHAPE, torch.float32)
    lease = _lease(descriptor=owner.describe())  # blocks 5, 1, 6; 10 tokens of 4 a block
    assert lease.tail(0, 4) is lease and lease.tail(3, 4) is None
    tail = lease.tail(1, 4)
    assert (tail.block_ids, tail.num_tokens, tail.first_token_id) == ([1, 6], 6, 42)
    assert lease.block_ids == [5, 1, 6]  # the lease itself is unchanged
    assert torch.equal(ShmTransport().pull(tail), pool[:, :, [1, 6]])
    owner_local = LocalTransport("pre-0", lambda ids: pool.index_select(2, torch.tensor(ids)))
    try:
        local = _lease(transport="local", descriptor={"worker": "pre-0"}).tail(2, 4)
        assert torch.equal(LocalTransport("dec-0").pull(local), pool[:, :, [6]])
    finally:
        owner_local.close()
    with pytest.raises(ValueError):
        lease.tail(-1, 4)


def test_shm_pull_errors(shm_pool):
    name, _ = shm_pool
    descriptor = ShmTransport(name, SHAPE, torch.float32).describe()
    puller = ShmTransport()
    with pytest.raises(TransferError):
        puller.pull(_lease(blocks=[8], descriptor=descriptor))
    with pytest.raises(TransferError):
        puller.pull(_lease(descriptor={**descriptor, "shm_name": "slaq-no-such-pool"}))
    with pytest.raises(TransferError):
        puller.pull(_lease(descriptor={**descriptor, "shape": "[2, 2, 9, 4, 2, 3]"}))
    with pytest.raises(TransferError):
        puller.pull(_lease(descriptor={}))
    with pytest.raises(TransferError):
        ShmTransport().describe()


def test_local_transport_uses_the_owner_reader():
    pool = torch.randn(SHAPE)
    owner = LocalTransport("pre-0", lambda ids: pool.index_select(2, torch.tensor(ids)))
    try:
        kv = LocalTransport("dec-0").pull(_lease(blocks=[3, 0], transport="local",
                                                 descriptor=owner.describe()))
        assert torch.equal(kv, pool[:, :, [3, 0]])
    finally:
        owner.close()
    with pytest.raises(TransferError):
        LocalTransport("dec-0").pull(_lease(transport="local"))


def test_lease_round_trip_and_validation():
    lease = _lease(descriptor={"shm_name": "x", "first_text": "Hé"})
    assert Lease.from_mapping(lease.to_mapping()) == lease
    raw = {k.encode(): v.encode() for k, v in lease.to_mapping().items()}
    assert Lease.from_mapping(raw) == lease
    with pytest.raises(ValueError):
        Lease.from_mapping({"request_id": "r"})
    with pytest.raises(ValueError):
        Lease("r", 0, "p", "shm", [], 3, 1, 0.0)


def test_lease_store_protocol(redis_url):
    client = redis.Redis.from_url(redis_url)
    store = LeaseStore(client, ttl_s=30)
    rid = f"lease-{uuid.uuid4().hex[:8]}"
    assert store.read(rid) is None
    lease = _lease(request_id=rid, attempt=2)
    store.write(lease)
    assert store.read(rid) == lease
    assert store.alive([(rid, 2), (rid, 1), ("nobody", 0)]) == {(rid, 2)}
    assert store.release(rid) is True
    assert store.release(rid) is False  # a second delete removes nothing
    assert store.read(rid) is None and store.alive([(rid, 2)]) == set()
    with pytest.raises(ValueError):
        LeaseStore(client, ttl_s=0)


def test_lease_expires_with_its_ttl(redis_url):
    client = redis.Redis.from_url(redis_url)
    store = LeaseStore(client, ttl_s=0.2)
    rid = f"lease-{uuid.uuid4().hex[:8]}"
    store.write(_lease(request_id=rid))
    assert store.alive([(rid, 0)]) == {(rid, 0)}
    deadline = time.monotonic() + 5
    while store.alive([(rid, 0)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.alive([(rid, 0)]) == set()
    assert store.release(rid) is False


def test_block_copy_fallbacks_on_cpu_match_indexing():
    from slaq.gpu_workers.kv_transfer.block_copy import (
        gather_blocks_torch,
        kernel_usable,
        scatter_blocks,
    )

    src = torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32).view(SHAPE)
    assert not kernel_usable(src)  # CPU tensors never go to the kernel outside tests
    assert torch.equal(gather_blocks_torch(src, [7, 0, 0]), src[:, :, [7, 0, 0]])
    dst = torch.zeros(2, 2, 5, 4, 2, 3, dtype=torch.bfloat16)
    scatter_blocks(src, dst, [4, 1], src_ids=[6, 2])  # pool to pool, with a dtype change
    assert torch.equal(dst[:, :, [4, 1]], src[:, :, [6, 2]].to(torch.bfloat16))
    assert torch.count_nonzero(dst[:, :, [0, 2, 3]]) == 0
    scatter_blocks(src[:, :, :2], dst, [3, 0])
    assert torch.equal(dst[:, :, [3, 0]], src[:, :, :2].to(torch.bfloat16))


@pytest.mark.parametrize(("ids", "runs"), [([3, 4, 5], 1), ([6, 1, 4, 0, 2, 7], 6), ([2], 1)])
def test_transfer_bench_in_process_methods_agree(ids, runs):
    from slaq.bench.transfer import TransferBenchConfig, _in_process

    cfg = TransferBenchConfig(iters=1, warmup=0, dtype="float32")
    pool = torch.randn(SHAPE)
    row = _in_process(pool, 1, ids, cfg)
    assert row["num_runs"] == runs
    assert {"index_select", "run_copy", "gather_blocks", "write_index_copy"} <= set(row["methods"])
    assert all(m["correct"] for m in row["methods"].values() if "correct" in m)
    assert row["gb_per_s"] == row["methods"]["index_select"]["gb_per_s"]
