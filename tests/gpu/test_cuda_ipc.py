"""CUDA IPC transport between two processes on one GPU."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from slaq.gpu_workers.kv_transfer.base import TransferError
from slaq.gpu_workers.kv_transfer.lease import Lease

SHAPE = (4, 2, 64, 16, 2, 64)


def _pool() -> torch.Tensor:
    n = torch.Size(SHAPE).numel()
    return (torch.arange(n, device="cuda", dtype=torch.float32) % 1000).view(SHAPE).to(
        torch.bfloat16)


def _owner(conn, done) -> None:
    from slaq.gpu_workers.kv_transfer.cuda_ipc import CudaIpcTransport

    pool = _pool()
    pool[:, :, 9].fill_(-3.0)  # something only this process wrote
    torch.cuda.synchronize()
    conn.send(CudaIpcTransport("prefill-ipc", pool=pool).describe())
    done.wait(60)


def _lease(descriptor: dict[str, str], blocks: list[int]) -> Lease:
    return Lease(request_id="r", attempt=1, prefill_worker="prefill-ipc", transport="cuda_ipc",
                 block_ids=blocks, num_tokens=16 * len(blocks), first_token_id=1,
                 expires_at=time.time() + 30, descriptor=descriptor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pull_copies_rows_from_another_process_and_detects_its_death():
    from slaq.gpu_workers.kv_transfer.cuda_ipc import CudaIpcTransport

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    done = ctx.Event()
    proc = ctx.Process(target=_owner, args=(child, done), daemon=True)
    proc.start()
    descriptor = parent.recv()
    puller = CudaIpcTransport("decode-ipc")
    blocks = [9, 3, 4, 63]
    kv = puller.pull(_lease(descriptor, blocks))
    expected = _pool()
    expected[:, :, 9].fill_(-3.0)
    assert kv.device.type == "cuda" and torch.equal(kv, expected[:, :, blocks])
    # Straight into this process's own pool, at other block ids; the rest stays as it was.
    own = torch.zeros(SHAPE, device="cuda", dtype=torch.bfloat16)
    dst = [0, 17, 5, 2]
    puller.pull_into(_lease(descriptor, blocks), own, dst)
    assert torch.equal(own[:, :, dst], expected[:, :, blocks])
    assert torch.count_nonzero(own[:, :, [b for b in range(64) if b not in dst]]) == 0
    with pytest.raises(ValueError):
        puller.pull_into(_lease(descriptor, blocks), own, dst[:2])
    with pytest.raises(TransferError):
        puller.pull(_lease(descriptor, [64]))
    done.set()
    proc.join(30)
    with pytest.raises(TransferError):
        puller.pull(_lease(descriptor, blocks))
    with pytest.raises(TransferError):
        puller.pull_into(_lease(descriptor, blocks), own, dst)
    puller.close()


# On CUDA also with every pull big enough for the Triton kernel (where triton is installed).
PATHS = [("cpu", None)] + ([("cuda", None), ("cuda", 0)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(("device", "kernel_min_bytes"), PATHS)
@pytest.mark.parametrize("ids", [[5, 6, 7, 8], [1, 2, 3, 10, 11, 30], [5, 0, 39, 6, 7, 9, 12, 3],
                                 [7], list(range(40)), [4, 4, 2]])
def test_gather_blocks_copies_runs_and_scattered_ids(device, kernel_min_bytes, ids, monkeypatch):
    from slaq.gpu_workers.kv_transfer import cuda_ipc
    from slaq.gpu_workers.kv_transfer.cuda_ipc import gather_blocks

    if kernel_min_bytes is not None:
        monkeypatch.setattr(cuda_ipc, "KERNEL_MIN_BYTES", kernel_min_bytes)
    pool = torch.randn(3, 2, 40, 16, 2, 8, device=device).to(torch.bfloat16)
    got = gather_blocks(pool, ids)
    assert torch.equal(got, pool[:, :, ids])
    # A copy: the owner's later writes do not show through.
    pool[:, :, ids[0]].fill_(7.0)
    assert not torch.equal(got[:, :, 0], pool[:, :, ids[0]])
