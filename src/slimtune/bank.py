"""One shared frozen model, many users' tunings, mixed row by row in one batch.

`Bank` is the one code path: each row of a batch names its user (or None for the base model),
and every method applies each user's tuning to that user's rows only. `attach()` returns a
`TunedModel`, which is a bank of one user whose every row is theirs: training and serving run the
same code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import hf, modules, peft_format, storage
from .errors import TuningError, UnknownUserError
from .methods import METHODS, Method, method_from_dict
from .methods.base import Component, InitContext, slot_key
from .methods.head import HeadComponent
from .methods.prompt import gather_real, spread
from .quantize import check_method as check_quantised_method
from .routing import Routing, keep_routing_in_checkpoints, routed


class Built(NamedTuple):
    """A tuning built for a bank (`Bank.build`), for `Bank.add` to put in: its modules made and checked against
    the model, on the model's device and dtype. A method that writes the model's weights is built by `add`
    itself, from `source` (`body` and `head` are None then)."""

    method: Method
    body: nn.Module | None
    head: nn.Module | None
    source: tuple | None = None  # a method that writes the weights: its resolved (method, state, head state)


class Bank(nn.Module):
    """Many users' tunings over one shared, frozen model."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, frozen: bool = False, serving: bool = False,
                 slots: int = 0):
        """`frozen=True`: the model must stay exactly as it is (a server's shared model): tunings that write
        its weights (a full fine-tune) are refused even when the bank is empty.

        `serving=True` (an engine's bank): tunings change only through `add` and `remove`, never in place, so
        the parameters gathered for one batch layout are kept for the calls that follow with the same rows (the
        decoding steps), instead of being gathered from the slot tables at every call.

        `slots` (an engine's `max_resident`): each slot table is made with room for that many tunings of its shape,
        so that one holding no more is never reallocated (nor a compiled step over it compiled again); each shape
        in use then takes `slots` × one tuning's bytes from its first tuning on. 0: tables grow as they fill."""
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.frozen = frozen
        self.serving = serving
        self.slots = slots
        self.parts = nn.ModuleDict()  # method kind -> Component holding every user of that method
        self._methods: dict[str, Method] = {}
        self._takes_positions = modules.accepts(model, "position_ids")
        self._first_position = modules.position_start(model)
        self._pads_left = modules.is_causal_decoder(model)
        self._encoder_decoder = modules.is_encoder_decoder(model)
        self.fingerprint = modules.fingerprint(model)  # taken before any training (a full fine-tune changes the weights)
        model.requires_grad_(False)

    # --- users -------------------------------------------------------------------------------

    @property
    def users(self) -> list[str]:
        return list(self._methods)

    def method(self, user: str) -> Method:
        self._check_known(user)
        return self._methods[user]

    def add(self, user: str, tuning: Method | str | os.PathLike | TunedModel | tuple[Method, dict] | Built,
            tokenizer: Any = None) -> None:
        """Add `user` with a new tuning (a method config), a saved one (a folder, or a method and its saved
        tensors), a trained one (a TunedModel) or one made by `build`."""
        if not isinstance(user, str) or not user:
            raise TuningError(f"a user name must be a non-empty string, got {user!r}")
        if user in self._methods:
            raise TuningError(f"user {user!r} is already in this bank; remove() them first")
        if isinstance(tuning, Built) and tuning.body is not None:
            self.check_method(tuning.method)  # the bank may have changed since it was built
            method, body, head = tuning.method, tuning.body, tuning.head
        else:
            method, body, head = self._make(tuning.source if isinstance(tuning, Built) else self._resolve(tuning),
                                            tokenizer)
        self._part(method.component).put(user, method, body)
        if head is not None:
            self._part(HeadComponent).put(user, None, head)
        self._methods[user] = method

    def build(self, tuning: Method | str | os.PathLike | TunedModel | tuple[Method, dict], tokenizer: Any = None,
              guard: Any = None) -> Built:
        """Build a tuning as `add` would, every shape checked against this model, without adding it: nothing is
        added to the bank or put on the model, so it may run on another thread while the bank serves others (an
        engine's loads), and `add(user, built)` then only puts it in. `guard` (a lock) is held only while the
        method's component is looked up or made."""
        resolved = self._resolve(tuning)  # read once (a folder), here
        if resolved[0].writes_base:  # built by writing the model: only `add` may
            self.check_method(resolved[0])
            return Built(resolved[0], None, None, resolved)
        return Built(*self._make(resolved, tokenizer, guard))

    def check(self, method: Method, state: dict[str, torch.Tensor], guard: Any = None) -> None:
        """`build` a saved tuning and let it go: raises what `add` would raise for it."""
        self.build((method, state), guard=guard)

    def _make(self, resolved: tuple[Method, dict | None, dict | None], tokenizer: Any,
              guard: Any = None) -> tuple[Method, nn.Module, nn.Module | None]:
        """A tuning resolved by `_resolve`, checked and made: (method, its module, its task head's or None)."""
        method, state, head_state = resolved
        self.check_method(method)
        check_quantised_method(method, self.model)  # model tuning and DoRA need the weights themselves
        context = InitContext(tokenizer or self.tokenizer)
        has_head = bool(modules.head_names(self.model)) and not method.writes_base
        new = any(c.kind not in self.parts for c in (method.component, *[HeadComponent] * has_head))
        with guard if guard is not None and new else contextlib.nullcontext():  # only a new component needs it
            part = self._part(method.component)
            head_part = self._part(HeadComponent) if has_head else None
        body = part.make(method, state, context)  # (a tuning of the weights holds the head too)
        return method, body, None if head_part is None else head_part.make(None, head_state, context)

    def check_method(self, method: Method) -> None:
        """Refuse a tuning that would write the shared model's weights where others share them (or may)."""
        if not (method.writes_base or self._base_written):
            return
        if self.frozen:
            raise TuningError(
                f"a {method.kind} tuning writes the model's own weights; this model is shared and frozen, so it "
                "serves tunings beside the weights only (LoRA, adapters, prefix or prompt tuning, BitFit)"
            )
        if self._methods:
            raise TuningError(
                "a full fine-tune changes every weight of the shared model, so it cannot share a bank "
                "with other tunings; give it a model of its own"
            )

    def remove(self, user: str) -> None:
        self._check_known(user)
        for part in self.parts.values():
            if user in part.methods:
                part.remove(user)
        del self._methods[user]

    def user_parameters(self, user: str) -> Iterator[nn.Parameter]:
        """The parameters that make up `user`'s tuning (and task head, if the model has one)."""
        self._check_known(user)
        for part in self._parts_of(user):
            yield from part.user_parameters(user)

    def memory(self) -> dict[str, int]:
        """Bytes the bank holds beside the model: `tables`, the slot tables (every slot, free ones included);
        `idle`, the tables whose users all left, kept for their shape's next tuning (`Component.idle`);
        `unslotted`, the tunings without a slot (prompts, task heads, prefixes made by their MLP); `layout`, the
        parameters gathered for the last batch layout (a serving bank); `kept`, values computed from tunings and
        kept between calls (DoRA's gains outside a serving bank, a reparameterised prefix)."""
        out = {"tables": 0, "idle": 0, "unslotted": 0, "layout": 0, "kept": 0}
        for part in self.parts.values():
            out["tables"] += sum(t.nbytes for t in part.tables.values())
            out["idle"] += sum(t.nbytes for t in part.idle.values())
            out["layout"] += sum(t.kept_bytes for t in part.tables.values())
            out["kept"] += part._kept_bytes
            if len(part.methods) > sum(len(t.slots) for t in part.tables.values()):  # some tunings have no slot
                out["unslotted"] += sum(p.numel() * p.element_size() for user in part.methods
                                        if part.slot_group(user) is None for p in part.user_parameters(user))
        return out

    def state(self, user: str) -> dict[str, torch.Tensor]:
        """`user`'s tuning as saved: the method's tensors, and the head's under `head.`."""
        self._check_known(user)
        out = {}
        for part in self._parts_of(user):
            prefix = "head." if isinstance(part, HeadComponent) else ""
            out.update({prefix + name: t for name, t in part.state(user).items()})
        return out

    def save(self, user: str, path: str | os.PathLike, task: dict | None = None) -> Path:
        """Save `user`'s tuning; `task` (see `Format.describe()`) records what it was trained to do."""
        record, tensors = self.saved_form(user, task)
        return storage.write(path, record, tensors)

    def saved_form(self, user: str, task: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        record = {"method": self.method(user).to_dict(), "model": self.fingerprint}
        if task is not None:
            record["task"] = task
        return record, self.state(user)

    @property
    def _base_written(self) -> bool:
        """Whether a tuning in this bank is the model's own weights (a full fine-tune): no frozen base is left."""
        return any(m.writes_base for m in self._methods.values())

    def _parts_of(self, user: str) -> list[Component]:
        return [part for part in self.parts.values() if user in part.methods]

    def _part(self, cls: type[Component]) -> Component:
        if cls.kind not in self.parts:
            self.parts[cls.kind] = cls(self.model)
            self.parts[cls.kind].slots = self.slots
        return self.parts[cls.kind]

    def _resolve(self, tuning: Method | str | os.PathLike | TunedModel) -> tuple[Method, dict | None, dict | None]:
        if isinstance(tuning, Method):
            return tuning, None, None
        if isinstance(tuning, tuple) and len(tuning) == 2 and isinstance(tuning[0], Method):
            method, state = tuning
        elif isinstance(tuning, TunedModel):
            state = tuning.bank.state(tuning.user)
            method = tuning.method
        elif isinstance(tuning, (str, os.PathLike)):
            method, state = read_tuning(tuning, self.model, self.fingerprint)
        else:
            raise TuningError(
                f"cannot add a {type(tuning).__name__} to a bank: expected a method config "
                "(e.g. LoRA(rank=8)), a saved tuning folder or a TunedModel"
            )
        head = {n[len("head."):]: t for n, t in state.items() if n.startswith("head.")}
        body = {n: t for n, t in state.items() if not n.startswith("head.")}
        if modules.head_names(self.model) and not method.writes_base and not head:
            raise TuningError(
                f"{type(self.model).__name__} has a task head, but this tuning carries none; "
                "it was trained for a model without that head"
            )
        return method, body, head or None

    def _check_known(self, user: str) -> None:
        if user not in self._methods:
            known = ", ".join(self._methods) or "no users"
            raise UnknownUserError(f"unknown user {user!r}; this bank holds: {known}")

    # --- running -----------------------------------------------------------------------------

    def _routing(self, users: Sequence[str | None] | None, batch: int, device: torch.device,
                 decoding: bool = False) -> Routing:
        if users is None or isinstance(users, str):
            raise TuningError("pass users=[...] with one user name (or None for the base model) per row of the batch")
        users = list(users)
        if len(users) != batch:
            raise TuningError(f"users has {len(users)} entries but the batch has {batch} rows; give one per row")
        for user in users:
            if user is not None:
                self._check_known(user)
        if self._base_written and None in users:
            raise TuningError("this bank's model is fully fine-tuned; it has no frozen base model for rows of user None")
        owners = {u: tuple(p for p in self._parts_of(u) if not (decoding and p.lives_in_cache))
                  for u in set(users) if u is not None}
        return Routing(users, owners, device, keep_layout=self.serving)

    def _start(self, routing: Routing) -> None:
        if getattr(self.model, "is_activation_checkpointing", False):  # transformers >= 5.24's name
            keep_routing_in_checkpoints(self.model)
        elif not hasattr(type(self.model), "is_activation_checkpointing"):
            keep_routing_in_checkpoints(self.model)  # older releases: cheap enough to always do
        for part in self.parts.values():
            part.prepare(routing)

    def _inputs(self, routing: Routing, kwargs: dict) -> tuple[dict, torch.Tensor | None, int]:
        """The model's inputs with each row's prompt inserted and positions derived from the mask.
        Returns (inputs, starts, length): row b's own tokens begin at starts[b] (None: at 0)."""
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        batch, length = source.shape[:2]
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=source.device)
        starts = None
        prompt = self._prepending(routing, batch)
        if prompt is not None:
            if embeds is None:
                embeds = self.model.get_input_embeddings()(ids)
            embeds, kwargs["attention_mask"], starts = prompt.prepend(
                routing, embeds, kwargs["attention_mask"], left=self._pads_left
            )
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
            extra = embeds.shape[1] - length
            if kwargs.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = spread(kwargs["token_type_ids"], starts, extra, 0)
            if kwargs.get("position_ids") is not None:
                raise TuningError("position_ids cannot be given for rows with prompt tuning; they follow from the mask")
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() == 2 and not self._encoder_decoder:
                kwargs["labels"] = spread(labels, starts, extra, -100)
        if kwargs.get("position_ids") is None and self._takes_positions:
            # As generate() does, so a padded row gets the positions it would get alone.
            mask = kwargs["attention_mask"]
            kwargs["position_ids"] = modules.mask_positions(mask, self._first_position)
        return kwargs, starts, length

    def _prepending(self, routing: Routing, batch: int) -> Component | None:
        """The method that puts positions of its own into this batch's rows (prompt tuning), if any row has some."""
        found = [p for p in self.parts.values() if p.prepends and p.lengths(routing, batch).any()]
        if len(found) > 1:
            raise TuningError(f"rows of {found[0].kind} and {found[1].kind} tunings both insert positions into their "
                              "inputs; one batch can hold rows of only one such method")
        return found[0] if found else None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                users: Sequence[str | None] | None = None, hidden_states_only: bool = False, **kwargs):
        """Run the model with row i under users[i]'s tuning. Logits come back aligned with `input_ids`.

        `hidden_states_only=True` runs the body without its task head and returns its output, the
        last hidden states aligned with `input_ids` (for losses that apply the head themselves).
        """
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
        source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        routing = self._routing(users, source.shape[0], source.device)
        with routed(routing):
            self._start(routing)
            inputs, starts, length = self._inputs(routing, kwargs)
            if hidden_states_only:
                for head_only in ("labels", "logits_to_keep"):
                    inputs.pop(head_only, None)
                out = modules.body(self.model)(**inputs)
                if starts is not None:
                    out["last_hidden_state"] = gather_real(out.last_hidden_state, starts, length)
                return out
            out = self.model(**inputs)
        logits = getattr(out, "logits", None)
        virtual = starts is not None and logits is not None and logits.dim() == 3 and not self._encoder_decoder
        if virtual and logits.shape[1] == inputs["inputs_embeds"].shape[1]:  # else logits_to_keep kept real columns only
            out["logits"] = gather_real(logits, starts, length)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 users: Sequence[str | None] | None = None, **kwargs):
        """`model.generate()` with row i under users[i]'s tuning; returns what generate() returns
        (for decoders: the input tokens followed by the new ones)."""
        routing = self._routing(users, input_ids.shape[0], input_ids.device)
        with routed(routing):
            self._start(routing)
            inputs, starts, _ = self._inputs(routing, {"input_ids": input_ids, "attention_mask": attention_mask})
            inputs.pop("position_ids", None)  # generate() derives them from the mask at every step
            if starts is None or self._encoder_decoder:
                return self.model.generate(**{k: v for k, v in inputs.items() if v is not None}, **kwargs)
            # From inputs_embeds, a decoder's generate() returns only the new tokens.
            out = self.model.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **kwargs)
            if isinstance(out, torch.Tensor):
                return torch.cat([input_ids.repeat_interleave(out.shape[0] // input_ids.shape[0], 0), out], dim=1)
            out["sequences"] = torch.cat(
                [input_ids.repeat_interleave(out.sequences.shape[0] // input_ids.shape[0], 0), out.sequences], dim=1
            )
            return out

    # --- step by step, for an engine that schedules its own batches --------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, users: Sequence[str | None],
                cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run left-padded prompts into `cache` (a transformers `Cache`, filled in place), row i
        under users[i]'s tuning. Returns (next-token logits [B, vocab], the attention mask over
        the cache's columns, virtual prompt tokens and prefixes included: a prefix is written into
        the cache as the columns before its row's tokens, see `Component.into_cache`)."""
        routing = self._routing(users, input_ids.shape[0], input_ids.device)
        with routed(routing):
            self._start(routing)
            inputs, _, _ = self._inputs(routing, {"input_ids": input_ids, "attention_mask": attention_mask})
            out = self.model(**inputs, **self._cached(cache))
            mask = inputs["attention_mask"]
            for part in self.parts.values():
                if part.lives_in_cache:
                    mask = part.into_cache(routing, cache, mask)
        return out.logits[:, -1], mask

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, users: Sequence[str | None],
               cache: Any) -> torch.Tensor:
        """One decoding step: `input_ids` [B, 1] are each row's newest token, `attention_mask`
        covers the cache's columns and this token. Returns next-token logits [B, vocab]. The cache
        is one that `prefill` filled: what it wrote into the cache (prefixes) is not applied again."""
        routing = self._routing(users, input_ids.shape[0], input_ids.device, decoding=True)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_positions:
            positions = modules.mask_positions(attention_mask, self._first_position)[:, -input_ids.shape[1]:]
            inputs["position_ids"] = positions - self.unpositioned_columns(users, positions.device)[:, None]
        with routed(routing):
            self._start(routing)
            out = self.model(**inputs, **self._cached(cache))
        return out.logits[:, -1]

    def unpositioned_columns(self, users: Sequence[str | None], device: torch.device) -> torch.Tensor:
        """[B]: per row, the cache columns that its tuning wrote at prefill and that take no position (a prefix with
        positions='from-zero'), to leave out of the positions a decoding step counts from the mask."""
        columns = {u: sum(p.unpositioned_columns(u) for p in self._parts_of(u) if p.lives_in_cache)
                   for u in set(users) if u is not None}
        return torch.tensor([columns.get(u, 0) for u in users], dtype=torch.long, device=device)

    def _cached(self, cache: Any) -> dict:
        """The cache keyword (`cache` from transformers 5.24, `past_key_values` before) and one logit column."""
        if not hasattr(self, "_cache_keywords"):
            name = "cache" if modules.accepts(self.model, "cache") else "past_key_values"
            self._cache_keywords = (name, modules.accepts(self.model, "logits_to_keep"))
        name, keep = self._cache_keywords
        return {name: cache, "use_cache": True, **({"logits_to_keep": 1} if keep else {})}

    def detach(self) -> None:
        """Remove every hook this bank put on the shared model."""
        for part in self.parts.values():
            part.close()


class _TrainerModel(nn.Module):
    """What transformers' Trainer and TRL's trainers read from a model beyond its forward: the wrapped model's
    config, embeddings and checkpointing switches."""

    _keys_to_ignore_on_save = None  # read by transformers' Trainer after loading a checkpoint
    bank: Bank

    @property
    def model(self) -> nn.Module:
        return self.bank.model

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def base_model(self) -> hf.Body:
        """The model's body under the tuning(s), returning hidden states, as `PreTrainedModel.base_model` does
        (TRL's fused loss applies the head itself)."""
        return hf.Body(self)

    def _row_users(self, kwargs: dict) -> list[str]:
        """Each row's user, from the model's inputs (a `TunedBank` takes its `user` input out of them)."""
        raise NotImplementedError

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the model card (TRL's trainers add theirs)."""
        self.model.add_model_tags(tags)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Recompute each layer's activations in the backward pass (`TrainingArguments(gradient_checkpointing=True)`)."""
        self.model.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()


class TunedModel(_TrainerModel):
    """A frozen model with one tuning: the bank-of-one case. Every row runs under the tuning.

    It can be the model of transformers' Trainer or TRL's SFTTrainer as it is (see `hf`): its forward
    shows the wrapped model's signature, and its state dict, which the Trainer saves in checkpoints
    and loads on resume, is the tuning alone."""

    def __init__(self, bank: Bank, user: str):
        super().__init__()
        self.bank = bank
        self.user = user
        self.forward = hf.Forward(self)

    @property
    def method(self) -> Method:
        return self.bank.method(self.user)

    def tuning_parameters(self) -> list[nn.Parameter]:
        return list(self.bank.user_parameters(self.user))

    def _row_users(self, kwargs: dict) -> list[str]:
        source = kwargs.get("input_ids")
        source = source if source is not None else kwargs.get("inputs_embeds")
        return [self.user] * source.shape[0]

    def forward(self, **kwargs):
        """Run the model under the tuning (the instance's `forward`, `hf.Forward`, shows the model's signature)."""
        return self.bank(users=self._row_users(kwargs), **kwargs)

    def state_dict(self, *args, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The tuning alone (trainable tensors and its record), not the frozen model's weights: what a
        Trainer checkpoint holds. `load_state_dict` takes it back, `slimtune.load` reads the folder."""
        out = hf.state_dict(self, prefix, keep_vars)
        if destination is None:
            return out
        destination.update(out)
        return destination

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        return hf.load_state_dict(self, state_dict, strict)

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        is_main_process: bool = True, format: str = "slimtune", **kwargs) -> Path | None:
        """`save()` under transformers' name (the tuning only; `state_dict` and the other options of
        `PreTrainedModel.save_pretrained` do not apply)."""
        return self.save(save_directory, format=format) if is_main_process else None

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        return self.bank.generate(input_ids=input_ids, users=[self.user] * input_ids.shape[0], **kwargs)

    def save(self, path: str | os.PathLike, format: str = "slimtune", task: dict | None = None) -> Path:
        """Save only the tuning (and task head), with its config and the model's fingerprint.

        `format="peft"` writes an HF PEFT folder instead (prompt, prefix and LoRA tunings), which
        `peft.PeftModel.from_pretrained` loads.
        """
        if format == "peft":
            return peft_format.write(self, path)
        if format != "slimtune":
            raise TuningError(f"unknown tuning format {format!r}; expected 'slimtune' or 'peft'")
        return self.bank.save(self.user, path, task)

    def saved_form(self, task: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        return self.bank.saved_form(self.user, task)

    def merge(self) -> None:
        """Fold the tuning into the frozen weights, where its method can (LoRA, for one): no extra cost per token until
        `unmerge()`."""
        self._merging("merge").merge(self.user)

    def unmerge(self) -> None:
        """Take the merged tuning out of the weights again (exact up to floating-point rounding)."""
        self._merging("unmerge").unmerge()

    def _merging(self, action: str) -> Component:
        """The component holding this tuning, if its method's update can be folded into the weights."""
        part = self.bank.parts[self.method.component.kind]
        if not part.merges:
            able = ", ".join(m.__name__ for m in METHODS.values() if m.component.merges)
            raise TuningError(f"only {able} can {action}; this tuning is {self.method.kind}")
        if len(self.bank.users) > 1:
            raise TuningError(f"cannot {action} while the model is shared by other tunings in the bank")
        return part


class TunedBank(_TrainerModel):
    """Every user of a trainable bank as one model, for transformers' Trainer and TRL's trainers: each row is
    its user's, given by a `user` input, the user's index in `users` (a dataset column `user` of ints, e.g.
    from `user_ids`; the Trainer's default collator drops string columns). One batch trains many users: each
    user's parameters get gradient from that user's rows only, and a user with no rows in a step has no
    gradient, which the Trainer's optimizer skips, so its parameters do not move (Adam's moments are kept per
    parameter, so per user).

    The forward shows the wrapped model's signature plus `user`. The state dict, what checkpoints hold and a
    resumed run loads, is every user's tuning alone (`users.<key>.<name>`, each with its record);
    `save_pretrained(folder)` writes one tuning folder per user (`folder/<user>`), which `slimtune.load`,
    `Bank.add` and `Store.add` read."""

    def __init__(self, bank: Bank):
        super().__init__()
        if bank.frozen:
            raise TuningError("a frozen bank (an engine's) cannot be trained: make a Bank with frozen=False")
        if not bank.users:
            raise TuningError("the bank has no users: add each user's method (bank.add(name, method)) first")
        self.bank = bank
        self.users = list(bank.users)
        self.forward = hf.Forward(self, extra=("user",))

    def user_ids(self, names: Sequence[str]) -> list[int]:
        """Each name's index in `users`: the `user` column of a dataset."""
        index = {name: i for i, name in enumerate(self.users)}
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            raise UnknownUserError(f"no user {unknown[0]!r} in this bank; its users: {self.users[:10]}")
        return [index[n] for n in names]

    def tuning_parameters(self) -> list[nn.Parameter]:
        return [p for user in self.users for p in self.bank.user_parameters(user)]

    def collator(self, inner: Any = None) -> hf.UserCollator:
        """A data collator that keeps the `user` column where `inner` (default: transformers' default collator)
        would drop it, as TRL's SFTTrainer's does: `trainer.data_collator = tuned.collator(trainer.data_collator)`,
        with `SFTConfig(remove_unused_columns=False)` so that the column reaches it."""
        if inner is None:
            from transformers import default_data_collator as inner
        return hf.UserCollator(inner)

    def _row_users(self, kwargs: dict) -> list[str]:
        return self._users(kwargs.pop("user", None))

    def _users(self, user: Any) -> list[str]:
        if user is None:
            raise TuningError("TunedBank needs each row's user: a `user` input (a dataset column) of indices into "
                              "TunedBank.users, e.g. from TunedBank.user_ids")
        ids = user.tolist() if isinstance(user, torch.Tensor) else list(user)
        if any(not isinstance(i, int) or not 0 <= i < len(self.users) for i in ids):
            raise TuningError(f"user must hold indices into TunedBank.users (0 to {len(self.users) - 1}), got {ids[:8]}")
        return [self.users[i] for i in ids]

    def forward(self, user: Any = None, **kwargs):
        """Run the model with each row under its user's tuning."""
        return self.bank(users=self._users(user), **kwargs)

    def _each(self) -> Iterator[tuple[str, TunedModel]]:
        for user in self.users:
            yield f"users.{slot_key(user)}.", TunedModel(self.bank, user)

    def state_dict(self, *args, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict:
        out = {}
        for key, tuned in self._each():
            out.update(hf.state_dict(tuned, prefix + key, keep_vars))
        if destination is None:
            return out
        destination.update(out)
        return destination

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        missing, unexpected = [], [k for k in state_dict if not k.startswith("users.")]
        known = set()
        for key, tuned in self._each():
            own = {k[len(key):]: v for k, v in state_dict.items() if k.startswith(key)}
            known.update(key + k for k in own)
            result = hf.load_state_dict(tuned, own, strict)
            missing += [key + k for k in result.missing_keys]
        unexpected += [k for k in state_dict if k.startswith("users.") and k not in known]
        if strict and unexpected:
            raise TuningError(f"the state dict holds tunings this bank does not: {unexpected[:5]}")
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        is_main_process: bool = True, **kwargs) -> Path | None:
        """Each user's tuning as a folder of its own, `save_directory/<user>` (user names are folder names here)."""
        if not is_main_process:
            return None
        folder = Path(save_directory)
        for user in self.users:
            if user in ("", ".", "..") or "/" in user or os.sep in user:
                raise TuningError(f"user {user!r} cannot be a folder name; save it with bank.save(user, folder)")
            self.bank.save(user, folder / user)
        return folder


def read_tuning(path: str | os.PathLike, model: nn.Module, fingerprint: dict | None = None
                ) -> tuple[Method, dict[str, torch.Tensor]]:
    """A saved tuning's method and tensors (slimtune's own format or an HF PEFT folder), checked
    to be made for `model`'s type and shape (`fingerprint`: the model's, if already known)."""
    if peft_format.is_peft_folder(path):
        return peft_format.read(path, model)
    if hf.is_checkpoint(path):
        return hf.read_checkpoint(path, model, fingerprint or modules.fingerprint(model))
    record, state = storage.read(path)
    storage.check_model(record.get("model", {}), fingerprint or modules.fingerprint(model), str(path))
    return method_from_dict(record.get("method", {})), state


def attach(model: nn.Module, method: Method, tokenizer: Any = None, name: str = "default") -> TunedModel:
    """Freeze `model` and attach a new tuning of `method`; returns a trainable `TunedModel`."""
    bank = Bank(model, tokenizer)
    bank.add(name, method)
    return TunedModel(bank, name)


def load(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, name: str = "default") -> TunedModel:
    """Load a saved tuning onto `model` (checked to be of the type and shape it was made for)."""
    bank = Bank(model, tokenizer)
    bank.add(name, path)
    return TunedModel(bank, name)
