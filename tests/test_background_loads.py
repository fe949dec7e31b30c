"""Loading a tuning from the store never stalls the batch: it is read in the background, the running rows
and the other requests go on meanwhile, and its own requests join once it is in, token for token as if
nothing had been held."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import slimtune
from slimtune.engine import Engine
from slimtune.errors import TuningFileError, UnknownUserError

from conftest import build
from helpers import perturb, vocab_tokenizer

PROMPT = [5, 9, 14, 3]
WAIT = 20  # seconds at most for what must finish while a load is held


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Four saved LoRA tunings of the tiny GPT-2 (told apart by their outputs), and each one's greedy output
    from an engine that has them all added directly."""
    folder = tmp_path_factory.mktemp("tunings")
    folders = {}
    for seed, name in enumerate(["a", "b", "c", "d"]):
        tuned = slimtune.attach(build("gpt2"), slimtune.LoRA(rank=2))
        perturb(tuned.tuning_parameters(), seed=seed, scale=1.0)
        folders[name] = tuned.save(folder / name)
    alone = Engine(build("gpt2"), vocab_tokenizer())
    for name, path in folders.items():
        alone.add(name, path)
    outputs = {name: alone.generate(name, PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
               for name in [None, *folders]}
    alone.close()
    assert len({tuple(o) for o in outputs.values()}) == len(outputs)
    return folders, outputs


class Held:
    """`store.read` of the names in `names` waits until `release()` (after the real read, so it returns what
    the store held when the read began); `started` is set once one is waiting."""

    def __init__(self, store: slimtune.Store, *names: str, fail: Exception | None = None):
        self.names, self.fail = set(names), fail
        self.started, self.gate = threading.Event(), threading.Event()
        self.reads: list[str] = []
        real = store.read

        def read(name):
            self.reads.append(name)
            stored = real(name)
            if name in self.names:
                self.started.set()
                self.gate.wait(WAIT)
                if self.fail is not None:
                    raise self.fail
            return stored

        store.read = read

    def release(self) -> None:
        self.gate.set()


def serving(tmp_path, folders: dict, **options) -> tuple[slimtune.Store, Engine]:
    model = build("gpt2")
    store = slimtune.Store(tmp_path / "store", model)
    for name, folder in folders.items():
        store.add(name, folder)
    return store, Engine(model, vocab_tokenizer(), store, **options)


def finished(handles, timeout: float = WAIT) -> list:
    """Each handle's completion, failing (not hanging) if one is not done within `timeout`."""
    with ThreadPoolExecutor(len(handles)) as pool:
        futures = [pool.submit(h.result) for h in handles]
        return [f.result(timeout=timeout) for f in futures]


def stream(engine: Engine, user, tokens: int = 6):
    return engine.stream(user, PROMPT, max_new_tokens=tokens, ignore_eos=True)


def test_rows_of_other_tunings_run_and_finish_while_a_load_is_held(tmp_path, saved):
    folders, outputs = saved
    store, engine = serving(tmp_path, folders, max_batch=4)
    held = Held(store, "b")
    try:
        assert stream(engine, "a").result().token_ids == outputs["a"]  # a is resident
        running = stream(engine, "a", tokens=100)  # in the batch when b's load begins
        next(iter(running))
        waiting = stream(engine, "b")
        assert held.started.wait(WAIT)
        others = [stream(engine, user) for user in [None, "a", None, "a"]]
        done = finished([running, *others])  # while b is still being read
        assert [d.token_ids for d in done[1:]] == [outputs[u] for u in [None, "a", None, "a"]]
        assert len(done[0].token_ids) == 100
        assert waiting._result is None and engine.stats.loading == 1 and "b" not in engine.resident
        time.sleep(0.2)
        held.release()
        assert finished([waiting])[0].token_ids == outputs["b"]
        assert "b" in engine.resident and engine.stats.loading == 0 and engine.stats.loads == 2
        assert engine.stats.load_seconds >= 0.2 and engine.stats.load_stall_seconds < engine.stats.load_seconds
    finally:
        held.release()
        engine.close()


def test_a_held_tenant_waits_and_the_requests_behind_it_go_on(tmp_path, saved):
    """The waiting line moves past the tenant whose tuning is loading: a base-model request that came later
    runs and finishes; the held tuning's second request waits behind its first, and one load serves both."""
    folders, outputs = saved
    store, engine = serving(tmp_path, folders, max_batch=4)
    held = Held(store, "c")
    try:
        first = stream(engine, "c")
        assert held.started.wait(WAIT)
        second = stream(engine, "c")
        assert finished([stream(engine, None)])[0].token_ids == outputs[None]
        assert first._result is None and second._result is None
        held.release()
        assert [d.token_ids for d in finished([first, second])] == [outputs["c"], outputs["c"]]
        assert held.reads.count("c") == 1 and engine.stats.loads == 1
    finally:
        held.release()
        engine.close()


@pytest.mark.parametrize("failure", ["deleted", "corrupt"])
def test_a_load_that_fails_fails_only_its_own_request(tmp_path, saved, failure):
    folders, outputs = saved
    store, engine = serving(tmp_path, folders, max_batch=4)
    error = (UnknownUserError("no tuning named 'd' in the store at '...'") if failure == "deleted"
             else TuningFileError("'tuning.safetensors' is corrupt or truncated"))
    held = Held(store, "d", fail=error)
    try:
        assert stream(engine, "a").result().token_ids == outputs["a"]
        running = stream(engine, "a", tokens=100)
        next(iter(running))
        failing = stream(engine, "d")
        assert held.started.wait(WAIT)
        other = stream(engine, None)
        assert finished([other])[0].token_ids == outputs[None]  # while d's load is held
        if failure == "deleted":
            store.delete("d")
        held.release()
        expected = (UnknownUserError, "'d': it is no longer in the store") if failure == "deleted" else (
            TuningFileError, "corrupt")
        with pytest.raises(expected[0], match=expected[1]):
            finished([failing])
        assert len(finished([running])[0].token_ids) == 100
        assert stream(engine, "b").result().token_ids == outputs["b"]
        assert engine.stats.loading == 0 and "d" not in engine.resident
    finally:
        held.release()
        engine.close()


def test_a_tuning_replaced_while_it_loads_is_served_as_the_store_holds_it_when_it_joins(tmp_path, saved):
    """The load read the old version; the store was replaced before it was done: its request gets the new one."""
    folders, outputs = saved
    store, engine = serving(tmp_path, {"x": folders["a"]})
    held = Held(store, "x")
    try:
        waiting = stream(engine, "x")
        assert held.started.wait(WAIT)
        store.add("x", folders["b"], replace=True)
        held.names.clear()  # the second read goes through
        held.release()
        assert finished([waiting])[0].token_ids == outputs["b"]
        assert stream(engine, "x").result().token_ids == outputs["b"]
    finally:
        held.release()
        engine.close()


def test_a_load_reserves_its_slot_and_the_worker_waits_for_it_without_spinning(tmp_path, saved, monkeypatch):
    """With one slot, a second tuning's load does not start while the first one's is held (the bank never holds
    more than `max_resident`); meanwhile the worker, with nothing it can run, blocks instead of looping."""
    folders, outputs = saved
    store, engine = serving(tmp_path, folders, max_resident=1)
    held = Held(store, "a")
    rounds = []
    admit = engine._admit
    monkeypatch.setattr(engine, "_admit", lambda: rounds.append(1) or admit())
    try:
        first = stream(engine, "a")
        assert held.started.wait(WAIT)
        second = stream(engine, "b")
        base = stream(engine, None)
        assert finished([base])[0].token_ids == outputs[None]
        before = len(rounds)
        time.sleep(1.0)
        assert len(rounds) - before <= 4  # one per wake-up at most (a blocked take times out every 0.5 s)
        assert held.reads == ["a"] and engine.stats.loading == 1 and not engine.resident
        held.release()
        assert [d.token_ids for d in finished([first, second])] == [outputs["a"], outputs["b"]]
        assert engine.resident == ["b"] and engine.stats.evictions == 1
    finally:
        held.release()
        engine.close()


def test_closing_the_engine_serves_what_waits_for_a_load_and_stops_the_loading_thread(tmp_path, saved):
    folders, outputs = saved
    store, engine = serving(tmp_path, folders)
    held = Held(store, "c")
    waiting = stream(engine, "c")
    assert held.started.wait(WAIT)
    threading.Timer(0.3, held.release).start()
    engine.close(wait=True)
    assert finished([waiting])[0].token_ids == outputs["c"]
    assert not [t for t in threading.enumerate() if t.name.startswith(("slimtune-loads", "slimtune-engine"))]


def test_a_loaded_tuning_is_built_on_the_loading_thread_and_the_worker_only_puts_it_in(tmp_path, saved, monkeypatch):
    """Building a tuning's modules from its tensors (every shape checked) was the larger part of a load, and ran
    on the worker between two steps: every tenant's rows waited for it."""
    from slimtune.methods.lora import LoRAComponent
    from slimtune.methods.slots import SlotTable

    folders, outputs = saved
    store, engine = serving(tmp_path, folders)
    made, put = [], []
    real_make, real_put = LoRAComponent.from_state, SlotTable.add
    monkeypatch.setattr(LoRAComponent, "from_state",
                        lambda self, *a: made.append(threading.current_thread().name) or real_make(self, *a))
    monkeypatch.setattr(SlotTable, "add", lambda self, *a: put.append(threading.current_thread().name) or real_put(self, *a))
    results = finished([stream(engine, name) for name in ["a", "b", "c"]])
    assert [r.token_ids for r in results] == [outputs[name] for name in ["a", "b", "c"]]
    assert made and all(name.startswith("slimtune-loads") for name in made), made
    assert put and all(name == "slimtune-engine" for name in put), put
    engine.close()
