"""Rank-side code of the parity tests: train a small Llama 3 under a layout and compare it
with one process that sees the same global batch.

Every rank builds the same initial weights (same seed, no communication), trains the
parallelized model for a few AdamW steps with gradient clipping (each data-parallel rank
on its slice of the global batch), and gathers the final parameters with ``full_tensor()``.
Rank 0 also trains the unsharded reference and reports relative errors; the pytest side
decides pass/fail, so a failure prints the numbers.

The parallel side uses the project's loss (``torchtitan.components.loss``); the reference
writes cross-entropy out by hand, so a wrong project loss is a mismatch here rather than the
same mistake on both sides. Besides the per-step loss and gradient norm and the final
parameters, every parameter's gradient after the first backward is compared: a fault that
leaves the loss and norm inside tolerance (a norm weight reduced over too few ranks) shows
there at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from harness import layout_scope
from torchtitan.components.loss import cross_entropy_loss as loss_fn  # the code under test
from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.models.llama3 import Transformer, llama3_configs
from torchtitan.models.llama3.parallelize import parallelize_llama

STEPS = 5
GLOBAL_BATCH = 8
SEQ_LEN = 32
LR = 2e-3
EPS = 1e-6  # see test_llama_parity.py: keeps Adam from amplifying fp32 noise in ~0 gradients
MAX_NORM = 0.5  # small enough that clipping is active on every step of this model

# The debug flavor, shrunk: 4 layers, dim 64, 4 query / 2 key-value heads, vocab 256.
ARGS = dataclasses.replace(
    copy.deepcopy(llama3_configs["debugmodel"]),
    dim=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    multiple_of=16,
    max_seq_len=SEQ_LEN,
)


def device() -> torch.device:
    """CPU when the harness hides GPUs (the default); else this rank's GPU (the gpu tests)."""
    if dist_utils.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclasses.dataclass
class Layout:
    name: str
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    loss_parallel: bool = True
    ac_mode: str = "none"
    ac_option: str = "2"
    op_saved_matmuls: str = "every_other"
    mixed_precision: str = "float32"
    compile_backend: str | None = None
    n_kv_heads: int | None = None  # override, to provoke the tp / kv-heads check
    async_tp: bool = False


# ---- shared pieces -------------------------------------------------------------------
def initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights()
    return {k: v.detach().clone().to(device()) for k, v in model.state_dict().items()}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, ARGS.vocab_size, (STEPS, GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
    tokens = tokens.to(device())
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def reference_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy written out: fp32 log-softmax, the label's entry, mean over
    the tokens whose label is not -100. Independent of the project's loss on purpose."""
    logp = torch.log_softmax(pred.flatten(0, 1).float(), dim=-1)
    y = labels.flatten()
    valid = y != -100
    picked = logp.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum() / valid.sum()


def clean_name(name: str) -> str:
    """Parameter name without the wrappers' segments (AC, compile, DDP)."""
    for seg in ("_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(seg, "")
    return name


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters; every rank holds ``state``."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = state[clean_name(name)]
            if isinstance(param, DTensor):
                shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(full)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        clean_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (gathered from DTensors: a collective, all ranks call)."""
    return {
        clean_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().float().cpu().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def fsdp_reduce_dtypes(model: nn.Module) -> list[str]:
    """The gradient reduce dtype of every FSDP unit's mixed-precision policy. On 2 ranks a
    bf16 reduce-scatter adds one rounding of a two-term sum, invisible to bf16 parity bounds;
    the policy itself is what can be checked."""
    from torch.distributed.fsdp import FSDPModule

    return sorted(
        {str(m._get_fsdp_state()._mp_policy.reduce_dtype) for m in model.modules() if isinstance(m, FSDPModule)}
    )


class _CountOps(TorchDispatchMode):
    """Counts aten ops by name (used to see what backward recomputes)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _job_config(layout: Layout) -> JobConfig:
    jc = JobConfig()
    jc.parallelism.data_parallel_replicate_degree = layout.dp_replicate
    jc.parallelism.data_parallel_shard_degree = layout.dp_shard
    jc.parallelism.tensor_parallel_degree = layout.tp
    jc.parallelism.disable_loss_parallel = not layout.loss_parallel
    jc.parallelism.enable_async_tensor_parallel = layout.async_tp
    jc.activation_checkpoint.mode = layout.ac_mode
    jc.activation_checkpoint.selective_ac_option = layout.ac_option
    jc.activation_checkpoint.op_saved_matmuls = layout.op_saved_matmuls
    jc.training.mixed_precision_param = layout.mixed_precision
    jc.training.mixed_precision_reduce = "float32"
    jc.compile.enable = layout.compile_backend is not None
    jc.compile.components = ["model"]
    jc.compile.backend = layout.compile_backend or "inductor"
    return jc


# ---- training ------------------------------------------------------------------------
def train_reference(state: dict[str, torch.Tensor], mixed_precision: str) -> dict[str, Any]:
    """One process, the whole global batch, torch's own clip_grad_norm_."""
    with device():
        model = Transformer(ARGS)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    amp = (
        torch.autocast(device().type, dtype=torch.bfloat16)
        if mixed_precision == "bfloat16"
        else contextlib.nullcontext()
    )
    losses, norms, grads = [], [], None
    for inputs, labels in batches():
        opt.zero_grad()
        with amp:
            loss = reference_loss(model(inputs), labels)
        loss.backward()
        grads = full_grads(model) if grads is None else grads
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": full_params(model), "grads": grads}


def build_parallel(layout: Layout, state: dict[str, torch.Tensor]) -> tuple[nn.Module, ParallelDims]:
    pd = ParallelDims(
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        cp=1,
        tp=layout.tp,
        pp=1,
        world_size=dist.get_world_size(),
        enable_loss_parallel=layout.loss_parallel,
    )
    pd.build_mesh(device().type)
    args = ARGS if layout.n_kv_heads is None else dataclasses.replace(ARGS, n_kv_heads=layout.n_kv_heads)
    with torch.device("meta"):
        model = Transformer(args)
    model = parallelize_llama(model, pd, _job_config(layout))
    model.to_empty(device=device())
    with torch.no_grad():
        model.init_weights()
    load_full_state(model, state)
    return model, pd


def train_parallel(layout: Layout, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if layout.compile_backend == "inductor" and device().type == "cpu":
        # Scalar C++ kernels: the same graphs and partitioning, whose compile alone takes
        # the vectorised ones' g++ time (60 s -> 38 s cold, 2 cores); SIMD numerics are
        # inductor's, not the composition's under test.
        import torch._inductor.config as inductor_config

        inductor_config.cpp.vec_isa_ok = False
    model, pd = build_parallel(layout, state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    train_context = dist_utils.get_train_context(pd.loss_parallel_enabled, False)
    amp = dist_utils.maybe_enable_amp(pd.fsdp_enabled, layout.mixed_precision, device().type)
    dp_rank, dp_size = pd.dp_rank_and_size(pd.world_mesh)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    losses, norms, backward_ops, grads = [], [], None, None
    logits_dtype = None
    for step, (inputs, labels) in enumerate(batches()):
        opt.zero_grad()
        with train_context():
            with amp:
                pred = model(inputs[rows])
                logits_dtype = pred.dtype
                loss = loss_fn(pred, labels[rows])
            if step == 0:
                with _CountOps() as counter:
                    loss.backward()
                backward_ops = dict(counter.counts)
            else:
                loss.backward()
        if step == 0:
            grads = full_grads(model)
        norms.append(dist_utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True).item())
        opt.step()
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        losses.append(dist_utils.dist_mean(loss.detach(), pd.get_mesh("dp_cp")))
    return {
        "losses": losses,
        "norms": norms,
        "params": full_params(model),
        "grads": grads,
        "fsdp_reduce_dtypes": fsdp_reduce_dtypes(model),
        "backward_ops": backward_ops,
        "logits_dtype": str(logits_dtype),
        "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def grad_rel_err(result: dict[str, Any], reference: dict[str, Any]) -> float:
    """Worst norm-wise relative error of the first step's per-parameter gradients (inf when a
    parameter's gradient is missing on one side)."""
    mine, ref = result["grads"], reference["grads"]
    if set(mine) != set(ref):
        return math.inf
    return max(_rel(mine[k], ref[k]) for k in ref)


def compare(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Worst relative errors: per-step loss, per-step grad norm, first-step gradients and
    final parameters (norm-wise per tensor)."""
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
    norm_err = max(abs(a - b) / abs(b) for a, b in zip(result["norms"], reference["norms"]))
    missing = set(reference["params"]) ^ set(result["params"])
    common = set(reference["params"]) & set(result["params"])
    param_err = max((_rel(result["params"][k], reference["params"][k]) for k in common), default=math.inf)
    return {
        "loss_rel_err": loss_err,
        "grad_norm_rel_err": norm_err,
        "param_rel_err": param_err,
        "grad_rel_err": grad_rel_err(result, reference),
        "param_names_differ": sorted(missing),
        "losses": result["losses"],
        "ref_losses": reference["losses"],
        "backward_ops": result["backward_ops"],
        "logits_dtype": result["logits_dtype"],
        "dynamo_graphs": result["dynamo_graphs"],
        "fsdp_reduce_dtypes": result.get("fsdp_reduce_dtypes", []),
    }


def run_layouts(layouts: list[dict[str, Any]]) -> dict[str, Any]:
    """Entry point of a launch: every layout on every rank; rank 0 returns the comparisons."""
    state = initial_state()
    rank = dist.get_rank()
    references: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for spec in layouts:
        layout = Layout(**spec)
        started = time.perf_counter()
        with layout_scope(layout.name):
            try:
                result = train_parallel(layout, state)
            except ConfigError as e:  # a rejected layout is a result, on every rank
                report[layout.name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            if rank == 0:
                mp = layout.mixed_precision
                if mp not in references:
                    references[mp] = train_reference(state, mp)
                report[layout.name] = compare(result, references[mp])
                if mp != "float32":
                    if "float32" not in references:
                        references["float32"] = train_reference(state, "float32")
                    vs_fp32 = compare(result, references["float32"])
                    report[layout.name]["vs_fp32"] = {
                        k: vs_fp32[k] for k in ("loss_rel_err", "param_rel_err", "grad_norm_rel_err")
                    }
                report[layout.name]["seconds"] = round(time.perf_counter() - started, 2)  # watches suite time
            dist.barrier()
    return report


def run_clip_check(dp_shard: int, tp: int) -> dict[str, Any]:
    """Our clip_grad_norm_ on a sharded model vs torch's on the gathered (unsharded) grads.

    Returns, per norm type, our total norm and the independent one, and after clipping the
    worst relative error of the clipped grads against ``full grads * coefficient``.
    """
    state = initial_state()
    layout = Layout(name="clip", dp_shard=dp_shard, tp=tp)
    model, pd = build_parallel(layout, state)
    dp_rank, dp_size = pd.dp_rank_and_size(pd.world_mesh)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    inputs, labels = batches()[0]
    with dist_utils.get_train_context(pd.loss_parallel_enabled, False)():
        loss_fn(model(inputs[rows]), labels[rows]).backward()
    params = list(model.parameters())
    full_grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone() for p in params]
    placements = sorted({str(p.placements) for p in params if isinstance(p, DTensor)})
    out: dict[str, Any] = {"placements": placements}
    for norm_type in (2.0, 1.0, float("inf")):
        ours = dist_utils.clip_grad_norm_(params, max_norm=1e9, norm_type=norm_type).item()
        expected = torch.nn.utils.get_total_norm([g.clone() for g in full_grads], norm_type).item()
        out[str(norm_type)] = (ours, expected)
    total = torch.nn.utils.get_total_norm([g.clone() for g in full_grads], 2.0)
    max_norm = total.item() / 3
    dist_utils.clip_grad_norm_(params, max_norm=max_norm, foreach=True)
    coef = max_norm / (total.item() + 1e-6)
    clipped = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
    out["clipped_rel_err"] = max(_rel(c, g * coef) for c, g in zip(clipped, full_grads))
    return out


def misc_checks() -> dict[str, Any]:
    """Logging reductions, clip_grad_norm_ across pipeline stages, shared random seed."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device().type, (world,), mesh_dim_names=("pp",))
    out: dict[str, Any] = {
        "sum": dist_utils.dist_sum(torch.tensor(rank + 1.0), mesh),
        "max": dist_utils.dist_max(float(rank + 1), mesh),
        "mean": dist_utils.dist_mean(torch.tensor([rank + 1.0]), mesh),
        "expected": (world * (world + 1) / 2, float(world), (world + 1) / 2),
    }
    # Each rank plays a pipeline stage holding different plain parameters.
    torch.manual_seed(100 + rank)
    params = [nn.Parameter(torch.randn(5, 3, device=device())), nn.Parameter(torch.randn(7, device=device()))]
    for p in params:
        p.grad = torch.randn_like(p)
    mine = torch.cat([p.grad.flatten() for p in params])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    everything = torch.cat(gathered)
    for norm_type in (2.0, float("inf")):
        ours = dist_utils.clip_grad_norm_(params, 1e9, norm_type=norm_type, pp_mesh=mesh).item()
        out[f"pp_norm_{norm_type}"] = (ours, torch.linalg.vector_norm(everything, norm_type).item())
    # Every group, flattened views included, takes the new collective timeout.
    pd = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, world_size=world)
    pd.build_mesh(device().type)
    dist_utils.set_pg_timeout(77, pd.world_mesh)
    backend = pd.get_mesh("dp_shard_cp").get_group()._get_backend(device())
    out["timeout_s"] = backend.options._timeout.total_seconds()
    seed = dist_utils.set_determinism(None, device(), seed=None)
    seeds = [None] * world
    dist.all_gather_object(seeds, seed)
    out["seeds"] = seeds
    return out


def main(
    layouts: list[dict[str, Any]], clip: dict[str, int] | None = None, misc: bool = False
) -> dict[str, Any]:
    """The entry point of one launch: everything one world size checks."""
    out: dict[str, Any] = {"layouts": run_layouts(layouts)}
    if clip is not None:
        out["clip"] = run_clip_check(**clip)
    if misc:
        out["misc"] = misc_checks()
    return out
