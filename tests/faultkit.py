"""Fault injection for tests: run a step in a forked child process and kill it at a chosen point.

Forking (instead of starting ``python -m loraforge``) skips re-importing torch and transformers for each kill,
which keeps many kills within a few seconds each. The child dies by a real signal, so nothing after the kill
point runs: no ``finally``, no ``atexit``, exactly like a preempted job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def in_child(fn: Callable[[], int | None], *, timeout: float = 120.0) -> int:
    """Run ``fn()`` in a forked child and return how it ended, like ``subprocess``: ``-N`` when killed by signal
    N, else its exit code (``fn``'s return value, or 1 after printing an exception). A child still running after
    ``timeout`` seconds is killed and the test fails (a safety net, not a timing assertion)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            code = int(fn() or 0)
        except BaseException:  # noqa: BLE001 - report anything, then leave without running pytest's teardown
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child process was still running after {timeout:.0f} s and was killed")
        time.sleep(0.02)


def die() -> None:
    """SIGKILL this process now (in a child started by :func:`in_child`)."""
    os.kill(os.getpid(), signal.SIGKILL)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to compare whole folders."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(folder: Path) -> list[str]:
    """Names of staging/temporary entries in ``folder`` and beside it (what a killed save could leave)."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    names += [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    return sorted(n for n in names if n.startswith(".") or n.endswith(".tmp"))


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_model(out: Path, corpus: list[str]) -> Path:
    """A 2-layer Qwen3 with a 400-token BPE trained on ``corpus`` and a ChatML template, saved to ``out``.

    Far smaller than the built-in tiny-random-qwen3 (whose 152k-token vocabulary makes each step and each
    12 MB checkpoint slow), so a test can train, kill and resume many times within seconds.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML)
    config = Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


ROWS = [{"instruction": f"Add {n} and {n + 3}.", "input": "", "output": f"{n} + {n + 3} = {2 * n + 3}"}
        for n in range(24)]


def sums_setup(folder: Path) -> tuple[Path, Path]:
    """(model folder, dataset_dir) for the fault tests: the tiny model and 24 alpaca rows named ``sums``."""
    import json

    data = folder / "data"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "train.json"}}), encoding="utf-8")
    corpus = [f"{r['instruction']} {r['output']}" for r in ROWS] * 4
    return tiny_model(folder / "model", corpus), data


def train_config(model: Path, data: Path, out: Path, **over) -> dict:
    """A LoRA run of 6 steps (a checkpoint every 2) that starts or resumes (`resume_from_checkpoint: auto`)."""
    cfg = {"model_name_or_path": str(model), "dataset": "sums", "dataset_dir": str(data), "template": "chatml",
           "cutoff_len": 48, "output_dir": str(out), "per_device_train_batch_size": 4, "learning_rate": 5e-3,
           "max_steps": 6, "logging_steps": 1, "save_steps": 2, "lora_rank": 8, "report_to": "none", "seed": 1,
           "plot_loss": False, "resume_from_checkpoint": "auto"}
    cfg.update(over)
    return cfg


@contextmanager
def small_disk(mount: Path, size: int):
    """A real tmpfs of ``size`` bytes at ``mount`` (root only; the test is skipped where it cannot be mounted)."""
    import pytest

    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the patched-write tests cover the same code)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:  # lazy: a file a failed save left open (held by a traceback) must not keep the mount alive
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, timeout=30)
