"""The textbook view: the hand-worked figures for a 1B-parameter model beside the realistic estimate.

The worked example counts bytes per parameter only (GB = 10^9 bytes):

- full fine-tuning: 16-bit weights (2 B) + 16-bit gradients (2 B) + Adam's two moments in 16 bits (2 x 2 B)
  = 8 B per parameter -> 8 GB;
- LoRA: frozen 16-bit weights (2 GB) + an adapter holding 0.1% of the parameters (1M) at the same 8 B each
  (0.008 GB) -> 2.008 GB;
- QLoRA: 4-bit weights (0.5 B per parameter, 0.5 GB) + quantization constants at 0.4 bit per parameter
  (0.05 GB) + the same adapter (0.008 GB) -> 0.558 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .model import CUDA_CONTEXT, LOGITS_BYTES_PER_VOCAB, activation_bytes, estimate_memory, trainable_params
from .scenario import Scenario

GB = 1e9
TEXTBOOK_PARAMS = 1_000_000_000
ADAPTER_SHARE = 0.001  # LoRA adapter = 0.1% of the parameters
BYTES_TRAINED = 2 + 2 + 4  # 16-bit weight + 16-bit gradient + two 16-bit Adam moments
QUANT_CONSTANT_BITS = 0.4


@dataclass(frozen=True)
class TextbookFigure:
    """One method under the textbook assumptions: parts in GB and their sum."""

    method: str
    parts: dict[str, float]

    @property
    def total_gb(self) -> float:
        """Sum of the parts, rounded to the byte (GB)."""
        return round(sum(self.parts.values()), 9)


def textbook_figures(params: int = TEXTBOOK_PARAMS) -> list[TextbookFigure]:
    """Full, LoRA and QLoRA memory for ``params`` parameters under the textbook assumptions."""
    adapter = params * ADAPTER_SHARE * BYTES_TRAINED / GB
    return [
        TextbookFigure("full", {"weights (2 B)": params * 2 / GB, "gradients (2 B)": params * 2 / GB,
                                "Adam moments (2 x 2 B)": params * 4 / GB}),
        TextbookFigure("lora", {"frozen weights (2 B)": params * 2 / GB, "adapter (0.1% x 8 B)": adapter}),
        TextbookFigure("qlora-4", {"4-bit weights (0.5 B)": params * 0.5 / GB,
                                   "quantization constants (0.4 bit)": params * QUANT_CONSTANT_BITS / 8 / GB,
                                   "adapter (0.1% x 8 B)": adapter}),
    ]


def _explain(method: str, s: Scenario) -> list[str]:
    a = s.arch
    b = estimate_memory(s)
    share = trainable_params(s) / a.total_params()
    acts = activation_bytes(s)
    logits = LOGITS_BYTES_PER_VOCAB * a.vocab_size * s.tokens
    common = [
        f"activations: {acts / GB:.2f} GB for {s.tokens} tokens "
        f"({'checkpoints only' if s.gradient_checkpointing else 'every block keeps its saved tensors'}); "
        "the textbook has none",
        f"logits/loss: {LOGITS_BYTES_PER_VOCAB:g} B x {a.vocab_size} vocabulary entries per token = "
        f"{logits / GB:.2f} GB (fp32 log-softmax, its gradient and the input gradient at the loss backward)",
        f"framework: CUDA context {CUDA_CONTEXT / GB:.2f} GB, allocator margin and cuBLAS workspaces",
    ]
    if b.phase == "optimizer step":
        common[:2] = [f"the peak is the optimizer step, when activations ({acts / GB:.2f} GB) and logits "
                      f"({logits / GB:.2f} GB) are already freed; they count at the loss backward instead"]
    if method == "full":
        head = [f"mixed precision keeps fp32 master weights, fp32 gradients and fp32 Adam moments: 4 + 4 + 8 = "
                f"16 B per parameter (not 8), plus a 4 B temporary in the foreach AdamW step "
                f"(peak at the {b.phase})"]
    elif method == "lora":
        head = [f"the adapter (rank {s.lora_rank} on {len(s.lora_targets)} module kinds) is {share:.2%} of the "
                f"parameters, not 0.1%, and is trained in fp32: 4 + 4 + 8 = 16 B per adapter parameter"]
    else:
        emb = a.embedding_params + a.lm_head_params
        head = [f"embeddings and lm_head stay 16-bit ({emb / 1e6:.0f}M parameters = {emb * 2 / GB:.2f} GB); only "
                "the decoder's linear layers are 4-bit",
                "NF4 constants are 0.127 bit per weight with double quantization (0.5 bit without), not 0.4",
                "loraforge keeps the norm weights in fp32 for QLoRA, so the residual stream (and checkpoints) "
                "are fp32"]
    return head + common


def textbook_report(s: Scenario) -> dict[str, Any]:
    """Textbook figures (1B parameters and the model's own count) beside the realistic estimate of ``s``."""
    real_params = s.arch.total_params()
    rows = []
    for fig_1b, fig_model in zip(textbook_figures(), textbook_figures(real_params)):
        variant = replace(s, method=fig_1b.method)
        b = estimate_memory(variant)
        rows.append({
            "method": fig_1b.method,
            "textbook_1b_gb": fig_1b.total_gb,
            "textbook_1b_parts_gb": fig_1b.parts,
            "textbook_this_model_gb": round(fig_model.total_gb, 3),
            "realistic_gb": round(b.total / GB, 3),
            "realistic_parts_gb": {k: round(v, 3) for k, v in (
                ("weights", b.weights / GB), ("trained weights", b.adapter / GB), ("gradients", b.gradients / GB),
                ("optimizer", b.optimizer / GB), ("activations", b.activations / GB), ("logits", b.logits / GB),
                ("temporaries + framework", (b.temporaries + b.framework) / GB))},
            "why_different": _explain(fig_1b.method, variant),
        })
    offload = ("what offload really moves: ZeRO offload puts optimizer states (and, with offload_param, the "
               "weights) in host RAM. For LoRA/QLoRA those states are a few MB; activations and logits, which "
               "dominate, stay on the GPU, so offload rescues full fine-tuning, not LoRA.")
    return {"assumptions": __doc__.split("\n\n", 1)[1].strip(), "model": s.arch.name,
            "model_params": real_params, "tokens": s.tokens, "rows": rows, "offload": offload}


def textbook_lines(report: dict[str, Any]) -> list[str]:
    """The textbook report for the terminal."""
    lines = ["textbook view:"]
    lines += ["  " + ln if ln else "" for ln in report["assumptions"].splitlines()]
    lines.append(f"  realistic: {report['model']} ({report['model_params'] / 1e9:.2f}B parameters), "
                 f"{report['tokens']} tokens per micro-batch")
    lines.append("  method    textbook 1B   textbook this model   realistic")
    for row in report["rows"]:
        lines.append(f"  {row['method']:8s} {row['textbook_1b_gb']:9.3f} GB {row['textbook_this_model_gb']:14.3f} GB"
                     f" {row['realistic_gb']:12.2f} GB")
    for row in report["rows"]:
        lines.append(f"  why {row['method']} differs:")
        lines += [f"    - {why}" for why in row["why_different"]]
    lines.append("  " + report["offload"])
    return lines
