"""One store shared by several processes (server replicas): keys, tunings and the engine's bank stay right
across them. "Another process" is a real one (spawned), started once for the module."""

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import slimtune
from slimtune import storage
from slimtune.engine import Engine
from slimtune.errors import TuningError, UnknownUserError
from slimtune.keys import Caller, KeyRing

from conftest import build
from helpers import perturb, vocab_tokenizer

ADMIN = "admin-key-for-the-tests-0123456789"
PROMPT = [5, 9, 14, 3]
WAIT = 30  # seconds at most for the other process to answer


@pytest.fixture(scope="module")
def other():
    """Another process, with slimtune imported, to make changes in while this one serves."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_ready).result(timeout=60) != os.getpid()
        yield pool


def _ready() -> int:
    """The other process's id; calling it there imported this module, and slimtune with it."""
    return os.getpid()


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Three saved LoRA tunings of the tiny GPT-2, and each one's greedy output alone."""
    folder = tmp_path_factory.mktemp("versions")
    saved = []
    for seed in range(3):
        tuned = slimtune.attach(build("gpt2"), slimtune.LoRA(rank=2))
        perturb(tuned.tuning_parameters(), seed=seed, scale=1.0)
        saved.append(tuned.save(folder / f"v{seed}"))
    alone = Engine(build("gpt2"), vocab_tokenizer())
    for i, path in enumerate(saved):
        alone.add(f"v{i}", path)
    outputs = [alone.generate(f"v{i}", PROMPT, max_new_tokens=6, ignore_eos=True).token_ids for i in range(3)]
    alone.close()
    assert len({tuple(o) for o in outputs}) == 3  # the versions are told apart by their outputs
    return saved, outputs


def serving(tmp_path, tunings: dict, **options) -> tuple[slimtune.Store, Engine]:
    model = build("gpt2")
    store = slimtune.Store(tmp_path / "store", model)
    for name, folder in tunings.items():
        store.add(name, folder)
    return store, Engine(model, vocab_tokenizer(), store, **options)


def generate(engine: Engine, user: str, tokens: int = 6) -> list[int]:
    return engine.generate(user, PROMPT, max_new_tokens=tokens, ignore_eos=True).token_ids


# --- what the other process does ------------------------------------------------------------------------------------


def _make_key(path) -> tuple[str, str]:
    key, info = KeyRing(path, ADMIN).create("made elsewhere")
    return key, info.id


def _revoke(path, key_id: str) -> bool:
    return KeyRing(path, ADMIN).delete(key_id)


def _make_keys(path, count: int, start_at: float) -> list[str]:
    ring = KeyRing(path, ADMIN)  # one ring making many keys, as a server does
    time.sleep(max(0.0, start_at - time.time()))
    return [ring.create(f"{os.getpid()} {i}")[1].id for i in range(count)]


def _replace(path, name: str, folder) -> None:
    slimtune.Store(path).add(name, folder, replace=True)


def _delete(path, *names: str) -> None:
    store = slimtune.Store(path)
    for name in names:
        store.delete(name)


def _churn(path, name: str, folders: list, stop) -> int:
    """Replace `name` again and again with each of `folders` in turn, deleting and adding it back now and then,
    until the file `stop` exists (or for 15 s at most)."""
    store, rounds, end = slimtune.Store(path), 0, time.time() + 15
    while not stop.exists() and time.time() < end:
        if rounds % 5 == 4:
            store.delete(name)
        store.add(name, folders[rounds % len(folders)], replace=True)
        rounds += 1
    return rounds


def _add_under_quota(path, folder, prefix: str, count: int, quota: int, start_at: float) -> int:
    """Try to add `count` tunings named k.<prefix><i>, under a quota of `quota` tunings named k.*; how many went in."""
    store, added = slimtune.Store(path), 0

    def at_most():
        if sum(name.startswith("k.") for name in store.names()) >= quota:
            raise TuningError(f"over the quota of {quota} tunings")

    time.sleep(max(0.0, start_at - time.time()))
    for i in range(count):
        try:
            store.add(f"k.{prefix}{i}", folder, admit=at_most)
            added += 1
        except TuningError as err:
            assert "over the quota" in str(err)
    return added


# --- keys ---------------------------------------------------------------------------------------------------------


def test_a_key_made_or_revoked_in_another_process_counts_at_once(tmp_path, other):
    path = tmp_path / "keys.json"
    ring = KeyRing(path, ADMIN)  # a running server's
    key, key_id = other.submit(_make_key, path).result(WAIT)
    assert ring.caller(key) == Caller(key_id) and key_id in ring
    assert [info.id for info in ring.list()] == [key_id]
    assert other.submit(_revoke, path, key_id).result(WAIT)
    assert ring.caller(key) is None and key_id not in ring and ring.list() == []
    assert ring.caller(ADMIN) == Caller("admin", admin=True)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_two_processes_making_keys_at_once_lose_none(tmp_path, other):
    path = tmp_path / "keys.json"
    start_at = time.time() + 0.3
    theirs = other.submit(_make_keys, path, 20, start_at)
    mine = _make_keys(path, 20, start_at)
    made = set(mine) | set(theirs.result(WAIT))
    assert len(made) == 40
    assert {info.id for info in KeyRing(path, ADMIN).list()} == made


# --- tunings ------------------------------------------------------------------------------------------------------


def test_a_tuning_replaced_by_another_process_is_served_in_its_new_version(tmp_path, other, versions):
    folders, alone = versions
    store, engine = serving(tmp_path, {"x": folders[0], "y": folders[2]})
    try:
        assert generate(engine, "x") == alone[0] and generate(engine, "y") == alone[2]
        other.submit(_replace, store.path, "x", folders[1]).result(WAIT)
        assert generate(engine, "x") == alone[1]
        # rows running when it is replaced keep the version they started with; the next request gets the new one
        running = engine.stream("x", PROMPT, max_new_tokens=60, ignore_eos=True)
        next(iter(running))  # admitted: its first token is out
        other.submit(_replace, store.path, "x", folders[0]).result(WAIT)
        assert generate(engine, "x") == alone[0]
        assert running.result().token_ids[:6] == alone[1]
        assert generate(engine, "y") == alone[2]
        before = store.version("x")
        other.submit(_replace, store.path, "x", folders[2]).result(WAIT)
        assert store.version("x") not in (None, before) and generate(engine, "x") == alone[2]
    finally:
        engine.close()


def test_a_tuning_deleted_by_another_process_fails_only_its_own_requests(tmp_path, other, versions):
    folders, alone = versions
    store, engine = serving(tmp_path, {"x": folders[0], "y": folders[2], "z": folders[1]}, max_batch=4)
    try:
        assert generate(engine, "x") == alone[0]  # x is resident, z never loaded
        busy = engine.stream("y", PROMPT, max_new_tokens=40, ignore_eos=True)
        next(iter(busy))
        with engine._lock:  # the engine's worker waits: the requests are checked and queued, not yet loaded
            waiting = {name: engine.stream(name, PROMPT, max_new_tokens=6, ignore_eos=True) for name in "xyz"}
            other.submit(_delete, store.path, "x", "z").result(WAIT)
        for name in "xz":
            with pytest.raises(UnknownUserError, match=f"'{name}'") as err:
                waiting[name].result()
            assert str(store.path) not in str(err.value)  # the tuning as the caller knows it, no server path
        assert waiting["y"].result().token_ids == alone[2]
        assert busy.result().token_ids[:6] == alone[2] and len(busy.result().token_ids) == 40
        assert store.version("x") is None and "x" not in store
        with pytest.raises(UnknownUserError, match="'x'"):
            generate(engine, "x")
        assert generate(engine, "y") == alone[2]
    finally:
        engine.close()


def test_replacing_while_another_process_loads_never_gives_half_a_tuning(tmp_path, other, versions):
    folders, alone = versions
    store, engine = serving(tmp_path, {"x": folders[0]})
    first = {output[0] for output in alone}  # a token is enough to tell the versions apart; loads are the point
    churn = other.submit(_churn, store.path, "x", folders, tmp_path / "stop")
    served, start = 0, time.time()
    try:
        while (served < 10 or time.time() < start + 5) and time.time() < start + 10:
            engine.remove("x")  # loaded again from the store each time
            try:
                assert generate(engine, "x", tokens=1)[0] in first
                served += 1
            except UnknownUserError:  # deleted for a moment, the only error there may be: wait for it to be back
                time.sleep(0.002)
    finally:
        (tmp_path / "stop").touch()
        engine.close()
    assert churn.result(WAIT) >= 5 and served >= 10


def test_a_tuning_read_while_another_process_replaces_it_is_one_whole_version(tmp_path, other, versions):
    folders, _ = versions
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    store.add("x", folders[0])
    saved = {storage.read(folder)[0]["sha256"]: storage.read(folder)[1] for folder in folders}
    churn = other.submit(_churn, store.path, "x", folders, tmp_path / "stop")
    whole, start = 0, time.time()
    try:
        while (whole < 10 or time.time() < start + 1.5) and time.time() < start + 10:
            try:
                stored = store.read("x")
            except UnknownUserError:  # deleted for a moment
                time.sleep(0.002)
                continue
            tensors = saved[stored.record["sha256"]]
            assert stored.tensors.keys() == tensors.keys()
            assert all(torch.equal(stored.tensors[k], tensors[k]) for k in tensors)
            whole += 1
    finally:
        (tmp_path / "stop").touch()
    assert churn.result(WAIT) >= 5 and whole >= 10


def snapshot(store: slimtune.Store) -> list:
    return sorted((p.relative_to(store.path).as_posix(), p.stat().st_size) for p in store.path.rglob("*")
                  if p.is_file() and p.name != ".lock")


def test_an_add_refused_by_admit_leaves_the_store_as_it_was(tmp_path, versions):
    folders, _ = versions
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    store.add("a", folders[0])
    before, version = snapshot(store), store.version("a")
    seen = []

    def refuse():
        seen.append(store.names())
        raise TuningError("over the quota")

    with pytest.raises(TuningError, match="over the quota"):
        store.add("b", folders[1], admit=refuse)
    with pytest.raises(TuningError, match="over the quota"):
        store.add("a", folders[1], replace=True, admit=refuse)
    assert seen == [["a"], ["a"]]
    assert snapshot(store) == before and store.version("a") == version and store.names() == ["a"]
    assert not [p for p in store.path.rglob(".*") if p.name.startswith((".staging", ".trash"))]
    store.add("b", folders[1], admit=lambda: None)
    assert store.names() == ["a", "b"]


def test_two_processes_adding_under_a_quota_never_pass_it(tmp_path, other, versions):
    folders, _ = versions
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    start_at = time.time() + 0.3
    theirs = other.submit(_add_under_quota, store.path, folders[0], "b", 8, 5, start_at)
    added = _add_under_quota(store.path, folders[0], "a", 8, 5, start_at) + theirs.result(WAIT)
    assert added == 5 and len(store.names()) == 5
