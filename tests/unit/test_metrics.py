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
    clock = iter([100.0, 102.0])  # window start, log time (2 s later; the next window starts then)
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


def test_progress_eta_last_step_and_summary(caplog, monkeypatch):
    """The step line ends with [step/total pct, eta]; the last step is always logged; the
    closing summary names steps, tokens, wall time, tokens/s, MFU and peak memory."""
    now = [0.0]
    monkeypatch.setattr("torchtitan.components.metrics.time.perf_counter", lambda: now[0])
    m = MetricsProcessor(device=torch.device("cpu"), log_freq=4, flops_per_token=1000, peak_flops=1e6,
                         total_steps=10)
    from torchtitan.tools.logging import logger

    logged = []
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="torchtitan"):
            for step in range(1, 11):
                now[0] += 2.0  # 2 s per step
                m.add_tokens(100)
                if m.should_log(step):
                    logged.append(step)
                    m.log(step, loss=1.0, grad_norm=1.0, lr=1e-3)
    finally:
        logger.propagate = False
    assert logged == [1, 4, 8, 10]
    # keyed by step: pytest >= 9.2 may hand the same record to caplog twice
    by_step = {int(re.search(r"step:\s+(\d+)", r.getMessage()).group(1)): r.getMessage()
               for r in caplog.records if "loss:" in r.getMessage()}
    assert sorted(by_step) == [1, 4, 8, 10], by_step
    assert by_step[4].endswith("[4/10 40%, eta 0:00:12]"), by_step[4]  # 6 steps left x 2 s
    assert by_step[10].endswith("[10/10 100%, eta 0:00:00]"), by_step[10]
    summary = m.summary()
    assert summary.startswith("10 steps, 1,000 tokens per device, wall time 0:00:20, mean 50 tokens/s"), summary
    assert "mfu 5.00%" in summary and "peak memory" in summary

    # a resumed run: the ETA counts only the steps this process ran
    now[0] = 0.0
    r = MetricsProcessor(device=torch.device("cpu"), log_freq=5, flops_per_token=1, peak_flops=None, total_steps=20)
    for step in range(11, 16):
        now[0] += 1.0
        r.should_log(step)
    assert r.progress(15, now[0]) == "[15/20 75%, eta 0:00:05]"
    assert r.summary().startswith("5 steps (to step 15), 0 tokens")


def test_tensorboard_run_folders_and_wandb_environment(tmp_path, monkeypatch):
    """Each run writes TensorBoard under its own timestamped folder; W&B project and mode come
    from WANDB_PROJECT / WANDB_MODE when the config leaves them empty, the config wins else."""
    from torchtitan.components import metrics as metrics_module
    from torchtitan.config import ConfigManager

    seen = {}

    class FakeWandB:
        def __init__(self, log_dir, project, mode, config):
            seen.update(project=project, mode=mode)

        def close(self):
            pass

    monkeypatch.setattr(metrics_module, "_WandBLogger", FakeWandB)
    monkeypatch.setenv("WANDB_PROJECT", "from_env")
    monkeypatch.setenv("WANDB_MODE", "offline")
    stamps = iter(["20260101-000000", "20260101-000001", "20260101-000002"])
    monkeypatch.setattr(metrics_module, "_run_stamp", lambda: next(stamps))
    args = ["--job.dump_folder", str(tmp_path), "--metrics.enable_tensorboard", "--metrics.enable_wandb"]
    for _ in range(2):
        cfg = ConfigManager().parse_args(args)
        m = metrics_module.build_metrics_processor(cfg, rank=0, device=torch.device("cpu"), flops_per_token=1)
        m.close()
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["20260101-000000", "20260101-000001"]
    assert (tmp_path / "tb" / "20260101-000001" / "rank_0").is_dir()
    assert seen == {"project": "from_env", "mode": "offline"}
    cfg = ConfigManager().parse_args(args + ["--metrics.wandb_project", "mine", "--metrics.wandb_mode", "disabled"])
    metrics_module.build_metrics_processor(cfg, rank=0, device=torch.device("cpu"), flops_per_token=1).close()
    assert seen == {"project": "mine", "mode": "disabled"}
