"""A local single-node cluster: `chroma-serve up` / `down`.

`up` starts what the app needs and deploys it the way production does, through a Serve config file:
  1. a Ray head (`ray start --head`, with its dashboard: `serve deploy` talks to it);
  2. redis-server with its append-only file in the cluster's data dir, unless a Redis URL is given;
  3. an API key file (one generated key for tenant "local") unless one is given;
  4. the Serve config of a profile (cluster/local/profiles/*.yaml) with the checkpoint, Redis URL and key file filled
     in, written to the data dir and deployed with `serve deploy`; then it waits for /readyz.
`down` stops Ray (and with it every replica) and the redis-server that `up` started. Everything `up` writes
lives in `LocalClusterSettings.home`, so a second `up` after `down` finds its voices and sessions again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.state.redis_server import redis_server_argv, wait_for_redis
from model.testing.tiny import CHROMA_SERVE_HOME

if TYPE_CHECKING:  # what the replicas send back; the engines' modules import torch
    from model.engines.codec import CodecStats
    from model.engines.speech import SpeechStats
    from model.reasoner.base import ReasonerStats

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
APP_NAME = "chroma"


class LocalClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHROMA_LOCAL_")

    home: Path = CHROMA_SERVE_HOME / "local"  # data dir: Redis AOF, API keys, rendered Serve config, logs
    host: str = "127.0.0.1"
    port: int = 8000  # Serve HTTP
    redis_port: int = 6380  # 6379 is the Ray head's own GCS port
    ray_port: int = 6390
    dashboard_port: int = 8265
    num_cpus: int | None = None  # None: all of the machine's
    ready_timeout_s: float = 900.0  # vLLM on CPU alone takes about a minute to start


def settings_env(settings: LocalClusterSettings) -> dict[str, str]:
    """The environment that makes another process's LocalClusterSettings() these."""
    return {f"CHROMA_LOCAL_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}


class ClusterInfo(BaseModel):
    url: str
    api_keys_path: str
    api_key: str | None  # the generated key; None when the caller brought their own key file
    redis_url: str
    checkpoint: str
    serve_config: str


def _tool(name: str) -> str:
    """Ray's CLIs from this interpreter's environment, so the cluster runs the same Python as the caller."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` not found: install ray[serve] into this environment")
    return found


def _run(args: list[str], what: str, timeout_s: float = 300.0, env: dict | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
    return done.stdout


def merge_args(base: dict, overrides: dict) -> dict:
    """`overrides` laid over `base`, nested dicts merged key by key (an AppConfig is a tree)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_args(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted(key: str, value) -> dict:
    """'speech.max_slots', 4 -> {"speech": {"max_slots": 4}} (the form of `up --set`)."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def render_serve_config(
    profile: str | Path, settings: LocalClusterSettings, args: dict, deployments: dict[str, dict] | None = None,
) -> dict:
    """The profile's Serve config with the HTTP address filled in, `args` merged into its application args and
    `deployments` ({name: options}) into its deployments' options."""
    path = Path(profile)
    if not path.is_file():
        path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(PROFILES_DIR.glob("*.yaml")))
        raise ValueError(f"unknown profile {profile!r}: give a Serve config file or one of {known}")
    config = yaml.safe_load(path.read_text())
    config.setdefault("http_options", {}).update(host=settings.host, port=settings.port)
    (app,) = [a for a in config["applications"] if a["name"] == APP_NAME]
    app["args"] = merge_args(app.get("args") or {}, args)
    by_name = {d["name"]: d for d in app.get("deployments") or []}
    for name, options in (deployments or {}).items():
        by_name[name] = merge_args(by_name.get(name, {"name": name}), options)
    app["deployments"] = list(by_name.values())
    return config


def gpu_needs(config: dict) -> list[str]:
    """What in a Serve config asks for a GPU: a CUDA checkpoint device or deployments with num_gpus."""
    needs = []
    for app in config.get("applications", []):
        device = str(((app.get("args") or {}).get("checkpoint") or {}).get("device") or "cpu")
        if device.startswith("cuda"):
            needs.append(f"checkpoint.device {device}")
        needs += [f"{d['name']} num_gpus {gpus}" for d in app.get("deployments", [])
                  if (gpus := (d.get("ray_actor_options") or {}).get("num_gpus"))]
    return needs


def require_devices(config: dict, profile: str | Path) -> None:
    """Refuse a Serve config that needs a GPU on a machine where this torch sees none (it would deploy and then
    wait forever for GPUs Ray does not have)."""
    needs = gpu_needs(config)
    if not needs:
        return
    import torch

    if torch.cuda.is_available():
        return
    why = f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
    raise ValueError(
        f"profile {str(profile)!r} needs a GPU ({', '.join(needs)}), but {why} on this machine: use --profile "
        "cpu-dev here, or set a GPU host up with `make setup DEVICE=cuda`")


# --- Redis ------------------------------------------------------------------------------------------------------

def _redis_pidfile(settings: LocalClusterSettings) -> Path:
    return settings.home / "redis" / "redis.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_redis(settings: LocalClusterSettings) -> str:
    """A daemonised redis-server (append-only file, fsynced before every acknowledged write) that outlives this
    process."""
    data_dir = settings.home / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"redis://127.0.0.1:{settings.redis_port}/0"
    pidfile = _redis_pidfile(settings)
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        return url
    argv = redis_server_argv(data_dir, settings.redis_port) + ["--daemonize", "yes", "--pidfile", str(pidfile)]
    _run(argv, "redis-server")
    # The daemon's exit is not ours to see: a redis-server that fails after forking shows as a timeout.
    wait_for_redis(settings.redis_port, data_dir, lambda: _pid_in(pidfile), lambda: None, timeout_s=10)
    return url


def _pid_in(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or half-written
        return None


def stop_redis(settings: LocalClusterSettings) -> bool:
    pidfile = _redis_pidfile(settings)
    if not pidfile.exists():
        return False
    pid = int(pidfile.read_text())
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)  # redis-server flushes and fsyncs the AOF before it exits
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True


# --- API keys ---------------------------------------------------------------------------------------------------

def api_keys_file(settings: LocalClusterSettings) -> Path:
    return settings.home / "api-keys.json"


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """The file's text, written once from `make()` with owner-only permissions."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(make())
    return path.read_text()


def client_api_key(settings: LocalClusterSettings | None = None) -> str:
    """The key a client tool uses when it is given none: $CHROMA_API_KEY, else the local cluster's."""
    return os.environ.get("CHROMA_API_KEY") or local_api_key(settings or LocalClusterSettings())


def local_api_key(settings: LocalClusterSettings) -> str:
    """The key of tenant "local", generated on the first `up`."""
    keys = json.loads(_secret_file(api_keys_file(settings), lambda: json.dumps({f"cs-local-{secrets.token_hex(16)}": "local"})))
    return next(key for key, tenant in keys.items() if tenant == "local")


# --- Ray and Serve ----------------------------------------------------------------------------------------------

def _dashboard(settings: LocalClusterSettings) -> str:
    return f"http://127.0.0.1:{settings.dashboard_port}"


def _ray_token_file(settings: LocalClusterSettings) -> Path:
    return settings.home / "ray-auth-token"


def _ray_token(settings: LocalClusterSettings) -> str:
    """The cluster's own Ray auth token (Ray's dashboard and Serve REST API demand one), kept in the data dir."""
    return _secret_file(_ray_token_file(settings), lambda: secrets.token_hex(32)).strip()


def _ray_env(settings: LocalClusterSettings) -> dict:
    _ray_token(settings)
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(_ray_token_file(settings))}


def _dashboard_get(settings: LocalClusterSettings, path: str, timeout_s: float) -> httpx.Response:
    headers = {"Authorization": f"Bearer {_ray_token(settings)}"}
    return httpx.get(f"{_dashboard(settings)}{path}", headers=headers, timeout=timeout_s)


def ray_running(settings: LocalClusterSettings) -> bool:
    try:
        return _dashboard_get(settings, "/api/version", 2).status_code == 200
    except httpx.HTTPError:
        return False


def ray_temp_dir(settings: LocalClusterSettings) -> Path:
    """This cluster's own Ray temp dir: the processes the cluster starts name it on their command lines, which is how
    `down` finds them and their children (`ray stop` would stop every Ray cluster of the machine). Short, since Ray
    puts unix sockets under it."""
    return Path(tempfile.gettempdir()) / f"chroma-ray-{hashlib.sha1(str(settings.home.resolve()).encode()).hexdigest()[:10]}"


def start_ray(settings: LocalClusterSettings) -> None:
    if ray_running(settings):
        return
    args = [
        _tool("ray"), "start", "--head", "--port", str(settings.ray_port), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(settings.dashboard_port), "--disable-usage-stats", "--temp-dir", str(ray_temp_dir(settings)),
    ]
    if settings.num_cpus is not None:
        args += ["--num-cpus", str(settings.num_cpus)]
    _run(args, "ray start", env=_ray_env(settings))
    deadline = time.monotonic() + 120
    while not ray_running(settings):  # `serve deploy` needs the dashboard, which comes up after `ray start` returns
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray dashboard at {_dashboard(settings)} did not come up within 120 s")
        time.sleep(0.5)


def application_status(settings: LocalClusterSettings) -> tuple[str, str]:
    """(status, message) of the app as Serve reports it, e.g. ("DEPLOYING", "")."""
    reply = _dashboard_get(settings, "/api/serve/applications/", 10)
    reply.raise_for_status()
    app = reply.json().get("applications", {}).get(APP_NAME)
    if app is None:
        return "NOT_STARTED", ""
    messages = [app.get("message", "")] + [
        f"{name}: {d.get('message', '')}" for name, d in app.get("deployments", {}).items()
        if d.get("status") not in ("HEALTHY", "UPSCALING", "DOWNSCALING") and d.get("message")
    ]
    return app["status"], "\n".join(m for m in messages if m)


@contextlib.contextmanager
def ray_driver(settings: LocalClusterSettings):
    """This process joined to the cluster as a Ray driver (once per process: Ray reads its auth settings once, when
    it is first imported, so nothing may import it before)."""
    os.environ.update(_ray_env(settings))  # before Ray reads its auth settings, i.e. before ray.init
    import ray

    ray.init(address=f"127.0.0.1:{settings.ray_port}", log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def engine_stats(settings: LocalClusterSettings) -> dict[str, ReasonerStats | SpeechStats | CodecStats]:
    """Live work per engine, as one replica of each deployment reports it (joins the cluster as a driver)."""
    with ray_driver(settings):
        return connected_engine_stats()


def connected_engine_stats() -> dict[str, ReasonerStats | SpeechStats | CodecStats]:
    """`engine_stats` from a process that is a driver of the cluster already (`ray_driver`)."""
    from ray import serve  # after ray_driver: importing Ray reads its auth settings

    return {
        name: serve.get_deployment_handle(name, app_name=APP_NAME).stats.remote().result(timeout_s=30)
        for name in ("Reasoner", "SpeechStack", "Codec")
    }


def wait_until_ready(settings: LocalClusterSettings, progress=print) -> None:
    url = f"http://{settings.host}:{settings.port}/readyz"
    deadline = time.monotonic() + settings.ready_timeout_s
    last = None
    while time.monotonic() < deadline:
        status, message = application_status(settings)
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Serve application failed to deploy:\n{message}")
        if status != last:
            progress(f"serve: {status.lower()}")
            last = status
        if status == "RUNNING":
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(1.0)
    raise TimeoutError(f"the app was not ready within {settings.ready_timeout_s:.0f} s (last status {last})")


def up(
    checkpoint: str | Path, *, profile: str = "cpu-dev", redis_url: str | None = None,
    api_keys_path: str | None = None, app_args: dict | None = None, deployments: dict[str, dict] | None = None,
    settings: LocalClusterSettings | None = None, progress=print,
) -> ClusterInfo:
    """`app_args` are merged into the profile's application args (e.g. {"turns": {"max_frames": 40}}), `deployments`
    into its deployments' Serve options (e.g. {"Codec": {"autoscaling_config": {"upscale_delay_s": 2}}})."""
    settings = settings or LocalClusterSettings()
    require_devices(render_serve_config(profile, settings, app_args or {}, deployments), profile)  # before anything starts
    settings.home.mkdir(parents=True, exist_ok=True)
    if redis_url is None:
        redis_url = start_redis(settings)
        progress(f"redis: {redis_url} (append-only file in {settings.home / 'redis'})")
    api_key = None
    if api_keys_path is None:
        api_key = local_api_key(settings)
        api_keys_path = str(api_keys_file(settings))
    filled = {
        "checkpoint": {"path": str(Path(checkpoint).resolve())}, "state": {"redis_url": redis_url},
        "tenants": {"api_keys": api_keys_path},
    }
    config = render_serve_config(profile, settings, merge_args(filled, app_args or {}), deployments)
    config_path = settings.home / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    start_ray(settings)
    progress(f"ray: head at 127.0.0.1:{settings.ray_port}, dashboard {_dashboard(settings)}")
    _run([_tool("serve"), "deploy", str(config_path), "--address", _dashboard(settings)], "serve deploy", env=_ray_env(settings))
    progress(f"serve: deploying {config_path}")
    wait_until_ready(settings, progress)
    return ClusterInfo(
        url=f"http://{settings.host}:{settings.port}", api_keys_path=api_keys_path, api_key=api_key,
        redis_url=redis_url, checkpoint=str(checkpoint), serve_config=str(config_path),
    )


def cluster_processes(settings: LocalClusterSettings) -> list:
    """This cluster's Ray processes (psutil): those whose command line names its temp dir or whose output goes to a
    log there, and all their descendants. The raylet's agents retitle themselves (`ray::DashboardAgent`,
    `ray::RuntimeEnvAgent`), so only their parentage says whose they are; the Ray client server names no temp dir
    and is an orphan once `ray start` exits, but logs there. A driver of the cluster (`ray_driver`) writes its own
    output elsewhere, so it is none of them."""
    import psutil

    marker = str(ray_temp_dir(settings))
    logs = os.path.realpath(marker) + os.sep  # open files show resolved paths
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and (any(marker in arg for arg in proc.info["cmdline"] or ())
                                            or any(f.fd in (1, 2) and f.path.startswith(logs) for f in proc.open_files())):
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
    return list(found.values())


def stop_ray(settings: LocalClusterSettings, timeout_s: float = 30.0, stragglers_s: float = 3.0) -> int:
    """Stop this cluster's Ray processes; returns how many there were. SIGTERM to all; once the ones that exit on it
    have (at most `timeout_s`), whatever is left after `stragglers_s` more is killed by pid: the agents ignore
    SIGTERM, and outlive their raylet as orphans otherwise."""
    import psutil

    processes = cluster_processes(settings)
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    agents = [p for p in processes if _is_agent(p)]
    _, alive = psutil.wait_procs([p for p in processes if p not in agents], timeout=timeout_s)
    _, stragglers = psutil.wait_procs(agents, timeout=stragglers_s)
    for proc in alive + stragglers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive + stragglers, timeout=5)
    return len(processes)


def _is_agent(proc) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return proc.name().startswith("ray::") and proc.name().endswith("Agent")
    return False


def down(settings: LocalClusterSettings | None = None, progress=print) -> None:
    settings = settings or LocalClusterSettings()
    progress(f"ray: stopped ({stop_ray(settings)} processes)")
    if stop_redis(settings):
        progress("redis: stopped (its append-only file stays in the data dir)")
