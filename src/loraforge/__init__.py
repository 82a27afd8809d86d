"""loraforge: fine-tune LLMs with LoRA and QLoRA from one YAML file and one command."""

__version__ = "0.1.0"
