"""loraforge.export: merge adapters, write safetensors / GGUF / an Ollama Modelfile, upload (docs/export.md).

- :mod:`.workflow`: ``plan_export(cfg)`` and ``run_export(cfg)``, the visible flow;
- :mod:`.merge`: adapters folded into a 16/32-bit base (QLoRA adapters included), sharded safetensors;
- :mod:`.gguf`: the GGUF writer (architectures, tokenizer, quantization, LoRA adapters);
- :mod:`.modelfile`: Ollama Modelfile with a Go template equivalent to the chat template;
- :mod:`.upload`: Hugging Face Hub / ModelScope upload and the exact dry-run listing;
- :mod:`.safety`: temporary folder + rename, overwrite protection, free-disk check;
- :mod:`.card`: the model card; :mod:`.command`: ``loraforge export``.
"""
