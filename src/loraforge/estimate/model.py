"""The memory model: bytes on each GPU at the peak of a training step, and host RAM.

A step has three candidate peaks; the largest one is reported with what is alive at that moment:

- ``loss backward``: weights, optimizer states, every saved activation (or checkpoint) and the loss over the
  vocabulary (fp32 log-softmax output, its gradient and the input gradient: 12 bytes x vocab per token);
- ``block backward`` (checkpointing only): checkpoints plus one recomputed block and the gradients;
- ``optimizer step``: weights, gradients, optimizer states and the optimizer's temporaries.

The constants below were fitted to ``benchmarks/results/memory_calibration.json`` (peak allocated memory of
real steps on an H100); the test ``tests/test_estimate_calibration.py`` holds the model to that table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .activations import (
    block_bytes_per_token, checkpoint_bytes_per_token, fast_block_bytes_per_token, norms_fp32, regime,
    replay_kept_weight_bytes, uses_deepspeed,
)
from .scenario import Scenario, optimizer_spec

GIB = 2**30
MIB = 2**20

# --- calibrated constants (see module docstring) -------------------------------------------------------------
ACTIVATION_SCALE = 1.0  # multiplier on the tensor-by-tensor count of saved activations
LOGITS_BYTES_PER_VOCAB = 12.0  # per token at the loss backward: fp32 log-softmax out + grad out + grad in
CUBLAS_WORKSPACES = 64 * MIB  # two cuBLAS workspaces (forward thread, autograd thread), allocated once
CUDA_CONTEXT = 0.75 * GIB  # CUDA context and kernels, outside PyTorch's allocator (H100, CUDA 13)
ALLOCATOR_MARGIN = 0.05  # fragmentation head-room asked on top of the peak allocated bytes
# --- assumptions for host RAM (not calibrated) ---------------------------------------------------------------
HOST_PER_PROCESS = 3.0 * GIB  # Python, torch + CUDA libraries, tokenizer and dataset of one training process
HOST_LOAD_SHARD = 5.0 * GIB  # from_pretrained materialises at most one checkpoint shard at a time
NF4_BYTES = 0.5  # two 4-bit values per byte
# fast path (fitted to benchmarks/results/memory_calibration_fast.json, H200)
AUTO_MEMORY_SHARE = 0.85  # share of the free GPU memory the `auto` settings (token budget, checkpoint layers) plan for
ZERO3_GATHERED = 1.0  # share of the whole model's weights resident at a ZeRO-3 peak (measured, see estimate_memory)
FAST_LOSS_CHUNK = 512 * MIB  # one chunk of 16-bit logits turned into their gradient in place, plus its GEMM out
FAST_RECOMPUTE_BLOCKS = 1.5  # at a block's backward: its recomputed activations and the gradients flowing through


@dataclass
class Breakdown:
    """Bytes on one GPU at the peak of a step (``phase``), and host RAM. ``allocated`` is what
    ``torch.cuda.max_memory_allocated`` would report; ``framework`` is the CUDA context plus head-room."""

    phase: str
    weights: float = 0.0
    adapter: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    temporaries: float = 0.0
    framework: float = 0.0
    host: dict[str, float] = field(default_factory=dict)
    paged_optimizer: float = 0.0  # managed memory: uses free GPU memory, spills to host RAM

    @property
    def allocated(self) -> float:
        """Peak bytes held by PyTorch's allocator."""
        return (self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.logits
                + self.temporaries)

    @property
    def total(self) -> float:
        """Bytes the GPU must have: the allocated peak plus CUDA context and allocator head-room."""
        return self.allocated + self.framework

    @property
    def host_total(self) -> float:
        """Host RAM of the whole machine (all processes)."""
        return sum(self.host.values())

    def to_dict(self) -> dict[str, float | str | dict[str, float]]:
        """GiB values, rounded for JSON."""
        out: dict = {k: (round(v / GIB, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()
                     if k != "host"}
        out.update(allocated=round(self.allocated / GIB, 3), total=round(self.total / GIB, 3),
                   host={k: round(v / GIB, 3) for k, v in self.host.items()},
                   host_total=round(self.host_total / GIB, 3))
        return out


def weight_bytes_per_param(s: Scenario) -> float:
    """Bytes per weight of the (frozen) decoder linears: 16-bit, 8-bit or 4-bit with its constants."""
    if s.quant_bits == 4:
        constants = (1 / 64 + 4 / (64 * 256)) if s.double_quant else 4 / 64  # absmax per 64-weight block
        return NF4_BYTES + constants
    if s.quant_bits == 8:
        return 1.0
    return 4.0 if s.precision == "fp32" else 2.0


def trainable_params(s: Scenario) -> int:
    """Parameters that receive gradients."""
    a = s.arch
    if s.uses_lora:
        return a.lora_params(s.lora_rank, s.lora_targets)
    if s.method == "freeze":
        return min(s.freeze_layers, a.num_layers) * a.params_per_layer()
    return a.total_params()


def _model_weights(s: Scenario) -> tuple[float, float]:
    """(frozen weight bytes, trainable weight bytes) of the whole model on one device, before any sharding."""
    a = s.arch
    half = 4.0 if s.precision == "fp32" else 2.0
    master = 2.0 if (s.precision == "pure_bf16" or uses_deepspeed(s)) else 4.0
    master = 4.0 if s.precision == "fp32" else master
    norm_bytes = 4.0 if (regime(s, trainable_layer=False).autocast and norms_fp32(s)) else half
    embeddings = (a.embedding_params + a.lm_head_params) * half
    if s.method == "full":
        return 0.0, a.total_params() * master
    if s.method == "freeze":
        trained = min(s.freeze_layers, a.num_layers)
        frozen = embeddings + (a.num_layers - trained) * a.params_per_layer() * half + a.hidden_size * half
        return frozen, trained * a.params_per_layer() * master
    linears = a.num_layers * a.linear_params_per_layer()
    frozen = embeddings + linears * weight_bytes_per_param(s) + a.num_layers * a.small_params_per_layer() * norm_bytes
    if s.quant_bits == 8:  # fp32 scale per output row
        frozen += a.num_layers * 4 * sum(out for _, out in a.linear_shapes().values())
    return frozen, trainable_params(s) * master


def _optimizer_bytes(s: Scenario, n_trainable: int) -> tuple[float, float]:
    """(state bytes, step temporaries) for ``n_trainable`` parameters.

    With a bitsandbytes 8-bit optimizer the Trainer keeps 32-bit states for ``nn.Embedding`` weights."""
    spec = optimizer_spec(s.optim)
    param_bytes = 2.0 if s.precision == "pure_bf16" else 4.0
    per_state = spec.bytes_per_state or param_bytes
    states = n_trainable * spec.states * per_state
    if per_state < 4 and s.method == "full":
        states += s.arch.embedding_params * spec.states * (4.0 - per_state)
    return states, n_trainable * spec.temp_states * per_state


def activation_bytes(s: Scenario) -> float:
    """Saved activations (or checkpoints) of one micro-batch at the loss backward."""
    return _activations(s)[0]


def _activations(s: Scenario) -> tuple[float, float]:
    """(saved activations at the loss backward, extra bytes at the block backward), for the micro-batch."""
    a, t = s.arch, s.tokens
    trained_blocks = min(s.freeze_layers, a.num_layers) if s.method == "freeze" else a.num_layers
    trainable = s.method in ("full", "freeze")
    if s.fast_path:  # checkpoints go to pinned host memory: only the block being recomputed is on the GPU
        block = fast_block_bytes_per_token(s)
        if s.gradient_checkpointing:  # the last kept_layers keep their activations (checkpoint_layers)
            recompute = (FAST_RECOMPUTE_BLOCKS * block * t + replay_kept_weight_bytes(s)
                         if s.kept_layers < a.num_layers else 0.0)
            return (2.0 * a.hidden_size + s.kept_layers * block) * t, recompute
        return block * a.num_layers * t, 0.0
    block = block_bytes_per_token(s, trainable_layer=trainable)
    final_norm = 4 * a.hidden_size
    if s.gradient_checkpointing:
        whole = min(s.kept_layers, trained_blocks)
        kept = ((trained_blocks - whole) * checkpoint_bytes_per_token(s, trainable_layer=trainable)
                + whole * block + final_norm)
        return ACTIVATION_SCALE * kept * t, ACTIVATION_SCALE * 2 * block * t
    return ACTIVATION_SCALE * (trained_blocks * block + final_norm) * t, 0.0


def _autocast_copies(s: Scenario, n_train: int) -> tuple[float, float]:
    """16-bit casts of fp32 trainable weights under autocast: (all of them, cached until the forward ends;
    those saved for the backward). Checkpointed blocks drop their casts; embeddings/lm_head are outside them."""
    if not n_train or not regime(s, trainable_layer=s.method in ("full", "freeze")).autocast:
        return 0.0, 0.0
    if not s.gradient_checkpointing:
        return 2.0 * n_train, 2.0 * n_train
    outside = s.arch.embedding_params + s.arch.lm_head_params if s.method == "full" else 0
    return 2.0 * n_train, 2.0 * outside


def estimate_memory(s: Scenario) -> Breakdown:
    """The per-GPU peak and host RAM of one training step of ``s``."""
    a, n = s.arch, s.num_gpus
    spec = optimizer_spec(s.optim)
    frozen, train_w = _model_weights(s)
    n_train = trainable_params(s)
    states, step_temp = _optimizer_bytes(s, n_train)
    grad_bytes = n_train * (2.0 if uses_deepspeed(s) and s.precision != "fp32" else
                            (train_w / n_train if n_train else 0.0))
    host: dict[str, float] = {"processes": HOST_PER_PROCESS * n,
                              "model loading": min(HOST_LOAD_SHARD, frozen + train_w) * n}
    temporaries = float(CUBLAS_WORKSPACES)
    master_extra = 0.0  # DeepSpeed keeps a separate fp32 master copy of the trainable weights
    if uses_deepspeed(s):
        master_extra = n_train * 4.0 if s.precision != "fp32" else 0.0
        shard_opt = n  # ZeRO >= 1 partitions the optimizer states (and the fp32 master)
        states, step_temp, master_extra = states / shard_opt, step_temp / shard_opt, master_extra / shard_opt
        if s.zero_stage >= 2:
            grad_bytes /= n
        temporaries += a.hidden_size**2 * 4.0  # reduce bucket ("auto": hidden^2 elements)
        if s.offload_optimizer:
            host["optimizer (ZeRO offload)"] = (states + master_extra + n_train * 4.0 / n) * n
            states = step_temp = master_extra = 0.0
        if s.zero_stage == 3:
            layer = a.params_per_layer() * weight_bytes_per_param(s) + (n_train / a.num_layers) * 2.0
            head = a.vocab_size * a.hidden_size * (4.0 if s.precision == "fp32" else 2.0)
            working = max(2 * layer, layer + head) + 0.9 * a.hidden_size**2 * 2.0  # gathered + prefetch bucket
            if s.quant_bits is not None:
                # Measured on two H200s (benchmarks/results/memory_calibration_zero.json: Qwen3-8B and -14B QLoRA,
                # the seed's ds_config_zero3.json): with k-bit weights ZeRO-3 keeps what it gathered within a
                # step, so the peak holds the whole model's weights, not the two layers of the textbook.
                working = max(working, (frozen + train_w) * ZERO3_GATHERED)
            if s.offload_params:
                host["parameters (ZeRO offload)"] = frozen + train_w
                frozen, train_w = working, 0.0
            else:
                frozen, train_w = frozen / n + working, train_w / n
    elif n > 1:
        temporaries += grad_bytes  # DDP all-reduce buckets mirror every gradient
    if spec.paged:
        host["paged optimizer (when spilled)"] = states
    paged, states = (states, 0.0) if spec.paged else (0.0, states)

    acts, block_extra = _activations(s)
    logits = LOGITS_BYTES_PER_VOCAB * a.vocab_size * s.tokens
    if s.fast_path or s.fused_loss:  # chunked loss: the final hidden states, their gradient and one chunk of logits
        logits = 2 * 2.0 * a.hidden_size * s.tokens + FAST_LOSS_CHUNK
    if s.fast_path:
        if s.gradient_checkpointing:
            host["checkpoints (fast path, pinned)"] = 1.25 * a.num_layers * 2.0 * a.hidden_size * s.tokens * n
    cache, saved_copies = _autocast_copies(s, n_train)
    static = dict(weights=frozen, adapter=train_w + master_extra, optimizer=states)
    accumulating = grad_bytes if s.grad_accum > 1 else 0.0
    phases = [
        Breakdown("forward end", gradients=accumulating, activations=acts, logits=logits * 10 / 12,
                  temporaries=temporaries + cache, **static),
        Breakdown("loss backward", gradients=accumulating, activations=acts, logits=logits,
                  temporaries=temporaries + saved_copies, **static),
        Breakdown("optimizer step", gradients=grad_bytes, temporaries=temporaries + step_temp, **static),
    ]
    if s.gradient_checkpointing:
        phases.append(Breakdown("block backward", gradients=grad_bytes, activations=acts + block_extra,
                                temporaries=temporaries + saved_copies, **static))
    peak = max(phases, key=lambda b: b.allocated)
    peak.framework = CUDA_CONTEXT + ALLOCATOR_MARGIN * peak.allocated
    peak.paged_optimizer = paged
    peak.host = host
    return peak


def auto_kept_layers(s: Scenario, free_bytes: float) -> tuple[int, float, float]:
    """``checkpoint_layers: auto``: how many last layers of ``s`` keep their activations when ``free_bytes`` of GPU
    memory are free after the weights are loaded; with the memory each such layer costs and the memory to spare.

        per_layer = (peak keeping layers - 1 of them - peak keeping none) / (layers - 1)
        usable    = AUTO_MEMORY_SHARE x free - (peak with checkpointing - weights - adapter)
        kept      = min(layers, floor(usable / per_layer))

    Training (loraforge.train.checkpoint_policy) passes the free memory it measures; the estimator the GPU's size
    less the CUDA context and the weights."""
    from dataclasses import replace

    layers = s.arch.num_layers
    with_ckpt = estimate_memory(replace(s, gradient_checkpointing=True, kept_layers=0))
    if layers > 1:  # between two counts that both still replay a layer, so the same peak phase (block backward)
        most = estimate_memory(replace(s, gradient_checkpointing=True, kept_layers=layers - 1))
        per_layer = max(most.allocated - with_ckpt.allocated, 0.0) / (layers - 1)
    else:
        without = estimate_memory(replace(s, gradient_checkpointing=False, kept_layers=0))
        per_layer = max(without.allocated - with_ckpt.allocated, 0.0)
    usable = AUTO_MEMORY_SHARE * free_bytes - (with_ckpt.allocated - with_ckpt.weights - with_ckpt.adapter)
    kept = 0 if per_layer <= 0 or usable <= 0 else min(layers, int(usable // per_layer))
    return kept, per_layer, usable
