"""A redis-server of our own: for `chroma-serve up` (daemonised) and the tests (a child process)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import redis


def redis_server_argv(data_dir: Path, port: int, appendfsync: Literal["always", "everysec"] = "always") -> list[str]:
    """redis-server on 127.0.0.1:`port` with its append-only file and log in `data_dir` (no RDB snapshots).

    A data dir that already holds an AOF is loaded back. "always" acknowledges a write only once it is fsynced and
    loses none on a crash (what the state store requires, see cluster.state.store); "everysec" may lose the last
    second of writes on a crash (not on a clean stop)."""
    return [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "", "--logfile", str(data_dir / "redis.log"),
    ]


def wait_for_redis(
    port: int, data_dir: Path, pid: Callable[[], int | None], exit_code: Callable[[], int | None], timeout_s: float
) -> None:
    """Return once the redis-server whose process id `pid()` gives answers on `port`. RuntimeError with its log
    when `exit_code()` says it exited, TimeoutError when it does not answer within `timeout_s`."""
    def log() -> str:
        log_file = data_dir / "redis.log"
        return log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if (code := exit_code()) is not None:
                raise RuntimeError(f"redis-server exited with {code}:\n{log()}")
            try:
                # Ask for the pid: on a taken port PING would be answered by the other server.
                if (expected := pid()) is not None and client.info("server")["process_id"] == expected:
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {port} did not answer within {timeout_s} s:\n{log()}")
            time.sleep(0.05)
    finally:
        client.close()


def start_local_redis(
    data_dir: str | Path, port: int, appendfsync: Literal["always", "everysec"] = "always", timeout_s: float = 10.0
) -> subprocess.Popen:
    """Run redis-server as a child process (see `redis_server_argv`); return once it answers."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        redis_server_argv(data_dir, port, appendfsync) + ["--daemonize", "no"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_redis(port, data_dir, lambda: proc.pid, proc.poll, timeout_s)
    except TimeoutError:
        stop_local_redis(proc)
        raise
    return proc


def stop_local_redis(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM makes redis-server flush and fsync the AOF before it exits."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
