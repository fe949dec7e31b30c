"""What transformers' Trainer (and TRL's SFTTrainer, and accelerate) need from a `TunedModel`.

The Trainer keeps only the dataset columns that `inspect.signature(model.forward)` names, so the
forward shows the wrapped model's signature. It saves a model that is not a `PreTrainedModel` as
`model.safetensors` holding `model.state_dict()`, and resumes with `model.load_state_dict(...)`: a
tuned model's state dict is therefore its tuning alone, the trainable tensors under names that do
not depend on the user's name, with the tuning's record (method and model fingerprint) as one
uint8 tensor under `slimtune.json`. Such a folder (a Trainer checkpoint, or what `save_model()`
writes) loads with `slimtune.load`, like a folder that `TunedModel.save` writes.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from . import storage
from .errors import TuningError, TuningFileError
from .methods import Method, method_from_dict
from .methods.base import slot_key

if TYPE_CHECKING:
    from .bank import TunedModel

RECORD_KEY = "slimtune.json"
WEIGHTS = "model.safetensors"  # the name transformers' Trainer gives the state dict it saves


class Forward:
    """`TunedModel.forward` (and `TunedBank.forward`), showing the wrapped model's parameters to `inspect.signature`,
    and `extra` ones (`TunedBank`'s `user`) as keyword-only."""

    def __init__(self, tuned: TunedModel, extra: tuple[str, ...] = ()):
        self.tuned, self.extra = tuned, extra

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.tuned.model.forward)
        if not self.extra:
            return signature
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in self.extra]
        return signature.replace(parameters=params[:at] + added + params[at:])

    def __call__(self, *args, **kwargs):
        if args:
            kwargs = self.__signature__.bind_partial(*args, **kwargs).arguments
        return type(self.tuned).forward(self.tuned, **kwargs)


class Body:
    """The model's body under the tuning: last hidden states aligned with the inputs, no head."""

    def __init__(self, tuned: TunedModel):
        self.tuned = tuned

    def __call__(self, *args, **kwargs):
        if args:
            kwargs = inspect.signature(self.tuned.model.forward).bind_partial(*args, **kwargs).arguments
        return self.tuned.bank(users=self.tuned._row_users(kwargs), hidden_states_only=True, **kwargs)


class UserCollator:
    """A data collator that carries each example's `user` (a `TunedBank`'s row owners) past one that drops it (TRL's
    SFTTrainer collates the token columns only), as a tensor in the batch."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        if any("user" not in example for example in examples):
            raise TuningError(
                "an example has no `user` column (each row's index into TunedBank.users): give the dataset one, e.g. "
                "from TunedBank.user_ids; TRL's SFTTrainer removes the columns it does not know unless "
                "SFTConfig(remove_unused_columns=False)")
        users = [example["user"] for example in examples]
        batch = self.inner([{k: v for k, v in example.items() if k != "user"} for example in examples])
        rows = batch["input_ids"].shape[0]
        if rows != len(examples):
            raise TuningError(
                f"the collator put {len(examples)} examples into {rows} rows (packing or padding-free batches): a row "
                "must hold one user's example; turn packing and padding_free off")
        batch["user"] = torch.as_tensor(users, dtype=torch.long)
        return batch


def trainable(tuned: TunedModel) -> dict[str, nn.Parameter]:
    """The tuning's parameters by names that hold for any user name: `<part>.<name in the part>`
    (e.g. `lora.A.transformer__h__0__attn__c_attn`), or `model.<name>` for a full fine-tune."""
    wanted = {id(p) for p in tuned.tuning_parameters()}
    slot = f".users.{slot_key(tuned.user)}."
    out = {}
    for name, p in tuned.bank.named_parameters():
        if id(p) in wanted:
            out[name.replace(slot, ".", 1).removeprefix("parts.")] = p
    return out


def state_dict(tuned: TunedModel, prefix: str = "", keep_vars: bool = False) -> dict[str, torch.Tensor]:
    record, _ = tuned.saved_form()
    data = torch.tensor(list(storage.json_bytes(record)), dtype=torch.uint8)
    out = {prefix + name: (p if keep_vars else p.detach()) for name, p in trainable(tuned).items()}
    out[prefix + RECORD_KEY] = data
    return out


def _record(data: torch.Tensor, where: str) -> dict:
    record = storage.load_json(bytes(data.tolist()), where)
    if not isinstance(record, dict) or not isinstance(record.get("method"), dict):
        raise TuningFileError(f"{where} is not a slimtune tuning record (expected its method and model)")
    return record


def load_state_dict(tuned: TunedModel, state: dict[str, torch.Tensor], strict: bool = True):
    """Copy a state dict from `state_dict()` into the tuning's parameters, in place (an optimizer
    that holds them keeps working). Returns torch's (missing_keys, unexpected_keys)."""
    own = trainable(tuned)
    if RECORD_KEY in state:
        saved = method_from_dict(_record(state[RECORD_KEY], "the state dict's tuning record")["method"])
        if saved.to_dict() != tuned.method.to_dict():
            raise TuningError(f"this state dict holds a tuning of {saved}; this model's tuning is {tuned.method}. "
                              "Attach the same method before loading it")
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own and name != RECORD_KEY]
    if strict and (missing or unexpected):
        raise TuningError(f"the state dict does not fit this {tuned.method.kind} tuning: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]} (a TunedModel's state dict holds only its tuning)")
    with torch.no_grad():
        for name, p in own.items():
            if name in state:
                if state[name].shape != p.shape:
                    raise TuningError(f"'{name}' has shape {tuple(state[name].shape)} in the state dict, "
                                      f"{tuple(p.shape)} in this tuning")
                p.copy_(state[name])
    return nn.modules.module._IncompatibleKeys(missing, unexpected)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A folder that transformers' Trainer saved a TunedModel into (a checkpoint, or `save_model()`)."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        return False
    try:
        with safe_open(weights, framework="pt") as f:
            return RECORD_KEY in f.keys()
    except Exception:  # not safetensors: not ours
        return False


def read_checkpoint(path: str | os.PathLike, model: nn.Module, fingerprint: dict, tokenizer: Any = None
                    ) -> tuple[Method, dict[str, torch.Tensor]]:
    """The method and saved tensors (as `TunedModel.save` writes them) of a Trainer folder: its
    parameters are put in a scratch tuning on `model`, whose saved form is read, and taken off again."""
    from .bank import Bank, TunedModel

    where = str(Path(path) / WEIGHTS)
    tensors = load_file(where)
    record = _record(tensors[RECORD_KEY], f"the tuning record in '{where}'")
    storage.check_model(record.get("model", {}), fingerprint, str(path))
    method = method_from_dict(record["method"])
    scratch = Bank(model, tokenizer)
    try:
        scratch.add("checkpoint", method)
        tuned = TunedModel(scratch, "checkpoint")
        tuned.load_state_dict(tensors)
        return method, tuned.bank.state("checkpoint")
    finally:
        scratch.detach()
