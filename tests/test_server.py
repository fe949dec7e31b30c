"""`slimtune serve`: the real server (uvicorn in a thread, on loopback) over a tiny random Llama, spoken to with the
official OpenAI client and with plain HTTP."""

import asyncio
import json
import os
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import slimtune
from slimtune.engine import Engine, EngineClosedError
from slimtune.keys import KeyConfigError, KeyRing, read_admin_key
from slimtune.server import create_app, running

from conftest import VOCAB, build
from helpers import perturb

ADMIN = "admin-key-for-tests-0123456789"
WORDS = ["<bos>", "<eos>", "user", "assistant", "system", ":", "yes", "no", "Text", "Label", "hello", "world"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
METHODS = {
    "lora": lambda: slimtune.LoRA(rank=4),
    "prefix": lambda: slimtune.PrefixTuning(length=3, reparam=None, init="random"),
    "prompt": lambda: slimtune.PromptTuning(length=4, init="uniform"),
    "adapter": lambda: slimtune.Adapter(size=8),
    "bitfit": lambda: slimtune.BitFit(add_missing=True),
}
TASK = {"name": "toy", "kind": "classification", "style": "verbalizer", "labels": ["yes", "no"],
        "label_words": {"yes": "yes", "no": "no"}, "template": "Text : {text} Label :", "max_length": 64}


def tokenizer():
    """Word-level, one word per id of the tiny models' vocabulary, with a chat template."""
    words = WORDS + [f"w{i}" for i in range(len(WORDS), VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w20"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>",
                                  unk_token="w20", padding_side="left")
    out.chat_template = CHAT_TEMPLATE
    return out


def save_tuning(folder, method="lora", seed=0, arch="llama", model_seed=0, task=None, fmt="slimtune"):
    tuned = slimtune.attach(build(arch, seed=model_seed), METHODS[method]())
    perturb(tuned.tuning_parameters(), seed=seed, scale=0.3)
    return tuned.save(folder, format=fmt, task=task) if fmt == "slimtune" else tuned.save(folder, format=fmt)


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def upload(http, key, name, folder, **fields):
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    return http.post("/v1/tunings", headers=auth(key), data={"name": name, **fields}, files=files)


def new_key(http, name=""):
    response = http.post("/v1/keys", headers=auth(ADMIN), json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


@contextmanager
def server(tmp_path, max_resident=6, max_batch=8, model=None):
    model = model if model is not None else build("llama")
    store = slimtune.Store(tmp_path / "store", model)
    engine = Engine(model, tokenizer(), store, max_resident=max_resident, max_batch=max_batch)
    keys = KeyRing(store.path / "keys.json", ADMIN)
    app = create_app(engine, store, keys, "tiny-llama", max_body=2**20, max_upload=4 * 2**20)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield Served(url, http, engine, store, app.state.service)


class Served:
    def __init__(self, url, http, engine, store, service):
        self.url, self.http, self.engine, self.store, self.service = url, http, engine, store, service

    def client(self, key, **options):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **options)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server for the module: a key "alice" with a tuning per method (and a classifier), a key "bob"."""
    tmp = tmp_path_factory.mktemp("server")
    with server(tmp) as s:
        s.alice, s.bob = new_key(s.http, "alice"), new_key(s.http, "bob")
        for i, method in enumerate(METHODS):
            response = upload(s.http, s.alice["key"], method, save_tuning(tmp / "saved" / method, method, seed=i))
            assert response.status_code == 201, response.text
        classifier = save_tuning(tmp / "saved" / "cls", "lora", seed=9, task=TASK)
        assert upload(s.http, s.alice["key"], "cls", classifier).status_code == 201
        s.tmp = tmp
        yield s


def stored(srv, key, name):
    return f"{key['id']}.{name}"


def snapshot(store):
    return sorted((p.relative_to(store.path).as_posix(), p.stat().st_size) for p in store.path.rglob("*")
                  if p.is_file() and p.name != ".lock")


@contextmanager
def slow_and_endless(model, delay=0.01):
    """Each step of the engine takes `delay` seconds, and the end-of-text token is never chosen."""

    def hook(module, inputs, output):
        time.sleep(delay)
        output[..., 1] = float("-inf")
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def held(model):
    """The engine's next forward pass waits until the yielded event is set (at most 30 s): requests stay in flight."""
    go = threading.Event()
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: go.wait(30) and None)
    try:
        yield go
    finally:
        go.set()
        handle.remove()


# --- keys ---------------------------------------------------------------------------------------------


def test_requests_need_a_valid_key(srv):
    assert srv.http.get("/health").json()["status"] == "ok"
    missing = srv.http.get("/v1/models")
    assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert srv.http.get("/v1/models", headers=auth("st-not-a-key")).status_code == 401
    assert srv.http.get("/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        srv.client("wrong").models.list()
    # only the admin manages keys
    assert srv.http.post("/v1/keys", headers=auth(srv.alice["key"]), json={}).status_code == 403
    assert srv.http.get("/v1/keys", headers=auth(srv.alice["key"])).status_code == 403


def test_keys_are_stored_hashed_and_revoked_at_once(srv, tmp_path):
    carol = new_key(srv.http, "carol")
    assert carol["key"].startswith("st-") and len(carol["key"]) > 40
    record = (srv.store.path / "keys.json").read_text()
    assert carol["key"] not in record and carol["id"] in record
    listed = srv.http.get("/v1/keys", headers=auth(ADMIN)).json()["data"]
    assert {"id": carol["id"], "name": "carol"}.items() <= next(k for k in listed if k["id"] == carol["id"]).items()
    assert all("key" not in k for k in listed)
    assert upload(srv.http, carol["key"], "mine", save_tuning(tmp_path / "t", "lora", seed=7)).status_code == 201
    assert stored(srv, carol, "mine") in srv.store
    gone = srv.http.delete(f"/v1/keys/{carol['id']}", headers=auth(ADMIN))
    assert gone.json() == {"object": "key", "id": carol["id"], "deleted": True, "tunings_deleted": 1}
    assert srv.http.get("/v1/models", headers=auth(carol["key"])).status_code == 401
    assert stored(srv, carol, "mine") not in srv.store
    assert srv.http.delete(f"/v1/keys/{carol['id']}", headers=auth(ADMIN)).status_code == 404


def test_no_admin_key_no_start(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMTUNE_ADMIN_KEY", raising=False)
    with pytest.raises(KeyConfigError, match="needs an admin key"):
        read_admin_key()
    monkeypatch.setenv("SLIMTUNE_ADMIN_KEY", "short")
    with pytest.raises(KeyConfigError, match="too weak"):
        read_admin_key()
    (tmp_path / "admin").write_text(ADMIN + "\n")
    assert read_admin_key(tmp_path / "admin") == ADMIN
    from slimtune.cli import main

    monkeypatch.delenv("SLIMTUNE_ADMIN_KEY")
    assert main(["serve", "--store", str(tmp_path / "store")]) == 2  # refused before loading any model
    assert not (tmp_path / "store").exists()


def test_slimtune_serve_starts_answers_and_stops_on_ctrl_c(tmp_path):
    """The command itself, on a model folder: a key, a completion, then SIGINT ends it cleanly."""
    import signal
    import socket
    import subprocess
    import sys

    import tiny

    folder = tiny.model_folder(tmp_path / "model")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SLIMTUNE_ADMIN_KEY": ADMIN}
    command = [sys.executable, "-m", "slimtune.cli", "serve", "--model", str(folder), "--store", str(tmp_path / "store"),
               "--port", str(port), "--max-batch", "4"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_until(lambda: process.poll() is not None or _answers(http), timeout=90)
            assert http.get("/health").json() == {"status": "ok", "model": "model"}
            key = new_key(http)["key"]
            out = http.post("/v1/completions", headers=auth(key), json={"model": "model", "prompt": "the film",
                                                                          "max_tokens": 3, "temperature": 0})
            assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert (tmp_path / "store" / "keys.json").is_file()


def _answers(http) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


# --- tunings ------------------------------------------------------------------------------------------


def test_upload_list_and_delete(srv, tmp_path):
    key = srv.bob["key"]
    created = upload(srv.http, key, "bobs-lora", save_tuning(tmp_path / "a", "lora", seed=11))
    assert created.status_code == 201
    assert created.json()["id"] == "bobs-lora" and created.json()["method"]["kind"] == "lora"
    peft = upload(srv.http, key, "from-peft", save_tuning(tmp_path / "b", "lora", seed=12, fmt="peft"))
    assert peft.status_code == 201, peft.text
    names = [t["id"] for t in srv.http.get("/v1/tunings", headers=auth(key)).json()["data"]]
    assert names == ["bobs-lora", "from-peft"]
    assert [m.id for m in srv.client(key).models.list()] == ["tiny-llama", "bobs-lora", "from-peft"]
    assert srv.client(key).models.retrieve("bobs-lora").id == "bobs-lora"
    assert srv.http.get("/v1/tunings/from-peft", headers=auth(key)).json()["method"]["rank"] == 4
    out = srv.client(key).completions.create(model="from-peft", prompt="hello world", max_tokens=4, temperature=0)
    assert out.model == "from-peft"
    for name in ("bobs-lora", "from-peft"):
        assert srv.http.delete(f"/v1/tunings/{name}", headers=auth(key)).json()["deleted"] is True
    assert srv.http.get("/v1/tunings", headers=auth(key)).json()["data"] == []
    assert srv.http.delete("/v1/tunings/bobs-lora", headers=auth(key)).status_code == 404
    with pytest.raises(openai.NotFoundError):
        srv.client(key).completions.create(model="bobs-lora", prompt="hello", max_tokens=2)


def test_replacing_a_tuning_serves_the_new_weights(srv, tmp_path):
    key, client = srv.bob["key"], srv.client(srv.bob["key"])
    first, second = save_tuning(tmp_path / "1", "lora", seed=21), save_tuning(tmp_path / "2", "lora", seed=22)
    assert upload(srv.http, key, "swap", first).status_code == 201
    before = client.completions.create(model="swap", prompt="hello world", max_tokens=8, temperature=0).choices[0].text
    clash = upload(srv.http, key, "swap", second)
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "tuning_exists"
    assert upload(srv.http, key, "swap", second, replace="true").status_code == 201
    after = client.completions.create(model="swap", prompt="hello world", max_tokens=8, temperature=0).choices[0].text
    with Engine(build("llama"), tokenizer()) as alone:  # the new weights, on a model of their own
        alone.add("swap", second)
        assert after == alone.generate("swap", "hello world", max_new_tokens=8).text
        alone.add("old", first)
        assert before == alone.generate("old", "hello world", max_new_tokens=8).text
    srv.http.delete("/v1/tunings/swap", headers=auth(key))


def test_a_tuning_is_deleted_only_between_its_requests(srv, tmp_path):
    """A delete waits for the tuning's running request (which finishes whole); a request arriving meanwhile
    waits for the delete, then finds nothing."""
    key, results = srv.bob["key"], {}
    assert upload(srv.http, key, "brief", save_tuning(tmp_path / "t", "adapter", seed=41)).status_code == 201
    name = stored(srv, srv.bob, "brief")

    def call(label, method, path, **options):
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            results[label] = http.request(method, path, headers=auth(key), **options)

    body = {"model": "brief", "prompt": "hello", "max_tokens": 30, "temperature": 0}
    with held(srv.engine.model) as go:
        threads = [threading.Thread(target=call, args=("running", "POST", "/v1/completions"), kwargs={"json": body})]
        threads[-1].start()
        wait_until(lambda: srv.service.traffic.running[name] == 1)
        threads.append(threading.Thread(target=call, args=("delete", "DELETE", "/v1/tunings/brief")))
        threads[-1].start()
        wait_until(lambda: name in srv.service.traffic.changing)
        threads.append(threading.Thread(target=call, args=("late", "POST", "/v1/completions"), kwargs={"json": body}))
        threads[-1].start()
        wait_until(lambda: len(srv.service.traffic._waiters) == 2)  # the delete, and the late request behind it
        assert results == {}
        go.set()
        for thread in threads:
            thread.join(60)
    assert results["running"].status_code == 200 and results["running"].json()["choices"][0]["finish_reason"]
    assert results["delete"].status_code == 200 and results["late"].status_code == 404
    assert name not in srv.store and name not in srv.engine.resident


def test_bad_uploads_answer_an_error_and_leave_the_store_unchanged(srv, tmp_path):
    key = srv.bob["key"]
    before = snapshot(srv.store)
    good = save_tuning(tmp_path / "good", "lora", seed=31)
    corrupt = save_tuning(tmp_path / "corrupt", "lora", seed=32)
    data = (corrupt / "tuning.safetensors").read_bytes()
    (corrupt / "tuning.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = save_tuning(tmp_path / "json", "lora", seed=33)
    (bad_json / "slimtune.json").write_text("{not json")
    cases = {
        "corrupt": (upload(srv.http, key, "x", corrupt), 400, "invalid_tuning"),
        "bad json": (upload(srv.http, key, "x", bad_json), 400, "invalid_tuning"),
        "other weights": (upload(srv.http, key, "x", save_tuning(tmp_path / "o", "lora", model_seed=5)), 400,
                          "model_mismatch"),
        "other architecture": (upload(srv.http, key, "x", save_tuning(tmp_path / "g", "lora", arch="gpt2")), 400,
                               "model_mismatch"),
        "bad name": (upload(srv.http, key, "../x", good), 400, None),
        "base model's name": (upload(srv.http, key, "tiny-llama", good), 400, None),
        "bad task": (upload(srv.http, key, "x", good, task="[1, 2]"), 400, None),
        "no files": (srv.http.post("/v1/tunings", headers=auth(key), data={"name": "x"}), 400, None),
        "unknown file": (srv.http.post("/v1/tunings", headers=auth(key), data={"name": "x"},
                                       files=[("files", ("model.bin", b"123"))]), 400, None),
        "not multipart": (srv.http.post("/v1/tunings", headers=auth(key), json={"name": "x"}), 400, None),
        "too large": (srv.http.post("/v1/tunings", headers=auth(key), data={"name": "x"},
                                    files=[("files", ("tuning.safetensors", b"0" * (5 * 2**20)))]), 413, None),
    }
    for case, (response, status, code) in cases.items():
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], case
        if code:
            assert error["code"] == code, (case, error)
    assert "/" not in cases["corrupt"][0].json()["error"]["message"].split("upload")[0]  # no server path in it
    assert snapshot(srv.store) == before
    assert srv.http.get("/v1/tunings", headers=auth(key)).json()["data"] == []


# --- generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_completions_give_the_tunings_own_output(srv, method):
    client = srv.client(srv.alice["key"])
    out = client.completions.create(model=method, prompt="hello world w30 w31", max_tokens=8, temperature=0)
    alone = srv.engine.generate(stored(srv, srv.alice, method), "hello world w30 w31", max_new_tokens=8)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == method
    assert out.choices[0].text == alone.text and out.choices[0].finish_reason == alone.finish_reason
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == len(alone.token_ids)
    assert out.usage.total_tokens == 4 + len(alone.token_ids)


def test_base_model_token_prompts_batches_stop_and_seed(srv):
    client = srv.client(srv.bob["key"])
    base = client.completions.create(model="tiny-llama", prompt=[10, 11, 40], max_tokens=6, temperature=0)
    assert base.choices[0].text == srv.engine.generate(None, [10, 11, 40], max_new_tokens=6).text
    batch = client.completions.create(model="tiny-llama", prompt=["hello", "world w50"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [srv.engine.generate(None, p, max_new_tokens=5).text
                                               for p in ("hello", "world w50")]
    full = client.completions.create(model="tiny-llama", prompt="w60 w61", max_tokens=10, temperature=0).choices[0]
    words = full.text.split()
    if len(words) >= 3:
        cut = client.completions.create(model="tiny-llama", prompt="w60 w61", max_tokens=10, temperature=0,
                                        stop=[words[2]]).choices[0]
        assert full.text.startswith(cut.text) and cut.finish_reason == "stop"
    sampled = [client.completions.create(model="tiny-llama", prompt="hello", max_tokens=8, temperature=1.0, seed=5)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_chat_goes_through_the_chat_template(srv):
    client = srv.client(srv.alice["key"])
    messages = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "hello world"}]
    out = client.chat.completions.create(model="lora", messages=messages, max_tokens=6, temperature=0)
    tok = srv.engine.tokenizer
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    alone = srv.engine.generate(stored(srv, srv.alice, "lora"), ids["input_ids"], max_new_tokens=6)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == alone.text
    assert out.usage.prompt_tokens == len(ids["input_ids"])
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    same = client.chat.completions.create(model="lora", messages=parts, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hello world"}],
                                           max_tokens=6, temperature=0)
    assert same.choices[0].message.content == plain.choices[0].message.content


def test_streaming_sends_openai_events(srv):
    client = srv.client(srv.alice["key"])
    whole = client.completions.create(model="prefix", prompt="hello world", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="prefix", prompt="hello world", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = client.chat.completions.create(model="prefix", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    stream = list(client.chat.completions.create(model="prefix", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    # the wire format itself
    with srv.http.stream("POST", "/v1/completions", headers=auth(srv.alice["key"]),
                         json={"model": "prefix", "prompt": "hello world", "max_tokens": 4, "temperature": 0,
                               "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_classify_gives_label_probabilities(srv):
    texts = ["hello world", "w40 w41 w42"]
    response = srv.http.post("/v1/classify", headers=auth(srv.alice["key"]), json={"model": "cls", "inputs": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = srv.engine.classify(stored(srv, srv.alice, "cls"), texts)
    for row, probs in zip(data, expected, strict=True):
        assert row["probabilities"] == pytest.approx(probs, abs=1e-5)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0) and row["label"] in ("yes", "no")
    one = srv.http.post("/v1/classify", headers=auth(srv.alice["key"]), json={"model": "cls", "inputs": "hello"})
    assert len(one.json()["data"]) == 1
    for model, status in (("lora", 400), ("tiny-llama", 400), ("nothing", 404)):
        response = srv.http.post("/v1/classify", headers=auth(srv.alice["key"]), json={"model": model, "inputs": texts})
        assert response.status_code == status, (model, response.text)
    assert srv.http.post("/v1/classify", headers=auth(srv.bob["key"]),
                         json={"model": "cls", "inputs": texts}).status_code == 404


# --- errors -------------------------------------------------------------------------------------------


def test_another_keys_tuning_answers_as_one_that_does_not_exist(srv):
    def body(key, model):
        response = srv.http.post("/v1/completions", headers=auth(key), json={"model": model, "prompt": "hello"})
        return response.status_code, response.json()

    status, error = body(srv.bob["key"], "lora")  # alice's
    assert body(srv.alice["key"], "lora")[0] == 200
    absent = body(srv.bob["key"], "no-such")  # nobody's
    assert (status, json.dumps(error).replace("lora", "no-such")) == (absent[0], json.dumps(absent[1]))
    assert status == 404 and error["error"]["code"] == "model_not_found" and error["error"]["param"] == "model"
    assert srv.alice["id"] not in json.dumps(error)
    with pytest.raises(openai.NotFoundError):
        srv.client(srv.bob["key"]).chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}])
    assert srv.http.get("/v1/tunings/lora", headers=auth(srv.bob["key"])).status_code == 404
    assert srv.http.delete("/v1/tunings/lora", headers=auth(srv.bob["key"])).status_code == 404
    assert stored(srv, srv.alice, "lora") in srv.store
    assert "lora" not in [m.id for m in srv.client(srv.bob["key"]).models.list()]


def test_bad_requests_get_openai_errors(srv):
    client = srv.client(srv.alice["key"])
    long_prompt = " ".join(["w50"] * 120)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lora", prompt=long_prompt, max_tokens=20)
    assert err.value.code == "context_length_exceeded" and "128" in err.value.message
    client.completions.create(model="tiny-llama", prompt=long_prompt, max_tokens=6, temperature=0)  # fits: 126
    with pytest.raises(openai.BadRequestError, match="context"):  # the prompt tuning's 4 virtual tokens do not
        client.completions.create(model="prompt", prompt=long_prompt, max_tokens=6)
    for options, param in (({"max_tokens": 0}, "max_tokens"), ({"temperature": 5}, "temperature"),
                           ({"top_p": 1.5}, "top_p"), ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                           ({"prompt": ""}, "prompt"), ({"prompt": [1000]}, "prompt"), ({"logprobs": 2}, "logprobs"),
                           ({"echo": True}, "echo"), ({"presence_penalty": 0.5}, "presence_penalty")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"model": "lora", "prompt": "hello", **options})
        assert err.value.param == param, (options, err.value.body)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="lora", prompt="hello", max_tokens="ten")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lora", messages=[])
    headers = {**auth(srv.alice["key"]), "content-type": "application/json"}
    for raw, status in ((b"{not json", 400), (b"", 400), (b"[1, 2]", 422), (b'{"prompt": "hi"}', 422),
                        (b'{"model": "lora", "prompt": "hi", "stream": "yes"}', 422),
                        (b'{"model": "lora", "prompt": "' + b"w5 " * 400_000 + b'"}', 413)):
        response = srv.http.post("/v1/completions", headers=headers, content=raw)
        assert response.status_code == status, (raw[:40], response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    chunked = srv.http.post("/v1/completions", headers=headers, content=iter([b" " * 2**19] * 4))  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert srv.http.get("/v1/nothing", headers=auth(srv.alice["key"])).status_code == 404


# --- metrics, disconnects, load -----------------------------------------------------------------------


def test_metrics_in_prometheus_text_format(srv):
    srv.client(srv.alice["key"]).completions.create(model="lora", prompt="hello", max_tokens=3, temperature=0)
    response = srv.http.get("/metrics", headers=auth(srv.bob["key"]))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'slimtune_http_requests_total{endpoint="/v1/completions",method="POST",status="200"}' in text
    assert 'slimtune_http_requests_total{endpoint="/v1/completions",method="POST",status="404"}' in text
    assert 'slimtune_http_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in text
    assert "slimtune_batch_rows_count" in text and "slimtune_resident_tunings" in text
    tables = next(line for line in text.splitlines() if line.startswith('slimtune_tuning_bytes{part="tables"}'))
    assert float(tables.split()[1]) > 0  # the LoRA tuning's slot table
    generated = next(line for line in text.splitlines() if line.startswith("slimtune_generated_tokens "))
    assert float(generated.split()[1]) > 0
    assert srv.alice["id"] not in text and "lora" not in text


def wait_until(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_disconnects_frees_its_slot(srv):
    model, key = srv.engine.model, srv.alice["key"]
    service = srv.service
    with slow_and_endless(model, delay=0.05):  # 100 tokens would take 5 s
        for stream in (True, False):
            before = srv.engine.stats.generated_tokens
            body = {"model": "lora", "prompt": "hello", "max_tokens": 100, "temperature": 0, "stream": stream}
            if stream:
                with httpx.Client(base_url=srv.url, timeout=30) as http, \
                        http.stream("POST", "/v1/completions", headers=auth(key), json=body) as response:
                    next(response.iter_lines())  # the first token, then hang up
            else:
                with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=srv.url, timeout=0.3) as http:
                    http.post("/v1/completions", headers=auth(key), json=body)
            wait_until(lambda: not service.traffic.running and service.metrics.in_flight._value.get() == 0)
            assert srv.engine.stats.generated_tokens - before < 100  # cancelled: its row left the batch early
    assert srv.client(key).completions.create(model="lora", prompt="hello", max_tokens=3).choices[0].text is not None


def test_shutdown_finishes_the_requests_in_flight(tmp_path):
    answers, model = [], build("llama")
    with slow_and_endless(model, delay=0.02):
        with server(tmp_path, model=model) as s:
            key = new_key(s.http)["key"]
            worker = threading.Thread(target=lambda: answers.append(
                s.client(key).completions.create(model="tiny-llama", prompt="hello", max_tokens=40, temperature=0)))
            worker.start()
            wait_until(lambda: s.service.metrics.in_flight._value.get() == 1)
            stopping = time.monotonic()
        # leaving the block has shut the server down while the generation ran: it finished first
        assert time.monotonic() - stopping > 0.3
        worker.join(30)
    assert answers and answers[0].choices[0].finish_reason == "length" and answers[0].usage.completion_tokens == 40
    with pytest.raises(EngineClosedError):
        s.engine.generate(None, "hello", max_new_tokens=2)


async def load(url, requests, clients):
    """`requests` = [(key, model, prompt)] sent by `clients` concurrent clients; returns {index: text}."""
    queue = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)
    answers, errors = {}, []

    async def client():
        sessions = {}
        while not queue.empty():
            i, (key, model, prompt) = queue.get_nowait()
            session = sessions.setdefault(key, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0))
            try:
                out = await session.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
                answers[i] = out.choices[0].text
            except Exception as err:
                errors.append(err)
        for session in sessions.values():
            await session.close()

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=120)
    return answers, errors


def test_under_load_every_answer_is_its_own_tunings(tmp_path):
    """16 clients, 64 requests over 8 users' tunings of mixed methods (more than the bank holds at once)."""
    with server(tmp_path, max_resident=5, max_batch=8) as s:
        users = []
        for i in range(8):
            key = new_key(s.http, f"user{i}")
            method = list(METHODS)[i % len(METHODS)]
            saved = save_tuning(tmp_path / "t" / str(i), method, seed=40 + i)
            assert upload(s.http, key["key"], method, saved).status_code == 201
            users.append((key, method))
        prompts = ["hello world", "w30 w31 w32", "yes no w40", "w60"]
        expected = {(u, p): s.engine.generate(stored(s, users[u][0], users[u][1]), p, max_new_tokens=8).text
                    for u in range(len(users)) for p in prompts}
        plan = [(i % len(users), prompts[(i // len(users)) % len(prompts)]) for i in range(64)]
        requests = [(users[u][0]["key"], users[u][1], p) for u, p in plan]
        answers, errors = asyncio.run(load(s.url, requests, clients=16))
        assert errors == [] and len(answers) == 64
        assert all(answers[i] == expected[plan[i]] for i in range(64))
        assert max(s.engine.stats.batch_rows) > 1 and s.engine.stats.evictions > 0
