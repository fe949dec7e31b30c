"""The store on a shared machine: crash leftovers removed on restart without touching live writers' files,
folders and the keys file private to their owner, and JSON read from disk bounded like JSON from outside."""

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import slimtune
from slimtune import storage
from slimtune.errors import TuningFileError
from slimtune.keys import KeyConfigError, KeyRing

from conftest import build
from helpers import perturb

ADMIN = "admin-key-for-the-tests"
DEEP = "[" * 100_000 + "]" * 100_000  # what json.loads cannot read without a RecursionError


@pytest.fixture
def usual_umask():
    """The usual 022, under which plain folders and files are readable by every local user."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def tuned(seed=0):
    model = build("gpt2")
    tuning = slimtune.attach(model, slimtune.LoRA(rank=2))
    perturb(tuning.tuning_parameters(), seed=seed)
    return tuning


def mode(path):
    return path.stat().st_mode & 0o777


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


# --- crash leftovers ---------------------------------------------------------------------------------------


def test_a_restart_removes_what_crashed_writers_left_and_keeps_every_tuning(tmp_path):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    alice = store.add("alice", tuned())
    # What kills left behind, made as each step makes it (an older release's scratch folders had no owner file).
    old_upload = store.path / ".upload-k1ll3d"
    old_upload.mkdir()
    (old_upload / "tuning.safetensors").write_bytes(b"\0" * 4096)
    old_staging = store.versions / ".staging-k1ll3d"
    shutil.copytree(alice.path, old_staging)
    for folder in (old_upload, old_staging):
        age(folder, 2 * 3600)
    orphan = store.versions / "bob.0123456789ab"  # renamed into place, killed before its link replaced the old
    shutil.copytree(alice.path, orphan)
    link = store.tunings / ".bob.5eb0c9c1a2b34d6f8e7a9b0c1d2e3f40.link"
    os.symlink(os.path.relpath(orphan, store.tunings), link)
    trash = store.path / ".trash-5eb0c9c1a2b34d6f8e7a9b0c1d2e3f40"  # killed while removing a replaced version
    shutil.copytree(alice.path, trash)
    recent = store.path / ".upload-0ld3r"  # an older release's upload in progress: no owner file, but recent
    recent.mkdir()

    reopened = slimtune.Store(tmp_path / "store", build("gpt2"))

    for gone in (old_upload, old_staging, orphan, trash):
        assert not gone.exists(), gone
    assert not os.path.lexists(link)
    assert recent.is_dir()
    assert sorted(reopened.cleaned) == sorted([".upload-k1ll3d", "versions/.staging-k1ll3d", "versions/bob.0123456789ab",
                                               "tunings/" + link.name, trash.name])
    assert reopened.names() == ["alice"] and os.listdir(reopened.versions) == [alice.path.name]
    slimtune.load(build("gpt2"), reopened.path_of("alice"))
    assert reopened.clean() == []  # nothing left to clean


SCRATCH_WRITER = """
import sys
from slimtune.store import Store

with Store(sys.argv[1]).scratch(sys.argv[2]) as folder:
    (folder / "tuning.safetensors").write_bytes(b"half an upload")
    print(folder, flush=True)
    sys.stdin.readline()  # until the test lets it finish, or kills it
"""


def test_a_restart_removes_a_killed_writers_scratch_folder_but_not_a_live_writers(tmp_path):
    slimtune.Store(tmp_path / "store", build("gpt2"))
    writers = {what: subprocess.Popen([sys.executable, "-c", SCRATCH_WRITER, str(tmp_path / "store"), prefix],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for what, prefix in [("killed", ".upload-"), ("uploading", ".upload-"), ("adding", ".staging-")]}
    try:
        folders = {what: tmp_path / "store" / os.path.basename(w.stdout.readline().strip())
                   for what, w in writers.items()}
        writers["killed"].send_signal(signal.SIGKILL)
        writers["killed"].wait(timeout=30)
        assert folders["killed"].is_dir()  # what a crash leaves

        store = slimtune.Store(tmp_path / "store", build("gpt2"))

        assert not folders["killed"].exists() and store.cleaned == [folders["killed"].name]
        for what in ("uploading", "adding"):
            assert (folders[what] / "tuning.safetensors").read_bytes() == b"half an upload", what
        for what in ("uploading", "adding"):
            writers[what].communicate("done\n", timeout=30)
            assert writers[what].returncode == 0 and not folders[what].exists(), what
    finally:
        for w in writers.values():
            if w.poll() is None:
                w.kill()
                w.wait()


def _add_repeatedly(folder, count):
    store = slimtune.Store(folder)
    tuning = tuned()
    for i in range(count):
        store.add(f"t{i}", tuning)
        store.add("contested", tuning, replace=True)


def test_cleaning_while_another_process_adds_takes_nothing_from_it(tmp_path):
    slimtune.Store(tmp_path / "store", build("gpt2"))
    writer = multiprocessing.get_context("spawn").Process(target=_add_repeatedly, args=(tmp_path / "store", 20))
    writer.start()
    model = build("gpt2")
    overlapped = 0
    while writer.is_alive():  # a server restarting over and over while a training run writes
        reopened = slimtune.Store(tmp_path / "store", model)
        assert reopened.cleaned == []
        overlapped += 0 < len(reopened) < 21
    writer.join()
    assert writer.exitcode == 0 and overlapped  # some cleaning ran between the writer's adds
    store = slimtune.Store(tmp_path / "store", model)
    assert store.cleaned == [] and store.names() == sorted(["contested", *(f"t{i}" for i in range(20))])
    assert len(os.listdir(store.versions)) == len(store.names())
    assert sorted(p.name for p in store.path.iterdir()) == [".lock", "store.json", "tunings", "versions"]


def test_scratch_folders_are_only_of_the_kinds_clean_knows(tmp_path):
    store = slimtune.Store(tmp_path / "store")
    with pytest.raises(ValueError, match="'.partial-'.*expected one of"), store.scratch(".partial-"):
        pass
    with store.scratch(".upload-") as folder:
        assert folder.parent == store.path and folder.name.startswith(".upload-") and mode(folder) == 0o700
    assert not folder.exists()


# --- private to their owner --------------------------------------------------------------------------------


def test_a_new_store_and_its_keys_file_are_private_to_their_owner(tmp_path, usual_umask):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    entry = store.add("alice", tuned())
    KeyRing(store.path / "keys.json", ADMIN).create("alice")
    for folder in (store.path, store.tunings, store.versions, entry.path):
        assert mode(folder) == 0o700, folder
    assert mode(store.path / "keys.json") == 0o600
    assert mode(slimtune.Store(tmp_path / "other").path) == 0o700  # opened without a model too


def test_opening_an_older_releases_store_with_its_model_makes_it_private(tmp_path, usual_umask):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    store.add("alice", tuned())
    KeyRing(store.path / "keys.json", ADMIN).create("alice")
    for folder in (store.path, store.tunings, store.versions):
        folder.chmod(0o755)  # as an older release left them
    (store.path / "keys.json").chmod(0o644)

    slimtune.Store(tmp_path / "store")  # a reader in passing changes nothing
    assert mode(store.path) == 0o755
    slimtune.Store(tmp_path / "store", build("gpt2"))
    KeyRing(store.path / "keys.json", ADMIN)

    for folder in (store.path, store.tunings, store.versions):
        assert mode(folder) == 0o700, folder
    assert mode(store.path / "keys.json") == 0o600


def test_an_atomic_write_with_a_mode_gives_exactly_that_mode(tmp_path, usual_umask):
    storage.atomic_write(tmp_path / "new", b"secret", mode=0o600)
    (tmp_path / "old").write_bytes(b"public")
    (tmp_path / "old").chmod(0o644)
    storage.atomic_write_json(tmp_path / "old", {"secret": 1}, mode=0o600)  # not the replaced file's mode
    assert mode(tmp_path / "new") == mode(tmp_path / "old") == 0o600
    assert (tmp_path / "new").read_bytes() == b"secret"
    assert storage.load_json((tmp_path / "old").read_bytes(), "x") == {"secret": 1}


# --- JSON from disk ----------------------------------------------------------------------------------------


def test_the_store_record_and_entries_are_read_as_bounded_json(tmp_path):
    store = slimtune.Store(tmp_path / "store", build("gpt2"))
    entry = store.add("alice", tuned())
    (entry.path / "entry.json").write_text(DEEP)
    with pytest.raises(TuningFileError, match="entry for 'alice' is unreadable.*nested more than"):
        store.entry("alice")
    (store.path / "store.json").write_text(DEEP)
    with pytest.raises(TuningFileError, match="store.json' is JSON nested more than"):
        slimtune.Store(tmp_path / "store")


def test_the_keys_file_is_read_as_bounded_json(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(DEEP)
    with pytest.raises(KeyConfigError, match="keys file .* is unreadable: it is JSON nested more than"):
        KeyRing(keys_file, ADMIN)
    padding = "x" * (storage.MAX_JSON_BYTES + 1)
    keys_file.write_text(f'{{"format": "slimtune-keys", "version": 1, "keys": {{}}, "padding": "{padding}"}}')
    with pytest.raises(KeyConfigError, match=f"unreadable: it is .* bytes of JSON; at most {storage.MAX_JSON_BYTES}"):
        KeyRing(keys_file, ADMIN)


def test_a_key_that_would_make_the_keys_file_too_large_to_read_back_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MAX_JSON_BYTES", 2000)
    ring = KeyRing(tmp_path / "keys.json", ADMIN)
    made = []
    with pytest.raises(KeyConfigError, match="would be .* bytes.*more than the 2000.*delete unused keys"):  # noqa: PT012
        for i in range(50):
            made.append(ring.create(f"user {i}")[1])
    made.sort(key=lambda info: info.id)  # as list() gives them
    assert 0 < len(made) < 50 and ring.list() == made
    assert KeyRing(tmp_path / "keys.json", ADMIN).list() == made  # the file still reads back, without the refused key
