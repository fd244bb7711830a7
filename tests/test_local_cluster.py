"""The local cluster's Serve config profiles (cluster/local/profiles) and their rendering by `chroma-serve up`; the
cluster itself is exercised in test_cluster.py."""

import contextlib
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from cluster.local.supervisor import (
    PROFILES_DIR, LocalClusterSettings, gpu_needs, ray_temp_dir, render_serve_config, stop_ray, up,
)
from cluster.settings import AppConfig

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
DEPLOYMENTS = {"Reasoner", "SpeechStack", "Codec", "Ingress"}


def test_both_profiles_exist():
    assert {"cpu-dev", "gpu"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_a_rendered_profile_is_a_valid_serve_config(profile, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    settings = LocalClusterSettings(home=tmp_path, port=8123)
    config = render_serve_config(profile, settings, {
        "checkpoint": {"path": "/models/chroma"}, "state": {"redis_url": "redis://r:6379/0"},
        "tenants": {"api_keys": "/keys.json"}, "turns": {"max_frames": 50},
    })
    schema = ServeDeploySchema.model_validate(config)  # Ray's own validation, as `serve deploy` does it
    (app,) = schema.applications
    assert schema.http_options.port == 8123 and app.import_path == "deployments.app:build_app"
    args = AppConfig.model_validate(app.args)  # every arg is one build_app takes
    assert (args.checkpoint.path, args.state.redis_url, args.tenants.api_keys, args.turns.max_frames) == ("/models/chroma", "redis://r:6379/0", "/keys.json", 50)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == DEPLOYMENTS
    assert deployments["Reasoner"].num_replicas == 1  # one vLLM engine per replica, never autoscaled
    for name in ("SpeechStack", "Codec", "Ingress"):
        scaling = deployments[name].autoscaling_config
        assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"], name
    for d in deployments.values():
        assert d.ray_actor_options.num_cpus is not None, d.name  # Ray's default of 1 CPU each does not fit a small node


@pytest.mark.parametrize("profile", PROFILES)
def test_a_profile_routes_no_replica_more_turns_than_its_engine_holds(profile):
    """Admission control counts the engines' places; Serve must route within them, and scale out before they
    are all taken."""
    (app,) = yaml.safe_load((PROFILES_DIR / f"{profile}.yaml").read_text())["applications"]
    config = AppConfig.model_validate({**app["args"], "checkpoint": {**app["args"]["checkpoint"], "path": "/x"}})
    deployments = {d["name"]: d for d in app["deployments"]}
    places = {"SpeechStack": config.speech.max_slots + config.speech.max_queue, "Codec": config.codec.max_streams,
              "Reasoner": config.reasoner.vllm.max_num_seqs}
    for name, held in places.items():
        assert held <= deployments[name]["max_ongoing_requests"] <= held + 8, name  # a few more for probes
        scaling = deployments[name].get("autoscaling_config")
        if scaling:
            assert scaling["target_ongoing_requests"] < held, name
    for d in deployments.values():
        assert d["health_check_period_s"] <= 5, d["name"]  # a dead replica is noticed and replaced soon


def test_profiles_differ_where_they_must():
    cpu = yaml.safe_load((PROFILES_DIR / "cpu-dev.yaml").read_text())["applications"][0]
    gpu = yaml.safe_load((PROFILES_DIR / "gpu.yaml").read_text())["applications"][0]
    assert cpu["args"]["checkpoint"]["device"] == "cpu" and gpu["args"]["checkpoint"]["device"] == "cuda"
    assert all("num_gpus" not in d["ray_actor_options"] for d in cpu["deployments"])
    shares = {d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in gpu["deployments"]}
    assert shares["Reasoner"] + shares["SpeechStack"] + shares["Codec"] <= 1  # one replica of each fits on a GPU
    assert shares["Ingress"] == 0


def test_an_unknown_profile_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'tpu'.*cpu-dev"):
        render_serve_config("tpu", LocalClusterSettings(home=tmp_path), {"checkpoint": {"path": "/x"}})


def test_gpu_needs_name_what_asks_for_a_gpu(tmp_path):
    settings = LocalClusterSettings(home=tmp_path)
    assert gpu_needs(render_serve_config("cpu-dev", settings, {})) == []
    assert gpu_needs(render_serve_config("gpu", settings, {})) == [
        "checkpoint.device cuda", "Reasoner num_gpus 0.5", "SpeechStack num_gpus 0.25", "Codec num_gpus 0.25"]
    assert gpu_needs(render_serve_config("cpu-dev", settings, {"checkpoint": {"device": "cuda:1"}})) == [
        "checkpoint.device cuda:1"]


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@needs_no_cuda
def test_up_refuses_a_gpu_profile_without_cuda_before_starting_anything(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(ValueError, match=r"profile 'gpu' needs a GPU \(checkpoint.device cuda, Reasoner num_gpus 0.5.*"
                                         r"is a CPU build.*--profile cpu-dev.*make setup DEVICE=cuda"):
        up(tmp_path / "ckpt", profile="gpu", settings=LocalClusterSettings(home=home))
    assert not home.exists()  # no Redis, no Ray, no key file


@needs_no_cuda
def test_the_cli_refuses_a_gpu_profile_without_cuda_clearly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--profile", "gpu", "--checkpoint",
                           str(tmp_path / "ckpt"), "--home", str(tmp_path / "home")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "chroma-serve: error: profile 'gpu' needs a GPU" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()


def test_demo_against_no_cluster_is_a_clear_error(tmp_path):
    from tests.conftest import free_port

    done = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--url", f"http://127.0.0.1:{free_port()}",
                           "--api-key", "k", "--out", str(tmp_path / "r.wav")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "chroma-serve: error: the cluster did not answer (ConnectError" in done.stderr and "Traceback" not in done.stderr


# A raylet's agent: retitled, deaf to SIGTERM, named nowhere but in its parentage.
AGENT = """
import ctypes, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ctypes.CDLL(None).prctl(15, b"ray::TestAgent")  # PR_SET_NAME, as setproctitle retitles Ray's agents
time.sleep(600)
"""
# A raylet: its command line names the temp dir; it exits on SIGTERM and leaves its agent behind.
RAYLET = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {AGENT!r}]); time.sleep(600)"
SLEEP = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN) if 'deaf' in sys.argv else None; time.sleep(600)"


def test_stop_ray_leaves_none_of_its_clusters_processes_and_only_those(tmp_path):
    """What `down` finds and stops, without Ray: the processes that name the cluster's temp dir and their
    descendants (a retitled agent that ignores SIGTERM included), and one that names nothing but logs there (the
    Ray client server, an orphan); not another cluster's processes, nor a driver that has a file open there."""
    settings = LocalClusterSettings(home=tmp_path / "home")
    temp_dir = ray_temp_dir(settings)
    logs = temp_dir / "session_1" / "logs"
    logs.mkdir(parents=True)
    started = []

    def start(*argv, **streams):
        started.append(subprocess.Popen([sys.executable, "-c", *argv], **streams))
        return psutil.Process(started[-1].pid)

    try:
        with open(logs / "ray_client_server.out", "w") as log, open(logs / "python-core-driver.log", "w") as driver_log:
            raylet = start(RAYLET, f"--temp_dir={temp_dir}")
            client_server = start(SLEEP, "deaf", stdout=log, stderr=log)
            other_cluster = start(SLEEP, f"--temp_dir={ray_temp_dir(LocalClusterSettings(home=tmp_path / 'other'))}")
            driver = start(SLEEP, pass_fds=[driver_log.fileno()])
        deadline = time.monotonic() + 30
        while not [c for c in raylet.children() if c.name() == "ray::TestAgent"]:
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        (agent,) = raylet.children()

        assert stop_ray(settings, timeout_s=2, stragglers_s=0.5) == 3
        for proc in started:
            proc.poll()  # reaps the ones that are gone
        assert [p for p in (raylet, agent, client_server) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert other_cluster.is_running() and driver.is_running()
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
        with contextlib.suppress(psutil.Error):
            psutil.Process(agent.pid).kill()
        shutil.rmtree(temp_dir)
