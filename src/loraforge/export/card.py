"""The model card (README.md) of an export: where the weights come from, what each file is, how to run them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from .safety import human_size


@dataclass
class CardInfo:
    """The facts a model card states; filled in by the export workflow."""

    name: str
    base_model: str
    adapters: list[str] = field(default_factory=list)
    dtype: str | None = None
    quant_bits: int | None = None
    gguf_files: list[str] = field(default_factory=list)
    has_safetensors: bool = False
    has_modelfile: bool = False
    chat_format: str | None = None


def write_model_card(folder: Path, info: CardInfo) -> None:
    """Write ``folder/README.md``, listing every file already in ``folder`` with its size."""
    tags = ["loraforge"] + (["gguf"] if info.gguf_files else []) + (["lora", "merged"] if info.adapters else [])
    lines = ["---", f"base_model: {info.base_model}", "library_name: transformers", "tags:"]
    lines += [f"- {t}" for t in tags] + ["---", "", f"# {info.name}", ""]
    if info.adapters:
        lines.append(f"`{info.base_model}` with {len(info.adapters)} LoRA adapter(s) merged into its weights "
                     f"({', '.join(f'`{a}`' for a in info.adapters)}), exported by loraforge {__version__}.")
    else:
        lines.append(f"`{info.base_model}` exported by loraforge {__version__}.")
    lines.append("")
    if info.dtype:
        lines.append(f"- merged weights: {info.dtype}")
    if info.quant_bits:
        lines.append(f"- the adapter was trained with QLoRA on a {info.quant_bits}-bit base; it was merged into the "
                     f"base reloaded at {info.dtype or '16 bits'}, not into quantized weights")
    if info.chat_format:
        lines.append(f"- chat format: {info.chat_format} (the chat template is embedded in the tokenizer"
                     + (" and the GGUF" if info.gguf_files else "") + ")")
    lines += ["", "## Files", "", "| file | size |", "|---|---|"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.name != "README.md":
            lines.append(f"| `{path.relative_to(folder).as_posix()}` | {human_size(path.stat().st_size)} |")
    lines += ["", "## Use", ""]
    if info.has_safetensors:
        lines += ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "tok = AutoTokenizer.from_pretrained(\"PATH\")", "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
                  "```", ""]
    if info.gguf_files:
        first = info.gguf_files[0]
        lines += ["With llama.cpp (the chat template is read from the GGUF):", "", "```bash",
                  f"llama-cli -m {first} -cnv", "```", ""]
    if info.has_modelfile:
        lines += ["With Ollama:", "", "```bash", "ollama create my-model -f Modelfile", "ollama run my-model", "```", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
