"""Export group: merging adapters and writing safetensors or GGUF."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._field import arg


@dataclass
class ExportArguments:
    export_dir: Optional[str] = arg(None, "Folder of the exported model.")
    export_format: str = arg("safetensors", "What to write: merged safetensors, GGUF, or both.",
                             ("safetensors", "gguf", "both"))
    export_size: int = arg(5, "Shard size of exported safetensors, in GB.")
    export_device: str = arg("cpu", "Where adapters are merged: cpu, or auto (the GPU when there is one).",
                             ("cpu", "auto"))
    export_dtype: str = arg("auto", "Dtype of merged weights.", ("auto", "float16", "bfloat16", "float32"))
    export_quantization: str = arg("f16", "GGUF tensor type.",
                                   ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"))
    export_lora_gguf: bool = arg(False, "Also write the LoRA adapter alone as a GGUF adapter.")
    export_ollama: bool = arg(True, "Write an Ollama Modelfile (FROM, TEMPLATE, SYSTEM, stops) next to the GGUF.")
    export_overwrite: bool = arg(False, "Replace an existing export folder.")
    export_hub_model_id: Optional[str] = arg(None, "Repository to upload the export to.")
    export_hub_private: bool = arg(True, "Create the uploaded repository as private.")
    export_hub: str = arg("huggingface", "Where to upload.", ("huggingface", "modelscope"))
