"""What every method shares: a small config object, and a component that holds many users' tunings.

A `Method` is the configuration a user writes (`LoRA(rank=8)`). A `Component` is that method
installed on one shared frozen model: it owns the hooks on the model and a bank of tunings, one
per user, and applies each user's tuning to that user's rows of the batch only. Training one
tuning is the bank-of-one case of the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ModelMismatchError, TuningError
from ..quantize import refuse_quantised
from ..routing import Routing, active, route
from .slots import RowParams, SlotRows, SlotTable

if TYPE_CHECKING:
    from ..data import Task


@dataclass(frozen=True)
class Method:
    """Base of the method configs. `kind` names the method in saved tunings and on the command line
    (`slimtune train --method <kind>`, `slimtune compare --methods <kind>`).

    What the trainer, the comparison study and the CLI need of a method is declared here, by each
    method, so that adding one touches its own file and the registry only: its learning rates, its
    row label in the study, its command-line options and how its config is built from them."""

    kind: ClassVar[str] = ""
    component: ClassVar[type[Component]]
    # True for a method whose tuning is the model's own weights (full fine-tuning): it cannot share a model, and
    # its tuning holds the model's task head too (other methods' tunings carry a head of their own).
    writes_base: ClassVar[bool] = False
    # Why this method cannot train over a base whose linear weights are quantised, if it cannot ("" if it can):
    # DoRA reads each frozen weight's norm. A method that writes the base is refused there anyway.
    needs_base_weights: ClassVar[str] = ""
    # AdamW's learning rate when a run gives none: `default_lr` for `slimtune train` and `Trainer` (hundreds of
    # steps), `compare_lr` for the 40-step budgets of `slimtune compare`. Read through `learning_rate()`.
    default_lr: ClassVar[float]
    compare_lr: ClassVar[float]
    label: ClassVar[str] = ""  # the method's row in the comparison study's table

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @property
    def virtual_tokens(self) -> int:
        """Positions this method adds to each of its rows' sequences (prompt tuning's soft tokens): they count
        against the model's context."""
        return 0

    def learning_rate(self, study: bool = False) -> float:
        """The learning rate of a run that gives none: `default_lr`, or `compare_lr` in the comparison
        `study`. A method whose rate depends on its settings overrides this."""
        return self.compare_lr if study else self.default_lr

    @classmethod
    def cli_options(cls, options: Any) -> None:
        """Add this method's options to the command line: `options` has argparse's `add_argument`. An option
        two methods share (prompt and prefix tuning's `--length`) must have the same default in both."""

    @classmethod
    def from_cli(cls, args: argparse.Namespace, task: Task | None) -> Method:
        """The config that `slimtune train --method <kind>` with these parsed `args` trains on `task`."""
        return cls()

    @classmethod
    def for_study(cls, task: Task, model: nn.Module, family: str, options: dict[str, Any]) -> Method:
        """The config that `slimtune compare` trains on `task` with `model` (a `family` of `models.model_family`):
        its defaults, with the `options` an ablation varies."""
        return cls(**options)

    def resolve(self, model: nn.Module) -> Method:
        """This method with its module patterns (regular expressions, suffixes, defaults) replaced by the
        tuple of full module names they select on `model`: it selects the same modules, and stored, it
        carries no pattern to match again. A method without patterns is itself."""
        return self


@dataclass
class InitContext:
    """What a new tuning may need to initialise itself: a tokenizer, and a way to run the frozen model."""

    tokenizer: Any = None
    run_base: Any = None  # callable(input_ids) running the frozen model, for text-based inits

    def encode(self, text: str, what: str) -> list[int]:
        if self.tokenizer is None:
            raise TuningError(f"{what} needs a tokenizer: pass tokenizer= to attach() or Bank.add()")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TuningError(f"{what}: the text {text!r} encodes to no tokens")
        return list(ids)


def slot_key(user: str) -> str:
    """A module-safe key for a user name (ModuleDict keys cannot contain dots)."""
    if torch.compiler.is_compiling():  # the same key: torch.compile cannot trace bytes.hex
        return "u_" + "".join(f"{b:02x}" for b in user.encode())
    return "u_" + user.encode().hex()


def site_key(name: str) -> str:
    return name.replace(".", "__")


class Component(nn.Module):
    """One method installed on one model, holding the tunings of many users.

    A method whose tunings of one shape stack (`slot_group`) keeps each in a slot of a preallocated table per
    site (see `slots`): inference reads every row's parameters from the tables, whatever the mix of users.

    A table whose last user leaves is kept, empty, in `idle`, and its group's next user gets it back as it was
    (the same tensors, so the same structure for a compiled step, `serving.capture`, and no allocation or copy):
    under LRU churn a shape (LoRA of rank 16, say) often empties and fills again, and each new table would be a
    graph to compile (minutes with inductor on a CPU). An idle table holds what it held in use, its slots ×
    one tuning (`Bank.memory()["idle"]`); so that shapes seen once do not pile up, idle tables beyond
    `keep_idle_bytes` per method are freed, the longest idle first. A move to another device or dtype frees
    them all (their graphs are stale then anyway)."""

    kind: ClassVar[str] = ""
    # True for a method whose update folds into the frozen weights: it implements `fold()`, and `merge()`
    # serves one tuning at no extra cost per token.
    merges: ClassVar[bool] = False
    # At most this much kept by `kept()` per component, for what is computed from a tuning rather than held in
    # its slot (DoRA's gains, a reparameterised prefix): beyond it, what was kept is dropped.
    keep_bytes: ClassVar[int] = 4 << 30
    nulls: ClassVar[tuple[float, ...]] = ()  # slot 0 of each of `site_tensors()`: the value that changes nothing
    keep_idle_bytes: ClassVar[int] = 1 << 30  # emptied tables kept for their group's next user (see above)

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: the base is not ours
        self.users = nn.ModuleDict()
        self.methods: dict[str, Method] = {}
        self._handles: list = []
        self._param_lists: dict[str, list[nn.Parameter]] = {}
        self._kept: dict = {}  # key -> (signature, value): see `kept()`
        self._kept_bytes = 0
        self.merged: str | None = None  # the user whose update is folded into the weights
        self.tables: dict[Hashable, SlotTable] = {}  # slot_group -> its table, while it has users (see `slots`)
        self.idle: dict[Hashable, SlotTable] = {}  # slot_group -> its emptied table, the longest idle first
        self._made: dict[Hashable, int] = {}  # slot_group -> when its table was made: `tables` keeps that order
        # Room a new table is made with (an engine's `max_resident`, `Bank(slots=...)`): a table of at most that many
        # users is never reallocated. 0: tables start small and grow by a quarter when full.
        self.slots = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- users -------------------------------------------------------------------------------

    def make(self, method: Method, state: dict[str, torch.Tensor] | None, context: InitContext) -> nn.Module:
        """A user's tuning, new (`build`) or from saved tensors (`from_state`), on the model's device and dtype;
        nothing shared is touched (but by a method that writes the model), so it may run beside the serving."""
        tuning = self.build(method, context) if state is None else self.from_state(method, state)
        return tuning.to(device=self.device, dtype=self.dtype)

    def put(self, user: str, method: Method, tuning: nn.Module) -> None:
        """Put a tuning made by `make` in: its hooks on the model, its slot in its table."""
        self.install(tuning)
        self.users[slot_key(user)] = tuning
        self.methods[user] = method
        self._forget(user)
        group = self.slot_group(user)
        if group is not None:
            self._table(group).add(user, self._links(user), self.slot_numbers(user))

    def remove(self, user: str) -> None:
        group = self.slot_group(user)
        if group is not None:
            table = self.tables[group]
            table.remove(user)
            if not table.slots:
                self.idle[group] = self.tables.pop(group)
                self._free_idle()
        del self.users[slot_key(user)]
        del self.methods[user]
        self._forget(user)

    def _table(self, group: Hashable) -> SlotTable:
        """The group's table: in use, idle (it comes back as it was), or made now with room for `slots` users."""
        if group not in self.tables:
            table = self.idle.pop(group, None)
            if table is None:
                table = SlotTable(self.nulls, self.slot_derived, self.slots, group)
                self._made.setdefault(group, len(self._made))
            # In the order the tables were made, whatever came and went: a compiled step's structure is the same.
            self.tables = dict(sorted({**self.tables, group: table}.items(), key=lambda item: self._made[item[0]]))
        return self.tables[group]

    def _free_idle(self) -> None:
        while self.idle and sum(t.nbytes for t in self.idle.values()) > self.keep_idle_bytes:
            del self.idle[next(iter(self.idle))]

    def slot_derived(self, user: str) -> dict[Hashable, tuple[torch.Tensor, float]]:
        """Values computed from the user's tuning that inference reads from tables of their own beside the slots
        (DoRA's gains): {key: (value, the value of rows without it)}, computed when the slot is written (see
        `SlotTable`); none for most methods."""
        return {}

    def _links(self, user: str) -> dict[str, tuple[nn.Parameter, ...]]:
        return {name: self.site_tensors(user, name) for name in self.tuning(user).names}

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        for table in self.tables.values():  # the parameters have new storage (another device or dtype)
            table.rebuild(links={user: self._links(user) for user in table.slots})
        self.idle.clear()
        return out

    def _forget(self, user: str) -> None:
        self._param_lists.pop(user, None)
        self._drop_kept()

    def _drop_kept(self) -> None:
        self._kept.clear()
        self._kept_bytes = 0

    def signature(self, users: list[str]) -> tuple:
        """Changes whenever any of these users' parameters is changed in place (an optimizer step,
        a load): values kept by `kept()` are reused only while it holds."""
        out = []
        for user in users:
            if user not in self._param_lists:
                self._param_lists[user] = list(self.tuning(user).parameters())
            # (inference tensors keep no version: they cannot be changed outside inference mode)
            out.append(sum(0 if p.is_inference() else p._version for p in self._param_lists[user]))
        return tuple(out)

    def kept(self, key: tuple, users: list[str], build, routing: Routing | None = None):
        """`build()`, kept between calls in inference while `users`' parameters do not change:
        decoding step after step with the same rows then recomputes and copies nothing. Training
        (grad enabled) always builds afresh, through the parameters, so gradients reach each user."""
        if torch.is_grad_enabled():
            return build()
        signature = None
        if routing is not None:  # once per forward, not once per layer
            signature = routing.cache.get(("signature", id(self), tuple(users)))
        if signature is None:
            signature = self.signature(users)
            if routing is not None:
                routing.cache[("signature", id(self), tuple(users))] = signature
        hit = self._kept.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        value = build()
        size = sum(t.numel() * t.element_size() for t in _tensors(value))
        if self._kept_bytes + size > self.keep_bytes:  # many batch layouts seen: start afresh
            self._drop_kept()
        if size <= self.keep_bytes:
            self._kept[key] = (signature, value)
            self._kept_bytes += size
        return value

    def tuning(self, user: str) -> nn.Module:
        return self.users[slot_key(user)]

    def skips(self, user: str) -> bool:
        return user == self.merged  # its update is already inside the weights

    def slot_group(self, user: str) -> Hashable | None:
        """What the user's tuning shares with the others of its slot table (LoRA: its rank); None: it has no slot
        (its method's tunings run one user at a time)."""
        return None

    def site_tensors(self, user: str, name: str) -> tuple[nn.Parameter, ...]:
        """The user's parameters at one site (a name of `tuning(user).names`), as they are stacked in its slot."""
        raise NotImplementedError

    def slot_numbers(self, user: str) -> tuple[float, ...]:
        """Numbers of the user's tuning that `stacked_apply` takes after the site's tensors, one per row (LoRA's scale)."""
        return ()

    def slot_rows(self, routing: Routing, batch: int) -> list[tuple[SlotTable, SlotRows]]:
        """For each slot table with rows in this batch: (table, where its rows are); every row of the batch is in
        each, rows without a tuning in the table in slot 0."""
        key = ("slots", id(self), batch)
        if key not in routing.cache:
            out = []
            users = [u for u, _ in routing.groups(self, batch) if not self.skips(u)]
            if users:
                factor = batch // len(routing.users)
                rows = [None if self.skips(u) else u for u in routing.users for _ in range(factor)]
                for group in dict.fromkeys(self.slot_group(u) for u in users):
                    if group is None:  # a tuning without a slot: the method handles its rows itself
                        continue
                    table = self.tables[group]
                    out.append((table, SlotRows(table, table.index(rows), self.device, routing.keep_layout)))
            routing.cache[key] = out
        return routing.cache[key]

    def user_parameters(self, user: str) -> Iterator[nn.Parameter]:
        return self.tuning(user).parameters()

    def state(self, user: str) -> dict[str, torch.Tensor]:
        """The user's tuning in its saved form: {dotted name: tensor}."""
        raise NotImplementedError

    def build(self, method: Method, context: InitContext) -> nn.Module:
        """A freshly initialised tuning for `method`."""
        raise NotImplementedError

    def from_state(self, method: Method, state: dict[str, torch.Tensor]) -> nn.Module:
        """A tuning holding `state` (as produced by `state()`), shapes checked against this model."""
        raise NotImplementedError

    def install(self, tuning: nn.Module) -> None:
        """Put on the model what `tuning` needs (hooks on its sites), once it is built: `build` and `from_state`
        touch nothing shared, so a tuning can be built and checked while the model serves others."""

    def prepare(self, routing: Routing) -> None:
        """Called once per batch before the model runs (e.g. compute a reparameterised prefix once)."""

    # A method that puts positions of its own into its rows' inputs (prompt tuning's soft tokens) sets this and
    # implements `prepend` and `lengths`; at most one such method is in a bank's batch at a time.
    prepends: ClassVar[bool] = False

    def lengths(self, routing: Routing, batch: int) -> torch.Tensor:
        """[batch]: the positions this method puts before each row's input (0 on rows that are not its own)."""
        raise NotImplementedError

    def prepend(self, routing: Routing, embeds: torch.Tensor, mask: torch.Tensor, left: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Insert this method's positions into each of its rows' input embeddings `embeds` [B, L, d] (`mask` [B, L]
        over them; `left`: the model pads on the left). Returns (embeds, mask, starts): row b's own input then
        begins at column starts[b]."""
        raise NotImplementedError

    # A method whose whole effect on later tokens is keys and values at the attention layers (prefix tuning) sets
    # this and implements `into_cache`: an engine's decoding steps then run its rows as the base model's.
    lives_in_cache: ClassVar[bool] = False

    def into_cache(self, routing: Routing, cache: Any, mask: torch.Tensor) -> torch.Tensor:
        """After a prefill of this batch into `cache` (a transformers cache; `mask` over its columns): write this
        method's keys and values into the cache as columns, as if they were tokens just before each row's first
        one, and return the mask over the widened cache."""
        raise NotImplementedError

    def unpositioned_columns(self, user: str) -> int:
        """How many of the cache columns `into_cache` wrote for `user`'s rows take no position: a decoding step,
        which counts each row's positions from its mask over the cache, leaves them out."""
        return 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- merging -----------------------------------------------------------------------------

    def merge(self, user: str) -> None:
        """Fold `user`'s update into the frozen weights; their rows then skip the method's hooks."""
        if not self.merges:
            raise TuningError(f"{self.kind} tunings cannot be merged into the model's weights")
        if self.merged is not None:
            raise TuningError(f"the {self.kind} tuning of {self.merged!r} is already merged; unmerge() it first")
        refuse_quantised(self.model, f"merging a {self.kind} tuning writes into the frozen weights")
        self.fold(user, undo=False)
        self.merged = user
        self._drop_kept()  # values kept from the unmerged weights

    def unmerge(self) -> None:
        """Take the merged update out of the weights again (exact up to floating-point rounding)."""
        if self.merged is None:
            raise TuningError(f"no {self.kind} tuning is merged")
        self.fold(self.merged, undo=True)
        self.merged = None
        self._drop_kept()

    def fold(self, user: str, undo: bool) -> None:
        """Apply `user`'s update to the frozen weights in place (`undo`: take it out again)."""
        raise NotImplementedError


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


def expect_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Check a loaded tuning against the shapes this model needs, naming the first difference."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelMismatchError(
            f"{what}: the tuning's tensors do not fit this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); "
            "was it trained on another architecture?"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ModelMismatchError(
                f"{what}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"this model needs {tuple(shape)}; was it trained on a model of another size?"
            )


class SiteComponent(Component):
    """A component that changes the outputs of named modules ("sites") through forward hooks.

    Each user's tuning lists its `names`; `site_value` gives the user's change at one site for
    their rows, computed from the module's input (`from_input`) or its output, and added to the
    output (or replacing it, `replace`).

    A method whose tunings of one shape can run as one batched computation names their group
    (`slot_group`) and the tensors of a site (`site_tensors`): its resident tunings then live in slot
    tables (see `slots`), from which inference gathers each row's parameters, and training stacks the
    users' own parameters, with `stacked_apply` computing every row's change in both.
    """

    from_input: ClassVar[bool] = False
    replace: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.hooked: set[str] = set()
        self._site_sets: dict[str, frozenset[str]] = {}

    def _forget(self, user: str) -> None:
        super()._forget(user)
        self._site_sets.pop(user, None)

    def has_site(self, user: str, name: str) -> bool:
        if user not in self._site_sets:
            self._site_sets[user] = frozenset(self.tuning(user).names)
        return name in self._site_sets[user]

    def site_value(self, user: str, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stackable(self, users: list[str]) -> bool:
        """Whether these users' tunings have the same shapes, so they can run as one batched computation."""
        groups = {self.slot_group(u) for u in users}
        return len(groups) == 1 and None not in groups

    def stack(self, name: str, users: list[str]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The users' parameters at one site, each stacked along a new first dimension [len(users), ...], and their
        `slot_numbers`, each as a tensor [len(users)]."""
        stacked = tuple(torch.stack(ts) for ts in zip(*(self.site_tensors(u, name) for u in users), strict=True))
        numbers = torch.tensor([self.slot_numbers(u) for u in users], dtype=stacked[0].dtype, device=stacked[0].device)
        return stacked, tuple(numbers.unbind(1))

    def stacked_apply(self, name: str, group: Hashable, params: RowParams, x: torch.Tensor) -> torch.Tensor:
        """`site_value` for many rows at once, each with its own parameters (`params`, in the order of
        `site_tensors`); `group` is the `slot_group` their tunings share, so settings common to the group (LoRA's
        dropout, an adapter's activation) are read from it, never through one user's tuning: a compiled step's
        graph then depends on no user, and outlives any of them. The same code runs in training, on the users'
        own parameters, and in inference, on the slot tables."""
        raise NotImplementedError

    def install(self, tuning: nn.Module) -> None:
        self.hook_sites(tuning.names)

    def hook_sites(self, names: list[str]) -> None:
        found = dict(self.model.named_modules())
        for name in names:
            if name not in self.hooked:
                self._handles.append(found[name].register_forward_hook(self._forward_hook(name)))
                self.hooked.add(name)

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            routing = active()
            if routing is None:
                return None
            source = args[0] if self.from_input else output
            if self.tables and not torch.is_grad_enabled():
                return self._from_tables(name, routing, source, output)
            everyone = routing.groups(self, output.shape[0])
            key = ("site-groups", id(self), name, output.shape[0])
            if key not in routing.cache:  # the same for every call at this site during one forward
                routing.cache[key] = [(u, rows) for u, rows in everyone if self.has_site(u, name) and not self.skips(u)]
            groups = routing.cache[key]
            if not groups:
                return None
            if 1 < len(groups) == len(everyone) and self.stackable([user for user, _ in groups]):
                return self._stacked(name, routing, source, output)
            return route(source, output, groups, lambda user, x: self.site_value(user, name, x), self.replace)

        return hook

    def _from_tables(self, name: str, routing: Routing, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """Every row's change computed from the slot tables, each table on its users' rows (all rows: no gather or
        scatter of activations); a user without this site reads slot 0 there, which changes nothing."""
        changed = None
        for table, rows in self.slot_rows(routing, output.shape[0]):
            tensors = table.tensors.get(name)
            if tensors is None:
                continue
            own = source if rows.rows is None else source.index_select(0, rows.rows)  # the table's users' rows only
            value = self.stacked_apply(name, table.group, rows.params(name, own=True), own)
            value = value if value.dtype == output.dtype else value.to(output.dtype)
            base = output if changed is None else changed
            changed = base + value if rows.rows is None else base.index_add(0, rows.rows, value)
        return changed

    def _stacked(self, name: str, routing: Routing, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Every user's rows in one gathered, batched computation instead of a loop over users (in training: through
        the users' own parameters, so that each gets gradient from their rows only)."""
        batch = output.shape[0]
        users, rows, which = routing.stacked(self, batch)
        tensors, numbers = self.stack(name, users)
        params = RowParams([t[which] for t in tensors], [n[which] for n in numbers])
        if routing.in_order(self, batch):  # every row is ours, in order: no gather or scatter of activations
            value = self.stacked_apply(name, self.slot_group(users[0]), params, source).to(output.dtype)
            return value if self.replace else output + value
        value = self.stacked_apply(name, self.slot_group(users[0]), params, source.index_select(0, rows)).to(output.dtype)
        return output.index_copy(0, rows, value) if self.replace else output.index_add(0, rows, value)

    def close(self) -> None:
        super().close()
        self.hooked.clear()
        self._drop_kept()
