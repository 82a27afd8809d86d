"""DeepSpeed / FSDP setups: shipped configs, the seed's JSON, and refusals before launch with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loraforge.config import engines, load_config
from loraforge.config.training import DEEPSPEED_SHORT_NAMES
from loraforge.config.validate import resolve_deepspeed
from loraforge.errors import ConfigError
from loraforge.train import distributed

REPO = Path(__file__).resolve().parents[1]
SEED_JSON = REPO / "examples" / "deepspeed" / "ds_config_zero3.json"
EXPECTED = {"z0": (0, False, False), "z2": (2, False, False), "z2_offload": (2, True, False),
            "z3": (3, False, False), "z3_offload": (3, True, True)}


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "d.json").write_text('[{"instruction": "hi", "output": "hello"}]', encoding="utf-8")
    (d / "dataset_info.json").write_text('{"d": {"file_name": "d.json"}}', encoding="utf-8")
    return d


@pytest.fixture()
def gpu_box(monkeypatch):
    """Pretend to be a 4-GPU machine with DeepSpeed installed (config validation only: nothing runs)."""
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    monkeypatch.setenv("LORAFORGE_HOST_RAM_GIB", "512")  # and a server's RAM (offload is checked against it)
    for name in ("LOCAL_RANK", "WORLD_SIZE", "FORCE_TORCHRUN"):
        monkeypatch.delenv(name, raising=False)


def _check(data_dir: Path, **keys) -> None:
    cfg = {"model_name_or_path": "tiny-random-qwen3", "dataset": "d", "dataset_dir": str(data_dir), **keys}
    load_config(cfg, purpose="train", build_training_args=False)


def _problems(data_dir: Path, **keys) -> str:
    with pytest.raises(ConfigError) as err:
        _check(data_dir, **keys)
    return str(err.value)


@pytest.mark.parametrize("name", DEEPSPEED_SHORT_NAMES)
def test_short_names_resolve_to_shipped_configs(name):
    path = Path(resolve_deepspeed(name))
    assert path.is_file() and path.name == f"{name}.json"
    ds = json.loads(path.read_text())
    stage, offload_opt, offload_param = EXPECTED[name]
    zero = ds["zero_optimization"]
    assert distributed.zero_stage(ds) == stage
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") is offload_opt
    assert (zero.get("offload_param", {}).get("device") == "cpu") is offload_param
    # the Trainer fills these from the config, so one file serves every batch size and precision
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["fp16"]["enabled"] == "auto" and ds["bf16"]["enabled"] == "auto"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # examples/deepspeed/ carries the same files for users who copy and edit them
    assert (REPO / "examples" / "deepspeed" / f"{name}.json").read_bytes() == path.read_bytes()


def test_unknown_short_name_is_refused(data_dir, gpu_box):
    assert "neither a JSON file nor a short name" in _problems(data_dir, deepspeed="z4")


def test_seed_zero3_json_is_accepted(data_dir, gpu_box):
    ds = json.loads(SEED_JSON.read_text())
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["enabled"] == "auto"  # dynamic fp16 loss scaling
    _check(data_dir, deepspeed=str(SEED_JSON), quantization_bit=4, fp16=True, per_device_train_batch_size=2,
           gradient_accumulation_steps=4, ddp_timeout=180000000)


def test_seed_example_config_validates(gpu_box, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("examples/qwen3_14b_qlora4_4gpu_zero3.yaml", purpose="train", build_training_args=False)
    assert cfg.model.quantization_bit == 4


@pytest.mark.parametrize("name", DEEPSPEED_SHORT_NAMES)
def test_short_names_pass_validation(data_dir, gpu_box, name):
    _check(data_dir, deepspeed=name, quantization_bit=4, bf16=True)


def test_deepspeed_not_installed_is_a_clear_error(data_dir, monkeypatch):
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    message = _problems(data_dir, deepspeed="z3_offload")
    assert "pip install 'loraforge[deepspeed]'" in message and "`deepspeed: z3_offload`" in message


def test_deepspeed_needs_gpus(data_dir, monkeypatch):
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 0)
    assert "DeepSpeed runs on CUDA GPUs and none is visible" in _problems(data_dir, deepspeed="z2")


@pytest.mark.parametrize("keys, expected", [
    ({"deepspeed": "z3", "quantization_bit": 8}, "`quantization_bit: 8` cannot be combined with DeepSpeed ZeRO-3"),
    ({"deepspeed": "z3", "fsdp": "full_shard auto_wrap"}, "`deepspeed` and `fsdp` are both set"),
    ({"fsdp": "full_shard auto_wrap", "quantization_bit": 8}, "`quantization_bit: 8` cannot be combined with FSDP"),
    ({"fsdp": "full_shard auto_wrap", "quantization_bit": 4}, "FSDP-QLoRA needs FSDP1"),
    ({"fsdp": "full_shard auto_wrap", "quantization_bit": 4, "fsdp_config": {"version": 1}},
     "FSDP-QLoRA needs `fsdp_config.cpu_ram_efficient_loading: true`"),
    ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}},
     "would leave no usable adapter/model"),
    ({"fsdp": "full_shard wrap_everything"}, "unknown option(s) wrap_everything"),
    ({"nproc_per_node": 8}, "`nproc_per_node: 8` but only 4 GPU(s) are visible"),
    ({"nproc_per_node": 0}, "`nproc_per_node` must be a positive number"),
    ({"quantization_bit": 4, "quantization_device_map": "auto", "nproc_per_node": 2},
     "`quantization_device_map: auto` spreads one model"),
    ({"quantization_bit": 4, "quantization_device_map": "auto", "deepspeed": "z3"},
     "`quantization_device_map: auto` spreads one model"),
    ({"ddp_timeout": 0}, "`ddp_timeout` must be a positive number of seconds"),
])
def test_combinations_that_cannot_work_are_refused(data_dir, gpu_box, keys, expected):
    assert expected in _problems(data_dir, **keys)


def test_fsdp_qlora_with_fsdp1_example_passes(data_dir, gpu_box):
    fsdp1 = REPO / "examples" / "fsdp" / "fsdp1_qlora.json"
    _check(data_dir, fsdp="full_shard auto_wrap", fsdp_config=str(fsdp1), quantization_bit=4, bf16=True)
    _check(data_dir, fsdp=True, fsdp_config=str(fsdp1), quantization_bit=4, bf16=True)
    assert "FSDP-QLoRA needs FSDP1" in _problems(data_dir, fsdp=True, quantization_bit=4)
    _check(data_dir, quantization_bit=4, quantization_device_map="auto", nproc_per_node=1)  # one process, split


def test_deepspeed_json_problems_name_the_key(data_dir, gpu_box, tmp_path):
    def write(name: str, ds: dict | str) -> str:
        path = tmp_path / name
        path.write_text(ds if isinstance(ds, str) else json.dumps(ds), encoding="utf-8")
        return str(path)

    assert "is not valid JSON (line 2" in _problems(data_dir, deepspeed=write("bad.json", '{\n  "a": ,\n}'))
    param_offload = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}
    assert "parameter offload needs stage 3" in _problems(data_dir, deepspeed=write("o.json", param_offload))
    no_gather = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    assert "saved adapter/model would be empty" in _problems(data_dir, deepspeed=write("g.json", no_gather))
    fixed = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    message = _problems(data_dir, deepspeed=write("m.json", fixed), per_device_train_batch_size=2)
    assert "`train_micro_batch_size_per_gpu: 4` but the config has `per_device_train_batch_size: 2`" in message
    assert "`bf16.enabled: true` but the config has `bf16: False`" in message
    _check(data_dir, deepspeed=write("ok.json", fixed), per_device_train_batch_size=4, bf16=True)


def test_every_problem_is_reported_at_once(data_dir, monkeypatch):
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 0)
    err = pytest.raises(ConfigError, _check, data_dir, deepspeed="z3", quantization_bit=8, lora_rank=0).value
    assert len(err.problems) >= 4  # lora_rank, not installed, no GPU, 8-bit + ZeRO-3


def test_installed_wheel_ships_the_deepspeed_configs(tmp_path):
    """A non-editable build carries resources/deepspeed/*.json, so short names work after `pip install loraforge`."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src_copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=120)
    names = zipfile.ZipFile(next(out.glob("*.whl"))).namelist()
    for short in DEEPSPEED_SHORT_NAMES:
        assert f"loraforge/resources/deepspeed/{short}.json" in names


@pytest.mark.gpu  # DeepSpeed is installed only on the GPU machines (it is no part of the CPU install)
@pytest.mark.parametrize("name", ["seed", "z3_offload", "z2"])
def test_hf_trainer_fills_the_auto_values(name, tiny_qwen3_path):
    """With DeepSpeed installed, the Trainer's DeepSpeed config takes batch, clipping and fp16 from the config and
    keeps the seed's dynamic fp16 loss scaling."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_path)  # before the args: ZeRO-3 would wrap the load
    path = str(SEED_JSON) if name == "seed" else resolve_deepspeed(name)
    args = TrainingArguments(output_dir="unused", deepspeed=path, fp16=True, per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, max_grad_norm=0.5, use_cpu=True, report_to="none")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        args.hf_deepspeed_config.trainer_config_finalize(args, model, num_training_steps=10)
        c = args.hf_deepspeed_config.config
    finally:
        unset_hf_deepspeed_config()  # later tests must not see a ZeRO-3 setup
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (2, 4, 8)
    assert c["gradient_clipping"] == 0.5
    assert c["fp16"]["enabled"] is True and c["bf16"]["enabled"] is False
    assert c["fp16"]["loss_scale"] == 0 and c["fp16"]["initial_scale_power"] == 16
    assert "auto" not in json.dumps(c)


def test_config_only_validation_skips_the_machine_but_not_the_config(data_dir, monkeypatch):
    """`check_environment=False` (e.g. checking a 4-GPU config on a laptop) still refuses impossible setups."""
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 0)
    base = {"model_name_or_path": "tiny-random-qwen3", "dataset": "d", "dataset_dir": str(data_dir)}
    load_config({**base, "deepspeed": "z3_offload", "quantization_bit": 4, "nproc_per_node": 4}, purpose="train",
                build_training_args=False, check_environment=False)
    with pytest.raises(ConfigError) as err:
        load_config({**base, "deepspeed": "z3", "quantization_bit": 8}, purpose="train", build_training_args=False,
                    check_environment=False)
    assert len(err.value.problems) == 1 and "ZeRO-3" in err.value.problems[0]
