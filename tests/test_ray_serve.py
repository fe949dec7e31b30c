"""`slimtune serve --replicas 2` on a local Ray instance (loopback only), over a tiny random GPT-2: two engine
replicas behind one ingress, sharing one store. Every answer is compared with its tuning's answer alone."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tiny

import slimtune
from slimtune.engine import Engine
from slimtune.models import load_model

from helpers import perturb

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from slimtune.serving import ray as on_ray  # noqa: E402
from slimtune.serving.http.app import ServerOptions  # noqa: E402

ADMIN = "admin-key-for-tests-0123456789"
PROMPT = "the film was very"
REPLICA = "x-slimtune-replica"


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    folder = tiny.model_folder(root / "tiny-gpt2")
    options = ServerOptions(model=str(folder), store=str(root / "store"), max_resident=2, max_batch=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = on_ray.start(options, ADMIN, replicas=2, port=18765, threads=1)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http, folder, root
    finally:
        on_ray.stop()
        ray.shutdown()


def new_key(http):
    response = http.post("/v1/keys", headers=auth(ADMIN), json={})
    assert response.status_code == 201, response.text
    return response.json()


def make_tuning(folder, out, seed):
    model, _ = load_model(str(folder), "generation")
    tuned = slimtune.attach(model, slimtune.LoRA(rank=4))
    perturb(tuned.tuning_parameters(), seed=seed, scale=0.5)
    return tuned.save(out)


def alone(folder, tuning, prompt=PROMPT, tokens=6):
    """The tuning's greedy answer in an engine of its own."""
    model, tokenizer = load_model(str(folder), "generation")
    with Engine(model, tokenizer) as engine:
        if tuning is not None:
            engine.add("t", tuning)
        return engine.generate("t" if tuning is not None else None, prompt, max_new_tokens=tokens).text


def upload(http, key, name, tuning, replace=False):
    files = [("files", (p.name, p.read_bytes())) for p in sorted(tuning.iterdir()) if p.is_file()]
    return http.post("/v1/tunings", headers=auth(key), data={"name": name, "replace": str(replace).lower()},
                     files=files)


def complete(http, key, model, tokens=6, **extra):
    return http.post("/v1/completions", headers=auth(key), json={"model": model, "prompt": PROMPT,
                                                                   "max_tokens": tokens, "temperature": 0, **extra})


def text(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def both_replicas(call, within=30.0):
    """Answers of `call` until both replicas have answered (base-model and listing calls go to either; a new
    replica takes Ray Serve's router a moment to hear of)."""
    seen, deadline = {}, time.monotonic() + within
    while time.monotonic() < deadline:
        response = call()
        seen.setdefault(response.headers[REPLICA], response)
        if len(seen) == 2:
            return seen
        time.sleep(0.05)
    pytest.fail(f"only replica {list(seen)} answered in {within} s")


def test_keys_and_tunings_are_shared_and_isolated_across_replicas(cluster, tmp_path):
    http, folder, _ = cluster
    alice, bob = new_key(http)["key"], new_key(http)["key"]
    tuning = make_tuning(folder, tmp_path / "a", seed=1)
    assert upload(http, alice, "mine", tuning).status_code == 201
    # every replica knows alice's tuning as hers, and bob's key as one that does not see it
    for response in both_replicas(lambda: http.get("/v1/tunings/mine", headers=auth(alice))).values():
        assert response.status_code == 200 and response.json()["id"] == "mine"
    for response in both_replicas(lambda: http.get("/v1/tunings/mine", headers=auth(bob))).values():
        assert response.status_code == 404 and "mine" not in response.headers.get(REPLICA, "")
    # requests for one tuning go to one replica, and answer as the tuning alone
    answers = [complete(http, alice, "mine") for _ in range(6)]
    assert len({r.headers[REPLICA] for r in answers}) == 1
    assert {text(r) for r in answers} == {alone(folder, tuning)}
    assert text(complete(http, bob, "tiny-gpt2")) == alone(folder, None)
    assert complete(http, bob, "mine").status_code == 404


def test_a_revoked_key_is_refused_by_every_replica(cluster):
    http, _, _ = cluster
    made = new_key(http)
    for response in both_replicas(lambda: http.get("/v1/models", headers=auth(made["key"]))).values():
        assert response.status_code == 200  # each replica takes the key
    assert http.delete(f"/v1/keys/{made['id']}", headers=auth(ADMIN)).status_code == 200
    for response in both_replicas(lambda: http.get("/v1/models", headers=auth(made["key"]))).values():
        assert response.status_code == 401


def test_an_upload_through_one_replica_is_served_by_the_other(cluster, tmp_path):
    http, folder, _ = cluster
    key = new_key(http)["key"]
    for i in range(12):  # where an upload lands and where its requests go are each either replica
        tuning = make_tuning(folder, tmp_path / f"t{i}", seed=10 + i)
        stored = upload(http, key, f"t{i}", tuning)
        assert stored.status_code == 201, stored.text
        answer = complete(http, key, f"t{i}")
        assert text(answer) == alone(folder, tuning)
        if answer.headers[REPLICA] != stored.headers[REPLICA]:
            return
    pytest.fail("every tuning was served by the replica that stored it")


def test_replace_and_delete_through_one_replica_while_another_serves(cluster, tmp_path):
    http, folder, _ = cluster
    key = new_key(http)["key"]
    old, new = make_tuning(folder, tmp_path / "old", seed=30), make_tuning(folder, tmp_path / "new", seed=31)
    assert upload(http, key, "x", old).status_code == 201
    serving = complete(http, key, "x")
    assert text(serving) == alone(folder, old)
    stop = threading.Event()
    seen: list[httpx.Response] = []

    def keep_asking():
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            while not stop.is_set():
                seen.append(complete(own, key, "x"))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        for _ in range(20):  # replace through whichever replica takes it, until it is not the serving one
            replaced = upload(http, key, "x", new, replace=True)
            assert replaced.status_code == 201
            if replaced.headers[REPLICA] != serving.headers[REPLICA]:
                break
        else:
            pytest.fail("every replace went to the replica serving the tuning")
        after = complete(http, key, "x")
        assert after.headers[REPLICA] == serving.headers[REPLICA]
        assert text(after) == alone(folder, new)  # the request after the replace returned gets the new version
        assert http.delete("/v1/tunings/x", headers=auth(key)).status_code == 200
        assert complete(http, key, "x").status_code == 404
    finally:
        stop.set()
        asker.join()
    answers = {r.status_code: set() for r in seen}
    for r in seen:
        answers[r.status_code].add(r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"]["code"])
    assert set(answers) <= {200, 404}, answers  # each request saw one whole version, or none
    assert answers.get(200, set()) <= {alone(folder, old), alone(folder, new)}


def replica_actor(replica_id):
    return ray.get_actor(f"SERVE_REPLICA::{on_ray.APP_NAME}#Replica#{replica_id}", namespace="serve")


def running_replicas():
    return serve.status().applications[on_ray.APP_NAME].deployments["Replica"].replica_states.get("RUNNING", 0)


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(cluster, tmp_path):
    http, folder, _ = cluster
    key = new_key(http)["key"]
    tuning = make_tuning(folder, tmp_path / "k", seed=40)
    assert upload(http, key, "k", tuning).status_code == 201
    expected = {"k": alone(folder, tuning, tokens=30), "tiny-gpt2": alone(folder, None, tokens=30)}
    victim = complete(http, key, "k").headers[REPLICA]
    actor = replica_actor(victim)

    def ask(model):
        with httpx.Client(base_url=str(http.base_url), timeout=120) as own:
            return model, complete(own, key, model, tokens=30)

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(ask, "k" if i % 2 else "tiny-gpt2") for i in range(24)]
        time.sleep(0.5)
        ray.kill(actor, no_restart=True)
        results = [f.result() for f in futures]
    for model, response in results:
        if response.status_code == 200:
            assert response.json()["choices"][0]["text"] == expected[model]
        else:  # only requests the dead replica held, and said so
            assert response.status_code == 503 and response.json()["error"]["code"] == "replica_stopped", response.text
    assert sum(r.status_code == 200 for _, r in results) >= 12  # the other replica's, and retried ones
    deadline = time.monotonic() + 90
    while running_replicas() < 2:
        assert time.monotonic() < deadline, "Ray Serve did not restart the replica"
        time.sleep(1)
    answered = both_replicas(lambda: complete(http, key, "tiny-gpt2", tokens=30))
    assert victim not in answered  # a new replica in its place
    for response in answered.values():
        assert text(response) == expected["tiny-gpt2"]
    assert text(complete(http, key, "k", tokens=30)) == expected["k"]  # served again from the store


def test_routing_key_names_neither_key_nor_tuning():
    body = b'{"model": "mine", "prompt": "x"}'
    key = on_ray.routing_key("POST", "/v1/completions", {"authorization": "Bearer st-secret"}, body, "base")
    assert key and "mine" not in key and "secret" not in key
    assert key == on_ray.routing_key("POST", "/v1/completions/", {"authorization": "Bearer st-secret"}, body, "base")
    assert key != on_ray.routing_key("POST", "/v1/completions", {"authorization": "Bearer st-other"}, body, "base")
    assert on_ray.routing_key("POST", "/v1/completions", {}, b'{"model": "base"}', "base") == ""
    assert on_ray.routing_key("POST", "/v1/tunings", {}, body, "base") == ""
    assert on_ray.routing_key("POST", "/v1/completions", {}, b"not json", "base") == ""
