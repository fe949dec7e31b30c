"""One request's or one tuning's fault fails that request alone: the engine's side of tenant isolation."""

import threading
from contextlib import contextmanager

import pytest
import torch

import slimtune
from slimtune import modules, storage
from slimtune.bank import Bank
from slimtune.engine import MAX_SCORED_ROWS, Engine, RequestError
from slimtune.errors import TuningError

from conftest import build
from helpers import perturb, vocab_tokenizer

TASK = {"name": "toy", "kind": "classification", "style": "verbalizer", "labels": ["yes", "no"],
        "label_words": {"yes": "t5", "no": "t6"}, "template": "t7 {text} t8", "max_length": 32}


def lora_engine(*users: str, **options) -> Engine:
    engine = Engine(build("llama"), vocab_tokenizer(), **options)
    for i, user in enumerate(users):
        engine.add(user, slimtune.LoRA(rank=4), task=TASK)
        perturb(engine.bank.user_parameters(user), seed=i, scale=0.5)
    return engine


def answered(handle, timeout: float = 60):
    """The handle's result, or the error it ended with; None if it was never answered."""
    out = []

    def wait():
        try:
            out.append(handle.result())
        except Exception as err:
            out.append(err)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(timeout)
    return out[0] if out else None


@contextmanager
def failing_for(engine: Engine, step: str, user: str):
    """`engine.bank.<step>` (prefill or decode) raises whenever a row of `user` is in the batch."""
    original = getattr(engine.bank, step)

    def run(ids, mask, users, cache):
        if user in users:
            raise RuntimeError(f"{user}'s rows cannot run")
        return original(ids, mask, users, cache)

    setattr(engine.bank, step, run)
    try:
        yield
    finally:
        setattr(engine.bank, step, original)


def test_a_vanishing_temperature_or_top_p_takes_the_likeliest_token_and_fails_no_one():
    engine = lora_engine("alice", "bob", max_batch=8)
    prompt = [5, 9, 14, 20]
    alone = engine.generate("alice", prompt, max_new_tokens=24, ignore_eos=True)
    greedy = engine.generate("bob", prompt, max_new_tokens=6)
    other = engine.stream("alice", prompt, max_new_tokens=24, ignore_eos=True)
    hostile = [engine.stream("bob", prompt, max_new_tokens=6, temperature=t, top_p=p, seed=1)
               for t, p in [(1e-39, 1.0), (1e-45, 1.0), (1e-300, 1.0), (1.0, 1e-300), (5e-324, 1e-300)]]
    assert answered(other).token_ids == alone.token_ids
    for handle in hostile:
        assert answered(handle).token_ids == greedy.token_ids  # the limit of sampling as they go to 0
    engine.close()


def test_a_row_whose_prefill_fails_gets_that_error_and_the_rows_admitted_with_it_are_answered():
    engine = lora_engine("alice", "bob", max_batch=8)
    alone = engine.generate("alice", [5, 6, 7], max_new_tokens=5)
    with failing_for(engine, "prefill", "bob"):
        with held(engine) as go:  # both wait, so they are admitted in one prefill
            good = engine.stream("alice", [5, 6, 7], max_new_tokens=5)
            bad = engine.stream("bob", [5, 6, 7], max_new_tokens=5)
            go.release(2)
        assert answered(good).token_ids == alone.token_ids
        failed = answered(bad)
        assert isinstance(failed, RuntimeError) and "bob" in str(failed)
    engine.close(wait=True)  # nothing is left in flight: close returns


def test_a_decoding_step_that_fails_for_one_tuning_fails_its_rows_only():
    engine = lora_engine("alice", "bob", max_batch=8)
    alone = engine.generate("alice", [5, 6, 7], max_new_tokens=12, ignore_eos=True)
    good = engine.stream("alice", [5, 6, 7], max_new_tokens=12, ignore_eos=True)
    bad = engine.stream("bob", [5, 6, 7], max_new_tokens=12, ignore_eos=True)
    with failing_for(engine, "decode", "bob"):
        assert answered(good).token_ids == alone.token_ids  # its cache was put back as it was before the failed step
        assert isinstance(answered(bad), RuntimeError)
    engine.close()


class Hold:
    def __init__(self, engine: Engine):
        self.engine, self.event = engine, threading.Event()

    def release(self, queued) -> None:
        """Let the worker go on once `queued` requests (a number, or a function giving it) wait in its inbox,
        so that it takes them together."""
        for _ in range(2000):
            if self.engine._inbox.qsize() >= (queued() if callable(queued) else queued):
                break
            threading.Event().wait(0.01)
        self.event.set()


@contextmanager
def held(engine: Engine):
    """The engine's worker waits in its next step (a base-model row's) until released: requests queue up."""
    hold = Hold(engine)
    busy = engine.stream(None, [5, 6], max_new_tokens=40, ignore_eos=True)
    while not engine._running:
        threading.Event().wait(0.001)
    handle = engine.model.lm_head.register_forward_hook(lambda module, inputs, output: hold.event.wait(30) and None)
    try:
        yield hold
    finally:
        hold.event.set()
        handle.remove()
        busy.result()


def test_a_classification_batched_with_a_malformed_task_is_answered_and_learns_nothing_of_it():
    engine = lora_engine("alice", "bob", max_batch=8)
    want = engine.classify("alice", ["t9 t10", "t11"])
    engine._tasks["bob"] = {**TASK, "label_words": {"yes": "t5"}}  # does not cover "no" (an old, unchecked record)
    results = {}
    with held(engine) as go:
        threads = [threading.Thread(target=lambda u=u: results.__setitem__(u, _classify(engine, u))) for u in ("bob", "alice")]
        for thread in threads:
            thread.start()
        go.release(lambda: 1 if "bob" in results else 2)  # refused before it was queued, or queued beside alice
        for thread in threads:
            thread.join(60)
    assert results["alice"] == want
    assert isinstance(results["bob"], RequestError) and results["bob"].param == "task"
    engine.close()


def _classify(engine, user):
    try:
        return engine.classify(user, ["t9 t10", "t11"])
    except Exception as err:
        return err


def test_a_scoring_batch_that_fails_is_retried_request_by_request():
    engine = lora_engine("alice", "bob", max_batch=16)
    want = engine.classify("alice", ["t9 t10", "t11"])
    original = engine.bank.forward

    def forward(*args, users=None, **kwargs):
        if "bob" in users:
            raise RuntimeError("bob's rows cannot run")
        return original(*args, users=users, **kwargs)

    engine.bank.forward = forward
    results = {}
    with held(engine) as go:
        threads = [threading.Thread(target=lambda u=u: results.__setitem__(u, _classify(engine, u))) for u in ("bob", "alice")]
        for thread in threads:
            thread.start()
        go.release(2)
        for thread in threads:
            thread.join(60)
    assert results["alice"] == want and isinstance(results["bob"], RuntimeError)
    engine.close()


def test_tasks_are_checked_and_bounded_before_they_are_kept():
    engine = lora_engine()
    assert engine.check_task(TASK) == TASK
    bad = [
        {**TASK, "label_words": {"yes": "t5"}},  # does not cover the labels
        {**TASK, "labels": [f"l{i}" for i in range(30_000)], "label_words": None},
        {**TASK, "labels": ["yes", "yes"]},
        {**TASK, "template": "{text:>999999999}"},  # a format spec would allocate a gigabyte per input
        {**TASK, "template": "{text.__class__}"},
        {**TASK, "max_length": 10**9},
        {**TASK, "style": "head"},  # this model has no head
        {**TASK, "kind": "regression"},
        ["yes", "no"],
    ]
    for task in bad:
        with pytest.raises(RequestError) as err:
            engine.check_task(task)
        assert err.value.param == "task"
    labels = [f"t{i}" for i in range(10, 110)]
    engine.add("many", slimtune.LoRA(rank=2), task={**TASK, "labels": labels, "label_words": None})
    with pytest.raises(RequestError, match="at most"):  # 100 labels x 256 inputs: refused, not run
        engine.classify("many", ["t9"] * (MAX_SCORED_ROWS // 100 + 1))
    engine.close()


def test_a_long_classification_takes_turns_with_generation():
    """Scoring goes a batch of rows at a time between decoding steps, so a big request cannot hold up the
    generations of others until it is done."""
    engine = lora_engine("alice", max_batch=4)
    order = []
    original = engine.bank.forward

    def forward(*args, users=None, **kwargs):
        order.append("score")
        return original(*args, users=users, **kwargs)

    decode = engine.bank.decode
    with held(engine) as go:
        generation = engine.stream("alice", [5, 6], max_new_tokens=8, ignore_eos=True)
        scoring = threading.Thread(target=engine.classify, args=("alice", ["t9"] * 20))  # 40 rows: 10 batches
        scoring.start()
        engine.bank.forward = forward
        engine.bank.decode = lambda *a: order.append("step") or decode(*a)
        go.release(2)
        generation.result()
        scoring.join(60)
    first_step, last_score = order.index("step"), len(order) - 1 - order[::-1].index("score")
    assert first_step < last_score  # generation stepped while the classification was still being scored
    engine.close()


# --- the shared weights ------------------------------------------------------------------------------


def full_state(model, lm_head_only: bool = False) -> dict:
    state = {n: t.clone() for n, t in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    return {"lm_head.weight": state["lm_head.weight"]} if lm_head_only else state


@pytest.mark.parametrize("lm_head_only", [False, True])
def test_a_serving_bank_never_takes_a_full_fine_tune_even_when_empty(tmp_path, lm_head_only):
    model = build("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    folder = storage.write(tmp_path / "full", {"method": {"kind": "full"}, "model": modules.fingerprint(model)},
                           full_state(model, lm_head_only))
    engine = Engine(model, vocab_tokenizer())
    with pytest.raises(TuningError, match="frozen"):
        engine.check(folder)
    with pytest.raises(TuningError, match="frozen"):
        Bank(model, frozen=True).add("x", folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    engine.close()


def test_a_full_fine_tune_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    model = build("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    folder = storage.write(tmp_path / "full", {"method": {"kind": "full"}, "model": modules.fingerprint(model)},
                           full_state(model, lm_head_only=True))
    with pytest.raises(TuningError, match="missing"):
        slimtune.load(model, folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def lora_folder(tmp_path, name="lora"):
    tuned = slimtune.attach(build("llama"), slimtune.LoRA(rank=4))
    perturb(tuned.tuning_parameters(), seed=3)
    return tuned.save(tmp_path / name)


def rewritten(folder, method=None, tensors=None):
    record, state = storage.read(folder)
    record = {k: v for k, v in record.items() if k not in ("format", "version", "sha256")}
    if method:
        record["method"] = {**record["method"], **method}
    return storage.write(folder, record, tensors(state) if tensors else state)


@pytest.mark.parametrize("lie", ["rank", "targets", "foreign tensor", "not finite", "integers"])
def test_an_upload_is_loaded_against_the_model_before_it_is_accepted(tmp_path, lie):
    engine = lora_engine("alice")
    served = engine.generate("alice", [5, 6, 7], max_new_tokens=4)
    folder = lora_folder(tmp_path)
    record, tensors = engine.check(folder)  # the honest one is accepted, its targets named one by one
    assert all("." in t for t in record["method"]["targets"]) and set(tensors) == set(storage.read(folder)[1])
    first = next(iter(storage.read(folder)[1]))
    lies = {
        "rank": lambda: rewritten(folder, method={"rank": 64}),
        "targets": lambda: rewritten(folder, method={"targets": ["no_such_layer"]}),
        "foreign tensor": lambda: rewritten(folder, tensors=lambda s: {**s, "model.secret.lora_A": torch.zeros(2)}),
        "not finite": lambda: rewritten(folder, tensors=lambda s: {**s, first: s[first] * float("nan")}),
        "integers": lambda: rewritten(folder, tensors=lambda s: {**s, first: s[first].long()}),
    }
    lies[lie]()
    with pytest.raises(TuningError):
        engine.check(folder)
    assert engine.bank.users == ["alice"]
    assert engine.generate("alice", [5, 6, 7], max_new_tokens=4).token_ids == served.token_ids
    engine.close()


def test_an_upload_is_checked_while_the_engine_serves_others(tmp_path, monkeypatch):
    """Building an upload's tensors (a 512 MiB one takes about a second) happens off the worker's lock: the
    worker goes on serving meanwhile. Before, the check added the tuning to the bank under that lock."""
    from slimtune.methods.lora import LoRAComponent

    engine = lora_engine("alice", max_batch=4)
    folder = lora_folder(tmp_path)
    want = engine.generate("alice", [5, 6, 7], max_new_tokens=5)
    entered, release = threading.Event(), threading.Event()
    build = LoRAComponent.from_state

    def slow(self, method, state):
        entered.set()
        release.wait(30)
        return build(self, method, state)

    monkeypatch.setattr(LoRAComponent, "from_state", slow)
    checked = []
    thread = threading.Thread(target=lambda: checked.append(engine.check(folder)))
    thread.start()
    assert entered.wait(30)
    served = answered(engine.stream("alice", [5, 6, 7], max_new_tokens=5), timeout=10)
    release.set()
    thread.join(30)
    assert served is not None and served.token_ids == want.token_ids
    assert checked and engine.bank.users == ["alice"]
    engine.close()


@pytest.mark.parametrize("method", [{"kind": "lora", "alpha": None}, {"kind": {}}, {"kind": "lora", "rank": True},
                                    {"kind": "lora", "targets": ["q_proj", 1]}, {"kind": "lora", "secret": 1},
                                    {"kind": "prefix", "length": "10"}, ["lora"]])
def test_a_method_record_of_the_wrong_types_is_refused_before_any_config_runs(method):
    from slimtune.errors import TuningFileError
    from slimtune.methods import method_from_dict

    with pytest.raises(TuningFileError, match="method"):
        method_from_dict(method)


@pytest.mark.parametrize("text", ["null", "1", '"text"', "[]"])
def test_json_from_outside_may_be_any_value_within_the_limits(text):
    import json

    assert storage.load_json(text, "a field") == json.loads(text)
