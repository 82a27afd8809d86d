"""The data flow: dataset_info.json -> rows -> Conversation -> Template.encode -> (packed) datasets -> cache.

    convs, report = load_conversations(cfg.data, ["alpaca_en_demo"], split="train")
    bundle = build_datasets(cfg, tokenizer, template, purpose="train")   # .train .eval .eval_conversations .report
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .cache import cache_root, compute_key, file_digest, load_bundle, save_bundle, template_fingerprint, \
    tokenizer_fingerprint
from .conversation import Conversation
from .encoding import IGNORE_INDEX, EncodeOptions, Encoded, encode_all, encode_pretrain
from .formats import RowProblem, convert_row
from .mixing import mix, parse_probs, sample_to, split_eval
from .packing import chunk_stream, pack, truncate
from .readers import data_files, read_rows
from .registry import DatasetAttr, get_dataset_attr, resolve_dataset_dir
from .report import DataReport, DatasetCount, Problem, TokenStats

logger = logging.getLogger(__name__)

# Data arguments that change how the work is done, not what it produces (kept out of the cache key).
PROCESS_ONLY_ARGS = ("overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size", "tokenized_path",
                     "data_cache_dir", "data_shared_file_system", "streaming", "buffer_size", "eval_num_beams",
                     "max_bad_ratio")  # max_bad_ratio only decides whether a build fails, not what it produces


@dataclass
class DatasetBundle:
    """What training and evaluation consume: tokenized datasets, held-out conversations and the report."""

    train: Any  # datasets.Dataset | None
    eval: Any  # datasets.Dataset | None
    eval_conversations: list[Conversation] | None
    report: DataReport


def split_names(names: str | Sequence[str] | None) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    if not names:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n and n.strip()]


def _attr(name: str, dataset_dir: Path | None) -> DatasetAttr:
    if dataset_dir is None:  # dataset_dir: ONLINE -> names are hub ids (LLaMA-Factory's convention)
        return DatasetAttr(name=name, load_from="hf_hub", path=name, columns={"prompt": "instruction",
                           "query": "input", "response": "output"}, entry={"hf_hub_url": name})
    return get_dataset_attr(name, dataset_dir)


def _dataset_dir(data_args, config_dir) -> Path | None:
    return None if data_args.dataset_dir == "ONLINE" else resolve_dataset_dir(data_args.dataset_dir, config_dir)


def _check_ratio(count: DatasetCount, report: DataReport, max_bad_ratio: float) -> None:
    if count.kept and count.bad_ratio <= max_bad_ratio:
        return
    mine = DataReport(datasets=[count], problems=[p for p in report.problems if p.dataset == count.name],
                      problem_count=count.dropped)
    shown = "\n".join(mine.problem_lines(5))
    if not count.kept:
        raise DataError(f"dataset {count.name!r} ({count.split}): no usable rows out of {count.read}"
                        + (f"; problems:\n{shown}" if shown else ""),
                        hint="check `formatting`, `columns` and `tags` in dataset_info.json against the file")
    raise DataError(
        f"dataset {count.name!r} ({count.split}): {count.dropped} of {count.read} rows are bad "
        f"({100 * count.bad_ratio:.1f}% > max_bad_ratio {100 * max_bad_ratio:g}%); first problems:\n{shown}",
        hint="fix those rows (run `loraforge data check CONFIG` for the report), or raise `max_bad_ratio`")


def _no_rows(attr: DatasetAttr, dataset_dir: Path | None, split: str) -> None:
    """An empty file (``[]``, nothing, or blank lines) is not a formatting problem: say so plainly."""
    if attr.load_from == "file":
        files = data_files(attr, dataset_dir or Path("."))
        where = str(files[0]) if len(files) == 1 else f"the {len(files)} files of {files[0].parent}"
    else:
        where = f"{attr.path} (split {attr.split})"
    raise DataError(f"dataset {attr.name!r} ({split}): {where} holds no rows",
                    hint="add rows (a JSON array of objects, or one JSON object per line), or remove "
                         f"{attr.name!r} from the config's dataset list")


def load_conversations(data_args, names: str | Sequence[str], *, split: str = "train",
                       config_dir: str | Path | None = None, seed: int = 42,
                       require_answer: bool = True) -> tuple[list[Conversation], DataReport]:
    """Read, convert, validate, sample and mix the datasets ``names`` (registered in dataset_info.json).

    ``split`` labels the report ("train"/"eval"); ``config_dir`` is where a relative ``dataset_dir`` is looked
    for when it is not under the working directory. Raises :class:`DataError` when a dataset has more bad rows
    than ``max_bad_ratio`` or nothing is left.
    """
    names = split_names(names)
    if not names:
        raise DataError(f"no dataset named for {split}", hint="set `dataset` (and `eval_dataset`) in the config")
    dataset_dir = _dataset_dir(data_args, config_dir)
    report = DataReport()
    parts: list[list[Conversation]] = []
    for name in names:
        attr = _attr(name, dataset_dir)
        limit = data_args.max_samples if attr.num_samples is None else None
        count = DatasetCount(name=name, split=split)
        report.datasets.append(count)
        convs: list[Conversation] = []
        for row in read_rows(attr, dataset_dir or Path("."), limit=limit):
            count.read += 1
            try:
                conv = convert_row(row, attr, require_answer=require_answer)
            except RowProblem as err:
                report.add_problem(count, Problem(name, row.file, row.index, err.field, err.message))
                continue
            conv.meta = {"dataset": name, "split": split, "file": row.file, "row": row.index}
            convs.append(conv)
        count.kept = len(convs)
        if count.read == 0 and limit != 0:
            _no_rows(attr, dataset_dir, split)
        _check_ratio(count, report, data_args.max_bad_ratio)
        if attr.num_samples:
            convs = sample_to(convs, attr.num_samples, seed)
            if data_args.max_samples:
                convs = convs[: data_args.max_samples]
            report.notes.append(f"{name}: num_samples={attr.num_samples} -> {len(convs)} examples")
        parts.append(convs)
    mixed = mix(parts, data_args.mix_strategy, parse_probs(data_args.interleave_probs, len(parts)), seed)
    if len(parts) > 1:
        report.notes.append(f"{split}: {len(mixed)} examples after mix_strategy={data_args.mix_strategy}")
    if not mixed:
        raise DataError(f"no {split} examples left after mixing {', '.join(names)}")
    return mixed, report


def _plan(d, purpose: str) -> tuple[list[str], list[str]]:
    """(train dataset names, eval dataset names) for ``purpose``."""
    train, evals = split_names(d.dataset), split_names(d.eval_dataset)
    if purpose in ("predict", "eval"):
        return ([], evals) if evals else (train if d.val_size else [], [] if d.val_size else train)
    return train, evals


def _key_parts(cfg, tokenizer, template, purpose: str, names: list[str], dataset_dir: Path | None,
               seed: int) -> dict[str, Any]:
    d = cfg.data
    data = {k: v for k, v in dataclasses.asdict(d).items() if k not in PROCESS_ONLY_ARGS}
    sources = {}
    for name in dict.fromkeys(names):
        attr = _attr(name, dataset_dir)
        files = ([(p.name, file_digest(p)) for p in data_files(attr, dataset_dir)]
                 if attr.load_from == "file" else [("hub", attr.path, attr.split, attr.subset)])
        sources[name] = {"entry": attr.entry, "files": files}
    return {"purpose": purpose, "stage": cfg.finetuning.stage, "seed": seed, "data_args": data,
            "datasets": sources, "template": template_fingerprint(template) if template is not None else None,
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def _stats(enc: Encoded, cutoff_len: int) -> TokenStats:
    full = enc.full_lengths
    if not len(full):
        return TokenStats(no_trained_tokens=len(enc.no_label))
    return TokenStats(examples=len(full), min=int(full.min()), mean=float(full.mean()),
                      p50=int(np.percentile(full, 50)), p95=int(np.percentile(full, 95)), max=int(full.max()),
                      truncated=int((full > cutoff_len).sum()), no_trained_tokens=len(enc.no_label),
                      total_tokens=int(len(enc.ids)), trained_tokens=int((enc.labels != IGNORE_INDEX).sum()))


def _tokenize(convs: list[Conversation], split: str, cfg, tokenizer, template, report: DataReport, *,
              allow_packing: bool = True):
    d = cfg.data
    pretrain = cfg.finetuning.stage == "pt"
    packing = d.packing if d.packing is not None else pretrain
    packing = (packing or d.neat_packing) and allow_packing
    if pretrain:
        texts = ["\n".join(m.content for m in c.messages) for c in convs]
        enc = encode_pretrain(texts, tokenizer, batch_size=d.preprocessing_batch_size)
        stats = _stats(enc, d.cutoff_len)
        enc = chunk_stream(enc, d.cutoff_len) if packing else truncate(enc, d.cutoff_len)
        stats.truncated = 0 if packing else stats.truncated
        if packing:
            stats.packed_sequences = len(enc.lengths)
            stats.packing_fill = float(len(enc.ids) / max(1, len(enc.lengths) * d.cutoff_len))
        report.tokens[split] = stats
        return enc.to_dataset()
    if template is None:
        raise DataError("a chat template is needed to tokenize conversations (stage sft)")
    options = EncodeOptions(cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt, mask_history=d.mask_history,
                            enable_thinking=d.enable_thinking)
    enc = encode_all(convs, tokenizer, template, options, num_workers=d.preprocessing_num_workers,
                     batch_size=d.preprocessing_batch_size)
    _record_encode_failures(enc, convs, split, report, d.max_bad_ratio)
    stats = _stats(enc, d.cutoff_len)
    report.tokens[split] = stats
    if not len(enc.lengths):
        why = (f"{len(enc.no_label)} had no trained token left after truncation to cutoff_len={d.cutoff_len}"
               if enc.no_label else f"{len(enc.errors)} could not be rendered by the template")
        raise DataError(f"no {split} example is left after tokenization: {why}",
                        hint="raise cutoff_len" if enc.no_label else "see the problems listed above")
    if not packing:
        return enc.to_dataset()
    packed, positions = pack(enc, d.cutoff_len, neat=d.neat_packing)
    stats.packed_sequences = len(packed.lengths)
    stats.packing_fill = float(len(packed.ids) / max(1, len(packed.lengths) * d.cutoff_len))
    return packed.to_dataset(position_ids=positions)


def _tokenize_each(convs: list[Conversation], names: list[str], cfg, tokenizer, template, report: DataReport):
    """``eval_on_each_dataset``: one tokenized set per eval dataset, as a ``DatasetDict`` keyed by name; the
    Trainer evaluates each and reports ``eval_<name>_loss`` (LLaMA-Factory's meaning)."""
    import datasets

    parts = {}
    for name in dict.fromkeys(names):
        group = [c for c in convs if c.meta.get("dataset") == name]
        if group:
            parts[name] = _tokenize(group, f"eval:{name}", cfg, tokenizer, template, report)
    return datasets.DatasetDict(parts)


def _record_encode_failures(enc: Encoded, convs: list[Conversation], split: str, report: DataReport,
                            max_bad_ratio: float) -> None:
    counts = {(c.name, c.split): c for c in report.datasets}
    touched: dict[int, DatasetCount] = {}
    for index, message in enc.errors:
        meta = convs[index].meta  # the split where the row was read (a val_size split keeps "train")
        key = (str(meta.get("dataset")), str(meta.get("split", split)))
        count = counts.get(key)
        if count is None:
            count = counts[key] = DatasetCount(name=key[0], split=key[1], read=1, kept=1)
            report.datasets.append(count)
        report.add_problem(count, Problem(count.name, meta.get("file", "?"), meta.get("row", -1), "template",
                                          message))
        count.kept -= 1
        touched[id(count)] = count
    for count in touched.values():
        _check_ratio(count, report, max_bad_ratio)
    if enc.no_label:
        where = ", ".join(convs[i].source for i in enc.no_label[:3])
        report.notes.append(f"{split}: {len(enc.no_label)} example(s) dropped with no trained token left after "
                            f"truncation to cutoff_len (e.g. {where})")


def build_datasets(cfg, tokenizer, template, *, purpose: str = "train") -> DatasetBundle:
    """Tokenized train/eval datasets for ``cfg`` (cached; see :mod:`.cache`), the held-out conversations and the
    report. ``purpose`` "train" (also "data") builds `dataset` (+ `eval_dataset` or a `val_size` split);
    "predict"/"eval" build only the evaluation side.
    """
    d = cfg.data
    seed = int(cfg.training.seed if cfg.training is not None else cfg.explicit.get("seed", 42))
    config_dir = Path(cfg.source).resolve().parent if cfg.source else None
    train_names, eval_names = _plan(d, purpose)
    if not train_names and not eval_names:
        raise DataError(f"no dataset to build for {purpose}", hint="set `dataset` (and/or `eval_dataset`)")
    dataset_dir = _dataset_dir(d, config_dir)
    key_parts = _key_parts(cfg, tokenizer, template, purpose, train_names + eval_names, dataset_dir, seed)
    key = compute_key(key_parts)
    folder = Path(d.tokenized_path) if d.tokenized_path else cache_root(d.data_cache_dir) / key
    if not d.overwrite_cache:
        hit = load_bundle(folder)
        if hit is not None and d.tokenized_path and _stored_key(folder) != key:
            logger.warning("tokenized_path %s was built from other data or arguments; using it as is "
                           "(set overwrite_cache: true to rebuild)", folder)
        if hit is not None:
            train, eval_, convs, report = hit
            report.cache = f"loaded from {folder}"
            return DatasetBundle(train, eval_, convs, report)

    report = DataReport()
    require_answer = cfg.finetuning.stage != "pt"
    common = {"config_dir": config_dir, "seed": seed, "require_answer": require_answer}
    train_convs = eval_convs = None
    if train_names:
        train_convs, part = load_conversations(d, train_names, split="train", **common)
        report.merge(part)
    if eval_names:
        eval_convs, part = load_conversations(d, eval_names, split="eval", **common)
        report.merge(part)
    if train_convs is not None and d.val_size and not eval_names:
        train_convs, eval_convs = split_eval(train_convs, d.val_size, seed)
        report.notes.append(f"val_size={d.val_size:g}: {len(eval_convs)} examples held out for evaluation")
        if purpose in ("predict", "eval"):
            train_convs = None
    if d.streaming:
        report.notes.append("streaming: true is accepted but loraforge reads the files fully")
    train = _tokenize(train_convs, "train", cfg, tokenizer, template, report) if train_convs else None
    eval_ = None
    if eval_convs and d.eval_on_each_dataset and eval_names and purpose != "predict":
        eval_ = _tokenize_each(eval_convs, eval_names, cfg, tokenizer, template, report)
    elif eval_convs:
        eval_ = _tokenize(eval_convs, "eval", cfg, tokenizer, template, report, allow_packing=purpose != "predict")
    save_bundle(folder, train, eval_, eval_convs, report, {"key": key, "parts": key_parts})
    report.cache = f"built and saved to {folder}"
    return DatasetBundle(train, eval_, eval_convs, report)


def _stored_key(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "key.json").read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
