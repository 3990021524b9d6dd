"""TorchTitan v0.2.x users' files run unchanged: its sections and keys (aliases, nested
tables, refusals with a reason), the hints for unknown keys, a user module extending the
config, unusable files (one line, exit 2), the debug file training on the CPU and the
8B / 70B / 405B files planning at 8 / 64 / 128 ranks (docs/config.md has the key table)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchtitan.config import ConfigError, ConfigManager

REPO = Path(__file__).resolve().parents[2]
STYLE = REPO / "tests" / "assets" / "torchtitan_style"


def parse(*argv: str):
    return ConfigManager().parse_args(list(argv))


def parse_toml(tmp_path, text: str, *argv: str):
    path = tmp_path / "job.toml"
    path.write_text(textwrap.dedent(text))
    return parse("--job.config_file", str(path), *argv)


def error_of(tmp_path, text: str, *argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_toml(tmp_path, text, *argv) if text else parse(*argv)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["debug_model", "llama3_8b", "llama3_70b", "llama3_405b", "deepseek_v3_16b", "all_keys"])
def test_every_torchtitan_style_file_parses(name):
    cfg = parse("--job.config_file", str(STYLE / f"{name}.toml"))
    assert cfg.model.tokenizer_path == cfg.model.hf_assets_path  # the folder is the tokenizer
    if name == "llama3_405b":
        assert cfg.model.converters == ["float8"]  # "quantize.linear.float8"
        assert cfg.float8.enable_fsdp_float8_all_gather and cfg.float8.precompute_float8_dynamic_scale_for_fsdp


def test_all_keys_mean_what_they_mean_in_torchtitan():
    cfg = parse("--job.config_file", str(STYLE / "all_keys.toml"))
    t, p = cfg.training, cfg.parallelism
    assert (t.dataloader_num_workers, t.dataloader_persistent_workers, t.dataloader_prefetch_factor) == (2, True, 2)
    assert (t.seed, t.deterministic, t.deterministic_warn_only) == (7, True, True)  # [debug]
    assert p.pipeline_parallel_split_points == ["layers.2"]  # module_fqns_per_model_part
    assert p.context_parallel_load_balance is True  # "headtail"
    assert cfg.metrics.rank_0_only is True  # save_for_all_ranks = false
    assert cfg.float8.recipe_name == "tensorwise" and cfg.float8.filter_fqns == ["output"]
    assert cfg.checkpoint.initial_load_model_weights_only is True
    assert cfg.job.save_config_file == "job_config.json"


def test_nested_sections_and_torchtitan_names_on_the_command_line():
    cfg = parse(
        "--quantize.linear.float8.recipe_name", "rowwise",
        "--quantize.linear.float8.no-emulate",
        "--quantize.linear.float8.filter_fqns", "output,attention.wq",
        "--training.dataloader.num_workers", "1",
        "--training.dataloader.pin_memory",
        "--debug.seed", "3",
        "--metrics.save_for_all_ranks",
        "--parallelism.context_parallel_load_balancer", "none",
        "--model.converters", "quantize.linear.float8",
        "--experimental.custom_args_module", "",
    )  # fmt: skip
    assert cfg.float8.recipe_name == "rowwise" and cfg.float8.emulate is False
    assert cfg.float8.filter_fqns == ["output", "attention.wq"]
    assert cfg.training.dataloader_num_workers == 1 and cfg.training.dataloader_pin_memory
    assert cfg.training.seed == 3 and cfg.metrics.rank_0_only is False
    assert cfg.parallelism.context_parallel_load_balance is False and cfg.model.converters == ["float8"]


def test_flight_recorder_folder_and_prefix(tmp_path):
    cfg = parse_toml(tmp_path, '[comm]\nsave_traces_folder = "traces"\nsave_traces_file_prefix = "fr_"\n')
    assert (cfg.comm.save_traces_folder, cfg.comm.save_traces_file_prefix) == ("traces", "fr_")


def test_hf_assets_path_sets_the_tokenizer_unless_tokenizer_path_is_given(tmp_path):
    text = '[model]\nhf_assets_path = "./assets/hf/Llama-3.1-8B"\n'
    assert parse_toml(tmp_path, text).model.tokenizer_path == "./assets/hf/Llama-3.1-8B"
    cfg = parse_toml(tmp_path, text, "--model.tokenizer_path", "tok.model")
    assert cfg.model.tokenizer_path == "tok.model"


def test_two_names_of_one_option_must_agree(tmp_path):
    message = error_of(tmp_path, "[training]\nseed = 1\n[debug]\nseed = 2\n")
    assert "training.seed" in message and "debug.seed" in message and "disagree" in message
    assert parse_toml(tmp_path, "[training]\nseed = 5\n[debug]\nseed = 5\n").training.seed == 5


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[fault_tolerance]\nenable = true\n", "fault_tolerance.enable = true: torchft fault tolerance is not built here"),
        ('[fault_tolerance]\nsemi_sync_method = "diloco"\n', "torchft"),
        ('[training]\ndtype = "bfloat16"\n', "pure bfloat16 training"),
        ("[training]\ngc_debug = true\n", "not built here"),
        ('[activation_checkpoint]\nmode = "memory_budget"\n', "memory-budget partitioner is not built here"),
        ("[activation_checkpoint]\nmemory_budget = 0.3\n", "memory_budget = 0.3: memory-budget"),
        ("[debug]\nmoe_force_load_balance = true\n", "no forced round-robin mode"),
        ('[parallelism]\ncontext_parallel_load_balancer = "ptrr"\n', "PTRR load balancing"),
        ("[parallelism]\nexpert_tensor_parallel_degree = 2\n", "expert tensor parallelism is not built here"),
        ('[parallelism]\nexpert_parallel_comm_backend = "deepep"\n', "DeepEP"),
        ('[model]\nconverters = ["quantize.linear.mx"]\n', "MX (mxfp8) training is not built here"),
        ('[model]\nconverters = ["quantize.grouped_mm.float8"]\n', "grouped GEMMs"),
        ('[quantize.grouped_mm.float8]\nfqns = ["experts"]\n', "grouped GEMMs for MoE experts"),
        ('[float8]\nmoe_fqns = ["experts"]\n', "grouped GEMMs for MoE experts"),
        ('[quantize.linear.mx]\nrecipe_name = "mxfp8_cutlass"\n', "MX (mxfp8)"),
        ('[comm]\nmode = "local_tensor"\n', "LocalTensor simulation is not built here"),
        ('[comm]\nsave_traces_file_prefix = "a/b"\n', "without '/'"),
        ("[optimizer]\nearly_step_in_backward = true\n", "not built here"),
        ("[lr_scheduler]\ntotal_steps = 100\n", "training.steps"),
        ('[parallelism]\npipeline_parallel_split_points = ["layers.3"]\npipeline_parallel_first_stage_less_layers = 2\n',
         "weights the automatic stage split only"),
        ('[parallelism]\nmodule_fqns_per_model_part = [["tok_embeddings"], ["layers.0", "norm", "output"]]\n',
         "part 0 holds no layer"),
        ('[parallelism]\nmodule_fqns_per_model_part = [["tok_embeddings", "layers.0"], ["layers.2", "output"]]\n',
         "does not start right after"),
        ("[training.dataloader]\npersistent_workers = true\n", "needs training.dataloader_num_workers > 0"),
    ],
)  # fmt: skip
def test_features_not_built_here_are_refused_with_the_reason(tmp_path, text, fragment):
    message = error_of(tmp_path, text)
    assert fragment in message, message


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--parallelism.expert_paralel_degree", "2"], "--parallelism.expert_parallel_degree"),
        (["--compile.enabled"], "--compile.enable"),
        (["--training.sequence_len", "5"], "--training.seq_len"),
        (["--quantize.linear.float8.recipe", "x"], "--quantize.linear.float8.recipe_name"),
        (["--training.dataloader.workers", "2"], "--training.dataloader.num_workers"),
        (["--model.hf_asset_path", "x"], "--model.hf_assets_path"),
        (["--checkpoint.enable_first_step_checkpoints"], "--checkpoint.enable_first_step_checkpoint"),
        (["--activation_checkpoint.memory_budge", "0.5"], "--activation_checkpoint.memory_budget"),
    ],
)
def test_hints_name_the_right_key(argv, hint):
    with pytest.raises(ConfigError) as info:
        parse(*argv)
    assert str(info.value).endswith(f"did you mean {hint}?"), str(info.value)


def test_an_unknown_section_gets_no_misleading_hint():
    with pytest.raises(ConfigError) as info:
        parse("--nosuchsection.enable")
    assert "unknown section 'nosuchsection'" in str(info.value) and "did you mean" not in str(info.value)


def test_a_user_module_extends_the_config(tmp_path, monkeypatch):
    """job.custom_config_module (or TorchTitan's older experimental.custom_args_module): a
    JobConfig dataclass adding a section and a field to an existing one, set from the file
    and the command line, checked like every option."""
    (tmp_path / "my_titan_ext.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass, field

        @dataclass
        class Custom:
            how_many: int = 3
            name: str = "x"

        @dataclass
        class Training:
            extra_flag: bool = False

        @dataclass
        class JobConfig:
            custom: Custom = field(default_factory=Custom)
            training: Training = field(default_factory=Training)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    for key in ("[job]\ncustom_config_module", "[experimental]\ncustom_args_module"):
        text = f'{key} = "my_titan_ext"\n[custom]\nhow_many = 5\n[training]\nextra_flag = true\nsteps = 4\n'
        cfg = parse_toml(tmp_path, text, "--custom.name", "y")
        assert (cfg.custom.how_many, cfg.custom.name) == (5, "y")
        assert cfg.training.extra_flag is True and cfg.training.steps == 4 and cfg.training.seq_len == 2048
    assert "--custom.how_many many: expected int" in error_of(
        tmp_path, "", "--job.custom_config_module", "my_titan_ext", "--custom.how_many", "many"
    )
    assert "custom.how_many = 'x': expected int" in error_of(
        tmp_path, '[job]\ncustom_config_module = "my_titan_ext"\n[custom]\nhow_many = "x"\n'
    )
    assert "cannot import it" in error_of(tmp_path, "", "--job.custom_config_module", "no_such_module_xyz")
    assert "did you mean --custom.how_many" in error_of(
        tmp_path, "", "--job.custom_config_module", "my_titan_ext", "--custom.how_manny", "1"
    )


def _train_cli(*args: str, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchtitan.train", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_unusable_files_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[job]\ndescription = "caf\xe9"\n')
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing but a comment\n")
    cases = {
        str(bad): "is not UTF-8 text (byte 0xe9",
        str(tmp_path): "is a directory",
        "/dev/null": "is not a regular file",
        str(empty): "is empty (no [section])",
    }
    for path, fragment in cases.items():
        out = _train_cli("--job.config_file", path)
        assert out.returncode == 2, (path, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out.stderr, (path, out.stderr)


def test_the_debug_file_trains_on_the_cpu_unchanged(tmp_path):
    """The TorchTitan-style debug file (its [debug], [quantize.linear.float8] and
    model.hf_assets_path included), only made small from the command line."""
    out = _train_cli(
        "--job.config_file", str(STYLE / "debug_model.toml"),
        "--job.dump_folder", str(tmp_path),
        "--job.save_config_file", "saved/config.json",
        "--training.steps", "2", "--training.local_batch_size", "2", "--training.seq_len", "128",
        "--training.mixed_precision_param", "float32",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "[2/2 100%, eta 0:00:00]" in log and "training done: 2 steps" in log
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model"]["tokenizer_path"] == "./tests/assets/tokenizer" and saved["training"]["seed"] == 42


@pytest.mark.parametrize(
    "name, world_size", [("llama3_8b", 8), ("llama3_70b", 64), ("llama3_405b", 128), ("deepseek_v3_16b", 8)]
)
def test_the_big_files_plan_unchanged(name, world_size, capsys):
    """DRY_RUN=1 ./run_train.sh is scripts/plan.py --world_size NGPU: the files' tokenizer
    folders are not here, so the plan warns and uses the flavors' vocabulary."""
    from torchtitan.planner.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--world_size", str(world_size), "--job.config_file", str(STYLE / f"{name}.toml")])
    out = capsys.readouterr()
    assert info.value.code in (0, 1), out.err  # fits / does not fit; 2 would be a refused config
    assert "does not exist here" in out.out + out.err


def test_comm_mode_fake_backend_plans_instead_of_training(tmp_path):
    env = {**__import__("os").environ, "WORLD_SIZE": "2"}
    out = _train_cli(
        "--job.config_file", str(STYLE / "debug_model.toml"), "--job.dump_folder", str(tmp_path),
        "--comm.mode", "fake_backend", "--training.seq_len", "256", env=env,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-2000:]
    assert "step" in out.stdout and "training done" not in out.stdout + out.stderr
    assert not (tmp_path / "config.toml").exists()  # nothing was trained


def test_no_silent_toy_tokenizer(tmp_path):
    """An 8B flavor on the default (2,256-token test) tokenizer, and a preset whose tokenizer
    folder was never fetched: each stops with one line naming the folder and the download."""
    out = _train_cli("--job.dump_folder", str(tmp_path), "--model.flavor", "8B", "--training.dataset", "c4_test")
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "128,256-token vocabulary" in line and "--local_dir ./assets/hf/Llama-3.1-8B" in line, line
    out = _train_cli("--job.config_file", str(STYLE / "llama3_8b.toml"), "--job.dump_folder", str(tmp_path))
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "tokenizer folder ./assets/hf/Llama-3.1-8B not found" in line, line
    assert "--repo_id meta-llama/Llama-3.1-8B --local_dir ./assets/hf/Llama-3.1-8B" in line, line


def test_first_step_checkpoint_and_load_only(tmp_path):
    """checkpoint.enable_first_step_checkpoint saves after step 1 too; checkpoint.load_only
    loads that checkpoint and never saves."""
    from small_trainer import small_trainer_config
    from torchtitan.trainer import Trainer

    common = ("--training.seq_len", "32", "--training.local_batch_size", "2", "--activation_checkpoint.mode", "none",
              "--checkpoint.enable", "--checkpoint.interval", "100", "--metrics.log_freq", "100")  # fmt: skip
    cfg = small_trainer_config(tmp_path, *common, "--training.steps", "2", "--checkpoint.enable_first_step_checkpoint")
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]
    cfg = small_trainer_config(tmp_path, *common, "--training.steps", "3", "--checkpoint.load_only")
    trainer = Trainer(cfg)
    try:
        trainer.train()
        assert trainer.step == 3  # resumed from step 2, ran one more step
    finally:
        trainer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]


def test_older_torchtitan_names_still_load(tmp_path):
    """Names from TorchTitan before v0.2 (validation.enabled, [float8], enable_checkpoint,
    batch_size, converters as a string) load as their current equivalents."""
    cfg = parse_toml(
        tmp_path,
        """
        [validation]
        enabled = true
        [float8]
        filter_fqns = "output"
        [checkpoint]
        enable_checkpoint = true
        [training]
        batch_size = 2
        [model]
        converters = "float8"
        """,
    )
    assert cfg.validation.enable and cfg.checkpoint.enable and cfg.training.local_batch_size == 2
    assert cfg.model.converters == ["float8"] and cfg.float8.filter_fqns == ["output"]


def test_download_script_fetches_a_hugging_face_assets_folder(tmp_path, monkeypatch):
    """scripts/download_tokenizer.py (the Hub faked): the tokenizer files of the repository
    land in assets/hf/<name>-style folders, missing optional ones are skipped, and a
    repository with no tokenizer at all is an error."""
    import huggingface_hub

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import download_tokenizer
    finally:
        sys.path.pop(0)
    errors = download_tokenizer._hub_errors()
    hub = {"org/Llama-X": {"tokenizer.json", "tokenizer_config.json", "original/tokenizer.model", "config.json"},
           "org/Qwen-X": {"tokenizer.json", "tokenizer_config.json"}, "org/NoTok": {"config.json"}}  # fmt: skip

    def fake_download(repo_id, filename, local_dir, token=None):
        if filename not in hub[repo_id]:
            raise errors.EntryNotFoundError(f"{filename} not found")
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = download_tokenizer.download("org/Llama-X", str(tmp_path / "llama"), None)
    assert {Path(p).relative_to(tmp_path / "llama").as_posix() for p in got} == hub["org/Llama-X"]
    got = download_tokenizer.download("org/Qwen-X", str(tmp_path / "qwen"), None)
    assert len(got) == 2
    with pytest.raises(SystemExit, match="neither tokenizer.json nor original/tokenizer.model"):
        download_tokenizer.download("org/NoTok", str(tmp_path / "none"), None)
