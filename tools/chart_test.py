"""`make chart-test`: the Helm chart's cluster, run for real on a two-node Ray in podman containers, as KubeRay
would run it, and a node's death under live calls.

A build and test tool beside the image's (container.py, whose podman helpers it uses), not part of the service.
No Kubernetes API server runs here, so this plays its three parts with what the chart renders:
- **KubeRay** (v1.7.0, tools/kuberay.py): the RayCluster's pods with KubeRay's commands, environment, ports,
  probes and init container; the Serve config PUT to the head's dashboard and its status polled until RUNNING;
- **the kubelet**: each pod as a container of the project's image on a podman network of its own, with the pod's
  environment (Secrets, field references and `$(VAR)` expansion resolved as the kubelet resolves them), its
  volumes (Secrets as read-only files, the hostPath from this "node", emptyDirs, /dev/shm), its user, groups and
  capabilities, its CPU and memory limits; its probes are evaluated from this machine against the pod's IP, as
  the kubelet does; a killed container is started again, as `restartPolicy: Always` would;
- **cluster DNS**: the Services' names (the head Service, the chart's Redis) in every container's hosts file.

The chart's Redis (redis:7.4-alpine, not pullable here) runs its rendered command and arguments in the project's
image, which carries redis-server. What this cannot be (scheduling, Services and kube-proxy, NetworkPolicy
enforcement, the autoscaler sidecar, continuous liveness probing) is listed in helm/README.md.

It checks that the cluster comes up and serves (a spoken turn and a short /v1/realtime call through the head's
Serve port), that every replica runs on a node the chart's resources allow, then kills the worker container under
two live calls and measures what the callers see, how new turns are refused and how long the cluster takes to be
ready again once the container restarts. It prints every check and figure and ends on "N passed, N failed".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from tools import container, kuberay
from cluster.clients.realtime import RealtimeCaller
from cluster.clients.http import ApiError, ChromaClient
from tools.container import Checks, Engine
from tools.kuberay import RayCluster, all_running, build_cluster, hosts_for, quantity, quantity_value
from model.processing.audio import CODEC_RATE
from model.testing.speech import speak, speak_at, synthetic_speech

CHART = container.REPO / "helm" / "chroma-serve"
CPU_VALUES = CHART / "values-cpu-dev.yaml"
RELEASE, NAMESPACE = "chroma", "voice"
TIMEOUT_S = {"redis": 60, "head": 180, "gcs": 180, "running": 600, "worker": 300, "call": 180, "death": 30}
VOICE_TEXT = "This is the voice you will hear in every reply."
QUESTION = "Hello, can you tell me what the weather is like today?"


def _log(message: str) -> None:
    print(f"[chart] {message}", flush=True)


# --- the chart ----------------------------------------------------------------------------------------------------

def cpu_values(image: str) -> dict:
    """The CPU values, with the image this run built (as a user points image.repository at their registry)."""
    values = yaml.safe_load(CPU_VALUES.read_text())
    repository, _, tag = image.rpartition(":")
    values["image"] = {**values.get("image", {}), "repository": repository, "tag": tag, "pullPolicy": "Never"}
    return values


def render(values: dict) -> list[dict]:
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in manifests.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def secrets_of(objects: list[dict]) -> dict[str, dict[str, str]]:
    """Secret name -> key -> value, as the API server stores them (stringData folded into data)."""
    found = {}
    for obj in objects:
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            data.update(obj.get("stringData") or {})
            found[obj["metadata"]["name"]] = data
    return found


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


# --- the kubelet's part -------------------------------------------------------------------------------------------

def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined VAR is replaced, an undefined reference stays as written, and `$$`
    is a literal `$`."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2:end]
            out.append(env.get(name, text[i:end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _field_value(path: str, metadata: dict) -> str:
    for kind in ("labels", "annotations"):
        prefix = f"metadata.{kind}['"
        if path.startswith(prefix) and path.endswith("']"):
            return metadata.get(kind, {}).get(path[len(prefix):-2], "")
    values = {"metadata.name": metadata["name"], "metadata.namespace": metadata["namespace"]}
    if path not in values:
        raise kuberay.NotEmulated(f"fieldRef {path} is not emulated")
    return values[path]


def resolve_env(spec: dict, metadata: dict, stored: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as its process sees it: in order, each value expanded against those before it."""
    env: dict[str, str] = {}
    for item in spec.get("env", []):
        source = item.get("valueFrom")
        if source is None:
            value = expand(item.get("value", ""), env)
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = stored.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise KeyError(f"env {item['name']}: Secret {ref['name']} has no key {ref['key']}")
        elif "fieldRef" in source:
            value = _field_value(source["fieldRef"]["fieldPath"], metadata)
        else:
            raise kuberay.NotEmulated(f"env {item['name']}: {sorted(source)} is not emulated")
        env[item["name"]] = value
    return env


@dataclass
class Node:
    """The machine the pods run on: a podman network, a directory standing for the node's filesystem (hostPath
    volumes) and the names cluster DNS would resolve."""

    engine: Engine
    root: Path
    network: str
    hosts: dict[str, str] = field(default_factory=dict)  # name -> IP
    addresses: list[str] = field(default_factory=list)  # free pod IPs, in order

    def create_network(self) -> None:
        self.engine("network", "create", self.network, capture=True)
        found = self.engine("network", "inspect", self.network, "--format", "{{json .Subnets}}", capture=True)
        subnet = ipaddress.ip_network(json.loads(found.stdout)[0]["subnet"])
        self.addresses = [str(ip) for ip in list(subnet.hosts())[9:]]  # clear of the gateway

    def pod_ip(self) -> str:
        """An IP of the pod's own: a pod keeps it while its containers restart."""
        return self.addresses.pop(0)

    def add_service(self, name: str, namespace: str, ip: str) -> None:
        for alias in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
            self.hosts[alias] = ip

    def host_path(self, path: str) -> Path:
        return self.root / "node" / path.lstrip("/")


def _security(pod_spec: dict, spec: dict) -> list[str]:
    pod, own = pod_spec.get("securityContext") or {}, spec.get("securityContext") or {}
    user, group = own.get("runAsUser", pod.get("runAsUser")), own.get("runAsGroup", pod.get("runAsGroup"))
    args = []
    if user is not None:
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if pod.get("fsGroup") is not None:
        args += ["--group-add", str(pod["fsGroup"])]
    if own.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    caps = own.get("capabilities") or {}
    args += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])] + [f"--cap-add={c.lower()}" for c in caps.get("add", [])]
    if own.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    return args


def _resources(spec: dict, host_cpus: int) -> list[str]:
    """Limits as the container runtime enforces them (a CPU limit beyond this machine's cores is capped to them)."""
    limits = (spec.get("resources") or {}).get("limits") or {}
    args = []
    if "cpu" in limits:
        args.append(f"--cpus={min(float(quantity(limits['cpu'])), host_cpus):g}")
    if "memory" in limits:
        args.append(f"--memory={quantity_value(limits['memory'])}")
    return args


def _volumes(node: Node, pod: dict, spec: dict, stored: dict[str, dict[str, str]], workdir: Path) -> list[str]:
    """Each volume mount as podman mounts it; /dev/shm (a memory emptyDir) becomes the container's shm size."""
    by_name = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
    args = []
    for mount in spec.get("volumeMounts", []):
        volume = by_name.get(mount["name"]) or {"name": mount["name"], "persistentVolumeClaim": {}}  # a claim template
        read_only = ":ro" if mount.get("readOnly") else ""
        if "secret" in volume:
            folder = workdir / "secrets" / volume["secret"]["secretName"]
            folder.mkdir(parents=True, exist_ok=True)
            for key, value in stored.get(volume["secret"]["secretName"], {}).items():
                (folder / key).write_text(value)
                (folder / key).chmod(0o644)
            folder.chmod(0o755)
            args += ["-v", f"{folder}:{mount['mountPath']}:ro"]
        elif "hostPath" in volume:
            args += ["-v", f"{node.host_path(volume['hostPath']['path'])}:{mount['mountPath']}{read_only}"]
        elif volume.get("emptyDir", {}).get("medium") == "Memory" and mount["mountPath"] == "/dev/shm":
            size = volume["emptyDir"].get("sizeLimit") or ((spec.get("resources") or {}).get("limits") or {}).get("memory")
            args.append(f"--shm-size={quantity_value(size) if size else 64 * 2**20}")
        elif "emptyDir" in volume or "persistentVolumeClaim" in volume:
            folder = workdir / "volumes" / pod["metadata"]["name"] / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777 if "emptyDir" in volume else 0o775)  # an emptyDir is world-writable
            if fs_group is not None:
                os.chown(folder, -1, fs_group)
            args += ["-v", f"{folder}:{mount['mountPath']}{read_only}"]
        else:
            raise kuberay.NotEmulated(f"volume {mount['name']}: {sorted(volume)} is not emulated")
    return args


def run_argv(node: Node, pod: dict, spec: dict, stored: dict[str, dict[str, str]], workdir: Path, *,
             name: str, ip: str | None = None, detach: bool = True) -> list[str]:
    """`podman run` for one container of `pod`: its image, command and args (expanded), environment, user,
    capabilities, limits and volumes, with the pod's name as hostname on the node's network."""
    env = resolve_env(spec, pod["metadata"], stored)
    argv = ["run", "-d" if detach else "--rm", "--name", name, "--hostname", pod["metadata"]["name"],
            "--network", node.network, "--pull", "never"]
    argv += ["--ip", ip] if ip else []
    argv += [f"--add-host={host}:{address}" for host, address in sorted(node.hosts.items())]
    argv += _security(pod["spec"], spec) + _resources(spec, os.cpu_count() or 1)
    argv += _volumes(node, pod, spec, stored, workdir)
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    command = [expand(part, env) for part in spec.get("command", [])]
    args = [expand(part, env) for part in spec.get("args", [])]
    if command:
        argv += ["--entrypoint", json.dumps(command)]
    return argv + [spec["image"], *args]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return None, b""


@dataclass
class RunningPod:
    """A pod's Ray (or Redis) container on the node."""

    pod: dict
    container: str  # podman container name
    ip: str = ""

    def probe(self, engine: Engine, kind: str) -> bool:
        """One try of the main container's `kind` probe, as the kubelet makes it against the pod's IP."""
        probe = self.pod["spec"]["containers"][0].get(f"{kind}Probe")
        if probe is None:
            return True
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            status, _ = http_get(f"http://{self.ip}:{probe['httpGet']['port']}{probe['httpGet'].get('path', '/')}", timeout)
            return status is not None and 200 <= status < 400
        if "exec" in probe:
            done = engine("exec", self.container, *probe["exec"]["command"], check=False, capture=True, timeout=timeout + 5)
            return done.returncode == 0
        raise kuberay.NotEmulated(f"{kind} probe {sorted(probe)} is not emulated")


# --- the run ------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    engine: Engine
    image: str
    workdir: Path
    checks: Checks = field(default_factory=lambda: Checks(log=_log))
    timings: dict[str, float] = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.node = Node(self.engine, self.workdir, f"chroma-chart-test-{secrets.token_hex(3)}")

    # ---- pods ------------------------------------------------------------------------------------------------
    def start(self, pod: dict, stored: dict) -> RunningPod:
        name, ip = pod["metadata"]["name"], self.node.pod_ip()
        self.engine(*run_argv(self.node, pod, pod["spec"]["containers"][0], stored, self.workdir, name=name, ip=ip),
                    capture=True)
        self.containers.append(name)
        return RunningPod(pod, name, ip)

    def ip_of(self, name: str) -> str:
        found = self.engine("inspect", name, "--format", "{{json .NetworkSettings.Networks}}", capture=True)
        return json.loads(found.stdout)[self.node.network]["IPAddress"]

    def is_running(self, name: str) -> bool:
        found = self.engine("inspect", name, "--format", "{{.State.Status}}", check=False, capture=True)
        return found.stdout.strip() == "running"

    def wait(self, what: str, ready, timeout_s: float, watch: list[str] = (), period_s: float = 1.0) -> float | None:
        """Seconds until `ready()` holds, or None at the timeout or when a watched container stopped."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if ready():
                return time.monotonic() - started
            if any(not self.is_running(name) for name in watch):
                _log(f"{what}: a container stopped")
                return None
            time.sleep(period_s)
        _log(f"{what}: not within {timeout_s:.0f} s")
        return None

    def logs(self, name: str, lines: int = 40) -> str:
        return self.engine("logs", "--tail", str(lines), name, check=False, capture=True).stdout

    def cleanup(self) -> None:
        for name in reversed(self.containers):
            self.engine("rm", "-f", "-t", "0", name, check=False, capture=True)
        self.engine("network", "rm", "-f", self.node.network, check=False, capture=True)
        left = [n for n in self.containers if self.engine("container", "exists", n, check=False).returncode == 0]
        self.checks.check("containers and network removed", not left, ", ".join(left))


def _tiny_checkpoint(node: Node, values: dict) -> None:
    """The tiny checkpoint where the CPU values' hostPath puts it on the node, as a user would copy one there."""
    from model.testing.tiny import write_tiny_checkpoint

    checkpoint = values["checkpoint"]
    relative = Path(checkpoint["path"]).relative_to(checkpoint["mountPath"])
    target = node.host_path(checkpoint["hostPath"]) / relative
    write_tiny_checkpoint(target, seed=0)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for parent in target.parents:
        if parent == node.root:
            break
        parent.chmod(0o755)


def _start_redis(run: Run, objects: list[dict], stored: dict) -> RunningPod | None:
    """The chart's Redis StatefulSet pod (its rendered command, args, env, user and probes) in the project's image."""
    statefulset = one(objects, "StatefulSet")
    pod = {"metadata": {**statefulset["spec"]["template"]["metadata"], "name": f"{statefulset['metadata']['name']}-0",
                        "namespace": NAMESPACE},
           "spec": json.loads(json.dumps(statefulset["spec"]["template"]["spec"]))}
    for spec in pod["spec"]["containers"]:
        spec["image"] = run.image  # the chart's redis image cannot be pulled here; ours has redis-server
    redis = run.start(pod, stored)
    service = one([o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-redis")], "Service")
    run.node.add_service(service["metadata"]["name"], NAMESPACE, redis.ip)
    ready = run.wait("Redis readiness probe", lambda: redis.probe(run.engine, "readiness"), TIMEOUT_S["redis"], [redis.container])
    run.checks.check("the chart's Redis is ready (its readinessProbe: redis-cli ping)", ready is not None)
    return redis if ready is not None else None


def _reconcile_serve(run: Run, cluster: RayCluster, dashboard: kuberay.Dashboard, watch: list[str],
                     timeout_s: float) -> tuple[float | None, dict]:
    """The RayService controller's loop once the head is ready: every 2 s read the applications, submit the Serve
    config when there are none, until every one is RUNNING. Returns (seconds, the last applications)."""
    started, applications, submitted = time.monotonic(), {}, False
    while time.monotonic() - started < timeout_s:
        try:
            applications = dashboard.applications()
            if not applications:
                dashboard.submit(cluster.serve_config_json())
                if not submitted:
                    _log("Serve config submitted: PUT /api/serve/applications/")
                submitted = True
            elif all_running(applications):
                return time.monotonic() - started, applications
            elif any(app.get("status") == "DEPLOY_FAILED" for app in applications.values()):
                break  # KubeRay would keep polling; this config will not deploy
        except kuberay.DashboardError as error:
            _log(f"dashboard: {error}")
        if any(not run.is_running(name) for name in watch):
            break
        time.sleep(kuberay.STATUS_POLL_S)
    return None, applications


def _messages(applications: dict) -> str:
    """The applications' and deployments' status messages (where a failed replica's error shows)."""
    lines = []
    for name, app in applications.items():
        lines.append(f"{name}: {app.get('message', '')[-1500:]}")
        lines += [f"  {d}: {v.get('status')} {v.get('message', '')[-1500:]}" for d, v in app.get("deployments", {}).items()]
    return "\n" + "\n".join(lines)


def _placement(cluster: RayCluster, details: dict, pods: dict[str, RunningPod]) -> tuple[bool, list[str]]:
    """Every replica on a node of a group the chart's resources allow for its deployment."""
    config = json.loads(cluster.serve_config_json())
    options = {d["name"]: d.get("ray_actor_options", {}) for app in config["applications"] for d in app["deployments"]}
    by_ip = {running.ip: running for running in pods.values()}
    all_pods = [cluster.head, *cluster.workers]
    ok, table = True, []
    for app in details.get("applications", {}).values():
        for name, deployment in app.get("deployments", {}).items():
            allowed = hosts_for(options.get(name, {}), all_pods)
            for replica in deployment.get("replicas", []):
                running = by_ip.get(replica.get("node_ip"))
                group = next((p.group for p in all_pods if running and p.name == running.pod["metadata"]["name"]), "?")
                fits = group in allowed
                ok &= fits
                table.append(f"{name:12} on {group:10} ({replica.get('state')}; allowed: {', '.join(allowed) or 'none'})")
    return ok and bool(table), table


def _memory_use(run: Run, names: list[str]) -> dict[str, int]:
    """Bytes each container uses now, as podman reports it ({} where it cannot)."""
    stats = run.engine("stats", "--no-stream", "--format", "json", *names, check=False, capture=True)
    try:
        return {s["name"]: _bytes(s["mem_usage"].split("/")[0]) for s in json.loads(stats.stdout)}
    except (ValueError, KeyError, TypeError):
        return {}


def _bytes(text: str) -> int:
    """podman's "1.234GB" / "512.3MB" / "100kB" as bytes."""
    text = text.strip()
    for suffix, factor in (("kB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    raise ValueError(text)


# --- calls --------------------------------------------------------------------------------------------------------

@dataclass
class Api:
    """The Serve API as this test's callers use it, with the voice they clone."""

    url: str
    api_key: str
    voice_id: str = ""

    async def create(self) -> None:
        audio, rate = speak(VOICE_TEXT)
        async with ChromaClient(self.url, self.api_key) as client:
            self.voice_id = (await client.create_voice("chart-test", VOICE_TEXT, audio, rate))["id"]

    async def turn(self):
        audio, rate = speak(QUESTION)
        async with ChromaClient(self.url, self.api_key) as client:
            session = await client.create_session(self.voice_id)
            return await client.turn(session["id"], audio, rate)

    async def new_turn(self) -> tuple[float, int, str | None]:
        """(seconds from sending the caller's audio to the answer, HTTP status, error code) of a new turn."""
        async with ChromaClient(self.url, self.api_key, timeout_s=60) as client:
            try:
                session = await client.create_session(self.voice_id)
            except ApiError as error:
                return 0.0, error.status, error.code
            started = time.monotonic()
            try:
                await client.turn(session["id"], synthetic_speech(16000, 1.0), 16000)
                return time.monotonic() - started, 200, None
            except ApiError as error:
                return time.monotonic() - started, error.status, error.code
            except Exception as error:  # noqa: BLE001 - what a client would see, reported
                return time.monotonic() - started, 0, type(error).__name__


class LiveCall:
    """A /v1/realtime call that has spoken and is hearing its reply."""

    def __init__(self, url: str, api_key: str, voice_id: str):
        self.caller = RealtimeCaller(url, api_key)
        self.voice_id = voice_id
        self.listening: asyncio.Task | None = None

    async def open(self) -> None:
        await self.caller.__aenter__()
        await self.caller.configure(self.voice_id, audio={"input": {"turn_detection": {"type": "server_vad"}},
                                                          "output": {"voice": self.voice_id}})
        await self.caller.say(speak_at(QUESTION, CODEC_RATE))
        self.listening = asyncio.create_task(self.caller.say(np.zeros(60 * CODEC_RATE, np.float32)))

    async def hearing(self, timeout_s: float) -> bool:
        """Until the first reply audio arrives."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if any(r.chunks for r in self.caller.replies.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    def ended(self) -> str | None:
        """How the live reply ended, if it did: a failed response (its code), an error event, or the socket closed."""
        for event in self.caller.events:
            if event["type"] == "response.done" and event["response"]["status"] != "completed":
                details = event["response"].get("status_details") or {}
                return f"response {event['response']['status']} ({(details.get('error') or {}).get('code') or details.get('reason')})"
            if event["type"] == "error":
                return f"error event ({event['error'].get('code')})"
        if self.caller.ws.close_code is not None:
            return f"closed ({self.caller.ws.close_code})"
        return None

    def completed(self) -> bool:
        return any(e["type"] == "response.done" and e["response"]["status"] == "completed" for e in self.caller.events)

    async def close(self) -> None:
        if self.listening:
            self.listening.cancel()
        try:
            await self.caller.__aexit__(None, None, None)
        except Exception:  # noqa: BLE001 - a socket the server already closed
            pass


async def _one_call(url: str, api_key: str, voice_id: str, timeout_s: float) -> tuple[str | None, float]:
    call = LiveCall(url, api_key, voice_id)
    await call.open()
    try:
        reply = await call.caller.next_reply(timeout_s=timeout_s)
        return reply.status, reply.audio_ms / 1000
    finally:
        await call.close()


async def _running(dashboard: kuberay.Dashboard) -> bool | None:
    """Whether every application is RUNNING by the status API (None: the dashboard did not answer)."""
    try:
        return all_running(await asyncio.to_thread(dashboard.applications))
    except kuberay.DashboardError:
        return None


async def _node_death(run: Run, api: Api, worker: RunningPod, dashboard: kuberay.Dashboard) -> dict:
    """Kill the worker under two live calls; measure what the calls saw, refuse new turns while it is down."""
    calls = [LiveCall(api.url, api.api_key, api.voice_id) for _ in range(2)]
    figures: dict = {"ended": [], "refusals": []}
    try:
        await asyncio.gather(*(c.open() for c in calls))
        hearing = await asyncio.gather(*(c.hearing(TIMEOUT_S["call"]) for c in calls))
        if not all(hearing) or any(c.completed() for c in calls):
            figures["setup"] = "the two calls were not both mid-reply"
            return figures
        killed_at = time.monotonic()
        await asyncio.to_thread(run.engine, "kill", "--signal", "KILL", worker.container, capture=True)
        _log(f"worker {worker.container} killed under two live replies")
        pending = dict(enumerate(calls))
        while pending and time.monotonic() - killed_at < TIMEOUT_S["death"]:
            for index, call in list(pending.items()):
                if how := call.ended():
                    figures["ended"].append((index, how, time.monotonic() - killed_at))
                    del pending[index]
                elif call.completed():
                    figures["ended"].append((index, "completed (its reply outran the kill)", time.monotonic() - killed_at))
                    del pending[index]
            await asyncio.sleep(0.02)
        figures["ended"] += [(index, "still open", None) for index in pending]
        for _ in range(5):  # new turns while the worker is down; when Serve's status (KubeRay's signal) sees it
            figures["refusals"].append(await api.new_turn())
            if "status left RUNNING" not in figures and not await _running(dashboard):
                figures["status left RUNNING"] = time.monotonic() - killed_at
            await asyncio.sleep(0.5)
    finally:
        await asyncio.gather(*(c.close() for c in calls))
    return figures


# --- the whole run -------------------------------------------------------------------------------------------------

def chart_test() -> int:
    started = time.monotonic()
    container.ensure_podman()
    engine = container.find_engine()
    container.ensure_base(engine)
    build_s = container.build(container.TEST_IMAGE, container.BASE_TAG, "cpu", engine=engine)  # cached: seconds
    _log(f"image {container.TEST_IMAGE} ready in {build_s:.0f} s")
    workdir = Path(tempfile.mkdtemp(prefix="chroma-chart-test-"))
    workdir.chmod(0o755)
    run = Run(engine, container.TEST_IMAGE, workdir)
    try:
        _scenario(run)
    except (RuntimeError, KeyError, ValueError, subprocess.TimeoutExpired) as error:
        run.checks.check("the run went through", False, f"{type(error).__name__}: {error}")
    finally:
        if run.checks.failed:
            for name in run.containers:
                serve = engine("exec", name, "sh", "-c", "tail -n 15 /tmp/ray/session_latest/logs/serve/*.log",
                               check=False, capture=True).stdout
                print(f"--- {name} ---\n{run.logs(name)}\n--- its Serve logs ---\n{serve}", flush=True)
        run.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    run.timings["total"] = time.monotonic() - started
    _log("times: " + ", ".join(f"{k} {v:.2f} s" for k, v in run.timings.items()))
    print(f"chart-test: {len(run.checks.passed)} passed, {len(run.checks.failed)} failed", flush=True)
    return 1 if run.checks.failed else 0


def _scenario(run: Run) -> None:
    checks, engine, node = run.checks, run.engine, run.node
    values = cpu_values(run.image)
    objects = render(values)
    stored = secrets_of(objects)
    cluster = build_cluster(one(objects, "RayService"), NAMESPACE)
    checks.check("the chart renders with the CPU values; KubeRay's pods built from it",
                 len(cluster.workers) >= 1, f"head {cluster.head.name}, workers {[w.name for w in cluster.workers]}")
    _log(f"head:   {cluster.head.ray_container['args'][0]}")
    for worker_pod in cluster.workers:
        _log(f"worker: {worker_pod.ray_container['args'][0]}")
    _tiny_checkpoint(node, values)
    node.create_network()

    if _start_redis(run, objects, stored) is None:
        return
    t0 = time.monotonic()
    head = run.start(cluster.head.spec, stored)
    node.add_service(f"{cluster.name}-head-svc", NAMESPACE, head.ip)
    # KubeRay creates the workers with the head: their init container waits for the head's GCS meanwhile.
    worker_pod = cluster.workers[0]
    init = worker_pod.spec["spec"]["initContainers"][0]
    init_argv = run_argv(node, worker_pod.spec, init, stored, run.workdir, name=f"{worker_pod.name}-init", detach=False)
    waiting = subprocess.Popen([engine.command, *init_argv], env=engine.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    head_ready = run.wait("head readiness probe", lambda: head.probe(engine, "readiness"), TIMEOUT_S["head"], [head.container])
    checks.check("the head is ready (KubeRay's readinessProbe: GET /api/healthz on the agent port)", head_ready is not None,
                 f"after {time.monotonic() - t0:.0f} s")
    if head_ready is None:
        waiting.kill()
        return
    token = stored.get(cluster.auth_secret or "", {}).get("auth_token")
    dashboard = kuberay.Dashboard(f"http://{head.ip}:{kuberay.DASHBOARD_PORT}", token)
    status, _ = http_get(f"{dashboard.url}/api/serve/applications/?api_type=declarative")
    checks.check("the dashboard refuses a call without the Ray token (authOptions: token)", status in (401, 403),
                 f"HTTP {status}")
    try:
        output, _ = waiting.communicate(timeout=TIMEOUT_S["gcs"])
    except subprocess.TimeoutExpired:
        waiting.kill()
        output = ""
    checks.check("the worker's wait-gcs-ready init container passed (ray health-check with the token)",
                 waiting.returncode == 0, output.strip().splitlines()[-1] if output.strip() else "")
    if waiting.returncode != 0:
        return
    worker = run.start(worker_pod.spec, stored)
    pods = {"head": head, "worker": worker}
    running_s, applications = _reconcile_serve(run, cluster, dashboard, [head.container, worker.container],
                                               TIMEOUT_S["running"])
    checks.check("the rendered serveConfigV2 is RUNNING (PUT, then GET /api/serve/applications/)", running_s is not None,
                 json.dumps({n: a.get("status") for n, a in applications.items()}) + (
                     "" if running_s is not None else _messages(applications)))
    if running_s is None:
        return
    worker_ready = run.wait("worker readiness probe", lambda: worker.probe(engine, "readiness"), TIMEOUT_S["worker"],
                            [worker.container])
    checks.check("the worker is ready (the chart's readinessProbe: /readyz through its Serve proxy)", worker_ready is not None)
    proxy, _ = http_get(f"http://{head.ip}:{kuberay.SERVE_PORT}/-/healthz")
    checks.check("the head's Serve proxy is healthy (KubeRay's ray.io/serve label)", proxy == 200, f"HTTP {proxy}")
    run.timings["up"] = time.monotonic() - t0
    ok, table = _placement(cluster, dashboard.serve_details(), pods)
    checks.check("every replica runs on a node the chart's resources allow", ok, "\n  " + "\n  ".join(table))
    memory = _memory_use(run, [head.container, worker.container])
    for running in pods.values():
        limit = ((running.pod["spec"]["containers"][0].get("resources") or {}).get("limits") or {}).get("memory")
        used = memory.get(running.container)
        if used is not None and limit:
            checks.check(f"{running.pod['metadata']['name']} uses less than its memory limit",
                         used < quantity_value(limit), f"{used / 2**30:.2f} of {quantity_value(limit) / 2**30:.2f} GiB")
    api_key = next(iter(json.loads(stored[f"{RELEASE}-chroma-serve-api-keys"]["api-keys.json"])))
    asyncio.run(_serve_and_die(run, cluster, dashboard, head, worker, f"http://{head.ip}:{kuberay.SERVE_PORT}", api_key))


async def _serve_and_die(run: Run, cluster: RayCluster, dashboard: kuberay.Dashboard, head: RunningPod,
                         worker: RunningPod, url: str, api_key: str) -> None:
    checks, engine = run.checks, run.engine
    api = Api(url, api_key)
    started = time.monotonic()
    await api.create()
    reply = await api.turn()
    run.timings["turn"] = time.monotonic() - started
    checks.check("a spoken turn answered through the head's Serve port", reply.audio_seconds > 0 and bool(reply.done),
                 f"{reply.audio_seconds:.2f} s of audio, {len(reply.audio)} chunks")
    started = time.monotonic()
    status, seconds = await _one_call(url, api_key, api.voice_id, TIMEOUT_S["call"])
    run.timings["call"] = time.monotonic() - started
    checks.check("a /v1/realtime call answered through the head's Serve port", status == "completed" and seconds > 0,
                 f"reply {status}, {seconds:.2f} s of audio")

    figures = await _node_death(run, api, worker, dashboard)
    if "setup" in figures:
        checks.check("two live calls held mid-reply", False, figures["setup"])
        return
    for index, how, after in figures["ended"]:
        _log(f"call {index}: {how}" + (f" {after:.2f} s after the kill" if after is not None else ""))
    ended = [after for _, how, after in figures["ended"] if after is not None and not how.startswith("completed")]
    clear = all(how.startswith(("response failed (stage_failed)", "error event (stage_failed)", "closed (10"))
                for _, how, _ in figures["ended"] if not how.startswith("completed"))
    checks.check("the live calls on the killed node end with stage_failed or a clear close code", bool(ended) and clear,
                 "; ".join(f"{how} after {after:.2f} s" if after is not None else how for _, how, after in figures["ended"]))
    if ended:
        run.timings["calls ended after the kill (slowest)"] = max(ended)
        _log(f"within the 2 s target: {'yes' if max(ended) <= 2.0 else 'NO'}")
    if "status left RUNNING" in figures:
        run.timings["Serve status left RUNNING after the kill"] = figures["status left RUNNING"]
    refusals = figures["refusals"]
    checks.check("new turns are refused 503 stage_unavailable while the worker is down",
                 bool(refusals) and all(r[1] == 503 and r[2] == "stage_unavailable" for r in refusals),
                 ", ".join(f"{status} {code} in {s:.2f} s" for s, status, code in refusals))
    if refusals:
        run.timings["first refusal"], run.timings["slowest refusal"] = refusals[0][0], max(s for s, _, _ in refusals)

    restarted_at = time.monotonic()
    await asyncio.to_thread(engine, "start", worker.container, capture=True)  # restartPolicy: Always
    same_ip = await asyncio.to_thread(run.ip_of, worker.container)
    checks.check("the restarted worker keeps its pod IP", same_ip == worker.ip, f"{worker.ip} -> {same_ip}")

    back = await _back_after_restart(run, dashboard, head, worker, api, restarted_at,
                                     "status left RUNNING" in figures)
    meanwhile = ", ".join(f"{n} x {answer}" for answer, n in Counter(
        f"{status} {code or ''}".strip() for _, status, code in back["turns"]).items())
    checks.check("turns while the worker restarts are refused 503 stage_unavailable until it is back",
                 all(status == 503 and code == "stage_unavailable" or status == 200 for _, status, code in back["turns"]),
                 meanwhile)
    if not back["status left RUNNING"]:
        _log("Serve's status API never showed the application other than RUNNING while the worker was down")
    for what in ("RUNNING again", "worker ready again"):
        if back.get(what) is not None:
            run.timings[f"{what} after the restart"] = back[what]
    checks.check("the cluster is ready again after the worker container restarts (RUNNING, worker readiness probe)",
                 back.get("worker ready again") is not None)
    if back.get("worker ready again") is None:
        return
    status, seconds = await _one_call(url, api_key, api.voice_id, TIMEOUT_S["call"])
    run.timings["a new call answered after the restart"] = time.monotonic() - back["restarted_at"]
    checks.check("a new /v1/realtime call works after the restart", status == "completed" and seconds > 0,
                 f"reply {status}, {seconds:.2f} s of audio")


async def _back_after_restart(run: Run, dashboard: kuberay.Dashboard, head: RunningPod, worker: RunningPod,
                              api: Api, started: float, left_running: bool) -> dict:
    """Seconds from the restart to the applications RUNNING again (after the status API showed them otherwise) and
    to the worker's readiness probe passing; new turns tried every 2 s meanwhile, until one is answered."""
    engine, back = run.engine, {"turns": [], "restarted_at": started}

    async def turns():
        while True:
            answer = await api.new_turn()
            back["turns"].append(answer)
            if answer[1] == 200:
                return
            await asyncio.sleep(2.0)

    trying = asyncio.create_task(turns())
    try:
        while time.monotonic() - started < TIMEOUT_S["running"]:
            if not all(await asyncio.gather(*(asyncio.to_thread(run.is_running, c) for c in (head.container, worker.container)))):
                break
            running = await _running(dashboard)
            left_running = left_running or running is False
            if running and left_running and "RUNNING again" not in back:
                back["RUNNING again"] = time.monotonic() - started
            if running and await asyncio.to_thread(worker.probe, engine, "readiness"):
                back["worker ready again"] = time.monotonic() - started
                break
            await asyncio.sleep(1.0)
    finally:
        trying.cancel()
        await asyncio.gather(trying, return_exceptions=True)
    back["status left RUNNING"] = left_running
    return back


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.chart_test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        return chart_test()
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"[chart] error: {error}", file=sys.stderr, flush=True)
        print("chart-test: 0 passed, 1 failed", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
