"""Checkpoint interop: Hugging Face <-> DCP (checked against ``transformers`` itself), Meta's
sharded originals -> DCP (torchtitan.convert, the scripts' logic), and sampling
text from a checkpoint (torchtitan.generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchtitan import generate
from torchtitan.components.checkpoint import list_checkpoints, read_model_state
from torchtitan.convert import dcp_to_hf_main, hf_to_dcp_main, meta_to_dcp_main
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.models.llama3.state_dict_adapter import (
    Llama3StateDictAdapter,
    half_split_to_interleaved,
    interleaved_to_half_split,
)

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tests/assets/test_tiktoken.model")


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The debug flavor after 2 training steps, checkpointed by the trainer (a full
    checkpoint: model, optimizer, ...); the model itself for reference outputs."""
    from torchtitan.config import ConfigManager
    from torchtitan.trainer import Trainer

    dump = tmp_path_factory.mktemp("trained")
    cfg = ConfigManager().parse_args(
        [
            "--job.config_file",
            str(REPO / "train_configs" / "debug_model.toml"),
            "--job.dump_folder",
            str(dump),
            "--job.no-print_config",
            "--model.tokenizer_path",
            TOKENIZER,
            "--training.mixed_precision_param",
            "float32",
            "--training.seq_len",
            "64",
            "--training.local_batch_size",
            "2",
            "--training.steps",
            "2",
            "--activation_checkpoint.mode",
            "none",
            "--comm.trace_buf_size",
            "0",
            "--checkpoint.enable",
            "--checkpoint.interval",
            "2",
        ]
    )
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    model = trainer.model_parts[0].eval()
    path = list_checkpoints(str(dump / "checkpoint"))[2].path
    return path, model


# ---------------------------------------------------------------- the rotary permutation


def test_permutation_is_a_per_head_row_reordering_and_inverts():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of head_dim 8
    hf = interleaved_to_half_split(w, n_heads=2)
    # head 0: even rows then odd rows; head 1 the same, offset by 8
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(hf, w[order + [8 + i for i in order]])
    assert torch.equal(half_split_to_interleaved(hf, n_heads=2), w)


def test_tied_embeddings_become_an_untied_output():
    args = TransformerModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, multiple_of=8)
    adapter = Llama3StateDictAdapter(args)
    model = Transformer(args)
    hf = adapter.to_hf(model.state_dict())
    del hf["lm_head.weight"]
    ours = adapter.from_hf(hf)
    assert torch.equal(ours["output.weight"], model.state_dict()["tok_embeddings.weight"])


# ---------------------------------------------------------------- Hugging Face


def test_debug_flavor_exports_to_transformers_with_matching_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, model = trained
    out = tmp_path / "hf"
    dcp_to_hf_main([path, str(out), "--flavor", "debugmodel"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 8 and config["rope_scaling"]["rope_type"] == "llama3"
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(out), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = torch.randint(0, model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ours, theirs = _logits(model, tokens), _logits(hf, tokens)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    # without the rotary permutation the logits would differ: the test can fail
    state = read_model_state(path)
    with torch.no_grad():
        for i in range(model.n_layers):
            attn = hf.model.layers[i].self_attn
            attn.q_proj.weight.copy_(state[f"layers.{i}.attention.wq.weight"])
            attn.k_proj.weight.copy_(state[f"layers.{i}.attention.wk.weight"])
    assert (ours - _logits(hf, tokens)).abs().max().item() > 1e-3


def test_hf_to_dcp_to_hf_is_identity_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms too
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    source = tmp_path / "hf"
    hf.save_pretrained(str(source), safe_serialization=True)

    dcp_dir = tmp_path / "dcp"
    hf_to_dcp_main([str(source), str(dcp_dir)])
    state = read_model_state(str(dcp_dir))
    args = Llama3StateDictAdapter.args_from_hf_config(json.loads((source / "config.json").read_text()))
    args.max_seq_len = 64
    ours = Transformer(args)
    ours.load_state_dict(state)
    ours.eval()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert (_logits(ours, tokens) - _logits(hf, tokens)).abs().max().item() < 1e-4

    back = tmp_path / "hf_back"
    dcp_to_hf_main([str(dcp_dir), str(back), "--hf-config", str(source / "config.json")])
    # the writer numbers its files (model-0000i-of-0000N.safetensors): read them all
    original, round_trip = (
        {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        for folder in (source, back)
    )
    assert original.keys() == round_trip.keys()
    for key in original:
        assert torch.equal(original[key], round_trip[key]), key
    assert json.loads((back / "config.json").read_text()) == json.loads((source / "config.json").read_text())


def test_converter_errors_are_one_line(tmp_path, trained, capsys):
    path, _ = trained
    with pytest.raises(SystemExit) as info:
        dcp_to_hf_main([path, str(tmp_path / "out"), "--flavor", "1B"])
    assert "tok_embeddings.weight has shape (2256, 256) but this model needs (2256, 2048)" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit) as info:
        hf_to_dcp_main([str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert "config.json does not exist" in str(info.value)


# ---------------------------------------------------------------- Meta's originals


def _meta_shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split like Meta's model-parallel layers: column-parallel along rows, row-parallel
    along columns, norms copied; kv projections copied whole when there are fewer kv
    heads than shards (each shard then holds the head its query heads use)."""
    column = (
        "wq.weight",
        "wk.weight",
        "wv.weight",
        "w1.weight",
        "w3.weight",
        "output.weight",
        "tok_embeddings.weight",
    )
    shards: list[dict[str, torch.Tensor]] = [{"rope.freqs": torch.ones(4)} for _ in range(n)]
    for key, value in state.items():
        if key.endswith(("wk.weight", "wv.weight")) and value.shape[0] // 16 < n:
            heads = value.shape[0] // 16  # head_dim 16 in these tests
            pieces = [value.chunk(heads, 0)[i * heads // n] for i in range(n)]
        elif key.endswith(column):
            pieces = list(value.chunk(n, 0))
        elif key.endswith(("wo.weight", "w2.weight")):
            pieces = list(value.chunk(n, 1))
        else:
            pieces = [value] * n
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    return shards


@pytest.mark.parametrize(
    "dims", [dict(dim=256, n_heads=16, n_kv_heads=8, n=2), dict(dim=64, n_heads=4, n_kv_heads=1, n=2)]
)
def test_meta_shards_convert_to_the_original_weights(tmp_path, dims):
    n = dims.pop("n")
    args = TransformerModelArgs(n_layers=2, vocab_size=128, multiple_of=32, **dims)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    meta = tmp_path / "original"
    meta.mkdir()
    for i, shard in enumerate(_meta_shards(state, n)):
        torch.save(shard, meta / f"consolidated.{i:02d}.pth")
    params = dict(
        dim=args.dim,
        n_layers=2,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=128,
        multiple_of=32,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    )
    (meta / "params.json").write_text(json.dumps(params))
    meta_to_dcp_main([str(meta), str(tmp_path / "dcp")])
    converted = read_model_state(str(tmp_path / "dcp"))
    assert converted.keys() == state.keys()
    for key in state:
        assert torch.equal(converted[key], state[key]), key


# ---------------------------------------------------------------- generation


def test_generate_greedy_follows_the_argmax(trained, capsys):
    path, model = trained
    text = generate.main(
        [
            "--checkpoint",
            path,
            "--flavor",
            "debugmodel",
            "--tokenizer",
            TOKENIZER,
            "--prompt",
            "The quick brown fox",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ]
    )
    from torchtitan.components.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(TOKENIZER)
    ids = tokenizer.encode("The quick brown fox", bos=True, eos=False)
    expected = []
    for _ in range(6):  # greedy by hand, with the trainer's own model
        next_id = int(_logits(model, torch.tensor([ids + expected]))[0, -1].argmax())
        expected.append(next_id)
        if next_id == tokenizer.eos_id:
            break
    assert text == tokenizer.decode(expected)
    assert capsys.readouterr().out.startswith("The quick brown fox")
    # top-k 1 sampling is greedy; a seeded sample is reproducible
    loaded = generate.load_model(path, "debugmodel", 64, torch.device("cpu"))
    prompt = ids[:3]
    greedy = generate.generate(loaded, prompt, max_new_tokens=4, temperature=0)
    assert generate.generate(loaded, prompt, max_new_tokens=4, temperature=0.7, top_k=1) == greedy
    samples = [
        generate.generate(
            loaded,
            prompt,
            max_new_tokens=4,
            temperature=1.0,
            top_k=50,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (3, 3)
    ]
    assert samples[0] == samples[1] and len(samples[0]) == 4
