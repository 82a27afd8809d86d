"""Bytes that autograd keeps per token for the backward pass, counted tensor by tensor.

The count follows what PyTorch saves when it runs a Hugging Face decoder block (RMSNorm, q/k/v/o, q/k-norm,
RoPE, SDPA flash attention, SwiGLU MLP) under loraforge's training setup:

- mixed precision (bf16/fp16) runs under ``torch.autocast`` with trainable weights in fp32, so a linear whose
  input is not in the compute dtype saves its own cast copy of the input;
- peft's ``lora.Linear`` (16-bit base) casts its input to the fp32 adapter dtype first, so every adapted module
  saves its own compute-dtype copy; peft's bitsandbytes LoRA layers skip that cast under autocast;
- QLoRA keeps the norm weights in fp32 (``models.quantization.prepare_for_kbit_training``); bitsandbytes
  layers return their input dtype, so from the first block on the residual stream is fp32;
- bitsandbytes 8-bit layers store their input on the autograd context, outside the saved-tensor hooks that
  checkpointing relies on, so those inputs stay alive for every block even with checkpointing.

Every function returns bytes per token; multiply by batch x sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architectures import LINEAR_NAMES
from .scenario import Scenario

INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_hidden"}


@dataclass(frozen=True)
class Regime:
    """Dtypes (bytes per element) of the tensors flowing through one block."""

    compute: int  # matmul / attention dtype
    residual: int  # residual stream between blocks
    normed: int  # output of the two RMSNorms
    mlp: int  # gate/up outputs and the SwiGLU product
    autocast: bool  # torch.autocast is on (mixed precision without DeepSpeed)
    fp32_adapters: bool  # LoRA weights are fp32 while the base computes in 16 bits


def uses_deepspeed(s: Scenario) -> bool:
    """DeepSpeed ZeRO (stage >= 1) runs the module in the compute dtype itself, without torch.autocast."""
    return s.zero_stage >= 1


def norms_fp32(s: Scenario) -> bool:
    """Norm weights in fp32: QLoRA (loraforge's loader upcasts them) or ``upcast_layernorm``."""
    if s.upcast_norms is not None:
        return s.upcast_norms
    return s.quant_bits is not None and not s.fast_path


def regime(s: Scenario, *, trainable_layer: bool) -> Regime:
    """The dtypes of one block for this scenario (a frozen block of freeze tuning differs from a trained one)."""
    if s.precision == "fp32":
        return Regime(4, 4, 4, 4, autocast=False, fp32_adapters=False)
    amp = s.precision in ("bf16", "fp16") and not uses_deepspeed(s)
    if not amp:  # pure bf16 or DeepSpeed: every weight and activation in 16 bits
        return Regime(2, 2, 2, 2, autocast=False, fp32_adapters=False)
    fp32_norm_weight = norms_fp32(s) or trainable_layer
    quant = s.quant_bits is not None
    residual = 4 if (s.method == "full" or (quant and fp32_norm_weight)) else 2
    normed = 4 if (fp32_norm_weight or residual == 4) else 2
    mlp = normed if quant else 2
    return Regime(2, residual, normed, mlp, autocast=True, fp32_adapters=s.uses_lora)


def _dims(s: Scenario) -> dict[str, int]:
    a = s.arch
    return {"attn_in": a.hidden_size, "attn_out": a.q_dim, "mlp_in": a.hidden_size, "mlp_hidden": a.intermediate_size}


def _input_dtypes(r: Regime) -> dict[str, int]:
    return {"attn_in": r.normed, "attn_out": r.compute, "mlp_in": r.normed, "mlp_hidden": r.mlp}


def int8_held_inputs(s: Scenario, r: Regime) -> float:
    """Bytes per token per block that bitsandbytes 8-bit layers keep on their autograd context."""
    if s.quant_bits != 8:
        return 0.0
    dims, dtypes = _dims(s), _input_dtypes(r)
    shared = sum(dims[k] * dtypes[k] for k in dims)
    outliers = s.int8_outlier_fraction * sum(dims[INPUT_OF[m]] * dtypes[INPUT_OF[m]] for m in LINEAR_NAMES)
    return shared + outliers


def block_bytes_per_token(s: Scenario, *, trainable_layer: bool) -> float:
    """Saved tensors of one decoder block without checkpointing (bytes per token)."""
    a, r = s.arch, regime(s, trainable_layer=trainable_layer)
    h, q, kv, i = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size
    dims, dtypes = _dims(s), _input_dtypes(r)
    quant = s.quant_bits is not None
    lora_targets = set(s.lora_targets) if s.uses_lora else set()
    shared: set[str] = set()  # inputs saved as they are (one copy however many modules read them)
    copies = 0.0  # per-module cast copies
    for module in LINEAR_NAMES:
        key = INPUT_OF[module]
        as_is = dtypes[key] == r.compute
        if trainable_layer and not s.uses_lora:  # the base weight itself is trained
            if as_is or not r.autocast:
                shared.add(key)
            else:
                copies += r.compute * dims[key]
        if module in lora_targets:
            if r.autocast and r.fp32_adapters and not quant:
                copies += r.compute * dims[key]  # peft lora.Linear casts to fp32, autocast casts back
            elif as_is or not r.autocast:
                shared.add(key)
            else:
                copies += r.compute * dims[key]
            copies += r.compute * s.lora_rank  # lora_A output, saved by lora_B
    saved = copies + sum(dims[k] * dtypes[k] for k in shared)
    norm_extra = r.residual * h if trainable_layer else 0  # the normed operand, for the norm weight's grad
    saved += 2 * (4 * h + norm_extra)  # each RMSNorm keeps its input in fp32
    if a.qk_norm:
        q_out = r.normed if quant else r.compute
        saved += 4 * (q + kv) + (q_out * (q + kv) if trainable_layer else 0)
    saved += r.compute * (2 * q + 2 * kv)  # flash attention keeps q, k, v and its output
    saved += 3 * r.mlp * i  # SiLU keeps its input; the product keeps both factors
    if quant and s.quant_bits == 8:
        saved += int8_held_inputs(s, r) - sum(dims[k] * dtypes[k] for k in shared)
    return float(saved)


def fast_block_bytes_per_token(s: Scenario) -> float:
    """Saved tensors of one decoder block on loraforge's fast path, without checkpointing (bytes per token).

    Per block: the two RMSNorm inputs and outputs (the outputs are the LoRA projections' shared inputs),
    q and k before their norms (Qwen3), the attention's q, K and V at their own (grouped) head count, and its
    output, SwiGLU's two inputs and its output, and each projection's rank-r product. All 16-bit. (K/V are no
    longer repeated to the query heads: SDPA takes them grouped, and so does the varlen kernel; measured on an
    H200, Qwen3-8B 2048 x 4 without checkpointing, 47.8 -> 44.5 GiB.)"""
    a, c = s.arch, 2.0
    h, q, kv, i, r = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size, s.lora_rank
    saved = 4 * h + (q + kv if a.qk_norm else 0) + 2 * q + 2 * kv + 3 * i + len(s.lora_targets) * r
    return c * saved


def replay_kept_weight_bytes(s: Scenario) -> float:
    """Dequantized weights a replayed (checkpointed) block holds for its backward on the fast path: q/k/v/o and
    gate/up, in 16 bits (e4m3 under `fp8: auto` on Hopper: half of this; the estimate keeps the larger).
    down_proj's base GEMM is skipped in the replay, and a 16-bit base is used in place (nothing extra)."""
    if s.method not in ("qlora-4", "qlora-8"):
        return 0.0
    a = s.arch
    return 2.0 * 2 * a.hidden_size * (a.q_dim + a.kv_dim + a.intermediate_size)


def checkpoint_bytes_per_token(s: Scenario, *, trainable_layer: bool) -> float:
    """What one checkpointed block keeps between forward and backward (bytes per token)."""
    r = regime(s, trainable_layer=trainable_layer)
    return float(r.residual * s.arch.hidden_size + int8_held_inputs(s, r))
