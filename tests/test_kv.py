"""The running batch's KV cache: admitting a row writes only its slot, a finished row frees its slot, and no
row ever sees what an earlier occupant of its slot left."""

import threading

import torch
from transformers import DynamicCache

import slimtune
from slimtune.engine import Engine
from slimtune.serving.kv import SlotCache

from conftest import build
from helpers import perturb, vocab_tokenizer


def fresh(rows: int, width: int, seed: int, layers: int = 2) -> DynamicCache:
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.randn(rows, 2, width, 4, generator=g), torch.randn(rows, 2, width, 4, generator=g), i)
    return cache


def test_a_row_that_fits_is_written_into_its_own_slot_and_the_others_are_not_copied():
    cache = SlotCache(fresh(2, 5, seed=0), max_rows=8)
    cache.reserve(3)
    for _ in range(3):  # three decoding steps
        for i in range(len(cache.layers)):
            cache.update(torch.ones(cache.rows, 2, 1, 4), torch.ones(cache.rows, 2, 1, 4), i)
    storage = [layer.k_buf.data_ptr() for layer in cache.layers]
    before = [layer.keys.clone() for layer in cache.layers]
    relayouts = cache.relayouts
    cache.join(fresh(1, 4, seed=1))  # 4 columns: fits left of the window's end
    assert cache.relayouts == relayouts and [layer.k_buf.data_ptr() for layer in cache.layers] == storage
    assert cache.rows == 3 and cache.width == 8
    for layer, old in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys[:2], old)  # the running rows' keys, where they were
        assert torch.equal(layer.keys[2, :, -4:], fresh(1, 4, seed=1).layers[cache.layers.index(layer)].keys[0])
        assert not layer.keys[2, :, :-4].any()  # its columns before its prompt: zero


def test_a_longer_prompt_or_a_full_buffer_lays_the_cache_out_afresh_keeping_every_row():
    cache = SlotCache(fresh(2, 3, seed=0), max_rows=8)
    old = [layer.keys.clone() for layer in cache.layers]
    cache.join(fresh(1, 6, seed=2))  # longer than the window: the others move right
    assert cache.width == 6 and cache.relayouts == 2
    for layer, before in zip(cache.layers, old, strict=True):
        assert torch.equal(layer.keys[:2, :, -3:], before) and not layer.keys[:2, :, :-3].any()
    columns = cache.capacity[1]
    mark = cache.reserve(columns)  # more than the buffer has left: it grows
    assert cache.capacity[1] >= cache.end + columns and mark == cache.end


def test_a_finished_row_frees_its_slot_for_the_last_row_and_the_slot_is_zeroed():
    cache = SlotCache(fresh(4, 3, seed=0), max_rows=4)
    rows = [layer.keys.clone() for layer in cache.layers]
    order = cache.keep([0, 2, 3])  # row 1 is done: the last row moves into its slot
    assert order == [0, 3, 2] and cache.rows == 3
    for layer, before in zip(cache.layers, rows, strict=True):
        assert torch.equal(layer.keys, before[order])
        assert not layer.k_buf[3:].any() and not layer.v_buf[3:].any()


def test_a_step_that_fails_part_way_leaves_the_cache_as_it_was():
    cache = SlotCache(fresh(2, 3, seed=0), max_rows=4)
    before = [layer.keys.clone() for layer in cache.layers]
    mark = cache.reserve(1)
    cache.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 0)  # the first layer only, then a failure
    cache.rewind(mark)
    assert [torch.equal(layer.keys, old) for layer, old in zip(cache.layers, before, strict=True)] == [True, True]
    assert not cache.layers[0].k_buf[:, :, mark:].any()


def test_a_row_in_the_slot_of_one_that_produced_nan_gets_what_it_gets_alone():
    engine = Engine(build("llama"), vocab_tokenizer(), max_batch=2)
    engine.add("poison", slimtune.LoRA(rank=2, targets=("v_proj", "k_proj")))
    for p in engine.bank.user_parameters("poison"):
        p.data.fill_(float("nan"))
    engine.add("alice", slimtune.LoRA(rank=2))
    perturb(engine.bank.user_parameters("alice"), seed=1)
    alone = engine.generate("alice", [5, 6], max_new_tokens=6)
    long = engine.stream(None, [7, 8, 9, 10, 11, 12], max_new_tokens=30, ignore_eos=True)
    engine.generate("poison", [5, 6, 7, 8], max_new_tokens=3, ignore_eos=True)  # fills its slot with NaN, then leaves
    for _ in range(1000):  # the worker drops the finished row just after answering it
        if len(engine._running) == 1:
            break
        threading.Event().wait(0.005)
    assert len(engine._running) == 1 and not long._result  # the long row is still running
    joined = threading.Thread(target=lambda: out.append(engine.generate("alice", [5, 6], max_new_tokens=6)))
    out = []
    joined.start()
    joined.join(60)
    assert out[0].token_ids == alone.token_ids
    long.result()
    engine.close()
