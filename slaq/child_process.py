"""A child process of the launcher or the benchmark stack: its command, its log, start/stop.

Each child runs in its own session (a Ctrl-C at the terminal reaches the parent alone, which
stops the children in order) and writes stdout and stderr to its log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _renice(increment: int):
    def apply() -> None:
        with contextlib.suppress(PermissionError):  # not privileged: default priority
            os.nice(increment)

    return apply


@dataclass(slots=True)
class Proc:
    """One child: ``start`` it with an environment, ``stop`` it (SIGTERM, then SIGKILL after
    a timeout), read the ``tail`` of its log. ``nice`` > 0 lowers its CPU priority."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    nice: int = 0

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_renice(self.nice) if self.nice else None)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: Celery's warm shutdown, gunicorn's graceful one)."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout_s: float = 15.0) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        self.terminate()
        self.wait_or_kill(timeout_s)

    def tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""
