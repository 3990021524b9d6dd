"""``scripts/plan.py``: the planner's command line.

Planner options are undotted (``--world_size 512``); everything dotted goes to the trainer's
``ConfigManager`` exactly as ``python -m torchtitan.train`` reads it (``--job.config_file``
and ``--section.key value`` overrides). Exit codes: 0 the layout fits (or the search found
layouts), 1 it does not fit (or nothing fits), 2 bad input or a layout the real run refuses
(one line naming the option, like the trainer).
"""

from __future__ import annotations

import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from torchtitan.config import ConfigError

__all__ = ["PlannerOptions", "parse", "main"]


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        frozen = tuple(default)
        return field(default_factory=lambda: list(frozen), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PlannerOptions:
    """What to plan for; machine figures default to the ``--gpu`` table entry."""

    world_size: int = _opt(0, "GPUs of the run (required)")
    gpu: str = _opt("H100", "GPU model of the planner's table: H100, H200, A100")
    search: bool = _opt(False, "search the legal layouts instead of checking the configured one")
    top: int = _opt(5, "layouts to list (and build with the dry run) in a search")
    verify: bool = _opt(True, "build the best layouts of a search with the dry run (--no-verify: skip)")
    global_batch: int = _opt(0, "search: samples per step to keep; 0 = the configured layout's")
    schedules: list[str] = _opt(["1F1B", "Interleaved1F1B"], "search: pipeline schedules to try")
    ac_modes: list[str] = _opt(
        ["none", "op_all", "op", "op_attn", "2", "full"], "search: AC modes (none, op_all, op, op_attn, N, full)"
    )
    max_local_batch: int = _opt(32, "search: largest local batch to try")
    headroom_gib: float = _opt(
        -1.0,
        "GiB per GPU outside the allocator; -1 = as the launch reckons it: 0.6 for the CUDA context "
        "(none under training.device_memory_limit_gib) + 1.4 for NCCL with more than one rank",
    )
    margin: float = _opt(0.05, "share of the rest kept free against the memory model's error (up to 7% low so far)")
    memory_gib: float = _opt(0.0, "override the GPU's memory (GiB); 0 = the table's")
    tflops: float = _opt(0.0, "override the dense bf16 peak (TFLOP/s); 0 = the table's")
    efficiency: float = _opt(0.0, "override the dense compute efficiency (compiled and eager); 0 = measured")
    attention_efficiency: float = _opt(0.0, "override the attention kernels' efficiency; 0 = measured")
    intra_node_gbps: float = _opt(0.0, "override NVLink GB/s per GPU and direction; 0 = the table's")
    inter_node_gbps: float = _opt(0.0, "override network GB/s per GPU and direction; 0 = the table's")
    gpus_per_node: int = _opt(0, "override GPUs per node; 0 = the table's")
    hbm_tbps: float = _opt(0.0, "override the device memory bandwidth (TB/s); 0 = the table's")
    host_memory_gib: float = _opt(
        0.0,
        "each training node's memory (GiB), of which activation_checkpoint.mode = auto may pin half, "
        "shared by the node's ranks, for offloaded activations; 0 = this machine's",
    )
    json: str = _opt("", "also write the dry run's report as JSON to this file")

    def validate(self) -> None:
        from torchtitan.planner.hardware import GPUS
        from torchtitan.planner.search import AC_CHOICES

        def fail(name: str, message: str) -> None:
            raise ConfigError(f"--{name} {getattr(self, name)!r}: {message}")

        if self.world_size < 1:
            fail("world_size", "give the number of GPUs, e.g. --world_size 8")
        if self.gpu.upper() not in GPUS:
            fail("gpu", f"choose one of {', '.join(GPUS)}")
        if self.top < 1:
            fail("top", "must be >= 1")
        if self.global_batch < 0:
            fail("global_batch", "must be >= 0 (0 = the configured one)")
        if self.max_local_batch < 1:
            fail("max_local_batch", "must be >= 1")
        if self.headroom_gib < 0 and self.headroom_gib != -1:
            fail("headroom_gib", "must be >= 0, or -1 for the launch's reckoning")
        if not 0 <= self.margin < 1:
            fail("margin", "must be in [0, 1), e.g. 0.05")
        if self.host_memory_gib < 0:
            fail("host_memory_gib", "must be >= 0 (0 = this machine's)")
        for name in ("memory_gib", "tflops", "intra_node_gbps", "inter_node_gbps", "hbm_tbps"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0 (0 = the table's value)")
        for name in ("efficiency", "attention_efficiency"):
            if not 0 <= getattr(self, name) <= 1:
                fail(name, "must be in [0, 1] (0 = the measured one)")
        if self.gpus_per_node < 0:
            fail("gpus_per_node", "must be >= 0 (0 = the table's value)")
        if not self.schedules:
            fail("schedules", "give at least one schedule, e.g. 1F1B")
        bad = [m for m in self.ac_modes if m not in AC_CHOICES and not (m.isdigit() and int(m) >= 1)]
        if bad or not self.ac_modes:
            fail("ac_modes", "entries are none, op_all, op, op_attn, full or a positive integer N (every N-th block)")

    def gpu_spec(self):
        from torchtitan.planner.hardware import get_gpu

        eff = self.efficiency or None
        return get_gpu(self.gpu).with_overrides(
            memory_gib=self.memory_gib or None,
            bf16_tflops=self.tflops or None,
            compute_efficiency_compiled=eff,
            compute_efficiency_eager=eff,
            attention_efficiency=self.attention_efficiency or None,
            intra_node_gbps=self.intra_node_gbps or None,
            inter_node_gbps=self.inter_node_gbps or None,
            gpus_per_node=self.gpus_per_node or None,
            hbm_tbps=self.hbm_tbps or None,
        )


def parse(argv: list[str]) -> tuple[PlannerOptions, list[str]]:
    """Split ``argv`` into planner options (undotted) and trainer arguments (the rest)."""
    opts = PlannerOptions()
    kinds = {f.name: f.type for f in fields(PlannerOptions)}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_value, value = token[2:].partition("=") if token.startswith("--") else ("", False, "")
        name = name.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in kinds
        key = name[3:] if negated else name
        if not token.startswith("--") or "." in name or key not in kinds:
            rest.append(token)
            i += 1
            continue
        kind = kinds[key]
        i += 1
        if kind in ("bool", bool):
            setattr(opts, key, not negated)
            continue
        if not has_value:
            if i >= len(argv):
                raise ConfigError(f"missing value after --{key}; give it as --{key} VALUE")
            value, i = argv[i], i + 1
        try:
            if kind in ("int", int):
                parsed: Any = int(value)
            elif kind in ("float", float):
                parsed = float(value)
            elif str(kind).startswith("list"):
                parsed = [v.strip() for v in value.split(",") if v.strip()]
            else:
                parsed = value
        except ValueError:
            raise ConfigError(f"--{key} {value}: expected {kind}") from None
        setattr(opts, key, parsed)
    opts.validate()
    return opts, rest


def format_help() -> str:
    lines = [
        "usage: python scripts/plan.py --world_size N [--gpu H100] [--search] [planner options]",
        "                              [--job.config_file FILE.toml] [--section.key VALUE ...]",
        "",
        "Builds the configured layout for N GPUs in this process (fake process group, meta model)",
        "and predicts each rank's memory and the step time; --search ranks the legal layouts.",
        "Trainer options are those of python -m torchtitan.train (see its --help).",
        "",
        "planner options:",
    ]
    for f in fields(PlannerOptions):
        flag = f"--{f.name}" + (f" / --no-{f.name}" if f.type in ("bool", bool) else " VALUE")
        default = f.default if f.default is not MISSING else ",".join(f.default_factory())  # type: ignore[misc]
        lines.append(f"  {flag:34s} {f.metadata['help']} (default: {default})")
    return "\n".join(lines)


def _fail(message: str) -> None:
    print(f"plan: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(format_help())
        return
    from torchtitan.config import ConfigManager

    try:
        opts, trainer_args = parse(argv)
        cfg = ConfigManager().parse_args(trainer_args)
        gpu = opts.gpu_spec()
    except ConfigError as e:
        _fail(str(e))
    from torchtitan.planner import report
    from torchtitan.planner.dry_run import dry_run
    from torchtitan.planner.hardware import GIB, headroom_gib
    from torchtitan.planner.memory_policy import host_budget_bytes, resolve_auto

    # the training nodes' host memory, shared by the ranks of a node (not this machine's ranks)
    host = host_budget_bytes(opts.host_memory_gib * GIB or None, min(opts.world_size, gpu.gpus_per_node))
    try:  # activation_checkpoint.mode = auto: plan the policy the launch would choose
        cfg, choice = resolve_auto(cfg, opts.world_size, gpu, host_budget=host)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _fail(str(e).splitlines()[0])
    if choice is not None:
        print(choice.line())
    limit = cfg.training.device_memory_limit_gib
    capped = limit > 0 and not opts.memory_gib
    if capped:  # the run's own cap, as the launch applies it
        gpu = gpu.with_overrides(memory_gib=min(limit, gpu.memory_gib))
    if opts.headroom_gib < 0:
        opts.headroom_gib = headroom_gib(opts.world_size, capped)
    name = f"{cfg.model.name} {cfg.model.flavor}"
    if not opts.search:
        t0 = time.perf_counter()
        try:
            plan = dry_run(cfg, opts.world_size, gpu, opts.headroom_gib, opts.margin)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            # what the real launch would print (torchtitan.train does the same)
            _fail(f"the run would stop with {type(e).__name__}: {str(e).splitlines()[0]}")
        print(report.format_plan(plan, name, time.perf_counter() - t0))
        if opts.json:
            with open(opts.json, "w") as f:
                f.write(report.plan_to_json(plan))
        sys.exit(0 if plan.fits else 1)

    from torchtitan.planner.search import SearchSpace, search, verify

    space = SearchSpace(
        schedules=tuple(opts.schedules),
        ac=tuple(opts.ac_modes),
        max_local_batch=opts.max_local_batch,
    )
    try:
        res = search(cfg, opts.world_size, gpu, global_batch=opts.global_batch, headroom_gib=opts.headroom_gib,
                     margin=opts.margin, space=space)
    except (ConfigError, ValueError) as e:
        _fail(str(e).splitlines()[0])
    refused = []
    if opts.verify and res.ranked:
        verify(cfg, res, gpu, opts.top, opts.headroom_gib, opts.margin)
        refused = [c for c in res.ranked if c.verified not in ("", "ok")]
        res.ranked = [c for c in res.ranked if c.verified in ("", "ok")]
    print(report.format_search(res, name, gpu, opts.world_size, opts.top, opts.headroom_gib, opts.margin))
    for c in refused:
        print(f"built and refused by the dry run: {c.layout.label()}: {c.verified}")
    sys.exit(0 if res.ranked else 1)

