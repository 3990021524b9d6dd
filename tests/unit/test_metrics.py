import logging
import re

import pytest
import torch

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.device_info import lookup_peak_flops, peak_flops


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989.5),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA B200", 2250),
        ("NVIDIA L40S", 362),
        ("AMD Instinct MI300X", 1307.4),
    ],
)
def test_peak_table(name, tflops):
    assert lookup_peak_flops(name) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_and_override():
    assert lookup_peak_flops("Some Future GPU") is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100.0) == pytest.approx(1e14)


def test_log_line_throughput_and_tensorboard(tmp_path, caplog, monkeypatch):
    clock = iter([100.0, 102.0, 102.0])  # window start, log time (2 s later), next window
    monkeypatch.setattr("torchtitan.components.metrics.time.perf_counter", lambda: next(clock))
    m = MetricsProcessor(
        device=torch.device("cpu"), log_freq=5, flops_per_token=1_000_000,
        peak_flops=1e12, tb_dir=str(tmp_path / "tb"),
    )
    m.add_tokens(4000)
    m.add_data_loading_time(0.5)
    from torchtitan.tools.logging import logger

    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="torchtitan"):
            out = m.log(5, loss=3.14159265, grad_norm=0.5, lr=1e-3)
    finally:
        logger.propagate = False
    assert out["throughput(tps)"] == pytest.approx(2000)
    assert out["tflops"] == pytest.approx(2000 * 1e6 / 1e12)
    assert out["mfu(%)"] == pytest.approx(100 * 2e9 / 1e12)
    assert out["time_metrics/data_loading(%)"] == pytest.approx(25.0)
    line = caplog.records[-1].getMessage()
    assert re.search(r"step:\s+5\s+loss: 3.1415927 ", line), line
    assert "tps: 2,000" in line
    assert m.should_log(1) and m.should_log(10) and not m.should_log(7)
    m.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
