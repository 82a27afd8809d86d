"""Measure the peak GPU memory of real training steps, to calibrate `loraforge estimate`.

Each configuration runs in a fresh subprocess: a random-weight Qwen3 model of a real size is built directly
on the GPU from a ``Qwen3Config`` (bf16), its decoder linears are quantized in place with bitsandbytes for
QLoRA (what ``from_pretrained(quantization_config=...)`` does, without the disk round trip), LoRA adapters are
added with peft, and the Hugging Face ``Trainer`` runs 3 steps (bf16 autocast, AdamW, grad clipping: the
same path as ``loraforge train``). Step 1 creates the optimizer states; the peak of steps 2-3 is recorded with
``torch.cuda.max_memory_allocated``.

    PYTHONPATH=$PWD/.gpu-site:$PWD/src python benchmarks/calibrate_memory.py \
        --out benchmarks/results/memory_calibration.json
    python benchmarks/calibrate_memory.py --tiny            # CPU dry run of every code path (no numbers)

The shapes are those of the released Qwen3 models (vocabulary 151,936, head_dim 128).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen3_shapes import qwen3_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16


def _cfg(size: str, method: str, seq: int, bs: int, gc: bool, optim: str = "adamw_torch") -> dict:
    name = f"qwen3-{size}_{method}_s{seq}_b{bs}_{'gc' if gc else 'nogc'}" + ("" if optim == "adamw_torch" else f"_{optim}")
    return dict(name=name, size=size, method=method, seq=seq, bs=bs, gc=gc, optim=optim, rank=LORA_RANK)


# Ordered so that a deadline still leaves every size x method pair, both sequence lengths, both batch sizes and
# checkpointing on and off in the table; later rows add repeats and variants.
CONFIGS = [
    _cfg("0.6b", "lora", 512, 1, True),
    _cfg("0.6b", "lora", 2048, 4, False),
    _cfg("0.6b", "qlora-4", 2048, 1, False),
    _cfg("0.6b", "qlora-8", 512, 4, True),
    _cfg("4b", "lora", 2048, 1, True),
    _cfg("4b", "qlora-4", 512, 4, False),
    _cfg("8b", "qlora-4", 2048, 4, True),
    _cfg("8b", "qlora-8", 512, 4, True),
    _cfg("8b", "lora", 512, 4, False),
    _cfg("4b", "qlora-8", 2048, 1, False),
    _cfg("0.6b", "full", 512, 1, True),
    _cfg("8b", "qlora-4", 2048, 1, False),
    _cfg("0.6b", "lora", 2048, 4, True),
    _cfg("4b", "qlora-4", 2048, 4, True),
    _cfg("8b", "lora", 2048, 1, True),
    _cfg("0.6b", "lora", 512, 1, False),
    _cfg("0.6b", "full", 2048, 1, False),
    _cfg("8b", "qlora-4", 512, 1, False),
    _cfg("4b", "qlora-8", 512, 1, True, "paged_adamw_8bit"),
    dict(_cfg("4b", "qlora-4", 2048, 1, False), upcast_norms=False, name="qwen3-4b_qlora-4_s2048_b1_nogc_bf16norms"),
    dict(_cfg("8b", "qlora-4", 2048, 4, True), upcast_norms=False, name="qwen3-8b_qlora-4_s2048_b4_gc_bf16norms"),
    # variants the estimator models but the grid above does not exercise (run 2)
    _cfg("14b", "qlora-4", 2048, 2, True),
    dict(_cfg("4b", "lora", 1024, 2, False), rank=64, targets=["q_proj", "v_proj"],
         name="qwen3-4b_lora-r64-qv_s1024_b2_nogc"),
    dict(_cfg("4b", "qlora-4", 2048, 1, True), precision="fp16", name="qwen3-4b_qlora-4_s2048_b1_gc_fp16"),
    _cfg("0.6b", "freeze", 2048, 4, False),
    _cfg("0.6b", "full", 1024, 2, True, "adamw_8bit"),
]
TINY_CONFIGS = [
    _cfg("tiny", "lora", 32, 2, True),
    _cfg("tiny", "qlora-4", 32, 1, False),
    dict(_cfg("tiny", "qlora-4", 32, 1, True), upcast_norms=False, name="tiny_bf16norms"),
    _cfg("tiny", "qlora-8", 32, 1, True),
    _cfg("tiny", "full", 32, 1, False),
    _cfg("tiny", "freeze", 32, 2, True),
    dict(_cfg("tiny", "lora", 32, 1, False), rank=4, targets=["q_proj", "v_proj"], name="tiny_qv"),
]


def _quantize_linears(model, bits: int, device, dtype) -> None:
    """Swap every decoder linear for a bitsandbytes one holding the same (random) weights, quantized."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, old in list(parent.named_children()):
                if name not in TARGETS:
                    continue
                w = old.weight.data
                if bits == 4:
                    new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                            compute_dtype=dtype, compress_statistics=True,
                                            quant_type="nf4", device="meta")
                    new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                                   quant_type="nf4", module=new).to(device)
                else:
                    new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                              has_fp16_weights=False, threshold=6.0, device="meta")
                    if device.type == "cpu":
                        new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
                    else:  # Int8Params quantizes only on a CPU -> GPU move; do the same quantization in place
                        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
                        new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
                if old.bias is not None:
                    new.bias = old.bias
                setattr(parent, name, new)
                del old, w
    # what transformers' bitsandbytes quantizer sets: peft then wraps these layers with its bnb LoRA classes
    setattr(model, f"is_loaded_in_{bits}bit", True)


def worker(spec: dict) -> dict:
    """Run one configuration and return its measured row."""
    import torch
    import transformers
    from transformers import Qwen3ForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available() and spec["size"] != "tiny"
    fp16 = spec.get("precision") == "fp16"
    dtype = torch.float16 if fp16 else torch.bfloat16
    targets = spec.get("targets", TARGETS)
    device = torch.device("cuda" if cuda else "cpu")
    vocab = 1000 if spec["size"] == "tiny" else 151936
    cfg = qwen3_config(spec["size"], vocab_size=vocab, use_cache=False)
    cfg._attn_implementation = "sdpa"
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = Qwen3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    total_params = sum(p.numel() for p in model.parameters())
    method = spec["method"]
    # The preparation below is what loraforge.models does for each method (loader.py, quantization.py,
    # adapters.py): QLoRA freezes the base and keeps norm weights in fp32; checkpointing is non-reentrant and
    # frozen embeddings get input grads; trainable weights (LoRA or full) are kept in fp32.
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method == "freeze":  # the last N blocks are trained (loraforge's default freeze_trainable_layers: 2)
        for layer in model.model.layers[-spec.get("freeze_layers", 2):]:
            layer.requires_grad_(True)
    if method.startswith("qlora"):
        _quantize_linears(model, int(method[-1]), device, dtype)
        if spec.get("upcast_norms", True):
            for mod_name, module in model.named_modules():
                if "norm" in type(module).__name__.lower() or mod_name.split(".")[-1].endswith("norm"):
                    for p in module.parameters(recurse=False):
                        p.data = p.data.float()
    if spec["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    if method not in ("full", "freeze"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = method not in ("full", "freeze")
    q_proj = model.get_submodule(("base_model.model." if lora else "") + "model.layers.0.self_attn.q_proj")
    layer_type = f"{type(q_proj).__module__}.{type(q_proj).__name__}"
    if cuda:
        torch.cuda.synchronize()
        weights_alloc = torch.cuda.memory_allocated()
    build_s = time.time() - t0

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab - 300, (spec["seq"],), generator=g).tolist() for _ in range(4 * spec["bs"])]
    data = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows]
    stats: dict = {"after_forward_alloc": 0}

    def after_forward(module, inputs, output):  # saved activations + logits, before backward starts
        if cuda and "t" in stats:
            stats["after_forward_alloc"] = max(stats["after_forward_alloc"], torch.cuda.memory_allocated())

    base = model.get_base_model() if lora else model
    base.register_forward_hook(after_forward)

    class PeakMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and cuda:  # optimizer states exist from here on
                torch.cuda.synchronize()
                stats["static_alloc"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                stats["t"] = time.time()

        def on_train_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                stats["peak_alloc"] = torch.cuda.max_memory_allocated()
                stats["peak_reserved"] = torch.cuda.max_memory_reserved()
                stats["s_per_step"] = (time.time() - stats["t"]) / 2
                free, total = torch.cuda.mem_get_info()
                stats["outside_torch"] = total - free - torch.cuda.memory_reserved()
                stats["gpu_total"] = total

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["bs"], max_steps=3, learning_rate=1e-4,
            lr_scheduler_type="constant", optim=spec["optim"], bf16=not fp16, fp16=fp16 and cuda, use_cpu=not cuda, logging_steps=100,
            save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            remove_unused_columns=False, gradient_checkpointing=False, max_grad_norm=1.0)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PeakMemory()])
        result = trainer.train()
    import peft

    outliers: dict[str, list[float]] = {}
    for mod_name, module in model.named_modules():
        idx = getattr(getattr(module, "state", None), "idx", None)
        if method == "qlora-8" and idx is not None and hasattr(module, "in_features"):
            parts = mod_name.split(".")
            key = parts[-2] if parts[-1] == "base_layer" else parts[-1]
            outliers.setdefault(key, []).append(idx.numel() / module.in_features)
    row = dict(spec, params=total_params, trainable=trainable, layer_type=layer_type, loss=round(float(result.training_loss), 4),
               build_s=round(build_s, 1), torch=torch.__version__, transformers=transformers.__version__,
               peft=peft.__version__)
    if outliers:  # share of input columns LLM.int8 kept in 16/32 bits (last forward), mean over blocks
        row["int8_outlier_fraction"] = {k: round(sum(v) / len(v), 4) for k, v in outliers.items()}
    if cuda:
        import bitsandbytes

        row.update(weights_alloc=weights_alloc, gpu=torch.cuda.get_device_name(), bitsandbytes=bitsandbytes.__version__,
                   **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items() if k != "t"})
        row["peak_alloc_gib"] = round(stats["peak_alloc"] / 2**30, 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file to write (rewritten after every configuration)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names to run, in that order")
    ap.add_argument("--skip", default=None, help="comma-separated configuration names to leave out")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run of every code path with a tiny model")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per configuration")
    ap.add_argument("--deadline", type=int, default=480, help="start no configuration after this many seconds")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("ROW " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    configs = TINY_CONFIGS if a.tiny else CONFIGS
    if a.only:
        by_name = {c["name"]: c for c in configs}
        unknown = [n for n in a.only.split(",") if n not in by_name]
        if unknown:
            ap.error(f"unknown configuration(s): {', '.join(unknown)}")
        configs = [by_name[n] for n in a.only.split(",")]
    if a.skip:
        configs = [c for c in configs if c["name"] not in a.skip.split(",")]
    start = time.time()
    rows: list[dict] = []
    for spec in configs:
        if time.time() - start > a.deadline:
            rows.append(dict(spec, error="not started: deadline"))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        t = time.time()
        try:
            r = subprocess.run(cmd, timeout=a.timeout, capture_output=True, text=True)
            found = [ln[4:] for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(found[-1]) if found else dict(spec, error=(r.stderr or r.stdout)[-2000:])
        except subprocess.TimeoutExpired:
            row = dict(spec, error=f"timeout after {a.timeout} s")
        row["wall_s"] = round(time.time() - t, 1)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("name", "peak_alloc_gib", "wall_s", "error")}), flush=True)
        if a.out:
            doc = {"command": " ".join(["python", "benchmarks/calibrate_memory.py"] + sys.argv[1:]), "rows": rows}
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
