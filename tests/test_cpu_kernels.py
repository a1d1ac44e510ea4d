"""neoxlite's CPU kernels (neoxlite/csrc: bf16 and fp32 linears, bf16 decode attention): their sums, their use by
the model's Linear, their build cache and every way of falling back to PyTorch's own ops."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import neoxlite.cpu_kernels
import neoxlite.linear
from neoxlite import matrix_engine
from neoxlite.cpu_kernels import MAX_ROWS_F32, BF16Kernel, bf16_kernel, kernel_status
from neoxlite.linear import Linear

KERNEL = bf16_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no CPU kernel here: {kernel_status()}")
# An AMX CPU also runs the AVX512-BF16 and AVX2 kernels, an AVX512-BF16 one the AVX2 kernel.
_BEST = 0 if KERNEL is None else KERNEL.isa
ISAS = [pytest.param(1, id="avx2"),
        pytest.param(2, id="avx512bf16", marks=pytest.mark.skipif(_BEST < 2, reason="this CPU has no AVX512-BF16")),
        pytest.param(3, id="amx", marks=pytest.mark.skipif(_BEST < 3, reason=f"no AMX kernel here: "
                                                                              f"{matrix_engine.amx()[1]}"))]
VECTOR_ISAS = ISAS[:2]  # the fp32 kernel's


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The exact product in float64, for bounding the kernel's fp32 rounding."""
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
# rows: every tiling of the input rows (groups of four, then three, two or one left over); for AMX (k a multiple
# of 32, else the AVX512-BF16 kernel) one or two 16-row input tiles, weight rows in whole and partial tiles
@pytest.mark.parametrize("rows,n,k", [(1, 13, 7), (3, 33, 1000), (5, 64, 64), (9, 130, 4096), (32, 8, 40),
                                      (2, 4, 31), (4, 7, 33), (6, 40, 520), (7, 66, 2100), (16, 31, 1040),
                                      (17, 50, 96), (33, 48, 128), (40, 100, 256)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_the_fp32_sum_rounded_once(isa, rows, n, k, bias, threads):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    kernel = BF16Kernel(KERNEL.library, isa, KERNEL.max_rows)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernel.linear(x, w, b)
    finally:
        torch.set_num_threads(previous)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    exact = reference(x, w, b)
    # one bf16 rounding of a sum whose fp32 error is at most k * 2^-24 * sum |x w| (any order of the sums)
    slack = k * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - exact).abs() <= exact.abs() * 2.0**-8 + slack + 1e-30).all()
    # and it is nn.Linear's result except where the two fp32 sums straddle a bf16 rounding boundary
    assert (y != F.linear(x, w, b)).float().mean() <= 0.02
    # each row is summed the same way whatever the batch: a row decoded among others equals the row alone
    activated = kernel.linear(x, w, b, gelu=True)
    for i in range(rows):
        assert torch.equal(kernel.linear(x[i:i + 1], w, b), y[i:i + 1])
        assert torch.equal(kernel.linear(x[i:i + 1], w, b, gelu=True), activated[i:i + 1])


@needs_kernel
def test_kernel_keeps_nan_and_infinity():
    x = torch.ones(2, 64).bfloat16()
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    y = KERNEL.linear(x, torch.ones(8, 64).bfloat16(), None)
    assert y[0].isnan().all() and (y[1] == float("inf")).all()


@needs_kernel
def test_linear_uses_the_kernel_up_to_its_row_limit(monkeypatch):
    monkeypatch.setattr(neoxlite.cpu_kernels, "_loaded", dataclasses.replace(KERNEL, max_rows=8))
    calls = []
    real = BF16Kernel.linear
    monkeypatch.setattr(BF16Kernel, "linear", lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    layer = Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        layer(torch.randn(1, 1, 64).bfloat16())  # a decode step at batch 1
        layer(torch.randn(8, 1, 64).bfloat16())  # the largest batch the kernel serves
        assert len(calls) == 2
        layer(torch.randn(1, 9, 64).bfloat16())  # more rows: PyTorch's matmul
        assert len(calls) == 2
        layer.float()(torch.randn(2, 1, 64))  # fp32 decode rows: the fp32 kernel
        assert len(calls) == 3
        layer(torch.randn(1, MAX_ROWS_F32 + 1, 64))  # more fp32 rows than one pass serves: MKL
        layer.half()(torch.randn(1, 1, 64).half())  # other dtypes: PyTorch's
    assert len(calls) == 3


@pytest.mark.skipif(KERNEL is None or KERNEL.isa != 1 or matrix_engine.amx()[0],
                    reason="the kernel takes every row count only on AVX2 without AMX")
def test_on_avx2_a_prefill_takes_the_kernel_too(monkeypatch):
    calls = []
    real = BF16Kernel.linear
    monkeypatch.setattr(BF16Kernel, "linear", lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    layer = Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, 300, 64).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert calls == [(1, 300, 64)]
    for i in (0, 150, 299):  # each prompt position gets the bits it gets as a single row
        assert torch.equal(y[0, i], layer(x[:, i:i + 1])[0, 0])
    wide = Linear(520, 40).to(torch.bfloat16).requires_grad_(False)  # inputs past the kept per-thread buffer
    x = torch.randn(600, 520).bfloat16()
    with torch.no_grad():
        y = wide(x)
        assert all(torch.equal(y[i], wide(x[i:i + 1])[0]) for i in (0, 333, 599))
    torch.testing.assert_close(y.float(), F.linear(x.float(), wide.weight.float(), wide.bias.float()),
                               rtol=2**-7, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("rows,n,k", [(1, 13, 7), (3, 33, 1000), (4, 64, 64), (2, 130, 4096), (1, 4, 31),
                                      (4, 7, 33), (2, 5, 17)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_kernel_is_an_fp32_sum(isa, rows, n, k, bias, threads):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    kernel = BF16Kernel(KERNEL.library, isa, KERNEL.max_rows)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernel.linear(x, w, b)
    finally:
        torch.set_num_threads(previous)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    exact = reference(x, w, b)
    slack = (k + 1) * 2.0**-24 * (x.double().abs() @ w.double().abs().T + (b.double().abs() if bias else 0))
    assert ((y.double() - exact).abs() <= slack + 1e-30).all()
    # each row is summed the same way whatever the batch: batched decoding equals row by row
    assert torch.equal(kernel.linear(x[-1:], w, b), y[-1:])
    assert torch.equal(kernel.linear(x, w, b, gelu=True), F.gelu(y))


@needs_kernel
def test_training_goes_through_autograd():
    layer = Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(1, 16).bfloat16()
    layer(x).float().sum().backward()  # the kernel has no backward: nn.Linear's forward is used
    assert layer.weight.grad is not None and layer.weight.grad.shape == (8, 16)


@needs_kernel
def test_only_torchs_openmp_runtime_is_loaded():
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps")
    libraries = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(libraries) == 1, libraries  # the kernel's threads are torch's threads


def run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NEOXLITE_CACHE": str(tmp_path / "cache"), **env})


STATUS_AND_GENERATE = """
import torch
from neoxlite.cpu_kernels import bf16_kernel, kernel_status
from neoxlite.linear import Linear
print(kernel_status())
print(bf16_kernel() is None)
with torch.no_grad():
    print(Linear(8, 4).to(torch.bfloat16)(torch.ones(1, 8).bfloat16()).shape)
"""


@pytest.mark.parametrize("env,reason", [
    ({"NEOXLITE_CPU_KERNELS": "0"}, "CPU kernels off (NEOXLITE_CPU_KERNELS=0)"),
    ({"CC": "/nonexistent/cc", "PATH": "/nonexistent"}, "no C compiler"),
    ({"CC": "false"}, "building the CPU kernels failed"),
])
def test_without_a_kernel_pytorch_computes_and_the_status_says_why(tmp_path, env, reason):
    if env.get("CC") == "false":  # a compiler that answers --version but fails every build
        failing = tmp_path / "cc"
        failing.write_text('#!/bin/sh\n[ "$1" = --version ] && echo cc 1.0 && exit 0\necho "cc: error: simulated" >&2\nexit 1\n')
        failing.chmod(0o755)
        env = {**env, "CC": str(failing), "PATH": "/nonexistent"}
    done = run_python(STATUS_AND_GENERATE, tmp_path, **env)
    assert done.returncode == 0, done.stderr
    status, missing, shape = done.stdout.splitlines()
    assert reason in status and "PyTorch's bf16 matmul" in status
    assert missing == "True" and shape == "torch.Size([1, 4])"


@needs_kernel
def test_build_is_cached_and_written_whole(tmp_path):
    first = run_python(STATUS_AND_GENERATE, tmp_path)
    assert first.returncode == 0 and first.stdout.splitlines()[1] == "False", first.stderr
    cached = list((tmp_path / "cache" / "kernels").iterdir())
    assert not [p for p in cached if p.name.startswith(".")], cached  # no temporary file left behind
    built = [p for p in cached if p.suffix == ".so"]  # AMX machines also cache their measured crossovers
    assert len(built) == 1, cached
    stamp = built[0].stat().st_mtime_ns
    again = run_python(STATUS_AND_GENERATE, tmp_path, CC="/nonexistent/cc-is-not-needed-now")
    assert again.returncode == 0 and again.stdout.splitlines()[1] == "False", again.stderr
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_model_layers_are_neoxlite_linears():
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.model import GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1,
                           vocab_size=64)
    model = GPTNeoXForCausalLM(config)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is neoxlite.linear.Linear for m in linears)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_fused_gelu_is_torchs_gelu_on_every_bf16_value_an_activation_takes(isa):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    # normal numbers below 1e30 (PyTorch flushes subnormals to zero, and overflows to inf above ~1.7e38)
    used = every[(every.float().abs() >= 2.0**-126) & (every.float().abs() < 1e30)]
    x = torch.cat([used, torch.zeros(-len(used) % 64, dtype=torch.bfloat16)]).view(-1, 64)
    identity = torch.eye(64, dtype=torch.bfloat16)  # x @ I.T is x exactly: only the GELU is compared
    kernel = BF16Kernel(KERNEL.library, isa, KERNEL.max_rows)
    ours, torchs = kernel.linear(x, identity, None, gelu=True).float(), F.gelu(x).float()
    assert (ours == torchs).float().mean() > 0.995
    # where they differ: one bf16 step; or, for x < -3 where GELU(x) is tiny, both formulas' erf error of ~1e-7
    # times |x|; or a subnormal result that PyTorch flushes to zero
    assert ((ours - torchs).abs() <= torchs.abs() * 2.0**-7 + 2e-7 * x.float().abs() + 2.0**-126).all()


@needs_kernel
def test_mlp_uses_the_fused_gelu_only_for_exact_gelu(monkeypatch):
    from neoxlite.config import GPTNeoXConfig
    from neoxlite.model import GPTNeoXMLP

    seen = []
    real = BF16Kernel.linear
    monkeypatch.setattr(BF16Kernel, "linear", lambda self, *a, **kw: seen.append(kw.get("gelu", False))
                        or real(self, *a, **kw))
    for act, fused in [("gelu", True), ("gelu_new", False)]:
        config = GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1,
                               vocab_size=64, hidden_act=act)
        mlp = GPTNeoXMLP(config).to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(1, 1, 32).bfloat16()
        seen.clear()
        y = mlp(x)
        assert seen == [fused, False]
        torch.testing.assert_close(y, mlp.dense_4h_to_h(mlp.act(F.linear(x, mlp.dense_h_to_4h.weight,
                                                                         mlp.dense_h_to_4h.bias))), rtol=0.02, atol=0.02)


@needs_kernel
# head sizes with and without a tail past the 16-value groups; cached lengths within one score block and past it
@pytest.mark.parametrize("batch,heads,hs,rot,past", [(1, 4, 64, 16, 0), (1, 4, 64, 16, 37), (3, 2, 24, 24, 5),
                                                     (2, 3, 40, 8, 2100), (2, 2, 100, 20, 9), (1, 2, 128, 32, 4200)])
def test_decode_attention_equals_rotary_cache_write_and_sdpa(batch, heads, hs, rot, past):
    from neoxlite.model import _apply_rotary

    gen = torch.Generator().manual_seed(past + hs)
    capacity = past + 3
    qkv = torch.randn(batch, 1, heads * 3 * hs, generator=gen).bfloat16()
    angle = torch.randn(batch, 1, 1, rot, generator=gen) * 3
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    keys = torch.randn(batch, heads, capacity, hs, generator=gen).bfloat16()
    values = torch.randn(batch, heads, capacity, hs, generator=gen).bfloat16()
    ref_keys, ref_values = keys.clone(), values.clone()

    out = KERNEL.decode_attention(qkv, cos, sin, keys, values, past, heads)

    split = qkv.view(batch, 1, heads, 3 * hs).transpose(1, 2)  # (B, nh, 1, 3hs)
    q = _apply_rotary(split[..., :hs], cos, sin)
    ref_keys[:, :, past:past + 1] = _apply_rotary(split[..., hs:2 * hs], cos, sin)
    ref_values[:, :, past:past + 1] = split[..., 2 * hs:]
    assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)  # the same bits, nothing else touched
    expected = F.scaled_dot_product_attention(q, ref_keys[:, :, :past + 1], ref_values[:, :, :past + 1])
    expected = expected.transpose(1, 2).reshape(batch, 1, heads * hs)
    exact = F.scaled_dot_product_attention(q.double(), ref_keys[:, :, :past + 1].double(),
                                           ref_values[:, :, :past + 1].double()).transpose(1, 2).reshape_as(out)
    # at least as close to the exact result as PyTorch's own bf16 attention (which rounds the softmax weights to
    # bf16 before multiplying by v; the kernel keeps them in fp32 and rounds once)
    ours_error, torchs_error = (out.double() - exact).abs(), (expected.double() - exact).abs()
    assert ours_error.max() <= torchs_error.max() * 1.01 + 1e-6
    assert ours_error.mean() <= torchs_error.mean() * 1.01 + 1e-7


@needs_kernel
def test_decode_attention_keeps_nan():
    heads, hs = 2, 64
    qkv = torch.randn(1, 1, heads * 3 * hs).bfloat16()
    qkv[0, 0, 5] = float("nan")  # in head 0's query
    ones = torch.ones(1, 1, 1, 16).bfloat16()
    keys, values = torch.randn(1, heads, 40, hs).bfloat16(), torch.randn(1, heads, 40, hs).bfloat16()
    out = KERNEL.decode_attention(qkv, ones, ones * 0, keys, values, 30, heads).view(heads, hs)
    assert out[0].isnan().all() and out[1].isfinite().all()


@needs_kernel
def test_a_compiler_without_amx_builds_the_vector_kernels(tmp_path):
    """A compiler that does not know the AMX instructions (GCC < 11, Clang < 12; simulated with -DNEOX_NO_AMX)
    still builds every vector kernel; the AMX kernels are stubs that neox_has_amx() reports, and an AMX CPU then
    leaves the tiles to oneDNN."""
    import shutil

    compiler = tmp_path / "cc"
    compiler.write_text(f'#!/bin/sh\nexec {shutil.which("gcc") or shutil.which("cc")} -DNEOX_NO_AMX "$@"\n')
    compiler.chmod(0o755)
    code = STATUS_AND_GENERATE + "import neoxlite.cpu_kernels as k\nprint(k.bf16_kernel().library.neox_has_amx())\n"
    done = run_python(code, tmp_path, CC=str(compiler))
    assert done.returncode == 0, done.stderr
    status, missing, shape, has_amx = done.stdout.splitlines()
    assert missing == "False" and shape == "torch.Size([1, 4])" and has_amx == "0"
    assert "AMX-BF16 kernel" not in status and "in bf16: 1-" not in status and "AMX-INT8" not in status
    assert ("oneDNN (AMX) above" in status) is matrix_engine.amx()[0]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_no_rows_give_an_empty_result(isa):
    """An empty batch computes nothing (the AMX kernel once divided by a tile width of zero rows)."""
    kernel = BF16Kernel(KERNEL.library, isa, KERNEL.max_rows)
    w = torch.randn(16, 64).bfloat16()
    for gelu in (False, True):
        assert kernel.linear(torch.empty(0, 64).bfloat16(), w, None, gelu=gelu).shape == (0, 16)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_out_receives_the_result(isa, dtype):
    """With `out` (as the decode step passes it, allocated before the kernel calls) the result is written there:
    the same bits as a call that allocates, in the tensor given (fp32 with GELU: PyTorch's GELU after, a new
    tensor). Every row count the engines split at."""
    kernel = BF16Kernel(KERNEL.library, isa, KERNEL.max_rows)
    gen = torch.Generator().manual_seed(isa)
    w, b = torch.randn(48, 64, generator=gen).to(dtype), torch.randn(48, generator=gen).to(dtype)
    for rows in (1, 5, 17):
        x = torch.randn(rows, 1, 64, generator=gen).to(dtype)
        for gelu in (False, True):
            out = torch.empty(rows, 1, 48, dtype=dtype)
            got = kernel.linear(x, w, b, gelu=gelu, out=out)
            assert torch.equal(got, kernel.linear(x, w, b, gelu=gelu))
            assert (got is out) == (dtype is torch.bfloat16 or not gelu)


@needs_kernel
def test_decode_attention_writes_into_out_and_takes_rotary_rows():
    """decode_attention with `out` and cos/sin as (B, rot) rows (as the decode step passes them) gives the bits of
    the call with (B, 1, 1, rot) and its own output, and writes the same cache."""
    batch, heads, hs, rot, past = 2, 3, 64, 16, 5
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, 1, heads * 3 * hs, generator=gen).bfloat16()
    angle = torch.randn(batch, 1, 1, rot, generator=gen)
    cos, sin = angle.cos().bfloat16(), angle.sin().bfloat16()
    keys = torch.randn(batch, heads, past + 2, hs, generator=gen).bfloat16()
    values = torch.randn(batch, heads, past + 2, hs, generator=gen).bfloat16()
    keys2, values2 = keys.clone(), values.clone()
    want = KERNEL.decode_attention(qkv, cos, sin, keys, values, past, heads)
    out = torch.empty(batch, 1, heads * hs, dtype=torch.bfloat16)
    got = KERNEL.decode_attention(qkv, cos.reshape(batch, -1), sin.reshape(batch, -1), keys2, values2, past, heads,
                                  out)
    assert got is out and torch.equal(got, want)
    assert torch.equal(keys2, keys) and torch.equal(values2, values)
