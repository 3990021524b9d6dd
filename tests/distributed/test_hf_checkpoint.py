"""Hugging Face weights in the training loop (checkpoint.initial_load_in_hf / last_save_in_hf)
and the offline converters, all through DCP's Hugging Face storage reader/writer.

The source is a folder written by transformers itself: a randomly initialised
``LlamaForCausalLM`` of a tiny Llama 3 shape (dim 64, 2 layers, 4 query / 2 key-value heads,
the test tokenizer's 2,256 tokens), saved in several safetensors files with an index.

- 4 CPU ranks, FSDP 2 x TP 2: starts from the folder (the weights equal the adapter's
  conversion of the files), trains 3 steps (first-step loss = one process's), saves the last
  step in Hugging Face format, split like the folder it came from (PP 2 x FSDP 2 too). FSDP 4 (2 key-value heads
  over 4 ranks: the rotary permutation cannot run sharded), PP 2 x FSDP 2 and HSDP 2 x 2 load
  it too; every layout validates after the last step (the same held-out loss).
- One process: the same run; transformers loads both saved folders and its logits equal
  ours within 1e-4 (fp32).
- A Qwen3 round trip (qwen3 debug flavor): train, save in HF, Qwen3ForCausalLM loads it,
  and a new run starting from that folder holds the same weights.
- The converters: HF -> DCP -> HF is the identity on every tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from harness import launch

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(REPO, "tests", "assets", "test_tiktoken.model")
FLAVOR = "hf_test"
STEPS = 3
TOL = 1e-5
LAYOUT_NAMES = ("fsdp2_tp2", "fsdp4", "pp2_fsdp2", "hsdp2x2")
SAVED = ("fsdp2_tp2", "pp2_fsdp2")  # these write the last step in Hugging Face format


def tiny_flavor():
    from torchtitan.models.llama3 import TransformerModelArgs

    return TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=-1)


def _register_flavor() -> None:
    from torchtitan.models.llama3 import llama3_configs

    llama3_configs.setdefault(FLAVOR, tiny_flavor())


def _config(dump_folder: str, *overrides: str, model: str = "llama3", flavor: str = FLAVOR):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(
        [
            "--job.config_file", os.path.join(REPO, "train_configs", "debug_model.toml"),
            "--job.dump_folder", dump_folder,
            "--job.no-print_config",
            "--model.name", model,
            "--model.flavor", flavor,
            "--model.tokenizer_path", TOKENIZER,
            "--training.steps", str(STEPS),
            "--training.seq_len", "64",
            "--training.local_batch_size", "4",
            "--training.global_batch_size", "4",
            "--training.dataset_shards", "4",
            "--training.mixed_precision_param", "float32",
            "--training.seed", "5",
            "--optimizer.eps", "1e-6",
            "--metrics.log_freq", "1",
            "--comm.trace_buf_size", "0",
            "--checkpoint.enable",
            "--checkpoint.interval", "1000",
            # validation after the last step: the same held-out batches in every layout
            "--validation.enable",
            "--validation.dataset", "c4_test",
            "--validation.freq", str(STEPS),
            "--validation.steps", "2",
            "--validation.seq_len", "64",
            *overrides,
        ]
    )


def _from_hf(hf_dir: str) -> list[str]:
    return ["--checkpoint.initial_load_path", hf_dir, "--checkpoint.initial_load_in_hf"]


SAVE_HF = ["--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf", "--checkpoint.export_dtype", "float32"]


def _full(model_parts) -> dict[str, torch.Tensor]:
    out = {}
    for part in model_parts:
        for k, v in part.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v
            out[k] = v.detach().cpu().clone()
    return out


def _release(trainer) -> None:
    trainer.checkpointer.close()
    trainer.metrics.close()


MOE = ["--activation_checkpoint.mode", "none"]  # with model="qwen3", flavor="debugmodel_moe"
MOE_BUFFERS = ("expert_bias", "tokens_per_expert")  # load balancing: no Hugging Face counterpart


def four_rank_main(workdir: str, hf_dir: str, moe_dir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from torchtitan.trainer import Trainer

    _register_flavor()
    report: dict[str, Any] = {}
    layouts = {
        "fsdp2_tp2": ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2",
                      "--training.local_batch_size", "2"],
        "fsdp4": ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"],
        "pp2_fsdp2": ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.pipeline_parallel_degree", "2",
                      "--training.local_batch_size", "2"],
        "hsdp2x2": ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
                    "--training.local_batch_size", "1"],
    }
    for name, args in layouts.items():
        dump = os.path.join(workdir, name)
        save = SAVE_HF if name in SAVED else []
        local = args[args.index("--training.local_batch_size") + 1]
        trainer = Trainer(_config(dump, *_from_hf(hf_dir), *args, *save, "--validation.local_batch_size", local))
        assert trainer.checkpointer.load()
        loaded = _full(trainer.model_parts)
        losses = trainer.train()  # loads the folder again (no checkpoint in the folder yet)
        report[name] = {
            "loaded": loaded, "losses": losses, "final": _full(trainer.model_parts),
            "validation": trainer.validator.last["loss"],
        }
        _release(trainer)
        dist.barrier()
    # Qwen3 MoE under EP 2 x FSDP 4: experts sharded over ep, read from per-expert tensors
    # and written back as per-expert tensors
    dump = os.path.join(workdir, "moe_ep2")
    trainer = Trainer(
        _config(
            dump, *_from_hf(moe_dir), *MOE, *SAVE_HF, "--parallelism.expert_parallel_degree", "2",
            "--training.local_batch_size", "1", "--validation.local_batch_size", "1",
            model="qwen3", flavor="debugmodel_moe",
        )
    )
    assert trainer.checkpointer.load()
    loaded = _full(trainer.model_parts)
    trainer.train()
    report["moe_ep2"] = {"loaded": loaded, "final": _full(trainer.model_parts)}
    _release(trainer)
    dist.barrier()
    # tensors go through a file: a queue would pass them as shared memory the exiting rank frees
    path = os.path.join(workdir, f"report_rank{dist.get_rank()}.pt")
    torch.save(report, path)
    return path


# ---------------------------------------------------------------- pytest side


def _hf_config() -> dict[str, Any]:
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    args = tiny_flavor()
    args.vocab_size = 2256
    args.max_seq_len = 64
    return Llama3StateDictAdapter(args).hf_config()


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> str:
    """A sharded Hugging Face folder written by transformers."""
    folder = str(tmp_path_factory.mktemp("hf_source"))
    config = transformers.LlamaConfig(**{k: v for k, v in _hf_config().items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="300KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    return folder


def _hf_as_ours(hf_dir: str) -> dict[str, torch.Tensor]:
    from torchtitan.components.checkpoint.hf import read_hf_state
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    args = tiny_flavor()
    args.vocab_size = 2256
    return Llama3StateDictAdapter(args).from_hf(read_hf_state(hf_dir))


def _zero_moe_buffers(model: torch.nn.Module) -> torch.nn.Module:
    """No expert bias: the routing of Hugging Face's Qwen3-MoE."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(MOE_BUFFERS):
                buf.zero_()
    return model


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory) -> dict[str, Any]:
    """The Qwen3 MoE debug flavor's initial weights (one process), written by save_hf."""
    from torchtitan.components.checkpoint.hf import save_hf
    from torchtitan.trainer import Trainer

    dump = tmp_path_factory.mktemp("moe_source")
    trainer = Trainer(_config(str(dump / "run"), *MOE, model="qwen3", flavor="debugmodel_moe"))
    try:
        folder = str(dump / "hf")
        save_hf(folder, trainer.model_parts, trainer.checkpointer.sd_adapter)
        return {"folder": folder, "state": _full(trainer.model_parts), "model": _zero_moe_buffers(trainer.model_parts[0].eval())}
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, hf_source, moe_source) -> dict:
    workdir = str(tmp_path_factory.mktemp("hf_four"))
    paths = launch(
        "test_hf_checkpoint:four_rank_main", 4, timeout=600, workdir=workdir, hf_dir=hf_source,
        moe_dir=moe_source["folder"],
    )
    report = [torch.load(p, weights_only=True) for p in paths]
    merged = report[0]
    for other in report[1:]:  # PP: each stage's weights come from its own ranks
        for name, r in other.items():
            for key in ("loaded", "final"):
                for k, v in r[key].items():
                    merged[name][key].setdefault(k, v)
    merged["workdir"] = workdir
    return merged


@pytest.fixture(scope="module")
def single(tmp_path_factory, hf_source, monkeypatch_module) -> dict:
    from torchtitan.models.llama3 import llama3_configs
    from torchtitan.trainer import Trainer

    monkeypatch_module.setitem(llama3_configs, FLAVOR, tiny_flavor())
    dump = str(tmp_path_factory.mktemp("hf_single"))
    trainer = Trainer(_config(dump, *_from_hf(hf_source), *SAVE_HF, "--validation.local_batch_size", "4"))
    try:
        losses = trainer.train()
        model = trainer.model_parts[0].eval()
        return {
            "losses": losses, "model": model, "final": _full(trainer.model_parts), "dump": dump,
            "validation": trainer.validator.last["loss"],
        }
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _logits_diff(folder: str, model: torch.nn.Module, cls=None) -> float:
    hf = (cls or transformers.LlamaForCausalLM).from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, 2256, (2, 48), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return (model(x) - hf(x).logits).abs().max().item()


def test_every_layout_loads_the_hf_folder(four_ranks, hf_source):
    expected = _hf_as_ours(hf_source)
    for name in LAYOUT_NAMES:
        loaded = four_ranks[name]["loaded"]
        assert loaded.keys() == expected.keys(), (name, sorted(set(loaded) ^ set(expected)))
        for k in expected:
            assert torch.equal(loaded[k], expected[k]), (name, k)


def test_first_step_loss_matches_one_process(four_ranks, single):
    assert len(single["losses"]) == STEPS
    for name in LAYOUT_NAMES:
        assert four_ranks[name]["losses"][0] == pytest.approx(single["losses"][0], rel=TOL), name
        assert four_ranks[name]["losses"] == pytest.approx(single["losses"], rel=1e-4), name
        # and the held-out loss after the last step (validation in these layouts too)
        assert four_ranks[name]["validation"] == pytest.approx(single["validation"], rel=1e-4), name


def test_saved_hf_folders_load_in_transformers(four_ranks, single, hf_source):
    one = os.path.join(single["dump"], "checkpoint", f"step-{STEPS}-hf")
    assert _logits_diff(one, single["model"]) < 1e-4
    # the 4-rank saves (FSDP 2 x TP 2; PP 2 x FSDP 2: each stage's ranks write their layers):
    # split like the folder they started from, with its index and config, and holding what
    # the run ended with
    from torchtitan.models.llama3 import Transformer

    source_files = sorted(f for f in os.listdir(hf_source) if f.endswith(".safetensors"))
    source_keys = set(json.load(open(os.path.join(hf_source, "model.safetensors.index.json")))["weight_map"])
    for name in SAVED:
        folder = os.path.join(four_ranks["workdir"], name, "checkpoint", f"step-{STEPS}-hf")
        files = sorted(os.listdir(folder))
        assert [f for f in files if f.endswith(".safetensors")] == source_files, (name, files)
        assert "config.json" in files and "model.safetensors.index.json" in files and "sharded" not in files, name
        index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
        assert set(index["weight_map"]) == source_keys, name
        args = tiny_flavor()
        args.vocab_size = 2256
        model = Transformer(args)
        model.load_state_dict(four_ranks[name]["final"], strict=False)
        assert _logits_diff(folder, model.eval()) < 1e-4, name


def test_hf_options_are_checked(tmp_path):
    from torchtitan.config import ConfigError, ConfigManager

    with pytest.raises(ConfigError, match="checkpoint.initial_load_in_hf"):
        ConfigManager().parse_args(["--checkpoint.enable", "--checkpoint.initial_load_in_hf"])
    with pytest.raises(ConfigError, match="checkpoint.last_save_in_hf"):
        ConfigManager().parse_args(["--checkpoint.enable", "--checkpoint.last_save_in_hf"])
    cfg = ConfigManager().parse_args(["--checkpoint.last_save_model_only"])
    assert cfg.checkpoint.model_weights_only  # TorchTitan's name for the same option
    with pytest.raises(ConfigError, match="initial_load_path \\(or model.hf_assets_path\\)"):
        ConfigManager().parse_args(["--checkpoint.enable", "--checkpoint.initial_load_in_hf"])
    # TorchTitan's fallback: no initial_load_path, the folder of model.hf_assets_path
    ConfigManager().parse_args(
        ["--checkpoint.enable", "--checkpoint.initial_load_in_hf", "--model.hf_assets_path", str(tmp_path)]
    )


def test_initial_load_in_hf_falls_back_to_hf_assets_path(tmp_path, hf_source):
    """As in TorchTitan: initial_load_in_hf without initial_load_path reads model.hf_assets_path."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.config import ConfigManager
    from torchtitan.models.llama3 import Transformer
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    args = tiny_flavor()
    args.vocab_size = 2256
    model = Transformer(args)
    cfg = ConfigManager().parse_args(
        ["--checkpoint.enable", "--checkpoint.initial_load_in_hf", "--model.hf_assets_path", hf_source]
    )
    manager = CheckpointManager(
        cfg.checkpoint, dump_folder=str(tmp_path), model_parts=[model], states={},
        sd_adapter=Llama3StateDictAdapter(args), hf_assets_path=hf_source,
    )
    assert manager.load()
    expected = _hf_as_ours(hf_source)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_wrong_folder_is_one_line(tmp_path, hf_source, monkeypatch):
    """A folder of another model size names the first tensor that does not fit."""
    from torchtitan.components.checkpoint import CheckpointError
    from torchtitan.components.checkpoint.hf import load_hf
    from torchtitan.models.llama3 import Transformer
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    args = tiny_flavor()
    args.vocab_size = 2256
    args.dim = 128
    model = Transformer(args)
    with pytest.raises(CheckpointError, match="does not fit this model: model.embed_tokens.weight"):
        load_hf(hf_source, [model], Llama3StateDictAdapter(args))
    with pytest.raises(CheckpointError, match="holds no"):
        load_hf(str(tmp_path), [model], Llama3StateDictAdapter(args))


def _script_main(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_tied_folder_without_lm_head(tmp_path, hf_source):
    """A folder without lm_head.weight (tied embeddings, e.g. Llama 3.2 1B): our untied
    output layer gets the embedding."""
    from torchtitan.components.checkpoint.hf import load_hf, save_hf
    from torchtitan.models.llama3 import Transformer
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    state = _hf_as_ours(hf_source)
    del state["output.weight"]
    args = tiny_flavor()
    args.vocab_size = 2256
    adapter = Llama3StateDictAdapter(args)
    save_hf(str(tmp_path / "tied"), [], adapter, state=state)
    model = Transformer(args)
    load_hf(str(tmp_path / "tied"), [model], adapter)
    assert torch.equal(model.output.weight, state["tok_embeddings.weight"])
    assert torch.equal(model.layers["1"].attention.wk.weight, state["layers.1.attention.wk.weight"])


def test_converters_round_trip_through_dcp(tmp_path, hf_source, capsys):
    """scripts/convert_hf_to_dcp.py then convert_dcp_to_hf.py (their main(), in-process)."""
    from safetensors.torch import load_file

    dcp_dir, out = tmp_path / "dcp", tmp_path / "hf"
    _script_main("convert_hf_to_dcp")([hf_source, str(dcp_dir)])
    to_hf = _script_main("convert_dcp_to_hf")
    with pytest.raises(SystemExit, match="exactly one of --flavor and --hf-config"):
        to_hf([str(dcp_dir), str(out), "--flavor", "debugmodel", "--hf-config", os.path.join(hf_source, "config.json")])
    to_hf([str(dcp_dir), str(out), "--hf-config", os.path.join(hf_source, "config.json"), "--max-shard-gb", "0.0003"])

    def tensors(folder):
        found = {}
        for f in os.listdir(folder):
            if f.endswith(".safetensors"):
                found.update(load_file(os.path.join(folder, f)))
        return found

    src, back = tensors(hf_source), tensors(str(out))
    assert src.keys() == back.keys()
    for k in src:
        assert torch.equal(src[k], back[k]), k
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(src)
    assert json.load(open(out / "config.json")) == json.load(open(os.path.join(hf_source, "config.json")))
    # a folder that is not Hugging Face's: one line, exit 1
    with pytest.raises(SystemExit, match="convert_hf_to_dcp: error"):
        _script_main("convert_hf_to_dcp")([str(tmp_path), str(tmp_path / "x")])


def test_qwen3_round_trip(tmp_path):
    """qwen3 debug flavor: train 2 steps, save in HF, Qwen3ForCausalLM's logits equal ours,
    and a run starting from that folder holds the very same weights."""
    from torchtitan.trainer import Trainer

    pytest.importorskip("torchtitan.models.qwen3")
    common = ["--training.steps", "2", "--parallelism.data_parallel_shard_degree", "1"]
    trainer = Trainer(_config(str(tmp_path / "a"), *common, *SAVE_HF, model="qwen3", flavor="debugmodel"))
    try:
        trainer.train()
        model = trainer.model_parts[0].eval()
        saved = _full(trainer.model_parts)
        folder = str(tmp_path / "a" / "checkpoint" / "step-2-hf")
        assert _logits_diff(folder, model, transformers.Qwen3ForCausalLM) < 1e-4
    finally:
        trainer.close()
    trainer = Trainer(_config(str(tmp_path / "b"), *common, *_from_hf(folder), model="qwen3", flavor="debugmodel"))
    try:
        assert trainer.checkpointer.load()
        loaded = _full(trainer.model_parts)
    finally:
        trainer.close()
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k


def test_qwen3_moe_in_hf_under_expert_parallel(four_ranks, moe_source):
    """Per-expert Hugging Face tensors load into EP 2 x FSDP 4 exactly (the load-balancing
    buffers start at zero), transformers' Qwen3MoeForCausalLM matches the source folder, and
    the EP run's own save loads in transformers with logits equal to its final weights."""
    assert _logits_diff(moe_source["folder"], moe_source["model"], transformers.Qwen3MoeForCausalLM) < 1e-4
    loaded, source = four_ranks["moe_ep2"]["loaded"], moe_source["state"]
    assert loaded.keys() == source.keys()
    for k in source:
        if k.endswith(MOE_BUFFERS):
            assert not loaded[k].any(), k
        else:
            assert torch.equal(loaded[k], source[k]), k
    from torchtitan.models.qwen3.args import qwen3_configs
    from torchtitan.models.qwen3.model import Qwen3Transformer
    import copy

    args = copy.deepcopy(qwen3_configs["debugmodel_moe"])
    args.vocab_size = 2256
    model = Qwen3Transformer(args)
    model.load_state_dict(four_ranks["moe_ep2"]["final"], strict=False)
    folder = os.path.join(four_ranks["workdir"], "moe_ep2", "checkpoint", f"step-{STEPS}-hf")
    assert _logits_diff(folder, _zero_moe_buffers(model.eval()), transformers.Qwen3MoeForCausalLM) < 1e-4
