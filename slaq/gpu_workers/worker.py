"""Bind a Celery worker to a role and a device.

``slaq worker --role prefill|decode|both --device cpu --name NAME`` (also reachable as
``python -m slaq.gpu_workers.worker``, the same click command) loads the model, starts the
engine thread, the heartbeat thread and then a Celery worker with a thread pool: many tickets
wait concurrently on their requests while one thread steps the engine, so they share batches.

A ticket holds its pool thread for as long as its request runs here (a ``both`` or decode
worker: to the last token; a prefill worker: to the hand-off), so the pool is as large as the
engine has seats (``max_num_seqs``), and with ``acks_late``, prefetch multiplier 1 and
``worker_disable_prefetch`` (:mod:`slaq.tasks.config`) the worker holds no more tickets than
that: the rest wait in the broker, where priorities, re-tickets and other workers reach them.

Queues: a prefill worker drains ``prefill.priority|default|flex|batch`` in that order (under
``SLAQ_POLICY=fifo`` the one ``prefill.fifo`` instead); a decode worker ``decode.<NAME>`` then
``decode.any``; a ``both`` worker all of them.

The ``sim`` engine runs in every role: its KV blocks hold no bytes, so a disaggregated sim
pair hands over through :class:`SimTransport`, which moves nothing and takes as long as the
cost model says the transfer would.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slaq.platform.services import resolve_settings
from slaq.platform.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class WorkerOptions:
    """How to run one worker process."""

    role: str
    device: str = "cpu"
    name: str | None = None
    concurrency: int | None = None  # Celery threads; None = one per engine seat
    engine_kind: str = "torch"
    num_blocks: int | None = None  # KV pool size; None = sized from memory
    max_num_seqs: int | None = None  # engine seats; None = SchedulerConfig's default
    # KV hand-off: "auto" = shm on CPU, CUDA IPC on a GPU (same host); "nixl" across hosts.
    transport: str = "auto"
    loglevel: str = "INFO"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.loglevel not in LOGLEVELS:
            raise ValueError(f"loglevel must be one of {LOGLEVELS}, got {self.loglevel!r}")
        if self.engine_kind not in ("torch", "sim"):
            raise ValueError(f"engine must be torch or sim, got {self.engine_kind!r}")
        if self.transport not in ("auto", "nixl"):
            raise ValueError(f"transport must be auto or nixl, got {self.transport!r}")
        if self.engine_kind == "sim" and self.transport != "auto":
            raise ValueError("the sim engine hands KV over through its own transport only")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")

    @property
    def worker_name(self) -> str:
        return self.name or f"{self.role}-{socket.gethostname()}-{os.getpid()}"

    @property
    def seats(self) -> int:
        """Sequences the engine runs at once (``max_num_seqs`` or the engine's default)."""
        from slaq.gpu_workers.engine.config import SchedulerConfig

        return self.max_num_seqs or SchedulerConfig().max_num_seqs

    @property
    def pool_size(self) -> int:
        """Celery threads = tickets held at once: ``concurrency`` if given, else one a seat
        (more would only wait inside the engine, out of the broker's and the policy's reach)."""
        return self.concurrency or self.seats


def _model_path(settings: Settings) -> str:
    if Path(settings.model).is_dir():
        return str(settings.model)
    from slaq.gpu_workers.model_store import pull

    return str(pull(settings.model, settings.models_dir, progress=False))


def sim_profile_from_env() -> Any:
    """The cost profile a sim worker stands in for (``SLAQ_SIM_PROFILE``) and its speed
    (``SLAQ_SIM_SPEED``: 1 = the modelled hardware; 0.1 = ten times slower). Env, not flags, so
    that launchers and benchmarks choose them without new CLI plumbing."""
    from slaq.gpu_workers.engine.cost_model import get_profile

    speed = float(os.environ.get("SLAQ_SIM_SPEED") or 1.0)
    if speed <= 0:
        raise ValueError("SLAQ_SIM_SPEED must be > 0")
    return get_profile(os.environ.get("SLAQ_SIM_PROFILE") or "smollm2-135m-cpu"), speed


def _placeholder_kv(num_blocks: int) -> Any:
    # Shaped like LLMEngine.read_blocks ([L, 2, n, block_size, kv_heads, head_dim]) but empty:
    # the sim engine's blocks are accounting only.
    import numpy as np

    return np.empty((1, 2, num_blocks, 0, 0, 0), dtype=np.uint8)


def _sim_runner(profile: Any, speed: float) -> Any:
    from slaq.gpu_workers.engine.sim_runner import SimRunner

    class SimKVRunner(SimRunner):
        """The sim runner plus the block reads/writes of a KV hand-off (nothing to copy)."""

        def read_blocks(self, block_ids: list[int]) -> Any:
            return _placeholder_kv(len(block_ids))

        def check_blocks(self, kv: Any) -> None:
            return None  # placeholders of any shape: nothing is written

        def write_blocks(self, block_ids: list[int], kv: Any) -> None:
            return None

    return SimKVRunner(profile, realtime=True, time_scale=speed)


class SimTransport:
    """KV hand-off between sim workers: no bytes move; the pull takes the cost model's
    transfer time (at the sim speed) and returns empty blocks of the leased count."""

    name = "sim"

    def __init__(self, profile: Any, speed: float = 1.0) -> None:
        self.profile = profile
        self.speed = speed

    def describe(self) -> dict[str, str]:
        return {"profile": self.profile.name}

    def pull(self, lease: Any) -> Any:
        time.sleep(self.profile.transfer_time(lease.num_tokens) / self.speed)
        return _placeholder_kv(len(lease.block_ids))

    def close(self) -> None:
        return None


def build_engine(opts: WorkerOptions, model_path: str, shm_name: str | None) -> Any:
    """The engine this worker owns (torch, or the cost-model ``sim`` engine)."""
    from slaq.gpu_workers.engine.config import CacheConfig, EngineConfig, SchedulerConfig

    sched = (SchedulerConfig(max_num_seqs=opts.max_num_seqs) if opts.max_num_seqs
             else SchedulerConfig())
    config = EngineConfig(model=model_path, device=opts.device, scheduler=sched,
                          cache=CacheConfig(num_blocks=opts.num_blocks), kv_shm_name=shm_name)
    from slaq.gpu_workers.engine.llm_engine import LLMEngine

    if opts.engine_kind == "sim":
        return LLMEngine(config, runner=_sim_runner(*sim_profile_from_env()))
    return LLMEngine(config, runner=opts.engine_kind)


def run_worker(opts: WorkerOptions, settings: Settings | None = None) -> int:
    """Run a worker until it is stopped (SIGTERM/SIGINT: warm shutdown). Returns the exit code."""
    settings = resolve_settings(settings or Settings.from_env())
    runtime = WorkerRuntime(opts, settings, model_path=_model_path(settings),
                            build_engine=build_engine)
    with runtime:
        return runtime.consume()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_pools(prefix: str, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unlink ``<prefix>-<pid>`` pool files whose process is gone (a SIGKILLed worker of
    this name cannot clean up after itself). Returns the names removed."""
    removed = []
    for path in shm_dir.glob(f"{prefix}-*"):
        pid = path.name[len(prefix) + 1:]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class WorkerRuntime:
    """Everything one worker process holds: engine loop, transports, heartbeat, Celery app.

    Use as a context manager: entering loads the model and starts the engine and heartbeat
    threads (so the worker is ready before it takes a ticket); leaving stops them and removes
    the shared-memory pool.
    """

    def __init__(self, opts: WorkerOptions, settings: Settings, *, model_path: str,
                 build_engine: Any = build_engine) -> None:
        self.opts = opts
        self.settings = settings
        self.name = opts.worker_name
        self.model_path = model_path
        self._build_engine = build_engine
        self.engine: Any = None
        self.loop: Any = None
        self.app: Any = None
        self.heartbeat: Any = None
        self.queues: list[str] = []

    def _shm_name(self) -> str | None:
        # Only a CPU prefill pool needs to be mappable by decode workers on the host.
        if (self.opts.role != "prefill" or self.opts.device != "cpu"
                or self.opts.engine_kind != "torch" or self.opts.transport != "auto"):
            return None
        prefix = "slaq-kv-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        remove_stale_pools(prefix)
        return f"{prefix}-{os.getpid()}"

    def __enter__(self) -> WorkerRuntime:
        import redis

        from slaq.gpu_workers.engine_loop import EngineLoop
        from slaq.gpu_workers.heartbeat import HeartbeatThread
        from slaq.gpu_workers.kv_transfer.lease import LeaseStore
        from slaq.tasks.app import create_app, set_app
        from slaq.tasks.config import decode_queue, queues_for_role

        s = self.settings
        self.redis = redis.Redis.from_url(s.redis_url)
        self.leases = LeaseStore(self.redis, s.lease_ttl_s)
        self.shm_name = self._shm_name()
        self.engine = self._build_engine(self.opts, self.model_path, self.shm_name)
        self.loop = EngineLoop(self.engine, lease_alive=self.leases.alive,
                               on_failure=self._engine_failed)
        self.loop.start()
        self.queues = queues_for_role(self.opts.role, self.name, s.policy)
        self.app = create_app(s, extra_queues=(decode_queue(self.name),), with_tasks=True)
        set_app(self.app)
        self._install_service()
        self.heartbeat = HeartbeatThread(self.redis, self.build_heartbeat,
                                         interval_s=s.heartbeat_interval_s,
                                         ttl_s=s.heartbeat_ttl_s)
        self.heartbeat.start()
        es, _ = self.loop.stats()
        log.info("worker %s (%s on %s) ready; queues %s; %d seats, %d KV blocks, %d threads",
                 self.name, self.opts.role, self.opts.device, ",".join(self.queues),
                 self.opts.seats, es.num_blocks_total, self.opts.pool_size)
        return self

    def _engine_failed(self, exc: BaseException) -> None:
        # A worker without a working engine must stop taking tickets: warm-shut down so that
        # its heartbeat disappears and a supervisor can restart it.
        log.critical("engine failed (%s); shutting the worker down", exc)
        os.kill(os.getpid(), signal.SIGTERM)

    def _install_service(self) -> None:
        from slaq.gpu_workers import service
        from slaq.gpu_workers.router import DecodeRouter
        from slaq.platform.tiers import TierTable
        from slaq.tasks.tickets import send_decode_ticket, send_prefill_ticket

        s = self.settings
        tiers = TierTable.from_file(s.tiers_file)
        transport, pullers = self._transports()
        self.service = service.WorkerService(
            name=self.name, role=self.opts.role, loop=self.loop,
            ledger=service.SqlLedger(s.database_url, tiers, fifo=s.fifo),
            redis_client=self.redis, leases=self.leases, transport=transport, pullers=pullers,
            router=DecodeRouter(self.redis, max_age_s=s.heartbeat_ttl_s),
            send_prefill=lambda rid, attempt, tier: send_prefill_ticket(
                rid, attempt, tier, app=self.app, tiers=tiers, policy=s.policy),
            send_decode=lambda rid, attempt, worker, priority=None: send_decode_ticket(
                rid, attempt, worker, app=self.app, priority=priority))
        service.set_current(self.service)

    def _transports(self) -> tuple[Any, dict[str, Any]]:
        """The owner-side transport (what leases name) and the pullers, by transport name."""
        from slaq.gpu_workers.kv_transfer.local import LocalTransport
        from slaq.gpu_workers.kv_transfer.shm import ShmTransport

        opts, pool = self.opts, getattr(self.engine.runner, "kv_cache", None)
        pullers: dict[str, Any] = {"shm": ShmTransport(), "local": LocalTransport(self.name)}
        if opts.engine_kind == "sim":
            sim = SimTransport(*sim_profile_from_env())
            pullers["sim"] = sim
            if opts.role == "prefill":
                return sim, pullers
        cuda = opts.device.startswith("cuda")
        if cuda:
            from slaq.gpu_workers.kv_transfer.cuda_ipc import CudaIpcTransport

            pullers["cuda_ipc"] = CudaIpcTransport(self.name, device=opts.device)
        if opts.transport == "nixl":
            from slaq.gpu_workers.kv_transfer.nixl import NixlTransport

            pullers["nixl"] = NixlTransport(self.name, device=opts.device)
        if opts.role != "prefill":
            return LocalTransport(self.name, self._read_blocks), pullers
        if opts.transport == "nixl":
            return NixlTransport(self.name, pool=pool, device=opts.device), pullers
        if self.shm_name is not None:
            return ShmTransport(self.shm_name, self.engine.kv_shape, self.engine.kv_dtype), pullers
        if cuda and pool is not None:
            return CudaIpcTransport(self.name, pool=pool), pullers
        return LocalTransport(self.name, self._read_blocks), pullers

    def _read_blocks(self, block_ids: list[int]) -> Any:
        return self.loop.call(lambda e: e.read_blocks(block_ids))

    def build_heartbeat(self) -> Any:
        from slaq.gpu_workers.heartbeat import cache_fields
        from slaq.platform.pressure import Heartbeat

        es, ls = self.loop.stats()
        return Heartbeat(
            worker=self.name, role=self.opts.role, device=self.opts.device,
            model=Path(self.model_path).name,
            num_blocks_total=es.num_blocks_total, num_blocks_used=es.num_blocks_used,
            num_blocks_reserved=ls.num_reserved_blocks,
            num_blocks_leased=ls.num_leased_blocks,
            num_running=es.num_running, num_waiting=es.num_waiting,
            num_preemptions=es.num_preemptions,
            prefill_tokens_per_s=es.prefill_tokens_per_s,
            decode_tokens_per_s=es.decode_tokens_per_s,
            last_batch_size=max(ls.last_batch_size, getattr(es, "last_batch_size", 0)),
            max_batch_size=max(ls.max_batch_size, getattr(es, "max_batch_size", 0)),
            ttft_ms=ls.ttft_ms, tpot_ms=ls.tpot_ms, num_finished=ls.num_finished,
            queues=list(self.queues), pid=os.getpid(), host=socket.gethostname(),
            time=time.time(), **cache_fields(self.opts.role, es))

    def consume(self) -> int:
        """Run the Celery worker in this thread until shutdown; returns its exit code."""
        worker = self.app.Worker(
            hostname=f"{self.name}@{socket.gethostname()}", pool_cls="threads",
            concurrency=self.opts.pool_size, queues=self.queues,
            loglevel=self.opts.loglevel, without_gossip=True, without_mingle=True,
            optimization="fair")
        worker.start()
        return int(worker.exitcode or 0)

    def __exit__(self, *exc: object) -> None:
        from slaq.gpu_workers import service

        service.set_current(None)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.loop is not None:
            self.loop.stop()
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slaq.gpu_workers.worker ...``: the ``slaq worker`` command itself (same
    options, same validation), kept for scripts that start workers this way."""
    from slaq.cli import worker

    worker.main(args=list(argv) if argv is not None else None,
                prog_name="python -m slaq.gpu_workers.worker")
    return 0  # not reached: click exits with the worker's code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
