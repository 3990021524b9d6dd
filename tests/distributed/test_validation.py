"""Validation (components/validate.py) in the real trainer: every layout agrees with one
process, and one process agrees with a hand computation.

One launch of 2 CPU ranks builds six Trainers in turn: FSDP 2, TP 2 (loss parallel), CP 2
(head-tail load balancing, the same cp_context as training), PP 2 with 1F1B (forward only
through schedule.eval) and with ZBVZeroBubble (2 stages per rank in a V; the validator runs
the stages forward with point-to-point sends), and EP 2 (Qwen3 MoE debug flavor, against its
own one-process run). All seven schedules were checked by hand to give the same losses. Each validates once before training (no gradient may appear, the
model must be back in training mode), then trains 2 steps validating after each. The
training data and the held-out data use fixed shards (training.dataset_shards), so every
layout sees the same global batches; fp32; the same tolerance as the training-loss layout
test (1e-5 relative).

In the pytest process, one process: the same, plus the loss computed by hand (model in
eval mode, cross-entropy over the same held-out batches, built by a separate loader), a
second validation equal to the first (the held-out data restarts), and steps = -1 running
a small file to its end.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
import torch

from harness import launch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2
VAL_STEPS = 2
TOL = 1e-5

LAYOUTS = {
    "fsdp2": (2, ["--training.local_batch_size", "2"]),
    "tp2_loss_parallel": (4, ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]),
    "cp2_load_balanced": (4, ["--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]),
    "pp2_1f1b": (4, ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
                     "--parallelism.pipeline_parallel_schedule", "1F1B"]),
    # V-shaped, 2 stages per rank: its eval() keeps backward actions, so the validator runs
    # the stages forward itself (validate.pipeline_forward)
    "pp2_zbv_stages_forward": (4, ["--parallelism.pipeline_parallel_degree", "2",
                                   "--parallelism.data_parallel_shard_degree", "1",
                                   "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"]),
}
# Expert parallelism: the Qwen3 MoE debug flavor, routed experts sharded over the 2 FSDP ranks.
MOE = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe", "--activation_checkpoint.mode", "none"]
EP_LAYOUT = {"ep2_fsdp2": (2, [*MOE, "--training.local_batch_size", "2", "--parallelism.expert_parallel_degree", "2"])}


def _config(dump_folder: str, val_local_batch: int, *overrides: str):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(
        [
            "--job.config_file", os.path.join(REPO, "train_configs", "debug_model.toml"),
            "--job.dump_folder", dump_folder,
            "--job.no-print_config",
            "--model.tokenizer_path", os.path.join(REPO, "tests", "assets", "test_tiktoken.model"),
            "--training.steps", str(STEPS),
            "--training.seq_len", "64",
            "--training.local_batch_size", "4",
            "--training.global_batch_size", "4",
            "--training.dataset_shards", "2",
            "--training.mixed_precision_param", "float32",
            "--training.seed", "3",
            "--optimizer.eps", "1e-6",
            "--lr_scheduler.warmup_steps", "2",
            "--metrics.log_freq", "1",
            "--comm.trace_buf_size", "0",
            "--validation.enable",
            "--validation.dataset", "c4_test",
            "--validation.freq", "1",
            "--validation.steps", str(VAL_STEPS),
            "--validation.seq_len", "64",
            "--validation.local_batch_size", str(val_local_batch),
            *overrides,
        ]
    )


def _run(trainer) -> dict[str, Any]:
    """Validate before training (checks: no grads, training mode), then train validating
    after every step."""
    params = [p for part in trainer.model_parts for p in part.parameters()]
    first = trainer.validator.validate(0)
    report = {
        "before": first,
        "training_mode_after": all(m.training for part in trainer.model_parts for m in part.modules()),
        "no_grads": all(p.grad is None for p in params),
        # FSDP resharded: the registered parameters are the optimizer's (sharded) ones again
        "params_resharded": {id(p) for part in trainer.model_parts for p in part.parameters()}
        == {id(p) for p in trainer.params},
    }
    seen: list[float] = []
    validate = trainer.validator.validate
    trainer.validator.validate = lambda step: seen.append(validate(step)) or seen[-1]
    report["train_losses"] = trainer.train()
    report["during"] = seen
    report["training_mode_end"] = all(part.training for part in trainer.model_parts)
    return report


def layouts_main(workdir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from torchtitan.trainer import Trainer

    reports = {}
    for name, (val_batch, args) in {**LAYOUTS, **EP_LAYOUT}.items():
        train_batch = ["--training.local_batch_size", "2"] if name == "fsdp2" else []
        trainer = Trainer(_config(os.path.join(workdir, name), val_batch, *args, *train_batch))
        reports[name] = _run(trainer)
        trainer.checkpointer.close()
        trainer.metrics.close()
        dist.barrier()
    return reports


# ---------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Any]:
    from torchtitan.components.data import build_dataloader
    from torchtitan.trainer import Trainer

    trainer = Trainer(_config(str(tmp_path_factory.mktemp("val_single")), 4))
    try:
        # By hand, before training: eval mode, cross-entropy over the same held-out batches.
        model = trainer.model_parts[0]
        loader = build_dataloader(
            dataset="c4_test", dataset_path=None, tokenizer=trainer.tokenizer, seq_len=64, local_batch_size=4,
            global_batch_size=4, dp_rank=0, dp_world_size=1, num_shards=2, infinite=False,
        )
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i, (x, y) in enumerate(loader):
                if i == VAL_STEPS:
                    break
                logits = model(x)
                total += torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), y.flatten(0, 1), reduction="sum"
                ).item()
                count += y.numel()
        model.train()
        report = _run(trainer)
        report["by_hand"] = total / count
        return report
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def single_moe(tmp_path_factory) -> dict[str, Any]:
    from torchtitan.trainer import Trainer

    trainer = Trainer(_config(str(tmp_path_factory.mktemp("val_single_moe")), 4, *MOE))
    try:
        return _run(trainer)
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Any]:
    return launch("test_validation:layouts_main", 2, timeout=600, workdir=str(tmp_path_factory.mktemp("val_layouts")))[0]


def test_one_process_equals_hand_computation(single):
    assert single["before"] == pytest.approx(single["by_hand"], rel=1e-6), single
    assert single["training_mode_after"] and single["no_grads"] and single["training_mode_end"], single
    assert len(single["during"]) == STEPS and all(math.isfinite(v) for v in single["during"]), single
    # training moved the model: the held-out loss changed
    assert single["during"][-1] != single["before"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_validation_equals_one_process(single, layouts, name):
    r = layouts[name]
    assert r["training_mode_after"] and r["no_grads"] and r["training_mode_end"], (name, r)
    assert r["params_resharded"], name
    assert r["train_losses"] == pytest.approx(single["train_losses"], rel=TOL), (name, r, single)
    assert r["before"] == pytest.approx(single["before"], rel=TOL), (name, r["before"], single["before"])
    assert r["during"] == pytest.approx(single["during"], rel=TOL), (name, r["during"], single["during"])


def test_expert_parallel_validation_equals_one_process(single_moe, layouts):
    r = layouts["ep2_fsdp2"]
    assert r["training_mode_after"] and r["no_grads"] and r["training_mode_end"] and r["params_resharded"], r
    assert r["before"] == pytest.approx(single_moe["before"], rel=TOL), (r["before"], single_moe["before"])
    assert r["during"] == pytest.approx(single_moe["during"], rel=TOL), (r["during"], single_moe["during"])


def test_whole_set_and_restart(tmp_path):
    """steps = -1 runs a small file to its end (every batch), and a second validation sees
    the same batches again (same loss); metrics reach the JSONL file."""
    from torchtitan.trainer import Trainer

    data = tmp_path / "heldout.jsonl"
    words = "the quick brown fox jumps over the lazy dog and keeps running far away".split()
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n")
    trainer = Trainer(
        _config(
            str(tmp_path / "run"), 2, "--validation.dataset", "json", "--validation.dataset_path", str(data),
            "--validation.steps", "-1", "--metrics.enable_jsonl", "--training.steps", "1",
        )
    )
    try:
        first = trainer.validator.validate(0)
        batches = trainer.validator.last["batches"]
        assert trainer.validator.validate(0) == first
        # the whole file: as many batches as a separate finite loader gives
        from torchtitan.components.data import build_dataloader

        loader = build_dataloader(
            dataset="json", dataset_path=str(data), tokenizer=trainer.tokenizer, seq_len=64, local_batch_size=2,
            global_batch_size=2, dp_rank=0, dp_world_size=1, num_shards=2, infinite=False,
        )
        assert batches == sum(1 for _ in loader) > 1
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in open(tmp_path / "run" / "jsonl" / "rank_0.jsonl")] if (
        tmp_path / "run" / "jsonl"
    ).exists() else []
    if not records:  # folder name from metrics.save_jsonl_folder
        folder = next(p for p in (tmp_path / "run").iterdir() if (p / "rank_0.jsonl").exists())
        records = [json.loads(line) for line in open(folder / "rank_0.jsonl")]
    val = [r for r in records if "validation_metrics/loss" in r]
    assert val and val[-1]["validation_metrics/perplexity"] == pytest.approx(math.exp(val[-1]["validation_metrics/loss"]))


def test_validation_options_are_checked(tmp_path):
    from torchtitan.config import ConfigError, ConfigManager

    # TorchTitan v0.2's spelling, in a file: [validation] and the Hugging Face checkpoint keys
    toml = tmp_path / "tt.toml"
    toml.write_text(
        "[validation]\nenable = true\ndataset = \"c4_validation\"\nfreq = 5\nsteps = 10\n"
        "local_batch_size = 4\nseq_len = 512\n"
        "[checkpoint]\nenable = true\nlast_save_model_only = true\nlast_save_in_hf = true\n"
        "initial_load_in_hf = false\nexport_dtype = \"bfloat16\"\n"
    )
    cfg = ConfigManager().parse_args(["--job.config_file", str(toml)])
    v, c = cfg.validation, cfg.checkpoint
    assert (v.enable, v.dataset, v.freq, v.steps, v.local_batch_size, v.seq_len) == (True, "c4_validation", 5, 10, 4, 512)
    assert c.model_weights_only and c.last_save_in_hf and not c.initial_load_in_hf

    with pytest.raises(ConfigError, match="validation.steps"):
        ConfigManager().parse_args(["--validation.steps", "0"])
    with pytest.raises(ConfigError, match="validation.freq"):
        ConfigManager().parse_args(["--validation.freq", "0"])
    cfg = ConfigManager().parse_args([])
    assert cfg.validation.dataset == "c4_validation" and cfg.validation.steps == -1 and not cfg.validation.enable
    # c4_validation is C4's validation split
    from torchtitan.components.data import datasets

    spec = datasets.get_dataset_spec("c4_validation")
    assert spec.path == "allenai/c4" and spec.loader is datasets.load_c4_validation, spec
