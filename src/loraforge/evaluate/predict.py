"""`loraforge predict`: batched generation over the eval set, written as it goes, then scored.

The visible flow of :func:`run_predict`:

    eval conversations -> prompt ids (template) -> batches sorted by length -> left-padded ``generate`` with the
    KV cache (greedy unless ``do_sample``) -> cut at the template's stop tokens -> generated_predictions.jsonl
    (one flushed line per sample, with its index; a rerun resumes after the rows already there) -> metrics ->
    predict_results.json and all_results.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..disk import disk_full_guard
from ..errors import ConfigError, DataError, LoraforgeError
from ..serve.engine import DEFAULT_THOUGHT_TAGS, SamplingParams, reasoning_splitter_for
from ..serve.text import ReasoningSplitter
from .results import PredictionFile, write_results

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"


def batch_plan(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so running out of memory shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batch(model: Any, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                   pad_id: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """Generate for several prompts at once (left padding, KV cache); return each row's new token ids, cut
    before the first stop token."""
    import torch

    device = getattr(model, "device", torch.device("cpu"))
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             eos_token_id=list(stop_ids) or None, pad_token_id=pad_id, use_cache=True,
                             **params.generate_kwargs())
    stops = set(stop_ids)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        results.append(row[:cut])
    return results


def split_reasoning(text: str, splitter: ReasoningSplitter) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole generated text; the same rules as the streaming chat."""
    pieces = splitter.feed(text) + splitter.flush()
    answer = "".join(t for k, t in pieces if k == "content")
    if not splitter.saw_reasoning:
        return None, answer
    return "".join(t for k, t in pieces if k == "reasoning").rstrip(), answer


def _prompt_and_label(conv: Any) -> tuple[Any, str]:
    from ..data.conversation import ANSWER_ROLES, Conversation

    if not conv.messages or conv.messages[-1].role not in ANSWER_ROLES:
        raise DataError(f"{conv.source or 'an eval sample'}: the last message must be the assistant's answer "
                        "(the label) for predict", hint="check the eval dataset's format in dataset_info.json")
    prompt = Conversation(messages=conv.messages[:-1], system=conv.system, tools=conv.tools, source=conv.source)
    return prompt, conv.messages[-1].content


@dataclass
class EvalPrompts:
    """The eval set as model inputs: prompt token ids, the decoded prompt text, and the label."""

    ids: list[list[int]]
    texts: list[str]
    labels: list[str]


def eval_prompts(cfg: "RunConfig", tokenizer: Any, template: Any) -> EvalPrompts:
    """Encode every eval conversation up to its generation prompt; the last answer is the label."""
    from ..data.loader import build_datasets

    conversations = build_datasets(cfg, tokenizer, template, purpose="predict").eval_conversations
    if not conversations:
        raise DataError("the eval set is empty", hint="set `eval_dataset`, or `dataset` with `val_size`")
    out = EvalPrompts([], [], [])
    for conv in conversations:
        prompt, label = _prompt_and_label(conv)
        ids = list(template.encode_prompt(prompt, tokenizer, enable_thinking=cfg.data.enable_thinking))
        out.ids.append(ids)
        out.texts.append(tokenizer.decode(ids, skip_special_tokens=False))
        out.labels.append(label)
    return out


def run_predict(cfg: "RunConfig", model: Any = None, tokenizer: Any = None, *, template: Any = None,
                output_dir: str | Path | None = None) -> dict[str, float]:
    """Generate for every eval sample, write the predictions and metrics under ``output_dir`` (default: the
    config's ``output_dir``), and return the ``predict_*`` metrics. Loads the model when none is given."""
    from ..data.templates import resolve_template
    from .metrics import compute_metrics

    gen = cfg.generation
    if gen.predict_batch_size <= 0:
        raise ConfigError([f"`predict_batch_size` must be positive, got {gen.predict_batch_size}"], source=cfg.source)
    out_dir = Path(output_dir or (cfg.training.output_dir if cfg.training else "saves/predict"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from ..models.loader import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    template = template or resolve_template(cfg.data, tokenizer)
    prompts = eval_prompts(cfg, tokenizer, template)
    records = PredictionFile(out_dir / PREDICTIONS_FILE, prompts.texts, overwrite=gen.predict_overwrite)
    todo = [i for i in range(len(prompts.ids)) if i not in records.done]
    if records.done:
        logger.info("resuming: %d of %d predictions already in %s", len(records.done), len(prompts.ids), records.path)

    start = time.perf_counter()
    new_tokens = 0
    if todo:
        if model is None:
            from ..models.loader import load_model

            model = load_model(cfg, tokenizer, is_trainable=False)
        with disk_full_guard(out_dir, None, what=f"write {PREDICTIONS_FILE}", error=LoraforgeError, removed=False,
                             hint="free some space and run the same command: predict resumes after the rows "
                                  "already written"):
            new_tokens = _generate_missing(cfg, model, tokenizer, template, prompts, todo, records)
    runtime = time.perf_counter() - start

    rows = records.finalize()
    scores = compute_metrics([r["predict"] for r in rows], [r["label"] for r in rows])
    metrics: dict[str, float] = {f"predict_{k}": round(v, 4) for k, v in scores.items()}
    rate = (lambda n: round(n / runtime, 3)) if todo and runtime > 0 else (lambda n: 0.0)
    metrics.update({"predict_samples": len(rows), "predict_runtime": round(runtime, 4),
                    "predict_samples_per_second": rate(len(todo)), "predict_generated_tokens": new_tokens,
                    "predict_tokens_per_second": rate(new_tokens)})
    write_results(out_dir, "predict", metrics)
    logger.info("predictions in %s; metrics in %s", records.path, out_dir / "predict_results.json")
    return metrics


def _generate_missing(cfg: "RunConfig", model: Any, tokenizer: Any, template: Any, prompts: EvalPrompts,
                      todo: list[int], records: PredictionFile) -> int:
    """Generate the samples in ``todo`` batch by batch, appending each batch's rows; return the new tokens."""
    from tqdm.auto import tqdm

    gen = cfg.generation
    # LLaMA-Factory's eval_num_beams: the beam width of evaluation generation, num_beams when unset
    params = SamplingParams.from_config(gen, num_beams=cfg.data.eval_num_beams)
    stop_ids = list(template.stop_token_ids(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    tags = tuple(getattr(template, "thought_words", None) or DEFAULT_THOUGHT_TAGS)
    thinks = bool(getattr(template, "supports_thinking", tags[0] in tokenizer.get_vocab()))
    if gen.do_sample:
        from transformers import set_seed

        set_seed(gen.predict_seed)
    was_training = getattr(model, "training", False)
    model.eval()
    new_tokens = 0
    bar = tqdm(total=len(prompts.ids), initial=len(records.done), desc="predict", unit="sample")
    try:
        for batch in batch_plan([len(prompts.ids[i]) for i in todo], gen.predict_batch_size):
            indices = [todo[j] for j in batch]
            # each row's own budget (max_length counts its own prompt, not the batch's padded width)
            budgets = [params.new_token_budget(len(prompts.ids[i])) for i in indices]
            batch_params = replace(params, max_new_tokens=max(budgets))
            outputs = generate_batch(model, [prompts.ids[i] for i in indices], batch_params, pad_id=pad_id,
                                     stop_ids=stop_ids)
            outputs = [ids[:budget] for ids, budget in zip(outputs, budgets)]
            rows = []
            for i, ids in zip(indices, outputs):
                new_tokens += len(ids)
                text = tokenizer.decode(ids, skip_special_tokens=gen.skip_special_tokens)
                splitter = reasoning_splitter_for(tokenizer, prompts.ids[i], tags, supports_thinking=thinks)
                reasoning, answer = split_reasoning(text, splitter)
                rows.append({"index": i, "prompt": prompts.texts[i], "predict": answer, "label": prompts.labels[i],
                             **({"reasoning": reasoning} if reasoning is not None else {})})
            records.append(rows)  # flushed to disk: an interruption keeps every finished batch
            bar.update(len(rows))
    finally:
        bar.close()
        records.close()
        if was_training:
            model.train()
    return new_tokens
