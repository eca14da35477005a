"""``slaq up``: services, migrations, model, dev tenant, then API + workers as child processes.

Children run in their own sessions so that Ctrl-C reaches only this process, which then stops
them in order (API first so no new work arrives, workers next, services last).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from rich.console import Console

from slaq.child_process import Proc
from slaq.platform.settings import Settings

READY_TIMEOUT_S = 600.0
FIRST_CYCLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LaunchPlan:
    host: str = "127.0.0.1"
    port: int = 8000
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    aggregated: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_prefill_workers < 1 or self.num_decode_workers < 1:
            raise ValueError("need at least one prefill and one decode worker")


class Launcher:
    """Runs the whole stack in the foreground until interrupted."""

    def __init__(self, settings: Settings, plan: LaunchPlan) -> None:
        self.settings = settings
        self.plan = plan
        self.console = Console()
        self.children: list[Proc] = []
        self._stopping = False

    # -- set-up -------------------------------------------------------------------------
    def _prepare(self):
        from slaq.gpu_workers.model_store import pull
        from slaq.platform.db import migrate, session_factory
        from slaq.platform.services import ensure_services
        from slaq.platform.tenants import dev_api_key

        self.console.print(f"[bold]slaq[/] data dir: {self.settings.data_dir}")
        services = ensure_services(self.settings)
        self.console.print(f"PostgreSQL: {services.database_url_display}")
        self.console.print(f"Redis:      {services.redis_url}")
        migrate(services.database_url)
        model_path = pull(self.settings.model, self.settings.models_dir, progress=True)
        with session_factory(services.database_url)() as session:
            key = dev_api_key(session, self.settings.data_dir)
        return services, model_path, key

    def _child_env(self, services, model_path: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SLAQ_DATABASE_URL=services.database_url,
            SLAQ_REDIS_URL=services.redis_url,
            SLAQ_BROKER_URL=services.broker_url,
            SLAQ_MODEL=str(model_path),
            SLAQ_DATA_DIR=str(self.settings.data_dir),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _plan_children(self) -> list[Proc]:
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        slaq = [sys.executable, "-m", "slaq.cli"]
        p = self.plan
        children = [Proc("api", [*slaq, "api", "--host", p.host, "--port", str(p.port)],
                         logs / "api.log")]
        if p.aggregated:
            roles = [("both", i) for i in range(p.num_prefill_workers)]
        else:
            roles = [("prefill", i) for i in range(p.num_prefill_workers)]
            roles += [("decode", i) for i in range(p.num_decode_workers)]
        for role, i in roles:
            name = f"{role}-{i}"
            children.append(Proc(name, [*slaq, "worker", "--role", role, "--device", p.device,
                                        "--name", name], logs / f"{name}.log"))
        # Beat is the last to start: a reprioritiser cycle that runs before any worker's
        # heartbeat sees no prefill capacity and would hold back the first requests.
        children.append(Proc("beat", [*slaq, "beat"], logs / "beat.log"))
        return children

    def _spawn(self, env: dict[str, str], names: set[str]) -> None:
        for child in self.children:
            if child.name not in names:
                continue
            child.start(env)
            assert child.popen is not None
            self.console.print(f"started {child.name:<10} pid {child.popen.pid}  log {child.log_path}")

    # -- readiness ----------------------------------------------------------------------
    def _dead_child(self) -> Proc | None:
        return next((c for c in self.children if c.popen is not None and not c.alive()), None)

    def _wait_ready(self, services) -> bool:
        from slaq.platform.keys import heartbeat_key

        url = f"http://{self.plan.host}:{self.plan.port}/healthz"
        r = redis.Redis.from_url(services.redis_url)
        workers = [c.name for c in self.children if c.name not in ("api", "beat")]
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self.console.status("waiting for the API and the workers' first heartbeats…"):
            while time.monotonic() < deadline and not self._stopping:
                dead = self._dead_child()
                if dead is not None:
                    self._report_death(dead)
                    return False
                try:
                    api_ok = httpx.get(url, timeout=2.0).status_code == 200
                except httpx.HTTPError:
                    api_ok = False
                if api_ok and all(r.exists(heartbeat_key(w)) for w in workers):
                    return True
                time.sleep(0.5)
        return False

    def _wait_first_cycle(self, services, since: float) -> bool:
        """Wait for beat's first reprioritiser cycle after ``since`` (its state is saved)."""
        from slaq.tasks.reprioritise import load_state

        r = redis.Redis.from_url(services.redis_url)
        deadline = time.monotonic() + FIRST_CYCLE_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping:
            dead = self._dead_child()
            if dead is not None:
                self._report_death(dead)
                return False
            state = load_state(r)
            if state is not None and (state.policy.time or 0.0) >= since:
                return True
            time.sleep(0.2)
        return False

    def _report_death(self, child: Proc) -> None:
        assert child.popen is not None
        self.console.print(f"[red]{child.name} exited with {child.popen.returncode}[/]; "
                           f"last lines of {child.log_path}:")
        self.console.print(child.tail(30), markup=False, highlight=False)

    # -- run / stop ---------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        services, model_path, key = self._prepare()
        self.children = self._plan_children()
        try:
            env = self._child_env(services, model_path)
            self._spawn(env, {c.name for c in self.children if c.name != "beat"})
            if not self._wait_ready(services):
                return 0 if self._stopping else 1
            beat_started = time.time()
            self._spawn(env, {"beat"})
            if not self._wait_first_cycle(services, beat_started):
                return 0 if self._stopping else 1
            self._print_ready(key)
            while not self._stopping:
                dead = self._dead_child()
                if dead is not None:
                    self._report_death(dead)
                    return 1
                time.sleep(0.5)
            return 0
        finally:
            self._stop_children()
            services.stop()
            self.console.print("stopped.")

    def _print_ready(self, key: str) -> None:
        base = f"http://{self.plan.host}:{self.plan.port}"
        self.console.print(f"\n[bold green]slaq is up[/] at {base}/v1")
        self.console.print(f"dev API key: [bold]{key}[/]")
        body = ('{"model": "' + Path(self.settings.model).name + '", "service_tier": "priority", '
                '"messages": [{"role": "user", "content": "What is the capital of France?"}]}')
        self.console.print(
            f"curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{body}'", markup=False, highlight=False)
        self.console.print("Ctrl-C stops everything.\n")

    def _stop_children(self) -> None:
        for child in self.children:  # API first, then workers, then beat
            child.stop(timeout_s=15)
