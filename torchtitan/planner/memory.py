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

from torchtitan.components.chunked_loss import EAGER_BLOCK_ELEMENTS
from torchtitan.distributed.activation_offload import offloaded_layers
from torchtitan.planner.geometry import Geometry

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
    later_layers: str = "full"  # the others' AC: "full", "op_attn" or "none"
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
    offload_layers: int = 0  # activation offload: N blocks (offloaded_layers) keep their saved tensors on the host
    repeat_kv: bool = False  # keys/values repeated to the query heads (CPU path, CP)
    composite_rmsnorm: bool = False  # CPU: rms_norm decomposes and also keeps x * rstd
    pad_values: bool = False  # CPU: values narrower than queries (latent attention) padded for SDPA
    ep: int = 1  # expert parallel degree (routed token copies exchanged by all-to-all)
    # rows each expert's group is padded to for the grouped GEMMs: 16 bytes (CUDA), 1 (CPU)
    group_align: int = 8
    stage_moe_layers: tuple[int, ...] = ()  # MoE blocks of each stage; () = the model's share

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
    block_params: int = 0  # elements of the largest block, TP-local (EP-local experts)
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
    host: int = 0  # bytes kept on the CPU (FSDP CPU offload, offloaded activations)
    offloaded: int = 0  # activation bytes copied to the host (and back) per forward


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


def _offloaded_blocks(w: Workload, n_blocks: int, n_layers: int) -> set[int]:
    """Blocks of one stage whose saved tensors go to the host: exactly those the trainer
    picks for a whole model; a pipeline stage gets the model's share, spread the same way."""
    if w.offload_layers <= 0:
        return set()
    if sum(w.stage_layers) == n_layers:
        return set(offloaded_layers(w.offload_layers, n_blocks))
    return set(offloaded_layers(round(n_blocks * min(w.offload_layers, n_layers) / n_layers), n_blocks))


def _stage_blocks(g: Geometry, w: Workload) -> list[list[tuple[str, bool]]]:
    """(AC mode, is MoE) of each block of each stage on this rank (dense blocks first)."""
    out = []
    for i, n in enumerate(w.stage_layers):
        n_moe = w.stage_moe_layers[i] if i < len(w.stage_moe_layers) else g.moe_share(n)
        modes = _block_modes(w, n, g.n_layers)
        out.append([(m, j >= n - n_moe) for j, m in enumerate(modes)])
    return out


def block_saved_per_token(g: Geometry, w: Workload, mode: str, moe: bool | None = None) -> float:
    """Bytes one block keeps for backward per token of its sequence (``w.tokens``).

    ``mode``: ``none``, ``full``, ``op`` (selective per-op), ``op_all`` (the same saving every
    matmul output) or ``op_attn`` (saving attention's only). Sequence-parallel tensors (block
    input, residual, norm statistics) have tokens / tp rows when tp > 1. ``moe``: an MoE
    block (default: the model's last block kind); its feed-forward terms are
    ``_moe_saved_per_token``'s.
    """
    moe = g.moe if moe is None else moe
    saved = _dense_block_saved(g, w, mode) + _qk_norm_saved(g, w, mode)
    if moe:
        saved += _moe_saved_per_token(g, w, mode) - _dense_ffn_saved(g, w, mode)
    return saved


def _dense_block_saved(g: Geometry, w: Workload, mode: str) -> float:
    """A Llama block (attention without q/k norms, SwiGLU feed-forward); with latent
    attention (DeepSeek) its attention terms are ``_latent_attention_saved``'s."""
    if g.kv_lora_rank:
        r, s = w.residual_bytes, (1.0 / w.tp if w.tp > 1 else 1.0)
        ffn_norm = 0.0  # its input (the residual), statistics and the decomposed norm's extra
        if mode == "none":
            ffn_norm = 4 * s + (0.0 if w.compile_model else r * g.dim * s * (2 if w.composite_rmsnorm else 1))
        return r * g.dim * s + _latent_attention_saved(g, w, mode) + ffn_norm + _dense_ffn_saved(g, w, mode)
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


def _dense_ffn_saved(g: Geometry, w: Workload, mode: str) -> float:
    """The dense feed-forward's share of ``_dense_block_saved`` (after its norm): what an
    MoE block has instead. Under per-op AC after an odd number of attention matmuls
    (``Geometry.odd_attention_matmuls``) w1 and w2 are rerun and w3 saved instead."""
    a, tp, d, h = w.compute_bytes, w.tp, g.dim, g.hidden / w.tp
    s = 1.0 / tp if tp > 1 else 1.0
    eager_w2 = 0.0 if w.compile_model else a * d + (a * d * s if tp > 1 else 0.0)  # w2 out, its reduce-scatter
    if mode == "op" and g.odd_attention_matmuls:
        return a * h + (a * d * s if tp > 1 and not w.compile_model else 0.0)
    ffn = {
        "full": 0.0,
        "op_attn": 0.0,
        "op": a * h + eager_w2,
        "op_all": 2 * a * h + eager_w2,
        "none": a * d + (3 if w.compile_model else 4) * a * h,
    }[mode]
    return ffn


def _latent_attention_saved(g: Geometry, w: Workload, mode: str) -> float:
    """What multi-head latent attention (DeepSeek) keeps per token, after its block input.

    Per-head terms shrink with tp, the latents (computed whole on every TP rank) do not. No
    AC (eager, measured on this CPU to the byte): the norm's statistics and normed input,
    the kv latent ``a (kv_lora + rope)`` (kept by its norm, whose output ``a kv_lora`` is
    ``wkv_b``'s input; the query latent likewise), the concatenated queries and keys
    ``a H qk`` each, the values (the CPU's padded copy ``a H qk``, on GPUs ``wkv_b``'s output
    ``a H (nope + v)`` which they view), the attention output and its log-sum-exp (the CPU
    pads it to ``qk`` and copies the cut for ``wo``). Per-op AC saves the outputs of every
    other matmul in the order wq (or wq_a, wq_b), wkv_a, wkv_b, wo, and attention's.
    Compiled (inductor's partition on this CPU, dense blocks): the same but for the
    decomposed norms' extra tensors, within 32 bytes per token without AC."""
    a, tp = w.compute_bytes, w.tp
    s = 1.0 / tp if tp > 1 else 1.0
    d, heads, ql, kvl = g.dim, g.n_heads / tp, g.q_lora_rank, g.kv_lora_rank
    qk, rope, v = g.head_dim, g.qk_rope_head_dim, g.v_head_dim
    nope = qk - rope
    q_heads, v_heads, kv_heads = heads * qk, heads * v, heads * (nope + v)
    lse = 4 * heads
    values = q_heads if w.pad_values else kv_heads
    out = (q_heads + v_heads) if w.pad_values else v_heads  # padded output and wo's input copy
    if mode == "full":
        return 0.0
    if mode == "op_attn":
        return a * (q_heads if w.pad_values else v_heads) + lse
    latent_out = a * (kvl + rope)
    if mode == "op_all":
        query = a * (ql + q_heads) if ql else a * q_heads
        return query + latent_out + a * kv_heads + a * (q_heads if w.pad_values else v_heads) + lse + a * d
    if mode == "op":
        attention = a * (q_heads if w.pad_values else v_heads) + lse
        if ql:  # wq_a, wkv_a and wo saved (compiled too: rerunning the feed-forward's w1 reads it)
            return a * ql + latent_out + attention + a * d
        return a * q_heads + a * kv_heads + attention  # wq and wkv_b
    if mode != "none":
        raise ValueError(f"unknown block mode {mode!r}")
    composite = a if (w.composite_rmsnorm and not w.compile_model) else 0.0
    norm = 4 * s + (w.residual_bytes * d * s if composite else 0.0)
    latents = latent_out + 4 + composite * kvl + a * kvl
    if ql:
        latents += a * ql + 4 + composite * ql + a * ql
    saved = norm + a * d + latents + 2 * a * q_heads + a * values + a * out + lse
    if w.compile_model:
        saved += a * d * s  # wo's output
    return saved


def _qk_norm_saved(g: Geometry, w: Workload, mode: str) -> float:
    """Qwen3's per-head RMSNorm of queries and keys: without AC each keeps its input (wq's,
    wk's output) and the per-head rstd (the CPU's decomposed norm also x * rstd). Under
    per-op AC wq's output is saved anyway and the norms rerun."""
    if not g.qk_norm or mode != "none":
        return 0.0
    a, tp = w.compute_bytes, w.tp
    qk = (g.n_heads + g.n_kv_heads) * g.head_dim / tp
    composite = w.composite_rmsnorm and not w.compile_model
    return a * qk * (2 if composite else 1) + 4 * (g.n_heads + g.n_kv_heads) / tp


def _moe_saved_per_token(g: Geometry, w: Workload, mode: str) -> float:
    """What one MoE feed-forward (``models/common/moe.py``) keeps per token, after its norm.

    With ``k`` = top_k routed copies per token, ``E`` experts, ``m`` = expert hidden size,
    ``c`` = rows per token the grouped GEMMs see (``k`` plus the per-expert padding to
    ``group_align`` rows, a static bound of E x (align - 1) rows per layer and forward):

    - no AC: the router's input ``a d`` (the gate's), softmax scores ``4 E`` (fp32), the top-k
      ids ``8 k`` and renormalised weights ``4 k + 4``, the sort order and each copy's token
      ``16 k`` (int64), the copies' input ``a d c`` (CUDA: the padded buffer, plus its row
      map ``8 k``), the experts' hidden ``4 a m c`` (w1 out, silu, w3 out, product: the
      dense FFN's four), their output ``a d k`` and the copies' weights ``r k`` (both read
      by the weighting's backward), the weighted copies ``r d k`` that ``index_add`` keeps
      (in the layer input's dtype: fp32 under autocast); shared experts like a dense FFN
      ``4 a m_s``; under EP the regrouping permutations ``16 k``. Compiled (inductor's
      partition, checked on this CPU): the logits ``a E`` and softmax's max and sum instead
      of the scores, silu recomputed (``3 a m c``), w2's output ``a d c`` in place of the
      weighted copies, and the zeros ``index_add`` starts from (``r d``).
    - per-op AC: the MUST_SAVE outputs of the matmuls saved, counting on from attention's
      four (wq, wv saved; wk, wo not): the gate's (5th, saved: ``a E``), the experts' w1 (6th,
      rerun), w3 (7th, saved: ``a m c``), w2 (8th, rerun), shared w1 (9th, saved), w3, w2
      (11th, saved; eager only, backward does not read it). ``op_all``: every one, w2's
      output ``a d c`` included (the weighting's backward reads it). ``op_attn``: none.
    - full AC: nothing beyond the block input.

    Under TP the layer runs on the gathered sequence: its routed terms are per token of the
    whole sequence (not / tp); shared experts split their hidden over tp.
    """
    if mode in ("full", "op_attn"):
        return 0.0
    a, r, d = w.compute_bytes, w.residual_bytes, g.dim
    k, e, m = g.top_k, g.num_experts, g.moe_hidden
    sh = g.shared_hidden / w.tp
    pad = e * (w.group_align - 1) / w.tokens if w.group_align > 1 else 0.0
    c = k + pad
    if mode == "op" and g.odd_attention_matmuls:
        # the parity flipped: the gate and w3 rerun, w1 and w2 (read by the weighting) saved
        return a * m * c + a * d * c + (a * sh if sh else 0.0)
    if mode == "op":
        saved = a * e + a * m * c
        if sh:
            saved += a * sh + (0.0 if w.compile_model else a * d)
        return saved
    if mode == "op_all":
        saved = a * e + a * (2 * m + d) * c
        if sh:
            saved += 2 * a * sh + (0.0 if w.compile_model else a * d)
        return saved
    if mode != "none":
        raise ValueError(f"unknown block mode {mode!r}")
    dispatch = 16 * k + a * d * c + (8 * k if w.group_align > 1 else 0.0)
    offsets = 4 * e / w.tokens  # the groups' end rows (int32), per layer
    if w.compile_model:
        # the logits and softmax's max and sum instead of the scores; the experts' output
        # before the weighting; the zeros index_add starts from (layer input dtype)
        router = a * d + a * e + 8 + 8 * k + 4 * k
        experts = 3 * a * m * c
        combine = a * d * c + r * k + r * d + offsets
        shared = 3 * a * sh
    else:
        router = a * d + 4 * e + 8 * k + 4 * k + 4
        experts = 4 * a * m * c
        # the weighting keeps the experts' output and the weights; index_add keeps its source
        # (the weighted copies, in the layer input's dtype) for its backward's expand_as
        combine = a * d * k + r * k + r * d * k + offsets
        shared = 4 * a * sh
    ep = 16 * k if w.ep > 1 else 0.0
    return router + dispatch + experts + combine + shared + ep


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
    ep: int = 1,
    moe_layers: int | None = None,
    cpu_offload: bool = False,
) -> StateBytes:
    """State bytes of rank 0 of a layout, from the shapes alone (what FSDP2 and DTensor
    allocate: TP shards of ceil(dim / tp) rows or columns, FSDP shards of ceil(rows / F)
    rows of the TP-local tensor, padded; optimizer state sized like the unpadded shard).

    Routed experts (style ``ep``): ``num_experts / ep`` experts per rank, not split over TP;
    under FSDP with ``ep`` > 1 they are a unit of their own over the ``fsdp_degree / ep``
    remaining data ranks, sharded on the expert dim when each rank gets at least one
    expert, else on dim 1 (``apply_fsdp``); with ``ep`` 1 they are in the block's unit.
    ``moe_layers``: MoE blocks among ``stage_layers`` (None: the model's share).
    ``cpu_offload``: FSDP wraps the model even on one data rank (the trainer's offload path)."""
    fsdp = fsdp_degree > 1 or (cpu_offload and not ddp)
    n_moe = g.moe_share(stage_layers) if moe_layers is None else moe_layers

    def local(shape: tuple[int, ...], style: str) -> tuple[int, ...]:
        if style == "col" or style == "vocab":
            return (math.ceil(shape[0] / tp),) + shape[1:]
        if style == "row":
            return (shape[0], math.ceil(shape[1] / tp))
        if style == "ep":
            return (shape[0] // ep,) + shape[1:]
        return shape

    params = grads = opt = n_tensors = stage = 0
    units: list[int] = []

    def add_unit(entries: list[tuple[tuple[int, ...], str, bool]], degree: int) -> None:
        nonlocal params, opt, n_tensors, stage
        gathered = 0
        for shape, style, is_linear in entries:
            loc = local(shape, style)
            numel = math.prod(loc)
            stage += numel
            n_tensors += 1
            if fsdp:
                dim = 1 if (style == "ep" and ep > 1 and loc[0] < degree) else 0
                rest = numel // loc[dim] if loc[dim] else 0
                rows = math.ceil(loc[dim] / degree)
                params += rows * rest * param_bytes
                opt += 2 * min(rows, loc[dim]) * rest * param_bytes
                gathered += rows * degree * rest * (1 if (float8_all_gather and is_linear) else gather_bytes)
            else:
                params += numel * param_bytes
                opt += 2 * numel * param_bytes
        units.append(gathered)

    # a tied table and the final norm stay in the root unit, first in forward order (apply_fsdp)
    tied = g.tied_embeddings and first and last
    if first:
        root_norm = [((g.dim,), "rep", False)] if tied else []
        add_unit([((g.vocab, g.dim), "vocab", False)] + root_norm, fsdp_degree)
    for i in range(stage_layers):
        moe = i >= stage_layers - n_moe  # dense blocks first
        entries = [(shape, style, style not in ("rep", "ep") or name.endswith("gate"))
                   for name, shape, style in g.block_shapes(moe)]
        if moe and ep > 1 and fsdp_degree > 1:  # the experts' own unit, after the block's
            add_unit([e for e in entries if e[1] != "ep"], fsdp_degree)
            add_unit([e for e in entries if e[1] == "ep"], fsdp_degree // ep)
        else:
            add_unit(entries, fsdp_degree)
    if last and not tied:
        add_unit([((g.dim,), "rep", False), ((g.vocab, g.dim), "vocab", False)], fsdp_degree)
    grads = params if fsdp else stage * param_bytes
    opt += 4 * n_tensors if fused_step else 0
    kinds = {i >= stage_layers - n_moe for i in range(stage_layers)} or {g.moe}
    block = max(sum(math.prod(local(shape, style)) for _, shape, style in g.block_shapes(k)) for k in kinds)
    return StateBytes(
        params=params,
        grads=grads,
        optimizer=opt,
        unit_unsharded=units if fsdp else [],
        stage_params=stage,
        block_params=block,
        output_params=math.ceil(g.vocab / tp) * g.dim if last else 0,
        buckets=stage * param_bytes if ddp else 0,
    )


def _grad_temps(g: Geometry, w: Workload, moe: bool) -> float:
    """Bytes per token of the gradients alive inside one block's backward: the feed-forward
    hidden's three and two of width dim (MoE: per routed copy, plus the shared experts)."""
    if not moe:
        return w.compute_bytes * (3 * g.hidden / w.tp + 2 * g.dim)
    c = g.top_k + (g.num_experts * (w.group_align - 1) / w.tokens if w.group_align > 1 else 0.0)
    return w.compute_bytes * (3 * g.moe_hidden * c + 2 * g.dim * g.top_k + 2 * g.dim + 3 * g.shared_hidden / w.tp)


def _backward_walk(
    g: Geometry, w: Workload, states: StateBytes, blocks: list[tuple[str, bool]], head: float,
    off: frozenset[int] | set[int] = frozenset(), working: float = 0.0,
) -> float:
    """Without FSDP the gradients are allocated on the compute stream as backward produces
    them, while the earlier blocks' activations are still kept: the largest sum, block by
    block from the last, of the gradients made so far (output, later blocks), the kept
    activations of this and earlier blocks, and this block's transient (its recomputation,
    the gradients inside it, and under autocast the bf16 weight copies its rerun makes) or
    its own gradients, whichever is larger. It starts at the output projection's backward
    (``head``: the final norm's and the projection's inputs and the loss's logits and their
    gradient), with the projection's weight gradient (and its bf16 copy under autocast). The
    blocks in ``off`` keep nothing on the device but ``working`` (activation offload)."""
    a, T = w.compute_bytes, w.tokens
    per_param = states.grads / max(states.stage_params, 1)
    block_grads = per_param * states.block_params
    made = per_param * (states.output_params + g.dim) if w.last else 0.0
    kept = []
    for i, (m, moe) in enumerate(blocks):
        saved = 0.0 if i in off else block_saved_per_token(g, w, m, moe) * T
        kept.append(saved + (2 * states.block_params if w.autocast and m == "none" else 0))
    below = sum(kept) + working
    out_copy = 2 * states.output_params if w.autocast else 0.0
    peak = below + head + out_copy + made + (a * states.output_params if w.autocast else 0.0) if w.last else 0.0
    for (m, moe), k in zip(reversed(blocks), reversed(kept)):
        rerun = (block_saved_per_token(g, w, "none", moe) - block_saved_per_token(g, w, m, moe)) * T
        recast = a * states.block_params if (w.autocast and m != "none") else 0.0
        transient = rerun + _grad_temps(g, w, moe) * T + recast
        peak = max(peak, made + below + max(transient, block_grads))
        below -= k
        made += block_grads
    return peak


def estimate_memory(g: Geometry, w: Workload, states: StateBytes) -> MemoryEstimate:
    """Peak active and reserved bytes of one rank (see the module docstring)."""
    a, T = w.compute_bytes, w.tokens
    per_stage, transient = [], 0.0
    offloaded = working = 0.0  # activation offload: bytes on the host; the device's share of them
    stages = _stage_blocks(g, w)
    for blocks in stages:
        saved = [block_saved_per_token(g, w, m, moe) * T for m, moe in blocks]
        off = _offloaded_blocks(w, len(blocks), g.n_layers)
        kept = [s for i, s in enumerate(saved) if i not in off]
        moved = [s for i, s in enumerate(saved) if i in off]
        if moved:
            # on the device: one offloaded block being copied out while the next is packed
            # (forward), or the one in backward and the previous one being fetched
            offloaded += sum(moved)
            working = max(working, 2 * max(moved))
        per_stage.append(sum(kept) + (2 * max(moved) if moved else 0.0))
        for m, moe in set(blocks):
            recompute = block_saved_per_token(g, w, "none", moe) - block_saved_per_token(g, w, m, moe)
            transient = max(transient, recompute * T + _grad_temps(g, w, moe) * T)
    if w.cp > 1:  # ring attention gathers keys and values of the whole sequence
        transient += 2 * T * w.cp * g.n_heads * g.head_dim / w.tp * a
    acts = sum(per_stage) / max(len(per_stage), 1) * w.inflight

    copies = 0.0  # autocast: bf16 copies of fp32 weights, kept by the matmuls that saved them
    if w.autocast:
        no_ac = sum(m == "none" for blocks in stages for m, _ in blocks)
        copies = 2 * (states.output_params + no_ac * states.block_params)

    boundary = loss = head = 0.0
    if w.last:
        s = 1.0 / w.tp if w.tp > 1 else 1.0
        extra = w.residual_bytes * g.dim * s if w.composite_rmsnorm else 0.0
        # the final norm keeps its input and rstd, the output projection its gathered input
        boundary = (w.residual_bytes * g.dim * s + 4 * s + extra + a * g.dim) * T
        vocab = g.vocab / w.tp if (w.tp > 1 and w.loss_parallel) else g.vocab
        if w.loss_chunk > 0:
            # one chunk's logits, their gradient written over them, the fp32 weight-gradient
            # accumulator (more than one chunk) and the hidden states' gradient, made in the
            # forward; backward starts with the two gradients kept (the weight's scaled copy
            # is counted with the gradients)
            head = a * T * g.dim + a * vocab * g.dim
            chunk = min(w.loss_chunk, T)
            # per chunk x vocab element, the logits in their dtype; eager, fp32 temporaries
            # for EAGER_BLOCK_ELEMENTS of them at a time (copy, softmax, gradient, ~16 bytes)
            temps = 0 if w.compile_loss else 16 * min(chunk * vocab, EAGER_BLOCK_ELEMENTS)
            acc = 4 * vocab * g.dim if chunk < T else 0
            loss = chunk * vocab * a + temps + acc + head
        elif w.compile_loss:
            loss = 2 * a * T * vocab
        else:
            loss = 12 * T * vocab
        if w.loss_chunk <= 0:
            head = loss

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
            # norm+output unit stay gathered from their forward to their backward. Under EP
            # an MoE block is two units (the block's and its routed experts').
            u = 2 if (w.ep > 1 and g.moe) else 1
            ag_pool = max(sum(units[: 1 + u]), sum(units[-(2 * u + 1):]))
            ag_at_loss = sum(units[-(u + 1):]) if w.last else 0
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
    if not w.fsdp and not w.pp and w.grad_accum == 1 and not w.cpu_offload and len(stages) == 1:
        walk = _backward_walk(g, w, states, stages[0], boundary + head,
                              _offloaded_blocks(w, len(stages[0]), g.n_layers), working)
        phases["backward"] = max(phases["backward"], base + walk)
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
        host=int((states.params + states.optimizer + states.grads if w.cpu_offload else 0) + offloaded * w.inflight),
        offloaded=int(offloaded),
    )
