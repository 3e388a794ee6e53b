"""infra/ and prefect.yaml stay consistent with the code, params.yaml and the installed versions."""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import yaml
from helpers import ROOT, TINY, set_params, sh

from tasks.project.config import load_params
from tasks.project.env import tool

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
    for f, spec in (("raycluster.yaml", cluster["spec"]), ("rayjob.yaml", job["spec"]["rayClusterSpec"])):
        workers = spec["workerGroupSpecs"][0]
        # one value per GPU pod: KubeRay derives Ray's num-gpus/num-cpus from the limits, requests are the limits
        assert not {"num-gpus", "num-cpus"} & set(workers["rayStartParams"]), f
        resources = workers["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], f
        assert (INFRA / "k8s" / f).read_text().count("nvidia.com/gpu:") == 1, f  # written once (a YAML anchor)
        limits = resources["limits"]
        assert int(limits["nvidia.com/gpu"]) >= params.ray.gpus_per_worker
        assert float(limits["cpu"]) >= params.ray.cpus_per_worker
        assert workers["replicas"] >= params.ray.num_workers or workers.get("maxReplicas", 0) >= params.ray.num_workers
    gpu_node = launcher["available_node_types"]["gpu_worker"]["resources"]
    assert gpu_node["GPU"] >= 1 and gpu_node["CPU"] >= params.ray.cpus_per_worker
    # the cluster launcher: only the GPU workers' containers ask for GPUs (the head has none to give)
    docker = launcher["docker"]
    assert not any("--gpus" in o for o in docker.get("run_options", []) + docker.get("head_run_options", []))
    assert "--gpus all" in docker["worker_run_options"]
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"].get("GPU", 0) == 0


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


def _image_copies() -> list[tuple[str, str]]:
    """(source, destination under WORKDIR) of each ``COPY`` in infra/Dockerfile, as Docker lays them out."""
    out = []
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *srcs, dst = line.split()[1:]
            for src in srcs:
                out.append((src, f"{dst.rstrip('/')}/{Path(src).name}" if dst.endswith("/") else dst))
    return out


def test_image_holds_what_its_entry_point_needs(tmp_path):
    """The RayJob's entry point (git commit of the image's tree, then `tl run`) in a directory laid out as
    infra/Dockerfile lays out /app: everything `dvc repro` reads is there (a DVC project with its remote, every
    stage's code and params), and the pipeline's first stages run from it."""
    import shutil

    copies = _image_copies()
    needed = {"dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "pyproject.toml", "prefect.yaml"}
    assert needed <= {dst.removeprefix("./") for _, dst in copies}
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for dep in stage.get("deps", []):  # every dependency of every stage that is code or config
            if not dep.startswith(("data", "models", "reports", "${")):  # outputs of earlier stages
                assert any(
                    dep == d.removeprefix("./") or dep.startswith(d.removeprefix("./") + "/") for _, d in copies
                ), dep
    app = tmp_path / "app"
    for src, dst in copies:
        (app / dst).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, app / dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / src, app / dst)
    set_params(app, {"data": TINY["data"]})  # fewer images: the layout is under test, not the data stage
    entry = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    git_part = entry.split('bash -c "', 1)[1].split("&& tl run", 1)[0]
    sh("bash", "-c", git_part, cwd=app)
    # `tl run` drives `dvc repro`; its first stages, from the image's tree (the whole run is tests/test_pipeline.py's)
    out = sh(tool("dvc"), "repro", "data", cwd=app, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (app / "data" / "manifest.json").is_file()


def test_dockerfile_and_compose_consistent():
    docker = (INFRA / "Dockerfile").read_text()
    for src, _ in _image_copies():
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
