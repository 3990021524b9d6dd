"""Context parallelism on 4 CPU ranks (gloo) vs one process: one launch, many layouts.

CP 4, FSDP 2 × CP 2, HSDP 2 × CP 2 (CP 2 with two replicas) and CP 2 × TP 2 (FSDP over cp,
loss parallel), head-tail load balancing on and off, both rotate methods, with selective (op)
and full activation checkpointing, and FSDP 2 × CP 2 with the chunked loss: losses, gradient norms
and parameters after 5 fp32 AdamW steps, and every gradient of the first step, must match
within 1e-5 relative. The launch also
checks that the CP context leaves each rank exactly the tokens and rotary rows
``shard_sequence`` predicts, and that gathering them back restores the sequence.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check_no_crash, launch_layouts  # noqa: E402 (after the path insert)

TOL = 1e-5

LAYOUTS = [
    dict(name="cp4_lb_allgather", cp=4),
    dict(name="cp4_nolb_allgather", cp=4, load_balance=False),
    dict(name="cp4_lb_alltoall", cp=4, rotate="alltoall"),
    dict(name="fsdp2_cp2_lb_allgather", cp=2, dp_shard=2),
    dict(name="fsdp2_cp2_nolb_alltoall_sac_op", cp=2, dp_shard=2, load_balance=False, rotate="alltoall",
         ac_mode="selective", ac_option="op"),
    dict(name="hsdp2_cp2_lb_alltoall_full_ac", cp=2, dp_replicate=2, rotate="alltoall", ac_mode="full"),
    dict(name="fsdp2_cp2_lb_chunked_loss", cp=2, dp_shard=2, loss_chunk_size=12),
    dict(name="cp2_tp2_loss_parallel", cp=2, tp=2),
]
SHARD_CHECKS = [(4, True), (4, False), (2, True)]


@pytest.fixture(scope="module")
def launched() -> tuple[list[dict], dict[str, str]]:
    return launch_layouts("cp_parity:main", 4, timeout=240, layouts=LAYOUTS, shard_checks=SHARD_CHECKS)


@pytest.fixture(scope="module")
def report(launched) -> list[dict]:
    return launched[0]


@pytest.mark.parametrize("name", [spec["name"] for spec in LAYOUTS])
def test_matches_single_process(launched, name: str) -> None:
    check_no_crash(launched[1], name)
    r = launched[0][0]["layouts"][name]
    assert r["param_names_differ"] == []
    assert r["loss_rel_err"] < TOL, (r["losses"], r["ref_losses"])
    assert r["grad_norm_rel_err"] < TOL, r
    assert r["grad_rel_err"] < TOL, r
    assert r["param_rel_err"] < TOL, r
    assert r["table_restored"]


@pytest.mark.parametrize("cp,load_balance", SHARD_CHECKS)
def test_context_shards_what_shard_sequence_predicts(launched, report: list[dict], cp: int, load_balance: bool) -> None:
    check_no_crash(launched[1], "shard_checks")
    for rank, rank_report in enumerate(report):
        checks = rank_report["shards"][f"cp{cp}_lb{load_balance}"]
        assert all(checks.values()), (rank, checks)
