"""Typed, validated run configuration built from a LLaMA-Factory-style YAML plus overrides.

    cfg = load_config("examples/quickstart.yaml", ["learning_rate=1e-4"], purpose="train")
    cfg.model.model_name_or_path, cfg.data.dataset, cfg.finetuning.lora_rank, cfg.training.output_dir
"""

from .data import DataArguments
from .export import ExportArguments
from .finetuning import FinetuningArguments
from .generation import GeneratingArguments
from .model import ModelArguments
from .parser import RunConfig, all_fields, load_config, parse_overrides, read_yaml
from .training import TrainingArguments

__all__ = [
    "DataArguments", "ExportArguments", "FinetuningArguments", "GeneratingArguments", "ModelArguments",
    "RunConfig", "TrainingArguments", "all_fields", "load_config", "parse_overrides", "read_yaml",
]
