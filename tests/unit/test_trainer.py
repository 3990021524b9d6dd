"""The trainer end to end on one CPU process: gradient accumulation and a short run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from small_trainer import DEBUG_TOML, small_trainer_config
from torchtitan.config import ConfigManager
from torchtitan.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path, *overrides):
    return small_trainer_config(
        tmp_path,
        "--training.seq_len", "64",
        "--training.max_norm", "1.0",
        "--metrics.log_freq", "1",
        "--activation_checkpoint.mode", "none",
        *overrides,
    )


def _one_step_grads(tmp_path, local_batch, global_batch):
    """Loss and gradients of the first step (the optimizer update itself is skipped:
    Adam's g/sqrt(v) turns 1e-9 rounding in near-zero gradients into lr-sized steps)."""
    cfg = _config(
        tmp_path,
        "--training.local_batch_size", str(local_batch),
        "--training.global_batch_size", str(global_batch),
        "--training.steps", "1",
        "--training.max_norm", "0",
    )
    trainer = Trainer(cfg)
    try:
        trainer.optimizers.step = lambda found_inf=None, grad_scale=None: None
        losses = trainer.train()
        grads = {k: v.grad.detach().clone() for k, v in trainer.model_parts[0].named_parameters()}
    finally:
        trainer.close()
    return losses, grads


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    losses_big, big = _one_step_grads(tmp_path / "a", local_batch=4, global_batch=4)
    losses_acc, acc = _one_step_grads(tmp_path / "b", local_batch=1, global_batch=4)
    assert losses_acc == pytest.approx(losses_big, rel=1e-6)
    assert big.keys() == acc.keys() and len(big) > 0
    for name in big:
        assert big[name].abs().sum() > 0, name
        torch.testing.assert_close(acc[name], big[name], rtol=1e-6, atol=1e-7, msg=name)
    # one microbatch alone is a different gradient: the comparison can fail
    _, single = _one_step_grads(tmp_path / "c", local_batch=1, global_batch=1)
    assert not torch.allclose(single["output.weight"], big["output.weight"], rtol=1e-3)


def test_global_batch_must_divide(tmp_path):
    from torchtitan.config import ConfigError

    with pytest.raises(ConfigError, match="global_batch_size"):
        _config(tmp_path, "--training.local_batch_size", "3", "--training.global_batch_size", "4")


def test_bad_layout_is_refused_before_any_process_group(tmp_path, monkeypatch):
    """torchrun says 4 ranks, the degrees multiply to 6: refused before the rendezvous (which
    on a multi-node job would first wait for every node) and before any device is touched."""
    from torchtitan import trainer as trainer_module
    from torchtitan.config import ConfigError

    def no_rendezvous(**kwargs):
        raise AssertionError("init_distributed ran before the layout was checked")

    monkeypatch.setattr(trainer_module.dist_utils, "init_distributed", no_rendezvous)
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = _config(
        tmp_path, "--parallelism.tensor_parallel_degree", "3", "--parallelism.data_parallel_shard_degree", "2"
    )
    with pytest.raises(ConfigError, match="world"):
        Trainer(cfg)


def test_cli_short_run_loss_falls_and_logs_every_step(tmp_path):
    """`python -m torchtitan.train` with the debug config: the loss more than halves."""
    cmd = [
        sys.executable, "-m", "torchtitan.train",
        "--job.config_file", DEBUG_TOML,
        "--job.dump_folder", str(tmp_path),
        "--training.steps", "40",
        "--training.seq_len", "128",
        "--training.local_batch_size", "4",
        "--optimizer.lr", "3e-3",
        "--training.mixed_precision_param", "float32",
        "--metrics.no-enable_color_printing",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    losses = [float(x) for x in re.findall(r"step:\s*\d+\s+loss:\s*([-+0-9.eE]+)", log)]
    assert len(losses) == 40, log[-2000:]
    last = sum(losses[-5:]) / 5  # per-step losses are single batches: average the noise
    assert last < 0.5 * losses[0], losses
    assert (tmp_path / "config.toml").exists()
    # the dumped config reproduces the run's settings
    again = ConfigManager().parse_args(["--job.config_file", str(tmp_path / "config.toml")])
    assert again.training.steps == 40 and again.training.seq_len == 128


def test_bad_option_exits_2_with_one_line_before_torch_is_imported(tmp_path):
    # -X importtime lists every module imported, on stderr: torch must not be among them.
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "torchtitan.train", "--training.sequence_len", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torchtitan.config" in imported and "torch" not in imported
    err = [line for line in out.stderr.strip().splitlines() if not line.startswith("import time:")]
    assert len(err) == 1 and "seq_len" in err[0] and "Traceback" not in out.stderr


def test_trainer_is_still_importable_from_the_entry_point():
    import torchtitan.train as entry
    from torchtitan.trainer import Trainer

    assert entry.Trainer is Trainer
    with pytest.raises(AttributeError, match="no_such_name"):
        entry.no_such_name  # noqa: B018


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_non_finite_step_is_skipped_in_both_guard_modes(tmp_path, monkeypatch, implementation):
    """Fused optimizers skip a non-finite step on device and the host learns it a step
    later (no per-step sync); others decide on the host at once. Either way the NaN step
    changes no weight and no moment, later steps train, and a stop names the last good step."""
    from torchtitan.components.fault_tolerance import NonFiniteError

    monkeypatch.setenv("TORCHTITAN_FAULT_INJECT", "nan:0:2")
    common = ("--optimizer.implementation", implementation, "--metrics.log_freq", "100",
              "--training.steps", "3", "--training.local_batch_size", "2", "--training.seed", "3")
    trainer = Trainer(_config(tmp_path / "skip", *common))
    try:
        assert trainer.step_guard.lagged is (implementation == "fused")
        snapshots, moments = [], []
        original = trainer.train_step

        def recording_step(it):
            out = original(it)
            snapshots.append({k: v.detach().clone() for k, v in trainer.model_parts[0].named_parameters()})
            moments.append({
                (o, i, k): v.clone()
                for o, opt in enumerate(trainer.optimizers)
                for i, state in enumerate(opt.state.values())
                for k, v in state.items() if torch.is_tensor(v)
            })  # exp_avg, exp_avg_sq and step of every parameter
            return out

        trainer.train_step = recording_step
        losses = trainer.train()
        assert trainer.step_guard.total_skips == 1 and trainer.step == 3
        assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])  # step 2: nothing
        assert moments[0] and moments[0].keys() == moments[1].keys()
        assert all(torch.equal(moments[0][k], moments[1][k]) for k in moments[0]), [
            k for k in moments[0] if not torch.equal(moments[0][k], moments[1][k])
        ][:5]
        assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[0])  # step 3 trains
        assert all(torch.isfinite(v).all() for v in snapshots[2].values()) and losses
    finally:
        trainer.close()

    stop = Trainer(_config(tmp_path / "stop", *common, "--fault_tolerance.non_finite_policy", "stop"))
    try:
        with pytest.raises(NonFiniteError, match="at step 2"):
            stop.train()
        assert stop.step_guard.last_good_step == 1 and stop.step == 1
    finally:
        stop.close(clean=False)


def _params_after(tmp_path, *overrides) -> dict[str, torch.Tensor]:
    trainer = Trainer(_config(tmp_path, "--training.steps", "2", "--lr_scheduler.warmup_steps", "1", *overrides))
    try:
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model_parts[0].named_parameters()}
    finally:
        trainer.close()


def test_clipping_folded_into_the_fused_optimizer_equals_scaling_the_gradients(tmp_path):
    """With a fused optimizer the clip coefficient reaches the kernel as ``grad_scale``
    instead of a pass over the gradients; the weights must be those of scaling the gradients
    first (the foreach optimizer's path). A norm this small makes Adam's eps matter, so a
    coefficient dropped on either path changes the weights (checked against no clipping)."""
    tiny = ("--training.max_norm", "1e-5")
    fused = _params_after(tmp_path / "a", *tiny, "--optimizer.implementation", "fused")
    scaled = _params_after(tmp_path / "b", *tiny, "--optimizer.implementation", "foreach")
    unclipped = _params_after(tmp_path / "c", "--training.max_norm", "0", "--optimizer.implementation", "fused")
    assert fused.keys() == scaled.keys() and len(fused) > 0
    for name in fused:
        torch.testing.assert_close(fused[name], scaled[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max((fused[k] - unclipped[k]).abs().max().item() for k in fused) > 1e-4
