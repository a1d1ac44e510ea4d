"""Which engine computes a CPU linear of a given number of rows (neoxlite.matrix_engine): the crossover picked from
timings (injected here; measured on an AMX machine), its cache, AMX detection, and the dispatch that follows it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import neoxlite.cpu_kernels
from neoxlite import matrix_engine
from neoxlite.cpu_kernels import BF16Kernel, bf16_kernel, kernel_status
from neoxlite.linear import Linear

KERNEL = bf16_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no CPU kernel here: {kernel_status()}")
HAS_AMX, AMX_WHY = matrix_engine.amx()

# Issue 18's figures (Sapphire Rapids, 2048 -> 8192 bf16, 2 threads), in seconds: (kernel, oneDNN on AMX)
SAPPHIRE_RAPIDS = {1: (0.65e-3, 1.24e-3), 4: (0.95e-3, 1.16e-3), 16: (3.39e-3, 1.43e-3), 32: (6.00e-3, 1.60e-3)}


@pytest.mark.parametrize("timings,rows", [
    (SAPPHIRE_RAPIDS, 4),
    ({r: (r * 1e-4, 1e-2) for r in matrix_engine.CANDIDATE_ROWS}, 32),  # the kernel wins everywhere
    ({1: (2e-3, 1e-3), 4: (3e-3, 1e-3)}, 1),  # one row always stays on the kernel
    ({1: (1e-3, 2e-3), 2: (3e-3, 2e-3), 4: (1e-3, 2e-3)}, 1),  # a loss ends the range, a later win is noise
    ({1: (1e-3, 1e-3), 8: (2e-3, 2e-3), 16: (3e-3, 2e-3)}, 8),  # a tie keeps the kernel
])
def test_crossover_is_the_last_row_count_the_kernel_wins(timings, rows):
    assert matrix_engine.pick_rows(timings) == rows
    assert matrix_engine.AMX_DEFAULT_ROWS == matrix_engine.pick_rows(SAPPHIRE_RAPIDS)


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """These tests are about the cache, not about this machine's load while the suite runs."""
    monkeypatch.setattr(matrix_engine, "machine_busy", lambda: False)


def test_a_crossover_measured_on_a_busy_machine_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.undo()  # the autouse fixture's patch goes: the real check, on a load average of 64
    monkeypatch.setattr(matrix_engine.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    rows, source = matrix_engine.crossover("bf16 test", lambda: SAPPHIRE_RAPIDS, tmp_path)
    assert rows == 4 and "busy machine (not kept" in source and not (tmp_path / "crossover.json").exists()
    monkeypatch.setattr(matrix_engine.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert matrix_engine.crossover("bf16 test", lambda: SAPPHIRE_RAPIDS, tmp_path) == (4, "measured now")
    assert (tmp_path / "crossover.json").exists()


def test_crossover_is_measured_once_and_cached_whole(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return SAPPHIRE_RAPIDS

    assert matrix_engine.crossover("bf16 test", measure, tmp_path) == (4, "measured now")
    rows, source = matrix_engine.crossover("bf16 test", measure, tmp_path)
    assert (rows, len(calls)) == (4, 1) and "measured earlier" in source
    assert [p.name for p in tmp_path.iterdir()] == ["crossover.json"]  # no temporary file left behind
    saved = json.loads((tmp_path / "crossover.json").read_text())
    (key, entry), = saved.items()
    assert key.endswith("bf16 test") and torch.__version__ in key and entry["ms"]["16"] == [3.39, 1.43]
    assert matrix_engine.crossover("nf4 test", lambda: {1: (1.0, 2.0), 2: (1.0, 2.0)}, tmp_path)[0] == 2
    assert len(json.loads((tmp_path / "crossover.json").read_text())) == 2  # both kept


@pytest.mark.parametrize("content", ["{", "[1, 2]", '{"x": {"rows": "many"}}', '{"k": {"rows": 0}}'])
def test_a_damaged_cache_is_measured_again(tmp_path, content):
    (tmp_path / "crossover.json").write_text(content)
    assert matrix_engine.crossover("bf16 test", lambda: SAPPHIRE_RAPIDS, tmp_path) == (4, "measured now")
    assert "bf16 test" in next(iter(json.loads((tmp_path / "crossover.json").read_text())))


def test_amx_needs_both_flags(monkeypatch):
    monkeypatch.setattr(matrix_engine, "cpu_flags", lambda: {"avx2", "amx_tile"})
    matrix_engine.amx.cache_clear()
    try:
        usable, why = matrix_engine.amx()
    finally:
        matrix_engine.amx.cache_clear()
    assert not usable and "amx_bf16" in why and "amx_tile" not in why


@needs_kernel
def test_status_says_which_engine_runs_which_rows():
    status = kernel_status()
    if KERNEL.max_rows == neoxlite.cpu_kernels.EVERY_ROW:  # AVX2 without AMX: oneDNN's bf16 is slower at any size
        assert f"bf16: neoxlite {KERNEL.isa_name} kernel for every row count;" in status and not HAS_AMX
    else:
        assert f"kernel for 1-{KERNEL.max_rows} rows" in status
    assert ("oneDNN (AMX) above" in status) is HAS_AMX
    quant = neoxlite.cpu_kernels.quant_kernel()
    amx_4bit = (f" (in bf16: 1-{quant.vector_rows_4bit}, AMX kernel for {quant.vector_rows_4bit + 1}-"
                f"{quant.max_rows_4bit_amx} rows and continuous-batching steps)" if quant.amx_4bit else "")
    assert (f"nf4/fp4: {quant.isa_name} kernel for 1-{quant.max_rows_4bit} rows{amx_4bit}, neoxlite's dequantized "
            f"tiles + torch's matmul above (bf16 in {str(matrix_engine.matmul_dtype(torch.bfloat16))[6:]}") in status
    assert quant.amx_4bit is (KERNEL.isa == neoxlite.cpu_kernels.ISA_AMX)
    amx_int8 = f" (AMX-INT8 from {quant.library.neox_amx_int8_from()} rows)" if quant.amx_int8 else ""
    assert f"int8: kernel for 1-{quant.max_rows} rows{amx_int8}, int8 tiles + torch's float32 matmul above" in status
    assert quant.amx_int8 is (KERNEL.isa == neoxlite.cpu_kernels.ISA_AMX and "amx_int8" in matrix_engine.cpu_flags())
    if not HAS_AMX:
        assert AMX_WHY in status
        assert KERNEL.max_rows == neoxlite.cpu_kernels._MAX_ROWS[KERNEL.isa]  # nothing changes without AMX
        assert quant.max_rows == quant.max_rows_4bit == neoxlite.cpu_kernels.MAX_ROWS_QUANT


@needs_kernel
def test_rows_above_the_crossover_take_torchs_matmul_with_its_bits(monkeypatch):
    monkeypatch.setattr(neoxlite.cpu_kernels, "_loaded", dataclasses.replace(KERNEL, max_rows=2))
    calls = []
    real = BF16Kernel.linear
    monkeypatch.setattr(BF16Kernel, "linear", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    layer = Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 1, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and not calls
        layer(x[:2])
        assert len(calls) == 1
        layer.forward_rows(x)  # rows of independent sequences stay on the kernel at every batch
        assert len(calls) == 2


@pytest.mark.skipif(not HAS_AMX, reason=f"AMX cannot run here: {AMX_WHY}")
@needs_kernel
def test_on_amx_many_rows_go_to_onednn_at_the_measured_crossover():
    """On an AMX machine: neoxlite's AMX kernel serves bf16 up to the crossover measured against oneDNN (or read
    from the cache), and a batch above it is oneDNN's matmul bit for bit."""
    assert "AMX-BF16 kernel" in kernel_status() and "oneDNN (AMX) above" in kernel_status()
    assert "crossovers measured" in kernel_status()
    assert KERNEL.isa == neoxlite.cpu_kernels.ISA_AMX
    assert 1 <= KERNEL.max_rows <= max(matrix_engine.AMX_CANDIDATE_ROWS)
    quant = neoxlite.cpu_kernels.quant_kernel()  # the quantized formats' crossovers, measured against the tiles
    assert 1 <= quant.max_rows_4bit <= 32 and 1 <= quant.max_rows <= max(matrix_engine.AMX_CANDIDATE_ROWS)
    # cached per build of the kernels (another build is timed again)
    build = Path(KERNEL.library._name).stem.removeprefix("neoxlite-cpu-")
    saved = json.loads((neoxlite.cpu_kernels._cache_dir() / "crossover.json").read_text())
    assert any(key.endswith(f"|bf16 {KERNEL.isa_name}|kernels {build}") for key in saved), list(saved)
    layer = Linear(2048, 512).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(KERNEL.max_rows + 1, 2048).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_kernel
def test_calibration_times_both_engines_on_a_layer():
    """What an AMX machine runs at first use, here on a small shape: every candidate row count timed."""
    quant = neoxlite.cpu_kernels.quant_kernel()
    amx = KERNEL.isa == neoxlite.cpu_kernels.ISA_AMX  # timed to more rows: it keeps up with oneDNN further
    for timings, candidates in ((neoxlite.cpu_kernels._time_bf16(KERNEL, (128, 64)),
                                 matrix_engine.AMX_CANDIDATE_ROWS if amx else matrix_engine.CANDIDATE_ROWS),
                                (neoxlite.cpu_kernels._time_4bit(quant, (128, 64)),
                                 matrix_engine.AMX_CANDIDATE_ROWS if quant.amx_4bit else matrix_engine.CANDIDATE_ROWS),
                                (neoxlite.cpu_kernels._time_int8(quant, (128, 64)),
                                 matrix_engine.AMX_CANDIDATE_ROWS if quant.amx_int8 else matrix_engine.CANDIDATE_ROWS)):
        assert sorted(timings) == list(candidates)
        assert all(k > 0 and e > 0 for k, e in timings.values())
        assert 1 <= matrix_engine.pick_rows(timings) <= max(candidates)
