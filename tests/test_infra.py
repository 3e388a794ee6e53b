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
    """One env file (infra/stack.env) of ports and bucket names for `tl stack up`, compose and the KubeRay
    manifests, and no credential in it or in any committed file: compose takes every credential from a
    secrets env file (`${KEY:?...}`: it refuses to start without one), publishes ports only on TL_STACK_HOST,
    and every service asks for credentials (Prefect's auth string with CSRF, MLflow's basic-auth app, MinIO's
    keys, Ray's token); the Ray pods run the same image in compose and KubeRay, with token auth, the addresses
    under the names `tl stack env` exports and the credentials from a secret."""
    from tasks.project.env import read_env_file
    from tasks.services.stack import SECRET_KEYS, client_env, public_env, settings

    env_file = INFRA / "stack.env"
    keys = set(read_env_file(env_file))
    assert not keys & {*SECRET_KEYS, "RAY_AUTH_TOKEN", "POSTGRES_PASSWORD"}  # no credential is committed
    local = settings(env_file) | dict.fromkeys(SECRET_KEYS, "x") | {"RAY_AUTH_TOKEN_PATH": "/t"}
    assert set(settings(env_file)) == keys
    secret_names = set(client_env(local)) - set(public_env(local))
    assert secret_names == set(SECRET_KEYS)
    text = (INFRA / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    used = set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"\$\$(\w+)", text))
    secrets_ = {*SECRET_KEYS, "RAY_AUTH_TOKEN", "POSTGRES_PASSWORD"}
    assert required == secrets_, required ^ secrets_  # each credential from the secrets file, required
    assert used and used <= keys | secrets_, used - keys - secrets_
    svc = yaml.safe_load(text)["services"]
    for name, s in svc.items():
        for port in s.get("ports", []):
            assert port.startswith("${TL_STACK_HOST}:"), (name, port)  # never all interfaces by default
    assert svc["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert svc["prefect"]["environment"]["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert "--app-name basic-auth" in svc["mlflow"]["command"]
    ini = svc["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./mlflow_auth.ini:{ini}:ro" in svc["mlflow"]["volumes"] and (INFRA / "mlflow_auth.ini").is_file()
    for name in ("minio", "buckets", "mlflow", "ray-head", "worker"):
        assert svc[name]["env_file"] == "stack.env", name
    assert svc["minio"]["environment"]["MINIO_ROOT_USER"].startswith("${AWS_ACCESS_KEY_ID:?")
    assert "$$DVC_BUCKET" in svc["buckets"]["entrypoint"] and "$$RAY_BUCKET" in svc["buckets"]["entrypoint"]
    addresses = set(public_env(local)) - {
        "TL_RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN_PATH",
        "AWS_DEFAULT_REGION",
    }
    addresses -= {"MLFLOW_TRACKING_USERNAME"}
    for name in ("ray-head", "worker"):
        env = svc[name]["environment"]
        assert addresses <= set(env) and set(SECRET_KEYS) <= set(env), name
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    assert svc["worker"]["environment"]["TL_PROJECT_DIR"] == "/app"  # its flows run that project only
    images = {svc["ray-head"]["image"], svc["worker"]["image"]}
    for f in ("raycluster.yaml", "rayjob.yaml"):
        raw = (INFRA / "k8s" / f).read_text()
        assert "--from-env-file=infra/stack.env" not in raw, f
        doc = yaml.safe_load(raw)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["authOptions"] == {"mode": "token"}, f
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                images.add(c["image"])
                assert c["envFrom"] == [{"secretRef": {"name": "transfer-pipeline-env"}}], f
                assert addresses <= {e["name"] for e in c["env"]}, f
                assert not secrets_ & {e["name"] for e in c["env"]}  # credentials never inline
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
