"""`loraforge export CONFIG [key=value ...] [--dry-run] [--overwrite] [--upload-only]`."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    """Plan, then export (or only print the plan and the upload listing with --dry-run)."""
    from ..config import load_config
    from ..data.templates import known_template_names
    from .safety import human_size
    from .workflow import plan_export, run_export, upload_export

    cfg = load_config(args.config, args.overrides, purpose="export", build_training_args=False,
                      template_names=known_template_names())
    if args.overwrite:
        cfg.export.export_overwrite = True
    if args.upload_only:
        result = upload_export(cfg, dry_run=args.dry_run)
        print("\n".join(result.lines()) if args.dry_run else f"uploaded: {result}")
        return 0
    plan = plan_export(cfg)
    print("\n".join(plan.lines()))
    if args.dry_run:
        if plan.upload is not None:
            print("\n".join(plan.upload.lines()))
        print("dry run: nothing was written or uploaded")
        return 0
    result = run_export(cfg, overwrite=cfg.export.export_overwrite, plan=plan)
    print(f"exported to {result.export_dir} in {result.seconds:.1f} s:")
    for name, size in result.files:
        print(f"  {human_size(size):>10}  {name}")
    if result.url:
        print(f"uploaded: {result.url}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="Merge adapters and write safetensors and/or GGUF (+ Ollama Modelfile); optionally upload.",
        description="Merge LoRA adapters into the base model and export merged safetensors and/or GGUF for "
        "llama.cpp / Ollama / LM Studio, then upload when export_hub_model_id is set. Extra key=value arguments "
        "override the config (e.g. export_format=gguf export_quantization=q8_0).")
    p.add_argument("config", help="YAML config with model_name_or_path, adapter_name_or_path, export_dir, ...")
    p.add_argument("--dry-run", action="store_true",
                   help="Print the plan (files, estimated sizes, disk needed) and the upload target; write and "
                   "upload nothing. With --upload-only: list exactly the files and sizes that would be uploaded.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace an existing export_dir (same as export_overwrite: true).")
    p.add_argument("--upload-only", action="store_true",
                   help="Upload the existing export_dir to export_hub_model_id without exporting again.")
    p.set_defaults(func=cmd_export, accepts_overrides=True)
