"""Per-step training metrics: the console line, TensorBoard, Weights & Biases and JSONL.

Throughput is measured between two log steps: tokens this rank processed divided by wall
time, so tokens/s is per device. TFLOP/s uses the model's FLOPs per token (6N plus the
attention term); MFU divides by the device's dense bf16 peak. The JSONL file holds the
same numbers as plain records so that scripts (scripts/benchmark.py) never parse the
coloured console line.

The step line ends with the progress, ``[step/total pct%, eta H:MM:SS]`` (the ETA from the
mean step time of this run so far); the last step is always logged, and ``summary()`` is the
one closing line: steps, tokens, wall time, mean tokens/s, MFU and peak memory.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from torchtitan.tools.device_info import DeviceMemoryMonitor, device_name, peak_flops
from torchtitan.tools.logging import logger


class _Color:
    def __init__(self, enabled: bool):
        on = enabled
        self.cyan = "\033[36m" if on else ""
        self.green = "\033[32m" if on else ""
        self.yellow = "\033[33m" if on else ""
        self.blue = "\033[34m" if on else ""
        self.magenta = "\033[35m" if on else ""
        self.red = "\033[31m" if on else ""
        self.reset = "\033[39m" if on else ""


class _TensorBoardLogger:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, max_queue=1000)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _WandBLogger:
    def __init__(self, log_dir: str, project: str, mode: str, config: dict[str, Any] | None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "metrics.enable_wandb needs the wandb package: pip install 'torchtitan[wandb]'"
            ) from e
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=log_dir, mode=mode, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _JsonlLogger:
    """Appends one JSON object per logged window (a resumed run continues the same file).

    Each line is flushed at once, so a run that dies keeps every window it logged.
    Non-finite values are written as null: the file stays strict JSON for any reader.
    """

    def __init__(self, path: str, device: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.device = device
        self.file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int, *, window_s: float, window_tokens: int) -> None:
        record: dict[str, Any] = {
            "step": step,
            "time": time.time(),
            "device": self.device,
            "window_s": window_s,
            "window_tokens": window_tokens,
        }
        for k, v in metrics.items():
            record[k] = v if not isinstance(v, float) or math.isfinite(v) else None
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class _Window:
    """Counters since the last log line."""

    tokens: int = 0
    data_loading_s: float = 0.0
    start: float = field(default_factory=lambda: time.perf_counter())


class MetricsProcessor:
    def __init__(
        self,
        *,
        device: torch.device,
        log_freq: int,
        flops_per_token: int,
        peak_flops: float | None,
        color: bool = False,
        tb_dir: str | None = None,
        wandb_dir: str | None = None,
        wandb_project: str = "torchtitan",
        wandb_mode: str = "online",
        config_for_wandb: dict[str, Any] | None = None,
        jsonl_path: str | None = None,
        total_steps: int = 0,
    ):
        self.device = device
        self.log_freq = log_freq
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.color = _Color(color)
        self.memory = DeviceMemoryMonitor(device)
        self.window = _Window()
        self.loggers: list[Any] = []
        if tb_dir:
            os.makedirs(tb_dir, exist_ok=True)
            self.loggers.append(_TensorBoardLogger(tb_dir))
        if wandb_dir:
            os.makedirs(wandb_dir, exist_ok=True)
            self.loggers.append(_WandBLogger(wandb_dir, wandb_project, wandb_mode, config_for_wandb))
        self.jsonl = _JsonlLogger(jsonl_path, device_name(device)) if jsonl_path else None
        # Summary over the run: tokens/s of each window after the first (warm-up) one.
        self.tps_history: list[float] = []
        self.last: dict[str, float] = {}
        # Progress and the closing summary.
        self.total_steps = total_steps
        self.start = self.window.start
        self.first_step: int | None = None  # the first step this process ran (after a resume: > 1)
        self.last_step = 0
        self.total_tokens = 0
        self.peak_reserved = (0.0, 0.0)  # GiB, % of the device
        self.peak_active = 0.0  # GiB: the allocator's peak of allocated bytes, for the same windows

    def should_log(self, step: int) -> bool:
        """Whether to log after ``step`` (the trainer asks once per step): the first, every
        ``log_freq``-th and the last one."""
        if self.first_step is None:
            self.first_step = step
        self.last_step = max(self.last_step, step)
        return step == 1 or step % self.log_freq == 0 or step == self.total_steps

    def add_tokens(self, n: int) -> None:
        self.window.tokens += n
        self.total_tokens += n

    def progress(self, step: int, now: float) -> str:
        """``[5/100 5%, eta 0:01:23]``: the remaining steps at this run's mean step time."""
        if self.total_steps <= 0:
            return f"[step {step}]"
        pct = 100 * step / self.total_steps
        done = step - (self.first_step if self.first_step is not None else step) + 1
        if done < 1 or step >= self.total_steps:
            eta = "0:00:00" if step >= self.total_steps else "--"
        else:
            seconds = (now - self.start) / done * (self.total_steps - step)
            eta = str(datetime.timedelta(seconds=round(seconds)))
        return f"[{step}/{self.total_steps} {pct:.0f}%, eta {eta}]"

    def add_data_loading_time(self, seconds: float) -> None:
        self.window.data_loading_s += seconds

    def log(
        self, step: int, *, loss: float, grad_norm: float, lr: float, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.window.start, 1e-9)
        tps = self.window.tokens / elapsed
        tflops = self.flops_per_token * tps / 1e12
        mfu = 100 * self.flops_per_token * tps / self.peak_flops if self.peak_flops else None
        mem_active, mem_active_pct, mem_reserved, mem_reserved_pct = self.memory.peak()
        if mem_reserved > self.peak_reserved[0]:
            self.peak_reserved = (mem_reserved, mem_reserved_pct)
        self.peak_active = max(self.peak_active, mem_active)
        data_pct = 100 * self.window.data_loading_s / elapsed
        metrics = {
            "loss_metrics/global_avg_loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "throughput(tps)": tps,
            "tflops": tflops,
            "time_metrics/data_loading(s)": self.window.data_loading_s,
            "time_metrics/data_loading(%)": data_pct,
            "memory/max_active(GiB)": mem_active,
            "memory/max_active(%)": mem_active_pct,
            "memory/max_reserved(GiB)": mem_reserved,
            "memory/max_reserved(%)": mem_reserved_pct,
        }
        if mfu is not None:
            metrics["mfu(%)"] = mfu
        if extra:
            metrics.update(extra)
        for lg in self.loggers:
            lg.log(metrics, step)
        if self.jsonl is not None:
            self.jsonl.log(metrics, step, window_s=elapsed, window_tokens=self.window.tokens)
        if step > 1:
            self.tps_history.append(tps)

        c = self.color
        mfu_txt = f"{mfu:.2f}%" if mfu is not None else "n/a"
        logger.info(
            f"{c.red}step: {step:2}  "
            f"{c.green}loss: {loss:.8g}  "
            f"{c.yellow}grad_norm: {grad_norm:.4f}  "
            f"{c.cyan}lr: {lr:.4e}  "
            f"{c.blue}memory: {mem_reserved:.2f}GiB({mem_reserved_pct:.2f}%)  "
            f"{c.magenta}tps: {round(tps):,}  tflops: {tflops:.2f}  mfu: {mfu_txt}  "
            f"data: {data_pct:.1f}%{c.reset}  {self.progress(step, now)}"
        )
        self.window = _Window(start=now)
        self.memory.reset_peak()
        self.last = metrics
        return metrics

    def log_validation(
        self, step: int, *, loss: float, perplexity: float, batches: int, seconds: float
    ) -> dict[str, float]:
        """One validation's numbers (components/validate.py) to every sink; the training
        window's counters are left alone."""
        metrics = {
            "validation_metrics/loss": loss,
            "validation_metrics/perplexity": perplexity,
            "validation_metrics/batches": float(batches),
            "validation_metrics/time(s)": seconds,
        }
        for lg in self.loggers:
            lg.log(metrics, step)
        if self.jsonl is not None:
            self.jsonl.log(metrics, step, window_s=seconds, window_tokens=0)
        self.window.start += seconds  # the training window's tokens/s leaves validation time out
        c = self.color
        logger.info(
            f"{c.yellow}validate step: {step:2}  {c.green}loss: {loss:.8g}  "
            f"{c.cyan}perplexity: {perplexity:.4f}  {c.magenta}batches: {batches}  time: {seconds:.2f}s{c.reset}"
        )
        return metrics

    def mean_tokens_per_s(self) -> float:
        """Tokens/s per device over the logged windows after the first (warm-up) one; over
        the whole run when there is no such window."""
        if self.tps_history:
            return sum(self.tps_history) / len(self.tps_history)
        return self.total_tokens / max(time.perf_counter() - self.start, 1e-9)

    def summary(self) -> str:
        """One line for the end of the run: steps, tokens, wall time, mean tokens/s, MFU and
        peak memory (throughput per device, over the logged windows after the first, warm-up
        one; over the whole run when there is no such window)."""
        wall = max(time.perf_counter() - self.start, 1e-9)
        steps = self.last_step - self.first_step + 1 if self.first_step is not None else 0
        mean = self.mean_tokens_per_s()
        mfu = f"{100 * self.flops_per_token * mean / self.peak_flops:.2f}%" if self.peak_flops else "n/a"
        gib, pct = self.peak_reserved
        memory = f"{gib:.2f}GiB ({pct:.1f}%)" if gib > 0 else "n/a"
        last = f" (to step {self.last_step})" if self.first_step not in (None, 1) else ""
        return (
            f"{steps} steps{last}, {self.total_tokens:,} tokens per device, wall time "
            f"{datetime.timedelta(seconds=round(wall))}, mean {mean:,.0f} tokens/s per device, "
            f"tflops {self.flops_per_token * mean / 1e12:.2f}, mfu {mfu}, peak memory {memory}"
        )

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def build_metrics_processor(job_config: Any, *, rank: int, device: torch.device, flops_per_token: int) -> MetricsProcessor:
    """The metrics of a run from ``[metrics]``: console on the logging ranks, TensorBoard and
    JSONL per rank under ``job.dump_folder``, W&B on rank 0."""
    m, dump = job_config.metrics, job_config.job.dump_folder
    log_here = rank == 0 or not m.rank_0_only
    tb_dir = None
    if m.enable_tensorboard:  # every run in its own folder, so re-runs do not mix
        tb_dir = os.path.join(dump, m.save_tb_folder, _run_stamp(), f"rank_{rank}")
    return MetricsProcessor(
        device=device,
        log_freq=m.log_freq,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops(device, m.peak_tflops),
        color=m.enable_color_printing,
        tb_dir=tb_dir if log_here else None,
        wandb_dir=dump if m.enable_wandb and rank == 0 else None,
        wandb_project=m.wandb_project or os.environ.get("WANDB_PROJECT") or "torchtitan",
        wandb_mode=m.wandb_mode or os.environ.get("WANDB_MODE") or "online",
        config_for_wandb=job_config.to_dict() if m.enable_wandb else None,
        jsonl_path=os.path.join(dump, m.save_jsonl_folder, f"rank_{rank}.jsonl") if m.enable_jsonl and log_here else None,
        total_steps=job_config.training.steps,
    )


def _run_stamp() -> str:
    """This run's TensorBoard folder name (a timestamp), the same on every rank (rank 0's)."""
    stamp = [datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(stamp, src=0)
    return stamp[0]
