"""Per-rank memory model of one training step: states, activations, transients, pools.

Nothing here runs the model. The inputs are the model's shape (``Geometry``), what one rank
holds and runs (``Workload``) and its state bytes (``StateBytes``: read off the sharded
modules by the dry run, or computed by ``analytical_states`` for the layout search). The
model is a list of what autograd keeps, read off the real code and checked against it:

- per transformer block and token, the tensors saved for backward in each activation
  checkpointing mode, eager or compiled (``block_saved_per_token``). The eager lists match
  torch's MemTracker on this CPU byte for byte, the compiled ones the forward graphs that
  AOTAutograd partitions for inductor (tests/unit/test_planner.py checks both);
- at the last stage, the logits and the loss: eager cross-entropy upcasts to fp32 and keeps
  the log-softmax, so its backward holds three fp32 copies (12 bytes per logit); a compiled
  loss keeps the logits and writes one gradient of their dtype (2 x dtype bytes);
- FSDP2 allocates on three CUDA streams and the caching allocator never lends memory freed
  on one stream to another: the compute stream (parameters, optimizer state, activations,
  loss), the all-gather stream (unsharded parameters) and the reduce-scatter stream (sharded
  gradients). The reserved peak is the sum of the three pools' peaks.

docs/planning.md has the derivation and the comparison with measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "Geometry",
    "Workload",
    "StateBytes",
    "MemoryEstimate",
    "analytical_states",
    "block_saved_per_token",
    "estimate_memory",
    "inflight_chunks",
    "schedule_inflight",
]



# The planner's names for per-op AC, by the matmul outputs saved: every other one (the
# trainer's default), all of them, or none (attention's output only).
OP_AC_SAVED_MATMULS = {"op": "every_other", "op_all": "all", "op_attn": "none"}
OP_AC_OPTIONS = tuple(OP_AC_SAVED_MATMULS)

@dataclass(frozen=True)
class Geometry:
    """The shape of a Llama-style transformer (global, before any sharding)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int  # feed-forward hidden size
    vocab: int

    @classmethod
    def from_model_args(cls, args) -> Geometry:
        """From a family's args, through the model-family contract's ``model_shape()``."""
        s = args.model_shape()
        return cls(
            dim=s.dim,
            n_layers=s.n_layers,
            n_heads=s.n_heads,
            n_kv_heads=s.n_kv_heads,
            head_dim=s.head_dim,
            hidden=s.hidden,
            vocab=s.vocab,
        )

    def block_shapes(self) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
        """(name, global shape, TP style) of one block's parameters, in module order."""
        d, q, kv, h = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden
        return [
            ("attention.wq", (q, d), "col"),
            ("attention.wk", (kv, d), "col"),
            ("attention.wv", (kv, d), "col"),
            ("attention.wo", (d, q), "row"),
            ("feed_forward.w1", (h, d), "col"),
            ("feed_forward.w2", (d, h), "row"),
            ("feed_forward.w3", (h, d), "col"),
            ("attention_norm", (d,), "rep"),
            ("ffn_norm", (d,), "rep"),
        ]

    @property
    def block_params(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.block_shapes())


@dataclass(frozen=True)
class Workload:
    """What one rank holds and runs in one step: the inputs of the memory model."""

    tp: int = 1
    cp: int = 1
    stage_layers: tuple[int, ...] = (1,)  # layers of each pipeline stage on this rank
    first: bool = True  # holds the embedding
    last: bool = True  # holds norm, output and the loss
    microbatch: int = 1  # samples per forward (local batch, or one PP microbatch)
    seq: int = 2048
    inflight: int = 1  # (microbatch, local stage) chunks alive at the peak
    grad_accum: int = 1
    ac_mode: str = "selective"  # none | full | selective
    ac_option: str = "op"  # one of OP_AC_OPTIONS or N (every N-th block)
    op_layers: int = -1  # op AC on this many layers only, full AC on the others; -1 = all
    later_layers: str = "full"  # the others' AC: "full" or "op_attn"
    compile_model: bool = False
    compile_loss: bool = False
    compute_bytes: int = 2  # dtype of activations and logits
    residual_bytes: int = 2  # dtype of the residual stream (fp32 under autocast)
    autocast: bool = False  # bf16 through torch.autocast (fp32 weights, bf16 copies)
    loss_parallel: bool = True
    loss_chunk: int = 0
    fsdp: bool = False
    ddp: bool = False
    pp: bool = False
    reshard: str = "default"  # parallelism.fsdp_reshard_after_forward
    reduce_bytes: int = 4  # FSDP reduce dtype
    cpu_offload: bool = False
    repeat_kv: bool = False  # keys/values repeated to the query heads (CPU path, CP)
    composite_rmsnorm: bool = False  # CPU: rms_norm decomposes and also keeps x * rstd

    @property
    def tokens(self) -> float:
        """Tokens of one forward on this rank (the sequence is split over cp)."""
        return self.microbatch * self.seq / self.cp


@dataclass
class StateBytes:
    """Bytes of the persistent state of one rank, and of its FSDP units when gathered."""

    params: int
    grads: int
    optimizer: int
    unit_unsharded: list[int] = field(default_factory=list)  # per FSDP unit, forward order
    stage_params: int = 0  # elements of the rank's stages, TP-local, not FSDP-sharded
    block_params: int = 0  # elements of one block, TP-local
    output_params: int = 0  # TP-local elements of the output projection (0: not here)
    buckets: int = 0  # DDP's gradient buckets (a second copy of the gradients)


@dataclass
class MemoryEstimate:
    """Predicted bytes of one rank; ``pools`` is the reserved peak per CUDA stream pool."""

    params: int
    grads: int
    optimizer: int
    activations: int  # everything kept for backward at the peak, logits excluded
    loss: int  # logits and loss transient at the last stage
    transient: int  # largest backward temporary of one block
    pools: dict[str, int]
    peak_active: int
    peak_reserved: int
    phase: str  # where the compute-stream peak is
    host: int = 0  # bytes kept on the CPU (FSDP CPU offload)


def _block_modes(w: Workload, n_blocks: int, n_layers: int) -> list[str]:
    """The checkpointing of each block of one stage, as apply_ac decides it (with
    ``op_layers``, exactly for a whole model; a pipeline stage gets the model's share of op
    blocks, since the workload does not say which layers the stage holds)."""
    if w.ac_mode in ("none", "full"):
        return [w.ac_mode] * n_blocks
    if str(w.ac_option) in OP_AC_OPTIONS:
        n_op = n_blocks if w.op_layers < 0 else round(n_blocks * min(w.op_layers, n_layers) / n_layers)
        return [str(w.ac_option)] * n_op + [w.later_layers] * (n_blocks - n_op)
    every = int(w.ac_option)
    return ["full" if (i + 1) % every == 0 else "none" for i in range(n_blocks)]


def block_saved_per_token(g: Geometry, w: Workload, mode: str) -> float:
    """Bytes one block keeps for backward per token of its sequence (``w.tokens``).

    ``mode``: ``none``, ``full``, ``op`` (selective per-op), ``op_all`` (the same saving every
    matmul output) or ``op_attn`` (saving attention's only). Sequence-parallel tensors (block
    input, residual, norm statistics) have tokens / tp rows when tp > 1.
    """
    a, r, tp = w.compute_bytes, w.residual_bytes, w.tp
    s = 1.0 / tp if tp > 1 else 1.0
    d = g.dim
    q = g.n_heads * g.head_dim / tp
    kv = g.n_kv_heads * g.head_dim / tp
    h = g.hidden / tp
    kv_attn = q if w.repeat_kv else kv  # keys / values as SDPA receives them
    lse = 4 * g.n_heads / tp
    x = r * d * s  # the block input (checkpoint input under AC, norm input without)
    if mode == "full":
        return x
    if mode == "op":
        # MUST_SAVE outputs: attention, every other matmul (wq, wv, w1, w2), TP reduce-scatters.
        saved = x + a * q + a * kv + a * q + lse + a * h
        if not w.compile_model:
            # Eager SAC stores w2's output and the reduce-scatters although backward never
            # reads them; the compiled graph keeps only what backward needs.
            saved += a * d + (2 * a * d * s if tp > 1 else 0.0)
        return saved
    if mode == "op_attn":
        # attention output and its log-sum-exp; every matmul is rerun as under full AC
        return x + a * q + lse
    if mode == "op_all":
        # also wk, wo and w3; w2's output is dead in the compiled graph, as above.
        saved = x + a * q + 2 * a * kv + a * q + lse + a * d + 2 * a * h
        if not w.compile_model:
            saved += a * d + (2 * a * d * s if tp > 1 else 0.0)
        return saved
    if mode != "none":
        raise ValueError(f"unknown block mode {mode!r}")
    if w.compile_model:
        # x, rstd, normed projection inputs, q and k after rotary, v, attention output and
        # lse, wo's output (h is recomputed from it), w1 and w3 outputs and their product.
        return x + 4 * s + a * d + a * q + 2 * a * kv_attn + a * q + lse + a * d * s + 4 * s + a * d + 3 * a * h
    norm_extra = r * d * s if w.composite_rmsnorm else 0.0
    attention = x + 4 * s + norm_extra + a * d + a * q + 2 * a * kv_attn + a * q + lse
    feed_forward = r * d * s + 4 * s + norm_extra + a * d + 4 * a * h  # w1, silu, w3, product
    return attention + feed_forward


def inflight_chunks(schedule: str, pp: int, pp_rank: int, n_microbatches: int, stages_per_rank: int) -> int:
    """(microbatch, local stage) forward chunks whose activations are alive at the peak.

    The counts torch's schedules give (tests/unit/test_planner.py compares them with the
    built schedules' action lists): GPipe and LoopedBFS run every forward first; 1F1B keeps
    pp - rank microbatches; Interleaved1F1B warms up (v - 1) rounds plus two chunks per hop
    to the last rank; the zero-bubble and V schedules keep 2 pp chunks (DualPipeV one more),
    fewer when there are few microbatches.
    """
    v, total = stages_per_rank, n_microbatches * stages_per_rank
    if pp <= 1:
        return 1
    if schedule in ("GPipe", "LoopedBFS"):
        return total
    if schedule == "1F1B":
        return min(pp - pp_rank, n_microbatches)
    if schedule in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"):
        return min(2 * pp + (schedule == "DualPipeV"), n_microbatches + 1 + pp_rank, total)
    rounds = max(1, n_microbatches // pp)
    per_round = n_microbatches // rounds
    return min((v - 1) * per_round + 2 * (pp - 1 - pp_rank) + 1, total)


def schedule_inflight(schedule, pp_rank: int) -> int | None:
    """In-flight chunks of ``pp_rank`` read off a built torch schedule's action list (forward
    chunks started and not yet through their full or weight backward), or None when the
    schedule does not expose one (older torch, single-stage schedules)."""
    order = getattr(schedule, "pipeline_order", None)
    if not order or pp_rank not in order:
        return None
    live = peak = 0

    def visit(action) -> None:
        nonlocal live, peak
        if action is None:
            return
        for sub in action.sub_actions or ():
            visit(sub)
        kind = str(getattr(action.computation_type, "value", action.computation_type))
        if kind == "F":
            live += 1
            peak = max(peak, live)
        elif kind in ("B", "W"):
            live -= 1

    for action in order[pp_rank]:
        visit(action)
    return peak or None


def analytical_states(
    g: Geometry,
    tp: int,
    fsdp_degree: int,
    stage_layers: int,
    first: bool,
    last: bool,
    float8_all_gather: bool = False,
    param_bytes: int = 4,
    gather_bytes: int = 2,
    fused_step: bool = True,
    ddp: bool = False,
) -> StateBytes:
    """State bytes of rank 0 of a layout, from the shapes alone (what FSDP2 and DTensor
    allocate: TP shards of ceil(dim / tp) rows or columns, FSDP shards of ceil(rows / F)
    rows of the TP-local tensor, padded; optimizer state sized like the unpadded shard)."""

    def local(shape: tuple[int, ...], style: str) -> tuple[int, ...]:
        if style == "col" or style == "vocab":
            return (math.ceil(shape[0] / tp),) + shape[1:]
        if style == "row":
            return (shape[0], math.ceil(shape[1] / tp))
        return shape

    params = grads = opt = n_tensors = stage = 0
    units: list[int] = []

    def add_unit(entries: list[tuple[tuple[int, ...], str, bool]]) -> None:
        nonlocal params, grads, opt, n_tensors, stage
        gathered = 0
        for shape, style, is_linear in entries:
            loc = local(shape, style)
            numel = math.prod(loc)
            rest = numel // loc[0]
            stage += numel
            n_tensors += 1
            if fsdp_degree > 1:
                rows = math.ceil(loc[0] / fsdp_degree)
                params += rows * rest * param_bytes
                opt += 2 * min(rows, loc[0]) * rest * param_bytes
                gathered += rows * fsdp_degree * rest * (1 if (float8_all_gather and is_linear) else gather_bytes)
            else:
                params += numel * param_bytes
                opt += 2 * numel * param_bytes
        units.append(gathered)

    if first:
        add_unit([((g.vocab, g.dim), "vocab", False)])
    for _ in range(stage_layers):
        add_unit([(shape, style, style != "rep") for _, shape, style in g.block_shapes()])
    if last:
        add_unit([((g.dim,), "rep", False), ((g.vocab, g.dim), "vocab", False)])
    grads = params if fsdp_degree > 1 else stage * param_bytes
    opt += 4 * n_tensors if fused_step else 0
    block = sum(math.prod(local(shape, style)) for _, shape, style in g.block_shapes())
    return StateBytes(
        params=params,
        grads=grads,
        optimizer=opt,
        unit_unsharded=units if fsdp_degree > 1 else [],
        stage_params=stage,
        block_params=block,
        output_params=math.ceil(g.vocab / tp) * g.dim if last else 0,
        buckets=stage * param_bytes if ddp else 0,
    )


def estimate_memory(g: Geometry, w: Workload, states: StateBytes) -> MemoryEstimate:
    """Peak active and reserved bytes of one rank (see the module docstring)."""
    a, T = w.compute_bytes, w.tokens
    per_stage, transient = [], 0.0
    grad_temps = a * (3 * g.hidden / w.tp + 2 * g.dim) * T  # gradients inside one block
    for n in w.stage_layers:
        modes = _block_modes(w, n, g.n_layers)
        per_stage.append(sum(block_saved_per_token(g, w, m) for m in modes) * T)
        for m in set(modes):
            recompute = block_saved_per_token(g, w, "none") - block_saved_per_token(g, w, m)
            transient = max(transient, recompute * T + grad_temps)
    if w.cp > 1:  # ring attention gathers keys and values of the whole sequence
        transient += 2 * T * w.cp * g.n_heads * g.head_dim / w.tp * a
    acts = sum(per_stage) / max(len(per_stage), 1) * w.inflight

    copies = 0.0  # autocast: bf16 copies of fp32 weights, kept by the matmuls that saved them
    if w.autocast:
        no_ac = sum(m == "none" for n in w.stage_layers for m in _block_modes(w, n, g.n_layers))
        copies = 2 * (states.output_params + no_ac * states.block_params)

    boundary = loss = 0.0
    if w.last:
        s = 1.0 / w.tp if w.tp > 1 else 1.0
        extra = w.residual_bytes * g.dim * s if w.composite_rmsnorm else 0.0
        # the final norm keeps its input and rstd, the output projection its gathered input
        boundary = (w.residual_bytes * g.dim * s + 4 * s + extra + a * g.dim) * T
        vocab = g.vocab / w.tp if (w.tp > 1 and w.loss_parallel) else g.vocab
        if w.loss_chunk > 0:
            loss = min(w.loss_chunk, T) * vocab * (12 + a)
        elif w.compile_loss:
            loss = 2 * a * T * vocab
        else:
            loss = 12 * T * vocab

    units = states.unit_unsharded
    ag_pool = ag_at_loss = rs_pool = 0
    block_grad_tmp = end_tmp = 0.0
    if w.fsdp and units:
        if w.pp or w.reshard == "never":
            ag_pool = ag_at_loss = sum(units)
        elif w.reshard == "always":
            ag_pool = max(units) + sorted(units)[-2] if len(units) > 1 else units[0]
        else:
            # gathered: the current unit and the prefetched next one; the last block and the
            # norm+output unit stay gathered from their forward to their backward
            ag_pool = max(sum(units[:2]), sum(units[-3:]))
            ag_at_loss = sum(units[-2:]) if w.last else 0
        rs_pool = 0 if w.cpu_offload else states.grads  # offloaded gradients live on the host
        # a unit's unsharded gradient (compute dtype) and its reduce-scatter input
        block_grad_tmp = (a + w.reduce_bytes) * states.block_params
        end_tmp = (a + w.reduce_bytes) * max(units) / 2

    on_gpu = 0 if w.cpu_offload else states.params + states.optimizer
    base = on_gpu + states.buckets
    if not w.fsdp and (w.grad_accum > 1 or w.pp):
        base += states.grads  # earlier microbatches' gradients are alive during forward
    if w.fsdp and w.pp:
        # Under PP, FSDP accumulates unsharded gradients in the reduce dtype until the last
        # microbatch (torch's pipeline stage turns gradient sync off until then).
        base += w.reduce_bytes * states.stage_params
    grads_end = 0 if w.fsdp else states.grads
    phases = {
        "forward+loss": base + acts + copies + boundary + loss,
        "backward": base + acts + copies + boundary + transient + block_grad_tmp,
        "optimizer": max(base, on_gpu + states.buckets + grads_end) + end_tmp,
    }
    phase = max(phases, key=phases.get)
    pools = {"compute stream": int(phases[phase])}
    if w.fsdp:
        pools["all-gather stream"] = int(ag_pool)
        pools["reduce-scatter stream"] = int(rs_pool)
    reserved = sum(pools.values())
    grads_in_fwd = rs_pool if w.grad_accum > 1 else 0
    active = max(
        phases["forward+loss"] + ag_at_loss + grads_in_fwd,
        phases["backward"] + ag_pool + grads_in_fwd,
        phases["optimizer"] + rs_pool,
    )
    return MemoryEstimate(
        params=states.params,
        grads=states.grads,
        optimizer=states.optimizer,
        activations=int(acts + copies + boundary),
        loss=int(loss),
        transient=int(transient + block_grad_tmp),
        pools=pools,
        peak_active=int(min(active, reserved)),
        peak_reserved=int(reserved),
        phase=phase,
        host=(states.params + states.optimizer + states.grads) if w.cpu_offload else 0,
    )
