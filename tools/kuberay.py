"""What the KubeRay operator makes of a rendered RayService, mirrored for `make chart-test` (tools/chart_test.py).

Mirrors KubeRay **v1.7.0** (ray-operator/controllers/ray: common/pod.go, utils/util.go, utils/constant.go,
rayservice_controller.go, utils/dashboardclient), written from its source, for what the chart uses:

- the RayCluster is named `<rayservice>-<5 random characters>`; its head pod `<cluster>-head-<5>`, each worker
  `<cluster>-<group>-worker-<5>`; the workers reach the head at the head Service's FQDN
  `<cluster>-head-svc.<namespace>.svc.cluster.local`;
- each Ray container's command becomes `/bin/bash -c --` with one argument,
  `ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start ...`: the group's rayStartParams, plus on the head
  `dashboard-host` (0.0.0.0 unless set) and `no-monitor` (in-tree autoscaling: the autoscaler is a sidecar), on a
  worker `address=<head FQDN>:<port>`, and on both `metrics-export-port=8080`, `block`,
  `dashboard-agent-listen-port=52365`, `num-cpus` (the CPU limit, else request, rounded up), `memory` (the memory
  limit in bytes) and `num-gpus` (a `*gpu` limit), unless set; flags in name order, `true` as a bare flag;
- the environment it appends to the Ray container's (token auth: RAY_AUTH_MODE, RAY_AUTH_TOKEN from
  authOptions.secretName's `auth_token`; then FQ_RAY_IP and RAY_IP on workers, RAY_CLUSTER_NAME, RAY_CLUSTER_NAMESPACE,
  RAY_CLOUD_INSTANCE_ID, RAY_NODE_TYPE_NAME (from which Ray labels the node `ray.io/node-group`),
  KUBERAY_GEN_RAY_START_CMD, RAY_PORT, the RayService's three timeouts, RAY_ADDRESS, usage-stats flags);
- the `metrics` port, a `ray-logs` emptyDir at /tmp/ray on the head (shared with the autoscaler sidecar), and
  /dev/shm unless the template mounts it;
- the probes it adds where the template has none (Ray >= 2.53: GET /api/healthz on the dashboard agent's port);
- the `wait-gcs-ready` init container of each worker (`ray health-check` against the head until it answers);
- the pods' labels (ray.io/cluster, ray.io/group, ray.io/node-type, ray.io/serve, ...);
- the Serve config: `serveConfigV2` parsed from YAML and PUT as JSON to the head's dashboard at
  `/api/serve/applications/`, with `x-ray-authorization: Bearer <token>`; readiness is every application of
  `GET /api/serve/applications/?api_type=declarative` RUNNING, polled every 2 s; the config is submitted again
  whenever the status lists no application (a head that restarted without GCS fault tolerance).

What the chart does not use is refused (NotEmulated) rather than silently left out: GCS fault tolerance, TLS,
Kubernetes token auth, autoscaler v2, group-level `resources`/`labels`, an overwritten container command.
"""

from __future__ import annotations

import copy
import json
import math
import re
import secrets
import string
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction

import yaml

KUBERAY_VERSION = "v1.7.0"
HEAD_GROUP = "headgroup"  # the ray.io/group label value of the head pod
GCS_PORT, DASHBOARD_PORT, METRICS_PORT, AGENT_PORT, SERVE_PORT = 6379, 8265, 8080, 52365, 8000
UNIFIED_HEALTH_CHECK_RAY = (2, 53)  # from this Ray version on, KubeRay probes GET /api/healthz
RAY_CONTAINER = 0  # KubeRay takes the pod's first container as the Ray container
STATUS_POLL_S = 2.0  # the RayService controller's requeue period
CLUSTER_DOMAIN = "cluster.local"
CONTAINER_COMMAND = ["/bin/bash", "-c", "--"]


class NotEmulated(ValueError):
    """The RayService uses a KubeRay feature this mirror does not reproduce."""


# --- Kubernetes quantities ----------------------------------------------------------------------------------------

_SUFFIXES = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(text: str | int | float) -> Fraction:
    """A Kubernetes quantity ("500m", "6Gi", "2", "1e3") as an exact number."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(text).strip())
    if not match or match[2] not in _SUFFIXES:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return Fraction(match[1]) * _SUFFIXES[match[2]]


def quantity_value(text: str | int | float) -> int:
    """Quantity.Value(): rounded up to a whole number."""
    return math.ceil(quantity(text))


# --- the cluster KubeRay creates ------------------------------------------------------------------------------------

def _suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))


@dataclass
class RayPod:
    """One pod as KubeRay builds it (Kubernetes shape), and the Ray start parameters it put into its command."""

    name: str
    group: str
    node_type: str  # "head" or "worker"
    spec: dict  # the pod: {"metadata": ..., "spec": ...}
    ray_start_params: dict[str, str]

    @property
    def ray_container(self) -> dict:
        return self.spec["spec"]["containers"][RAY_CONTAINER]

    @property
    def labels(self) -> dict[str, str]:
        return self.spec["metadata"]["labels"]

    def ray_resources(self) -> dict[str, float]:
        """The logical resources this node offers Ray (what `ray start` is told; 0 where it is not told)."""
        params = self.ray_start_params
        offered = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
        offered.update(json.loads(params.get("resources", "'{}'").strip("'")))
        return offered

    def ray_labels(self) -> dict[str, str]:
        """The node labels Ray gives this node: `ray.io/node-group` from RAY_NODE_TYPE_NAME (KubeRay sets it from
        the pod's ray.io/group label), plus any --labels."""
        labels = {"ray.io/node-group": self.group}
        for pair in filter(None, self.ray_start_params.get("labels", "").split(",")):
            key, _, value = pair.partition("=")
            labels[key] = value
        return labels


@dataclass
class RayCluster:
    name: str
    namespace: str
    rayservice: dict
    head: RayPod
    workers: list[RayPod] = field(default_factory=list)

    @property
    def head_fqdn(self) -> str:
        return f"{self.name}-head-svc.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def auth_secret(self) -> str | None:
        options = self.rayservice["spec"]["rayClusterConfig"].get("authOptions") or {}
        return (options.get("secretName") or self.name) if options.get("mode") == "token" else None

    def serve_config_json(self) -> bytes:
        """The body KubeRay PUTs to the dashboard: serveConfigV2 parsed as YAML, sent as JSON."""
        return json.dumps(yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])).encode()


def build_cluster(rayservice: dict, namespace: str) -> RayCluster:
    """The RayCluster KubeRay makes of `rayservice`: its head pod and one pod per desired worker replica."""
    spec = rayservice["spec"]["rayClusterConfig"]
    _refuse_unmirrored(spec)
    name = f"{rayservice['metadata']['name']}-{_suffix()}"
    cluster = RayCluster(name, namespace, rayservice, head=None)  # type: ignore[arg-type]
    head_port = spec["headGroupSpec"].get("rayStartParams", {}).get("port", str(GCS_PORT))
    cluster.head = _head_pod(cluster, spec, head_port)
    for group in spec.get("workerGroupSpecs", []):
        for _ in range(_desired_replicas(group)):
            cluster.workers.append(_worker_pod(cluster, spec, group, head_port))
    return cluster


def _refuse_unmirrored(spec: dict) -> None:
    unsupported = {
        "gcsFaultToleranceOptions": "GCS fault tolerance", "tlsOptions": "TLS",
        "historyServerOptions": "the history server collector",
    }
    for key, what in unsupported.items():
        if spec.get(key):
            raise NotEmulated(f"{what} ({key}) is not mirrored")
    if (spec.get("authOptions") or {}).get("enableK8sTokenAuth"):
        raise NotEmulated("Kubernetes token auth (authOptions.enableK8sTokenAuth) is not mirrored")
    if (spec.get("autoscalerOptions") or {}).get("version") == "v2":
        raise NotEmulated("autoscaler v2 is not mirrored")
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        for key in ("resources", "labels"):
            if group.get(key):
                raise NotEmulated(f"a group's top-level `{key}` is not mirrored")
        for container in group["template"]["spec"]["containers"][:1]:
            if "ray start" in " ".join(container.get("command", []) + container.get("args", [])):
                raise NotEmulated("a Ray container whose command already runs `ray start` is not mirrored")


def _desired_replicas(group: dict) -> int:
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
    wanted = group.get("replicas", low)
    return max(low, min(wanted, high)) * group.get("numOfHosts", 1)


def _labels(cluster: RayCluster, node_type: str, group: str, template_labels: dict) -> dict:
    labels = {
        "ray.io/is-ray-node": "yes", "ray.io/cluster": cluster.name, "ray.io/node-type": node_type,
        "ray.io/group": group, "ray.io/identifier": f"{cluster.name}-{node_type}"[-63:],
        "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator",
    }
    for key, value in template_labels.items():
        if key not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster"):  # not overridable
            labels[key] = value
    # A RayService's workers serve once their readiness probe passes; the controller sets the head's label
    # after checking its proxy (it starts false).
    labels["ray.io/serve"] = "false" if node_type == "head" else "true"
    return labels


def _set_env(container: dict, name: str, value: str | None = None, value_from: dict | None = None,
             only_if_missing: bool = True) -> None:
    env = container.setdefault("env", [])
    if only_if_missing and any(e["name"] == name for e in env):
        return
    env.append({"name": name, **({"valueFrom": value_from} if value_from else {"value": value})})


def _token_auth_env(cluster: RayCluster, container: dict) -> None:
    if cluster.auth_secret is None:
        return
    _set_env(container, "RAY_AUTH_MODE", "token")
    _set_env(container, "RAY_AUTH_TOKEN", value_from={"secretKeyRef": {"name": cluster.auth_secret, "key": "auth_token"}})


def _field(path: str) -> dict:
    return {"fieldRef": {"fieldPath": path}}


def _add_empty_dir(pod: dict, container: dict, name: str, path: str, medium: str = "") -> None:
    """KubeRay's addEmptyDir: skipped when the container already mounts something at `path`."""
    if any(m["mountPath"] == path for m in container.get("volumeMounts", [])):
        return
    volumes = pod["spec"].setdefault("volumes", [])
    if not any(v["name"] == name for v in volumes):
        empty_dir: dict = {"medium": medium} if medium else {}
        if medium == "Memory":
            limit = (container.get("resources", {}).get("limits", {}).get("memory")
                     or container.get("resources", {}).get("requests", {}).get("memory"))
            if limit:
                empty_dir["sizeLimit"] = limit
        volumes.append({"name": name, "emptyDir": empty_dir})
    container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path})


def _missing_start_params(params: dict[str, str], node_type: str, head_port: str, fqdn: str) -> None:
    if node_type == "worker":
        params.setdefault("address", f"{fqdn}:{head_port}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))


def _resource_start_params(params: dict[str, str], resources: dict) -> None:
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu and quantity(cpu) != 0:
            params["num-cpus"] = str(quantity_value(cpu))
    if "memory" not in params and limits.get("memory") and quantity(limits["memory"]) != 0:
        params["memory"] = str(quantity_value(limits["memory"]))
    if "num-gpus" not in params:
        for key in sorted(limits):
            if (key.endswith("gpu") or re.search(r"nvidia\.com/mig-\d+g\.\d+gb$", key)) and quantity(limits[key]) != 0:
                params["num-gpus"] = str(quantity_value(limits[key]))
                break


def ray_start_flags(params: dict[str, str]) -> str:
    """convertParamMap: flags in name order; "true" is a bare flag and "false" drops it, except for the options
    that take an explicit boolean. Each flag is padded with a space either side, as KubeRay writes them."""
    explicit_bool = ("log-color", "include-dashboard", "include-log-monitor")
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in explicit_bool:
            if value.lower() == "true":
                flags.append(f" --{key} ")
        else:
            flags.append(f" --{key}={value} ")
    return "".join(flags)


def _ray_command(container: dict, ray_start: str) -> None:
    existing = "".join(f" {part} " for part in container.get("command", []) + container.get("args", []))
    generated = "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; " + ray_start
    container["command"] = list(CONTAINER_COMMAND)
    container["args"] = [f"{existing} && {generated}" if existing else generated]


def _ray_env(container: dict, cluster: RayCluster, node_type: str, head_port: str, ray_start: str) -> None:
    """setContainerEnvVars, in KubeRay's order."""
    ip = "127.0.0.1"
    if node_type == "worker":
        ip = cluster.head_fqdn
        _set_env(container, "FQ_RAY_IP", ip, only_if_missing=False)
        _set_env(container, "RAY_IP", ip.split(".")[0], only_if_missing=False)
    _set_env(container, "RAY_CLUSTER_NAME", value_from=_field("metadata.labels['ray.io/cluster']"), only_if_missing=False)
    _set_env(container, "RAY_CLUSTER_NAMESPACE", value_from=_field("metadata.namespace"), only_if_missing=False)
    _set_env(container, "RAY_CLOUD_INSTANCE_ID", value_from=_field("metadata.name"), only_if_missing=False)
    _set_env(container, "RAY_NODE_TYPE_NAME", value_from=_field("metadata.labels['ray.io/group']"), only_if_missing=False)
    _set_env(container, "KUBERAY_GEN_RAY_START_CMD", ray_start, only_if_missing=False)
    _set_env(container, "RAY_PORT", head_port)
    # A RayService's cluster fails fast on a dead actor and a slow GCS or Serve KV store.
    _set_env(container, "RAY_timeout_ms_task_wait_for_death_info", "0")
    _set_env(container, "RAY_gcs_server_request_timeout_seconds", "5")
    _set_env(container, "RAY_SERVE_KV_TIMEOUT_S", "5")
    _set_env(container, "RAY_ADDRESS", f"{ip}:{head_port}")
    _set_env(container, "RAY_USAGE_STATS_KUBERAY_IN_USE", "1")
    if node_type == "head":
        _set_env(container, "RAY_USAGE_STATS_EXTRA_TAGS", f"kuberay_version={KUBERAY_VERSION};kuberay_crd=RayService",
                 only_if_missing=False)
    _set_env(container, "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "1")


def _ray_version(spec: dict) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", spec.get("rayVersion", "0"))[:2])


def _probes(container: dict, node_type: str, params: dict[str, str], ray_version: tuple[int, ...]) -> None:
    """initLivenessAndReadinessProbe, for a RayService's pods."""
    agent_port = int(params.get("dashboard-agent-listen-port", AGENT_PORT))
    raylet = f"wget --tries 1 -T 2 -q -O- http://localhost:{agent_port}/api/local_raylet_healthz | grep success"
    gcs = (f"wget --tries 1 -T 10 -q -O- http://localhost:{int(params.get('dashboard-port', DASHBOARD_PORT))}"
           "/api/gcs_healthz | grep success")
    commands = [raylet, gcs] if node_type == "head" else [raylet]
    unified = ray_version >= UNIFIED_HEALTH_CHECK_RAY
    check = ({"httpGet": {"path": "/api/healthz", "port": agent_port}} if unified
             else {"exec": {"command": ["bash", "-c", " && ".join(commands)]}})
    timeout = 5 if node_type == "head" else 2
    if "livenessProbe" not in container:
        container["livenessProbe"] = {"initialDelaySeconds": 30, "timeoutSeconds": timeout, "periodSeconds": 5,
                                      "successThreshold": 1, "failureThreshold": 120, **check}
    if "readinessProbe" not in container:
        probe = {"initialDelaySeconds": 10, "timeoutSeconds": timeout, "periodSeconds": 5,
                 "successThreshold": 1, "failureThreshold": 10, **check}
        if node_type == "worker":  # a serving worker is ready only while its Serve proxy is
            serve_port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == "serve"),
                              SERVE_PORT)
            proxy = f"wget --tries 1 -T 10 -q -O- http://localhost:{serve_port}/-/healthz | grep success"
            probe.pop("httpGet", None)
            probe["failureThreshold"] = 1
            probe["exec"] = {"command": ["bash", "-c", " && ".join([*commands, proxy])]}
        container["readinessProbe"] = probe


def _head_pod(cluster: RayCluster, spec: dict, head_port: str) -> RayPod:
    group = spec["headGroupSpec"]
    pod = {"metadata": copy.deepcopy(group["template"].get("metadata", {})), "spec": copy.deepcopy(group["template"]["spec"])}
    name = f"{cluster.name[:50]}-head-{_suffix()}".lower()
    pod["metadata"].update(name=name, namespace=cluster.namespace)
    pod["metadata"]["labels"] = _labels(cluster, "head", HEAD_GROUP, pod["metadata"].get("labels", {}))
    pod["metadata"].setdefault("annotations", {})["ray.io/ft-enabled"] = "false"
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    _missing_start_params(params, "head", head_port, "")
    container = pod["spec"]["containers"][RAY_CONTAINER]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    if autoscaling:
        params["no-monitor"] = "true"
        pod["spec"]["serviceAccountName"] = cluster.name
        pod["spec"]["containers"].append(_autoscaler_container(cluster, container["image"]))
    _metrics_port(container)
    _token_auth_env(cluster, container)
    _finish_pod(cluster, pod, "head", params, head_port, spec)
    if autoscaling:
        for index in (RAY_CONTAINER, len(pod["spec"]["containers"]) - 1):
            _add_empty_dir(pod, pod["spec"]["containers"][index], "ray-logs", "/tmp/ray")
    return RayPod(name, HEAD_GROUP, "head", pod, params)


def _autoscaler_container(cluster: RayCluster, image: str) -> dict:
    """The autoscaler sidecar: `ray kuberay-autoscaler`, which talks to the Kubernetes API (not run here)."""
    start = "ray kuberay-autoscaler --cluster-name $(RAY_CLUSTER_NAME) --cluster-namespace $(RAY_CLUSTER_NAMESPACE)"
    container = {
        "name": "autoscaler", "image": image, "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "RAY_CLUSTER_NAME", "valueFrom": _field("metadata.labels['ray.io/cluster']")},
                {"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": _field("metadata.namespace")},
                {"name": "RAY_HEAD_POD_NAME", "valueFrom": _field("metadata.name")},
                {"name": "KUBERAY_CRD_VER", "value": "v1"},
                {"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": start}],
        "command": list(CONTAINER_COMMAND), "args": [start],
        "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}, "requests": {"cpu": "500m", "memory": "512Mi"}},
    }
    _token_auth_env(cluster, container)
    return container


def _worker_pod(cluster: RayCluster, spec: dict, group: dict, head_port: str) -> RayPod:
    template = group["template"]
    pod = {"metadata": copy.deepcopy(template.get("metadata", {})), "spec": copy.deepcopy(template["spec"])}
    name = f"{cluster.name}-{group['groupName']}"[:50].lower() + f"-worker-{_suffix()}"
    pod["metadata"].update(name=name, namespace=cluster.namespace)
    container = pod["spec"]["containers"][RAY_CONTAINER]
    pod["spec"].setdefault("initContainers", []).append(_wait_gcs_ready(cluster, container, head_port))
    pod["metadata"]["labels"] = _labels(cluster, "worker", group["groupName"], pod["metadata"].get("labels", {}))
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    _missing_start_params(params, "worker", head_port, cluster.head_fqdn)
    _metrics_port(container)
    _token_auth_env(cluster, container)
    for init in pod["spec"]["initContainers"]:
        if init["name"] == "wait-gcs-ready":
            _token_auth_env(cluster, init)
    _finish_pod(cluster, pod, "worker", params, head_port, spec)
    return RayPod(name, group["groupName"], "worker", pod, params)


def _wait_gcs_ready(cluster: RayCluster, ray_container: dict, head_port: str) -> dict:
    address = f"{cluster.head_fqdn}:{head_port}"
    script = f"""
SECONDS=0
while true; do
  if (( SECONDS <= 120 )); then
    if ray health-check --address {address} > /dev/null 2>&1; then
      echo "GCS is ready."
      break
    fi
    echo "$SECONDS seconds elapsed: Waiting for GCS to be ready."
  else
    if ray health-check --address {address}; then
      echo "GCS is ready. Any error messages above can be safely ignored."
      break
    fi
    echo "$SECONDS seconds elapsed: Still waiting for GCS to be ready."
  fi
  sleep 5
done
"""
    return {
        "name": "wait-gcs-ready", "image": ray_container["image"],
        "imagePullPolicy": ray_container.get("imagePullPolicy", "IfNotPresent"),
        "command": list(CONTAINER_COMMAND), "args": [script],
        "securityContext": copy.deepcopy(ray_container.get("securityContext")),
        "env": copy.deepcopy(ray_container.get("env", [])),
        "volumeMounts": copy.deepcopy(ray_container.get("volumeMounts", [])),
        "resources": {"limits": {"cpu": "200m", "memory": "256Mi"}, "requests": {"cpu": "200m", "memory": "256Mi"}},
    }


def _metrics_port(container: dict) -> None:
    ports = container.setdefault("ports", [])
    if not any(p.get("name") == "metrics" for p in ports):
        ports.append({"name": "metrics", "containerPort": METRICS_PORT})


def _finish_pod(cluster: RayCluster, pod: dict, node_type: str, params: dict[str, str], head_port: str, spec: dict) -> None:
    """BuildPod: /dev/shm, the generated command, the environment and the probes."""
    container = pod["spec"]["containers"][RAY_CONTAINER]
    if "plasma-directory" not in params:
        _add_empty_dir(pod, container, "shared-mem", "/dev/shm", "Memory")
    _resource_start_params(params, container.get("resources", {}))
    ray_start = ("ray start --head " if node_type == "head" else "ray start ") + ray_start_flags(params)
    _ray_command(container, ray_start)
    for init in pod["spec"].get("initContainers", []):
        _set_env(init, "FQ_RAY_IP", cluster.head_fqdn, only_if_missing=False)
        _set_env(init, "RAY_IP", cluster.head_fqdn.split(".")[0], only_if_missing=False)
    _ray_env(container, cluster, node_type, head_port, ray_start)
    _probes(container, node_type, params, _ray_version(spec))


# --- the RayService controller's dashboard calls ------------------------------------------------------------------

class DashboardError(RuntimeError):
    pass


@dataclass
class Dashboard:
    """The head's dashboard as the RayService controller calls it."""

    url: str  # http://<head>:8265
    token: str | None
    timeout_s: float = 10.0

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("x-ray-authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.read()
        except urllib.error.HTTPError as error:
            raise DashboardError(f"{method} {path}: HTTP {error.code} {error.read()[:500]!r}") from None
        except OSError as error:
            raise DashboardError(f"{method} {path}: {error}") from None

    def submit(self, config_json: bytes) -> None:
        """UpdateDeployments: PUT the whole Serve config."""
        self._request("PUT", "/api/serve/applications/", config_json)

    def serve_details(self) -> dict:
        """GetServeDetails: the declarative applications, their deployments and replicas."""
        return json.loads(self._request("GET", "/api/serve/applications/?api_type=declarative"))

    def applications(self) -> dict[str, dict]:
        return self.serve_details().get("applications") or {}


def all_running(applications: dict[str, dict]) -> bool:
    """getAndCheckServeStatus: ready when there is an application and every one is RUNNING."""
    return bool(applications) and all(app.get("status") == "RUNNING" for app in applications.values())


# --- where the chart's resources let a replica run ----------------------------------------------------------------

def _selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector: `value`, `!value`, `in(a,b)`, `!in(a,b)`."""
    for key, wanted in selector.items():
        negated, wanted = wanted.startswith("!"), wanted.lstrip("!")
        choices = [c.strip() for c in wanted[3:-1].split(",")] if wanted.startswith("in(") else [wanted]
        if (labels.get(key) in choices) == negated:
            return False
    return True


def hosts_for(actor_options: dict, pods: list[RayPod]) -> list[str]:
    """The node groups whose nodes could host a replica with these ray_actor_options: enough of every resource it
    asks for (CPU and GPU included), and labels its label_selector accepts."""
    wanted = {"CPU": actor_options.get("num_cpus", 1) or 0, "GPU": actor_options.get("num_gpus", 0) or 0,
              **(actor_options.get("resources") or {})}
    groups = []
    for pod in pods:
        offered = pod.ray_resources()
        if all(offered.get(name, 0) >= amount for name, amount in wanted.items() if amount) and _selector_matches(
                actor_options.get("label_selector") or {}, pod.ray_labels()):
            if pod.group not in groups:
                groups.append(pod.group)
    return groups
