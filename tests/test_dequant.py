"""The fast call into bitsandbytes' 4-bit dequantization (kernels/dequant.py): bit-equal to bitsandbytes' own
function on the GPU, and never taken where it would not be exactly that."""

from __future__ import annotations

import pytest
import torch

from loraforge.kernels import dequant
from loraforge.kernels.lora import dequantize_weight

bnb = pytest.importorskip("bitsandbytes")


def _layer(quant_type: str, nested: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 192, bias=False, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=nested)
    # quantized from a weight in `dtype`, as a model loaded in that dtype is: bitsandbytes dequantizes to it
    layer.weight = bnb.nn.Params4bit((torch.randn(192, 256) * 0.05).to(dtype), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=nested)
    return layer.to(device)


def test_cpu_weights_take_bitsandbytes_own_function():
    layer = _layer("nf4", True, torch.float32, "cpu")
    assert not dequant.direct_ok(layer.weight, torch.float32)
    assert not dequant.direct_ok(torch.nn.Parameter(torch.zeros(2, 2)), torch.float32)  # no quant_state


def test_entry_points_are_refused_when_their_signature_differs(monkeypatch):
    import sys
    import types

    import bitsandbytes.cextension as cext

    def fake_lib(argtypes):
        names = [f"cdequantize_blockwise_{d}_{q}" for d in ("bf16", "fp16", "fp32") for q in ("nf4", "fp4")]
        fns = {n: types.SimpleNamespace(argtypes=argtypes) for n in [*names, "cdequantize_blockwise_fp32"]}
        return types.SimpleNamespace(_lib=types.SimpleNamespace(**fns))

    monkeypatch.setitem(sys.modules, "bitsandbytes.backends.cuda.ops", types.ModuleType("ops"))
    try:
        monkeypatch.setattr(cext, "lib", fake_lib(list(dequant._SIGNATURE)))
        dequant._entry_points.cache_clear()
        assert dequant._entry_points() is not None  # the signature it was written against: used
        monkeypatch.setattr(cext, "lib", fake_lib(list(dequant._SIGNATURE[:-1])))
        dequant._entry_points.cache_clear()
        assert dequant._entry_points() is None  # a changed signature: bitsandbytes' own function instead
    finally:
        dequant._entry_points.cache_clear()


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_direct_dequantization_is_bit_equal_to_bitsandbytes(quant_type, nested, dtype):
    layer = _layer(quant_type, nested, dtype, "cuda")
    w = layer.weight
    assert dequant.direct_ok(w, dtype)
    want = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    got = dequantize_weight(layer, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert not dequant.direct_ok(w, other)  # another output dtype: bitsandbytes' path, then a cast
    torch.testing.assert_close(dequantize_weight(layer, other), want.to(other), rtol=0, atol=0)


def test_stream_handle_asks_torch_for_the_current_raw_stream(monkeypatch):
    """The kernels launch on the caller's current stream: through torch's C accessor by device index where the
    build has it, else through ``torch.cuda.current_stream``."""
    from types import SimpleNamespace

    from loraforge.kernels import dequant

    asked = []
    monkeypatch.setattr(dequant, "_RAW_STREAM", lambda index: asked.append(index) or 1234)
    assert dequant._stream_handle(torch.device("cuda", 1)) == 1234 and asked == [1]
    monkeypatch.setattr(dequant, "_RAW_STREAM", None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=5678))
    assert dequant._stream_handle(torch.device("cuda", 0)) == 5678


@gpu
@needs_cuda
def test_a_group_dequantizes_into_the_row_blocks_of_one_buffer():
    """q/k/v-style groups: each 4-bit weight dequantized straight into its row block equals bitsandbytes' own
    dequantization of it; a wrong ``out`` is refused."""
    from loraforge.kernels.lora import joined_weight

    layers = [_layer("nf4", True, torch.bfloat16, "cuda") for _ in range(3)]
    joined = joined_weight(tuple(layers), torch.bfloat16)
    ref = torch.cat([bnb.functional.dequantize_4bit(lay.weight.data, lay.weight.quant_state) for lay in layers])
    assert torch.equal(joined, ref)
    with pytest.raises(ValueError, match="out must be"):
        dequant.dequantize_4bit(layers[0].weight, torch.bfloat16, out=joined[:, :10])
