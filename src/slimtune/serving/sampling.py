"""A row's next token: greedy, or sampled by temperature and nucleus (top-p) from the row's own generator."""

from __future__ import annotations

import torch

from ..errors import RequestError


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One row's next token sampled from its logits [vocab], safe for every accepted setting: in float64,
    shifted so the largest logit is 0 before dividing (no overflow, however small the temperature), and the
    most likely token always stays in the nucleus (however small top_p)."""
    logits = logits.double()
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise RequestError("the tuning's scores for the next token are not all numbers (NaN or infinity); it cannot be "
                           "sampled from")
    probs = ((logits - logits.max()) / temperature).softmax(-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= top_p  # keep the smallest head reaching top_p
        outside[0] = False
        probs = torch.zeros_like(probs).scatter(0, order, ordered.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
