"""Training losses, summed (the trainer divides by the loss terms of the whole step).

`linear_cross_entropy` is the language-model loss computed from the last hidden states without
ever holding the [tokens x vocabulary] logits, their softmax or their gradient in memory: it
works through the target tokens in chunks and, since the output projection is frozen, computes
the gradient of the hidden states during the forward pass (softmax - one-hot, times the
projection), keeping only that [tokens x hidden] tensor for backward. The same matrix products
as the ordinary path, a fraction of its memory: with a 49k vocabulary the logits of 8 x 128 tokens
alone take 200 MB in fp32, and the ordinary path keeps about three such tensors.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: next-token for language models ([B, L, V] logits), per example for heads."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        targets = labels.reshape(-1).index_select(0, rows)
        grad = torch.zeros_like(flat)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(rows), chunk):
            idx = rows[start : start + chunk]
            y = targets[start : start + chunk]
            logits = F.linear(flat.index_select(0, idx), weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            probs = torch.exp(logits - lse[:, None])  # d(loss)/d(logits) = softmax - one-hot
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad.index_copy_(0, idx, (probs.to(weight.dtype) @ weight).to(grad.dtype))
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype)).view(ctx.shape), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Summed next-token cross-entropy of `head(hidden)` against `labels` ([B, L], -100 ignored), for a
    frozen `head`; equal to `loss_sum(head(hidden), labels)` without materialising the logits."""
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("linear_cross_entropy needs a frozen output projection; use loss_sum on the logits")
    return _LinearCrossEntropy.apply(hidden[:, :-1], head.weight, head.bias, labels[:, 1:].contiguous(), chunk)


def fusable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection of a causal language model whose logits are exactly `head(last hidden
    state)` (no soft-capping or scaling), when it is frozen; else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    plain = not any(getattr(config, f, None) for f in ("final_logit_softcapping", "logit_scale", "output_multiplier"))
    causal_lm = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    if causal_lm and plain and isinstance(head, torch.nn.Linear) and not head.weight.requires_grad:
        return head
    return None
