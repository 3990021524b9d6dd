"""The FLOPs-per-token formula behind TFLOP/s and MFU, against torch's FLOP counter.

``get_nparams_and_flops`` gives 6·(params − embedding) + 12·layers·heads·head_dim·seq_len.
FlopCounterMode counts every matmul of a real forward + backward. The expected relation:

- matmuls: 2 FLOPs per weight per token forward, 4 backward (input and weight grads) → 6
  per weight of every nn.Linear; the formula also counts the RMSNorm weights (6 each), which
  do no matmul, so counted = formula − 6·norm params per token;
- attention: QKᵀ and the weighted sum of V cost 4·heads·head_dim·seq_len per token forward,
  twice that backward → 12·heads·head_dim·seq_len per layer. This counts the causal scores
  in full (as the paper and MFU conventions do), although half of them are masked; the
  math SDPA backend computes them all too, so it matches exactly. (The fused CPU/flash
  kernels are not seen by FlopCounterMode at all, hence the math backend here.)
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from torchtitan.models import get_model_spec
from torchtitan.models.llama3.args import llama3_configs


def test_debug_model_flops_match_formula():
    seq_len, batch, vocab = 64, 1, 512
    args = dataclasses.replace(llama3_configs["debugmodel"], vocab_size=vocab, max_seq_len=seq_len)
    torch.manual_seed(0)
    model = get_model_spec("llama3").model_cls(args)
    model.init_weights()
    nparams, flops_per_token = args.get_nparams_and_flops(model, seq_len)
    assert nparams == sum(p.numel() for p in model.parameters())

    tokens = torch.randint(0, vocab, (batch, seq_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).float().sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    ntokens = batch * seq_len

    # Independent hand count from the module shapes.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * args.n_layers * args.n_heads * (args.dim // args.n_heads) * seq_len
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = model.tok_embeddings.weight.numel()
    assert linear + norms + embedding == nparams  # nothing else carries parameters

    assert counts["aten.mm"] == 6 * linear * ntokens
    assert counts["aten.bmm"] == attention * ntokens  # full (unmasked) causal attention
    assert counter.get_total_flops() == (flops_per_token - 6 * norms) * ntokens
    # The norm weights are a rounding error of the formula (<0.1% here, less at scale).
    assert 6 * norms / flops_per_token < 1e-3
