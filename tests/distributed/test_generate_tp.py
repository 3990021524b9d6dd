"""torchtitan.generate (scripts/generate.py) tensor-parallel over 2 CPU ranks (gloo) against one
process.

The debug flavor with seeded random weights is written as a weights-only checkpoint; the
ranks run its own ``main`` (as torchrun would: WORLD_SIZE 2, so the model is split
with the trainer's TP plan). Checked: the TP model's logits for the prompt equal the
single-process model's (fp32, 1e-5 relative: only the reduction order differs), and greedy
and seeded top-k sampling give the same text on both ranks as in one process.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import torchtitan.generate as generate_module
from harness import launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "tests" / "assets" / "test_tiktoken.model")
PROMPT = "Once upon a time"  # 5 tokens with BOS: odd, so TP pads it
RUNS = {
    "greedy": ["--max-new-tokens", "8", "--temperature", "0"],
    "top_k": ["--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "50", "--seed", "3"],
}


def _argv(checkpoint: str, run: str) -> list[str]:
    return ["--checkpoint", checkpoint, "--flavor", "debugmodel", "--tokenizer", TOKENIZER,
            "--prompt", PROMPT, *RUNS[run]]  # fmt: skip


def _prompt_logits(generate: ModuleType, checkpoint: str, tp: int) -> torch.Tensor:
    from torchtitan.components.tokenizer import build_tokenizer

    ids = build_tokenizer(TOKENIZER).encode(PROMPT, bos=True, eos=False)
    assert len(ids) % 2  # an odd length: the TP input needs the padding
    model = generate.load_model(checkpoint, "debugmodel", 64, torch.device("cpu"), tp=tp)
    logits = generate.next_token_logits(model, torch.tensor([ids]), seq_multiple=tp)
    assert not hasattr(logits, "placements")  # the full logits, not a DTensor shard
    return logits


def rank_main(checkpoint: str) -> dict[str, Any]:
    texts = {run: generate_module.main(_argv(checkpoint, run)) for run in RUNS}
    tp_weights = sum(hasattr(p, "placements") for p in generate_module.load_model(
        checkpoint, "debugmodel", 64, torch.device("cpu"), tp=2).parameters())  # fmt: skip
    logits = _prompt_logits(generate_module, checkpoint, tp=2).tolist()
    return {"texts": texts, "logits": logits, "dtensor_params": tp_weights}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from torchtitan.components.checkpoint import write_model_state
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.models import get_model_args, get_model_spec

    args = get_model_args("llama3", "debugmodel")
    args.vocab_size = build_tokenizer(TOKENIZER).vocab_size
    torch.manual_seed(0)
    model = get_model_spec("llama3").model_cls(args)
    with torch.no_grad():
        model.init_weights()
    path = str(tmp_path_factory.mktemp("generate") / "weights")
    write_model_state(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ranks(checkpoint: str) -> list[dict[str, Any]]:
    return launch("test_generate_tp:rank_main", 2, timeout=300, checkpoint=checkpoint)


def test_tp_model_is_sharded_and_gives_the_single_process_logits(checkpoint: str, ranks: list) -> None:
    reference = _prompt_logits(generate_module, checkpoint, tp=1)
    for rank in ranks:
        assert rank["dtensor_params"] > 0  # the weights really are split
        torch.testing.assert_close(torch.tensor(rank["logits"]), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_tp_generation_equals_one_process(checkpoint: str, ranks: list, run: str) -> None:
    expected = generate_module.main(_argv(checkpoint, run))
    assert expected  # eight new tokens decode to some text
    assert [rank["texts"][run] for rank in ranks] == [expected, expected]
