"""``activation_checkpoint.mode = "auto"``: spend the device's spare memory on speed.

Before the trainer is built, every rank runs the same pure function of the config and the
GPU: the planner's memory model (every pipeline rank, the worst kept) and cost model score
each memory policy for the run's own layout, and the fastest predicted policy that fits
the budget wins. A policy is, per layer, one of

- no AC; per-op AC saving every matmul (``op_all``), every other one (``op``) or only
  attention's output (``op_attn``); full AC; full AC on every N-th block (``selective N``);
- per-op AC on the first layers and full AC, attention-only op AC or no AC on the later
  ones (``op_ac_layers`` + ``later_layers``), for each split point;

times the loss chunk size (none; one chunk of a microbatch's tokens; 32768 ... 1024 tokens,
halving, below them); then, fastest first, each policy
that does not fit with the fewest layers whose saved activations, in host memory, make it
fit (``activation_checkpoint.cpu_offload_layers``, spread over the model:
``activation_offload.offloaded_layers``; not under pipeline parallelism, and no more than
``HOST_SHARE`` of the machine's memory per local rank); and only when nothing else
fits, FSDP CPU offload of parameters, gradients and optimizer state. The budget is
(device memory - headroom) x (1 - margin). The device memory is
``training.device_memory_limit_gib`` when set, else the card's. The headroom is what lives
outside PyTorch's caching allocator: the CUDA context (``CONTEXT_GIB``; not under a
``device_memory_limit_gib`` cap, which limits the allocator itself and names the card's
*usable* memory, e.g. 79.1 GiB for an 80 GB H100) and, with more than one rank, NCCL's
buffers (``NCCL_GIB``). The margin is the memory model's stated error: ``MARGIN``, and
``TP_CP_MARGIN`` for TP and CP layouts, where the model is still up to 21% low
(docs/planning.md). Ties go to the policy listed first: fewer chunks, no offload.

The choice is written into the config (the dumped ``config.toml`` repeats the run exactly)
and logged in one line; ``prediction_gap`` compares it with what the run measured.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.activation_offload import layer_ranges, offloaded_layers
from torchtitan.planner.hardware import CONTEXT_GIB, GIB, NCCL_GIB, GpuSpec, headroom_gib
from torchtitan.planner.dry_run import TP_CP_MARGIN
from torchtitan.planner.layout import Layout
from torchtitan.planner.memory import OP_AC_SAVED_MATMULS
from torchtitan.planner.search import Candidate, check_legal, evaluate, model_geometry, tiny_model
from torchtitan.tools.logging import logger

__all__ = ["CONTEXT_GIB", "NCCL_GIB", "MARGIN", "headroom_gib", "margin_for", "Policy", "Choice", "candidate_policies", "choose", "resolve_auto",
           "resolve_for_launch", "prediction_gap", "log_prediction_gap"]

# Activation offload is scored (measured on the H200, 2026-12-02: 3B at 65k tokens, 21
# layers offloaded, 8,879 tokens/s, predicted within 2.5%); False keeps the chooser on the
# device, as before that measurement.
AUTO_OFFLOADS_ACTIVATIONS = True
HOST_SHARE = 0.5  # of this machine's memory, per local rank, that offloaded activations may pin
MARGIN = 0.05  # the memory model's stated accuracy (docs/planning.md)
LOSS_CHUNKS = (0, 32768, 16384, 8192, 4096, 2048, 1024)
_OP_NAMES = {"op_all": "op AC saving every matmul", "op": "op AC saving every other matmul",
             "op_attn": "op AC saving attention only"}


@dataclass(frozen=True)
class Policy:
    """How one run spends memory: AC per layer, loss chunks, CPU offload."""

    ac: str  # "none", "full", one of OP_AC_SAVED_MATMULS, or N (full AC on every N-th block)
    op_layers: int = -1  # with an op option: op AC on layers 0..op_layers-1 only; -1 = all
    later: str = "full"  # the later layers' AC: "full", "attention" or "none"
    loss_chunk: int = 0
    cpu_offload: bool = False
    offload_layers: int = 0  # activation offload of N blocks, spread (activation_offload.offloaded_layers)
    n_layers: int = dataclasses.field(default=0, compare=False)  # the model's, to name the offloaded ones

    def apply(self, cfg: JobConfig) -> JobConfig:
        """A copy of ``cfg`` running this policy (only the sections it changes are copied)."""
        out = copy.copy(cfg)
        out.training = t = copy.copy(cfg.training)
        out.activation_checkpoint = ac = copy.copy(cfg.activation_checkpoint)
        t.loss_chunk_size, t.enable_cpu_offload = self.loss_chunk, self.cpu_offload
        ac.op_ac_layers, ac.later_layers, ac.op_saved_matmuls = -1, "full", "every_other"
        ac.cpu_offload_layers = self.offload_layers
        if self.ac in ("none", "full"):
            ac.mode, ac.selective_ac_option = self.ac, "op"
        elif self.ac in OP_AC_SAVED_MATMULS:
            ac.mode, ac.selective_ac_option = "selective", "op"
            ac.op_saved_matmuls = OP_AC_SAVED_MATMULS[self.ac]
            ac.op_ac_layers, ac.later_layers = self.op_layers, self.later
        else:
            ac.mode, ac.selective_ac_option = "selective", self.ac
        return out

    def layout(self, lay: Layout) -> Layout:
        mode = self.ac if self.ac in ("none", "full") else "selective"
        return dataclasses.replace(lay, ac_mode=mode, ac_option="op" if mode != "selective" else self.ac)

    @property
    def _offloaded(self) -> str:
        n = self.n_layers or self.offload_layers
        return "layers " + layer_ranges(offloaded_layers(self.offload_layers, n))

    def label(self) -> str:
        if self.ac in ("none", "full"):
            text = "no AC" if self.ac == "none" else "full AC"
        elif self.ac in _OP_NAMES:
            text = _OP_NAMES[self.ac]
            if self.op_layers >= 0:
                later = {"full": "full AC", "attention": "op AC saving attention only", "none": "no AC"}[self.later]
                first = "layer 0" if self.op_layers == 1 else f"layers 0-{self.op_layers - 1}"
                text += f" on {first}, {later} on the others"
        else:
            text = f"full AC on every {self.ac}. block"
        if self.loss_chunk:
            text += f", loss chunks of {self.loss_chunk}"
        if self.offload_layers:
            text += f", saved activations of {self.offload_layers} layers in host memory ({self._offloaded})"
        if self.cpu_offload:
            text += ", FSDP CPU offload"
        return text


def loss_chunks(tokens: float) -> list[int]:
    """The loss chunk sizes worth scoring for ``tokens`` per forward: none, then of
    ``LOSS_CHUNKS`` those under ``tokens`` and the smallest one that is not (one chunk: the
    larger ones are the same)."""
    sizes = [c for c in LOSS_CHUNKS if c]
    one = [c for c in sizes if c >= tokens]
    return [0] + ([min(one)] if one else []) + [c for c in sizes if c < tokens]


def candidate_policies(n_layers: int, tokens: float = float("inf")) -> list[Policy]:
    """Every policy ``choose`` scores, in tie-break order (see the module docstring);
    ``tokens``: of one forward, which bounds the loss chunks (``loss_chunks``)."""
    ac: list[Policy] = [Policy("none"), Policy("op_all"), Policy("op"), Policy("op_attn"), Policy("full")]
    ac += [Policy(str(n)) for n in (2, 3, 4) if n <= n_layers]
    for op in ("op_all", "op", "op_attn"):
        for later in ("full", "attention", "none"):
            if op == "op_attn" and later == "attention":
                continue  # the same as op_attn everywhere
            ac += [Policy(op, k, later) for k in range(1, n_layers)]
    out = [dataclasses.replace(p, loss_chunk=c, n_layers=n_layers) for c in loss_chunks(tokens) for p in ac]
    return out + [dataclasses.replace(p, cpu_offload=True) for p in out]


@dataclass
class Choice:
    """The winning policy with its prediction, and how many were scored and fit."""

    policy: Policy
    candidate: Candidate
    budget_bytes: float
    scored: int
    fitting: int
    gpu: GpuSpec
    margin: float = MARGIN

    @property
    def predicted_tps(self) -> float:
        return self.candidate.cost.tokens_per_s_per_gpu

    @property
    def predicted_peak(self) -> int:
        return self.candidate.memory.peak_reserved

    def line(self) -> str:
        """The one log line: what was chosen and what it is predicted to do."""
        return (
            f"activation_checkpoint.mode = auto chose: {self.policy.label()} "
            f"(predicted {self.predicted_tps:,.0f} tokens/s per GPU, peak {self.predicted_peak / GIB:.1f} GiB "
            f"of a {self.budget_bytes / GIB:.1f} GiB budget on {self.gpu.name} with "
            f"{self.gpu.memory_gib:.1f} GiB; {self.fitting} of {self.scored} policies fit)"
        )


def margin_for(lay: Layout) -> float:
    return TP_CP_MARGIN if (lay.tp > 1 or lay.cp > 1) else MARGIN


def _budget(gpu: GpuSpec, headroom: float, margin: float) -> float:
    return (gpu.memory_gib - headroom) * GIB * (1 - margin)


def host_budget_bytes(total_bytes: float | None = None, local_ranks: int | None = None) -> float:
    """Host memory one rank's offloaded activations may take: ``HOST_SHARE`` of the
    machine's physical memory (``total_bytes``, this machine's by default) over the ranks on
    it (``local_ranks``, ``LOCAL_WORLD_SIZE`` by default)."""
    import os

    if total_bytes is None:
        total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return total_bytes * HOST_SHARE / max(local_ranks, 1)


def _fewest_offloaded(policy: Policy, n_layers: int, score) -> None:
    """Score ``policy`` with 1, 2, ... offloaded layers up to the first count that fits (the
    time only grows with the bytes copied) or outgrows the host."""
    for k in range(1, n_layers + 1):
        cand = score(dataclasses.replace(policy, offload_layers=k))
        if cand is None or cand.fits:
            return


def choose(
    cfg: JobConfig,
    world_size: int,
    gpu: GpuSpec,
    headroom: float | None = None,
    margin: float | None = None,
    capped: bool = False,
    host_budget: float | None = None,
) -> Choice:
    """The fastest predicted policy for ``cfg``'s layout that fits (see the module doc);
    ``capped``: ``gpu.memory_gib`` is an allocator cap; ``headroom`` (GiB) and ``margin``
    default to ``headroom_gib`` and ``margin_for``, ``host_budget`` (bytes of pinned host
    memory per rank) to ``host_budget_bytes()``. Raises ConfigError (one line) when the
    layout is illegal or no policy fits."""
    lay = Layout.from_config(Policy("none").apply(cfg), world_size)  # policies[0]'s
    policies = candidate_policies(model_geometry(cfg).n_layers, lay.forward_tokens)
    headroom = headroom_gib(world_size, capped) if headroom is None else headroom
    margin = margin_for(lay) if margin is None else margin
    g = model_geometry(cfg)
    tiny = tiny_model(cfg, g.vocab)
    legal: dict = {}  # (loss chunk, offload) -> stage layout, or the trainer's refusal
    best: tuple[Policy, Candidate] | None = None
    smallest: Candidate | None = None
    fitting = scored = 0
    host = host_budget_bytes() if host_budget is None else host_budget

    def score(policy: Policy) -> Candidate | None:
        """The policy's prediction (None when the trainer would refuse it or, offloading
        activations, it needs more pinned host memory than ``host``); keeps the tallies."""
        nonlocal best, smallest, fitting, scored
        scored += 1
        pcfg, play = policy.apply(cfg), policy.layout(lay)
        key = (policy.loss_chunk, policy.cpu_offload)  # what the trainer's checks can refuse
        if key not in legal:
            try:
                legal[key] = check_legal(pcfg, play, tiny)[1]
            except (ConfigError, ValueError) as e:
                if key == (0, False):
                    raise  # the configured layout itself is refused: the build would say so
                legal[key] = e  # e.g. loss chunks under TP (loss parallel)
        stages = legal[key]
        if isinstance(stages, Exception):
            return None
        cand = evaluate(pcfg, play, stages, g, gpu, headroom, margin)
        if policy.offload_layers and cand.memory.host > host:
            return None  # pinned host memory is this machine's too
        if smallest is None or cand.memory.peak_reserved < smallest.memory.peak_reserved:
            smallest = cand
        if cand.fits:
            fitting += 1
            if best is None or cand.cost.tokens_per_s_per_gpu > best[1].cost.tokens_per_s_per_gpu:
                best = (policy, cand)
        return cand

    too_big: dict[Policy, Candidate] = {}  # on-device policies that do not fit
    for policy in policies:
        if not policy.cpu_offload and (cand := score(policy)) is not None and not cand.fits:
            too_big[policy] = cand
    # (not under PP: with several microbatches in flight the previous block forward is not
    # always the next backward, which the prefetch and the memory model assume)
    if AUTO_OFFLOADS_ACTIVATIONS and lay.pp == 1:
        budget = _budget(gpu, headroom, margin)
        movable = [p for p, c in too_big.items() if c.memory.peak_reserved - budget <= min(c.memory.activations, host)]
        for policy in sorted(movable, key=lambda p: -too_big[p].cost.tokens_per_s_per_gpu):  # stable
            if best is not None and too_big[policy].cost.tokens_per_s_per_gpu <= best[1].cost.tokens_per_s_per_gpu:
                break  # offload only adds time: neither this one nor a slower one can win
            _fewest_offloaded(policy, g.n_layers, score)
    if best is None:  # FSDP offload only when nothing else fits
        for policy in policies:
            if policy.cpu_offload:
                score(policy)
    budget = _budget(gpu, headroom, margin)
    if best is None:
        need = smallest.memory.peak_reserved / GIB if smallest is not None else float("nan")
        raise ConfigError(
            f"activation_checkpoint.mode = auto: no memory policy fits {gpu.memory_gib:.1f} GiB "
            f"(budget {budget / GIB:.1f} GiB; the smallest of {scored} policies needs ~{need:.1f} GiB): lower "
            "training.local_batch_size or training.seq_len, or spread the model over more GPUs "
            "(scripts/plan.py --search ranks layouts)"
        )
    return Choice(best[0], best[1], budget, scored, fitting, gpu, margin)


def resolve_auto(
    cfg: JobConfig, world_size: int, gpu: GpuSpec, host_budget: float | None = None
) -> tuple[JobConfig, Choice | None]:
    """``cfg`` with ``mode = "auto"`` replaced by the chosen policy (the same config when
    another mode is set), and the choice. ``gpu`` is the launch's card; its memory is
    capped by ``training.device_memory_limit_gib`` when that is set. ``host_budget``: as
    for ``choose``."""
    if cfg.activation_checkpoint.mode != "auto":
        return cfg, None
    limit = cfg.training.device_memory_limit_gib
    if limit > 0:
        gpu = gpu.with_overrides(memory_gib=min(limit, gpu.memory_gib))
    choice = choose(cfg, world_size, gpu, capped=limit > 0, host_budget=host_budget)
    return choice.policy.apply(cfg), choice


def prediction_gap(
    choice: Choice, measured_tps: float, measured_peak_bytes: float, measured_active_bytes: float = 0.0
) -> tuple[str, bool]:
    """The end-of-run line comparing the choice's prediction with the measured mean
    tokens/s and reserved peak, and whether memory exceeded the prediction by more than
    the margin (the model was wrong in the direction that can run out of memory). The
    allocated peak beside it, when given, tells the model's error from the allocator's
    cached-but-free blocks (which a capped device fills up to its cap)."""
    tps_gap = measured_tps / choice.predicted_tps - 1 if choice.predicted_tps > 0 else 0.0
    line = (
        f"auto memory policy ({choice.policy.label()}): predicted {choice.predicted_tps:,.0f} tokens/s "
        f"and {choice.predicted_peak / GIB:.1f} GiB, measured {measured_tps:,.0f} tokens/s ({tps_gap:+.1%})"
    )
    if measured_peak_bytes <= 0:  # no device allocator was asked (a CPU run)
        return line + " (no device memory measured)", False
    mem_gap = measured_peak_bytes / choice.predicted_peak - 1
    over = mem_gap > choice.margin
    line += f" and {measured_peak_bytes / GIB:.1f} GiB ({mem_gap:+.1%})"
    predicted_active = choice.candidate.memory.peak_active
    if measured_active_bytes > 0 and predicted_active > 0:
        line += (f"; allocated at most {measured_active_bytes / GIB:.1f} GiB "
                 f"(predicted {predicted_active / GIB:.1f}, {measured_active_bytes / predicted_active - 1:+.1%})")
    if over:
        line += f": memory exceeded the prediction by more than the {choice.margin:.0%} margin"
    return line, over


def resolve_for_launch(cfg: JobConfig, world_size: int, rank: int = 0) -> tuple[JobConfig, Choice | None]:
    """``resolve_auto`` for the card this process runs on (the planner's table entry for it,
    an H100 where there is none, e.g. on a CPU: the log line says so); rank 0 logs the choice."""
    if cfg.activation_checkpoint.mode != "auto":
        return cfg, None
    from torchtitan.planner.preflight import launch_gpu

    gpu, note = launch_gpu()
    out, choice = resolve_auto(cfg, world_size, gpu)
    if rank == 0 and choice is not None:
        logger.info(choice.line() + (f"; note: {note}" if note else ""))
    return out, choice


def log_prediction_gap(choice: Choice, metrics) -> bool:
    """Log ``prediction_gap`` for a finished run's ``MetricsProcessor``; a warning when the
    memory exceeded the prediction by more than the margin. Returns that verdict."""
    gib, _ = metrics.peak_reserved
    active = metrics.peak_active
    if metrics.device.type != "cuda":  # the host's memory is not what the model predicts
        gib = active = 0.0
    line, over = prediction_gap(choice, metrics.mean_tokens_per_s(), gib * GIB, active * GIB)
    (logger.warning if over else logger.info)(line)
    return over
