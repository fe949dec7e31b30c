"""Prefix tuning (Li & Liang, 2021) and P-tuning v2: learnable keys and values at every attention layer.

    K' = [P_key, K],  V' = [P_value, V],  head_i = Attn(Q W_q, K' , V')      (Q unchanged)

`reparam="mlp"` trains P through Li & Liang's reparameterisation,
P = P_0 + MLP(E) with E an embedding(k, d) and MLP = Linear -> tanh -> Linear(sum of the layers'
2·kv_heads·head_dim); saved tunings hold only the computed P. `reparam=None` trains P directly
(P-tuning v2).

Where the prefix goes in: transformers' attention-function registry (`AttentionInterface`).
Every supported architecture calls the registered function as
`fn(module, query, key, value, attention_mask, **kwargs)` with keys and values already rotated
and already including the KV cache; slimtune registers `slimtune_<impl>` wrapping the model's
own implementation (sdpa, eager, ...), and the wrapper prepends the prefix rows of the batch and
widens the mask. Nothing goes through `past_key_values` or cache objects, so cache-class changes
cannot break it, and gradient checkpointing works.

Positions, `positions="after-prefix"` (Li & Liang, PEFT): the prefix occupies positions 0..k-1
and the real tokens follow (their `position_ids` are offset by k, by a forward pre-hook), so a
prefix made of the keys and values the frozen model computes for a real text (`init="text"`)
reproduces the frozen model run on `text + x` exactly, on decoders. `positions="from-zero"`
(AdapterHub's prefix tuning): the real tokens keep the positions 0.. they have without a prefix,
and the prefix takes none; in the KV cache its k columns are then left out of the positions
counted from the mask (`unpositioned_columns`). The two mix row by row in one batch. T5's
relative position bias gives the prefix columns no bias. On sliding-window layers (Gemma 3,
Mistral) the window applies to the prefix too, counted in positions: a query at position p sees
prefix position j only if p - j < window, as it would see that text in the sequence (so
"from-zero", where the prefix has no positions, is refused there).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import modules
from ..errors import TuningError
from ..routing import Routing, active, routed
from . import vocab
from .base import Component, InitContext, Method, expect_shapes, site_key

if TYPE_CHECKING:
    from ..data import Task

INITS = ("vocab", "text", "random")
POSITIONS = ("after-prefix", "from-zero")


@dataclass(frozen=True)
class PrefixTuning(Method):
    """`length` learnable key/value positions in every self-attention layer."""

    kind = "prefix"
    # A prefix trained directly (reparam=None) takes a large rate, as soft prompts do. Li & Liang's MLP is the
    # exception: each prefix value sums hundreds of hidden units, each moved ~lr by Adam per step.
    default_lr = 5e-3
    compare_lr = 1e-2
    mlp_default_lr = 1e-4
    mlp_compare_lr = 3e-4
    label = "prefix tuning"
    length: int = 10
    reparam: str | None = "mlp"
    mlp_hidden: int = 512
    init: str = "vocab"
    text: str | None = None
    vocab_top: int = 5000
    positions: str = "after-prefix"  # the real tokens' positions: after the prefix's k, or from 0 (AdapterHub)

    def __post_init__(self):
        if self.length < 1:
            raise TuningError(f"PrefixTuning length must be at least 1, got {self.length}")
        if self.reparam not in ("mlp", None):
            raise TuningError(f"PrefixTuning reparam must be 'mlp' or None (P-tuning v2), got {self.reparam!r}")
        if self.init not in INITS:
            raise TuningError(f"PrefixTuning init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.text:
            raise TuningError("PrefixTuning(init='text') needs text='...'")
        if self.positions not in POSITIONS:
            raise TuningError(f"PrefixTuning positions must be one of {POSITIONS} (the real tokens' positions: after "
                              f"the prefix's, or from 0 as in AdapterHub), got {self.positions!r}")

    @property
    def position_shift(self) -> int:
        """How far the prefix moves the real tokens' positions."""
        return self.length if self.positions == "after-prefix" else 0

    def learning_rate(self, study: bool = False) -> float:
        if self.reparam == "mlp":
            return self.mlp_compare_lr if study else self.mlp_default_lr
        return super().learning_rate(study)

    @classmethod
    def cli_options(cls, options: Any) -> None:
        options.add_argument("--length", type=int, help="positions per layer (default 10)")
        options.add_argument("--init", help="vocab|text|random (default vocab)")
        options.add_argument("--init-text", help="the text for --init text")
        options.add_argument("--reparam", default="mlp", help="mlp (Li & Liang) or none (P-tuning v2)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> PrefixTuning:
        reparam = None if args.reparam in ("none", "None") else args.reparam
        return cls(length=args.length or 10, reparam=reparam, init=args.init or "vocab", text=args.init_text)


# --- the attention function ------------------------------------------------------------------

def _inner_attention(base: str, module: nn.Module):
    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" is not in the registry: each modeling file defines its own eager_attention_forward.
    return sys.modules[type(module).__module__].eager_attention_forward


def _visible_mask(mask, valid, query, key, causal: bool, window: int | None = None, positions=None):
    """The attention mask widened by the prefix columns (visible where `valid`), never None.

    On a sliding-window layer a query at position p sees prefix position j only if p - j < window, as it
    would see the text a prefix was computed from (`init="text"`) if that text were in the sequence. The
    window is measured in positions (`positions`: the queries', [B or 1, Q]), since padding may sit between
    the prefix columns and the row's first token.
    """
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    cols = valid[:, None, None, :]  # [B, 1, 1, K]
    if window is not None:
        j = torch.arange(valid.shape[1], device=valid.device)
        cols = cols & (positions.to(valid.device)[:, None, :, None] - j < window)  # [B, 1, Q, K]
    if mask is None:
        if causal and q_len > 1:  # aligned bottom-right: query i sees keys up to i + (kv - q)
            i = torch.arange(q_len, device=key.device)[:, None]
            j = torch.arange(kv_len, device=key.device)[None, :]
            mask = (j <= i + (kv_len - q_len))[None, None]
        else:
            mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=key.device)
    mask = mask.expand(batch, mask.shape[1], mask.shape[2], mask.shape[3])
    cols = cols.expand(batch, mask.shape[1], mask.shape[2], -1)
    if mask.dtype != torch.bool:
        blocked = torch.finfo(mask.dtype).min
        cols = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~cols, blocked)
    return torch.cat([cols, mask], dim=-1)


def _prefixed_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = _inner_attention(base, module)
        routing = active()
        if routing is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        if routing.capture is not None:
            routing.capture[module] = (query.shape[2], key.detach(), value.detach())
        prefix = None
        for component in routing.components:
            if isinstance(component, PrefixComponent):
                prefix = component.batch_prefix(module, routing, query.shape[0])
                if prefix is not None:
                    break
        if prefix is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        p_key, p_value, valid = prefix
        is_causal = kwargs.pop("is_causal", None)
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        positions = kwargs.get("position_ids")
        if window is not None and positions is None:
            raise TuningError(f"PrefixTuning on the sliding-window layer {type(module).__name__} needs the queries' "
                              "position_ids in the attention call to apply the window to the prefix; this model "
                              "does not pass them")
        # Every layer of one forward gets the same mask (one per window): widen it once (keyed by the tensors,
        # kept in the entry so that their ids stay theirs).
        widened = ("prefix-mask", id(attention_mask), id(valid), tuple(query.shape), tuple(key.shape), causal, window,
                   id(positions) if window is not None else None)
        if widened not in routing.cache:
            routing.cache[widened] = (attention_mask, positions,
                                      _visible_mask(attention_mask, valid, query, key, causal, window, positions))
        attention_mask = routing.cache[widened][2]
        key = torch.cat([p_key.to(key.dtype), key], dim=2)
        value = torch.cat([p_value.to(value.dtype), value], dim=2)
        bias = kwargs.get("position_bias")
        if bias is not None:
            kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], p_key.shape[2]), bias], dim=-1)
        return inner(module, query, key, value, attention_mask, is_causal=False, **kwargs)

    return attention


def use_prefix_attention(model: nn.Module) -> None:
    """Route the model's attention through slimtune's wrapper of its current implementation."""
    current = model.config._attn_implementation or "eager"
    if current.startswith("slimtune_"):
        return
    name = f"slimtune_{current}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _prefixed_attention(current))
        # Without a mask function under the new name transformers builds no padding mask at all.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)


# --- the component ---------------------------------------------------------------------------

class PrefixParameters(nn.Module):
    """One user's prefix: direct per-site tensors [2, kv_heads, k, head_dim], or the MLP that makes them."""

    def __init__(self, method: PrefixTuning, shapes: dict[str, tuple[int, int]], start: dict[str, torch.Tensor] | None,
                 width: int, direct: bool):
        super().__init__()
        self.names = list(shapes)
        self.shapes = shapes
        self.length = method.length
        k = method.length
        if direct:
            self.prefix = nn.ParameterDict({
                site_key(n): nn.Parameter(start[n].clone() if start else torch.randn(2, h, k, d))
                for n, (h, d) in shapes.items()
            })
        else:
            self.sizes = [2 * h * d for h, d in shapes.values()]  # per prefix position
            self.embedding = nn.Embedding(k, width)
            hidden = method.mlp_hidden
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, sum(self.sizes)))
            base = torch.zeros(k, sum(self.sizes))
            if start:  # start exactly at the given prefix: P = P_0 + MLP(E) with a zero last layer
                base = torch.cat([start[n].permute(2, 0, 1, 3).reshape(k, -1) for n in self.names], dim=1)
                nn.init.zeros_(self.mlp[2].weight)
                nn.init.zeros_(self.mlp[2].bias)
            self.register_buffer("base", base)

    def tables(self) -> dict[str, torch.Tensor]:
        if hasattr(self, "prefix"):
            return {n: self.prefix[site_key(n)] for n in self.names}
        flat = self.base + self.mlp(self.embedding.weight)  # [k, sum of 2*h*d]
        out = {}
        for n, part in zip(self.names, flat.split(self.sizes, dim=1), strict=True):
            h, d = self.shapes[n]
            out[n] = part.reshape(self.length, 2, h, d).permute(1, 2, 0, 3)
        return out


class PrefixComponent(Component):
    kind = "prefix"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        use_prefix_attention(model)
        self.sites = self._probe()  # module -> (name, kv_heads, head_dim)
        self.names = {name: module for module, (name, _, _) in self.sites.items()}
        # On the body (LlamaModel inside LlamaForCausalLM): every path to the layers goes through it.
        body = modules.body(model)
        self.shifts_positions = modules.accepts(body, "position_ids")
        self.first_position = modules.position_start(model)
        self._handles.append(body.register_forward_pre_hook(self._offset_positions, with_kwargs=True))

    def _run_capture(self, ids: torch.Tensor, decoder_ids: torch.Tensor) -> dict:
        capture: dict = {}
        inputs = {"input_ids": ids}
        if modules.is_encoder_decoder(self.model):
            inputs["decoder_input_ids"] = decoder_ids
        with torch.no_grad(), routed(Routing([None] * ids.shape[0], {}, ids.device, capture=capture)):
            self.model(**inputs, use_cache=False)
        return capture

    def _probe(self) -> dict[nn.Module, tuple[str, int, int]]:
        """Find the self-attention modules by watching one tiny forward pass: cross-attention
        (whose keys come from the encoder, of another length) is left alone."""
        ids = torch.tensor([[5, 6, 7]], device=self.device)
        names = {m: n for n, m in self.model.named_modules()}
        sites = {}
        for module, (q_len, key, _) in self._run_capture(ids, ids[:, :2]).items():
            if key.shape[2] == q_len:
                sites[module] = (names[module], key.shape[1], key.shape[3])
        if not sites:
            raise TuningError(f"PrefixTuning found no self-attention in {type(self.model).__name__}")
        return sites

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (h, d) for name, h, d in self.sites.values()}

    def _check_positions(self, method: PrefixTuning) -> None:
        config = modules.text_config(self.model)
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
            window and getattr(config, "use_sliding_window", True))
        if method.positions == "from-zero" and sliding:
            raise TuningError(f"PrefixTuning(positions='from-zero') on {type(self.model).__name__}, whose layers have a "
                              "sliding window: the window is counted in positions and this prefix has none; slimtune "
                              "applies such a prefix on models without sliding windows only")

    def build(self, method: PrefixTuning, context: InitContext) -> nn.Module:
        self._check_positions(method)
        start = None
        if method.init != "random":
            if method.init == "text":
                ids = vocab.cycle(context.encode(method.text, "PrefixTuning(init='text')"), method.length)
            else:
                ids = vocab.sample_frequent(self.model, method.length, context.tokenizer, method.vocab_top)
            start = self.prefix_of(torch.tensor([ids], device=self.device))
        width = self.model.get_input_embeddings().weight.shape[1]
        return PrefixParameters(method, self.shapes(), start, width, direct=method.reparam is None)

    def prefix_of(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keys and values the frozen model computes for `ids` [1, k], per site: [2, kv, k, hd]."""
        capture = self._run_capture(ids, ids)
        return {
            name: torch.stack([capture[module][1][0], capture[module][2][0]]).float().cpu()
            for module, (name, _, _) in self.sites.items()
        }

    def from_state(self, method: PrefixTuning, state: dict[str, torch.Tensor]) -> nn.Module:
        self._check_positions(method)
        k = method.length
        expect_shapes(state, {f"{n}.prefix": (2, h, k, d) for n, (h, d) in self.shapes().items()}, "PrefixTuning")
        start = {n: state[f"{n}.prefix"].float() for n in self.shapes()}
        return PrefixParameters(method, self.shapes(), start, 0, direct=True)

    def state(self, user: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {f"{n}.prefix": t.detach().contiguous() for n, t in self.tuning(user).tables().items()}

    nulls = (0.0,)  # slot 0: no prefix (its columns are masked out)

    def slot_group(self, user: str) -> int | None:
        """A prefix held as keys and values (not made by its MLP in training) has a slot in the table of its length."""
        return self.methods[user].length if hasattr(self.tuning(user), "prefix") else None

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        return (self.tuning(user).prefix[site_key(name)],)  # [2, kv_heads, k, head_dim]

    def _from_slots(self, routing: Routing, batch: int) -> bool:
        """Whether this batch's prefixes are read from the slot tables: in inference, every user's prefix in one."""
        key = ("prefix-from-slots", id(self), batch)
        if key not in routing.cache:
            routing.cache[key] = not torch.is_grad_enabled() and all(
                self.slot_group(user) is not None for user, _ in routing.groups(self, batch))
        return routing.cache[key]

    def prepare(self, routing: Routing) -> None:
        # The MLP runs once per batch, not once per layer (and in inference, once until the tuning changes).
        if self._from_slots(routing, len(routing.users)):
            return
        users = [user for user, _ in routing.groups(self)]
        routing.cache[self] = {user: self.kept(("tables", user), [user], self.tuning(user).tables) for user in users}

    def _slotted_prefix(self, name: str, routing: Routing, batch: int):
        """Each row's prefix at one site from the slot tables, one table per prefix length side by side: a row's
        columns are valid in its own table's part only (slot 0, zeros, in the others)."""
        found = [(table, rows) for table, rows in self.slot_rows(routing, batch) if name in table.tensors]
        parts = [rows.params(name).vector(0) for _, rows in found]  # [batch, 2, kv_heads, k, head_dim] each
        p = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
        key = ("prefix-slot-columns", id(self), batch)  # the same for every layer of this batch
        if key not in routing.cache:
            routing.cache[key] = torch.cat([(rows.index != 0)[:, None].expand(batch, table.tensors[name][0].shape[3])
                                            for table, rows in found], dim=1)
        return p[:, 0], p[:, 1], routing.cache[key]

    def batch_prefix(self, module: nn.Module, routing: Routing, batch: int):
        site = self.sites.get(module)
        groups = routing.groups(self, batch) if site is not None else []
        if not groups:
            return None
        name = site[0]
        if self._from_slots(routing, batch):
            return self._slotted_prefix(name, routing, batch)
        tables = routing.cache.get(self)
        if tables is None:
            self.prepare(routing)
            tables = routing.cache[self]
        lengths = {user: tables[user][name].shape[2] for user, _ in groups}
        total = max(lengths.values())
        if len(groups) == 1 and groups[0][1] is None:
            table = tables[groups[0][0]][name]
            p = table.unsqueeze(1).expand(2, batch, *table.shape[1:])
            valid = torch.ones(batch, total, dtype=torch.bool, device=table.device)
            return p[0], p[1], valid
        # Many users: one stack of their (padded) prefixes and one gather by row, not a loop over users.
        users, rows, which = routing.stacked(self, batch)
        h, d = site[1], site[2]

        def gather():
            padded = torch.stack([nn.functional.pad(tables[u][name], (0, 0, 0, total - lengths[u])) for u in users])
            return padded.new_zeros(batch, 2, h, total, d).index_copy(0, rows, padded[which])

        p = self.kept(("site", name, tuple(users), routing.owners_key(self, batch)), users, gather, routing)
        key = ("prefix-columns", id(self), batch)  # the same for every layer of this batch
        if key not in routing.cache:
            k = torch.tensor([lengths[u] for u in users], device=rows.device)[which]
            valid = torch.zeros(batch, total, dtype=torch.bool, device=rows.device)
            valid[rows] = torch.arange(total, device=rows.device)[None, :] < k[:, None]
            routing.cache[key] = valid
        return p[:, 0], p[:, 1], routing.cache[key]

    lives_in_cache = True

    def unpositioned_columns(self, user: str) -> int:
        """A prefix with positions='from-zero' takes no positions: its k cache columns count for none."""
        method = self.methods[user]
        return method.length - method.position_shift

    def into_cache(self, routing: Routing, cache: Any, mask: torch.Tensor) -> torch.Tensor:
        """Each prefix row's prefix becomes cache columns just before its first token (its valid columns only, in
        order), so decoding steps attend to it as to any cached token, with no prefix work per step. Positions
        follow: the mask counts k columns before the row's tokens, as the prefix's positions 0..k-1 are. A window
        counted in columns is then one counted in positions."""
        batch = mask.shape[0]
        prefixes = {}
        for module in self.sites:
            prefix = self.batch_prefix(module, routing, batch)
            if prefix is None:  # no prefix row in this batch
                return mask
            index = getattr(module, "layer_idx", None)
            if index is None or not 0 <= index < len(cache.layers):
                raise TuningError(f"{type(module).__name__} has no cache layer index; prefix rows cannot be decoded "
                                  "from the cache")
            prefixes[index] = prefix
        valid = next(iter(prefixes.values()))[2]  # [B, T]: the same for every layer
        width, total = mask.shape[1], valid.shape[1]
        k = valid.sum(1)
        longest = int(k.max())
        first = mask.long().argmax(1)  # each row's first column (left-padded rows)
        c = torch.arange(longest + width, device=mask.device)[None]
        start = (first + longest - k)[:, None]  # where the row's prefix begins in the widened cache
        in_prefix = (c >= start) & (c < (first + longest)[:, None])
        # Gather each new column from [the row's valid prefix columns in order | the old columns | a zero column].
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        index = torch.where(in_prefix, c - start, torch.where(c >= longest, total + c - longest, total + width))
        for i, (p_key, p_value, _) in prefixes.items():
            layer = cache.layers[i]
            for name, p in (("keys", p_key), ("values", p_value)):
                old = getattr(layer, name)
                b, h, _, d = old.shape
                compact = p.to(old.dtype).gather(2, order[:, None, :, None].expand(b, h, total, d))
                source = torch.cat([compact, old, old.new_zeros(b, h, 1, d)], dim=2)
                setattr(layer, name, source.gather(2, index[:, None, :, None].expand(b, h, longest + width, d)))
        return torch.cat([mask.new_zeros(batch, longest), mask], dim=1).masked_fill(in_prefix, 1)

    def _offset_positions(self, model, args, kwargs):
        """Real tokens follow the prefix: position_ids += k on each prefix row with positions='after-prefix' (by 0
        with 'from-zero'), from positions that follow the mask when none are given."""
        routing = active()
        if routing is None or not self.shifts_positions:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, q_len = tokens.shape[:2]
        if not routing.groups(self, batch):
            return None
        offset = routing.per_row(self, batch, lambda user: self.methods[user].position_shift)
        positions = kwargs.get("position_ids")
        if positions is None:
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                positions = modules.mask_positions(mask, self.first_position)[:, -q_len:]
            else:
                cache = kwargs.get("cache") or kwargs.get("past_key_values")
                past = cache.get_seq_length() if cache is not None else 0
                positions = torch.arange(past, past + q_len, device=offset.device)[None]
        kwargs["position_ids"] = positions + offset[:, None].to(positions.device)
        return args, kwargs


PrefixTuning.component = PrefixComponent
