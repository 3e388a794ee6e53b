"""params.yaml validation (tasks/project/config.py): plain numbers, every section present, output dirs inside the
project.

Pure and fast: each test validates a copy of the repository's params.yaml in a temporary project directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.project.config import Params, ParamsError, load_params
from tasks.project.overrides import apply_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def params_file(tmp_path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    return project / "params.yaml"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


# --- 1. -S values: no surprising YAML coercions --------------------------------------------------------------


def test_leading_zero_override_is_refused_with_the_number_to_write(params_file):
    with pytest.raises(ParamsError, match=r"leading zero.*octal.*Write 10\b"):
        load_params(params_file, ["finetune.epochs=010"])


def test_leading_zero_in_params_yaml_is_refused_with_its_line(params_file):
    _edit(params_file, "  epochs: 10\n", "  epochs: 010\n")
    with pytest.raises(ParamsError, match=r"line \d+ \(epochs\).*Write 10\b"):
        load_params(params_file)


def test_sexagesimal_text_for_an_int_is_a_clear_error(params_file):
    with pytest.raises(ParamsError, match=r"finetune\.epochs = '1:30': .*is text.*takes an integer.*base-60"):
        load_params(params_file, ["finetune.epochs=1:30"])


@pytest.mark.parametrize(
    "key",
    [
        "finetune.batch_size",
        "finetune.epochs",
        "base.seed",
        "finetune.lr",
        "data.target_test_fraction",
        "ray.cpus_per_worker",
        "evaluate.ece_bins",
    ],
)
def test_booleans_are_not_numbers(params_file, key):
    with pytest.raises(ParamsError, match=rf"{key} = True: true is a boolean, but this key takes"):
        load_params(params_file, [f"{key}=true"])


def test_loader_workers_is_auto_or_a_count(params_file):
    assert load_params(params_file).data.loader_workers == "auto"
    assert load_params(params_file, ["data.loader_workers=2"]).data.loader_workers == 2
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(ParamsError, match=r"data\.loader_workers"):
            load_params(params_file, [f"data.loader_workers={bad}"])


def test_booleans_are_not_numbers_in_params_yaml_or_python(params_file):
    _edit(params_file, "  batch_size: 64\n", "  batch_size: true\n")
    with pytest.raises(ParamsError, match=r"finetune\.batch_size = True: true is a boolean"):
        load_params(params_file)
    with pytest.raises(ValueError, match="is a boolean"):
        Params.model_validate({"evaluate": {"latency_iters": False}})


def test_quoted_numbers_are_text_not_numbers(params_file):
    with pytest.raises(ParamsError, match=r"finetune\.epochs = '10': '10' is text"):
        load_params(params_file, ["finetune.epochs='10'"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf"])
@pytest.mark.parametrize(
    "key", ["finetune.lr", "ray.cpus_per_worker", "register.min_improvement", "pretrain.grad_clip"]
)
def test_non_finite_floats_are_refused_everywhere(params_file, key, value):
    with pytest.raises(ParamsError, match=rf"{key} = .*not a finite number"):
        load_params(params_file, [f"{key}={value}"])


def test_non_finite_floats_are_refused_in_params_yaml_and_strategy_params(params_file):
    _edit(params_file, "  min_accuracy: 0.5\n", "  min_accuracy: .inf\n")
    with pytest.raises(ParamsError, match=r"register\.min_accuracy = inf: .*not a finite number"):
        load_params(params_file)
    _edit(params_file, "  min_accuracy: .inf\n", "  min_accuracy: 0.5\n")
    with pytest.raises(ParamsError, match=r"finetune\.strategy_params.*tau = nan is not a finite number"):
        load_params(params_file, ["finetune.strategy_params.tau=.nan"])


def test_exponent_override_stays_a_number_and_is_written_back_as_one(params_file):
    from tasks.project.env import write_overrides

    assert load_params(params_file, ["finetune.lr=1e-3"]).finetune.lr == 0.001
    write_overrides(params_file, ["finetune.lr=1e-3", "finetune.epochs=12"])
    text = params_file.read_text()
    assert "lr: 0.001" in text and "'1e-3'" not in text and "epochs: 12" in text
    p = load_params(params_file)
    assert (p.finetune.lr, p.finetune.epochs) == (0.001, 12)


def test_write_overrides_refuses_a_leading_zero_and_leaves_the_file_alone(params_file):
    from tasks.project.env import write_overrides

    before = params_file.read_text()
    with pytest.raises(ParamsError, match="Write 10"):
        write_overrides(params_file, ["finetune.epochs=010"])
    assert params_file.read_text() == before


def test_plain_numbers_still_validate(params_file):
    p = load_params(
        params_file,
        [
            "finetune.epochs=7",
            "finetune.lr=0.01",
            "ray.cpus_per_worker=2",
            "finetune.grad_clip=1",
            "ray.cpus_per_worker=auto",
        ],
    )
    assert (p.finetune.epochs, p.finetune.lr, p.finetune.grad_clip, p.ray.cpus_per_worker) == (7, 0.01, 1.0, "auto")


# --- 2. every section in the file ----------------------------------------------------------------------------


def test_an_empty_params_file_names_every_section(params_file):
    params_file.write_text("")
    with pytest.raises(ParamsError, match=r"is empty.*`base:`.*`ray:`.*git checkout params\.yaml"):
        load_params(params_file)


def test_a_truncated_params_file_names_the_missing_sections(params_file):
    params_file.write_text(params_file.read_text().split("\nfinetune:")[0])
    with pytest.raises(ParamsError) as e:
        load_params(params_file)
    msg = str(e.value)
    assert "has no `finetune:`, `evaluate:`, `compress:`, `register:`, `ray:`, `tune:` sections" in msg
    assert "`pretrain:`" not in msg and "git checkout params.yaml" in msg and "project template" in msg


def test_a_missing_section_is_not_masked_by_an_override(params_file):
    params_file.write_text(params_file.read_text().split("\nray:")[0])
    with pytest.raises(ParamsError, match=r"has no `ray:`[,` a-z:]* section"):
        load_params(params_file, ["ray.num_workers=0"])


def test_keys_inside_a_section_stay_optional_and_python_defaults_stay(params_file):
    text = params_file.read_text()
    evaluate = text[text.index("\nevaluate:") : text.index("\ncompress:")]
    params_file.write_text(text.replace(evaluate, "\nevaluate: {}\n"))
    assert load_params(params_file).evaluate.latency_iters == 50
    assert Params().finetune.epochs == 10
    assert Params.model_validate({"finetune": {"epochs": 2}}).finetune.epochs == 2


# --- 3. output directories inside the project ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value,why",
    [
        ("/some/dataset", "is an absolute path"),
        ("~/data", "is an absolute path"),
        ("../data", "leaves the project with `..`"),
        ("data/../../x", "leaves the project"),
        (".", "is the project directory"),
        ("./", "is the project directory"),
        (".dvc/cache", "lies inside .dvc/"),
    ],
)
def test_output_dirs_must_be_relative_and_below_the_project(params_file, value, why):
    for key in ("data_dir", "models_dir", "reports_dir"):
        with pytest.raises(ParamsError, match=rf"base\.{key} = '{value}': {why}.*relative path below the project"):
            load_params(params_file, [f"base.{key}={value}"])


@pytest.mark.parametrize(
    "sets,match",
    [
        (["base.data_dir=models"], "base.data_dir = 'models' is the same directory as base.models_dir"),
        (["base.models_dir=data/models"], "base.data_dir = 'data' contains base.models_dir = 'data/models'"),
        (["base.reports_dir=models/./r"], "base.models_dir = 'models' contains base.reports_dir"),
        (["base.data_dir=reports/data"], "base.data_dir = 'reports/data' lies inside base.reports_dir"),
    ],
)
def test_output_dirs_are_distinct_and_not_nested(params_file, sets, match):
    with pytest.raises(ParamsError, match=match.replace(".", r"\.")):
        load_params(params_file, sets)
    with pytest.raises(ValueError, match="distinct directories"):
        Params.model_validate({"base": {"data_dir": "d", "models_dir": "d"}})


def test_output_dirs_must_not_resolve_outside_the_project_through_a_symlink(params_file, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (params_file.parent / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ParamsError, match=r"base\.reports_dir = 'out': resolves to .*outside the project"):
        load_params(params_file, ["base.reports_dir=out"])


def _imagefolder(root: Path) -> Path:
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    return root


@pytest.mark.parametrize("layout", ["dataset_inside_data_dir", "data_dir_is_dataset", "data_dir_inside_dataset"])
def test_output_dirs_must_not_overlap_a_user_imagefolder(params_file, layout):
    project = params_file.parent
    if layout == "dataset_inside_data_dir":
        tree, data_dir, rel = _imagefolder(project / "data" / "mine"), "data", "contains"
    elif layout == "data_dir_is_dataset":
        tree, data_dir, rel = _imagefolder(project / "mine"), "mine", "is"
    else:
        tree, data_dir, rel = _imagefolder(project / "mine"), "mine/out", "lies inside"
    with pytest.raises(ParamsError, match=rf"base\.data_dir = '{data_dir}': {rel} the ImageFolder data\.source"):
        load_params(params_file, [f"data.source={tree}", f"base.data_dir={data_dir}"])


def test_a_user_imagefolder_elsewhere_and_nested_output_names_are_fine(params_file, tmp_path):
    tree = _imagefolder(tmp_path / "dataset")
    p = load_params(
        params_file,
        [
            f"data.source={tree}",
            "base.data_dir=out/data",
            "base.models_dir=out/models",
            "ray.storage_path=/tmp/ray_results",
        ],
    )
    assert (p.data.source, p.base.data_dir, p.ray.storage_path) == (str(tree), "out/data", "/tmp/ray_results")


# --- devices: one rule for base.device and ray.use_gpu, whole GPUs per worker ----------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["base.device=cuda"],
            r"base\.device = 'cuda' but ray\.use_gpu = false: .*would run on the CPU\. Set ray\.use_gpu: true",
        ),
        (
            ["base.device=cpu", "ray.use_gpu=true", "ray.gpus_per_worker=1"],
            r"base\.device = 'cpu' but ray\.use_gpu = true: .*contradict.*base\.device: auto.*ray\.use_gpu: false",
        ),
    ],
    ids=["cuda_without_use_gpu", "cpu_with_use_gpu"],
)
def test_base_device_and_use_gpu_must_agree(params_file, overrides, match):
    with pytest.raises(ParamsError, match=match):
        load_params(params_file, overrides)
    with pytest.raises(ValueError, match=match):  # the same rule for params built in Python
        Params.model_validate(apply_overrides({}, overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["ray.use_gpu=true", "ray.gpus_per_worker=1"],
        ["base.device=cuda", "ray.use_gpu=true", "ray.gpus_per_worker=2"],
        ["base.device=cpu"],
        ["base.device=auto", "ray.use_gpu=false"],
    ],
)
def test_agreeing_devices_are_accepted(params_file, overrides):
    params = load_params(params_file, overrides)
    for item in overrides:  # accepted as given
        (section, key), value = item.split("=")[0].split("."), yaml.safe_load(item.split("=")[1])
        assert getattr(getattr(params, section), key) == value


@pytest.mark.parametrize(
    "gpus,match",
    [
        (
            "0.5",
            r"ray\.gpus_per_worker = 0\.5 with ray\.use_gpu = true: each worker needs a whole number of GPUs >= 1 "
            r"\(NCCL cannot run two workers on one GPU",
        ),
        ("1.5", r"whole number of GPUs >= 1"),
        ("0", r"ray\.gpus_per_worker = 0 with ray\.use_gpu = true: .*-S ray\.gpus_per_worker=1"),
    ],
    ids=["half", "one_and_a_half", "zero"],
)
def test_gpus_per_worker_is_whole_with_use_gpu(params_file, gpus, match):
    with pytest.raises(ParamsError, match=match):
        load_params(params_file, ["ray.use_gpu=true", f"ray.gpus_per_worker={gpus}"])


def test_gpus_without_use_gpu_are_refused(params_file):
    with pytest.raises(ParamsError, match=r"ray\.gpus_per_worker = 1 but ray\.use_gpu = false"):
        load_params(params_file, ["ray.gpus_per_worker=1"])


def test_stage_device_on_a_gpu_less_node(params_file):
    from tasks.modeling.hardware import device_for

    cuda = load_params(params_file, ["base.device=cuda", "ray.use_gpu=true", "ray.gpus_per_worker=1"])
    with pytest.raises(ParamsError, match=r"sees no CUDA device .*Set base\.device: auto"):
        device_for(cuda, cuda_available=False)
    auto = load_params(params_file, ["ray.use_gpu=true", "ray.gpus_per_worker=1", "ray.num_workers=2"])
    assert device_for(auto, cuda_available=False).type == "cpu"  # evaluation on the head; training on GPU workers
    assert device_for(auto, cuda_available=True).type == "cuda"


def test_threads_are_set_only_when_a_stage_asks(params_file):
    import torch

    from tasks.modeling.hardware import device_for, set_torch_threads

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    p = load_params(params_file, [f"base.num_threads={want}"])
    try:
        device_for(p, cuda_available=False)
        assert torch.get_num_threads() == before  # choosing a device changes nothing else
        set_torch_threads(p)
        assert torch.get_num_threads() == want
        set_torch_threads(load_params(params_file, ["base.num_threads=null"]))
        assert torch.get_num_threads() == want  # null: torch's own setting is left as it is
    finally:
        torch.set_num_threads(before)


def test_importing_the_config_installs_no_warnings_filter():
    import warnings

    # tasks.project.config is imported at the top of this module: a filter it installed would be in place now
    assert not [f for f in warnings.filters if f[1] is not None and "register" in f[1].pattern]
