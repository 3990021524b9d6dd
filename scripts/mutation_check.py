"""Plant realistic faults one at a time and check that the tests meant to catch each do.

    python scripts/mutation_check.py                 # every mutation (~30-60 min on 2 cores)
    python scripts/mutation_check.py --only NAME     # one (repeatable)
    python scripts/mutation_check.py --list

For each mutation: copy the committed tree (``git archive HEAD``; ``--worktree`` copies
the working tree instead, uncommitted edits included) to a temporary folder, replace one exact snippet of library code there (the real tree is never
touched; a snippet that is no longer found is an error, so the list stays honest as the code
changes), run only the tests listed for it with the copy first on ``PYTHONPATH`` and as the
working directory, and read pytest's JUnit report:

- caught: some listed test failed on an ``AssertionError`` (a parity mismatch, a
  structural check);
- crash only: tests failed or errored, but none on an assertion (the fault made the code
  raise; a real regression of that kind would be noticed, but not diagnosed);
- missed: every listed test passed;
- stale: the snippet is no longer in the code (update the mutation);
- needs GPU: the faulty path runs only on CUDA/NCCL and no GPU is here (not run).

Exits non-zero if any mutation was missed or crashed only. Not part of the default suite:
it reruns multi-rank launches once per mutation. docs/testing.md records its last result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA = "tests/distributed/test_llama_parity.py"
PIPE = "tests/distributed/test_pipeline.py"
CP = "tests/distributed/test_context_parallel.py"
MOE = "tests/distributed/test_moe_parity.py"


class StaleSnippet(Exception):
    """The code changed under a mutation: its snippet must be updated."""


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str
    needs_gpu: bool = False  # the faulty path runs only on CUDA/NCCL


MUTATIONS = [
    Mutation(
        "fsdp_reduce_dtype_from_param",
        "torchtitan/distributed/fsdp.py",
        "reduce_dtype=TORCH_DTYPE_MAP[t.mixed_precision_reduce],",
        "reduce_dtype=TORCH_DTYPE_MAP[t.mixed_precision_param],",
        (f"{LLAMA}::test_bf16_mixed_precision",),
        "FSDP reduces gradients in the parameter dtype (bf16) instead of the configured fp32",
    ),
    Mutation(
        "loss_mean_per_sequence",
        "torchtitan/components/loss.py",
        "return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))",
        'return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum") / labels.shape[0]',
        ("tests/unit/test_loss.py", f"{LLAMA}::test_two_rank_layout_matches_single_process"),
        "the loss summed per sequence and averaged over sequences instead of over tokens",
    ),
    Mutation(
        "ffn_norm_without_sequence_parallel",
        "torchtitan/distributed/tensor_parallel.py",
        '            "ffn_norm": SequenceParallel(),\n',
        "",
        (f"{LLAMA}::test_two_rank_layout_matches_single_process",),
        "TP plan leaves the FFN norm out of sequence parallel (its weight gradient not reduced over tp)",
    ),
    Mutation(
        "cp_rotary_table_not_sharded",
        "torchtitan/distributed/context_parallel.py",
        "buffers = [inputs, labels, *freqs]\n            seq_dims = [1, 1] + [0] * len(freqs)",
        "buffers = [inputs, labels]\n            seq_dims = [1, 1]",
        (f"{CP}::test_matches_single_process",),
        "the rotary table is not sharded with the sequence under CP",
    ),
    Mutation(
        "cp_labels_not_load_balanced",
        "torchtitan/distributed/context_parallel.py",
        "buffers = [inputs, labels, *freqs]\n            seq_dims = [1, 1] + [0] * len(freqs)",
        "labels.data = labels.tensor_split(cp_mesh.size(), 1)[cp_mesh.get_local_rank()].contiguous()\n"
        "            buffers = [inputs, *freqs]\n            seq_dims = [1] + [0] * len(freqs)",
        (f"{CP}::test_matches_single_process",),
        "CP labels cut into contiguous pieces, not head-tail reordered like the inputs",
    ),
    Mutation(
        "ep_divide_factor_only_on_gloo",
        "torchtitan/distributed/fsdp.py",
        "        experts.set_gradient_divide_factor(gradient_divide_factor)\n"
        "        gloo = any(torch.distributed.get_backend(g) == \"gloo\" for g in experts_mesh.get_all_groups())\n",
        "        gloo = any(torch.distributed.get_backend(g) == \"gloo\" for g in experts_mesh.get_all_groups())\n"
        "        if gloo:\n            experts.set_gradient_divide_factor(gradient_divide_factor)\n",
        ("tests/gpu/test_moe_ep_gpu.py",),
        "on NCCL the experts' gradients are averaged over their FSDP group, not every data rank "
        "(gloo has no PREMUL_SUM: only a GPU run can see this path)",
        needs_gpu=True,
    ),
    Mutation(
        "grad_accumulation_not_divided",
        "torchtitan/trainer.py",
        "loss = self.loss_fn(pred, labels) / self.grad_accumulation_steps",
        "loss = self.loss_fn(pred, labels)",
        ("tests/unit/test_trainer.py::test_gradient_accumulation_matches_one_big_batch",),
        "the loss is not divided by the gradient-accumulation steps",
    ),
    Mutation(
        "pp_loss_not_divided_by_microbatches",
        "torchtitan/distributed/pipeline.py",
        "return loss_fn(pred, labels) / n_microbatches",
        "return loss_fn(pred, labels)",
        (f"{PIPE}::test_every_schedule_on_two_ranks_matches_single_process",),
        "the pipeline's microbatch loss is not divided by the number of microbatches",
    ),
    Mutation(
        "v_schedule_stage_placement",
        "torchtitan/distributed/pipeline.py",
        "return (pp_rank, 2 * pp - 1 - pp_rank)",
        "return (pp_rank, pp_rank + pp)",
        (
            "tests/unit/test_pipeline_split.py",
            f"{PIPE}::test_rank_zero_holds_the_stages_its_schedule_expects",
            f"{PIPE}::test_every_schedule_on_two_ranks_matches_single_process",
        ),
        "V schedules (ZBV, DualPipeV) get the looped stage placement",
    ),
    Mutation(
        "grad_norm_allreduce_skipped",
        "torchtitan/distributed/utils.py",
        "            dist.all_reduce(part, op=op, group=mesh.get_group(dim))\n",
        "",
        (f"{LLAMA}::test_two_rank_layout_matches_single_process",),
        "clip_grad_norm_ skips the all-reduce of the sharded gradients' partial norms",
    ),
    Mutation(
        "checkpoint_without_dataloader",
        "torchtitan/trainer.py",
        '                "dataloader": self.dataloader,\n',
        "",
        ("tests/unit/test_checkpoint.py::test_trainer_resume_is_bit_exact_in_every_async_mode",),
        "the data loader's position is not saved in checkpoints",
    ),
    Mutation(
        "checkpoint_without_lr_scheduler",
        "torchtitan/trainer.py",
        '                "lr_scheduler": self.lr_schedulers,\n',
        "",
        ("tests/unit/test_checkpoint.py::test_trainer_resume_is_bit_exact_in_every_async_mode",),
        "the lr scheduler's state is not saved in checkpoints",
    ),
    Mutation(
        "overlapping_dp_shards",
        "torchtitan/components/data/loader.py",
        "owned = tuple(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))",
        "owned = tuple(range(per_rank))",
        (
            "tests/unit/test_data.py::test_dp_ranks_get_disjoint_data_covering_everything",
            "tests/distributed/test_trainer_layouts.py::test_two_rank_layout_matches_one_process",
        ),
        "every data-parallel rank reads the first shards (the rank offset dropped)",
    ),
    Mutation(
        "moe_topk_weights_not_renormalised",
        "torchtitan/models/common/moe.py",
        "top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)",
        "top_weights = top_weights",
        ("tests/unit/test_moe.py",),
        "the router's top-k weights are not renormalised with route_norm",
    ),
    Mutation(
        "expert_bias_update_skipped",
        "torchtitan/models/common/moe_balance.py",
        "                update_expert_bias(moe, load)\n",
        "",
        ("tests/unit/test_moe.py",),
        "the step hook no longer updates the expert bias",
    ),
    Mutation(
        "ep_combine_uses_dispatch_splits",
        "torchtitan/distributed/expert_parallel.py",
        "return all_to_all_single_autograd(out[inverse], input_splits, output_splits, self.group)",
        "return all_to_all_single_autograd(out[inverse], output_splits, input_splits, self.group)",
        (f"{MOE}::test_ep_dispatch_combine_round_trip",),
        "the EP combine all-to-all uses the dispatch's split sizes",
    ),
    Mutation(
        "chunked_loss_ignores_upstream_gradient",
        "torchtitan/components/chunked_loss.py",
        "None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),",
        "None if grad_h is None else grad_h,",
        ("tests/unit/test_chunked_loss.py",),
        "the loss chunks' hidden-state gradient is not scaled by the incoming gradient (the 1 / tokens mean)",
    ),
    Mutation(
        "later_layers_none_still_checkpointed",
        "torchtitan/distributed/activation_checkpoint.py",
        '        elif op_level and later_layers == "none":\n            continue\n',
        "",
        ("tests/unit/test_memory_policy.py::test_spare_memory_after_op_ac_goes_to_layers_without_ac",),
        'layers after op_ac_layers with later_layers = "none" are still checkpointed (fully)',
    ),
    Mutation(
        "offload_loses_strides",
        "torchtitan/distributed/activation_offload.py",
        "p.fetched = torch.empty_strided(p.host.size(), p.stride, dtype=p.host.dtype).copy_(p.host)",
        "p.fetched = p.host.contiguous()",
        ("tests/unit/test_activation_offload.py::test_saved_tensors_come_back_with_their_strides",),
        "offloaded activations come back contiguous, not in the layout they were saved in",
    ),
    Mutation(
        "offload_waits_for_no_copy",
        "torchtitan/distributed/activation_offload.py",
        "if group.copied is not None and group.tick <= self._tick - 2:",
        "if group.copied is not None and group.tick <= self._tick - 99:",
        ("tests/unit/test_activation_offload.py::test_the_host_waits_for_the_copies_of_all_offloaded_blocks_but_the_last",),
        "the host never waits for the activation copies (it runs ahead and the device holds them all)",
    ),
    Mutation(
        "offload_pool_never_reuses",
        "torchtitan/distributed/activation_offload.py",
        "        self.free.setdefault(buf.numel(), []).append(buf)",
        "        pass",
        ("tests/unit/test_activation_offload.py::test_host_buffers_are_exact_and_reused_from_step_to_step",),
        "the pinned host buffers are never reused: every step pins as much again",
    ),
    Mutation(
        "chunked_loss_ignored_tokens_get_gradient",
        "torchtitan/components/chunked_loss.py",
        "    grad = (torch.exp(lf - lse) - onehot.float()) * valid",
        "    grad = torch.exp(lf - lse) - onehot.float()",
        ("tests/unit/test_chunked_loss.py",),
        "tokens whose label is ignore_index still send a gradient through the loss chunks",
    ),
    Mutation(
        "chunked_loss_block_not_written_back",
        "torchtitan/components/chunked_loss.py",
        "    logits.copy_(grad)",
        "    pass",
        ("tests/unit/test_chunked_loss.py",),
        "the loss chunks leave the logits where their gradient should be written",
    ),
    Mutation(
        "fused_clip_coefficient_dropped",
        "torchtitan/trainer.py",
        "grad_scale = clip_coef.reciprocal() if max_norm > 0 else None",
        "grad_scale = None",
        ("tests/unit/test_trainer.py::test_clipping_folded_into_the_fused_optimizer_equals_scaling_the_gradients",),
        "with a fused optimizer the gradients are never clipped",
    ),
    Mutation(
        "auto_takes_a_policy_that_does_not_fit",
        "torchtitan/planner/memory_policy.py",
        "        if cand.fits:\n            fitting += 1",
        "        if True:\n            fitting += 1",
        ("tests/unit/test_memory_policy.py",),
        "activation_checkpoint.mode = auto takes the fastest policy whether or not it fits",
    ),
    Mutation(
        "auto_takes_the_slowest_policy",
        "torchtitan/planner/memory_policy.py",
        "if best is None or cand.cost.tokens_per_s_per_gpu > best[1].cost.tokens_per_s_per_gpu:",
        "if best is None or cand.cost.tokens_per_s_per_gpu < best[1].cost.tokens_per_s_per_gpu:",
        ("tests/unit/test_memory_policy.py",),
        "activation_checkpoint.mode = auto takes the slowest policy that fits",
    ),
    Mutation(
        "loss_chunk_memory_without_logits",
        "torchtitan/planner/memory.py",
        "loss = chunk * vocab * a + temps + acc + head",
        "loss = temps + acc + head",
        ("tests/unit/test_memory_policy.py",),
        "the memory model leaves a loss chunk's logits out",
    ),
    Mutation(
        "offload_working_blocks_not_counted",
        "torchtitan/planner/memory.py",
        "        per_stage.append(sum(kept) + (2 * max(moved) if moved else 0.0))",
        "        per_stage.append(sum(kept))",
        ("tests/unit/test_memory_policy.py", "tests/unit/test_activation_offload.py"),
        "the memory model counts nothing on the device for offloaded blocks (the two being copied)",
    ),
    Mutation(
        "offload_traffic_not_charged",
        "torchtitan/planner/cost.py",
        "    nbytes += OFFLOAD_BYTE_COST * offload_bytes * forwards",
        "    nbytes += 0",
        ("tests/unit/test_memory_policy.py", "tests/unit/test_activation_offload.py"),
        "the cost model charges activation offload no device-memory traffic",
    ),
    Mutation(
        "early_optimizer_state_keeps_its_step",
        "torchtitan/components/optimizer.py",
        "                    if isinstance(value, torch.Tensor):\n                        value.zero_()",
        "                    if isinstance(value, torch.Tensor):\n                        pass",
        ("tests/unit/test_optimizer.py",),
        "the moments created before the first step keep the zero step's count and decay",
    ),
    Mutation(
        "early_optimizer_state_steps_at_the_real_lr",
        "torchtitan/components/optimizer.py",
        'g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0',
        'g["lr"] = g["lr"]',
        ("tests/unit/test_optimizer.py",),
        "creating the moments before the first step updates the weights (weight decay at the real lr)",
    ),
    Mutation(
        "dtensor_caches_outlive_their_world",
        "torchtitan/distributed/utils.py",
        "        dist.destroy_process_group()\n    _clear_dtensor_caches()",
        "        dist.destroy_process_group()",
        ("tests/unit/test_planner.py::test_a_trainer_builds_after_a_dry_run_in_the_same_process",),
        "a destroyed world's meshes stay in DTensor's sharding caches",
    ),
    Mutation(
        "moe_group_limit_ignored",
        "torchtitan/models/common/moe.py",
        "                choice = self._limit_to_groups(choice)",
        "                choice = choice",
        ("tests/unit/test_moe.py", "tests/unit/test_deepseek_v3_model.py"),
        "DeepSeek-V3's group-limited routing chooses among all experts",
    ),
    Mutation(
        "yarn_softmax_scale_dropped",
        "torchtitan/models/deepseek_v3/args.py",
        "            scale *= yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim) ** 2",
        "            scale *= 1.0",
        ("tests/unit/test_deepseek_v3_model.py",),
        "latent attention's softmax scale without YaRN's temperature",
    ),
    Mutation(
        "latent_attention_memory_without_latents",
        "torchtitan/planner/memory.py",
        "    latents = latent_out + 4 + composite * kvl + a * kvl",
        "    latents = 0.0",
        ("tests/unit/test_planner_moe.py",),
        "the memory model leaves latent attention's kv latent and its norm out",
    ),
    Mutation(
        "preemption_exit_code_lost",
        "torchtitan/train.py",
        "        print(f\"torchtitan: error: {error}\", file=sys.stderr)\n    return exit_code",
        "        print(f\"torchtitan: error: {error}\", file=sys.stderr)\n    return 0",
        ("tests/distributed/test_resilience.py",),
        "a launched trainer exits 0 after a preemption checkpoint or a non-finite stop",
    ),
]


def copy_tree(dest: Path, worktree: bool) -> None:
    """HEAD's files, or the working tree as it is (tracked and untracked, not ignored)."""
    if not worktree:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def plant(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise StaleSnippet(f"the snippet occurs {count} times in {m.file} (expected once); update it")
    path.write_text(text.replace(m.old, m.new))


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports_copy(tree: Path) -> None:
    """The project is installed editable from the real tree: the copy must win."""
    out = subprocess.run(
        [sys.executable, "-c", "import torchtitan; print(torchtitan.__file__)"],
        cwd=tree, env=_env(tree), check=True, capture_output=True, text=True,
    ).stdout.strip()
    if not out.startswith(str(tree)):
        raise SystemExit(f"the copy imports torchtitan from {out}, not from {tree}")


def classify(junit: Path) -> tuple[str, list[str]]:
    """('caught' | 'crash only' | 'missed' | 'no tests', the failing tests with their types)."""
    if not junit.exists():
        return "crash only", ["pytest wrote no report"]
    failing, assertion, ran = [], False, 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        ran += 1
        for tag in ("failure", "error"):
            for node in case.findall(tag):
                message = (node.get("message") or "").strip()
                first = message.splitlines()[0][:120] if message else ""
                failing.append(f"{case.get('name')}: {tag}: {first}")
                # pytest writes the exception into the message ("AssertionError: ...",
                # "assert x < y", "harness.LayoutCrashed: ..."); an error is a setup crash
                assertion |= tag == "failure" and (
                    first.startswith(("assert ", "AssertionError")) or "AssertionError" in (node.get("type") or "")
                )
    if ran == 0:
        return "no tests", []
    if assertion:
        return "caught", failing
    return ("crash only" if failing else "missed"), failing


def run_one(m: Mutation | None, tests: tuple[str, ...], args: argparse.Namespace) -> tuple[str, list[str], float]:
    """Plant ``m`` (None: nothing, the baseline) in a fresh copy and run ``tests`` there."""
    tree = Path(tempfile.mkdtemp(prefix=f"mut-{m.name if m else 'baseline'}-"))
    started = time.monotonic()
    try:
        copy_tree(tree, args.worktree)
        if m is not None:
            try:
                plant(tree, m)
            except StaleSnippet as e:
                return "stale", [str(e)], time.monotonic() - started
        check_imports_copy(tree)
        junit = tree / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
        # its own session, so that a timeout ends the ranks too (they are not its children)
        proc = subprocess.Popen(cmd, cwd=tree, env=_env(tree), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "crash only", [f"timed out after {args.timeout:.0f}s"], time.monotonic() - started
        verdict, failing = classify(junit)
        return verdict, failing, time.monotonic() - started
    finally:
        if not args.keep:
            shutil.rmtree(tree, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutation's test run")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies (/tmp/mut-*)")
    parser.add_argument("--worktree", action="store_true", help="copy the working tree, not HEAD")
    parser.add_argument("--baseline", action="store_true", help="first run every listed test unmutated")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        parser.error(f"unknown mutation in {args.only}; see --list")
    if args.list:  # and whether each snippet still matches HEAD
        for m in chosen:
            head = subprocess.run(["git", "show", f"HEAD:{m.file}"], cwd=REPO, capture_output=True, text=True).stdout
            state = "" if head.count(m.old) == 1 else "  [STALE: snippet not found once in HEAD]"
            print(f"{m.name}: {m.what}{state}\n    {m.file}\n    " + "\n    ".join(m.tests))
        return 0
    rows = []
    if args.baseline:
        tests = tuple(dict.fromkeys(t for m in chosen if not m.needs_gpu for t in m.tests))
        verdict, failing, seconds = run_one(None, tests, args)
        print(f"{'baseline (nothing planted)':40s} {'passes' if verdict == 'missed' else 'FAILS'} {seconds:6.0f} s")
        for line in failing:
            print(f"    {line}", flush=True)
        if verdict != "missed":
            return 2
    import torch  # only to know whether the GPU-only mutations can run

    for m in chosen:
        if m.needs_gpu and not torch.cuda.is_available():
            rows.append((m.name, "needs GPU", 0.0, []))
            print(f"{m.name:40s} needs GPU (tests: {', '.join(m.tests)})", flush=True)
            continue
        verdict, failing, seconds = run_one(m, m.tests, args)
        rows.append((m.name, verdict, seconds, failing))
        print(f"{m.name:40s} {verdict:11s} {seconds:6.0f} s", flush=True)
        for line in failing[:4]:
            print(f"    {line}", flush=True)
    print("\n| mutation | result | seconds | caught by (first) |\n|---|---|---|---|")
    for name, verdict, seconds, failing in rows:
        caught_by = [f for f in failing if ": failure: assert" in f or ": failure: AssertionError" in f]
        first = (caught_by or failing or [""])[0].split(":")[0]
        print(f"| {name} | {verdict} | {seconds:.0f} | {first} |")
    return 0 if all(v in ("caught", "needs GPU") for _, v, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
