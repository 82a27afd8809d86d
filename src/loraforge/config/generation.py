"""Generation group: decoding settings for predict, eval, chat and the API server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._field import arg


@dataclass
class GeneratingArguments:
    do_sample: bool = arg(False, "Sample instead of greedy decoding. Off by default so scores are reproducible.")
    temperature: float = arg(0.95, "Sampling temperature (only with do_sample).")
    top_p: float = arg(0.7, "Nucleus sampling mass (only with do_sample).")
    top_k: int = arg(50, "Top-k sampling (only with do_sample).")
    num_beams: int = arg(1, "Beam search width (1 = no beam search).")
    max_length: int = arg(1024, "Cap on prompt + answer tokens, used when max_new_tokens is 0 or less "
                          "(LLaMA-Factory's rule: a positive max_new_tokens takes precedence).")
    max_new_tokens: int = arg(1024, "Maximum number of generated tokens (0 or less: use max_length instead).")
    repetition_penalty: float = arg(1.0, "Penalty for repeated tokens (1.0 = none).")
    length_penalty: float = arg(1.0, "Length penalty for beam search.")
    skip_special_tokens: bool = arg(True, "Remove special tokens from decoded text.")
    default_system: Optional[str] = arg(None, "System prompt used by chat/api when none is given.")
    predict_batch_size: int = arg(32, "Batch size of loraforge predict / eval.")
    predict_seed: int = arg(42, "Seed used by predict when sampling.")
    predict_overwrite: bool = arg(
        False, "Start predict over instead of resuming after the rows already in generated_predictions.jsonl.")
    compare: Optional[str] = arg(
        None, "Variants for `loraforge eval --compare`: comma-separated (or a YAML list) of `base`, adapter "
        "folders and exported/merged model folders (default: base and the configured adapter).")
    max_context_length: Optional[int] = arg(
        None, "Longest prompt + answer that chat/api accept (default: the model's max_position_embeddings); "
        "longer prompts are refused with a clear error.")
