"""infra/ and prefect.yaml stay consistent with the code, params.yaml and the installed versions."""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import version

import yaml
from helpers import ROOT

from tasks.project.config import load_params

INFRA = ROOT / "infra"


def _overrides(cmd: str) -> list[str]:
    return [o.strip("\"'") for o in re.findall(r"-S\s+(\S+)", cmd)]


def test_prefect_deployments_point_at_real_flows():
    from prefect import Flow

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert doc["prefect-version"] == version("prefect")
    assert {d["name"] for d in doc["deployments"]} >= {"retrain-nightly", "transfer-pipeline"}
    for dep in doc["deployments"]:
        path, fn = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file(), path
        flow = getattr(importlib.import_module(path[:-3].replace("/", ".")), fn)
        assert isinstance(flow, Flow)
        assert set(dep.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters)
        for s in dep.get("schedules", []):
            assert len(s["cron"].split()) == 5


def test_ray_manifests_match_params_and_versions():
    cluster = yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())
    launcher = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    ray_version = version("ray")
    assert cluster["spec"]["rayVersion"] == ray_version == job["spec"]["rayClusterSpec"]["rayVersion"]
    entry = job["spec"]["entrypoint"]
    assert "tl run" in entry
    overrides = _overrides(entry)
    params = load_params(ROOT / "params.yaml", overrides)  # every key in the manifest is a real, valid param
    assert params.ray.use_gpu and params.ray.storage_path.startswith("s3://")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        workers = spec["workerGroupSpecs"][0]
        gpus = int(workers["rayStartParams"]["num-gpus"])
        limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == gpus >= params.ray.gpus_per_worker
        assert float(limits["cpu"]) >= params.ray.cpus_per_worker
        assert workers["replicas"] >= params.ray.num_workers or workers.get("maxReplicas", 0) >= params.ray.num_workers
    gpu_node = launcher["available_node_types"]["gpu_worker"]["resources"]
    assert gpu_node["GPU"] >= 1 and gpu_node["CPU"] >= params.ray.cpus_per_worker


def test_documented_submit_commands_are_valid():
    import typer

    from tasks.cli.main import app

    submit = typer.main.get_command(app).commands["submit"]
    options = {o for p in submit.params for o in p.opts}
    text = (INFRA / "README.md").read_text() + (INFRA / "cluster.yaml").read_text() + (ROOT / "README.md").read_text()
    cmds = re.findall(r"tl submit[^`\n]*(?:\n\s+-S[^`\n]*)*", text)
    assert cmds
    for cmd in cmds:
        load_params(ROOT / "params.yaml", [o for o in _overrides(cmd) if "..." not in o and o != "key=value"])
        assert set(re.findall(r"(?<!\S)--?[a-zA-Z][\w-]*", cmd.split("#")[0])) <= options, cmd


def test_dockerfile_and_compose_consistent():
    docker = (INFRA / "Dockerfile").read_text()
    for line in docker.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert "requirements.lock" in docker and "tl" in docker
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    svc = compose["services"]
    assert svc["prefect"]["image"].split(":")[1].startswith(version("prefect"))
    assert svc["mlflow"]["image"].endswith("v" + version("mlflow-skinny"))
    assert {"prefect", "postgres", "mlflow", "minio", "ray-head", "worker"} <= set(svc)


def test_compose_kuberay_and_local_stack_share_env_names_images_and_credentials():
    """One env file (infra/stack.env) for `tl stack up`, compose and the KubeRay secret: every variable compose
    interpolates is in it, the services that hold credentials read it, the object store's keys are its AWS keys,
    the buckets are its buckets; the Ray pods run the same image in compose and KubeRay, and get the addresses
    under the names `tl stack env` exports and the credentials from the secret made from that file."""
    from tasks.project.env import read_env_file
    from tasks.services.stack import client_env, settings

    env_file = INFRA / "stack.env"
    keys = set(read_env_file(env_file))
    local = settings(env_file)
    assert set(local) == keys and set(client_env(local)) >= {
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
    }
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"\$\$(\w+)", text))
    assert used and used <= keys, used - keys
    svc = yaml.safe_load(text)["services"]
    for name in ("minio", "buckets", "mlflow", "ray-head", "worker"):
        assert svc[name]["env_file"] == "stack.env", name
    assert svc["minio"]["environment"] == {
        "MINIO_ROOT_USER": "${AWS_ACCESS_KEY_ID}",
        "MINIO_ROOT_PASSWORD": "${AWS_SECRET_ACCESS_KEY}",
    }
    assert "$$DVC_BUCKET" in svc["buckets"]["entrypoint"] and "$$RAY_BUCKET" in svc["buckets"]["entrypoint"]
    addresses = set(client_env(local)) - {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "TL_RAY_ADDRESS",
        "RAY_AUTH_MODE",
    }
    assert addresses <= set(svc["ray-head"]["environment"]) and addresses <= set(svc["worker"]["environment"])
    images = {svc["ray-head"]["image"], svc["worker"]["image"]}
    for f in ("raycluster.yaml", "rayjob.yaml"):
        raw = (INFRA / "k8s" / f).read_text()
        assert "--from-env-file=infra/stack.env" in raw, f
        doc = yaml.safe_load(raw)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                images.add(c["image"])
                assert c["envFrom"] == [{"secretRef": {"name": "transfer-pipeline-env"}}], f
                assert addresses <= {e["name"] for e in c["env"]}, f
                assert not keys & {e["name"] for e in c["env"]}  # credentials never inline
    assert images == {"transfer-pipeline:latest"}


def test_image_python_matches_the_lock_and_cuda_comes_once():
    """The image's Python is the one requirements.lock was resolved with (the Makefile's), its base brings
    no second CUDA (the torch wheels' nvidia-* packages do), and the driver the wheels need is documented."""
    docker = (INFRA / "Dockerfile").read_text()
    base = next(line.split()[1] for line in docker.splitlines() if line.startswith("FROM "))
    makefile_python = re.search(r"^PYTHON \?= python(\d+\.\d+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert re.fullmatch(rf"python:{re.escape(makefile_python)}(-[\w.-]+)?", base), (base, makefile_python)
    lock = (ROOT / "requirements.lock").read_text()
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.", lock, re.M)
    assert runtime and "nvidia/cuda" not in base  # the wheels bring CUDA; a CUDA base would be a second copy
    cuda_major = int(runtime[1])
    min_driver = {12: 525, 13: 580}[cuda_major]
    readme = (INFRA / "README.md").read_text()
    assert f"CUDA {cuda_major}" in readme and f"driver {min_driver} or newer" in readme
