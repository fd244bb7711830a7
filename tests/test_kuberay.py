"""The KubeRay mirror (tools/kuberay.py) and the kubelet's part of `make chart-test` (tools/chart_test.py)
on small hand-made specs: no podman, no cluster. What the chart renders, built into pods, is in tests/test_helm.py."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from tools import kuberay
from tools.chart_test import Node, expand, resolve_env, run_argv
from tools.kuberay import NotEmulated, build_cluster, hosts_for, quantity, quantity_value, ray_start_flags


def rayservice(**cluster) -> dict:
    container = {"name": "ray-head", "image": "img:1", "env": [{"name": "A", "value": "1"}],
                 "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}}}
    worker = {"name": "ray-worker", "image": "img:1", "resources": {"requests": {"cpu": "3"}, "limits": {"nvidia.com/gpu": 2}}}
    spec = {
        "rayVersion": "2.60.0",
        "authOptions": {"mode": "token", "secretName": "tok"},
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {"rayStartParams": {}, "template": {"metadata": {"labels": {"app": "x"}},
                                                             "spec": {"containers": [container]}}},
        "workerGroupSpecs": [{"groupName": "gpu", "replicas": 3, "minReplicas": 1, "maxReplicas": 2,
                              "rayStartParams": {"num-gpus": "1"},
                              "template": {"spec": {"containers": [worker]}}}],
        **cluster,
    }
    return {"metadata": {"name": "svc"}, "spec": {"serveConfigV2": "applications: []\n", "rayClusterConfig": spec}}


def test_quantities_are_read_as_kubernetes_writes_them():
    assert quantity("500m") == Fraction(1, 2) and quantity("6Gi") == 6 * 2**30 and quantity("1e3") == 1000
    assert quantity_value("1500m") == 2 and quantity_value("100m") == 1  # rounded up, as Quantity.Value()
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity("2 cores")


def test_start_flags_are_sorted_with_bare_booleans():
    flags = ray_start_flags({"num-cpus": "2", "block": "true", "disable-usage-stats": "false", "include-dashboard": "false"})
    assert flags == " --block  --include-dashboard=false  --num-cpus=2 "


def test_head_and_worker_commands_environment_and_replicas():
    cluster = build_cluster(rayservice(), "ns")
    head, workers = cluster.head, cluster.workers
    assert len(workers) == 2  # replicas 3, clamped to maxReplicas
    assert head.ray_container["command"] == ["/bin/bash", "-c", "--"]
    assert head.ray_container["args"] == [
        "ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --head  --block  --dashboard-agent-listen-port=52365 "
        " --dashboard-host=0.0.0.0  --memory=2147483648  --metrics-export-port=8080  --no-monitor  --num-cpus=2 "]
    worker_args = workers[0].ray_container["args"][0]
    assert f"--address={cluster.name}-head-svc.ns.svc.cluster.local:6379 " in worker_args
    assert "--num-cpus=3 " in worker_args and "--num-gpus=1 " in worker_args  # the request; the param kept
    names = [e["name"] for e in head.ray_container["env"]]
    assert names[:3] == ["A", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"]  # the template's first, then KubeRay's
    env = {e["name"]: e for e in head.ray_container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tok", "key": "auth_token"}}
    assert env["RAY_ADDRESS"]["value"] == "127.0.0.1:6379"
    assert env["RAY_timeout_ms_task_wait_for_death_info"]["value"] == "0"
    assert env["KUBERAY_GEN_RAY_START_CMD"]["value"] == head.ray_container["args"][0].split("; ", 1)[1]
    assert head.labels["ray.io/serve"] == "false" and workers[0].labels["ray.io/serve"] == "true"
    assert head.labels["app"] == "x" and workers[0].labels["ray.io/group"] == "gpu"
    assert [c["name"] for c in head.spec["spec"]["containers"]] == ["ray-head", "autoscaler"]
    mounts = {m["mountPath"] for m in head.ray_container["volumeMounts"]}
    assert {"/dev/shm", "/tmp/ray"} <= mounts


def test_probes_and_the_wait_gcs_ready_init_container():
    cluster = build_cluster(rayservice(), "ns")
    assert cluster.head.ray_container["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    worker = cluster.workers[0]
    readiness = worker.ray_container["readinessProbe"]
    assert "-/healthz" in readiness["exec"]["command"][2] and readiness["failureThreshold"] == 1  # a serving worker
    (init,) = worker.spec["spec"]["initContainers"]
    assert init["name"] == "wait-gcs-ready" and "ray health-check --address" in init["args"][0]
    assert [e["name"] for e in init["env"]] == ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "FQ_RAY_IP", "RAY_IP"]
    old = build_cluster(rayservice(rayVersion="2.46.0"), "ns").head.ray_container["readinessProbe"]
    assert "api/gcs_healthz" in old["exec"]["command"][2]  # before Ray 2.53: wget both endpoints


def test_what_is_not_mirrored_is_refused():
    with pytest.raises(NotEmulated, match="GCS fault tolerance"):
        build_cluster(rayservice(gcsFaultToleranceOptions={"redisAddress": "r:6379"}), "ns")
    with pytest.raises(NotEmulated, match="autoscaler v2"):
        build_cluster(rayservice(autoscalerOptions={"version": "v2"}), "ns")


def test_placement_follows_resources_and_label_selectors():
    cluster = build_cluster(rayservice(), "ns")
    pods = [cluster.head, *cluster.workers]
    assert hosts_for({"num_cpus": 1, "num_gpus": 1}, pods) == ["gpu"]
    assert hosts_for({"num_cpus": 1}, pods) == ["headgroup", "gpu"]
    assert hosts_for({"num_cpus": 1, "label_selector": {"ray.io/node-group": "headgroup"}}, pods) == ["headgroup"]
    assert hosts_for({"num_cpus": 1, "label_selector": {"ray.io/node-group": "!headgroup"}}, pods) == ["gpu"]
    assert hosts_for({"num_cpus": 1, "label_selector": {"ray.io/node-group": "in(cpu,gpu)"}}, pods) == ["gpu"]
    assert hosts_for({"num_cpus": 8}, pods) == []


def test_environment_is_expanded_as_the_kubelet_does():
    env = {"A": "x"}
    assert expand("$(A)-$(B)-$$(A)-$A-$(", env) == "x-$(B)-$(A)-$A-$("
    spec = {"env": [
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
        {"name": "URL", "value": "redis://:$(PW)@h/$(LATER)"},
        {"name": "LATER", "value": "0"},
        {"name": "GROUP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "s", "key": "none", "optional": True}}},
    ]}
    metadata = {"name": "p-1", "namespace": "ns", "labels": {"ray.io/group": "cpu"}}
    assert resolve_env(spec, metadata, {"s": {"pw": "sec"}}) == {
        "PW": "sec", "URL": "redis://:sec@h/$(LATER)", "LATER": "0", "GROUP": "cpu", "POD": "p-1"}
    with pytest.raises(KeyError, match="Secret s has no key pw"):
        resolve_env(spec, metadata, {"s": {}})


def test_a_pod_becomes_the_podman_run_its_spec_says(tmp_path):
    cluster = build_cluster(rayservice(), "ns")
    pod = cluster.head.spec
    pod["spec"]["securityContext"] = {"runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100}
    container = pod["spec"]["containers"][0]
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    node = Node(None, tmp_path, "net", {"redis.ns.svc": "10.0.0.9"})
    argv = run_argv(node, pod, container, {"tok": {"auth_token": "t0k"}}, tmp_path, name="head")
    joined = " ".join(argv)
    for part in ("--hostname " + pod["metadata"]["name"], "--network net", "--add-host=redis.ns.svc:10.0.0.9",
                 "--user 1000:100", "--group-add 100", "--security-opt no-new-privileges", "--cap-drop=all",
                 "--memory=2147483648", "--shm-size=2147483648", "--env RAY_AUTH_TOKEN=t0k",
                 "--env RAY_NODE_TYPE_NAME=headgroup", '--entrypoint ["/bin/bash", "-c", "--"]'):
        assert part in joined, part
    assert argv[-2:] == ["img:1", container["args"][0]]
    logs = Path(next(a.split(":")[0] for a in argv if a.endswith(":/tmp/ray")))
    assert logs.stat().st_mode & 0o777 == 0o777  # an emptyDir anyone in the pod may write
    assert kuberay.all_running({"a": {"status": "RUNNING"}}) and not kuberay.all_running({})
