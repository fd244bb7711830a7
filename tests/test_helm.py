"""The Helm chart (helm/chroma-serve): lint and offline render with the real Helm v4 library (helm-python-sdk), and
every rendered object validated: Kubernetes' own kinds with kubernetes-validate (strict: unknown fields are errors),
the RayService against KubeRay v1.7.0's CRD schema (tests/fixtures/kuberay).

No cluster and no helm binary are involved: `helm_python` binds to Helm's Go SDK through a shared library.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tools.kuberay import build_cluster, hosts_for
from cluster.local.supervisor import merge_args

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")

CHART = Path(__file__).resolve().parents[1] / "helm" / "chroma-serve"
CPU_DEV = yaml.safe_load((CHART / "values-cpu-dev.yaml").read_text())
RELEASE, NAMESPACE = "chroma", "voice"
REDIS_HOST_PORT = f"{RELEASE}-chroma-serve-redis.{NAMESPACE}.svc:6379"
KUBERAY_CRD = Path(__file__).resolve().parent / "fixtures" / "kuberay" / "ray.io_rayservices.yaml"
KUBERNETES_VERSION = "1.30.0"  # within the chart's kubeVersion (>= 1.25)


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


class Rendered:
    def __init__(self, manifests: dict[str, str]):
        self.text = {path: text for path, text in manifests.items() if not path.endswith("NOTES.txt")}
        self.notes = next((text for path, text in manifests.items() if path.endswith("NOTES.txt")), "")
        self.objects = [doc for text in self.text.values() for doc in yaml.safe_load_all(text) if doc]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [o for o in self.all(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def rayservice(self) -> dict:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def app(self) -> dict:
        apps = self.serve_config["applications"]
        assert [a["name"] for a in apps] == ["chroma"]
        return apps[0]

    @property
    def deployments(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.app["deployments"]}

    def ray_containers(self) -> list[dict]:
        cluster = self.rayservice["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
        return [c for pod in pods for c in pod["spec"]["containers"]]

    def ray_pod_specs(self) -> list[dict]:
        cluster = self.rayservice["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]


def render(chart, values: dict | None = None) -> Rendered:
    return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE))


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


# --- lint --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, CPU_DEV], ids=["default", "cpu-dev"])
def test_lint_passes(values):
    report = helm.lint(CHART, values, namespace=NAMESPACE, strict=True)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors; info is fine
    assert problems == [], problems


# --- default (GPU) values ----------------------------------------------------------------------------------------

def test_default_render_rayservice_and_serve_config(chart):
    r = render(chart)
    rs = r.rayservice
    assert rs["apiVersion"] == "ray.io/v1"
    labels = rs["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["helm.sh/chart"] == "chroma-serve-0.1.0"

    app = r.app
    assert app["import_path"] == "deployments.app:build_app"
    assert app["args"]["checkpoint"]["path"] == "/models/Chroma-4B"
    assert app["args"]["state"]["redis_url"] == f"redis://{REDIS_HOST_PORT}/0"  # no password in the CR
    assert app["args"]["tenants"]["api_keys"] == "/etc/chroma-serve/api-keys/api-keys.json"
    assert r.serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}

    deps = r.deployments
    assert set(deps) == {"Reasoner", "SpeechStack", "Codec", "Ingress"}
    reasoner = deps["Reasoner"]
    assert reasoner["num_replicas"] == 1 and "autoscaling_config" not in reasoner
    assert reasoner["ray_actor_options"]["num_gpus"] == 1
    for name in ("SpeechStack", "Codec", "Ingress"):
        ac = deps[name]["autoscaling_config"]
        assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(ac), name
        assert 0 <= ac["min_replicas"] <= ac["max_replicas"], name
        assert "num_replicas" not in deps[name]
    # fractional GPUs: SpeechStack and Codec fit on one GPU together; Ingress is CPU only
    speech_gpus = deps["SpeechStack"]["ray_actor_options"]["num_gpus"]
    codec_gpus = deps["Codec"]["ray_actor_options"]["num_gpus"]
    assert 0 < speech_gpus < 1 and 0 < codec_gpus < 1 and speech_gpus + codec_gpus <= 1
    assert deps["Ingress"]["ray_actor_options"]["num_gpus"] == 0


def test_default_render_ray_cluster(chart):
    r = render(chart)
    cluster = r.rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    assert "gcsFaultToleranceOptions" not in cluster

    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "serve": 8000}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    groups = cluster["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu"]
    gpu = groups[0]
    assert gpu["minReplicas"] == 1 and gpu["maxReplicas"] == 4
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])

    for container in r.ray_containers():
        env = env_of(container)
        assert env["CHROMA_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "api-keys.json"
        assert env["REDIS_URL"]["value"] == f"redis://:$(CHROMA_REDIS_PASSWORD)@{REDIS_HOST_PORT}/0"
        assert env["CHROMA_REDIS_URL"]["value"] == "$(REDIS_URL)"
        assert "REDIS_PASSWORD" not in env  # KubeRay reserves it on the head when GCS FT is on
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["checkpoint"]["mountPath"] == "/models" and mounts["checkpoint"]["readOnly"] is True
    for spec in r.ray_pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoint"]["persistentVolumeClaim"] == {"claimName": "chroma-checkpoint", "readOnly": True}


def test_default_render_redis_and_services(chart):
    r = render(chart)
    sts = r.one("StatefulSet", "-redis")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    i = args.index("--appendonly")
    assert args[i + 1] == "yes"
    assert "--requirepass" in args
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert r.one("Service", "-redis")["spec"]["ports"][0]["port"] == 6379

    password_secret = r.one("Secret", "-redis")
    assert password_secret["data"]["redis-password"]  # generated when none is given
    api_keys = r.one("Secret", "-api-keys")
    assert yaml.safe_load(api_keys["stringData"]["api-keys.json"]) == {}

    serve_svc = r.one("Service", "-serve")
    assert serve_svc["spec"]["ports"][0]["port"] == 8000
    assert serve_svc["spec"]["selector"]["ray.io/serve"] == "true"
    assert r.all("Ingress") == []  # disabled by default
    assert "port-forward" in r.notes


def test_redis_without_persistence_uses_emptydir(chart):
    sts = render(chart, {"redis": {"persistence": {"enabled": False}}}).one("StatefulSet", "-redis")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert sts["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_ingress_resource_when_enabled(chart):
    r = render(chart, {"ingress": {"enabled": True, "className": "nginx",
                                   "hosts": [{"host": "voice.example.org", "paths": [{"path": "/"}]}]}})
    ingress = r.one("Ingress")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "voice.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == f"{RELEASE}-chroma-serve-serve"
    assert "voice.example.org" in r.notes


@pytest.mark.parametrize("values", [None, CPU_DEV], ids=["default", "cpu-dev"])
def test_rendered_app_args_are_a_valid_app_config(chart, values):
    from cluster.settings import AppConfig

    config = AppConfig.model_validate(render(chart, values).app["args"])
    assert config.checkpoint.device == ("cpu" if values else "cuda")
    assert config.state.redis_url_env == "CHROMA_REDIS_URL"


# --- CPU-dev profile ---------------------------------------------------------------------------------------------

def test_cpu_dev_has_no_gpus(chart):
    r = render(chart, CPU_DEV)
    assert all("nvidia.com/gpu" not in text for text in r.text.values())
    assert all(d["ray_actor_options"]["num_gpus"] == 0 for d in r.deployments.values())
    assert r.app["args"]["checkpoint"]["path"] == "/models/tiny-seed0"
    cluster = r.rayservice["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]
    assert "num-cpus" not in cluster["headGroupSpec"]["rayStartParams"]  # the head hosts replicas here
    for spec in r.ray_pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoint"]["hostPath"]["path"] == "/var/lib/chroma-serve"
    assert yaml.safe_load(r.one("Secret", "-api-keys")["stringData"]["api-keys.json"]) == {"dev-key": "dev"}


# --- Redis options -----------------------------------------------------------------------------------------------

def test_fault_tolerance_uses_chart_redis(chart):
    r = render(chart, {"faultTolerance": {"enabled": True}})
    ft = r.rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == REDIS_HOST_PORT
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{RELEASE}-chroma-serve-redis", "key": "redis-password"}


def test_external_redis(chart):
    url = "redis://:s3cret@redis.prod.internal:6380/2"
    r = render(chart, {"redis": {"enabled": False, "externalUrl": url,
                                 "externalPasswordSecret": {"name": "ext-redis", "key": "pw"}},
                       "faultTolerance": {"enabled": True}})
    assert r.all("StatefulSet") == []
    assert not [o for o in r.objects if o["metadata"]["name"].endswith("-redis")]
    assert r.app["args"]["state"]["redis_url"] == "redis://redis.prod.internal:6380/2"  # credentials stay out of the CR
    for container in r.ray_containers():
        env = env_of(container)
        assert env["REDIS_URL"]["value"] == url
        assert "CHROMA_REDIS_PASSWORD" not in env
    ft = r.rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis.prod.internal:6380"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "ext-redis", "key": "pw"}


def test_external_redis_tls_address(chart):
    r = render(chart, {"redis": {"enabled": False, "externalUrl": "rediss://user:pw@cache.example:6380"},
                       "faultTolerance": {"enabled": True}})
    ft = r.rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "rediss://cache.example:6380"
    assert "redisPassword" not in ft  # no externalPasswordSecret given
    assert r.app["args"]["state"]["redis_url"] == "rediss://cache.example:6380"


def test_existing_secrets_are_used_not_created(chart):
    r = render(chart, {"apiKeys": {"existingSecret": "my-keys", "secretKey": "keys.json"},
                       "redis": {"auth": {"existingSecret": "my-redis", "passwordKey": "pw"}},
                       "rayAuth": {"existingSecret": "my-ray-token"}})
    assert r.all("Secret") == []
    assert r.rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "my-ray-token"}
    env = env_of(r.ray_containers()[0])
    assert env["CHROMA_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "keys.json"}
    assert env["CHROMA_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "pw"}
    assert r.app["args"]["tenants"]["api_keys"] == "/etc/chroma-serve/api-keys/keys.json"


# --- bad values fail clearly -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"serve": {"deployments": {"codec": {"autoscaling": {"maxReplicas": -1}}}}},
     "/serve/deployments/codec/autoscaling/maxReplicas"),
    ({"checkpoint": {"path": ""}}, "/checkpoint/path"),
    ({"redis": {"enabled": False}}, "/redis/externalUrl"),
    ({"serve": {"deployments": {"speechStack": {"numGpus": -0.5}}}}, "/serve/deployments/speechStack/numGpus"),
    ({"serve": {"deployments": {"codec": {"autoscaling": {"minReplicas": 9}}}}},
     "minReplicas (9) must not exceed maxReplicas (4)"),
    ({"gpuWorkers": {"minReplicas": 5, "maxReplicas": 2}}, "gpuWorkers: minReplicas (5) must not exceed maxReplicas (2)"),
    ({"gpuWorkers": {"enabled": False}}, "nothing could host the Serve replicas"),
    ({"redis": {"auth": {"password": "p@ss/word"}}}, "/redis/auth/password"),
    ({"image": {"device": "tpu"}}, "/image/device"),
    ({"probes": {"readiness": {"path": "readyz"}}}, "/probes/readiness/path"),
], ids=["negative-maxReplicas", "no-checkpoint", "redis-off-no-url", "negative-gpus", "codec-min-gt-max",
        "workers-min-gt-max", "no-capacity", "url-unsafe-password", "unknown-image-device", "relative-probe-path"])
def test_bad_values_fail_clearly(chart, values, message):
    with pytest.raises(helm.HelmError) as excinfo:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(excinfo.value)


def test_bad_values_fail_lint():
    report = helm.lint(CHART, {"checkpoint": {"path": ""}}, namespace=NAMESPACE)
    assert any(m["severity"] == 3 and "/checkpoint/path" in m["error"] for m in report["messages"])


def test_cpu_dev_overrides_compose(chart):
    r = render(chart, merge_args(CPU_DEV, {"faultTolerance": {"enabled": True}}))
    assert r.rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == REDIS_HOST_PORT
    assert all("nvidia.com/gpu" not in text for text in r.text.values())


# --- safe by default -------------------------------------------------------------------------------------------------

def test_ray_token_auth_is_on_with_a_chart_secret(chart):
    r = render(chart)
    auth = r.rayservice["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": f"{RELEASE}-chroma-serve-ray-auth"}
    secret = r.one("Secret", "-ray-auth")
    assert len(base64.b64decode(secret["data"]["auth_token"])) >= 32  # the key KubeRay reads
    assert "authOptions" not in render(chart, {"rayAuth": {"enabled": False}}).rayservice["spec"]["rayClusterConfig"]


def _policy_rules(policy: dict) -> list[dict]:
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy["spec"]["ingress"]


def test_network_policy_opens_only_the_serve_port_beyond_the_release(chart):
    r = render(chart)
    ray_pods = {"app.kubernetes.io/name": "chroma-serve", "app.kubernetes.io/instance": RELEASE}
    ray = r.one("NetworkPolicy", "-ray")
    selector = ray["spec"]["podSelector"]
    assert selector["matchLabels"] == ray_pods
    assert {"ray-head", "ray-worker-gpu"} <= set(selector["matchExpressions"][0]["values"])
    open_rules = [rule for rule in _policy_rules(ray) if "from" not in rule]
    assert open_rules == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]  # the only port open to anyone
    for rule in _policy_rules(ray):
        if "from" in rule and "ports" not in rule:  # every port: only the release's own Ray pods
            assert rule["from"] == [{"podSelector": selector}]
    operator = next(rule for rule in _policy_rules(ray) if "from" in rule and "ports" in rule)
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}

    redis = r.one("NetworkPolicy", "-redis")
    assert redis["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert _policy_rules(redis) == [{"from": [{"podSelector": selector}], "ports": [{"port": 6379, "protocol": "TCP"}]}]
    # the pods the policies select are the pods the chart makes
    cluster = r.rayservice["spec"]["rayClusterConfig"]
    components = [cluster["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] + [
        g["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for g in cluster["workerGroupSpecs"]]
    assert set(components) <= set(selector["matchExpressions"][0]["values"])
    assert r.one("StatefulSet", "-redis")["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"
    assert render(chart, {"networkPolicy": {"enabled": False}}).all("NetworkPolicy") == []


@pytest.mark.parametrize("values", [None, CPU_DEV], ids=["default", "cpu-dev"])
def test_pods_have_probes_resources_and_no_root(chart, values):
    r = render(chart, values)
    cluster = r.rayservice["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
        assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
        assert worker["startupProbe"]["httpGet"]["path"] == "/healthz"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head  # KubeRay's own: it deploys the app only once the head is ready
    pods = r.ray_pod_specs() + [r.one("StatefulSet", "-redis")["spec"]["template"]["spec"], r.one("Pod", "-test-turn")["spec"]]
    for spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"] + spec.get("initContainers", []):
            assert {"requests", "limits"} <= set(container["resources"]), container["name"]
            assert container["resources"]["limits"].get("memory"), container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_a_pod_disruption_budget_per_worker_group(chart):
    budgets = render(chart, {"cpuWorkers": {"enabled": True}}).all("PodDisruptionBudget")
    assert {b["metadata"]["name"]: b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for b in budgets} == {
        f"{RELEASE}-chroma-serve-gpu": "ray-worker-gpu", f"{RELEASE}-chroma-serve-cpu": "ray-worker-cpu"}
    assert all(b["spec"]["maxUnavailable"] == 1 for b in budgets)


def test_redis_always_has_a_password(chart):
    args = render(chart).one("StatefulSet", "-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    with pytest.raises(helm.HelmError, match="redis.externalUrl has no password"):
        chart.render({"redis": {"enabled": False, "externalUrl": "redis://cache:6379/0"}}, name=RELEASE, namespace=NAMESPACE)
    # an external Redis whose password is in a Secret: the chart puts it into the URL
    r = render(chart, {"redis": {"enabled": False, "externalUrl": "redis://cache:6379/0",
                                 "externalPasswordSecret": {"name": "cache-pw", "key": "password"}}})
    for container in r.ray_containers():
        env = env_of(container)
        assert env["CHROMA_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "cache-pw", "key": "password"}
        assert env["REDIS_URL"]["value"] == "redis://:$(CHROMA_REDIS_PASSWORD)@cache:6379/0"
    assert r.app["args"]["state"]["redis_url"] == "redis://cache:6379/0"


def test_helm_test_hook_answers_a_turn_against_the_service(chart):
    pod = render(chart, {"apiKeys": {"keys": {"k1": "ops"}}}).one("Pod", "-test-turn")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "chroma-serve:0.1.0-cuda"
    env = env_of(container)
    assert env["CHROMA_URL"]["value"] == f"http://{RELEASE}-chroma-serve-serve.{NAMESPACE}.svc:8000"
    assert env["KEYS_FILE"]["value"] == "/etc/chroma-serve/api-keys/api-keys.json"
    assert "exec chroma-serve demo --url \"$CHROMA_URL\"" in container["args"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == f"{RELEASE}-chroma-serve-api-keys"


def test_default_images_are_what_make_image_builds(chart):
    assert {c["image"] for c in render(chart).ray_containers()} == {"chroma-serve:0.1.0-cuda"}  # make image DEVICE=cuda
    assert {c["image"] for c in render(chart, CPU_DEV).ray_containers()} == {"chroma-serve:0.1.0"}  # make image
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'version = "{chart_yaml["appVersion"]}"' in project  # the Makefile tags images with the package version


# --- checkpoint delivery and observability -------------------------------------------------------------------------

def test_checkpoint_download_init_container_into_an_emptydir(chart):
    r = render(chart, {"checkpoint": {"existingClaim": "", "download": {"enabled": True, "tokenSecret": {"name": "hf"}}}})
    for spec in r.ray_pod_specs():
        (init,) = spec["initContainers"]
        assert init["command"] == ["hf", "download", "FlashLabs/Chroma-4B", "--revision", "main",
                                   "--local-dir", "/models/Chroma-4B"]
        assert env_of(init)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
        assert init["volumeMounts"] == [{"name": "checkpoint", "mountPath": "/models"}]  # writable here only
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoint"] == {"name": "checkpoint", "emptyDir": {"sizeLimit": "40Gi"}}
    for container in r.ray_containers():
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["checkpoint"] == {"name": "checkpoint", "mountPath": "/models", "readOnly": True}


def test_checkpoint_download_into_an_existing_claim(chart):
    r = render(chart, {"checkpoint": {"download": {"enabled": True}}})
    for spec in r.ray_pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoint"]["persistentVolumeClaim"] == {"claimName": "chroma-checkpoint", "readOnly": False}
        assert "env" in spec["initContainers"][0] and "HF_TOKEN" not in env_of(spec["initContainers"][0])
    with pytest.raises(helm.HelmError, match="must lie under checkpoint.mountPath"):
        chart.render({"checkpoint": {"path": "/data/c", "download": {"enabled": True}}}, name=RELEASE, namespace=NAMESPACE)


def test_observability_options(chart):
    r = render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                   "scrapeAnnotations": True, "grafanaDashboard": {"enabled": True}}})
    monitor = r.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    service = r.one("Service", "-serve")
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                                                  "prometheus.io/path": "/metrics"}
    dashboard = json.loads(r.one("ConfigMap", "-dashboard")["data"]["chroma-serve.json"])
    assert dashboard["uid"] == "chroma-serve" and dashboard["panels"]
    assert render(chart).all("ServiceMonitor") == [] and render(chart).all("ConfigMap") == []


# --- the pods KubeRay builds from it (tools/kuberay.py mirrors KubeRay v1.7.0; `make chart-test` runs them) ---

def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        present, value = expression["key"] in labels, labels.get(expression["key"])
        operator = expression["operator"]
        if (operator == "In" and value not in expression["values"]) or (operator == "NotIn" and value in expression["values"]) \
                or (operator == "Exists" and not present) or (operator == "DoesNotExist" and present):
            return False
    return True


def test_cpu_dev_runs_the_ingress_on_the_head_and_the_stages_on_a_worker(chart):
    r = render(chart, CPU_DEV)
    cluster = build_cluster(r.rayservice, NAMESPACE)
    assert [w.group for w in cluster.workers] == ["cpu"]  # a worker at install, not only once the head is full
    pods = [cluster.head, *cluster.workers]
    where = {name: hosts_for(d["ray_actor_options"], pods) for name, d in r.deployments.items()}
    assert where == {"Ingress": ["headgroup"], "Reasoner": ["cpu"], "SpeechStack": ["cpu"], "Codec": ["cpu"]}


def test_default_values_run_every_replica_on_the_gpu_workers(chart):
    r = render(chart)
    cluster = build_cluster(r.rayservice, NAMESPACE)
    assert cluster.head.ray_start_params["num-cpus"] == "0" and cluster.workers[0].ray_start_params["num-gpus"] == "1"
    pods = [cluster.head, *cluster.workers]
    assert {name: hosts_for(d["ray_actor_options"], pods) for name, d in r.deployments.items()} == {
        "Reasoner": ["gpu"], "SpeechStack": ["gpu"], "Codec": ["gpu"], "Ingress": ["gpu"]}


def test_a_label_selector_reaches_ray_actor_options(chart):
    r = render(chart, {"serve": {"deployments": {"codec": {"labelSelector": {"ray.io/node-group": "gpu"}}}}})
    assert r.deployments["Codec"]["ray_actor_options"]["label_selector"] == {"ray.io/node-group": "gpu"}
    assert "label_selector" not in r.deployments["Reasoner"]["ray_actor_options"]


def test_the_chart_selects_the_pods_kuberay_builds(chart):
    r = render(chart, CPU_DEV)
    cluster = build_cluster(r.rayservice, NAMESPACE)
    pods = [cluster.head, *cluster.workers]
    policy = r.one("NetworkPolicy", "-ray")["spec"]["podSelector"]
    assert all(_selects(policy, pod.labels) for pod in pods)
    serve = r.one("Service", "-serve")["spec"]["selector"]
    # workers serve once ready; KubeRay turns the head's ray.io/serve label on after checking its proxy
    assert [pod.group for pod in pods if _selects({"matchLabels": serve}, pod.labels)] == ["cpu"]


def test_the_cpu_worker_holds_its_stages_and_the_kv_cache(chart):
    """vLLM on CPU takes its KV cache out of the container's memory limit and refuses to start when less is left:
    the worker's limit covers the stages (3.5 GB in `make chart-test`) and the cache."""
    r = render(chart, CPU_DEV)
    worker = build_cluster(r.rayservice, NAMESPACE).workers[0]
    limit = int(worker.ray_start_params["memory"])  # KubeRay passes the limit on to Ray
    kv_cache = r.app["args"]["reasoner"]["vllm"]["cpu_kvcache_gib"] * 2**30
    assert limit - kv_cache >= 3.5e9 * 1.25  # a quarter of headroom over what the stages were seen to use


# --- every rendered object validates -------------------------------------------------------------------------------

def _strict(schema):
    """The CRD schema with unknown fields refused wherever it lists the fields, as `kubectl apply` (field validation
    Strict) refuses them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    crd = yaml.safe_load(KUBERAY_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


EVERYTHING_ON = {
    "checkpoint": {"download": {"enabled": True, "tokenSecret": {"name": "hf"}}},
    "faultTolerance": {"enabled": True}, "cpuWorkers": {"enabled": True},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["chroma.example.com"], "secretName": "tls"}]},
    "metrics": {"scrapeAnnotations": True, "grafanaDashboard": {"enabled": True}},
    "networkPolicy": {"extraIngress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 8080}]}]},
    "apiKeys": {"keys": {"k": "t"}},
}


@pytest.mark.parametrize("values", [None, CPU_DEV, EVERYTHING_ON], ids=["default", "cpu-dev", "everything-on"])
def test_every_rendered_object_validates(chart, rayservice_validator, values):
    objects = render(chart, values).objects
    kinds = [o["kind"] for o in objects]
    assert kinds.count("RayService") == 1
    for obj in objects:
        if obj["kind"] == "RayService":
            errors = sorted(rayservice_validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
        else:  # strict: a misspelt or misplaced field fails here rather than being dropped by the API server
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validators_refuse_what_the_api_server_would(chart, rayservice_validator):
    r = render(chart)
    bad_rayservice = copy.deepcopy(r.rayservice)
    bad_rayservice["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
    bad_rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartparams"] = {}
    messages = [e.message for e in rayservice_validator.iter_errors(bad_rayservice)]
    assert any("'password' is not one of" in m for m in messages)
    assert any("rayStartparams" in m for m in messages)
    bad_policy = copy.deepcopy(r.one("NetworkPolicy", "-ray"))
    bad_policy["spec"]["ingress"][0]["port"] = 8000  # misplaced: belongs in ports
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_policy, KUBERNETES_VERSION, strict=True)
