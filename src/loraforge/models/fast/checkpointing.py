"""Activation checkpointing whose saved layer inputs live in host memory while the forward goes on.

With ordinary checkpointing the input of every decoder layer stays on the GPU until backward (for Qwen3-8B at
2048 x 4 tokens: 36 x 64 MiB = 2.3 GiB). :func:`offloaded_checkpoint` copies each input into pinned host
memory on a side CUDA stream (overlapping the next layers' compute), and in backward brings it back, one layer
ahead of need, before recomputing the layer. On a CPU it is a plain recompute-in-backward checkpoint.

It plugs into transformers' own checkpointing: each ``GradientCheckpointingLayer`` calls its
``_gradient_checkpointing_func(forward, hidden_states)``; :func:`use_offloaded_checkpointing` sets that
attribute on the layers that checkpoint. Recompute replays the forward under the same autocast state and,
when the layer uses dropout, the same RNG state; :func:`recomputing` tells the layer's modules that they run
inside that replay.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch

#: per thread: the autograd engine runs a CUDA backward (and so the replay inside it) on its own device thread
_RECOMPUTE = threading.local()


@contextmanager
def _recompute_scope() -> Iterator[None]:
    _RECOMPUTE.depth = getattr(_RECOMPUTE, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTE.depth -= 1


def recomputing() -> bool:
    """True while a checkpointed layer's forward is replayed inside backward, on the thread that replays it: what
    that forward returns is only the root of the layer's backward, never read (see
    :class:`~loraforge.models.fast.modules.FastMLP`)."""
    return getattr(_RECOMPUTE, "depth", 0) > 0


class _Saved:
    """One saved layer input: on the GPU, in host memory, or on its way back."""

    __slots__ = ("tensor", "host", "copied", "shape", "dtype", "device", "back", "arrived")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.host = self.copied = self.back = self.arrived = None
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device


class ActivationOffloader:
    """Pinned host buffers (reused across steps) and a side stream for the copies."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._order: list[_Saved] = []
        self._stream: torch.cuda.Stream | None = None

    def _buffer(self, nbytes: int) -> torch.Tensor:
        fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fitting:  # the smallest that fits (by position: tensors do not compare with ==)
            return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        return torch.empty(int(nbytes * 1.25), dtype=torch.uint8, pin_memory=True)

    def store(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        if not tensor.is_cuda:
            return saved
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        nbytes = tensor.numel() * tensor.element_size()
        host = self._buffer(nbytes)
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host[:nbytes].copy_(tensor.contiguous().view(-1).view(torch.uint8), non_blocking=True)
            saved.copied = torch.cuda.Event()
            saved.copied.record(self._stream)
        tensor.record_stream(self._stream)  # its memory is not reused before the copy has read it
        saved.host, saved.tensor = host, None
        self._order.append(saved)
        return saved

    def _fetch(self, saved: _Saved) -> None:
        if saved.host is None or saved.back is not None:
            return
        nbytes = torch.Size(saved.shape).numel() * saved.dtype.itemsize
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(saved.copied)
            back = saved.host[:nbytes].to(saved.device, non_blocking=True)
            saved.arrived = torch.cuda.Event()
            saved.arrived.record(self._stream)
        saved.back = back.view(saved.dtype).view(saved.shape)

    def load(self, saved: _Saved) -> torch.Tensor:
        """The saved tensor on its device again; starts bringing back the layer input needed next."""
        if saved.host is None:
            return saved.tensor
        self._fetch(saved)
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.arrived)
        tensor = saved.back
        tensor.record_stream(current)
        if saved in self._order:
            index = self._order.index(saved)
            if index > 0:
                self._fetch(self._order[index - 1])  # backward runs the layers in reverse order
            del self._order[index:]
        self._free.append(saved.host)  # later copies into it queue behind this one on the same stream
        saved.host = saved.back = None
        return tensor


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, function: Callable, offloader: ActivationOffloader, keep_rng: bool,
                hidden: torch.Tensor) -> torch.Tensor:
        ctx.function, ctx.offloader, ctx.keep_rng = function, offloader, keep_rng
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if keep_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.saved = offloader.store(hidden.detach())
        with torch.no_grad():
            return function(hidden)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        hidden = ctx.offloader.load(ctx.saved).detach().requires_grad_(True)
        device, enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else [], enabled=ctx.keep_rng):
            if ctx.keep_rng:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), _recompute_scope():
                out = ctx.function(hidden)
        torch.autograd.backward(out, grad_out)
        return None, None, None, hidden.grad


def offloaded_checkpoint(offloader: ActivationOffloader, keep_rng: bool, function: Callable,
                         hidden: torch.Tensor, *args: Any) -> torch.Tensor:
    """The ``_gradient_checkpointing_func`` contract: ``function(hidden_states, *args)`` recomputed in backward,
    its input kept in host memory meanwhile."""
    if args:
        function = partial(_call_with_tail, function, args)
    return _OffloadedCheckpoint.apply(function, offloader, keep_rng, hidden)


def _call_with_tail(function: Callable, args: tuple, hidden: torch.Tensor) -> torch.Tensor:
    return function(hidden, *args)


def use_offloaded_checkpointing(layers: Any, *, keep_rng: bool) -> int:
    """Make every checkpointing decoder layer in ``layers`` checkpoint through host memory; returns how many."""
    offloader = ActivationOffloader()
    count = 0
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = partial(offloaded_checkpoint, offloader, keep_rng)
            count += 1
    return count
