"""The Triton kernels themselves, run on CPU tensors by Triton's interpreter.

The interpreter is exact in fp32 but truncates fp32 -> bf16 casts (the GPU rounds to nearest even), so
here bf16 cases only check tolerances; the bit-for-bit bf16 checks are ``gpu`` tests.

``TRITON_INTERPRET=1`` must be set before the kernels are defined (Triton decides at decoration time), so
the outer test starts one child pytest on this file with it set; in the child the parity tests run (marker
``interpreted``), in the normal session they are deselected. Without Triton installed everything here is skipped. On a GPU the same
cases run compiled, in bf16, from the ``gpu`` tests of each ``test_kernels_<op>.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraforge.kernels import triton_available

import kernel_cases as cases

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]
# deselected in a normal session (pyproject's addopts), selected in the child with `-m interpreted`
in_child = pytest.mark.interpreted


def _interpreter_broken() -> str:
    """Why this triton's interpreter cannot run the kernels here, or "" when it can.

    Before 3.9 the interpreter turns a loop bound into a Python int with ``int(array)``, which NumPy 2.4
    refuses for 1-element arrays, so every kernel with a runtime-bounded loop fails (triton 3.6 + NumPy 2.4
    does; 3.9 squeezes first).
    """
    import numpy as np
    import triton

    def version(text):
        return tuple(int(p) for p in text.split("+")[0].split(".")[:2])

    if version(np.__version__) >= (2, 4) and version(triton.__version__) < (3, 9):
        return f"triton {triton.__version__}'s interpreter cannot run with NumPy {np.__version__} (needs triton>=3.9)"
    return ""


@pytest.mark.skipif(INTERPRETED or not triton_available(), reason="needs triton (CUDA PyTorch ships it)")
def test_triton_kernels_interpreted():
    if _interpreter_broken():
        pytest.skip(_interpreter_broken())
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-m", "interpreted"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def _compile_cases():
    """(kernel, signature, constexprs, options) for the launches the training path makes, in bf16."""
    import importlib

    rms, swi, rope, ce = (importlib.import_module(f"loraforge.kernels.{m}")
                          for m in ("rms_norm", "swiglu", "rope", "cross_entropy"))
    bf = "*bf16"
    out = []
    for hidden in (4096, 5120, 1024, 128):  # Qwen3-8B / -14B / -0.6B hidden, and the per-head q/k norms
        block, rows, warps = rms._launch_shape(hidden)
        sig = {"X": bf, "W": bf, "Y": bf, "RSTD": "*fp32", "n_rows": "i32", "n_cols": "i32", "stride_x": "i32",
               "heads": "i32", "stride_xh": "i32", "stride_y": "i32", "eps": "fp32"}
        out.append((rms._rms_norm_fwd, sig, {"ROWS": rows, "BLOCK": block}, {"num_warps": warps}))
        sig = {"DY": bf, "X": bf, "W": bf, "RSTD": "*fp32", "DX": bf, "DW_PART": "*fp32", "n_rows": "i32",
               "n_cols": "i32", "stride_dy": "i32", "stride_x": "i32", "heads": "i32", "stride_xh": "i32",
               "stride_dx": "i32"}
        block, rows, warps = rms._launch_shape(hidden, backward=True)
        out.append((rms._rms_norm_bwd, sig, {"HAS_DW": hidden == 128, "ROWS": rows, "BLOCK": block},
                    {"num_warps": warps}))
    strides = {"n_cols": "i32", "stride_g": "i32", "stride_u": "i32"}
    out.append((swi._swiglu_fwd, {"G": bf, "U": bf, "Y": bf, **strides, "stride_y": "i32"}, {"BLOCK": swi._BLOCK}, {}))
    out.append((swi._swiglu_bwd, {"DY": bf, "G": bf, "U": bf, "DG": bf, "DU": bf, "n_cols": "i32", "stride_dy": "i32",
                                  "stride_g": "i32", "stride_u": "i32", "stride_dg": "i32", "stride_du": "i32"},
                {"BLOCK": swi._BLOCK}, {}))
    names = "Q K QO KO COS SIN seq_len n_qh n_kh sqb sqh sqs skb skh sks sqob sqoh sqos skob skoh skos scb scs".split()
    sig = {n: (bf if i < 6 else "i32") for i, n in enumerate(names)}
    for backward in (False, True):  # Qwen3-8B: 32 query and 8 key-value heads of 128
        out.append((rope._rope_kernel, sig, {"HALF": 64, "BLOCK_QH": 32, "BLOCK_KH": 8, "BLOCK_HALF": 64,
                                             "BACKWARD": backward}, {"num_warps": 8}))
    sig = {"LOGITS": bf, "stride_row": "i32", "LABELS": "*i64", "LOSS": "*fp32", "INV_SCALE": "*fp32",
           "n_cols": "i32", "ignore_index": "i32", "softcap": "fp32"}
    for softcap in (False, True):
        out.append((ce._ce_kernel, sig, {"HAS_SOFTCAP": softcap, "WRITE_GRAD": True, "BLOCK": ce._CE_BLOCK},
                    {"num_warps": 16}))
    f8 = importlib.import_module("loraforge.kernels.fp8")  # `fp8: true`: quantizers into e4m3
    fp8 = "*fp8e4nv"
    out.append((f8._quant_rows_kernel, {"X": bf, "Q": fp8, "S": "*fp32", "n_cols": "i32", "stride_x": "i32",
                                        "stride_q": "i32"}, {"BLOCK": 4096}, {}))
    out.append((f8._cast_kernel, {"W": bf, "Q": fp8, "SCALE": "*fp32", "n": "i32"}, {"BLOCK": 2048}, {}))
    out.append((f8._cast_t_kernel, {"W": bf, "Q": fp8, "SCALE": "*fp32", "rows": "i32", "cols": "i32"},
                {"TILE": 64}, {}))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.skipif(INTERPRETED or not triton_available(), reason="needs triton (CUDA PyTorch ships it)")
def test_triton_kernels_compile_for_hopper():
    """The interpreter runs the kernels as NumPy and misses what only the compiler checks (types of
    loop-carried values, constexpr use, register spills). Triton's wheel carries ptxas, so every kernel is
    compiled here to an sm_90 cubin with no GPU, and must not spill registers to local memory."""
    import importlib.util
    import subprocess as sp
    import tempfile

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(importlib.util.find_spec("triton.backends.nvidia").origin).parent / "bin" / "cuobjdump"
    for kernel, sig, consts, options in _compile_cases():
        full = {**sig, **{name: "constexpr" for name in consts}}
        compiled = triton.compile(ASTSource(kernel, full, consts), target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm.get("cubin"), kernel.__name__
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = sp.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            assert "LOCAL:0" in usage, f"{kernel.__name__} {consts} spills registers: {usage}"


@in_child
@pytest.mark.parametrize("rows,cols,weight_grad", [(1, 1, True), (7, 33, True), (130, 128, True), (5, 300, False),
                                                    (3, 4100, True)])
def test_rms_norm_kernel(rows, cols, weight_grad):
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    cases.check_rms_norm(rms_norm_triton, rms_norm_reference, rows=rows, cols=cols, device="cpu",
                         dtype=torch.float32, weight_grad=weight_grad)


@in_child
def test_rms_norm_kernel_reads_head_slices_in_place():
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    cases.check_rms_norm_head_slices(rms_norm_triton, rms_norm_reference, device="cpu", dtype=torch.float32)


@in_child
def test_rms_norm_kernel_mixed_dtypes():
    """bf16 activations with fp32 weights (what QLoRA preparation leaves) give fp32 output, like HF."""
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    cases.check_rms_norm(rms_norm_triton, rms_norm_reference, rows=9, cols=64, device="cpu",
                         dtype=torch.bfloat16, weight_dtype=torch.float32)


@in_child
def test_rms_norm_kernel_keeps_leading_shape():
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    x = torch.randn(2, 3, 4, 16)
    w = torch.randn(16)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), **cases.FP32)
    empty = torch.randn(0, 16, requires_grad=True)
    wg = w.clone().requires_grad_()
    rms_norm_triton(empty, wg, 1e-5).sum().backward()
    assert empty.grad.shape == (0, 16) and torch.count_nonzero(wg.grad) == 0


@in_child
@pytest.mark.parametrize("rows,cols,fused", [(1, 1, False), (5, 37, False), (6, 1500, True), (3, 2048, True)])
def test_swiglu_kernel(rows, cols, fused):
    from loraforge.kernels.swiglu import swiglu_reference, swiglu_triton

    cases.check_swiglu(swiglu_triton, swiglu_reference, rows=rows, cols=cols, device="cpu",
                       dtype=torch.float32, fused_slices=fused)


@in_child
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 37), (3, 2048)])
def test_swiglu_packed_kernel(rows, cols):
    from loraforge.kernels.swiglu import _SwiGLUPackedFunction, swiglu_reference

    cases.check_swiglu(_SwiGLUPackedFunction.apply, swiglu_reference, rows=rows, cols=cols, device="cpu",
                       dtype=torch.float32, packed=True)


@in_child
def test_swiglu_kernel_bf16_matches_eager_rounding():
    from loraforge.kernels.swiglu import swiglu_reference, swiglu_triton

    cases.check_swiglu(swiglu_triton, swiglu_reference, rows=4, cols=300, device="cpu", dtype=torch.bfloat16)


@in_child
@pytest.mark.parametrize(
    "batch,seq,qh,kh,dim,transposed,bcast,generic",
    [(1, 1, 1, 1, 2, True, False, False), (2, 5, 4, 2, 16, True, False, False), (2, 7, 6, 3, 24, False, True, False),
     (3, 4, 5, 1, 10, True, False, True), (1, 9, 4, 4, 128, True, True, True)],
)
def test_rope_kernel(batch, seq, qh, kh, dim, transposed, bcast, generic):
    from loraforge.kernels.rope import apply_rope_reference, apply_rope_triton

    cases.check_rope(apply_rope_triton, apply_rope_reference, batch=batch, seq=seq, q_heads=qh, kv_heads=kh,
                     head_dim=dim, device="cpu", dtype=torch.float32, transposed=transposed,
                     broadcast_batch=bcast, generic_tables=generic)


@in_child
def test_rope_kernel_bf16_matches_eager_rounding():
    from loraforge.kernels.rope import apply_rope_reference, apply_rope_triton

    cases.check_rope(apply_rope_triton, apply_rope_reference, batch=2, seq=6, q_heads=4, kv_heads=2, head_dim=32,
                     device="cpu", dtype=torch.bfloat16)


@in_child
def test_rope_kernel_fp16_is_eager_bit_for_bit():
    """fp16 casts are exact in the interpreter (NumPy has float16), so the rounding of each product, which
    makes the kernel equal eager bf16/fp16 on the GPU, is checked bit for bit here."""
    from loraforge.kernels.rope import apply_rope_reference, apply_rope_triton

    cos, sin = cases.rope_tables(2, 6, 32, "cpu")
    q = torch.randn(2, 6, 4, 32).half().transpose(1, 2)
    k = torch.randn(2, 6, 2, 32).half().transpose(1, 2)
    got = apply_rope_triton(q, k, cos.half(), sin.half())
    want = apply_rope_reference(q, k, cos.half(), sin.half())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@in_child
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "cross_entropy"])
def test_fp16_kernels(op):
    """Turing cards (T4) train in fp16: the same kernels with fp16 inputs."""
    from loraforge.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton
    from loraforge.kernels.swiglu import swiglu_reference, swiglu_triton

    if op == "rms_norm":
        cases.check_rms_norm(rms_norm_triton, rms_norm_reference, rows=6, cols=96, device="cpu", dtype=torch.float16)
    elif op == "swiglu":
        cases.check_swiglu(swiglu_triton, swiglu_reference, rows=5, cols=70, device="cpu", dtype=torch.float16)
    else:
        cases.check_linear_cross_entropy(linear_cross_entropy_triton, linear_cross_entropy_reference, tokens=12,
                                         hidden=16, vocab=300, device="cpu", dtype=torch.float16, chunk_tokens=5)


@in_child
def test_rope_kernel_output_keeps_input_layout():
    """Transposed [B, S, H, D] views come back in the same memory layout, so the attention call that
    follows sees the strides it would see on the eager path."""
    from loraforge.kernels.rope import apply_rope_triton

    cos, sin = cases.rope_tables(2, 5, 8, "cpu")
    q = torch.randn(2, 5, 3, 8).transpose(1, 2)
    k = torch.randn(2, 5, 1, 8).transpose(1, 2)
    qo, ko = apply_rope_triton(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()


@in_child
@pytest.mark.parametrize(
    "tokens,vocab,reduction,softcap,chunk,weight_grad",
    [(1, 3, "sum", None, None, False), (21, 4500, "sum", None, 8, True), (21, 300, "mean", None, 5, False),
     (13, 4500, "mean", 3.0, 4, True), (9, 100, "mean", None, 4, False)],  # the last: no label at all
)
def test_cross_entropy_kernel(tokens, vocab, reduction, softcap, chunk, weight_grad):
    from loraforge.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton

    cases.check_linear_cross_entropy(linear_cross_entropy_triton, linear_cross_entropy_reference, tokens=tokens,
                                     hidden=16, vocab=vocab, device="cpu", dtype=torch.float32, reduction=reduction,
                                     softcap=softcap, chunk_tokens=chunk, weight_grad=weight_grad)


@in_child
def test_cross_entropy_kernel_bf16():
    from loraforge.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton

    cases.check_linear_cross_entropy(linear_cross_entropy_triton, linear_cross_entropy_reference, tokens=20,
                                     hidden=32, vocab=700, device="cpu", dtype=torch.bfloat16, chunk_tokens=8)


@in_child
def test_kernels_take_broadcast_gradients():
    """``out.sum().backward()`` hands the backward an expanded gradient (all strides 0)."""
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton
    from loraforge.kernels.rope import apply_rope_reference, apply_rope_triton
    from loraforge.kernels.swiglu import swiglu_reference, swiglu_triton

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        return [t.grad for t in leaves]

    x, w = torch.randn(3, 4, 40), torch.randn(40)
    for a, b in zip(grads(lambda x, w: rms_norm_triton(x, w, 1e-6), x, w),
                    grads(lambda x, w: rms_norm_reference(x, w, 1e-6), x, w)):
        torch.testing.assert_close(a, b, **cases.FP32)
    g, u = torch.randn(2, 3, 50), torch.randn(2, 3, 50)
    for a, b in zip(grads(swiglu_triton, g, u), grads(swiglu_reference, g, u)):
        torch.testing.assert_close(a, b, **cases.FP32)
    cos, sin = cases.rope_tables(2, 5, 16, "cpu")
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    for a, b in zip(grads(lambda q, k: apply_rope_triton(q, k, cos, sin), q, k),
                    grads(lambda q, k: apply_rope_reference(q, k, cos, sin), q, k)):
        torch.testing.assert_close(a, b, **cases.FP32)


@in_child
def test_kernels_compose_to_the_hf_qwen3_model():
    """A 2-layer Qwen3 rebuilt with the Triton kernels: HF's loss and every gradient within 1e-4."""
    from loraforge.kernels.cross_entropy import linear_cross_entropy_triton
    from loraforge.kernels.rms_norm import rms_norm_triton
    from loraforge.kernels.rope import apply_rope_triton
    from loraforge.kernels.swiglu import swiglu_triton

    def loss(*args, **kwargs):
        return linear_cross_entropy_triton(*args, chunk_tokens=5, **kwargs)

    cases.check_qwen3_model(dict(rms_norm=rms_norm_triton, apply_rope=apply_rope_triton, swiglu=swiglu_triton,
                                 linear_cross_entropy=loss))



@in_child
@pytest.mark.parametrize("rows,cols,block", [(1, 16, 16), (5, 300, 128), (7, 4096, 4096)])
def test_fp8_quantizer_kernels(rows, cols, block):
    """`fp8: true`'s Triton quantizers against their references. The interpreter's casts to e4m3 are not the GPU's
    (values that need rounding can come out a power of two off; the `gpu` tests check the rounding), so the inputs
    here are e4m3 values times a power of two, with 448 in every row: every quotient is exact, and any slip in
    indexing, scaling or the transposed layout shows as a different value."""
    from loraforge.kernels import fp8 as F8

    g = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(F8.E4M3).float()
    grid = grid[grid.isfinite()]
    values = grid[torch.randint(0, grid.numel(), (rows, cols), generator=g)]
    values[:, cols // 2] = 448.0
    x = values * torch.pow(2.0, torch.arange(rows, dtype=torch.float32) - 3)[:, None]
    q = torch.empty((rows, cols), dtype=F8.E4M3)
    s = torch.empty((rows, 1))
    F8._quant_rows_kernel[(rows,)](x, q, s, cols, x.stride(0), q.stride(0), BLOCK=block)
    rq, rs = F8.quantize_rows_reference(x)
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float()) and torch.equal(q.float(), values)
    w = grid[torch.randint(0, grid.numel(), (70, cols), generator=g)]  # the weight cast: one scale for all
    w[3, 0] = 448.0
    w = w * 0.5
    scale = (w.abs().amax() / F8.E4M3_MAX).reshape(1)
    plain = torch.empty((70, cols), dtype=F8.E4M3)
    F8._cast_kernel[(-(-w.numel() // 2048),)](w, plain, scale, w.numel(), BLOCK=2048)
    flipped = torch.empty((cols, 70), dtype=F8.E4M3)
    F8._cast_t_kernel[(-(-70 // 64), -(-cols // 64))](w, flipped, scale, 70, cols, TILE=64)
    assert torch.equal(plain.float(), F8.cast_weight_reference(w, scale).float())
    assert torch.equal(flipped.float(), F8.cast_weight_reference(w, scale, transpose=True).float())
