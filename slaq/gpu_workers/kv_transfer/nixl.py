"""NIXL transport (UCX underneath): the decode side READs leased block rows from the prefill
worker's registered KV pool, across hosts, in CPU (DRAM) or GPU (VRAM) memory.

The owner registers its whole pool once and publishes its NIXL agent metadata in the lease
descriptor (a few hundred bytes, base64), so no side channel or metadata server is needed. A
puller loads each remote agent once, registers one destination tensor per pull and posts a
single READ whose descriptors are the ``(layer, k|v, run of consecutive blocks)`` rows of the
pool ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.

A dead owner shows up as a failed or stalled transfer: ``pull`` raises :class:`TransferError`
after ``timeout_s``, and the caller re-prefills.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slaq.gpu_workers.kv_transfer.base import TransferError, Transport

if TYPE_CHECKING:
    from slaq.gpu_workers.kv_transfer.lease import Lease

BLOCK_DIM = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nixl_available() -> bool:
    """Whether the NIXL Python API (``nixl-cu12``/``nixl-cu13``/``nixl``) can be imported."""
    try:
        _nixl_api()
    except ImportError:
        return False
    return True


def _nixl_api() -> Any:
    # The CUDA-variant wheels install differently named modules; the `nixl` meta package
    # re-exports whichever is present.
    for mod in ("nixl._api", "nixl_cu12", "nixl_cu13"):
        try:
            return __import__(mod, fromlist=["nixl_agent"])
        except ImportError:
            continue
    raise ImportError("NIXL is not installed (pip install nixl-cu12)")


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(first_block, first_row_in_output, length)`` for each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        if runs and runs[-1][0] + runs[-1][2] == b:
            first, row, n = runs[-1]
            runs[-1] = (first, row, n + 1)
        else:
            runs.append((b, i, 1))
    return runs


def row_descriptors(base: int, num_rows: int, runs: list[tuple[int, int, int]],
                    num_blocks: int, row_bytes: int, dev: int, use_src: bool) -> np.ndarray:
    """Nx3 ``(address, length, device)`` rows for every (layer, k|v) plane and run.

    The pool has ``num_rows`` planes of ``num_blocks`` block rows each; ``use_src`` picks the
    runs' pool block ids (remote side) or their output positions (local side).
    """
    starts = np.array([r[0] if use_src else r[1] for r in runs], dtype=np.uint64)
    lengths = np.array([r[2] for r in runs], dtype=np.uint64) * np.uint64(row_bytes)
    planes = np.arange(num_rows, dtype=np.uint64)[:, None] * np.uint64(num_blocks * row_bytes)
    addr = np.uint64(base) + planes + starts[None, :] * np.uint64(row_bytes)
    out = np.empty((addr.size, 3), dtype=np.uint64)
    out[:, 0] = addr.reshape(-1)
    out[:, 1] = np.broadcast_to(lengths, addr.shape).reshape(-1)
    out[:, 2] = dev
    return out


class NixlTransport(Transport):
    """Owner side (``pool`` given): registers the pool and describes it. Puller side: loads
    remote agents on first use and READs block rows into a fresh tensor on ``device``."""

    name = "nixl"

    def __init__(self, worker: str, pool: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", timeout_s: float = 10.0,
                 backends: tuple[str, ...] = ("UCX",)) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        api = _nixl_api()
        self.worker = worker
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        # A fresh agent name per process: a restarted owner must not be mistaken for the
        # agent (and memory) a puller loaded before.
        self.agent_name = f"{worker}-{uuid.uuid4().hex[:8]}"
        self._agent = api.nixl_agent(self.agent_name,
                                     api.nixl_agent_config(backends=list(backends)))
        if "UCX" in backends and "UCX" not in self._agent.backends:
            raise TransferError("NIXL has no UCX backend on this machine")
        self._lock = threading.Lock()
        self._remotes: dict[str, str] = {}  # agent name -> loaded name
        self._pool = pool
        self._pool_reg: Any = None
        if pool is not None:
            if not pool.is_contiguous() or pool.dim() != 6:
                raise ValueError("the KV pool must be a contiguous 6-d tensor")
            self._pool_reg = self._agent.register_memory(pool)

    # -- owner side ------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        if self._pool is None:
            raise TransferError("this NIXL transport has no pool to describe")
        pool = self._pool
        return {
            "agent": self.agent_name,
            "metadata": base64.b64encode(self._agent.get_agent_metadata()).decode(),
            "addr": str(pool.data_ptr()),
            "mem": "DRAM" if pool.device.type == "cpu" else "VRAM",
            "dev": str(max(pool.get_device(), 0)),
            "shape": json.dumps(list(pool.shape)),
            "dtype": _dtype_name(pool.dtype),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
        }

    # -- puller side -----------------------------------------------------------------

    def pull(self, lease: Lease) -> torch.Tensor:
        d = lease.descriptor
        try:
            agent, meta = d["agent"], base64.b64decode(d["metadata"])
            addr, mem, dev = int(d["addr"]), d["mem"], int(d["dev"])
            shape = [int(x) for x in json.loads(d["shape"])]
            dtype = _DTYPES[d["dtype"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise TransferError(f"lease has no usable nixl descriptor: {exc}") from exc
        if len(shape) != 6:
            raise TransferError(f"bad pool shape {shape}")
        num_blocks = shape[BLOCK_DIM]
        if min(lease.block_ids) < 0 or max(lease.block_ids) >= num_blocks:
            raise TransferError(f"block ids out of range for a pool of {num_blocks}")
        n = len(lease.block_ids)
        out = torch.empty((shape[0], 2, n, *shape[3:]), dtype=dtype, device=self.device)
        row_bytes = out[0, 0, 0].numel() * out.element_size()
        runs = block_runs(list(lease.block_ids))
        planes = shape[0] * 2
        remote = row_descriptors(addr, planes, runs, num_blocks, row_bytes, dev, use_src=True)
        local = row_descriptors(out.data_ptr(), planes, runs, n, row_bytes,
                                max(out.get_device(), 0), use_src=False)
        with self._lock:
            self._read(agent, meta, mem, out, local, remote)
        return out

    def _read(self, agent: str, meta: bytes, mem: str, out: torch.Tensor,
              local: np.ndarray, remote: np.ndarray) -> None:
        ag = self._agent
        remote_name = self._load_remote(agent, meta)
        reg = ag.register_memory(out)
        handle = None
        try:
            local_descs = ag.get_xfer_descs(local, "DRAM" if out.device.type == "cpu" else "VRAM")
            remote_descs = ag.get_xfer_descs(remote, mem)
            handle = ag.initialize_xfer("READ", local_descs, remote_descs, remote_name)
            state = ag.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"nixl READ from {agent} timed out")
                state = ag.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"nixl READ from {agent} failed ({state})")
        except TransferError:
            self._forget_remote(agent)
            raise
        except Exception as exc:  # nixl raises its own error types from the bindings
            self._forget_remote(agent)
            raise TransferError(f"nixl READ from {agent} failed: {exc}") from exc
        finally:
            if handle is not None:
                self._release(handle)
            ag.deregister_memory(reg)

    def _release(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # a handle stuck in flight goes with the agent
            self._agent.release_xfer_handle(handle)

    def _load_remote(self, agent: str, meta: bytes) -> str:
        name = self._remotes.get(agent)
        if name is None:
            try:
                name = self._agent.add_remote_agent(meta)
            except Exception as exc:
                raise TransferError(f"cannot load nixl agent {agent}: {exc}") from exc
            self._remotes[agent] = name
        return name

    def _forget_remote(self, agent: str) -> None:
        name = self._remotes.pop(agent, None)
        if name is not None:
            with contextlib.suppress(Exception):  # already unreachable
                self._agent.remove_remote_agent(name)

    def close(self) -> None:
        with self._lock:
            for agent in list(self._remotes):
                self._forget_remote(agent)
            if self._pool_reg is not None:
                self._agent.deregister_memory(self._pool_reg)
                self._pool_reg = None
