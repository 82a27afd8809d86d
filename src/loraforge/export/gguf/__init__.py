"""GGUF export written in Python with the ``gguf`` package, for llama.cpp, Ollama and LM Studio.

- :mod:`.arch`: Hugging Face ``config.json`` -> GGUF hyper-parameters, tensor names and layouts.
- :mod:`.tokenizer`: byte-level BPE vocab, merges, token types, special ids, pre-tokenizer, chat template.
- :mod:`.quantize`: which GGML type each tensor gets; K-quants through llama-cpp-python.
- :mod:`.writer`: streams tensors one at a time from safetensors shards into the GGUF file.
- :mod:`.lora`: a PEFT LoRA adapter alone as a GGUF adapter (``llama_cpp.Llama(lora_path=...)``).
"""

import logging

from .quantize import GGUF_TYPES, KQUANT_TYPES, PYTHON_TYPES
from .writer import GGUFReport, convert_to_gguf

# The gguf writer logs every file plan at INFO; loraforge reports what it wrote itself.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

__all__ = ["GGUF_TYPES", "GGUFReport", "KQUANT_TYPES", "PYTHON_TYPES", "convert_to_gguf"]
