"""Run a multi-process launch (torchrun / accelerate launch) for the tests on a free local port.

A port found free can be taken again before the launcher binds it, so a failed launch is retried
once on a new port; the first failure's stderr is kept as a warning. A failure that repeats fails.
"""

from __future__ import annotations

import socket
import subprocess
import warnings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(make_cmd, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``make_cmd(port)``; returns the completed process, raising if both tries fail."""
    for attempt in range(2):
        done = subprocess.run(make_cmd(free_port()), env=env, timeout=timeout, capture_output=True, text=True)
        if done.returncode == 0:
            return done
        if attempt == 0:
            warnings.warn(f"launch failed once (exit {done.returncode}), retried on a new port:\n{done.stderr[-2000:]}",
                          stacklevel=2)
    raise AssertionError(f"launch failed twice (exit {done.returncode}):\n{done.stderr[-3000:]}")
