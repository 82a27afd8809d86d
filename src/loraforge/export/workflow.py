"""The export flow: plan -> check disk -> merge -> safetensors -> GGUF -> Modelfile -> card -> rename -> upload.

    plan = plan_export(cfg)          # no weights loaded: sizes from safetensors headers, every check up front
    result = run_export(cfg)         # writes into a temporary folder, renamed into export_dir when complete
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..disk import disk_full_guard
from ..errors import ExportError
from .safety import SPACE_HINT, check_destination, check_free_space, human_size, recover_interrupted, staging_folder
from .upload import UploadPlan, list_folder, plan_upload, upload

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)

MERGED_SCRATCH = ".merged"  # merged weights kept only to feed the GGUF writer (export_format: gguf)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass
class ExportPlan:
    """Everything an export will do, decided before any weights are loaded."""

    base: str
    base_dir: Path
    adapters: list[str]
    quant_bits: int | None
    dtype: str
    export_dir: Path
    write_safetensors: bool
    gguf_name: str | None
    quantization: str
    lora_gguf_names: list[str]
    modelfile: bool
    merge: bool
    n_params: int
    files: list[tuple[str, int]] = field(default_factory=list)
    scratch_bytes: int = 0
    upload: UploadPlan | None = None

    @property
    def needed_bytes(self) -> int:
        return sum(size for _, size in self.files) + self.scratch_bytes

    def lines(self) -> list[str]:
        """The plan as printed before exporting (and by --dry-run)."""
        out = [f"export {self.base}" + (f" + {len(self.adapters)} adapter(s)" if self.adapters else "")
               + f" -> {self.export_dir}"]
        for adapter in self.adapters:
            out.append(f"  adapter: {adapter}")
        if self.quant_bits:
            out.append(f"  QLoRA adapter (trained on a {self.quant_bits}-bit base): merged into the base reloaded in "
                       f"{self.dtype}, never into the {self.quant_bits}-bit weights")
        how = f"merged in {self.dtype}" if self.merge else "streamed from the base folder (nothing to merge)"
        out.append(f"  {self.n_params / 1e6:.1f}M parameters, {how}"
                   + (f"; GGUF {self.quantization}" if self.gguf_name else ""))
        out.append(f"  files (estimated sizes), {human_size(self.needed_bytes)} of disk needed"
                   + (f" including {human_size(self.scratch_bytes)} of temporary files" if self.scratch_bytes else "")
                   + ":")
        out += [f"    ~{human_size(size):>10}  {name}" for name, size in self.files]
        return out


def _base_params(base_dir: Path) -> int:
    from .gguf.writer import tensor_shapes, tensor_shards

    try:
        return sum(int(np.prod(s)) for s in tensor_shapes(tensor_shards(base_dir)).values())
    except ExportError:
        return sum(p.stat().st_size for p in base_dir.glob("*.bin")) // 2


def _small_file_sizes(base_dir: Path) -> list[tuple[str, int]]:
    return [(name, (base_dir / name).stat().st_size if (base_dir / name).is_file() else 4096)
            for name in TOKENIZER_FILES] + [("config.json", 2048), ("generation_config.json", 512)]


def plan_export(cfg: "RunConfig") -> ExportPlan:
    """Resolve the base and adapters, check the options and estimate every file; loads no weights."""
    from ..models.hub import resolve_model_path
    from .gguf.quantize import BITS_PER_WEIGHT, KQUANT_TYPES, require_llama_cpp
    from .gguf.writer import read_config
    from .merge import adapter_paths, resolve_dtype, trained_quantization_bit

    e = cfg.export
    export_dir = Path(e.export_dir).expanduser().resolve()
    base_dir = Path(resolve_model_path(cfg.model))
    base_config = read_config(base_dir)
    adapters = adapter_paths(cfg)
    if e.export_lora_gguf and not adapters:
        raise ExportError("`export_lora_gguf: true` needs `adapter_name_or_path` (the adapter to write)")
    write_gguf = e.export_format in ("gguf", "both")
    write_st = e.export_format in ("safetensors", "both")
    if write_gguf and e.export_quantization in KQUANT_TYPES:
        require_llama_cpp(f"`export_quantization: {e.export_quantization}`")
    if write_gguf or e.export_lora_gguf:
        from .gguf.arch import read_hparams

        read_hparams(base_config, str(base_dir / "config.json"))  # unsupported architectures fail now
    if e.export_size <= 0:
        raise ExportError(f"`export_size` is the shard size in GB and must be positive, got {e.export_size}")
    dtype = resolve_dtype(e.export_dtype, base_config)
    merge = bool(adapters) or write_st or bool(cfg.data.template)
    n_params = _base_params(base_dir)
    stem = export_dir.name
    plan = ExportPlan(
        base=cfg.model.model_name_or_path or str(base_dir), base_dir=base_dir, adapters=adapters,
        quant_bits=trained_quantization_bit(cfg, adapters) if adapters else None, dtype=dtype, export_dir=export_dir,
        write_safetensors=write_st, gguf_name=f"{stem}-{e.export_quantization}.gguf" if write_gguf else None,
        quantization=e.export_quantization,
        lora_gguf_names=[f"{stem}-lora{'' if len(adapters) == 1 else i + 1}.gguf" for i in range(len(adapters))]
        if e.export_lora_gguf else [],
        modelfile=write_gguf and e.export_ollama, merge=merge, n_params=n_params)
    st_bytes = n_params * (4 if dtype == "float32" else 2)
    if write_st:
        shards = max(1, math.ceil(st_bytes / (e.export_size * 10**9)))
        if shards == 1:
            plan.files.append(("model.safetensors", st_bytes))
        else:
            plan.files += [(f"model-{i:05d}-of-{shards:05d}.safetensors", st_bytes // shards)
                           for i in range(1, shards + 1)]
            plan.files.append(("model.safetensors.index.json", 32 * 1024))
        plan.files += _small_file_sizes(base_dir)
    elif merge and write_gguf:
        plan.scratch_bytes += st_bytes
    if plan.gguf_name:
        plan.files.append((plan.gguf_name, int(n_params * BITS_PER_WEIGHT[e.export_quantization] / 8) + 16 * 2**20))
        if e.export_quantization in KQUANT_TYPES:
            plan.scratch_bytes += n_params * 2
        if plan.modelfile:
            plan.files.append(("Modelfile", 2048))
    plan.files += [(name, 2 * (Path(a) / "adapter_model.safetensors").stat().st_size)
                   for a, name in zip(adapters, plan.lora_gguf_names)]
    plan.files.append(("README.md", 4096))
    if e.export_hub_model_id:  # the new export's files; `--upload-only --dry-run` lists an existing folder exactly
        plan.upload = plan_upload(None, e.export_hub, e.export_hub_model_id, e.export_hub_private, _hub_token(cfg),
                                  planned_files=plan.files)
    return plan


def _hub_token(cfg: "RunConfig") -> str | None:
    return cfg.model.hf_hub_token if cfg.export.export_hub == "huggingface" else cfg.model.ms_hub_token


@dataclass
class ExportResult:
    """The finished export: its folder, files, GGUF reports, time, and the upload URL if uploaded."""

    export_dir: Path
    files: list[tuple[str, int]]
    seconds: float
    gguf: list[Any] = field(default_factory=list)
    url: str | None = None


def _eos_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return [int(i) for i in ids]


def _build(cfg: "RunConfig", plan: ExportPlan, out: Path) -> list[Any]:
    from transformers import AutoTokenizer

    from .card import CardInfo, write_model_card
    from .gguf import convert_to_gguf
    from .gguf.lora import convert_lora_to_gguf
    from .gguf.writer import read_config
    from .merge import load_base_model, load_export_tokenizer, merge_adapters, save_merged
    from .modelfile import write_modelfile

    e = cfg.export
    source = plan.base_dir
    tokenizer = None
    if plan.merge:
        tokenizer = load_export_tokenizer(cfg, plan.adapters)
        model = load_base_model(cfg, tokenizer, plan.dtype, plan.quant_bits)
        model = merge_adapters(model, plan.adapters)
        source = out if plan.write_safetensors else out / MERGED_SCRATCH
        logger.info("saving merged weights (%s, shards of at most %d GB)", plan.dtype, e.export_size)
        save_merged(model, tokenizer, source, f"{e.export_size}GB")
        del model
        gc.collect()
    reports, fmt = [], None
    if plan.gguf_name:
        reports.append(convert_to_gguf(source, out / plan.gguf_name, plan.quantization, name=plan.export_dir.name))
        if plan.modelfile:
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(source))
            fmt = write_modelfile(out / "Modelfile", plan.gguf_name, tokenizer, _eos_ids(source, tokenizer),
                                  cfg.generation.default_system)
    base_config = read_config(plan.base_dir)
    for adapter, name in zip(plan.adapters, plan.lora_gguf_names):
        convert_lora_to_gguf(adapter, base_config, out / name)
    if (out / MERGED_SCRATCH).exists():
        shutil.rmtree(out / MERGED_SCRATCH)
    write_model_card(out, CardInfo(
        name=plan.export_dir.name, base_model=plan.base, adapters=plan.adapters,
        dtype=plan.dtype if plan.merge else None, quant_bits=plan.quant_bits,
        gguf_files=[n for n in [plan.gguf_name, *plan.lora_gguf_names] if n], has_safetensors=plan.write_safetensors,
        has_modelfile=(out / "Modelfile").is_file(), chat_format=fmt.family.name if fmt else None))
    return reports


def run_export(cfg: "RunConfig", *, overwrite: bool = False, plan: ExportPlan | None = None) -> ExportResult:
    """Export as ``cfg.export`` says, then upload when ``export_hub_model_id`` is set."""
    plan = plan or plan_export(cfg)
    overwrite = overwrite or cfg.export.export_overwrite
    recover_interrupted(plan.export_dir)
    check_destination(plan.export_dir, overwrite=overwrite,
                      also="; to upload it as it is, use --upload-only" if cfg.export.export_hub_model_id else "")
    free = check_free_space(plan.export_dir, plan.needed_bytes)
    logger.info("disk: %s needed, %s free", human_size(plan.needed_bytes), human_size(free))
    start = time.perf_counter()
    # staging_folder removes the partial export before the guard measures what is free
    with disk_full_guard(plan.export_dir, plan.needed_bytes, what="write the export", error=ExportError,
                         hint=SPACE_HINT), staging_folder(plan.export_dir, overwrite=overwrite) as tmp:
        reports = _build(cfg, plan, tmp)
    result = ExportResult(plan.export_dir, list_folder(plan.export_dir), time.perf_counter() - start, reports)
    if cfg.export.export_hub_model_id:
        result.url = upload_export(cfg)
    return result


def upload_export(cfg: "RunConfig", *, dry_run: bool = False) -> str | UploadPlan:
    """Upload the existing ``export_dir``; with ``dry_run`` return the exact plan instead of uploading."""
    e = cfg.export
    folder = Path(e.export_dir).expanduser().resolve()
    if not e.export_hub_model_id:
        raise ExportError("nothing to upload to: set `export_hub_model_id: owner/name`")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ExportError(f"export_dir {folder} does not exist yet", hint="run `loraforge export CONFIG` first")
    up = plan_upload(folder, e.export_hub, e.export_hub_model_id, e.export_hub_private, _hub_token(cfg))
    if dry_run:
        return up
    return upload(up, folder, _hub_token(cfg))
