"""Fair shares between tenants: one tenant's costly or numerous requests take its share of the engine, not
everyone's (virtual token counters, see slimtune.serving.fairness)."""

import threading

import pytest
from test_isolation import held, lora_engine

from slimtune.engine import GenerationRequest, RequestError
from slimtune.serving.fairness import OUTPUT_WEIGHT, FairShare


def test_the_least_served_tenant_goes_first_and_idle_time_is_not_saved_up():
    fair = FairShare()
    fair.charge("a", 100)
    fair.charge("b", 10)
    assert fair.order(["a", "b", "c"]) == ["c", "b", "a"]
    fair.arrive("c", active={"a", "b"})  # new, with others at work: starts at the least of theirs
    assert fair.served("c") == 10
    fair.arrive("d", active=set())  # nobody at work: nothing to catch up with
    assert fair.served("d") == 0
    fair.charge("b", 3, OUTPUT_WEIGHT)
    assert fair.served("b") == 10 + 3 * OUTPUT_WEIGHT
    fair.arrive("a", active={"b", "c"})  # already ahead of them: keeps what it has had
    assert fair.served("a") == 100


def test_a_tenants_big_classification_waits_its_turn_behind_another_tenants_generation():
    """The old engine scored one batch of a waiting classification before every decoding step, so a tenant
    with 160 rows to score halved the speed of every generation; now the generation of a tenant that has
    had less service runs step after step until it has had as much."""
    engine = lora_engine("alice", "bob", max_batch=8)
    order = []
    forward, finish = engine.bank.forward, engine._finish

    def scoring(*args, users=None, **kwargs):
        order.append("score")
        return forward(*args, users=users, **kwargs)

    def finished(row, reason):
        order.append(f"done {row.request.user}")
        return finish(row, reason)

    with held(engine) as go:
        big = threading.Thread(target=engine.classify, args=("alice", ["t9 t10"] * 80))  # 160 rows: 20 batches
        big.start()
        generation = engine.stream("bob", [5, 6], max_new_tokens=8, ignore_eos=True)
        engine.bank.forward, engine._finish = scoring, finished
        go.release(2)
        generation.result()
        big.join(60)
    engine.bank.forward, engine._finish = forward, finish
    assert order.count("score") == 20
    assert order[:order.index("done bob")].count("score") <= 2
    engine.close()


def test_a_tenant_that_queues_many_generations_does_not_push_anothers_to_the_back():
    engine = lora_engine("alice", "bob", max_batch=3)  # the held base row takes one: two rows for the rest
    done = []
    finish = engine._finish

    def finished(row, reason):
        done.append(row.request.user)
        return finish(row, reason)

    with held(engine) as go:
        many = [engine.stream("alice", [5, 6, 7], max_new_tokens=6, ignore_eos=True) for _ in range(8)]
        late = engine.stream("bob", [5, 6, 7], max_new_tokens=6, ignore_eos=True)
        engine._finish = finished
        go.release(9)
        late.result()
        for handle in many:
            handle.result()
    engine._finish = finish
    assert done.index("bob") <= 2  # among the first rows admitted, not after alice's eight
    engine.close()


def test_tenants_are_named_by_the_caller_and_default_to_the_tuning():
    assert GenerationRequest("alice", [1]).owner == GenerationRequest("alice", [2]).owner
    assert GenerationRequest("alice", [1]).owner != GenerationRequest("bob", [1]).owner
    assert GenerationRequest("alice", [1], tenant="k1").owner == GenerationRequest("bob", [1], tenant="k1").owner
    assert GenerationRequest(None, [1]).owner != GenerationRequest(None, [1], tenant="").owner
    with pytest.raises(RequestError, match="tenant"):
        GenerationRequest("alice", [1], tenant=["k1"]).check()
