"""Rank-side code of the context-parallel parity test.

Each layout trains the small Llama of llama_parity.py for a few steps with the sequence split
over the ``cp`` ranks (inputs, labels and rotary rows sharded by ``cp_context``; attention run
as ring attention), FSDP over dp_shard × cp, and is compared on rank 0 with one process that
sees the whole global batch (per-step loss and gradient norm, first-step gradients, final
parameters; the project's loss against a hand-written one). Also checks, on the live mesh, that the CP context leaves each
rank exactly the tokens ``shard_sequence`` predicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from llama_parity import (
    ARGS,
    EPS,
    GLOBAL_BATCH,
    LR,
    MAX_NORM,
    batches,
    compare,
    device,
    full_grads,
    full_params,
    initial_state,
    load_full_state,
    loss_fn,
    train_reference,
)

from harness import layout_scope
from torchtitan.components.chunked_loss import labels_for_loss
from torchtitan.config import JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.context_parallel import (
    cp_context,
    shard_sequence,
    unshard_sequence,
)
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.parallelize import parallelize_llama


@dataclasses.dataclass
class CPLayout:
    name: str
    cp: int
    dp_shard: int = 1
    dp_replicate: int = 1
    rotate: str = "allgather"
    load_balance: bool = True
    loss_chunk_size: int = 0
    tp: int = 1
    ac_mode: str = "none"
    ac_option: str = "op"


def _build(layout: CPLayout, state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, ParallelDims]:
    pd = ParallelDims(
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        cp=layout.cp,
        tp=layout.tp,
        pp=1,
        world_size=dist.get_world_size(),
    )
    pd.build_mesh(device().type)
    jc = JobConfig()
    jc.parallelism.tensor_parallel_degree = layout.tp
    jc.activation_checkpoint.mode = layout.ac_mode
    jc.activation_checkpoint.selective_ac_option = layout.ac_option
    jc.parallelism.context_parallel_degree = layout.cp
    jc.training.mixed_precision_param = "float32"
    jc.training.loss_chunk_size = layout.loss_chunk_size
    with torch.device("meta"):
        model = Transformer(ARGS)
    model = parallelize_llama(model, pd, jc)
    model.to_empty(device=device())
    with torch.no_grad():
        model.init_weights()
    load_full_state(model, state)
    return model, pd


def train_cp(layout: CPLayout, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    model, pd = _build(layout, state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    train_context = dist_utils.get_train_context(pd.loss_parallel_enabled, False)
    cp_mesh = pd.get_mesh("cp")
    dp_rank, dp_size = pd.dp_rank_and_size(pd.world_mesh)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    losses, norms, grads = [], [], None
    for inputs, labels in batches():
        inputs, labels = inputs[rows].clone(), labels[rows].clone()
        opt.zero_grad()
        ctx = cp_context(cp_mesh, model, inputs, labels, layout.rotate, layout.load_balance)
        with train_context(ctx):
            if layout.loss_chunk_size > 0:
                with labels_for_loss(model, labels):
                    loss = model(inputs)
            else:
                loss = loss_fn(model(inputs), labels)
            loss.backward()
        grads = full_grads(model) if grads is None else grads
        norms.append(dist_utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True).item())
        opt.step()
        loss = loss.detach()
        loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        losses.append(dist_utils.dist_mean(loss, pd.get_mesh("dp_cp")))
    # The rotary table is whole again after the context.
    table_restored = tuple(model.freqs_cis.shape) == (ARGS.max_seq_len, ARGS.head_dim // 2)
    return {
        "losses": losses,
        "norms": norms,
        "params": full_params(model),
        "grads": grads,
        "backward_ops": None,
        "logits_dtype": "float32",
        "dynamo_graphs": 0,
        "table_restored": table_restored,
    }


def shard_check(cp: int, load_balance: bool) -> dict[str, Any]:
    """What the CP context leaves on this rank vs shard_sequence, and the round trip."""
    world = dist.get_world_size()
    pd = ParallelDims(dp_replicate=1, dp_shard=world // cp, cp=cp, tp=1, pp=1, world_size=world)
    pd.build_mesh(device().type)
    cp_mesh = pd.get_mesh("cp")
    rank = cp_mesh.get_local_rank()
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.to_empty(device=device())
    model.init_weights()
    full_table = model.freqs_cis.clone()
    tokens = torch.arange(2 * ARGS.max_seq_len).view(2, -1)
    inputs, labels = tokens.clone(), tokens.clone() + 1000
    with cp_context(cp_mesh, model, inputs, labels, "allgather", load_balance):
        seen_table = model.freqs_cis.clone()
    expected = shard_sequence(tokens, 1, rank, cp, load_balance)
    gathered = [torch.empty_like(inputs) for _ in range(cp)]
    dist.all_gather(gathered, inputs.contiguous(), group=cp_mesh.get_group())
    return {
        "inputs_ok": torch.equal(inputs, expected),
        "labels_ok": torch.equal(labels, expected + 1000),
        "table_ok": torch.equal(seen_table, shard_sequence(full_table, 0, rank, cp, load_balance)),
        "unshard_ok": torch.equal(unshard_sequence(gathered, 1, load_balance), tokens),
    }


def main(layouts: list[dict[str, Any]], shard_checks: list[tuple[int, bool]] = ()) -> dict[str, Any]:
    state = initial_state()
    rank = dist.get_rank()
    reference = train_reference(state, "float32") if rank == 0 else None
    report: dict[str, Any] = {"layouts": {}, "shards": {}}
    for spec in layouts:
        layout = CPLayout(**spec)
        with layout_scope(layout.name):
            result = train_cp(layout, state)
            if rank == 0:
                report["layouts"][layout.name] = compare(result, reference)
                report["layouts"][layout.name]["table_restored"] = result["table_restored"]
            dist.barrier()
    with layout_scope("shard_checks"):
        for cp, lb in shard_checks:
            report["shards"][f"cp{cp}_lb{lb}"] = shard_check(cp, lb)
    return report
