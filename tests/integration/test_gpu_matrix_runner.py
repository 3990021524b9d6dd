"""The 3D/4D integration matrix runner (issue #13; scripts/run_gpu_matrix.py,
torchtitan.benchmarking.gpu_matrix).

--list for 8 ranks names every layout of the issue with its degrees, and runs nothing; a real
2-rank CPU comparison (FSDP 2 baseline and TP 2, both from one seed checkpoint) passes; the
same layout with a different learning rate is reported as a loss mismatch with exit code 1,
so the check can fail. The runner is called in-process (it launches torchrun itself).
"""

from __future__ import annotations

import json
import re

import pytest

from torchtitan.benchmarking import gpu_matrix_cli as rgm

P = "--parallelism."
# The issue's matrix: layout name -> (replicate, shard, tp, pp, cp, schedule or None, options).
ISSUE = {
    "fsdp8": (1, 8, 1, 1, 1, None, []),
    "hsdp_rep2_shard4": (2, 4, 1, 1, 1, None, []),
    "fsdp4_tp2": (1, 4, 2, 1, 1, None, []),
    "fsdp2_tp2_pp2_1f1b": (1, 2, 2, 2, 1, "1F1B", []),
    "fsdp2_tp2_pp2_interleaved1f1b": (1, 2, 2, 2, 1, "Interleaved1F1B", []),
    "fsdp2_tp2_pp2_zbv": (1, 2, 2, 2, 1, "ZBVZeroBubble", []),
    "fsdp2_cp2_tp2": (1, 2, 2, 1, 2, None, []),
    "cp2_tp2_pp2_1f1b": (1, 1, 2, 2, 2, "1F1B", []),
    "fsdp4_tp2_compile_async_tp": (1, 4, 2, 1, 1, None, ["--compile.enable", f"{P}enable_async_tensor_parallel"]),
    "fsdp8_float8": (1, 8, 1, 1, 1, None, ["--model.converters float8"]),
    "fsdp4_tp2_float8_compile_async_tp": (
        1, 4, 2, 1, 1, None,
        ["--compile.enable", "--model.converters float8", f"{P}enable_async_tensor_parallel"],
    ),
    "resume_fsdp8_as_fsdp4_tp2": (1, 4, 2, 1, 1, None, ["--checkpoint.no-initial_load_model_weights_only"]),
    "resume_fsdp8_as_fsdp2_tp2_pp2": (1, 2, 2, 2, 1, "1F1B", ["--checkpoint.no-initial_load_model_weights_only"]),
}


def test_list_names_every_layout_of_the_issue_with_its_degrees(capsys):
    assert rgm.main(["--list"]) == 0  # 8 ranks, GPU mode: nothing runs
    out = capsys.readouterr().out
    commands = {}
    lines = out.splitlines()
    for header, command in zip(lines, lines[1:]):
        m = re.match(r"# (\S+): ", header)
        if m and not command.startswith("#"):
            commands[m.group(1)] = command
    assert "--checkpoint.create_seed_checkpoint" in out
    for name, (rep, shard, tp, pp, cp, schedule, options) in ISSUE.items():
        cmd = commands[name]
        assert cmd.startswith("NGPU=8 ") and "./run_train.sh" in cmd, cmd
        for key, value in [("data_parallel_replicate_degree", rep), ("data_parallel_shard_degree", shard),
                           ("tensor_parallel_degree", tp), ("pipeline_parallel_degree", pp),
                           ("context_parallel_degree", cp)]:
            assert f"{P}{key} {value} " in cmd, (name, key, cmd)
        if schedule:
            assert f"{P}pipeline_parallel_schedule {schedule} " in cmd, name
        for option in options:
            assert option in cmd, (name, option)
        if name.startswith("resume_"):
            assert re.search(r"--checkpoint\.initial_load_path \S+/fsdp8/checkpoint/step-3 ", cmd), cmd
        else:
            assert re.search(r"--checkpoint\.initial_load_path \S+/seed/checkpoint/step-0 ", cmd), cmd
    # every layout shares the global batch and the layout-independent data order
    for cmd in commands.values():
        assert "--training.global_batch_size 8 --training.dataset_shards 8 " in cmd
        assert "--training.deterministic" in cmd


def test_list_marks_gpu_only_and_skipped_rows(capsys):
    assert rgm.main(["--list", "--world_size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"# fsdp2_tp2_compile_async_tp: .*\n#   gpu only: ", out)
    assert re.search(r"# fsdp8: FSDP 8 .*\n#   skipped: needs 8 ranks", out)
    assert re.search(r"# hsdp_rep2_shard2: HSDP 2x2 .*\nNGPU=4 ", out)
    assert rgm.main(["--list", "--world_size", "3"]) == 2
    assert rgm.main(["--list", "--only", "fsdp4_tp3"]) == 2


@pytest.mark.slow
def test_two_rank_cpu_run_passes_and_a_changed_lr_is_a_mismatch(tmp_path):
    common = ["--world_size", "2", "--device", "cpu", "--steps", "2", "--seq_len", "32", "--timeout", "300"]
    first = tmp_path / "ok.md"
    code = rgm.main([*common, "--only", "tp2", "--dump_root", str(tmp_path / "ok"), "--output", str(first)])
    report = json.loads(first.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in report["layouts"]}
    assert code == 0, first.read_text()
    assert set(rows) == {"fsdp2", "tp2"}
    assert rows["fsdp2"]["status"] == "baseline" and rows["tp2"]["status"] == "passed"
    assert rows["tp2"]["compared_steps"] == [1, 2]
    assert rows["tp2"]["max_rel_diff"] < 1e-5
    assert "| `tp2`: TP 2 | 2 | passed |" in first.read_text()

    # The same comparison with tp2's learning rate changed: the seed checkpoint and the
    # baseline are reused, only tp2 runs again, and it must fail on the loss.
    second = tmp_path / "bad.md"
    code = rgm.main([*common, "--only", "tp2", "--dump_root", str(tmp_path / "bad"), "--output", str(second),
                     "--reuse", str(first.with_suffix(".json")), "--extra_for", "tp2=--optimizer.lr 2e-3"])
    rows = {r["name"]: r for r in json.loads(second.with_suffix(".json").read_text())["layouts"]}
    assert code == 1, second.read_text()
    assert rows["fsdp2"]["reused"] and rows["fsdp2"]["status"] == "baseline"
    assert rows["tp2"]["status"].startswith("loss mismatch: steps [2]"), rows["tp2"]["status"]
    assert rows["tp2"]["worst_step"] == 2 and rows["tp2"]["max_rel_diff"] > 1e-3  # step 1 precedes any update
