"""`loraforge chat` with a base model, base + adapter (not merged) and the merged model; the CLI driven by stdin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import load_config  # noqa: E402
from loraforge.data.conversation import Message  # noqa: E402
from loraforge.serve.engine import SamplingParams, build_engine  # noqa: E402
from test_eval_compare import build_adapter_and_merged  # noqa: E402  (tests/ is on sys.path under pytest)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def variants(tiny_qwen3_path, tmp_path_factory):
    return build_adapter_and_merged(tiny_qwen3_path, tmp_path_factory.mktemp("chat_variants"))


def _answer(model_path, adapter=None) -> str:
    raw = {"model_name_or_path": str(model_path), "template": "qwen3", "max_new_tokens": 10}
    if adapter:
        raw["adapter_name_or_path"] = str(adapter)
    engine = build_engine(load_config(raw, purpose="chat", build_training_args=False))
    prompt = engine.encode([Message("user", "Tell me about the moon.")], enable_thinking=False)
    return engine.complete(prompt, SamplingParams(max_new_tokens=10)).content


def test_base_adapter_and_merged_engines(tiny_qwen3_path, variants):
    adapter, merged = variants
    base = _answer(tiny_qwen3_path)
    with_adapter = _answer(tiny_qwen3_path, adapter)
    assert with_adapter != base
    assert _answer(merged) == with_adapter


def test_cli_chat_driven_by_stdin(tiny_qwen3_path, variants):
    adapter, _ = variants
    script = "hello there\n/think\nand again?\nclear\nexit\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAFORGE_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", "chat", "--thinking", "off", "--system", "You are a pirate.",
         f"model_name_or_path={tiny_qwen3_path}", f"adapter_name_or_path={adapter}", "template=qwen3",
         "max_new_tokens=6"],
        input=script, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("loraforge chat with tiny-random-qwen3+adapter.")
    assert "Thinking is off." in out and "Thinking on." in out and "History cleared." in out
    assert out.count("Assistant: ") == 2
    assert out.count("User: ") == 5  # four lines read before exit, plus the prompt that read `exit`
