"""The Kubernetes work-pool base job template for Grove's GPU stage groups
(deploy/kubernetes/gpu-job-template.json), checked by Prefect's own tooling: `prefect work-pool
create --type kubernetes --base-job-template` against the session's server, and the
prefect-kubernetes worker's job configuration rendering the Job a flow run would get."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from conftest import ROOT
from prefect_http import prefect_http

TEMPLATE = ROOT / "deploy" / "kubernetes" / "gpu-job-template.json"
MULTINODE = ROOT / "deploy" / "kubernetes" / "gpu-multinode-job-template.json"


@pytest.mark.parametrize("template", [TEMPLATE, MULTINODE], ids=["one-node", "multi-node"])
def test_prefect_creates_a_kubernetes_pool_from_the_template(prefect_api, template):
    name = f"k8s-gpu-{uuid.uuid4().hex[:6]}"
    created = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "work-pool", "create", name, "--type",
                              "kubernetes", "--base-job-template", str(template)], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    pool = prefect_http.get(f"{prefect_api}/work_pools/{name}", timeout=30).json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(template.read_text())


def test_a_bad_template_is_refused_by_prefect(prefect_api, tmp_path):
    """A placeholder with no variable behind it: Prefect's validation names it."""
    template = json.loads(TEMPLATE.read_text())
    del template["variables"]["properties"]["shm_size"]
    (tmp_path / "bad.json").write_text(json.dumps(template))
    created = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "work-pool", "create",
                              f"k8s-bad-{uuid.uuid4().hex[:6]}", "--type", "kubernetes", "--base-job-template",
                              str(tmp_path / "bad.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert created.returncode != 0 and "shm_size" in created.stdout + created.stderr, created.stdout + created.stderr


def test_the_kubernetes_worker_renders_a_gpu_job_with_shared_memory_and_the_s3_secret():
    import prefect_kubernetes.worker as worker  # a test dependency (pyproject: test extra)
    from prefect.client.schemas.objects import FlowRun

    template = json.loads(TEMPLATE.read_text())
    config = asyncio.run(worker.KubernetesWorkerJobConfiguration.from_template_and_values(
        template, {"image": "registry.example/grove:cuda", "gpus": 2, "shm_size": "32Gi",
                   "node_selector": {"pool": "h200"}, "s3_secret": "team-s3"}))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="tiny: train on gpu"))
    pod = config.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "registry.example/grove:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"pool": "h200"} and pod["restartPolicy"] == "Never"
    assert container["args"][:3] == ["prefect", "flow-run", "execute"], "the worker's own flow-run command"
    assert any(variable["name"] == "PREFECT__FLOW_RUN_ID" for variable in container["env"])


def test_the_multi_node_template_renders_an_indexed_job_whose_first_pod_runs_the_flow():
    import prefect_kubernetes.worker as worker  # a test dependency (pyproject: test extra)
    from prefect.client.schemas.objects import FlowRun

    template = json.loads(MULTINODE.read_text())
    config = asyncio.run(worker.KubernetesWorkerJobConfiguration.from_template_and_values(
        template, {"image": "registry.example/grove:cuda", "nodes": 3,
                   "env": {"GROVE_ARTIFACT_ROOT": "s3://team/grove", "GROVE_TRAIN_RDZV_ID": "nightly"}}))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="tiny: train on gpu"))
    job = config.job_manifest["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 3
    [container] = job["template"]["spec"]["containers"]
    [script] = container["args"]
    assert container["command"] == ["/bin/sh", "-c"]
    assert 'then exec prefect flow-run execute;' in script
    assert 'else exec python -m tasks.train.follower --store "$GROVE_ARTIFACT_ROOT"' in script
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env["GROVE_ARTIFACT_ROOT"] == "s3://team/grove" and "PREFECT__FLOW_RUN_ID" in env
