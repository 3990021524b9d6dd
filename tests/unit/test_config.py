"""Config system: precedence, CLI syntax, errors, aliases, TOML round trip, --help."""

import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field, fields
from typing import ClassVar

import pytest

from torchtitan.config import (
    ALIASES,
    ConfigError,
    ConfigManager,
    JobConfig,
    dump_toml,
    format_config,
    to_toml,
)
from torchtitan.config.job_config import Section

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse(*argv: str, config_cls: type = JobConfig) -> JobConfig:
    return ConfigManager(config_cls).parse_args(list(argv))


def write_toml(tmp_path, text: str, name: str = "job.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(*argv: str, config_cls: type = JobConfig) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*argv, config_cls=config_cls)
    message = str(info.value)
    assert "\n" not in message
    return message


# A section outside the standard set, to reach types (list[int], an Optional whose
# default is not None) that no standard field has, and to check ConfigManager(config_cls).
@dataclass
class Extra(Section):
    _section: ClassVar[str] = "extra"
    ids: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "some ids"})
    ratio: float | None = field(default=0.5, metadata={"help": "a ratio"})


@dataclass
class ExtendedConfig(JobConfig):
    extra: Extra = field(default_factory=Extra)


# --- precedence and syntax ------------------------------------------------------------------


def test_defaults_parse_to_default_config():
    config = parse()
    assert config == JobConfig()
    assert config.training.steps == 10000
    assert config.compile.components == ["model", "loss"]
    assert config.parallelism.data_parallel_shard_degree == -1


def test_precedence_cli_over_toml_over_default(tmp_path):
    path = write_toml(
        tmp_path,
        """
        [training]
        steps = 20
        seq_len = 512
        seed = 7
        deterministic = true
        [optimizer]
        lr = 1
        [compile]
        enable = true
        components = ["model"]
        [parallelism]
        pipeline_parallel_split_points = ["layers.1", "layers.2"]
        """,
    )
    config = parse(
        "--job.config_file", path,
        "--training.steps", "30",
        "--training.seed=none",
        "--training.no-deterministic",
        "--compile.components", "loss,model",
        "--parallelism.pipeline_parallel_split_points=",
    )  # fmt: skip
    assert config.training.steps == 30  # CLI beats TOML
    assert config.training.seq_len == 512  # TOML beats default
    assert config.training.seed is None
    assert config.training.deterministic is False
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.compile.enable is True
    assert config.compile.components == ["loss", "model"]
    assert config.parallelism.pipeline_parallel_split_points == []
    assert config.training.local_batch_size == 8  # untouched default
    assert config.job.config_file == path


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--training.deterministic"], True),
        (["--training.deterministic", "--training.steps", "5"], True),
        (["--training.deterministic", "true"], True),
        (["--training.deterministic", "False"], False),
        (["--training.deterministic=false"], False),
        (["--training.deterministic=1"], True),
        (["--training.no-deterministic"], False),
        (["--training.no_deterministic"], False),
        (["--training.deterministic", "--training.no-deterministic"], False),
    ],
)
def test_boolean_syntax(argv, expected):
    assert parse(*argv).training.deterministic is expected


def test_value_syntax_and_last_occurrence_wins():
    config = parse(
        "--training.steps=12",
        "--optimizer.lr", "3e-4",
        "--training.seed", "-0",
        "--job.description", "a run, with commas",
        "--lr-scheduler.warmup-steps", "4",
        "--model.flavor", "a",
        "--model.flavor", "b",
        "--float8.recipe_name", "rowwise",
        "--parallelism.pipeline_parallel_split_points", " layers.1 , layers.3 ",
    )  # fmt: skip
    assert config.training.steps == 12
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.training.seed == 0
    assert config.job.description == "a run, with commas"  # str is never split
    assert config.lr_scheduler.warmup_steps == 4
    assert config.model.flavor == "b"
    assert config.float8.recipe_name == "rowwise"
    assert config.parallelism.pipeline_parallel_split_points == ["layers.1", "layers.3"]


def test_extended_config_types():
    config = parse("--extra.ids", "3,4,5", "--extra.ratio", "null", config_cls=ExtendedConfig)
    assert config.extra.ids == [3, 4, 5]
    assert config.extra.ratio is None
    assert "--extra.ids 3,x: expected comma-separated list of int" in error_of(
        "--extra.ids", "3,x", config_cls=ExtendedConfig
    )


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--training.sequence_len", "5"],
         "unknown option --training.sequence_len; did you mean --training.seq_len?"),
        (["--trainng.steps", "5"],
         "unknown section 'trainng' in --trainng.steps; did you mean --training.steps?"),
        (["--training.lr", "1"], "did you mean --optimizer.lr?"),
        (["--steps", "1"], "did you mean --training.steps?"),
        (["--nosuch.thing", "1"],
         "unknown section 'nosuch' in --nosuch.thing; valid sections: job,"),
        (["--training.zzzzzz", "1"], "unknown option --training.zzzzzz; see --help"),
        (["--training.steps", "abc"], "--training.steps abc: expected int"),
        (["--optimizer.lr", "fast"], "--optimizer.lr fast: expected float"),
        (["--training.seed", "x"], "--training.seed x: expected int or none"),
        (["--training.deterministic", "maybe"],
         "--training.deterministic maybe: expected true or false"),
        (["--training.steps"], "missing value after --training.steps"),
        (["--training.steps", "--training.seq_len", "5"], "missing value after --training.steps"),
        (["--training.no-steps"], "training.steps is not a boolean"),
        (["--training.no-deterministic=true"], "takes no value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--job.config_file", "/nonexistent/x.toml"], "config file /nonexistent/x.toml not found"),
    ],
)  # fmt: skip
def test_cli_errors(argv, fragment):
    assert fragment in error_of(*argv)


@pytest.mark.parametrize(
    "option, value",
    [
        ("training.steps", "-5"),
        ("training.steps", "0"),
        ("training.seq_len", "0"),
        ("training.local_batch_size", "0"),
        ("training.global_batch_size", "12"),  # not a multiple of local_batch_size 8
        ("training.global_batch_size", "0"),
        ("training.gc_freq", "0"),
        ("training.dataset_shards", "-1"),
        ("training.max_norm", "nan"),
        ("training.mixed_precision_param", "float16"),
        ("training.mixed_precision_reduce", "fp32"),
        ("optimizer.lr", "0"),
        ("optimizer.lr", "-1e-3"),
        ("optimizer.lr", "inf"),
        ("optimizer.eps", "0"),
        ("optimizer.beta1", "1.0"),
        ("optimizer.beta2", "-0.1"),
        ("optimizer.weight_decay", "-0.1"),
        ("optimizer.name", "SGD"),
        ("optimizer.implementation", "cuda"),
        ("lr_scheduler.warmup_steps", "-1"),
        ("lr_scheduler.min_lr_factor", "1.5"),
        ("lr_scheduler.min_lr_factor", "-0.1"),
        ("lr_scheduler.decay_ratio", "1.1"),
        ("lr_scheduler.decay_type", "exponential"),
        ("activation_checkpoint.mode", "partial"),
        ("activation_checkpoint.selective_ac_option", "0"),
        ("activation_checkpoint.selective_ac_option", "-2"),
        ("activation_checkpoint.selective_ac_option", "ops"),
        ("activation_checkpoint.op_ac_layers", "-2"),
        ("activation_checkpoint.op_ac_layers", "3"),  # needs selective op AC (the default is "2")
        ("activation_checkpoint.later_layers", "attention"),  # needs op_ac_layers >= 0
        ("activation_checkpoint.later_layers", "op"),
        ("activation_checkpoint.op_saved_matmuls", "some"),
        ("checkpoint.async_mode", "threaded"),
        ("checkpoint.export_dtype", "int8"),
        ("checkpoint.keep_latest_k", "-1"),
        ("checkpoint.interval", "0"),
        ("checkpoint.load_step", "-2"),
        ("parallelism.data_parallel_replicate_degree", "0"),
        ("parallelism.data_parallel_shard_degree", "0"),
        ("parallelism.data_parallel_shard_degree", "-2"),
        ("parallelism.tensor_parallel_degree", "0"),
        ("parallelism.pipeline_parallel_degree", "-1"),
        ("parallelism.context_parallel_degree", "0"),
        ("parallelism.fsdp_reshard_after_forward", "sometimes"),
        ("parallelism.pipeline_parallel_schedule", "Zigzag"),
        ("parallelism.pipeline_parallel_microbatch_size", "0"),
        ("parallelism.pipeline_parallel_microbatches", "0"),
        ("parallelism.pipeline_parallel_layers_per_stage", "0"),
        ("parallelism.context_parallel_rotate_method", "ring"),
        ("model.converters", "float8,int4"),
        ("model.converters", "float8,float8"),
        ("model.name", ""),
        ("compile.components", "model,optimizer"),
        ("float8.recipe_name", "blockwise"),
        ("metrics.wandb_mode", "cloud"),
        ("metrics.log_freq", "0"),
        ("metrics.peak_tflops", "-1"),
        ("profiling.profile_freq", "0"),
        ("profiling.profiler_active", "0"),
        ("profiling.memory_snapshot_step", "-2"),
        ("comm.init_timeout_seconds", "0"),
        ("comm.train_timeout_seconds", "-1"),
        ("comm.trace_buf_size", "-1"),
        ("experimental.custom_import", "not a module"),
        ("job.dump_folder", ""),
    ],
)
def test_out_of_range_and_bad_choices(option, value):
    message = error_of(f"--{option}", value)
    assert message.startswith(f"{option} = ")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--training.global_batch_size", "16"], {"training.global_batch_size": 16}),
        (["--training.global_batch_size", "-1"], {"training.global_batch_size": -1}),
        (["--lr_scheduler.min_lr_factor", "1.0", "--lr_scheduler.decay_ratio", "0"],
         {"lr_scheduler.min_lr_factor": 1.0, "lr_scheduler.decay_ratio": 0.0}),
        (["--activation_checkpoint.selective_ac_option", "op"], {"activation_checkpoint.selective_ac_option": "op"}),
        (["--activation_checkpoint.selective_ac_option", "1"], {"activation_checkpoint.selective_ac_option": "1"}),
        (["--parallelism.data_parallel_shard_degree", "4"], {"parallelism.data_parallel_shard_degree": 4}),
        (["--parallelism.pipeline_parallel_schedule", "Zigzag",
          "--parallelism.pipeline_parallel_schedule_csv", "s.csv"],
         {"parallelism.pipeline_parallel_schedule": "Zigzag", "parallelism.pipeline_parallel_schedule_csv": "s.csv"}),
        (["--training.max_norm", "0"], {"training.max_norm": 0.0}),
        (["--training.max_norm", "-1"], {"training.max_norm": -1.0}),
        (["--experimental.custom_import", "my_pkg.my_model"], {"experimental.custom_import": "my_pkg.my_model"}),
    ],
)  # fmt: skip
def test_boundary_values_are_accepted(argv, expected):
    """Accepted as given, not silently clamped or replaced."""
    cfg = parse(*argv)
    for dotted, value in expected.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "6",
          "--parallelism.pipeline_parallel_microbatch_size", "4"],
         "must be divisible by parallelism"),
        (["--parallelism.context_parallel_degree", "3", "--training.seq_len", "9"],
         "divisible by 6"),
        (["--parallelism.pipeline_parallel_layers_per_stage", "2",
          "--parallelism.pipeline_parallel_split_points", "layers.1"], "not both"),
        (["--float8.precompute_float8_dynamic_scale_for_fsdp"], "enable_fsdp_float8_all_gather"),
        (["--float8.enable_fsdp_float8_all_gather", "--float8.recipe_name", "rowwise"],
         "tensorwise"),
        (["--checkpoint.create_seed_checkpoint"], "needs checkpoint.enable"),
        (["--profiling.profile_freq", "3"], "profiler_warmup + profiler_active"),
    ],
)  # fmt: skip
def test_cross_field_errors(argv, fragment):
    assert fragment in error_of(*argv)


def test_every_field_is_type_checked_by_validate():
    """validate() also guards configs built in code: a wrong-typed value names its option."""
    for section_name, section in JobConfig().sections().items():
        for f in fields(section):
            config = JobConfig()
            setattr(getattr(config, section_name), f.name, object())
            with pytest.raises(ConfigError, match=rf"^{section_name}\.{f.name} = "):
                config.validate()


def test_toml_errors(tmp_path):
    bad_syntax = write_toml(tmp_path, "[training]\nsteps = 10\nseq_len = = 3\n", "syntax.toml")
    message = error_of("--job.config_file", bad_syntax)
    assert "syntax.toml" in message and "line 3" in message

    wrong_type = write_toml(tmp_path, '[training]\nsteps = "ten"\n', "type.toml")
    assert "type.toml: training.steps = 'ten': expected int" in error_of(
        "--job.config_file", wrong_type
    )
    bool_type = write_toml(tmp_path, "[training]\ndeterministic = 1\n", "bool.toml")
    assert "training.deterministic = 1: expected bool" in error_of("--job.config_file", bool_type)
    list_type = write_toml(tmp_path, "[model]\nconverters = [1]\n", "list.toml")
    assert "model.converters = [1]: expected list[str]" in error_of("--job.config_file", list_type)

    unknown_key = write_toml(tmp_path, "[training]\nsequence_len = 3\n", "key.toml")
    assert "unknown option training.sequence_len; did you mean training.seq_len?" in error_of(
        "--job.config_file", unknown_key
    )
    unknown_section = write_toml(tmp_path, "[optimiser]\nlr = 3.0\n", "sec.toml")
    assert "did you mean optimizer.lr?" in error_of("--job.config_file", unknown_section)
    top_level = write_toml(tmp_path, "steps = 3\n", "top.toml")
    assert "must be inside a [section] table" in error_of("--job.config_file", top_level)
    out_of_range = write_toml(tmp_path, "[optimizer]\nlr = -1.0\n", "range.toml")
    assert "optimizer.lr = -1.0: must be > 0" in error_of("--job.config_file", out_of_range)


# --- aliases --------------------------------------------------------------------------------


OLD_TOML = """
[job]
print_args = false
use_for_integration_test = true
[model]
norm_type = "rmsnorm"
[training]
batch_size = 4
data_parallel_replicate_degree = 2
data_parallel_shard_degree = 3
tensor_parallel_degree = 5
compile = true
warmup_steps = 7
disable_loss_parallel = true
fsdp_reshard_after_forward = "never"
enable_float8_linear = true
[experimental]
pipeline_parallel_degree = 2
pipeline_parallel_split_points = ["layers.2"]
pipeline_parallel_schedule = "GPipe"
pipeline_parallel_microbatches = 2
context_parallel_degree = 2
enable_async_tensor_parallel = true
[checkpoint]
enable_checkpoint = true
[lr_scheduler]
lr_min = 0.1
[metrics]
disable_color_printing = false
"""


def test_old_keys_in_toml_map_to_new(tmp_path):
    config = parse("--job.config_file", write_toml(tmp_path, OLD_TOML))
    assert config.job.print_config is False
    assert config.training.local_batch_size == 4
    par = config.parallelism
    assert (par.data_parallel_replicate_degree, par.data_parallel_shard_degree) == (2, 3)
    assert par.tensor_parallel_degree == 5
    assert par.pipeline_parallel_degree == 2
    assert par.pipeline_parallel_split_points == ["layers.2"]
    assert par.pipeline_parallel_schedule == "GPipe"
    assert par.pipeline_parallel_microbatches == 2
    assert par.context_parallel_degree == 2
    assert par.enable_async_tensor_parallel is True
    assert par.disable_loss_parallel is True
    assert par.fsdp_reshard_after_forward == "never"
    assert config.compile.enable is True
    assert config.lr_scheduler.warmup_steps == 7
    assert config.checkpoint.enable is True
    assert config.lr_scheduler.min_lr_factor == 0.1
    assert config.metrics.enable_color_printing is True  # inverted
    assert config.model.converters == ["float8"]


def test_old_keys_on_cli_map_to_new(tmp_path):
    config = parse(
        "--training.batch_size", "2",
        "--training.tensor_parallel_degree", "4",
        "--experimental.pipeline_parallel_microbatches", "3",
        "--checkpoint.enable_checkpoint",
        "--training.no-compile",
        "--metrics.disable_color_printing",
        "--training.enable_float8_linear",
        "--lr_scheduler.lr_min=0.5",
    )  # fmt: skip
    assert config.training.local_batch_size == 2
    assert config.parallelism.tensor_parallel_degree == 4
    assert config.parallelism.pipeline_parallel_microbatches == 3
    assert config.checkpoint.enable is True
    assert config.compile.enable is False
    assert config.metrics.enable_color_printing is False
    assert config.model.converters == ["float8"]
    assert config.lr_scheduler.min_lr_factor == 0.5
    # an old flag set false adds nothing; float8 is never listed twice
    assert parse("--training.enable_float8_linear", "false").model.converters == []
    assert parse(
        "--model.converters", "float8", "--training.enable_float8_linear"
    ).model.converters == ["float8"]


def test_every_alias_points_at_a_real_option():
    manager = ConfigManager()
    for old, new in ALIASES.items():
        section, _, key = new.partition(".")
        assert hasattr(getattr(JobConfig(), section), key), new
        assert old not in manager._options, f"{old} is both an alias and a field"


def test_same_option_under_both_names_must_agree(tmp_path):
    message = error_of("--training.batch_size", "4", "--training.local_batch_size", "8")
    assert "--training.batch_size" in message and "--training.local_batch_size" in message
    # agreeing values are fine, and so is the inverted pair when consistent
    cfg = parse("--training.batch_size", "4", "--training.local_batch_size", "4")
    assert cfg.training.local_batch_size == 4
    cfg = parse("--metrics.disable_color_printing", "--metrics.no-enable_color_printing")
    assert cfg.metrics.enable_color_printing is False
    message = error_of(
        "--job.config_file",
        write_toml(tmp_path, "[checkpoint]\nenable = true\nenable_checkpoint = false\n"),
    )
    assert "checkpoint.enable_checkpoint" in message and "checkpoint.enable " in message
    # across sources the usual precedence applies: old name in TOML, new name on CLI
    path = write_toml(tmp_path, "[training]\nbatch_size = 4\n", "old.toml")
    config = parse("--job.config_file", path, "--training.local_batch_size", "2")
    assert config.training.local_batch_size == 2


# --- round trip, formatting, help -------------------------------------------------------------


def test_dump_toml_round_trip(tmp_path):
    original = parse(
        "--job.description", 'quotes " and \\ backslash\tand tab, unicode é',
        "--training.dataset_path", "/data/c4",
        "--training.seed", "1234",
        "--optimizer.eps", "1e-12",
        "--optimizer.lr", "0.1",
        "--lr_scheduler.decay_ratio", "0.25",
        "--model.converters", "float8",
        "--compile.components", "",
        "--checkpoint.exclude_from_loading", "optimizer,dataloader",
        "--parallelism.data_parallel_shard_degree", "2",
        "--metrics.peak_tflops", "989.5",
    )  # fmt: skip
    path = tmp_path / "out" / "config.toml"
    dump_toml(original, path)
    # the file is plain TOML holding exactly the non-None values
    data = tomllib.loads(path.read_text())
    for section, values in original.to_dict().items():
        assert {k: v for k, v in values.items() if v is not None} == data[section]
    again = parse("--job.config_file", str(path))
    assert again.job.config_file == str(path)
    again.job.config_file = None
    assert again == original


def test_round_trip_of_none_over_a_non_none_default(tmp_path):
    original = parse("--extra.ratio", "none", "--extra.ids", "7", config_cls=ExtendedConfig)
    path = tmp_path / "c.toml"
    dump_toml(original, path)
    again = parse("--job.config_file", str(path), config_cls=ExtendedConfig)
    assert again.extra.ratio is None and again.extra.ids == [7]


def test_format_config_marks_changed_values():
    text = format_config(parse("--training.steps", "5"))
    assert "  steps = 5  # default: 10000" in text
    assert "  seq_len = 2048\n" in text
    assert text.count("[") >= len(JobConfig().sections())
    assert to_toml(JobConfig()).startswith("[job]")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_option_and_exits_zero(flag, capsys):
    with pytest.raises(SystemExit) as info:
        parse("--training.steps", "5", flag)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == ConfigManager().format_help() + "\n"
    lines = out.splitlines()
    for section_name, section in JobConfig().sections().items():
        header = lines.index(next(line for line in lines if line.startswith(f"[{section_name}]")))
        for f in fields(section):
            flag = f"  --{section_name}.{f.name} "
            entry = next(i for i, line in enumerate(lines) if line.startswith(flag))
            assert entry > header
            assert f.metadata["help"] in lines[entry + 1]
    assert "--training.seed  int | None  (default: none)" in out
    assert "--compile.components  list[str]  (default: model,loss)" in out
    assert "--training.deterministic / --training.no-deterministic  bool  (default: false)" in out


def test_every_field_has_help_and_a_default():
    for section in JobConfig().sections().values():
        for f in fields(section):
            assert f.metadata.get("help"), f"{type(section).__name__}.{f.name} has no help"
            missing = dataclasses.MISSING
            assert f.default is not missing or f.default_factory is not missing


def test_parsing_does_not_import_torch():
    code = (
        "import sys\n"
        "from torchtitan.config import ConfigManager\n"
        "ConfigManager().parse_args(['--training.steps', '3'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
