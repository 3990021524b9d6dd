"""Plain-text (and JSON) reports of a dry run and of a layout search."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torchtitan.planner.cost import StepCost
from torchtitan.planner.dry_run import Plan
from torchtitan.planner.hardware import GIB, GpuSpec
from torchtitan.planner.search import Candidate, SearchResult

__all__ = ["format_plan", "format_search", "explain", "plan_to_json", "format_assumptions"]


def _g(nbytes: float) -> str:
    return f"{nbytes / GIB:6.2f}"


def format_assumptions(gpu: GpuSpec, headroom_gib: float, margin: float = 0.05) -> str:
    budget = (gpu.memory_gib - headroom_gib) * (1 - margin)
    return (
        f"assumptions: {gpu.name}, {gpu.memory_gib:g} GiB, budget {budget:.1f} GiB ({headroom_gib:g} GiB "
        f"headroom outside the allocator, then a {100 * margin:g}% margin); {gpu.bf16_tflops:g} TFLOP/s bf16 "
        f"at {gpu.compute_efficiency_compiled:g} (compiled) / {gpu.compute_efficiency_eager:g} (eager) for dense "
        f"work and {gpu.attention_efficiency:g} for attention; "
        f"{gpu.gpus_per_node} GPUs per node, {gpu.intra_node_gbps:g} GB/s NVLink and "
        f"{gpu.inter_node_gbps:g} GB/s network per GPU and direction, at {gpu.comm_efficiency:g}"
    )


def format_cost(c: StepCost) -> str:
    return (
        f"step {c.step_s:.3f} s = compute {c.compute_s:.3f} + {f'memory-bound {c.memory_s:.3f} + ' if c.memory_s else ''}bubble {c.bubble_s:.3f} + TP {c.tp_s:.3f} + "
        f"CP {c.cp_s:.3f} + PP {c.pp_s:.3f} + {f'EP {c.ep_s:.3f} + ' if c.ep_s else ''}{f'host {c.host_s:.3f} + ' if c.host_s else ''}exposed DP {c.exposed_dp_s:.3f} (DP traffic {c.dp_s:.3f} s, "
        f"overlapped with compute) -> {c.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {100 * c.mfu:.1f}%"
    )


def format_plan(plan: Plan, cfg_name: str, seconds: float) -> str:
    lay = plan.layout
    lines = [
        f"dry run: {cfg_name} on {lay.world_size} x {plan.gpu.name} ({len(plan.ranks)} rank roles built "
        f"on a fake process group in {seconds:.1f} s)",
        f"layout:  {lay.label()}",
        f"         global batch {lay.global_batch} = local {lay.local_batch} x dp {lay.dp} x accumulation "
        f"{lay.grad_accum}; seq {lay.seq}; mesh pp {lay.pp} x dp_replicate {lay.dp_replicate} x dp_shard "
        f"{lay.dp_shard} x cp {lay.cp} x tp {lay.tp}",
        f"model:   {plan.nparams / 1e9:.2f}B parameters, {plan.flops_per_token:.3g} FLOPs per token",
        "",
        "  rank  stages    layers  params   grads   optim   activ    loss | compute  gather  reduce | reserved  active  peak at",
    ]
    for r in plan.ranks:
        m = r.memory
        pools = m.pools
        lines.append(
            f"  {r.rank:4d}  {','.join(map(str, r.stages)):8s}  {'+'.join(map(str, r.stage_layers)):6s}"
            f"{_g(m.params)}  {_g(m.grads)}  {_g(m.optimizer)}  {_g(m.activations)}  {_g(m.loss)} |"
            f" {_g(pools.get('compute stream', 0))}  {_g(pools.get('all-gather stream', 0))}"
            f"  {_g(pools.get('reduce-scatter stream', 0))} |  {_g(m.peak_reserved)}  {_g(m.peak_active)}  {m.phase}"
        )
    worst = max(plan.ranks, key=lambda r: r.memory.peak_reserved)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        "  (GiB; activ = kept for backward at the peak; compute/gather/reduce = the CUDA stream pools)",
        "",
        f"memory:  {verdict}: largest reserved peak {worst.memory.peak_reserved / GIB:.1f} GiB on rank {worst.rank} "
        f"(budget {plan.budget / GIB:.1f} GiB)",
        f"time:    {format_cost(plan.cost)}",
    ]
    host = max(r.memory.host for r in plan.ranks)
    if host:
        lines.append(f"host:    {host / GIB:.1f} GiB per rank in host memory (CPU offload of the states, offloaded activations)")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    lines.append(format_assumptions(plan.gpu, plan.headroom_gib, plan.margin))
    return "\n".join(lines)


def _row(i: int | str, c: Candidate) -> str:
    k = c.cost
    built = {"": "", "ok": "built ok"}.get(c.verified, c.verified[:60])
    return (
        f"  {str(i):>3}  {c.layout.label():70s} {k.tokens_per_s_per_gpu:9,.0f} {100 * k.mfu:5.1f}% "
        f"{k.step_s:7.2f} {k.compute_s:6.2f} {k.memory_s:5.2f} {k.bubble_s:5.2f} {k.tp_s:5.2f} {k.cp_s:5.2f} "
        f"{k.ep_s:5.2f} {k.exposed_dp_s:5.2f} {c.memory.peak_reserved / GIB:6.1f}  {built}"
    )


def explain(best: Candidate, configured: Candidate) -> str:
    """Why the search prefers ``best`` to the configured layout, in numbers."""
    a, b = configured.cost, best.cost
    if configured.layout == best.layout:
        return "the configured layout is the best one found."
    if b.tokens_per_s_per_gpu <= a.tokens_per_s_per_gpu * 1.005:
        return (
            f"a tie with the configured layout ({a.tokens_per_s_per_gpu:,.0f} tokens/s/GPU); "
            f"memory {configured.memory.peak_reserved / GIB:.1f} vs {best.memory.peak_reserved / GIB:.1f} GiB"
        )
    parts = []
    for name, x, y in (
        ("compute", a.compute_s, b.compute_s),
        ("memory-bound work", a.memory_s, b.memory_s),
        ("pipeline bubble", a.bubble_s, b.bubble_s),
        ("TP communication", a.tp_s, b.tp_s),
        ("CP communication", a.cp_s, b.cp_s),
        ("PP communication", a.pp_s, b.pp_s),
        ("EP all-to-all", a.ep_s, b.ep_s),
        ("exposed data-parallel communication", a.exposed_dp_s, b.exposed_dp_s),
    ):
        if abs(x - y) >= 0.01 * max(a.step_s, 1e-9):
            parts.append(f"{name} {x:.2f} s -> {y:.2f} s")
    gain = b.tokens_per_s_per_gpu / a.tokens_per_s_per_gpu
    return (
        f"{gain:.2f}x the configured layout's tokens/s/GPU ({a.tokens_per_s_per_gpu:,.0f} -> "
        f"{b.tokens_per_s_per_gpu:,.0f}): step {a.step_s:.2f} s -> {b.step_s:.2f} s"
        + "".join(f"; {part}" for part in parts)
        + f"; memory {configured.memory.peak_reserved / GIB:.1f} -> {best.memory.peak_reserved / GIB:.1f} GiB"
    )


def format_search(
    res: SearchResult, cfg_name: str, gpu: GpuSpec, world: int, top: int, headroom_gib: float, margin: float = 0.05
) -> str:
    refused = sum(res.rejected.values())
    lines = [
        f"search: {cfg_name} on {world} x {gpu.name}, global batch {res.global_batch}, "
        f"{res.considered} layouts: {refused} refused by the trainer's checks, {res.too_big} predicted "
        f"not to fit, {len(res.ranked)} fit",
    ]
    for key, n in res.rejected.most_common(4):
        lines.append(f"  refused {n:6d}: {res.examples[key]}")
    lines += [
        "",
        "    #  layout                                                                  tok/s/GPU   MFU  step s comp s   mem bubble    TP    CP    EP  DP(exp) GiB",
    ]
    for i, c in enumerate(res.ranked[:top], 1):
        lines.append(_row(i, c))
    if res.configured is not None:
        rank = next((i for i, c in enumerate(res.ranked, 1) if c.layout == res.configured.layout), None)
        where = f"#{rank}" if rank else ("does not fit" if not res.configured.fits else "-")
        lines.append(_row(where, res.configured) + "  <- configured")
        if res.ranked:
            lines += ["", f"why #1: {explain(res.ranked[0], res.configured)}"]
    elif res.configured_error:
        lines += ["", f"the configured layout is refused: {res.configured_error}"]
    if res.ranked:
        lines += ["", "run #1 with: " + " ".join(res.ranked[0].layout.overrides())]
    lines.append(format_assumptions(gpu, headroom_gib, margin))
    return "\n".join(lines)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def plan_to_json(plan: Plan) -> str:
    return json.dumps(
        {
            "layout": _plain(plan.layout),
            "gpu": _plain(plan.gpu),
            "fits": plan.fits,
            "peak_reserved_bytes": plan.peak_reserved,
            "cost": _plain(plan.cost),
            "ranks": [
                {"rank": r.rank, "coords": r.coords, "stages": list(r.stages), "memory": _plain(r.memory),
                 "states": _plain(r.states)}
                for r in plan.ranks
            ],
            "warnings": plan.warnings,
        },
        indent=1,
    )
