"""Export time and peak memory: `loraforge export` (merge a LoRA adapter + write GGUF) for SmolLM2-135M-Instruct and
a Qwen3-0.6B-shaped model with random weights, to q8_0 and f16, on the CPU.

    python benchmarks/bench_export.py [--out benchmarks/results/export_benchmark.json] [--models smollm2,qwen3-0.6b]

Each export runs in its own process (the real CLI). Two memory numbers, sampled every 20 ms in that process: the
peak of anonymous resident memory (what must really fit in RAM) and the peak RSS, which also counts clean pages
of memory-mapped files (safetensors, shared libraries). Each model is exported twice per type: merging a LoRA adapter (load + merge +
save + stream), and without adapter (the GGUF streamed straight from the base folder, one tensor at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


# Runs `loraforge export` in the child process while a thread samples its memory every 20 ms: RssAnon (memory
# that must really fit in RAM) and VmRSS (also counting clean pages of memory-mapped files, which the kernel can
# drop at will). Sampled in the child, because ru_maxrss of a forked child also counts the parent's pages.
CHILD = """
import sys, threading, time
peak = {'RssAnon': 0, 'VmRSS': 0}
def sample():
    while True:
        for line in open('/proc/self/status'):
            key = line.split(':')[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from loraforge.cli import main
rc = main(sys.argv[1:])
time.sleep(0.05)
print('PEAK_KB', peak['RssAnon'], peak['VmRSS'])
sys.exit(rc)
"""


def run_export(base: Path, adapter: Path | None, quant: str, work: Path) -> dict:
    config = work / f"export-{quant}.yaml"
    out_dir = work / f"out-{quant}"
    config.write_text(f"model_name_or_path: {base}\n" + (f"adapter_name_or_path: {adapter}\n" if adapter else "")
                      + f"export_dir: {out_dir}\nexport_format: gguf\nexport_quantization: {quant}\n"
                      "export_overwrite: true\n")
    cmd = [sys.executable, "-c", CHILD, "export", str(config)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", LORAFORGE_LOG_LEVEL="WARNING")
    log_out, log_err = work / "stdout.log", work / "stderr.log"
    start = time.perf_counter()
    with open(log_out, "w") as out, open(log_err, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        status = proc.wait()
    seconds = time.perf_counter() - start
    stdout = log_out.read_text()
    if status != 0:
        raise RuntimeError(f"export failed:\n{stdout}\n{log_err.read_text()}")
    peak_anon_kb, peak_rss_kb = (int(v) for v in stdout.rsplit("PEAK_KB", 1)[1].split()[:2])
    gguf_file = next(out_dir.glob("*.gguf"))
    result = {"quantization": quant, "path": "merge adapter + GGUF" if adapter else "GGUF streamed from base",
              "export_seconds": round(seconds, 1), "peak_anon_rss_mib": round(peak_anon_kb / 1024, 1),
              "peak_rss_mib_incl_mapped_files": round(peak_rss_kb / 1024, 1),
              "gguf_mib": round(gguf_file.stat().st_size / 2**20, 1)}
    shutil.rmtree(out_dir)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_benchmark.json"))
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen3-0.6b-random")
    parser.add_argument("--quants", default="q8_0,f16")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from loraforge.export.gguf.writer import tensor_shapes, tensor_shards
    from loraforge.models.builtin import resolve_builtin

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            base = resolve_builtin(name) if name == "smollm2-135m-instruct" else qwen3_06b(work / name)
            shapes = tensor_shapes(tensor_shards(base))
            n_params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
            largest = max(int(torch.tensor(s).prod()) for s in shapes.values())
            adapter = make_adapter(base, work / f"{name}-lora")
            for quant, with_adapter in [(q, a) for q in args.quants.split(",") for a in (True, False)]:
                r = run_export(base, adapter if with_adapter else None, quant, work)
                r.update(model=name, params_m=round(n_params / 1e6, 1),
                         largest_tensor_mib_fp32=round(largest * 4 / 2**20, 1),
                         base_safetensors_mib=round(sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20, 1))
                print(json.dumps(r), flush=True)
                runs.append(r)
    report = {
        "command": "python benchmarks/bench_export.py " + " ".join(sys.argv[1:]),
        "what": "loraforge export to GGUF, each run in its own process. 'merge adapter + GGUF': load the base, merge "
                "an r=16 LoRA adapter on all linear layers, save merged safetensors (scratch), stream them into the "
                "GGUF. 'GGUF streamed from base': no adapter, tensors streamed from the base safetensors one at a time",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "note": "shared 2-core CPU machine; other jobs were running, so times are upper bounds"},
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
