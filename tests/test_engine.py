"""The engine: many users' generations in one continuously batched run, each as if alone."""

import asyncio
import time

import pytest
import torch

import slimtune
from slimtune.engine import Engine, EngineClosedError, GenerationRequest, RequestError
from slimtune.errors import UnknownUserError

from conftest import DECODERS, build
from helpers import methods_for, perturb, vocab_tokenizer


def engine_for(arch, **options):
    engine = Engine(build(arch), vocab_tokenizer(), **options)
    for i, (user, method) in enumerate(methods_for(arch).items()):
        engine.add(user, method)
        perturb(engine.bank.user_parameters(user), seed=i)
    return engine


def prompt(j: int) -> list[int]:
    return [(7 * j + k) % 90 + 3 for k in range(3 + j % 5)]


@pytest.mark.parametrize("arch", DECODERS)
def test_a_continuously_batched_mix_gives_each_row_what_it_gets_alone(arch):
    engine = engine_for(arch, max_batch=8)
    users = [None, *methods_for(arch)]  # 12 requests, 8 rows at most: rows leave and others join mid-run
    options = [{"max_new_tokens": 4 + j % 5, "keep_logits": True} for j in range(len(users))]
    handles = [engine.stream(u, prompt(j), **options[j]) for j, u in enumerate(users)]
    mixed = [h.result() for h in handles]
    rows = list(engine.stats.batch_rows)
    assert max(rows) == 8 and any(b > a for a, b in zip(rows, rows[1:], strict=False))  # rows joined a running batch
    for j, user in enumerate(users):
        alone = engine.generate(user, prompt(j), **options[j])
        assert mixed[j].token_ids == alone.token_ids, user
        torch.testing.assert_close(mixed[j].logits, alone.logits, atol=1e-5, rtol=1e-5)
        # and an independent path: transformers' own generate() through the bank
        reference = engine.bank.generate(input_ids=torch.tensor([prompt(j)]), users=[user], do_sample=False,
                                         max_new_tokens=options[j]["max_new_tokens"], pad_token_id=1)[0, len(prompt(j)):]
        reference = reference.tolist()
        assert mixed[j].token_ids == reference[: reference.index(1)] if 1 in reference else reference, user
        assert mixed[j].finish_reason == ("stop" if len(mixed[j].token_ids) < options[j]["max_new_tokens"] else "length")
    engine.close()


def test_sliding_window_rows_joined_mid_run_equal_transformers_generate():
    """Gemma 3's sliding layers (a window of 4 here) beside its full ones: the engine keeps every layer's whole
    cache, left-padded when rows join; the masks still show each query only its window, as transformers'
    own generate() does with its sliding-window cache."""
    engine = engine_for("gemma3", max_batch=3)
    prompts = [[(5 * j + 3 * k) % 90 + 3 for k in range(6 + 3 * j)] for j in range(5)]  # 6 .. 18 tokens
    users = ["prefix5", "prompt4", None, "lora", "prefix3"]
    handles = [engine.stream(u, p, max_new_tokens=8) for u, p in zip(users, prompts, strict=True)]
    for handle, user, p in zip(handles, users, prompts, strict=True):
        reference = engine.bank.generate(input_ids=torch.tensor([p]), users=[user], do_sample=False, max_new_tokens=8,
                                         pad_token_id=1)[0, len(p):].tolist()
        assert handle.result().token_ids == (reference[: reference.index(1)] if 1 in reference else reference), user
    assert max(engine.stats.batch_rows) == 3
    engine.close()


def test_sampling_depends_on_the_requests_seed_only():
    engine = engine_for("llama")
    settings = {"max_new_tokens": 10, "temperature": 1.5, "top_p": 0.9}
    alone = engine.generate("lora", prompt(1), seed=3, **settings)
    crowd = [engine.stream(u, prompt(j), seed=j, **settings) for j, u in enumerate(["prefix3", "prompt2", None])]
    amid = engine.stream("lora", prompt(1), seed=3, **settings)
    assert amid.result().token_ids == alone.token_ids
    assert [h.result() for h in crowd]
    other = engine.generate("lora", prompt(1), seed=4, **settings)
    greedy = engine.generate("lora", prompt(1), max_new_tokens=10)
    assert other.token_ids != alone.token_ids and greedy.token_ids != alone.token_ids
    engine.close()


def test_streamed_text_adds_up_and_stop_strings_end_it():
    engine = engine_for("gpt2")
    full = engine.generate("houlsby", prompt(2), max_new_tokens=8)
    deltas = list(engine.stream("houlsby", prompt(2), max_new_tokens=8))
    assert "".join(deltas) == full.text and len(deltas) > 1
    words = full.text.split()
    stop = words[3]
    cut = engine.generate("houlsby", prompt(2), max_new_tokens=8, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert "".join(engine.stream("houlsby", prompt(2), max_new_tokens=8, stop=[stop])) == cut.text
    engine.close()


def test_tunings_load_from_the_store_and_the_least_recently_used_are_evicted(tmp_path):
    model = build("gpt2")
    store = slimtune.Store(tmp_path / "store", model)
    reference = Engine(model, vocab_tokenizer())
    for i, (user, method) in enumerate(list(methods_for("gpt2").items())[:6]):
        tuned = slimtune.attach(build("gpt2"), method)
        perturb(tuned.tuning_parameters(), seed=i)
        store.add(user, tuned)
        reference.add(user, store.path_of(user))
    users = store.names() * 2
    expected = [reference.generate(u, prompt(j), max_new_tokens=5).token_ids for j, u in enumerate(users)]
    reference.close()
    engine = Engine(model, vocab_tokenizer(), store, max_resident=2, max_batch=4)
    handles = [engine.stream(u, prompt(j), max_new_tokens=5) for j, u in enumerate(users)]
    assert [h.result().token_ids for h in handles] == expected
    assert len(engine.resident) <= 2 and engine.stats.evictions >= 4 and engine.stats.loads >= 6
    engine.close()


def classifier_engine(arch):
    engine = Engine(build(arch), vocab_tokenizer())
    task = {"kind": "classification", "labels": ["yes", "no", "maybe"], "label_words": {"yes": "t5", "no": "t6", "maybe": "t7"},
            "template": "t3 {text} t4", "max_length": 32}
    if arch == "bert":
        task["style"] = "head"
    for i, method in enumerate([slimtune.LoRA(rank=2), slimtune.PrefixTuning(length=2, reparam=None, init="random"),
                                slimtune.PromptTuning(length=3, init="uniform")]):
        engine.add(f"c{i}", method, task=task)
        perturb(engine.bank.user_parameters(f"c{i}"), seed=i)
    return engine


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_classification_requests_are_batched_across_users_and_match_each_alone(arch):
    engine = classifier_engine(arch)
    texts = {"c0": ["t9 t10", "t11"], "c1": ["t12 t13 t14"], "c2": ["t9", "t15 t16"]}

    async def together():
        return await asyncio.gather(*(engine.aclassify(u, t) for u, t in texts.items()))

    mixed = dict(zip(texts, asyncio.run(together()), strict=True))
    for user, answer in mixed.items():
        alone = engine.classify(user, texts[user])
        for got, want in zip(answer, alone, strict=True):
            assert list(got) == ["yes", "no", "maybe"] and abs(sum(got.values()) - 1) < 1e-5
            for label in got:
                assert abs(got[label] - want[label]) < 1e-5
    engine.close()


def test_bad_requests_are_refused_with_what_was_expected():
    engine = engine_for("gpt2")
    with pytest.raises(UnknownUserError, match="nobody"):
        engine.generate("nobody", prompt(0))
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.generate("lora", prompt(0), max_new_tokens=0)
    with pytest.raises(RequestError, match="temperature"):
        engine.generate("lora", prompt(0), temperature=-1)
    with pytest.raises(RequestError, match="top_p"):
        engine.generate("lora", prompt(0), top_p=1.5)
    with pytest.raises(RequestError, match="context of 128"):
        engine.generate("prompt4", [5] * 100, max_new_tokens=25)  # 100 + 4 virtual + 25 > 128
    with pytest.raises(RequestError, match="empty"):
        engine.generate(None, [])
    with pytest.raises(RequestError, match="not a classification tuning"):
        engine.classify("lora", ["t5"])
    with pytest.raises(RequestError, match="generation needs a decoder"):
        Engine(build("bert"), vocab_tokenizer()).generate(None, prompt(0))
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.generate("lora", prompt(0))


def test_a_cancelled_stream_frees_its_slot_and_close_finishes_what_is_in_flight():
    engine = engine_for("llama")

    async def leave_early():
        stream = engine.astream("prefix5", prompt(0), max_new_tokens=100)
        async for _ in stream:
            break  # the client goes away; a server cancels its generation
        stream.cancel()
        return await stream.wait()

    left = asyncio.run(leave_early())
    assert left.finish_reason == "cancelled" and len(left.token_ids) < 100
    for _ in range(100):  # the row leaves the running batch right after its last event
        if not engine._running:
            break
        time.sleep(0.01)
    assert not engine._running
    running = engine.submit(GenerationRequest("lora", prompt(1), max_new_tokens=30))
    engine.close(wait=True)
    done = running.result()
    assert done.finish_reason in ("length", "stop") and not engine._running
    assert done.finish_reason == "stop" or len(done.token_ids) == 30


def test_closing_the_engine_takes_its_hooks_off_the_shared_model():
    model = build("llama")

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    engine = Engine(model, vocab_tokenizer())
    for user, method in methods_for("llama").items():
        engine.add(user, method)
    assert engine.generate("lora", prompt(2), max_new_tokens=3).token_ids
    assert hooks() > before
    engine.close()
    assert hooks() == before
    again = Engine(model, vocab_tokenizer())  # a second engine on the same model serves the base model as it is
    base = again.generate(None, prompt(2), max_new_tokens=4).token_ids
    again.close()
    alone = model.generate(torch.tensor([prompt(2)]), max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert base == alone[0, len(prompt(2)):].tolist()


def test_a_tuning_replaced_or_deleted_in_the_store_is_served_as_the_store_holds_it(tmp_path):
    model = build("gpt2")
    store = slimtune.Store(tmp_path / "store", model)
    folders = []
    for seed in range(2):
        tuned = slimtune.attach(build("gpt2"), slimtune.LoRA(rank=2))
        perturb(tuned.tuning_parameters(), seed=seed, scale=1.0)
        folders.append(tuned.save(tmp_path / f"v{seed}"))
    store.add("alice", folders[0])
    engine = Engine(model, vocab_tokenizer(), store)
    first = engine.generate("alice", prompt(0), max_new_tokens=6)
    running = engine.stream("alice", prompt(0), max_new_tokens=60)  # still using version 0 while it is replaced
    store.add("alice", folders[1], replace=True)
    engine.remove("alice")
    second = engine.generate("alice", prompt(0), max_new_tokens=6)
    assert running.result().token_ids[:6] == first.token_ids
    fresh = Engine(build("gpt2"), vocab_tokenizer())
    fresh.add("alice", folders[1])
    assert second.token_ids == fresh.generate("alice", prompt(0), max_new_tokens=6).token_ids != first.token_ids
    store.delete("alice")
    engine.remove("alice")
    with pytest.raises(UnknownUserError):
        engine.generate("alice", prompt(0))
    engine.close()
    fresh.close()


def test_a_tuning_deleted_while_its_request_waits_fails_that_request_only(tmp_path):
    model = build("gpt2")
    store = slimtune.Store(tmp_path / "store", model)
    for name, method in [("alice", slimtune.LoRA(rank=2)), ("bob", slimtune.PromptTuning(length=30, init="uniform"))]:
        store.add(name, slimtune.attach(build("gpt2"), method))
    engine = Engine(model, vocab_tokenizer(), store, max_batch=1)
    # bob's 30 virtual tokens count against the context before bob was ever loaded
    with pytest.raises(RequestError, match="virtual"):
        engine.generate("bob", [5] * 90, max_new_tokens=10)
    busy = engine.stream(None, prompt(0), max_new_tokens=40, ignore_eos=True)  # holds the only row
    waiting = engine.stream("alice", prompt(1), max_new_tokens=3)
    other = engine.stream(None, prompt(2), max_new_tokens=3)
    store.delete("alice")
    with pytest.raises(UnknownUserError, match="alice"):
        waiting.result()
    assert len(busy.result().token_ids) == 40 and other.result().finish_reason in ("stop", "length")
    engine.close()


def test_a_tuning_evicted_while_its_prompt_length_is_read_is_read_from_the_store(tmp_path, monkeypatch):
    """The worker may evict a tuning between `virtual_tokens`' look at the bank and its read of it (a server's
    request thread against the engine's): that request must read the store, not fail with a 500."""
    model = build("gpt2")
    store = slimtune.Store(tmp_path / "store", model)
    store.add("p", slimtune.attach(build("gpt2"), slimtune.PromptTuning(length=3, init="uniform")))
    with Engine(model, vocab_tokenizer(), store) as engine:
        engine.generate("p", prompt(1), max_new_tokens=2)  # loaded, resident
        assert "p" in engine.resident

        def evicted(user):
            raise UnknownUserError(f"unknown user {user!r}")

        monkeypatch.setattr(engine.bank, "method", evicted)
        assert engine.virtual_tokens("p") == 3
