"""Export time and peak memory: `loraforge export` (merge a LoRA adapter + write GGUF) for SmolLM2-135M-Instruct and
a Qwen3-0.6B-shaped model with random weights, to q8_0 and f16, on the CPU.

    python benchmarks/bench_export.py [--out benchmarks/results/export_benchmark.json] [--models smollm2,qwen3-0.6b]

Each export runs in its own process (the real CLI), so its peak resident memory (ru_maxrss) is measured alone.
Peak RSS counts the loaded model, the largest tensor being converted and the pages of the safetensors files
mapped while streaming them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen3_06b(out: Path) -> Path:
    """Qwen3-0.6B's exact architecture (config of the official release) with random bf16 weights + Qwen3 tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from loraforge.models.builtin import resolve_builtin

    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer_src = resolve_builtin("tiny-random-qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt"):
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, out / name)
    return out


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).save_pretrained(str(out))
    return out


def run_export(base: Path, adapter: Path, quant: str, work: Path) -> dict:
    config = work / f"export-{quant}.yaml"
    out_dir = work / f"out-{quant}"
    config.write_text(f"model_name_or_path: {base}\nadapter_name_or_path: {adapter}\nexport_dir: {out_dir}\n"
                      f"export_format: gguf\nexport_quantization: {quant}\nexport_overwrite: true\n")
    cmd = [sys.executable, "-m", "loraforge.cli", "export", str(config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", LORAFORGE_LOG_LEVEL="WARNING")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"export failed:\n{stdout}\n{stderr}")
    gguf_file = next(out_dir.glob("*.gguf"))
    result = {"quantization": quant, "export_seconds": round(seconds, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "gguf_mib": round(gguf_file.stat().st_size / 2**20, 1)}
    shutil.rmtree(out_dir)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_benchmark.json"))
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen3-0.6b-random")
    parser.add_argument("--quants", default="q8_0,f16")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loraforge.export.gguf.writer import _shapes, tensor_shards
    from loraforge.models.builtin import resolve_builtin

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            base = resolve_builtin(name) if name == "smollm2-135m-instruct" else qwen3_06b(work / name)
            shapes = _shapes(tensor_shards(base))
            n_params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
            largest = max(int(torch.tensor(s).prod()) for s in shapes.values())
            adapter = make_adapter(base, work / f"{name}-lora")
            for quant in args.quants.split(","):
                r = run_export(base, adapter, quant, work)
                r.update(model=name, params_m=round(n_params / 1e6, 1),
                         largest_tensor_mib_fp32=round(largest * 4 / 2**20, 1),
                         base_safetensors_mib=round(sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20, 1))
                print(json.dumps(r), flush=True)
                runs.append(r)
    report = {
        "command": "python benchmarks/bench_export.py " + " ".join(sys.argv[1:]),
        "what": "loraforge export: load base, merge a r=16 LoRA adapter on all linear layers, save merged safetensors "
                "(scratch), stream them into one GGUF; each run in its own process",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "note": "shared 2-core CPU machine; other jobs were running, so times are upper bounds"},
        "self_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
