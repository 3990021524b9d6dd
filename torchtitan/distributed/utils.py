"""Process group, determinism, gradient clipping and small reductions shared by the trainer.

Everything here works on one process too: ``init_distributed`` always creates a process
group (a 1-rank one through an in-memory store when torchrun did not launch us), so the
mesh, DTensor and the reductions below run the same code at every scale.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from torchtitan.config import DTYPE_NAMES, ConfigError
from torchtitan.tools.logging import logger

__all__ = [
    "device_type",
    "device_module",
    "init_distributed",
    "init_single_process_group",
    "destroy_process_group",
    "abandon_process_groups",
    "set_pg_timeout",
    "set_determinism",
    "clip_grad_norm_",
    "grad_norm_and_clip_coef",
    "scale_grads_",
    "dist_max",
    "dist_mean",
    "dist_sum",
    "get_train_context",
    "maybe_enable_amp",
    "TORCH_DTYPE_MAP",
]

device_type: str = "cuda" if torch.cuda.is_available() else "cpu"
# torch.cpu mirrors the parts of torch.cuda the trainer needs (device_count, synchronize,
# current_device, set_device); memory statistics are the metrics module's business.
device_module = torch.cuda if device_type == "cuda" else torch.cpu

# The torch dtype of each dtype name an option (or a script's --dtype) accepts.
TORCH_DTYPE_MAP: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


# ---- process group ------------------------------------------------------------------
def _backend() -> str:
    # gloo next to NCCL lets CPU tensors be reduced too (DCP async save, object broadcasts).
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


def init_single_process_group(dev_type: str = device_type, timeout_seconds: int = 300) -> None:
    """A 1-rank process group on an in-memory store: no port, no environment needed."""
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if dev_type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=timeout_seconds),
    )


def init_distributed(
    init_timeout_seconds: int,
    trace_buf_size: int,
    dump_folder: str,
    traces_folder: str = "comm_traces",
    traces_prefix: str = "rank_",
) -> int:
    """Create the default process group from torchrun's environment; return the world size.

    With ``trace_buf_size > 0`` the Flight Recorder dumps to
    ``<dump_folder>/<traces_folder>/<traces_prefix><rank>`` (comm.save_traces_folder /
    save_traces_file_prefix).

    NCCL on CUDA (the device taken from LOCAL_RANK), gloo on CPU. Without torchrun (no
    WORLD_SIZE/MASTER_ADDR) a 1-rank group is created in memory, so single-process runs use
    the same mesh and DTensor code paths. Calling it again is a no-op.
    """
    if dist.is_initialized():
        return dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if trace_buf_size > 0:
        # Flight recorder: keep the last N collectives per rank and dump them on a timeout.
        trace_dir = os.path.join(dump_folder, traces_folder)
        os.makedirs(trace_dir, exist_ok=True)
        # TORCH_FR_BUFFER_SIZE is the name since torch 2.9 (TORCH_NCCL_TRACE_BUFFER_SIZE, the
        # old one, still works but warns); it also enables the recorder on gloo.
        os.environ["TORCH_FR_BUFFER_SIZE"] = str(trace_buf_size)
        os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(trace_dir, traces_prefix)
    timeout = timedelta(seconds=init_timeout_seconds)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        init_single_process_group(device_type, init_timeout_seconds)
    else:
        store = _attempt_store(world_size, timeout)
        if store is None:
            dist.init_process_group(_backend(), timeout=timeout)
        else:
            rank = int(os.environ["RANK"])
            dist.init_process_group(_backend(), store=store, rank=rank, world_size=world_size, timeout=timeout)
    return dist.get_world_size()


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's shared store, with keys private to this restart attempt; None when the
    plain ``env://`` rendezvous is safe.

    With ``--rdzv-backend c10d`` the elastic agent hosts one TCPStore for the whole job and
    hands every attempt the same MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True).
    Keys of a killed attempt stay in it: gloo's "address of rank r" (and NCCL's unique id)
    of the previous attempt is read by a restarted rank whose peer has not yet published
    its new one, so the rank dials a dead port and init_process_group fails or hangs.
    Prefixing every key with the restart count makes a restarted job start from an empty
    namespace. The count is the same for all ranks only on one node (each node's agent
    counts its own restarts); across nodes, torchrun must give each attempt a fresh store
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as multinode_trainer.slurm sets).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # no torchrun, or rank 0 hosts a new store for each attempt
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
            logger.warning(
                "torchrun restarts across nodes with a shared rendezvous store can reuse a killed "
                "attempt's addresses and hang: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
                "torchrun (multinode_trainer.slurm does)"
            )
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"torchtitan/attempt_{attempt}", store)


def set_pg_timeout(timeout_seconds: int, world_mesh: DeviceMesh | None = None) -> None:
    """Change the collective timeout of every process group of this rank: the default one,
    the mesh dims and the flattened views (e.g. longer for the first step's compile, shorter
    afterwards). A barrier first, so no rank is inside a collective when it changes."""
    if not dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_seconds)
    dist.barrier()
    if device_type == "cuda":
        torch.cuda.synchronize()
    groups = set(dist.distributed_c10d._world.pg_map)  # every group this rank belongs to
    if world_mesh is not None:
        groups.update(world_mesh.get_group(i) for i in range(world_mesh.ndim))
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def destroy_process_group() -> None:
    """``dist.destroy_process_group()``, and forget what DTensor cached about its meshes.

    DTensor's sharding-propagation caches (the C++ dispatch fast path's and Python's) key
    on meshes by shape and dim names, not by process group: after one world is destroyed,
    a new world with an equal mesh gets cached output specs that still name the old
    world's groups ("Could not resolve the process group registered under the name N"
    when the model is materialised). One process meets that when it builds twice: a dry
    run on a fake world then a ``Trainer``, or tests."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    from torch.distributed.tensor import debug as dtensor_debug
    from torch.distributed.tensor import _redistribute

    clear = getattr(dtensor_debug, "_clear_sharding_prop_cache", None)
    if clear is not None:
        clear()
    else:  # older torch: the Python cache, and the C++ one where it exists
        DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
        fast = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
        if fast is not None:
            fast()
    getattr(_redistribute, "clear_redistribute_planner_cache", lambda: None)()


def abandon_process_groups() -> None:
    """Leave the process groups after this rank failed. ``destroy_process_group`` under NCCL
    waits for the rank's outstanding operations, e.g. a pipeline send a dead peer will never
    receive, so a rank that hit an error could hang instead of exiting (and torchrun would
    not notice the failure until a watchdog timeout). NCCL communicators are aborted instead;
    other backends have nothing in flight and are destroyed."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and "nccl" in str(dist.get_backend()):
        try:
            abort()
            return
        except Exception as e:  # fall back to the normal path
            logger.warning(f"aborting the NCCL process groups failed ({e}); destroying them")
    destroy_process_group()


def set_determinism(
    world_mesh: DeviceMesh | None,
    device: torch.device,
    seed: int | None,
    deterministic: bool = False,
    warn_only: bool = False,
) -> int:
    """Seed python and torch identically on every rank; return the seed used.

    One seed everywhere makes replicated initialisation identical across ranks; on CUDA,
    DTensor's offset-based RNG gives each shard of a sharded parameter its own slice of the
    same stream. (On CPU DTensor has no such tracker: shards of one parameter draw the same
    numbers, which is why parity tests load weights instead of relying on sharded init.)
    ``seed=None`` draws one on rank 0 and broadcasts it. ``deterministic`` also turns on
    deterministic kernels (slower); ``warn_only`` then only warns about an op without one.
    """
    if seed is None:
        seed_tensor = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            seed_tensor = seed_tensor.to(device)
            dist.broadcast(seed_tensor, src=0)
        seed = int(seed_tensor.item())
    random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass
    if deterministic:
        logger.info("deterministic algorithms on (slower)" + (", warn only" if warn_only else ""))
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # cuBLAS needs a fixed workspace to be deterministic.
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return seed


# ---- gradient norm ------------------------------------------------------------------
def _local_view(grad: torch.Tensor) -> tuple[torch.Tensor, DeviceMesh | None, tuple[int, ...]]:
    """The local shard of ``grad``, its mesh, and the mesh dims its elements are split over.

    Partial placements (pending sums) are reduced first: a norm of summands is not the norm
    of their sum. Replicate dims hold copies, so they must not be counted twice.
    """
    if not isinstance(grad, DTensor):
        return grad, None, ()
    placements = grad.placements
    if any(p.is_partial() for p in placements):
        placements = tuple(Replicate() if p.is_partial() else p for p in placements)
        grad = grad.redistribute(grad.device_mesh, placements)
    # Anything that is neither Replicate nor (reduced) Partial splits elements across the
    # dim: Shard and also _StridedShard (FSDP over TP), for which is_shard() is False.
    shard_dims = tuple(i for i, p in enumerate(placements) if not p.is_replicate())
    return grad.to_local(), grad.device_mesh, shard_dims


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """Clip gradients by their global norm, as if the whole model sat on one device: the
    norm and coefficient of :func:`grad_norm_and_clip_coef`, the gradients then scaled by it
    (:func:`scale_grads_`). Returns the total norm as a plain tensor (identical on every rank)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    total_norm, clip_coef = grad_norm_and_clip_coef(parameters, max_norm, norm_type, error_if_nonfinite, foreach, pp_mesh)
    scale_grads_(parameters, clip_coef, foreach)
    return total_norm


@torch.no_grad()
def grad_norm_and_clip_coef(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh: DeviceMesh | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients' global norm and ``min(1, max_norm / (norm + 1e-6))``, gradients untouched
    (a fused optimizer can take the coefficient as its ``grad_scale`` instead of a pass over
    the gradients: ``OptimizersContainer.step``).

    Gradients are grouped by (mesh, sharded mesh dims). Each group's local shards give a
    partial ``sum |g|^p`` (or max for p = inf) that is all-reduced over exactly the mesh
    dims the elements are split across; groups and pipeline stages (``pp_mesh``) then add
    up.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    is_inf = math.isinf(norm_type)
    if not grads:
        return torch.tensor(0.0), torch.tensor(1.0)

    groups: dict[tuple[DeviceMesh | None, tuple[int, ...]], list[torch.Tensor]] = {}
    for g in grads:
        local, mesh, shard_dims = _local_view(g)
        groups.setdefault((mesh, shard_dims), []).append(local)

    out_device = next(iter(groups.values()))[0].device
    total = torch.zeros((), dtype=torch.float32, device=out_device)
    for (mesh, shard_dims), tensors in groups.items():
        nonempty = [t for t in tensors if t.numel() > 0]
        if nonempty:
            if foreach is not False and len({t.device for t in nonempty}) == 1:
                norms = torch._foreach_norm(nonempty, norm_type)
            else:
                norms = [torch.linalg.vector_norm(t, norm_type) for t in nonempty]
            norms_t = torch.stack([n.to(torch.float32) for n in norms]).to(out_device)
            part = norms_t.max() if is_inf else norms_t.pow(norm_type).sum()
        else:
            part = torch.zeros((), dtype=torch.float32, device=out_device)
        op = dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM
        for dim in shard_dims:
            assert mesh is not None
            # FSDP CPU offload keeps gradients on the host; NCCL reduces device tensors only
            part = part.to(mesh.device_type)
            dist.all_reduce(part, op=op, group=mesh.get_group(dim))
        part = part.to(out_device)
        total = torch.maximum(total, part) if is_inf else total + part

    if pp_mesh is not None and pp_mesh.size() > 1:
        total = total.to(pp_mesh.device_type)
        dist.all_reduce(
            total, op=dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM, group=pp_mesh.get_group()
        )
        total = total.to(out_device)
    total_norm = total if is_inf else total.pow(1.0 / norm_type)

    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite; "
            "set error_if_nonfinite=False to clip anyway"
        )
    return total_norm, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def scale_grads_(parameters: Iterable[torch.Tensor], coef: torch.Tensor, foreach: bool | None = None) -> None:
    """Multiply every gradient (the local shard of a DTensor's) by the 0-dim ``coef``."""
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        by_device.setdefault((local.device, local.dtype), []).append(local)
    for (dev, _), locals_ in by_device.items():
        c = coef.to(dev)
        if foreach is not False:
            torch._foreach_mul_(locals_, c)
        else:
            for t in locals_:
                t.mul_(c)


# ---- reductions for logging ----------------------------------------------------------
def _reduce(x: torch.Tensor | float, mesh: DeviceMesh | None, op: dist.ReduceOp) -> float:
    if mesh is None or mesh.size() == 1:
        return float(x.item() if isinstance(x, torch.Tensor) else x)
    dev = mesh.device_type
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device=dev, dtype=torch.float64).reshape(())
    else:
        t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    t = t.clone()
    for dim in range(mesh.ndim):
        dist.all_reduce(t, op=op, group=mesh.get_group(dim))
    return float(t.item())


def dist_max(x: torch.Tensor | float, mesh: DeviceMesh | None) -> float:
    return _reduce(x, mesh, dist.ReduceOp.MAX)


def dist_sum(x: torch.Tensor | float, mesh: DeviceMesh | None) -> float:
    return _reduce(x, mesh, dist.ReduceOp.SUM)


def dist_mean(x: torch.Tensor | float, mesh: DeviceMesh | None) -> float:
    total = _reduce(x, mesh, dist.ReduceOp.SUM)
    return total / (mesh.size() if mesh is not None else 1)


# ---- contexts around forward/backward ------------------------------------------------
def get_train_context(
    enable_loss_parallel: bool, enable_compiled_autograd: bool
) -> Callable[..., contextlib.AbstractContextManager]:
    """A factory of the context wrapping forward + loss + backward of one microbatch.

    Loss parallel lets cross-entropy consume vocabulary-sharded logits without gathering
    them; compiled autograd traces the backward. ``cp_context`` (context parallel's buffer
    sharding) is entered too when given.
    """

    @contextlib.contextmanager
    def context(cp_context: contextlib.AbstractContextManager | None = None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if enable_loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel

                stack.enter_context(loss_parallel())
            if enable_compiled_autograd:
                stack.enter_context(torch._dynamo.utils.maybe_enable_compiled_autograd(True))
            if cp_context is not None:
                stack.enter_context(cp_context)
            yield

    return context


def maybe_enable_amp(
    fsdp_enabled: bool, mixed_precision_param: str, device_type: str
) -> contextlib.AbstractContextManager:
    """Autocast to the training dtype wherever FSDP is not already casting parameters.

    FSDP's MixedPrecisionPolicy does bf16 compute itself; every other layout (one device,
    TP only, DDP, PP without FSDP) gets torch.autocast, so no layout silently trains in
    fp32. ``fsdp_enabled`` is ``ParallelDims.fsdp_enabled`` of the run. The returned object
    can be entered once per step, repeatedly.
    """
    if mixed_precision_param not in TORCH_DTYPE_MAP:
        raise ConfigError(
            f"training.mixed_precision_param {mixed_precision_param!r} is not one of "
            f"{sorted(TORCH_DTYPE_MAP)}"
        )
    dtype = TORCH_DTYPE_MAP[mixed_precision_param]
    if fsdp_enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    logger.info(f"mixed precision through torch.autocast({device_type}, {mixed_precision_param})")
    return torch.autocast(device_type, dtype=dtype)
