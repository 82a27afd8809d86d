"""Data group: which datasets, how they are rendered with a template, split, packed and cached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._field import arg


@dataclass
class DataArguments:
    template: Optional[str] = arg(
        None, "Chat template name (qwen, qwen3, qwen3_nothink, chatml, llama3, mistral, gemma, alpaca, default, "
        "empty, ...; LLaMA-Factory's names too), `tokenizer` (the model's own chat template), a path to a template "
        "YAML, or unset: the named template that renders like the model's own, else `tokenizer`.")
    prompt_template: Optional[str] = arg(
        None, "Plain-text prompt template: a format string with {instruction}, {question}, {reasoning}, {answer} "
        "(and {eos_token}) placeholders, or a path to a .txt file holding one. Replaces `template`.")
    dataset: Optional[str] = arg(None, "Training dataset name(s) from dataset_info.json, comma-separated.")
    eval_dataset: Optional[str] = arg(None, "Evaluation dataset name(s), comma-separated.")
    dataset_dir: str = arg("data", "Folder holding dataset_info.json and the data files.")
    cutoff_len: int = arg(2048, "Maximum tokens per example after tokenization; longer ones are truncated.")
    train_on_prompt: bool = arg(False, "Also compute the loss on prompt tokens.")
    mask_history: bool = arg(False, "Train only on the last assistant turn of each conversation.")
    streaming: bool = arg(False, "Stream datasets (accepted; loraforge reads files fully).")
    mix_strategy: str = arg("concat", "How several datasets are mixed.", ("concat", "interleave_under", "interleave_over"))
    interleave_probs: Optional[str] = arg(None, "Comma-separated sampling probabilities for interleaving.")
    overwrite_cache: bool = arg(False, "Rebuild the tokenized dataset cache.")
    preprocessing_batch_size: int = arg(1000, "Rows per tokenization batch.")
    preprocessing_num_workers: Optional[int] = arg(None, "Worker processes for tokenization.")
    max_samples: Optional[int] = arg(None, "Keep at most this many rows of each dataset.")
    eval_num_beams: Optional[int] = arg(None, "Beam width of `loraforge predict` / `eval` generation (default: num_beams).")
    ignore_pad_token_for_loss: bool = arg(
        True, "Padding positions get label -100 (no loss); false labels them with the pad token id, so the model "
        "is also trained to predict padding.")
    val_size: float = arg(0.0, "Held-out share (0-1) or count (>=1) of the training data for evaluation.")
    eval_on_each_dataset: bool = arg(
        False, "Evaluate each `eval_dataset` separately: one eval_<name>_loss per dataset instead of one eval_loss.")
    packing: Optional[bool] = arg(None, "Pack several examples into each sequence of cutoff_len tokens.")
    neat_packing: bool = arg(False, "Packing where examples cannot attend to each other (implies packing).")
    tool_format: Optional[str] = arg(None, "Tool-call format (default: the template's own).")
    default_system: Optional[str] = arg(None, "System prompt used when a sample has none (overrides the template's).")
    enable_thinking: Optional[bool] = arg(
        True, "Qwen3-style templates (LLaMA-Factory's meaning): true = an empty think block is added to answers "
        "without reasoning and trained; false = reasoning dropped, the empty block goes in the prompt (no-think "
        "mode); null = samples with reasoning keep it, samples without get the empty block in the prompt.")
    keep_reasoning_history: bool = arg(False, "Keep reasoning of earlier assistant turns (Qwen3 drops it).")
    tokenized_path: Optional[str] = arg(None, "Save/load the tokenized dataset at this path.")
    data_cache_dir: Optional[str] = arg(
        None, "Folder of the tokenized-dataset cache (default: $LORAFORGE_HOME/data_cache). Entries are keyed by "
        "the data files' content, the template, the tokenizer and every data argument.")
    data_shared_file_system: bool = arg(
        False, "All nodes share the cache folder (multi-node): only the global main process builds the tokenized "
        "data, instead of the main process of each node.")
    max_bad_ratio: float = arg(0.05, "Fail when more than this share of rows is malformed.")
