"""What one optimizer step costs in time: compute, pipeline bubble and communication.

The model, per GPU and step (all assumptions in ``hardware.py`` and docs/planning.md):

- compute = dense hardware FLOPs / (peak x dense efficiency) + attention hardware FLOPs /
  (peak x attention efficiency). Dense: 6 x active non-embedding params per token (MoE: the
  routed experts at top_k / num_experts) plus the forward matmuls activation checkpointing
  reruns (grouped GEMMs included); attention: causal FlashAttention FLOPs (half the
  non-causal count the trainer's MFU uses) plus AC's reruns. Separating them is what makes
  long sequences right: with one efficiency on the MFU formula's FLOPs the planner was 26-39%
  slow at 65k-262k tokens. The efficiencies are fitted to measured runs from 8k to 262k
  tokens (hardware.py). Float8 divides the dense time by a measured speedup.
- pipeline bubble = compute x idle fraction of the schedule: (pp - 1) / microbatches for
  GPipe and 1F1B, divided by the stages per rank for the interleaved schedules, and by a
  further 3 for the zero-bubble ones (their weight-gradient passes fill most of it).
- communication = bytes each GPU sends / (link bandwidth x efficiency), for ring all-gather /
  reduce-scatter / all-reduce; a group uses NVLink when its ranks fit in one node (the mesh
  puts tp innermost, then cp, dp_shard, dp_replicate, pp) and the inter-node network
  otherwise. FSDP and DDP traffic overlaps the compute and only the excess is paid; TP, CP
  and PP traffic sits on the critical path (async TP hides ``ASYNC_TP_HIDDEN`` of it).
  Expert parallelism's all-to-all (dispatch and combine of the routed copies, forward,
  backward and AC's rerun) is on the critical path too.
- MoE memory-bound work (``memory_s``) at the HBM rate x ``hbm_efficiency``: the optimizer
  step, clipping and autocast casts of the experts a token does not use (the dense
  efficiencies already contain this work for the active parameters), and the permutation
  and combination of the routed copies (``_routing_bytes``); the loss chunks' time over the
  plain loss, as bytes per logit and per chunk after the first (``LOSS_CHUNK_*``, measured).
- FSDP CPU offload (``host_s``): every gather copies the rank's fp32 shards host -> device and
  every reduce-scatter its gradient shards back, over the host link (overlapped with compute
  like FSDP traffic); the optimizer steps on the host (28 bytes a parameter at the host
  optimizer rate), not overlapped. Both rates are assumptions (hardware.py). Activation offload
  (``activation_checkpoint.cpu_offload_layers``): the offloaded bytes go out during the
  forward and come back during the backward over the same link; only what a third (forward)
  and two thirds (backward) of the compute do not cover is paid.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.config import JobConfig
from torchtitan.planner.hardware import GpuSpec
from torchtitan.planner.layout import Layout
from torchtitan.planner.memory import OP_AC_OPTIONS, Geometry

# The loss chunks' time over the compiled plain loss, as device-memory bytes at the HBM rate
# (scripts/benchmark_chunked_loss.py on the H200, 2026-12-03, 16,384 tokens, 3B's output
# layer: +4.5 ms for one chunk of 16,384 or two of 8,192, +6.7 ms for eight of 2,048): per
# token x vocab logit, and per vocab x dim weight-gradient element for each chunk after the first.
LOSS_CHUNK_BYTES_PER_LOGIT = 7
LOSS_CHUNK_ACCUMULATE_BYTES = 3

__all__ = [
    "StepCost",
    "attention_flops_per_token",
    "dense_flops_per_token",
    "model_flops_per_token",
    "routed_flops_per_token",
    "step_cost",
    "step_cost_for_config",
    "FLOAT8_DENSE_SPEEDUP",
]

# Float8 speeds up the dense part of the step (matmuls with their casts), not attention. 1.26
# there gives the measured whole-step 1.20 of the standard suite's C over B on 2x H200 (3B
# FSDP 2 compiled, op AC saving every matmul: 25,304 / 21,058 tokens/s/GPU, 2026-12-01),
# where the dense part is 80% of B's modelled compute time.
FLOAT8_DENSE_SPEEDUP = 1.26
ASYNC_TP_HIDDEN = 0.7  # share of TP traffic async TP overlaps (an assumption, not measured)
# What one byte of activation offload costs the step, in bytes of device-memory traffic
# (measured on the H200, 2026-12-03, 3B at 16k tokens, op AC saving every matmul: 6 blocks'
# 6.2 GiB offloaded ran 1.2% slower than none, ~9 ms: ~4.7 bytes at 3.4 TB/s per byte).
OFFLOAD_BYTE_COST = 5.0


@dataclass
class StepCost:
    """Seconds of one optimizer step on one GPU, and what that gives."""

    compute_s: float
    memory_s: float  # memory-bound: idle experts' optimizer/casts, MoE routing, loss chunks
    bubble_s: float
    tp_s: float
    cp_s: float
    pp_s: float
    ep_s: float  # expert parallel all-to-all (on the critical path)
    dp_s: float  # FSDP / HSDP / DDP traffic, before overlap
    exposed_dp_s: float
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs / peak bf16
    host_s: float = 0.0  # CPU offload: FSDP's copies (overlapped), the host optimizer, exposed activation copies


def _params_no_embedding(g: Geometry) -> int:
    """Active parameters a token's matmuls use (as the model families count them for MFU):
    the blocks with routed experts at top_k / num_experts, the output projection and the
    final norm (a tied table counts as the output projection, once)."""
    return g.active_params_no_embedding


def model_flops_per_token(g: Geometry, seq: int) -> float:
    """The trainer's FLOPs per token (the family's ``get_nparams_and_flops``):
    6 x active non-embedding parameters + 12 x layers x heads x head_dim x seq (head_dim: the
    mean of the query/key and value widths, ``Geometry.attention_head_dim``)."""
    return 6 * _params_no_embedding(g) + 12 * g.n_layers * g.n_heads * g.attention_head_dim * seq


def _recomputed_share(
    g: Geometry, ac_mode: str, ac_option: str, op_layers: int, later: str = "full"
) -> tuple[float, float]:
    """(share of layers whose forward AC reruns whole, share running per-op AC); ``later``:
    the AC of the layers after ``op_layers`` ("full", "attention": rerun whole but for
    attention, "none")."""
    if ac_mode == "none":
        return 0.0, 0.0
    if ac_mode == "full":
        return 1.0, 0.0
    if ac_option in OP_AC_OPTIONS:
        op = 1.0 if op_layers < 0 else min(op_layers, g.n_layers) / g.n_layers
        return (0.0 if later == "none" else 1.0 - op), op
    return 1.0 / int(ac_option), 0.0


def _active_block(g: Geometry, moe: bool) -> float:
    """Active parameters of one block (routed experts at top_k / num_experts)."""
    if not moe:
        return g.block_numel(False)
    return g.block_numel(True) - g.routed_params * (1 - g.top_k / g.num_experts)


def _op_matmul_rerun(g: Geometry, ac_option: str, moe: bool = False) -> float:
    """Forward matmul FLOPs per token one per-op-AC block reruns: wk, wo and w3 (the matmuls
    it does not save; backward needs k, the residual after wo and w3's output), none with
    ``op_all``, all of them with ``op_attn`` (which saves attention's output only).

    An MoE block's matmuls, in order, after attention's four: the router gate (saved), the
    experts' grouped w1 (rerun), w3 (saved), w2 (rerun), shared experts w1 (saved), w3
    (rerun), w2 (saved): every other one rerun, grouped GEMMs counted as matmuls."""
    d, q, kv, h = g.dim, g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim, g.hidden
    if ac_option == "op_all":
        return 0.0
    if ac_option == "op_attn":
        return 2 * _active_block(g, moe)
    if g.kv_lora_rank:
        return 2 * (_latent_attention_rerun(g) + _ffn_rerun(g, moe, flipped=g.odd_attention_matmuls))
    return 2 * (kv * d + d * q + _ffn_rerun(g, moe, flipped=False))


def _ffn_rerun(g: Geometry, moe: bool, flipped: bool) -> float:
    """Multiply-adds per token of the feed-forward matmuls per-op AC reruns: w3 (MoE: the
    experts' w1 and w2, the shared w3); ``flipped`` (after an odd number of attention
    matmuls) the others: w1 (not w2, the block's last matmul, whose output backward does
    not read: the recompute stops before it), MoE: the gate, the experts' w3, the shared w1
    and w2 (counted with FlopCounterMode on this CPU, grouped GEMMs aside)."""
    d, k, m, sh = g.dim, g.top_k, g.moe_hidden, g.shared_hidden
    if not moe:
        return g.hidden * d
    if flipped:
        return g.num_experts * d + k * m * d + 2 * sh * d
    return 2 * k * m * d + sh * d


def _latent_attention_rerun(g: Geometry) -> float:
    """Multiply-adds per token of the latent-attention matmuls per-op AC reruns: wkv_a and
    wo (queries straight from dim), or wq_b and wkv_b (low-rank queries)."""
    d, heads, qk, v = g.dim, g.n_heads, g.head_dim, g.v_head_dim
    if g.q_lora_rank:
        return g.q_lora_rank * heads * qk + g.kv_lora_rank * heads * (qk - g.qk_rope_head_dim + v)
    return d * (g.kv_lora_rank + g.qk_rope_head_dim) + heads * v * d


def _op_cheap_rerun_bytes(g: Geometry, residual_bytes: int, moe: bool = False) -> float:
    """Bytes per token one per-op-AC block's backward moves rerunning the cheap ops it did
    not save (compiled: each a single pass): both RMSNorms (read the residual, write the
    normed input), rotary on q and k (read and write), SwiGLU's product (read two hidden,
    write one; MoE: per routed copy and the shared experts). Full AC's reruns are part of
    the fitted dense efficiency; this is what per-op AC adds to it (measured: one H200, the
    1B shape at 32k tokens, op AC saving every matmul 1.6-2.2% below no AC)."""
    a, r = 2, residual_bytes
    hidden = g.top_k * g.moe_hidden + g.shared_hidden if moe else g.hidden
    q, kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    return 2 * g.dim * (r + a) + 2 * (q + kv) * a + 3 * hidden * a


def _n_moe(g: Geometry) -> tuple[int, int]:
    return g.n_layers - g.n_moe_layers, g.n_moe_layers


def dense_flops_per_token(g: Geometry, ac_mode: str, ac_option: str, op_layers: int = -1, later: str = "full") -> float:
    """Hardware FLOPs per token outside attention: 6 x active non-embedding params and the
    forward matmuls activation checkpointing reruns (the loss chunks add none: their
    gradients are made in the forward, components/chunked_loss.py).

    Full AC reruns every block forward; per-op AC the matmuls it does not save
    (``_op_matmul_rerun``); "N" reruns 1/N of the blocks; ``op_layers`` >= 0: op AC on that
    many layers only, full AC on the rest. MoE blocks count their routed experts at
    top_k / num_experts (each token's copies), in the forward and in its reruns."""
    flops = 6 * _params_no_embedding(g)
    whole, op = _recomputed_share(g, ac_mode, ac_option, op_layers, later)
    for n, moe in zip(_n_moe(g), (False, True)):
        if n:
            flops += n * (whole * 2 * _active_block(g, moe) + op * _op_matmul_rerun(g, ac_option, moe))
    return flops


def routed_flops_per_token(
    g: Geometry, ac_mode: str, ac_option: str, op_layers: int = -1, later: str = "full"
) -> float:
    """The routed experts' and the router's share of ``dense_flops_per_token``: under TP every
    TP rank runs them on the whole gathered sequence (``apply_moe_tp``), so they are not
    divided over tp."""
    if not g.moe:
        return 0.0
    k, m, d, e = g.top_k, g.moe_hidden, g.dim, g.num_experts
    per_layer = 6 * (3 * k * m * d + e * d)
    whole, op = _recomputed_share(g, ac_mode, ac_option, op_layers, later)
    rerun = {"op_all": 0.0, "op_attn": 2 * (3 * k * m * d + e * d)}.get(ac_option, 2 * 2 * k * m * d)
    per_layer += whole * 2 * (3 * k * m * d + e * d) + op * rerun
    return g.n_moe_layers * per_layer


def _routing_bytes(
    g: Geometry, lay: Layout, compiled: bool, autocast: bool, op_layers: int, later: str = "full"
) -> float:
    """Bytes an MoE rank moves per token of one forward permuting and combining the routed
    copies (memory-bound passes over ``top_k x dim`` values a token, counted off
    ``models/common/moe.py``; ``r`` = the layer input's bytes, 4 under autocast). Forward,
    per element of a copy: compiled (inductor fuses each group) the gather + cast + padded
    buffer ``r + 4``, SwiGLU's elementwise ``6 m / dim``, un-padding + weighting + cast
    ``2 + r``, ``index_add`` reading the copy and updating its token ``3 r``; eager, each op
    its own pass: gather ``2 r``, zeros + index_copy ``6``, silu and product ``10 m / dim``,
    un-pad ``4``, weighting ``4``, zeros ``r``, index_add ``3 r``, and under autocast the two
    casts ``2 r + 4``. Backward twice the forward; AC's rerun the forward again. Every TP rank
    does this on the gathered sequence."""
    r = 4 if autocast else 2
    ratio = g.moe_hidden / g.dim
    if compiled:
        forward = 5 * r + 6 + 6 * ratio
    else:
        forward = 6 * r + 14 + 10 * ratio + (2 * r + 4 if autocast else 0)
    whole, op = _recomputed_share(g, lay.ac_mode, lay.ac_option, op_layers, later)
    return forward * (3 + whole + op) * g.top_k * g.dim * g.n_moe_layers / lay.pp


def attention_flops_per_token(
    g: Geometry, seq: int, ac_mode: str, ac_option: str, op_layers: int = -1, later: str = "full"
) -> float:
    """Causal attention's hardware FLOPs per token, counted as FlashAttention counts them:
    forward 2·heads·head_dim·seq per layer (half of the non-causal 4), backward 2.5x the
    forward (it recomputes the scores), plus the forwards full AC reruns (per-op AC saves
    the attention output). The trainer's MFU counts 12·heads·head_dim·seq instead."""
    forward = 2 * g.n_heads * g.attention_head_dim * seq * g.n_layers
    whole, _ = _recomputed_share(g, ac_mode, ac_option, op_layers, later)
    if later == "attention" and ac_option in OP_AC_OPTIONS:
        whole = 0.0  # the layers after op_layers keep attention's output
    return forward * (3.5 + whole)


def _bandwidth(gpu: GpuSpec, span: int) -> float:
    """Bytes/s per GPU for a group whose ranks span ``span`` consecutive global ranks."""
    gbps = gpu.intra_node_gbps if span <= gpu.gpus_per_node else gpu.inter_node_gbps
    return gbps * 1e9 * gpu.comm_efficiency


def _ring(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather or reduce-scatter of ``nbytes`` in total."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def bubble_fraction(schedule: str, pp: int, n_microbatches: int, stages_per_rank: int) -> float:
    if pp <= 1:
        return 0.0
    idle = (pp - 1) / n_microbatches
    if schedule in ("GPipe", "1F1B"):
        return idle
    idle /= stages_per_rank
    if schedule in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"):
        idle /= 3
    return idle


def step_cost(
    g: Geometry,
    lay: Layout,
    gpu: GpuSpec,
    *,
    compiled: bool,
    float8: bool = False,
    float8_all_gather: bool = False,
    async_tp: bool = False,
    reshard: str = "default",
    stages_per_rank: int = 1,
    param_bytes_gathered: int = 2,
    reduce_bytes: int = 4,
    op_layers: int = -1,
    loss_chunk: int = 0,
    later: str = "full",
    autocast: bool = False,
    clip: bool = True,
    cpu_offload: bool = False,
    offload_bytes: float = 0.0,
) -> StepCost:
    """The cost of one step of ``lay`` (see the module docstring). ``loss_chunk``: tokens
    per loss chunk (0: the plain loss); chunks cost their extra passes over the logits and,
    after the first, their fp32 weight-gradient accumulation."""
    flops_tok = model_flops_per_token(g, lay.seq)
    tokens_dp = lay.local_batch * lay.seq * lay.grad_accum  # per data-parallel rank and step
    tokens_gpu = tokens_dp / (lay.tp * lay.cp * lay.pp)  # work-equivalent tokens per GPU
    dense = dense_flops_per_token(g, lay.ac_mode, lay.ac_option, op_layers, later) * tokens_gpu
    # TP ranks duplicate the routed experts' work on the gathered sequence
    dense += routed_flops_per_token(g, lay.ac_mode, lay.ac_option, op_layers, later) * tokens_gpu * (lay.tp - 1)
    attention = attention_flops_per_token(g, lay.seq, lay.ac_mode, lay.ac_option, op_layers, later)
    attention *= tokens_gpu
    eff = gpu.compute_efficiency_compiled if compiled else gpu.compute_efficiency_eager
    dense_s = dense / (gpu.peak_flops() * eff)
    if float8:
        dense_s /= FLOAT8_DENSE_SPEEDUP
    compute = dense_s + attention / (gpu.peak_flops() * gpu.attention_efficiency)
    bubble = compute * bubble_fraction(lay.schedule, lay.pp, lay.n_microbatches, stages_per_rank)

    a = 2
    whole, op = _recomputed_share(g, lay.ac_mode, lay.ac_option, op_layers, later)  # AC reruns
    layers = g.n_layers / lay.pp
    forwards = lay.n_microbatches * lay.grad_accum  # forward passes per step on this rank
    tokens_fwd = lay.forward_tokens
    tp_span, cp_span = lay.tp, lay.tp * lay.cp
    fsdp_span = lay.tp * lay.cp * lay.dp_shard
    rep_span = fsdp_span * lay.dp_replicate
    pp_span = rep_span * lay.pp

    tp_s = 0.0
    if lay.tp > 1:
        act = tokens_fwd * g.dim * a  # one gathered activation
        per_layer = 8 + {"full": 4, "none": 0}.get(lay.ac_mode, 2)  # fwd 4, bwd 4, recompute
        if lay.ac_mode == "selective" and lay.ac_option not in OP_AC_OPTIONS:
            per_layer = 8 + 4 / int(lay.ac_option)
        volume = (per_layer * layers + 2) * _ring(act, lay.tp) * forwards
        tp_s = volume / _bandwidth(gpu, tp_span) * ((1 - ASYNC_TP_HIDDEN) if async_tp else 1.0)
    cp_s = 0.0
    if lay.cp > 1:  # all-gather K and V (repeated to the query heads) forward, again + RS backward
        kv = 2 * tokens_fwd * lay.cp * g.n_heads * g.attention_head_dim / lay.tp * a
        cp_s = 3 * layers * _ring(kv, lay.cp) * forwards / _bandwidth(gpu, cp_span)
    pp_s = 0.0
    if lay.pp > 1:  # hidden states forward and their gradients backward, per stage boundary
        hidden = tokens_fwd * g.dim * a / lay.tp
        pp_s = 2 * hidden * stages_per_rank * forwards / _bandwidth(gpu, pp_span)

    ep_s = 0.0
    if lay.ep > 1 and g.moe:
        # all-to-all of the routed copies: dispatch and combine in forward, their reverses in
        # backward, and again in the forward that AC reruns (full or per-op: the collectives
        # are not saved); each rank keeps 1/ep of its copies
        copies = tokens_fwd * g.top_k * g.dim * a
        per_layer = 4 + 2 * (whole + op)
        volume = per_layer * g.n_moe_layers / lay.pp * copies * (lay.ep - 1) / lay.ep * forwards
        ep_s = volume / _bandwidth(gpu, lay.ep * lay.tp)

    # (elements per rank before FSDP sharding, FSDP group size): the routed experts are
    # replicated over tp, split over ep and FSDP-sharded over the other dp_shard x cp / ep
    routed = g.n_moe_layers * g.routed_params / (lay.ep * lay.pp)
    embeddings = (1 if g.tied_embeddings else 2) * g.vocab * g.dim
    rest = (g.layers_params - g.n_moe_layers * g.routed_params + embeddings) / (lay.tp * lay.pp)
    fsdp_n = lay.dp_shard * lay.cp
    dp_s = 0.0
    if fsdp_n > 1:
        regathers = 0.0 if (lay.pp > 1 or reshard == "never") else 1.0
        passes = 1 if lay.pp > 1 else lay.grad_accum
        for local, n, linears in ((rest, fsdp_n, True), (routed, fsdp_n // lay.ep, False)):
            gather = local * (1 if (float8_all_gather and linears) else param_bytes_gathered)
            per_pass = _ring(gather, n) * (1 + regathers) + _ring(local * reduce_bytes, n)
            dp_s += per_pass * passes / _bandwidth(gpu, fsdp_span)
            if lay.dp_replicate > 1:  # HSDP: all-reduce the shards over the replicas
                dp_s += 2 * _ring(local / n * reduce_bytes, lay.dp_replicate) * passes / _bandwidth(gpu, rep_span)
    elif lay.dp_replicate > 1:  # DDP: all-reduce fp32 gradients every backward
        dp_s += 2 * _ring((rest + routed) * 4, lay.dp_replicate) * lay.grad_accum / _bandwidth(gpu, rep_span)
    # memory-bound work per parameter, not per token: fused AdamW reads parameter, gradient
    # and two moments and writes three (28 bytes a parameter), clipping reads the gradients
    # for the norm and scales them (12); under autocast (bf16 without FSDP) each weight is
    # cast to bf16 in every forward and AC rerun (read 4, write 2) and its gradient back to
    # fp32 (6). The dense efficiencies were fitted on step times that include this work for
    # the parameters whose FLOPs they count, so only the routed experts a token does not use
    # (1 - top_k / num_experts of them) are charged here: they cost optimizer and cast time
    # and bring no FLOPs (0 for dense models; the terms below add to it).
    idle = routed * (1 - g.top_k / g.num_experts) if g.moe else 0.0
    nbytes = (idle / (fsdp_n // lay.ep) if fsdp_n > 1 else idle) * (28 + (12 if clip else 0))
    if autocast:
        nbytes += 6 * idle * (2 + whole + op) * lay.grad_accum
    if g.moe:
        nbytes += _routing_bytes(g, lay, compiled, autocast, op_layers, later) * tokens_fwd * forwards
    if op > 0:  # per-op AC's cheap reruns, per block of this rank
        r = 4 if autocast else 2
        for n, moe in zip(_n_moe(g), (False, True)):
            nbytes += op * n / lay.pp * _op_cheap_rerun_bytes(g, r, moe) * tokens_fwd * forwards / lay.tp
    if loss_chunk > 0:  # last stage: the loss chunks' extra passes over their logits, and
        # each chunk after the first adds its weight-gradient share into the fp32 accumulator
        chunks = -(-int(tokens_fwd) // loss_chunk)
        nbytes += (LOSS_CHUNK_BYTES_PER_LOGIT * tokens_fwd + LOSS_CHUNK_ACCUMULATE_BYTES * (chunks - 1) * g.dim) * g.vocab * forwards
    # activation offload: its copies read the bytes out of device memory and write them back,
    # and the hooks and the host's waits cost time too; in all as OFFLOAD_BYTE_COST bytes of
    # device-memory traffic per byte offloaded
    nbytes += OFFLOAD_BYTE_COST * offload_bytes * forwards
    memory_s = nbytes / (gpu.hbm_tbps * 1e12 * gpu.hbm_efficiency)
    copies_s = host_s = 0.0
    if cpu_offload:
        shard = (rest + routed) / max(fsdp_n, 1)  # fp32 elements this rank keeps on the host
        regathers = 0.0 if (lay.pp > 1 or reshard == "never") else 1.0
        passes = 1 if lay.pp > 1 else lay.grad_accum
        copies_s = shard * 4 * (2 + regathers) * passes / (gpu.host_link_gbps * 1e9)
        host_s = shard * 28 / (gpu.host_optimizer_gbps * 1e9)
    exposed = max(0.0, dp_s + copies_s - compute)
    if offload_bytes > 0:
        # activation offload: out over the host link during the forward (a third of the
        # compute), back during the backward (the rest); what the compute does not cover waits
        each_way = offload_bytes * forwards / (gpu.host_link_gbps * 1e9)
        host_s += max(0.0, each_way - compute / 3) + max(0.0, each_way - 2 * compute / 3)
    step = compute + memory_s + bubble + tp_s + cp_s + pp_s + ep_s + exposed + host_s
    tokens_per_gpu = lay.global_batch * lay.seq / step / lay.world_size
    return StepCost(
        compute_s=compute,
        memory_s=memory_s,
        bubble_s=bubble,
        tp_s=tp_s,
        cp_s=cp_s,
        pp_s=pp_s,
        ep_s=ep_s,
        dp_s=dp_s,
        exposed_dp_s=exposed,
        step_s=step,
        tokens_per_s_per_gpu=tokens_per_gpu,
        mfu=flops_tok * tokens_per_gpu / gpu.peak_flops(),
        host_s=copies_s + host_s,
    )


def step_cost_for_config(
    cfg: JobConfig, g: Geometry, lay: Layout, gpu: GpuSpec, stages_per_rank: int, offload_bytes: float = 0.0
) -> StepCost:
    """``step_cost`` with the options read off a job config (the dry run and the search);
    ``offload_bytes``: the memory model's activation bytes offloaded per forward."""
    float8 = "float8" in cfg.model.converters
    return step_cost(
        g,
        lay,
        gpu,
        compiled=cfg.compile.enable and "model" in cfg.compile.components,
        float8=float8,
        float8_all_gather=float8 and cfg.float8.enable_fsdp_float8_all_gather,
        async_tp=cfg.parallelism.enable_async_tensor_parallel,
        reshard=cfg.parallelism.fsdp_reshard_after_forward,
        stages_per_rank=stages_per_rank,
        reduce_bytes=4 if cfg.training.mixed_precision_reduce == "float32" else 2,
        op_layers=cfg.activation_checkpoint.op_ac_layers,
        loss_chunk=cfg.training.loss_chunk_size,
        later=cfg.activation_checkpoint.later_layers,
        autocast=cfg.training.mixed_precision_param == "bfloat16" and lay.dp_shard * lay.cp == 1
        and not cfg.training.enable_cpu_offload,
        clip=cfg.training.max_norm > 0,
        cpu_offload=cfg.training.enable_cpu_offload,
        offload_bytes=offload_bytes,
    )
