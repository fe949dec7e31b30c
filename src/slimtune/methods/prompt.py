"""Prompt tuning (Lester et al., 2021): k learnable token embeddings before the input.

    inputs_embeds' = [P_1 .. P_k, e(x_1) .. e(x_L)],     only P (k x d) trains

Initialisations: `"vocab"` (embeddings of tokens sampled among the 5,000 most frequent, see
`vocab.py`), `"labels"` (embeddings of the class-label words, one position per word, a
multi-token word averaged, remaining positions sampled as in `"vocab"`: the paper's rule),
`"uniform"` (U[-0.5, 0.5], the paper's worst), and `"text"` (the embeddings of a given text,
repeated or cut to k tokens; with exactly k tokens the tuned model equals the frozen model run
on `text + x`). Token-based inits take what the model's embedding module outputs, scale included
(Gemma multiplies by sqrt(d) inside it), since the prompt goes in as `inputs_embeds`, past that module.

Per row: rows of a batch may carry prompts of different lengths, or none. Their virtual tokens
are laid out so each row's prompt sits right before its input's first real token, and the padding is
masked: decoders pad on the left (`[pad, prompt, x]`, the input's own left padding moved in front of
the prompt, so generation continues on the right), encoders on the right (`[prompt, x, pad]`, so the
first position stays the first token, as pooling heads expect). Prompt and input touch in every row:
sliding-window attention (Gemma, Mistral) measures its window in columns, so a gap of padding between
them would put the prompt further from the input than it is in the row alone.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import TuningError
from ..routing import Routing
from . import vocab
from .base import Component, InitContext, Method, expect_shapes

if TYPE_CHECKING:
    from ..data import Task

INITS = ("vocab", "labels", "uniform", "text")


@dataclass(frozen=True)
class PromptTuning(Method):
    """`length` soft prompt tokens, initialised from `init` (vocab, labels, uniform or text)."""

    kind = "prompt"
    # Soft prompts start far from where they end up and need far larger rates than well-placed weights.
    default_lr = 3e-2
    compare_lr = 0.3
    label = "prompt tuning"
    length: int = 20
    init: str = "vocab"
    text: str | None = None
    label_words: tuple[str, ...] | None = None
    vocab_top: int = 5000

    def __post_init__(self):
        if self.length < 1:
            raise TuningError(f"PromptTuning length must be at least 1, got {self.length}")
        if self.init not in INITS:
            raise TuningError(f"PromptTuning init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.text:
            raise TuningError("PromptTuning(init='text') needs text='...'")
        if self.init == "labels" and not self.label_words:
            raise TuningError("PromptTuning(init='labels') needs label_words=[...], e.g. ['positive', 'negative']")
        if isinstance(self.label_words, list):
            object.__setattr__(self, "label_words", tuple(self.label_words))

    @property
    def virtual_tokens(self) -> int:
        return self.length

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--length", type=int, help="soft prompt tokens (default 20)")
        options.add_argument("--init", help="vocab|labels|uniform|text (default: labels on a classification task, else vocab)")
        options.add_argument("--init-text", help="the text for --init text")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> PromptTuning:
        init = args.init or ("labels" if task is not None and task.kind == "classification" else "vocab")
        words = label_words(task) if init == "labels" else None
        return cls(length=args.length or 20, init=init, text=args.init_text, label_words=words)

    @classmethod
    def study_defaults(cls, task_kind: str, family: str) -> dict[str, Any]:
        """The settings of the comparison study's plain prompt tuning: 20 tokens, initialised from the label
        words where the model answers through them (a decoder on a classification task), else from sampled
        vocabulary. The study's ablations vary these."""
        return {"init": "labels" if task_kind == "classification" and family != "encoder" else "vocab", "length": 20}

    @classmethod
    def for_study(cls, task: Task, model: nn.Module, family: str, options: dict[str, Any]) -> PromptTuning:
        settings = {**cls.study_defaults(task.kind, family), **options}
        words = label_words(task) if settings["init"] == "labels" else None
        return cls(length=settings["length"], init=settings["init"], label_words=words)


def label_words(task: Task | None) -> tuple[str, ...] | None:
    """The words of a task's labels, in the order of its labels."""
    return None if task is None else tuple(task.label_words[label] for label in task.labels)


class PromptTuningParameters(nn.Module):
    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(embeddings)


class PromptComponent(Component):
    kind = "prompt"
    prepends = True
    lives_in_cache = True  # the virtual tokens are inputs of the prefill: their keys and values are in the cache

    def into_cache(self, routing: Routing, cache, mask: torch.Tensor) -> torch.Tensor:
        return mask

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def _check_length(self, method: PromptTuning) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and method.length >= limit:
            raise TuningError(f"PromptTuning(length={method.length}) does not fit {type(self.model).__name__}: it has "
                              f"{limit} positions (max_position_embeddings) and the prompt must leave room for the input; "
                              f"use a length below {limit}")

    def build(self, method: PromptTuning, context: InitContext) -> nn.Module:
        self._check_length(method)
        embed = self.model.get_input_embeddings()
        k = method.length
        with torch.no_grad():
            if method.init == "uniform":
                init = torch.empty(k, self.width).uniform_(-0.5, 0.5)
            elif method.init == "text":
                ids = vocab.cycle(context.encode(method.text, "PromptTuning(init='text')"), k)
                init = embed(torch.tensor(ids, device=self.device)).float()
            else:
                rows = []
                if method.init == "labels":
                    for word in method.label_words[:k]:
                        ids = context.encode(word, f"PromptTuning label word {word!r}")
                        rows.append(embed(torch.tensor(ids, device=self.device)).float().mean(0))
                if len(rows) < k:
                    ids = vocab.sample_frequent(self.model, k - len(rows), context.tokenizer, method.vocab_top)
                    rows.extend(embed(torch.tensor(ids, device=self.device)).float())
                init = torch.stack(rows)
        return PromptTuningParameters(init.detach().cpu())

    def from_state(self, method: PromptTuning, state: dict[str, torch.Tensor]) -> nn.Module:
        self._check_length(method)
        expect_shapes(state, {"prompt": (method.length, self.width)}, "PromptTuning")
        return PromptTuningParameters(state["prompt"].detach().clone())

    def state(self, user: str) -> dict[str, torch.Tensor]:
        return {"prompt": self.tuning(user).prompt.detach()}

    def lengths(self, routing: Routing, batch: int) -> torch.Tensor:
        return routing.per_row(self, batch, lambda user: self.methods[user].length)

    def prepend(
        self, routing: Routing, embeds: torch.Tensor, mask: torch.Tensor, left: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Insert each row's prompt before its input. Returns (embeds, mask, starts): row b's
        input now begins at position starts[b]."""
        batch, length = embeds.shape[:2]
        k = self.lengths(routing, batch)
        total = int(k.max())
        starts = torch.full_like(k, total) if left else k
        lead = (mask.long().cumsum(-1) == 0).sum(-1)  # each row's padding before its first real token
        embeds = spread(embeds, starts, total, 0.0)
        mask = spread(mask, starts, total, 0)
        for user, rows in routing.groups(self, batch):
            prompt = self.tuning(user).prompt.to(embeds.dtype)
            n = prompt.shape[0]
            rows = torch.arange(batch, device=embeds.device) if rows is None else rows
            # Right before the first real token: over the row's own left padding, if it has any.
            cols = (starts[rows] + lead[rows] - n)[:, None] + torch.arange(n, device=embeds.device)
            embeds = embeds.index_put((rows[:, None], cols), prompt.expand(len(rows), n, -1))
            mask = mask.index_put((rows[:, None], cols), torch.ones((), dtype=mask.dtype, device=mask.device))
        return embeds, mask, starts


def spread(x: torch.Tensor, starts: torch.Tensor, extra: int, fill) -> torch.Tensor:
    """x [B, L, ...] placed at out[b, starts[b] : starts[b] + L] of a tensor `extra` positions longer."""
    if extra == 0:
        return x
    batch, length = x.shape[:2]
    out = x.new_full((batch, length + extra, *x.shape[2:]), fill)
    index = (starts[:, None] + torch.arange(length, device=x.device)).view(batch, length, *[1] * (x.dim() - 2))
    return out.scatter(1, index.expand_as(x), x)


def gather_real(y: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of `spread`: y[b, starts[b] : starts[b] + length] for each row."""
    if y.shape[1] == length:
        return y
    first = int(starts[0])
    if bool((starts == first).all()):  # decoders: every row starts at the same column, a view will do
        return y[:, first : first + length]
    batch = y.shape[0]
    index = (starts[:, None] + torch.arange(length, device=y.device)).view(batch, length, *[1] * (y.dim() - 2))
    return y.gather(1, index.expand(batch, length, *y.shape[2:]))


PromptTuning.component = PromptComponent
