"""The trace summary on a hand-built trace whose figures are known, and on real kernel names."""

from __future__ import annotations

import gzip
import json

import pytest

from torchtitan.tools.trace_summary import categorize, format_summary, summarize_trace

GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas"
NCCL = "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


def _event(name: str, start: float, end: float, cat: str = "kernel", stream: int = 7) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start, "pid": 0, "tid": stream,
            "args": {"device": 0, "stream": stream}}


def _trace() -> dict:
    events = [
        _event("ProfilerStep#1", 0, 1000, cat="gpu_user_annotation"),
        _event("ProfilerStep#2", 1000, 2000, cat="gpu_user_annotation"),
        _event("ProfilerStep#2", 1000, 1010, cat="user_annotation"),  # the CPU-side span: ignored
        _event(GEMM, 0, 400),
        _event(GEMM, 1000, 1400),
        _event("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64>>", 400, 600),
        _event(NCCL, 300, 500, stream=20),  # hidden under the matmul and attention
        _event(NCCL, 1500, 1800, stream=20),  # exposed except where the triton kernel runs
        _event("triton_poi_fused_add_0", 1700, 1750),
        _event("Memcpy DtoH (Device -> Pinned)", 1900, 1950, cat="gpu_memcpy"),
        _event("void at::native::vectorized_elementwise_kernel<4>", 1980, 2050),  # clipped at 2000
        _event(GEMM, 2100, 2200),  # after the profiled steps: not counted
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000, "pid": 1, "tid": 1},
    ]
    return {"traceEvents": events}


def test_known_trace_figures():
    (s,) = summarize_trace(_trace(), top=3)
    assert s.device == "0" and s.steps == 2 and s.window_us == 2000
    # compute: [0,600] [1000,1400] [1700,1750] [1900,1950] [1980,2000]
    assert s.compute_us == pytest.approx(1120)
    assert s.comm_us == pytest.approx(500)
    assert s.exposed_comm_us == pytest.approx(250)  # [1500,1700] + [1750,1800]
    assert s.busy_us == pytest.approx(1370) and s.idle_us == pytest.approx(630)
    assert s.category_us == pytest.approx(
        {"matmul": 800, "communication": 500, "attention": 200, "triton (fused)": 50, "memcpy": 50, "other": 20}
    )
    assert s.top[0] == (GEMM, "matmul", 2, pytest.approx(800))
    assert [t[1] for t in s.top] == ["matmul", "communication", "attention"]
    text = format_summary(s)
    assert "exposed (no compute running) 0.2 ms  12.5%" in text and "idle 0.6 ms  31.5%" in text


def test_without_step_annotations_the_window_is_first_to_last_kernel():
    trace = {"traceEvents": [_event(GEMM, 100, 200), _event(NCCL, 250, 300, stream=20)]}
    (s,) = summarize_trace(trace)
    assert s.steps == 0 and s.window_us == 200 and s.exposed_comm_us == 50 and s.idle_us == 50


@pytest.mark.parametrize(
    "name, kind",
    [
        (GEMM, "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_32x1_nn_align8>", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", "attention"),
        ("fmha_cutlassB_f32_aligned_64x64_k64_sm80", "attention"),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton (fused)"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ],
)
def test_real_kernel_names(name, kind):
    assert categorize(name) == kind


def test_cli_reads_gzip_and_fails_on_a_trace_without_kernels(tmp_path, capsys):
    from torchtitan.tools import trace_summary as cli

    gz = tmp_path / "rank0_trace.json.gz"
    with gzip.open(gz, "wt") as f:
        json.dump(_trace(), f)
    assert cli.main([str(gz), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "over 2 profiled steps (1.0 ms each)" in out and "top kernels:" in out
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]}))
    assert cli.main([str(cpu)]) == 1
    assert "no GPU kernels" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main([str(bad)]) == 2
