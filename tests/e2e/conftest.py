"""Fixtures that run the real stack: `slaq up` as a child process, talked to over HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(slots=True)
class Stack:
    base_url: str
    api_key: str
    env: dict[str, str]
    proc: subprocess.Popen
    log_path: Path
    data_dir: Path

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as a person would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


KEY_RE = re.compile(r"dev API key: (\S+)")


def start_stack(env_overrides: dict[str, str | None], data_dir: Path, args: list[str] = (),
                timeout: float = 600.0) -> Stack:
    env = dict(os.environ)
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["SLAQ_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    port = free_port()
    log_path = data_dir / "up.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "slaq.cli", "up", "--port", str(port), *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    key = None
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = KEY_RE.search(text)
        if m and "slaq is up" in text:
            key = m.group(1)
            break
        if proc.poll() is not None:
            raise RuntimeError(f"slaq up exited {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    if key is None:
        proc.kill()
        raise RuntimeError("slaq up not ready in time:\n" + log_path.read_text()[-4000:])
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(base + "/healthz", timeout=5).status_code == 200
    return Stack(base, key, env, proc, log_path, data_dir)


@pytest.fixture(scope="module")
def smollm2_stack(database_url, redis_url, smollm2_path, tmp_path_factory) -> Iterator[Stack]:
    """`slaq up` on the machine's PostgreSQL and Redis with the real SmolLM2 model."""
    data_dir = tmp_path_factory.mktemp("slaq-up")
    stack = start_stack({"SLAQ_DATABASE_URL": database_url, "SLAQ_REDIS_URL": redis_url,
                         "SLAQ_BROKER_URL": redis_url, "SLAQ_MODEL": str(smollm2_path)}, data_dir)
    yield stack
    code = stack.stop()
    assert code == 0, stack.log_path.read_text()[-3000:]
