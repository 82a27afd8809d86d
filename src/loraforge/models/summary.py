"""What will be trained, in a few lines: parameter counts, adapted modules, quantization, dtype."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .quantization import describe_quantization

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass
class ModelSummary:
    """Counts and descriptions printed before training and written into the model card."""

    trainable_params: int
    total_params: int
    adapter_modules: str
    trainable_modules: str
    quantization: str
    dtype: str
    method: str
    adapter_names: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def lines(self) -> list[str]:
        """Human-readable lines (no trailing newlines)."""
        out = [
            f"fine-tuning: {self.method}",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({self.trainable_percent:.4f}%)",
        ]
        if self.adapter_modules:
            out.append(f"LoRA modules: {self.adapter_modules}")
        if self.trainable_modules and self.method != "lora":
            out.append(f"trainable modules: {self.trainable_modules}")
        out.append(f"quantization: {self.quantization}")
        out.append(f"weights dtype: {self.dtype}")
        return out


def logical_numel(param: Any) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit weight packs two values per byte, so count its shape."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for dim in state.shape:
            n *= int(dim)
        return n
    return param.numel()


def compress_module_names(names: list[str]) -> str:
    """``model.layers.0.self_attn.q_proj`` ... -> ``self_attn.q_proj,mlp.up_proj x 28 layers`` (short names).

    Modules inside numbered blocks are grouped by the set of blocks they appear in; the rest are listed as is.
    """
    per_leaf: dict[str, list[int]] = {}
    others: list[str] = []
    for name in names:
        match = _LAYER.match(name)
        if match is None:
            others.append(name.split(".")[-1])
            continue
        leaf = match.group(3).split(".")[-1]
        per_leaf.setdefault(leaf, [])
        if int(match.group(2)) not in per_leaf[leaf]:
            per_leaf[leaf].append(int(match.group(2)))
    groups: dict[tuple[int, ...], list[str]] = {}
    for leaf, ids in per_leaf.items():
        groups.setdefault(tuple(sorted(ids)), []).append(leaf)
    parts = [f"{','.join(leaves)} x {_layers(ids)}" for ids, leaves in groups.items()]
    parts += sorted(set(others), key=others.index)
    return "; ".join(parts)


def _layers(ids: tuple[int, ...]) -> str:
    if len(ids) == 1:
        return f"layer {ids[0]}"
    if list(ids) == list(range(ids[0], ids[-1] + 1)):
        return f"{len(ids)} layers" if ids[0] == 0 else f"{len(ids)} layers ({ids[0]}-{ids[-1]})"
    return f"{len(ids)} layers ({','.join(map(str, ids))})"


def summarize_model(model: Any) -> ModelSummary:
    """Trainable/total parameters (4-bit weights counted as logical parameters), adapted modules, quantization."""
    from peft.tuners.lora import LoraLayer

    trainable = total = 0
    seen: set[int] = set()
    dtypes: dict[str, int] = {}
    trainable_names: list[str] = []
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = logical_numel(param)
        total += n
        key = "4-bit" if param.__class__.__name__ == "Params4bit" else str(param.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + n
        if param.requires_grad:
            trainable += n
            trainable_names.append(name.rsplit(".", 1)[0])
    lora_names = [name for name, module in model.named_modules()
                  if isinstance(module, LoraLayer) and getattr(module, "lora_A", None) is not None
                  and len(module.lora_A) > 0]
    adapters = sorted(getattr(model, "peft_config", {}) or {})
    if lora_names:
        method = "lora"
    elif 0 < trainable < total:
        method = "freeze"
    elif trainable:
        method = "full"
    else:
        method = "none (inference)"
    base_names = [_strip_peft_prefix(n) for n in lora_names]
    trained = list(dict.fromkeys(_strip_peft_prefix(n) for n in trainable_names))
    dtype = ", ".join(f"{k} ({v / total:.0%})" for k, v in sorted(dtypes.items(), key=lambda kv: -kv[1])) \
        if total else "none"
    return ModelSummary(
        trainable_params=trainable, total_params=total, adapter_modules=compress_module_names(base_names),
        trainable_modules=compress_module_names(trained) if method in ("freeze", "full") else "",
        quantization=describe_quantization(model), dtype=dtype, method=method, adapter_names=adapters,
    )


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
