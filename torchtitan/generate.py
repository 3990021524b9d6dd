"""Sample text from a checkpoint, on one device or tensor-parallel over several.

    python scripts/generate.py --checkpoint outputs/checkpoint/step-1000 --flavor debugmodel \
        --tokenizer tests/assets/test_tiktoken.model --prompt "Once upon a time" \
        --max-new-tokens 64 --temperature 0.8 --top-k 50 --seed 0
    python scripts/generate.py --model.name qwen3 --flavor debugmodel_moe --checkpoint ...
    torchrun --nproc_per_node 8 scripts/generate.py --checkpoint ... --flavor 70B ...

``python -m torchtitan.generate`` takes the same options (scripts/generate.py calls
:func:`main`). One process uses CUDA if there is one, else the CPU. Under torchrun the model
is split with the trainer's tensor-parallel plan over all ranks (a model too large for one
GPU; the head counts must divide by the number of ranks), every rank computes the same full
logits, rank 0 draws each token and sends it to the others, and rank 0 prints. Reads only the model
weights of the checkpoint (full or weights-only, any saved layout). ``--temperature 0`` is
greedy decoding. The model has no KV cache, so every new token runs the whole sequence
again: fine for checking a checkpoint, not for serving.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from torchtitan.components.checkpoint import CheckpointError, read_model_state
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config import ConfigError, JobConfig
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.distributed.utils import TORCH_DTYPE_MAP
from torchtitan.models import get_model_args, get_model_spec


def load_model(
    checkpoint: str,
    flavor: str,
    max_seq_len: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    model_name: str = "llama3",
    tp: int = 1,
) -> nn.Module:
    """The model of ``flavor`` with the checkpoint's weights, in eval mode; with ``tp`` > 1
    split over the default process group's ranks by the model's own parallelize function
    (tensor parallel only, no loss parallel: the output layer returns full logits)."""
    state = read_model_state(checkpoint)
    args = get_model_args(model_name, flavor)
    if getattr(args, "enable_weight_tying", False) and "tok_embeddings.weight" in state:
        state.setdefault("output.weight", state["tok_embeddings.weight"])  # one tensor, two names
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
    if tp > 1:
        job_config = JobConfig()
        job_config.parallelism.tensor_parallel_degree = tp
        job_config.parallelism.disable_loss_parallel = True
        job_config.activation_checkpoint.mode = "none"
        parallel_dims = ParallelDims(
            dp_replicate=1, dp_shard=1, cp=1, tp=tp, pp=1, world_size=tp, enable_loss_parallel=False
        )
        parallel_dims.build_mesh(device.type)
        model = get_model_spec(model_name).parallelize_fn(model, parallel_dims, job_config)
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)  # the rotary table; weights come next
    if tp > 1:  # every rank holds the full tensors and keeps its own shard of each
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state)
    for param in model.parameters():  # not model.to(dtype): that would cast the complex rotary table
        param.data = param.data.to(dtype)
    return model.eval()


@torch.no_grad()
def next_token_logits(model: nn.Module, tokens: torch.Tensor, seq_multiple: int = 1) -> torch.Tensor:
    """fp32 logits ``[vocab]`` after the last of ``tokens`` ``[1, seq]``.

    Sequence parallelism splits the sequence evenly over the TP ranks, so the input is
    padded at the end to a multiple of ``seq_multiple``; attention is causal, so the padding
    changes nothing at the positions before it.
    """
    seq = tokens.shape[1]
    padded = -seq % seq_multiple
    if padded:
        tokens = torch.cat([tokens, tokens.new_zeros(1, padded)], dim=1)
    return model(tokens)[0, seq - 1].float()


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
    seq_multiple: int = 1,
) -> list[int]:
    """The new token ids (at most ``max_new_tokens``; stops after ``eos_id``).
    ``seq_multiple``: the TP degree (see ``next_token_logits``)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, tokens, seq_multiple)
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if distributed:  # rank 0's choice: one near-tie decided apart would split the ranks
            chosen = torch.tensor([next_id], device=device)
            dist.broadcast(chosen, src=0)
            next_id = int(chosen)
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
    parser.add_argument(
        "--model.name", "--model", dest="model_name", default="llama3",
        help="model family the checkpoint was trained with (model.name: llama3, qwen3, deepseek_v3)",
    )
    parser.add_argument("--flavor", required=True, help="model flavor the checkpoint was trained with")
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer file (tiktoken model or tokenizer.json)"
    )
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPE_MAP), default="float32")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or (args.top_k is not None and args.top_k < 1):
        parser.error("--max-new-tokens and --top-k must be >= 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # under torchrun: tensor parallel over every rank
        from torchtitan.distributed.utils import device_type, init_distributed

        init_distributed(init_timeout_seconds=300, trace_buf_size=0, dump_folder=".")
        index = torch.cuda.current_device() if device_type == "cuda" else None  # set from LOCAL_RANK
        device = torch.device(device_type, index)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = build_tokenizer(args.tokenizer)
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
        model = load_model(
            args.checkpoint,
            args.flavor,
            len(prompt) + args.max_new_tokens + world_size - 1,  # + the padding for TP
            device,
            TORCH_DTYPE_MAP[args.dtype],
            model_name=args.model_name,
            tp=world_size,
        )
    except ConfigError as e:  # a layout the model does not allow (head counts vs ranks)
        sys.exit(f"generate: error: tensor parallel over {world_size} ranks: {e}")
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
        seq_multiple=world_size,
    )
    text = tokenizer.decode(new)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
