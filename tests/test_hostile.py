"""Generated hostile traffic against the real server (uvicorn on loopback), beside well-behaved traffic.

The properties, for every generated body or upload: the hostile request gets a 4xx in OpenAI's error shape
(never a 500) that names nothing of another key nor the server's paths; a refused upload leaves the store as
it was; the well-behaved request running at the same time gets exactly its tuning's answer alone; and the
server stays healthy."""

import json
import os
import threading

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import auth, new_key, save_tuning, server, snapshot, upload

from slimtune import modules, storage

from conftest import build

# Fixed examples in CI; SLIMTUNE_HOSTILE_EXAMPLES=500 SLIMTUNE_HOSTILE_RANDOM=1 explores further by hand.
SETTINGS = settings(max_examples=int(os.environ.get("SLIMTUNE_HOSTILE_EXAMPLES", 60)), deadline=None,
                    derandomize=not os.environ.get("SLIMTUNE_HOSTILE_RANDOM"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WELL_BEHAVED = [("lora", "hello world yes"), ("prefix", "no no hello"), ("prompt", "world")]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with server(tmp) as s:
        s.alice, s.mallory = new_key(s.http, "alice"), new_key(s.http, "mallory")
        for i, (method, _) in enumerate(WELL_BEHAVED):
            assert upload(s.http, s.alice["key"], method, save_tuning(tmp / method, method, seed=i)).status_code == 201
        s.answers = {method: complete(s.http, s.alice["key"], method, text) for method, text in WELL_BEHAVED}
        s.tmp = tmp
        s.lora = save_tuning(tmp / "mallory-lora", "lora", seed=7)
        yield s


def complete(http, key, model, prompt):
    response = http.post("/v1/completions", headers=auth(key),
                         json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def beside_well_behaved(s, hostile_call):
    """Run `hostile_call` while alice's three tunings answer; check alice's answers, return the hostile response."""
    results = {}

    def alice():
        with httpx.Client(base_url=s.url, timeout=60) as http:
            results.update({m: complete(http, s.alice["key"], m, t) for m, t in WELL_BEHAVED})

    thread = threading.Thread(target=alice)
    thread.start()
    try:
        response = hostile_call()
    finally:
        thread.join(120)
    assert results == s.answers
    assert s.http.get("/health", timeout=10).json()["status"] == "ok"
    return response


def check_refusal(s, response):
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        for secret in (s.alice["id"], str(s.store.path), str(s.tmp), "Traceback"):
            assert secret not in response.text


json_value = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20)
                          | st.floats(allow_nan=False, allow_infinity=False),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=12)
tiny_or_odd = st.sampled_from([1e-39, 1e-45, 5e-324, 1e-300, 0.0, -0.0, 2.0, 2.0000001, -1.0, 1e300])
generation_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny-llama", "lora", "prefix", "prompt"]) | json_value},
    optional={"prompt": st.text(max_size=40) | st.lists(st.integers(-5, 200), max_size=6) | json_value,
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                          "content": st.text(max_size=20) | json_value}), max_size=3),
              "max_tokens": st.integers(-3, 5) | json_value, "max_completion_tokens": st.integers(-1, 3),
              "temperature": tiny_or_odd | st.floats(allow_nan=False, allow_infinity=False) | json_value,
              "top_p": tiny_or_odd | json_value, "seed": st.integers(-2**70, 2**70), "stop": json_value,
              "stream": st.booleans(), "n": st.integers(0, 3), "logprobs": json_value, "extra": json_value})


@SETTINGS
@given(body=generation_body, chat=st.booleans())
def test_generated_generation_bodies_fail_only_themselves(hostile, body, chat):
    def send():
        return hostile.http.post("/v1/chat/completions" if chat else "/v1/completions", headers=auth(hostile.mallory["key"]),
                                 content=json.dumps(body), timeout=60)

    check_refusal(hostile, beside_well_behaved(hostile, send))


def mutated_record(draw_method: dict, model) -> dict:
    return {"method": draw_method, "model": modules.fingerprint(model)}


method_changes = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["full", "lora", "adapter", "prefix", "prompt", "bitfit", "junk"]) | json_value,
    "rank": st.integers(-2, 70) | json_value, "alpha": json_value, "length": st.integers(-1, 9) | json_value,
    "size": st.integers(-1, 70), "dropout": st.floats(-1, 2) | json_value,
    "targets": st.sampled_from(["(", r"model\.la([\w.]+)+!", "a{1000}{1000}", r"(a)\1", ".*", "q_proj", ""])
    | st.lists(st.text(max_size=30), max_size=3) | json_value})
tensor_changes = st.sampled_from(["none", "foreign name", "wrong shape", "nan", "integers", "drop one", "empty"])
task_field = st.none() | st.just("[" * 100_000 + "]" * 100_000) | json_value.map(json.dumps) | st.fixed_dictionaries(
    {"kind": st.just("classification"), "labels": st.lists(st.text(max_size=5), max_size=120) | json_value},
    optional={"label_words": json_value, "template": st.sampled_from(["{text}", "{text:>999999999}", "{0}", "{"]),
              "max_length": st.integers(-1, 10**9), "style": json_value}).map(json.dumps)


@SETTINGS
@given(method=method_changes, tensors=tensor_changes, task=task_field, checksum=st.booleans())
def test_generated_uploads_change_nothing_unless_they_are_valid(hostile, method, tensors, task, checksum):
    folder = hostile.tmp / "mutant"
    record, state = storage.read(hostile.lora)
    first = sorted(state)[0]
    changed = {"none": lambda: state, "foreign name": lambda: {**state, "model.secret.lora_A": torch.zeros(2, 2)},
               "wrong shape": lambda: {**state, first: torch.zeros(3, 3)},
               "nan": lambda: {**state, first: state[first] * float("nan")},
               "integers": lambda: {**state, first: state[first].long()},
               "drop one": lambda: {k: v for k, v in state.items() if k != first}, "empty": lambda: {}}[tensors]()
    storage.write(folder, {"method": {**record["method"], **method}, "model": record["model"]}, changed)
    if not checksum:
        (folder / storage.TENSORS).write_bytes((folder / storage.TENSORS).read_bytes()[:-1] + b"\0")
    before = snapshot(hostile.store)
    fields = {} if task is None else {"task": task}
    response = beside_well_behaved(hostile, lambda: upload(hostile.http, hostile.mallory["key"], "mutant", folder, **fields))
    check_refusal(hostile, response)
    if response.status_code == 201:  # a valid tuning after all: it serves, and then it goes again
        assert complete(hostile.http, hostile.mallory["key"], "mutant", "hello") is not None
        assert hostile.http.delete("/v1/tunings/mutant", headers=auth(hostile.mallory["key"])).status_code == 200
    else:
        assert snapshot(hostile.store) == before


def test_a_full_fine_tune_upload_is_refused_and_the_shared_model_is_untouched(hostile):
    model = build("llama")
    state = {"lm_head.weight": torch.randn_like(model.lm_head.weight)}
    folder = storage.write(hostile.tmp / "full", mutated_record({"kind": "full"}, model), state)
    before = snapshot(hostile.store)
    response = beside_well_behaved(hostile, lambda: upload(hostile.http, hostile.mallory["key"], "full", folder))
    assert response.status_code == 400 and snapshot(hostile.store) == before
    assert complete(hostile.http, hostile.alice["key"], "lora", "hello world yes") == hostile.answers["lora"]
