"""`cluster.local.faults.paused` on real processes: what it stops runs again, even when one pid is gone already
(a Codec replica the autoscaler stopped between reading the pids and the pause once left the other one stopped for
good, and every later live test found no Codec)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cluster.local.faults import paused


def _state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, wanted: str) -> str:
    for _ in range(100):
        if (state := _state(pid)) == wanted:
            return state
        time.sleep(0.02)
    return _state(pid)


def test_a_gone_pid_is_skipped_and_what_was_stopped_runs_again():
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        with paused([live.pid, gone.pid]):
            assert _wait_state(live.pid, "T") == "T"
        assert _wait_state(live.pid, "S") != "T"
    finally:
        live.kill()
        live.wait()
