"""The benchmark harness (torchtitan.benchmarking, scripts/benchmark.py) and the JSONL metrics sink it reads.

The sweep files are parsed by the trainer's own config parser; --dry prints the exact
commands; figures are medians after warm-up from the records MetricsProcessor writes; a
failed run is a row, not a crash; one real CPU run of the smoke sweep ties it together.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

import torchtitan.benchmarking as bm
from torchtitan.benchmarking import cli
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import ConfigError, ConfigManager

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]

STANDARD = REPO / "train_configs" / "benchmarks" / "standard.toml"
SMOKE = REPO / "train_configs" / "benchmarks" / "cpu_smoke.toml"
_WINDOW_KEYS = {"step", "time", "device", "window_s", "window_tokens"}


def _toml_overrides(path: Path, name: str) -> list[str]:
    """An entry's overrides as the file spells them ([defaults] first), read independently."""
    data = tomllib.loads(path.read_text())
    entry = next(t for t in data["benchmark"] if t["name"] == name)
    items = data.get("defaults", {}).get("overrides", []) + entry.get("overrides", [])
    return [tok for item in items for tok in shlex.split(item)]


# ---- sweep files -----------------------------------------------------------------------------


def test_standard_suite_parses_into_the_five_configurations():
    from torchtitan.models import get_model_args

    entries = {e.name: e for e in bm.load_sweep(STANDARD)}
    assert list(entries) == ["A", "B", "C", "D", "E"]
    assert [e.ngpu for e in entries.values()] == [2, 2, 2, 2, 1]
    for e in entries.values():
        j = e.job
        assert (j.training.seq_len, j.training.mixed_precision_param, j.training.mixed_precision_reduce) == (
            8192, "bfloat16", "float32")
        assert j.optimizer.name == "AdamW" and j.training.steps == e.steps
        assert Path(e.config_file).name == "debug_model.toml"
        get_model_args(j.model.name, j.model.flavor)  # the flavor exists
        assert bm.parallel_layout(j, e.world) == (("single device" if e.ngpu == 1 else "FSDP 2"), None)
        assert [s for s in bm.logged_steps(e.steps, e.log_freq) if s > e.warmup_steps], e.name
    a, b, c, d, e = (entries[n].job for n in "ABCDE")
    assert (a.model.flavor, a.training.local_batch_size, a.activation_checkpoint.mode,
            a.activation_checkpoint.selective_ac_option, a.compile.enable) == (
        "3B", 2, "selective", "op", False)
    assert b.compile.enable and b.model.flavor == "3B" and b.model.converters == []
    assert c.compile.enable and c.model.converters == ["float8"]
    assert c.float8.enable_fsdp_float8_all_gather and c.float8.precompute_float8_dynamic_scale_for_fsdp
    assert (d.model.flavor, d.training.local_batch_size, d.activation_checkpoint.mode, d.compile.enable) == (
        "8B", 1, "full", True)
    # E: the suite leaves its AC free; on one 80 GB GPU none fits (74.5 GiB), the cheapest.
    assert (e.model.flavor, e.training.local_batch_size, e.activation_checkpoint.mode,
            e.compile.enable) == ("1B", 4, "none", True)

    # Where memory allows, op AC saves every matmul output (A frees the logits for it).
    assert [j.activation_checkpoint.op_saved_matmuls for j in (a, b, c)] == ["all"] * 3
    assert a.training.loss_chunk_size > 0


def test_ac_ablation_is_the_suite_before_saving_every_matmul():
    """train_configs/benchmarks/ac_ablation.toml must differ from A, B and E only in what
    docs/performance.md says it does."""
    suite = {e.name: e.job for e in bm.load_sweep(STANDARD)}
    before = {e.name: e.job for e in bm.load_sweep(STANDARD.parent / "ac_ablation.toml")}
    assert list(before) == ["A0", "B0", "E0"]
    for name, job in before.items():
        after = suite[name[0]]
        assert job.activation_checkpoint.op_saved_matmuls == "every_other"
        assert job.training.loss_chunk_size == 0
        assert job.activation_checkpoint.mode == "selective"
        # after: A and B save every matmul; E has no AC at all since 2026-12-01 (session 6)
        job.activation_checkpoint = after.activation_checkpoint
        job.training.loss_chunk_size = after.training.loss_chunk_size
        assert job == after, name


DEFAULTS = """[defaults]
config_file = "train_configs/debug_model.toml"
steps = 6
log_freq = 2
warmup_steps = 2
"""


def _one(*lines: str, name: str = 'name = "x"', ngpu: str = "ngpu = 1") -> str:
    """A sweep with [defaults] and one entry made of these lines."""
    return DEFAULTS + "\n".join(["[[benchmark]]", name, ngpu, *lines]) + "\n"


BAD_SWEEPS = [
    (_one("stepz = 3"), "entry 'x': unknown key 'stepz'; did you mean 'steps'?"),
    (_one(ngpu=""), "entry 'x': missing ngpu; set it in the entry or in [defaults]"),
    ('[[benchmark]]\nname = "x"\nngpu = 1\nsteps = 6\nlog_freq = 2\nwarmup_steps = 2\n',
     "missing config_file"),
    (_one(name=""), "entry #1: missing name"),
    (_one(ngpu='ngpu = "2"'), "'ngpu' must be an integer"),
    (_one(ngpu="ngpu = 0"), "'ngpu' = 0 must be >= 1"),
    (_one('overrides = "--compile.enable"'), "'overrides' must be a list of strings"),
    (_one() + _one()[len(DEFAULTS):], "the name is used twice"),
    (_one(name='name = "a/b"'), "name must be letters, digits"),
    (DEFAULTS + "[benchmarks]\n", "unknown top-level key 'benchmarks'"),
    (DEFAULTS, "no entries; add at least one [[benchmark]] table"),
    (_one().replace("steps = 6", "stepz = 6"), "[defaults]: unknown key 'stepz'"),
    (_one('overrides = ["--training.steps 9"]'),
     "overrides set --training.steps, which the harness sets; use the entry's steps key"),
    (_one('overrides = ["--metrics.no-rank_0_only"]'), "overrides set --metrics.rank_0_only"),
    (_one('overrides = ["--model.flavr 3B"]'),
     "entry 'x': unknown option --model.flavr; did you mean --model.flavor?"),
    (_one("overrides = [\"--training.seq_len '8\"]"), "overrides: No closing quotation"),
    (_one('config_file = "nope.toml"'), "config file"),
    (_one("warmup_steps = 6"), "no logged window ends after warmup_steps = 6"),
    (_one('overrides = ["--parallelism.tensor_parallel_degree 4"]', ngpu="ngpu = 2"),
     "does not divide ngpu x nnodes = 2"),
    (DEFAULTS + "[[benchmark\n", "invalid TOML"),
]


@pytest.mark.parametrize("sweep", sorted(p.name for p in STANDARD.parent.glob("*.toml")))
def test_every_bundled_sweep_file_is_valid(sweep):
    """Each entry's options parse and its degrees fit its GPUs (checked before any launch)."""
    entries = bm.load_sweep(STANDARD.parent / sweep)
    assert entries and len({e.name for e in entries}) == len(entries)


@pytest.mark.parametrize("text, fragment", BAD_SWEEPS)
def test_sweep_validation_errors_name_file_entry_and_fix(tmp_path, capsys, text, fragment):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(bm.SweepError) as err:
        bm.load_sweep(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message
    assert bm.main([str(path), "--dry"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"benchmark: error: {message}\n"


def test_cli_errors_exit_2(capsys):
    assert bm.main([str(SMOKE), "--only", "one,nine", "--dry"]) == 2
    assert "--only: no entry named nine; the sweep has one, fsdp2" in capsys.readouterr().err
    assert bm.main([str(SMOKE), "--extra", "--training.stepz 3", "--dry"]) == 2
    assert "did you mean --training.steps?" in capsys.readouterr().err
    assert bm.main([str(SMOKE.with_name("missing.toml")), "--dry"]) == 2
    assert "cannot read the sweep file" in capsys.readouterr().err


# ---- --dry -----------------------------------------------------------------------------------


def _dry_commands(out: str) -> dict[str, list[str]]:
    lines = [l for l in out.splitlines() if l and not l.startswith("#")]
    names = [l[2:].split(":")[0].split(" ")[0] for l in out.splitlines() if l.startswith("# ") and "(" in l]
    assert len(lines) == len(names)
    return {n: shlex.split(l) for n, l in zip(names, lines)}


def test_dry_prints_the_exact_run_train_commands_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    root = tmp_path / "root"
    extra = "--training.seed 7 --comm.init_timeout_seconds 60"
    assert bm.main([str(SMOKE), "--dry", "--dump_root", str(root), "--extra", extra]) == 0
    commands = _dry_commands(capsys.readouterr().out)
    assert list(commands) == ["one", "fsdp2"]
    for name, ngpu in (("one", 1), ("fsdp2", 2)):
        tokens = commands[name]
        at = tokens.index("./run_train.sh")
        assert tokens[:at] == [
            f"NGPU={ngpu}", "CONFIG_FILE=train_configs/debug_model.toml", "LOG_RANK=0", "MAX_RESTARTS=0"]
        args = tokens[at + 1:]
        overrides = _toml_overrides(SMOKE, name)
        assert args[: len(overrides)] == overrides
        rest = args[len(overrides):]
        assert rest == [
            "--training.steps", "6", "--metrics.log_freq", "2", "--job.dump_folder", str(root / name),
            "--metrics.enable_jsonl", "--metrics.no-rank_0_only", "--metrics.no-enable_color_printing",
            "--training.seed", "7", "--comm.init_timeout_seconds", "60",
        ]
        # the printed trainer arguments are a valid config for the trainer
        base = str(REPO / "train_configs/debug_model.toml")
        cfg = ConfigManager().parse_args(["--job.config_file", base, *args])
        assert cfg.metrics.enable_jsonl and not cfg.metrics.rank_0_only and cfg.training.seed == 7
    assert not root.exists()


def test_dry_under_slurm_builds_srun_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(cli, "slurm_hosts", lambda: ["node7", "node8"])
    assert bm.main([str(STANDARD), "--dry", "--only", "C,E", "--srun_args", "--gpus-per-node 2"]) == 0
    commands = _dry_commands(capsys.readouterr().out)
    assert list(commands) == ["C", "E"]
    for name, ngpu in (("C", 2), ("E", 1)):
        tokens = commands[name]
        assert tokens[:3] == ["PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "NCCL_NVLS_ENABLE=0",
                              "TORCH_NCCL_ASYNC_ERROR_HANDLING=3"]
        at = tokens.index("torchrun")
        assert tokens[3:at] == ["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--nodelist=node7",
                                "--gpus-per-node", "2"]
        launcher = tokens[at: tokens.index("-m")]
        assert launcher == [
            "torchrun", "--nnodes", "1", "--nproc_per_node", str(ngpu), "--rdzv_id", f"4242_{name}",
                            "--rdzv_backend", "c10d", "--rdzv_endpoint", "node7:29500", "--max-restarts", "0",
                            "--local-ranks-filter", "0", "--role", "rank", "--tee", "3"]
        m = tokens.index("-m")
        assert tokens[m: m + 4] == [
            "-m", "torchtitan.train", "--job.config_file", "train_configs/debug_model.toml"]
        overrides = _toml_overrides(STANDARD, name)
        assert tokens[m + 4: m + 4 + len(overrides)] == overrides
    assert "--model.converters" in commands["C"] and "--float8.enable_fsdp_float8_all_gather" in commands["C"]


def test_two_node_entry_needs_slurm(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / "sweep.toml"
    path.write_text(_one("nnodes = 2", name='name = "big"', ngpu="ngpu = 2"))
    assert bm.main([str(path), "--dry"]) == 2
    assert "nnodes = 2: use --launcher srun" in capsys.readouterr().err
    monkeypatch.setattr(cli, "slurm_hosts", lambda: ["a", "b", "c"])
    assert bm.main([str(path), "--dry", "--launcher", "srun"]) == 0
    tokens = _dry_commands(capsys.readouterr().out)["big"]
    assert "--nodelist=a,b" in tokens and tokens[tokens.index("--nnodes") + 1] == "2"
    assert tokens[tokens.index("--rdzv_endpoint") + 1] == "a:29500"


# ---- the JSONL sink --------------------------------------------------------------------------


def test_jsonl_sink_writes_what_metrics_processor_computes(tmp_path, monkeypatch):
    clock = iter([100.0, 102.0, 106.0])  # first window start, then log times (each starts the next window)
    monkeypatch.setattr("torchtitan.components.metrics.time.perf_counter", lambda: next(clock))
    path = tmp_path / "metrics_jsonl" / "rank_0.jsonl"
    m = MetricsProcessor(device=torch.device("cpu"), log_freq=5, flops_per_token=1_000_000,
                         peak_flops=1e12, jsonl_path=str(path))
    returned = []
    for step, tokens, loss in ((1, 4000, 3.5), (5, 6000, float("nan"))):
        m.add_tokens(tokens)
        m.add_data_loading_time(0.25)
        returned.append(m.log(step, loss=loss, grad_norm=0.5, lr=1e-3))
    m.close()

    def strict(text):  # NaN / Infinity are not JSON
        raise AssertionError(f"non-standard JSON constant {text}")

    lines = path.read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert [r["step"] for r in records] == [1, 5]
    assert [r["window_tokens"] for r in records] == [4000, 6000]
    assert [r["window_s"] for r in records] == [2.0, 4.0]
    assert all(r["device"] == "cpu" and abs(r["time"] - time.time()) < 60 for r in records)
    for record, metrics in zip(records, returned):
        written = {k: v for k, v in record.items() if k not in _WINDOW_KEYS}
        assert written.keys() == metrics.keys()
        for k, v in metrics.items():
            assert written[k] == (None if math.isnan(v) else v), k  # floats round-trip exactly
    assert records[1]["throughput(tps)"] == 6000 / 4.0 and records[1]["loss_metrics/global_avg_loss"] is None

    # A resumed run appends to the same file; the reader keeps a re-logged step's last record.
    monkeypatch.setattr("torchtitan.components.metrics.time.perf_counter", lambda: 0.0)
    again = MetricsProcessor(device=torch.device("cpu"), log_freq=5, flops_per_token=1, peak_flops=None,
                             jsonl_path=str(path))
    again.add_tokens(7)
    again.log(5, loss=2.0, grad_norm=0.1, lr=1e-4)
    again.close()
    assert path.read_text().splitlines()[:2] == lines
    assert [r["loss_metrics/global_avg_loss"] for r in bm.read_jsonl(path)] == [3.5, 2.0]


def test_jsonl_options_validate():
    cfg = ConfigManager().parse_args(["--metrics.enable_jsonl"])
    assert cfg.metrics.enable_jsonl and cfg.metrics.save_jsonl_folder == "metrics_jsonl"
    assert not ConfigManager().parse_args([]).metrics.enable_jsonl
    with pytest.raises(ConfigError, match=r"^metrics.save_jsonl_folder = '': must not be empty$"):
        ConfigManager().parse_args(["--metrics.save_jsonl_folder", ""])


# ---- figures ---------------------------------------------------------------------------------


def _record(step, tps, mem, *, tflops_per_tps=1e-3, peak=None, device="NVIDIA H100 80GB HBM3"):
    r = {"step": step, "time": 0.0, "device": device, "window_s": 1.0, "window_tokens": int(tps),
         "throughput(tps)": tps, "tflops": tps * tflops_per_tps,
         "memory/max_reserved(GiB)": mem, "memory/max_reserved(%)": 100 * mem / 80}
    if peak:
        r["mfu(%)"] = 100 * r["tflops"] / peak
    return r


def _write(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_median_after_warmup_and_peak_memory_over_all_ranks(tmp_path):
    d = tmp_path / "metrics_jsonl"
    rank0 = [_record(1, 50.0, 30.0, peak=1000), _record(5, 900.0, 40.0, peak=1000),
             _record(10, 1000.0, 41.0, peak=1000), _record(15, 3000.0, 41.5, peak=1000),
             _record(20, 1100.0, 41.5, peak=1000),
             _record(15, 1200.0, 41.0, peak=1000)]  # step 15 logged again (a rerun appended): the last wins
    _write(d / "rank_0.jsonl", rank0)
    # rank 1's peak comes in a warm-up window: it still counts
    _write(d / "rank_1.jsonl", [_record(1, 60.0, 62.5), _record(10, 1.0, 44.0)])
    f = bm.summarize(d, warmup_steps=5)
    assert f.windows == 3 and f.ranks == 2
    assert f.tps == 1100.0  # median of 1000, 1200, 1100 (the mean over all windows would differ)
    assert f.tflops == pytest.approx(1.1) and f.mfu == pytest.approx(0.11)
    assert f.peak_tflops == pytest.approx(1000)
    assert (f.mem_gib, f.mem_pct) == (62.5, pytest.approx(78.125))
    assert f.card == "NVIDIA H100 80GB HBM3"
    with pytest.raises(ValueError, match="no logged window after warm-up step 20"):
        bm.summarize(d, warmup_steps=20)
    with pytest.raises(ValueError, match="rank_0.jsonl is missing"):
        bm.summarize(tmp_path, warmup_steps=0)


def test_last_error_line_prefers_the_worker_error_over_torchrun_summary():
    log = (
        "[rank0]: Traceback (most recent call last):\n"
        "[rank0]:   File \"train.py\", line 3\n"
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.66 GiB\n"
        "E1130 worker failed\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "  exitcode  : 1 (pid: 77)\n"
    )
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.66 GiB"
    assert bm.last_error_line(log) == oom
    coloured = "x\n[rank0]: \x1b[31mValueError: bad shape\x1b[39m\ndone\n"
    assert bm.last_error_line(coloured) == "ValueError: bad shape"
    assert bm.last_error_line("torchtitan: error: unknown model.flavor '9B'\nChildFailedError:\n") == (
        "torchtitan: error: unknown model.flavor '9B'")
    assert bm.last_error_line("just a line\n") == "just a line"


OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_failed_runs_are_rows_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    """Entry 'one' runs out of memory, 'fsdp2' writes metrics: exit 1, both rows present."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    fake = {
        "one": _python(f"import sys; print('[rank0]: {OOM}'); print('ChildFailedError:'); sys.exit(1)"),
    }

    def fake_launch(entry, launcher, dump_folder, extra, hosts, srun_args):
        assert launcher == "torchrun" and dump_folder == str(tmp_path / entry.name)
        if entry.name in fake:
            return bm.Launch({}, fake[entry.name])
        # the "run" appends its records to each rank's file, as the trainer does
        records = [_record(s, 100.0 * s, 0.5 + s / 100, device="cpu") for s in (1, 2, 4, 6)]
        text = "".join(json.dumps(r) + "\n" for r in records)
        target = Path(dump_folder) / entry.job.metrics.save_jsonl_folder
        code = (f"import pathlib; p = pathlib.Path({str(target)!r}); p.mkdir(parents=True, exist_ok=True)\n"
                f"for r in range({entry.world}): open(p / f'rank_{{r}}.jsonl', 'a').write({text!r})")
        return bm.Launch({}, _python(code))

    monkeypatch.setattr(cli, "build_launch", fake_launch)
    # a stale record from an earlier run into the same folder must not count
    _write(tmp_path / "fsdp2" / "metrics_jsonl" / "rank_0.jsonl", [_record(5, 1e9, 1.0)])
    out_md = tmp_path / "table.md"
    assert bm.main([str(SMOKE), "--dump_root", str(tmp_path), "--output", str(out_md)]) == 1
    table = capsys.readouterr().out
    assert out_md.read_text() == table and (tmp_path / "results.md").read_text() == table
    rows = {r[0].split(":")[0]: r for r in _table_rows(table)}
    assert rows["one"][7] == f"out of memory: {OOM}"
    assert rows["one"][3:7] == ["", "", "", ""]
    assert rows["fsdp2"][1:4] == ["2 × CPU", "FSDP 2", "500"]  # median of 400, 600
    assert rows["fsdp2"][6] == "0.6 (1%)" and rows["fsdp2"][7] == "ok (2 windows)"
    assert OOM in (tmp_path / "one" / "benchmark.log").read_text()


def test_timeout_stops_the_run(tmp_path):
    entry = bm.load_sweep(SMOKE)[0]
    start = time.perf_counter()
    row = bm.run_entry(entry, bm.Launch({}, _python("import time; time.sleep(60)")), tmp_path, 1.0, False)
    assert time.perf_counter() - start < 30
    assert row.status.startswith("timed out after 1 s") and not row.ok


def _table_rows(table: str) -> list[list[str]]:
    lines = [l for l in table.splitlines() if l.startswith("| ")][1:]  # without the header
    return [[c.strip() for c in l.strip("|").split(" | ")] for l in lines]


# ---- one real run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cpu_smoke_sweep_end_to_end(tmp_path, capsys, monkeypatch):
    """The debug model on one CPU process through run_train.sh: the row is the JSONL's median."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out_md = tmp_path / "results.md"
    assert bm.main([str(SMOKE), "--only", "one", "--dump_root", str(tmp_path), "--output", str(out_md),
                    "--timeout", "300"]) == 0, (tmp_path / "one" / "benchmark.log").read_text()[-3000:]
    (row,) = _table_rows(capsys.readouterr().out)
    assert row[0] == "one: debug model, one CPU process" and row[1:3] == ["1 × CPU", "single device"]

    jsonl = tmp_path / "one" / "metrics_jsonl" / "rank_0.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]  # step 1 and every log_freq = 2
    # tokens this rank really processed: local batch 2 x seq 128 per step, 2 steps per window
    assert [r["window_tokens"] for r in records] == [256, 256, 512, 512]
    kept = [r for r in records if r["step"] > 2]
    tps = statistics.median(r["throughput(tps)"] for r in kept)
    assert tps > 0 and row[3] == f"{tps:,.0f}"
    assert row[5] == "n/a"  # no MFU on a CPU without metrics.peak_tflops
    gib = max(r["memory/max_reserved(GiB)"] for r in records)
    pct = max(r["memory/max_reserved(%)"] for r in records)
    assert row[6] == f"{gib:.1f} ({pct:.0f}%)"
    assert row[7] == "ok (2 windows)"
    dumped = ConfigManager().parse_args(["--job.config_file", str(tmp_path / "one" / "config.toml")])
    assert dumped.metrics.enable_jsonl and dumped.training.steps == 6


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_rows_name_the_card_report_mfu_and_memory_of_every_rank(tmp_path, capsys, monkeypatch):
    """On CUDA: the card and MFU come from the run's own records; memory is the max over ranks."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    name, world = ("fsdp2", 2) if torch.cuda.device_count() >= 2 else ("one", 1)
    assert bm.main([str(SMOKE), "--only", name, "--dump_root", str(tmp_path), "--timeout", "600"]) == 0, (
        (tmp_path / name / "benchmark.log").read_text()[-3000:])
    (row,) = _table_rows(capsys.readouterr().out)
    assert row[1] == f"{world} × {torch.cuda.get_device_name(0)}"
    folder = tmp_path / name / "metrics_jsonl"
    per_rank = [bm.read_jsonl(folder / f"rank_{r}.jsonl") for r in range(world)]
    kept = [r for r in per_rank[0] if r["step"] > 2]
    assert row[3] == f"{statistics.median(r['throughput(tps)'] for r in kept):,.0f}"
    mfu = statistics.median(r["mfu(%)"] for r in kept)
    assert row[5] == f"{mfu:.1f}%" and mfu > 0
    peak = max(r["memory/max_reserved(GiB)"] for recs in per_rank for r in recs)
    assert row[6].startswith(f"{peak:.1f} (") and peak > 0
