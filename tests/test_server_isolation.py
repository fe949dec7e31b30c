"""The server's side of tenant isolation: what one key sends can fail only that key's request, and no answer
tells anything of another key or of the server's insides."""

import threading

import httpx
from test_server import ADMIN, auth, held, new_key, save_tuning, server, snapshot, upload


def in_thread(function):
    out = []
    thread = threading.Thread(target=lambda: out.append(function()), daemon=True)
    thread.start()
    return thread, out


class Gate:
    """Replaces `owner.name` with a version that waits until opened (at most 30 s), then runs the original."""

    def __init__(self, owner, name):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        self.entered, self.open = threading.Event(), threading.Event()

        def gated(*args, **kwargs):
            self.entered.set()
            self.open.wait(30)
            return self.original(*args, **kwargs)

        setattr(owner, name, gated)

    def restore(self):
        self.open.set()
        setattr(self.owner, self.name, self.original)


def test_a_key_revoked_while_its_upload_is_stored_ends_with_nothing_stored(tmp_path):
    with server(tmp_path) as s:
        carol = new_key(s.http, "carol")
        folder = save_tuning(tmp_path / "t", "lora", seed=4)
        gate = Gate(s.store, "add")
        try:
            thread, out = in_thread(lambda: upload(httpx.Client(base_url=s.url, timeout=60), carol["key"], "late", folder))
            assert gate.entered.wait(30)
            assert s.http.delete(f"/v1/keys/{carol['id']}", headers=auth(ADMIN)).status_code == 200
            gate.open.set()
            thread.join(60)
        finally:
            gate.restore()
        assert out[0].status_code == 401
        assert f"{carol['id']}.late" not in s.store
        assert not [n for n in s.store.names() if n.startswith(carol["id"])]


def test_errors_name_no_server_path_and_a_500_names_only_a_request_id(tmp_path):
    with server(tmp_path) as s:
        alice = new_key(s.http, "alice")
        other_model = save_tuning(tmp_path / "other", "lora", model_seed=1)  # same architecture, other weights
        refused = upload(s.http, alice["key"], "other", other_model)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_mismatch"
        assert str(s.store.path) not in refused.text and str(tmp_path) not in refused.text

        def broken(*args, **kwargs):
            raise RuntimeError(f"secret detail at {s.store.path}")

        original, s.engine.submit = s.engine.submit, broken
        try:
            failed = s.http.post("/v1/completions", headers=auth(alice["key"]),
                                 json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 2})
        finally:
            s.engine.submit = original
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert "req-" in error["message"] and "secret" not in failed.text and str(tmp_path) not in failed.text
        assert error["type"] == "server_error"


def test_prompts_are_tokenised_off_the_event_loop_and_too_long_ones_are_refused_untokenised(tmp_path):
    with server(tmp_path) as s:
        key = new_key(s.http)["key"]
        tokenizer = type(s.engine.tokenizer)
        seen = []
        original = tokenizer.__call__

        def watched(self, text, *args, **kwargs):
            seen.append((threading.current_thread().name, len(text) if isinstance(text, str) else None))
            return original(self, text, *args, **kwargs)

        tokenizer.__call__ = watched
        try:
            ok = s.http.post("/v1/completions", headers=auth(key), json={"model": "tiny-llama", "prompt": "hello world",
                                                                         "max_tokens": 2, "temperature": 0})
            chat = s.http.post("/v1/chat/completions", headers=auth(key),
                               json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}],
                                     "max_tokens": 2, "temperature": 0})
            huge = "hello " * (s.engine.max_prompt_chars // 6 + 1)
            long = s.http.post("/v1/completions", headers=auth(key), json={"model": "tiny-llama", "prompt": huge})
        finally:
            tokenizer.__call__ = original
        assert ok.status_code == 200 and chat.status_code == 200
        assert seen and all(name != "slimtune-server" for name, _ in seen)  # the thread that runs the event loop
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert all(n is None or n < len(huge) for _, n in seen)


def test_a_key_keeps_at_most_its_quota_and_checks_one_upload_at_a_time(tmp_path):
    with server(tmp_path) as s:
        s.service.max_tunings = 2
        key = new_key(s.http)["key"]
        folders = [save_tuning(tmp_path / f"t{i}", "lora", seed=i) for i in range(3)]
        assert upload(s.http, key, "a", folders[0]).status_code == 201
        assert upload(s.http, key, "b", folders[1]).status_code == 201
        before = snapshot(s.store)
        third = upload(s.http, key, "c", folders[2])
        assert third.status_code == 403 and third.json()["error"]["code"] == "quota_exceeded"
        assert snapshot(s.store) == before
        assert upload(s.http, key, "b", folders[2], replace="true").status_code == 201  # replacing stays within it
        s.service.max_bytes = 1
        assert upload(s.http, key, "a", folders[1], replace="true").json()["error"]["code"] == "quota_exceeded"
        s.service.max_bytes = 2**30
        gate = Gate(s.engine, "check")
        try:
            thread, out = in_thread(lambda: upload(httpx.Client(base_url=s.url, timeout=60), key, "a", folders[2],
                                                   replace="true"))
            assert gate.entered.wait(30)
            second = upload(s.http, key, "b", folders[0], replace="true")
            gate.open.set()
            thread.join(60)
        finally:
            gate.restore()
        assert second.status_code == 429 and out[0].status_code == 201


def test_two_servers_on_one_store_together_keep_a_key_within_its_quota(tmp_path):
    """Uploads through two servers (replicas) at once: both pass the early check while neither has stored yet; the
    store's lock makes the second add see the first, so the key ends with its quota, not twice it."""
    with server(tmp_path) as a, server(tmp_path) as b:
        a.service.max_tunings = b.service.max_tunings = 1
        key = new_key(a.http)["key"]  # made through one, taken by both
        folders = [save_tuning(tmp_path / f"t{i}", "lora", seed=i) for i in range(2)]
        gates = [Gate(a.engine, "check"), Gate(b.engine, "check")]
        try:
            (one, got_a), (two, got_b) = [in_thread(lambda s=s, n=n, f=f: upload(httpx.Client(base_url=s.url, timeout=60),
                                                                                 key, n, f))
                                          for s, n, f in ((a, "x", folders[0]), (b, "y", folders[1]))]
            assert all(gate.entered.wait(30) for gate in gates)  # both past the early count, neither stored
        finally:
            for gate in gates:
                gate.restore()
        one.join(60)
        two.join(60)
        statuses = sorted(r.status_code for r in got_a + got_b)
        assert statuses == [201, 403], [r.text for r in got_a + got_b]
        assert len([n for n in a.store.names() if not n.startswith("admin")]) == 1


def test_the_store_and_keys_file_are_private_to_the_server(tmp_path):
    with server(tmp_path) as s:
        new_key(s.http)
        modes = {p: (s.store.path / p).stat().st_mode & 0o777 for p in ("", "tunings", "versions", "keys.json")}
    assert modes == {"": 0o700, "tunings": 0o700, "versions": 0o700, "keys.json": 0o600}


def test_a_restart_removes_what_killed_writers_left_and_keeps_every_tuning(tmp_path):
    import os
    import time

    import slimtune

    from conftest import build

    model = build("llama")
    store = slimtune.Store(tmp_path / "store", model)
    store.add("kept", save_tuning(tmp_path / "t", "lora", seed=2))
    kept = snapshot(store)
    old = time.time() - 2 * 3600
    for leftover in (store.path / ".upload-dead", store.versions / ".staging-dead", store.path / ".trash-dead",
                     store.versions / "gone.0123456789ab"):
        leftover.mkdir()
        (leftover / "tuning.safetensors").write_bytes(b"x" * 1000)
        os.utime(leftover, (old, old))
    os.symlink("../versions/gone.0123456789ab", store.tunings / ".gone.link")
    for name, age in ((".keys.json.dead.tmp", old), (".keys.json.live.tmp", time.time())):  # killed, or being written
        (store.path / name).write_bytes(b"{}")
        os.utime(store.path / name, (age, age))
    reopened = slimtune.Store(tmp_path / "store", model)
    assert snapshot(reopened) == sorted([*kept, (".keys.json.live.tmp", 2)])
    assert not (store.tunings / ".gone.link").is_symlink()
    assert len(reopened.cleaned) == 6
    slimtune.load(build("llama"), reopened.path_of("kept"))


def test_zero_or_deeply_nested_values_are_refused_with_400_not_ignored_or_500(tmp_path):
    with server(tmp_path) as s:
        key = new_key(s.http)["key"]
        chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}]}
        zero = s.http.post("/v1/chat/completions", headers=auth(key), json={**chat, "max_completion_tokens": 0})
        assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_completion_tokens"
        deep = "[" * 100_000 + "]" * 100_000
        folder = save_tuning(tmp_path / "t", "lora")
        assert upload(s.http, key, "deep-task", folder, task=deep).status_code == 400
        (folder / "slimtune.json").write_text('{"method": ' + deep + "}")
        assert upload(s.http, key, "deep-record", folder).status_code == 400
        body = s.http.post("/v1/completions", headers={**auth(key), "content-type": "application/json"},
                           content='{"model": ' + deep + ', "prompt": "hi"}')
        assert body.status_code == 400
        assert s.http.get("/health").status_code == 200


def test_a_key_has_at_most_its_limit_of_requests_in_flight_and_others_are_not_held_back(tmp_path):
    with server(tmp_path, max_batch=4) as s:
        s.service.max_requests = 3
        greedy, other = new_key(s.http)["key"], new_key(s.http)["key"]
        body = {"model": "tiny-llama", "prompt": ["w30 w31"] * 3, "max_tokens": 4}
        with held(s.engine.model) as go:
            thread, out = in_thread(lambda: httpx.Client(base_url=s.url, timeout=60).post(
                "/v1/completions", headers=auth(greedy), json=body))
            while s.service._in_flight.get(s.service.keys.caller(greedy).id, 0) < 3:
                threading.Event().wait(0.01)
            refused = s.http.post("/v1/completions", headers=auth(greedy), json={**body, "prompt": "w30"})
            second, answer = in_thread(lambda: httpx.Client(base_url=s.url, timeout=60).post(
                "/v1/completions", headers=auth(other), json=body))
            while len(s.service._in_flight) < 2:
                threading.Event().wait(0.01)
            go.set()
            thread.join(60)
            second.join(60)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
        assert out[0].status_code == 200 and answer[0].status_code == 200
        assert s.service._in_flight == {}  # every request counted out again
        assert s.http.post("/v1/completions", headers=auth(greedy), json=body).status_code == 200


def test_a_full_keys_file_refuses_a_new_key_with_403_and_keeps_the_others(tmp_path, monkeypatch):
    from slimtune import storage

    with server(tmp_path) as s:
        kept = new_key(s.http, "kept")
        monkeypatch.setattr(storage, "MAX_JSON_BYTES", len((s.store.path / "keys.json").read_bytes()) + 10)
        response = s.http.post("/v1/keys", headers=auth(ADMIN), json={"name": "one too many"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "quota_exceeded"
        assert [k["id"] for k in s.http.get("/v1/keys", headers=auth(ADMIN)).json()["data"]] == [kept["id"]]


def test_classifying_with_a_tuning_that_has_no_labels_names_it_as_the_caller_does(tmp_path):
    with server(tmp_path) as s:
        key = new_key(s.http)
        assert upload(s.http, key["key"], "plain", save_tuning(tmp_path / "plain")).status_code == 201
        response = s.http.post("/v1/classify", headers=auth(key["key"]), json={"model": "plain", "inputs": ["w30"]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
        message = response.json()["error"]["message"]
        assert "'plain'" in message and key["id"] not in message
