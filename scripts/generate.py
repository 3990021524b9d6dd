"""Sample text from a checkpoint on one device (CUDA if there is one, else the CPU).

    python scripts/generate.py --checkpoint outputs/checkpoint/step-1000 --flavor debugmodel \
        --tokenizer tests/assets/test_tiktoken.model --prompt "Once upon a time" \
        --max-new-tokens 64 --temperature 0.8 --top-k 50 --seed 0

Reads only the model weights of the checkpoint (full or weights-only, any saved layout).
``--temperature 0`` is greedy decoding. The model has no KV cache, so every new token runs
the whole sequence again: fine for checking a checkpoint, not for serving.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from torchtitan.components.checkpoint import CheckpointError, read_model_state
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.models import get_model_args, get_model_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    checkpoint: str,
    flavor: str,
    max_seq_len: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    model_name: str = "llama3",
) -> nn.Module:
    """The model of ``flavor`` with the checkpoint's weights, in eval mode."""
    state = read_model_state(checkpoint)
    args = get_model_args(model_name, flavor)
    if "tok_embeddings.weight" in state:
        args.vocab_size = state["tok_embeddings.weight"].shape[0]
    args.max_seq_len = max_seq_len
    with torch.device("meta"):
        model = get_model_spec(model_name).model_cls(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(set(expected) | set(state)):
        if key not in state or key not in expected or tuple(state[key].shape) != expected[key]:
            ours = expected.get(key, "absent")
            theirs = tuple(state[key].shape) if key in state else "absent"
            raise ValueError(
                f"checkpoint {checkpoint} does not fit flavor {flavor!r}: {key} is {theirs} "
                f"in the checkpoint, {ours} in the model"
            )
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)  # the rotary table; weights come next
    model.load_state_dict(state)
    for param in model.parameters():  # not model.to(dtype): that would cast the complex rotary table
        param.data = param.data.to(dtype)
    return model.eval()


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The new token ids (at most ``max_new_tokens``; stops after ``eos_id``)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens)[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        new.append(next_id)
        if next_id == eos_id:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return new


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="DCP checkpoint directory")
    parser.add_argument("--flavor", required=True, help="llama3 flavor the checkpoint was trained with")
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer file (tiktoken model or tokenizer.json)"
    )
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or (args.top_k is not None and args.top_k < 1):
        parser.error("--max-new-tokens and --top-k must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = build_tokenizer(args.tokenizer)
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
        model = load_model(
            args.checkpoint, args.flavor, len(prompt) + args.max_new_tokens, device, DTYPES[args.dtype]
        )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"generate: error: {e}")
    generator = torch.Generator().manual_seed(args.seed)
    new = generate(
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    text = tokenizer.decode(new)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
