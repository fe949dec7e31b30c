"""AdapterHub folders, checked against the real `adapters` 1.3 package.

The folders and the reference outputs under fixtures/adapterhub/ were made by `adapters` itself
(make_adapterhub_fixtures.py, in an environment with transformers 4.57); these tests need only those files.
"""

import copy
import json
import shutil

import pytest
import torch
from make_adapterhub_fixtures import (
    GENERATED,
    HERE,
    MODELS,
    NO_TOKEN,
    TRAIN_SEED,
    base_model,
    batch,
    last_hidden,
    outputs,
)
from safetensors.torch import load_file

import slimtune
from slimtune.engine import Engine
from slimtune.errors import ModelMismatchError, TuningError, TuningFileError

from conftest import build
from helpers import perturb, vocab_tokenizer

REFERENCE = load_file(str(HERE / "reference.safetensors"))
FOLDERS = {
    "bert-mlm/houlsby": "houlsby",
    "bert-mlm/houlsby-gelu": "houlsby",
    "bert-mlm/houlsby-string": "houlsby",
    "bert-mlm/pfeiffer": "pfeiffer",
    "bert-mlm/pfeiffer-string": "pfeiffer",
    "bert-mlm/pfeiffer-leave-out": "pfeiffer",
    "bert-mlm/ffn-houlsby": "houlsby-ffn",
    "bert-cls/houlsby": "houlsby",
    "bert-cls/pfeiffer": "pfeiffer",
    "gpt2/houlsby": "houlsby",
    "gpt2/pfeiffer": "pfeiffer",
    "llama/houlsby": "houlsby",
    "llama/pfeiffer": "pfeiffer",
    "bart/houlsby": "houlsby",
    "bart/pfeiffer": "pfeiffer",
    "mbart/houlsby": "houlsby",
    "mbart/pfeiffer": "pfeiffer",
    "bert-mlm/lora": "lora",
    "llama/lora": "lora",
    "bert-mlm/prefix": "prefix",
    "bert-cls/prefix": "prefix",
    "gpt2/prefix": "prefix",
    "llama/prefix": "prefix",
    "llama/prefix-flat": "prefix",
}
GENERATING = ["gpt2/prefix", "llama/prefix", "llama/prefix-flat"]  # with AdapterHub's greedy generation logits
TOLERANCE = 1e-5


def gap(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest difference over the real (unpadded) positions."""
    return (got[mask.bool()] - want[mask.bool()]).abs().max().item()


def hidden(model, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return last_hidden(model(**inputs, output_hidden_states=True, **extra))


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_base_models_are_the_ones_the_references_were_made_on(kind):
    inputs = batch(kind)
    with torch.no_grad():
        got = outputs(base_model(kind), inputs)
    for part in ("hidden", "encoder"):  # an encoder-decoder's encoder too
        if part in got:
            assert gap(got[part], REFERENCE[f"{kind}.base.{part}"], inputs["attention_mask"]) < TOLERANCE, part


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_an_adapterhub_folder_gives_adapterhubs_outputs(folder):
    kind = folder.split("/")[0]
    inputs = batch(kind)
    tuned = slimtune.load(base_model(kind), HERE / folder)
    method = tuned.method
    assert (method.kind if FOLDERS[folder] in ("lora", "prefix") else method.placement) == FOLDERS[folder]
    if method.kind == "prefix":  # AdapterHub leaves the real tokens' positions as they are
        assert method.positions == "from-zero"
    with torch.no_grad():
        out = tuned(**inputs, output_hidden_states=True)
    want = REFERENCE[f"{folder}.hidden"]
    assert gap(last_hidden(out), want, inputs["attention_mask"]) < TOLERANCE
    if f"{folder}.encoder" in REFERENCE:  # an encoder-decoder: the encoder's own output too
        assert gap(out.encoder_last_hidden_state, REFERENCE[f"{folder}.encoder"], inputs["attention_mask"]) < TOLERANCE
    assert gap(REFERENCE[f"{kind}.base.hidden"], want, inputs["attention_mask"]) > 0.1  # the adapter does something
    if kind == "bert-cls":  # the head came with it
        assert (out.logits - REFERENCE[f"{folder}.logits"]).abs().max() < TOLERANCE


def test_houlsby_reads_the_dropped_out_projection_in_training():
    """With dropout on, AdapterHub (as Houlsby's reference code) computes h' = drop(h), h' + A(h'): the same
    dropout masks (same seed, same order of draws) give the same outputs."""
    inputs = batch("bert-mlm")
    tuned = slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/houlsby")
    tuned.train()
    torch.manual_seed(TRAIN_SEED)
    got = hidden(tuned, inputs)
    want = REFERENCE["bert-mlm/houlsby.train.hidden"]
    assert gap(got, REFERENCE["bert-mlm/houlsby.hidden"], inputs["attention_mask"]) > 0.1  # dropout was on
    assert gap(got, want, inputs["attention_mask"]) < TOLERANCE


def test_pfeiffer_is_not_houlsby_after_the_feed_forward_block():
    """The same weights read as Houlsby's adapter at the feed-forward output compute something else."""
    inputs = batch("bert-mlm")
    pfeiffer = slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/pfeiffer")
    state = {k.replace(".LayerNorm.adapter.", ".dense.adapter."): v for k, v in pfeiffer.bank.state("default").items()}
    method = slimtune.Adapter(size=4, placement="houlsby-ffn")
    other = slimtune.load(base_model("bert-mlm"), HERE / "bert-mlm/pfeiffer")
    other.bank.remove("default")
    other.bank.add("default", (method, state))
    assert gap(hidden(other, inputs), REFERENCE["bert-mlm/pfeiffer.hidden"], inputs["attention_mask"]) > 0.1


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2", "llama", "bart", "mbart"])
def test_adapterhub_rows_in_a_mixed_batch_equal_each_alone(kind):
    """Rows of a Houlsby user, a Pfeiffer user, the base model and a slimtune LoRA user in one batch: each row is
    AdapterHub's output for it (or the LoRA alone)."""
    inputs = batch(kind)
    model = base_model(kind)
    bank = slimtune.Bank(model)
    bank.add("houlsby", HERE / f"{kind}/houlsby")
    bank.add("pfeiffer", HERE / f"{kind}/pfeiffer")
    bank.add("lora", slimtune.LoRA(rank=4))
    perturb(bank.user_parameters("lora"), seed=3)
    users = ["pfeiffer", "houlsby", None, "lora"]
    with torch.no_grad():
        mixed = bank(**inputs, users=users, output_hidden_states=True)
        lora = bank(**inputs, users=["lora"] * 4, output_hidden_states=True)
    want = {"houlsby": REFERENCE[f"{kind}/houlsby.hidden"], "pfeiffer": REFERENCE[f"{kind}/pfeiffer.hidden"],
            None: REFERENCE[f"{kind}.base.hidden"], "lora": last_hidden(lora)}
    for row, user in enumerate(users):
        mask = inputs["attention_mask"][row:row + 1]
        assert gap(last_hidden(mixed)[row:row + 1], want[user][row:row + 1], mask) < TOLERANCE, user
        if kind == "bert-cls" and user in ("houlsby", "pfeiffer"):
            assert (mixed.logits[row] - REFERENCE[f"{kind}/{user}.logits"][row]).abs().max() < TOLERANCE


def test_a_store_takes_an_adapterhub_folder_and_serves_it(tmp_path):
    model = base_model("bert-cls")
    store = slimtune.Store(tmp_path / "store", model)
    store.add("alice", HERE / "bert-cls/pfeiffer")
    tuned = slimtune.load(base_model("bert-cls"), store.entry("alice").path)
    inputs = batch("bert-cls")
    with torch.no_grad():
        logits = tuned(**inputs).logits
    assert (logits - REFERENCE["bert-cls/pfeiffer.logits"]).abs().max() < TOLERANCE


def generation_inputs(kind: str) -> dict[str, torch.Tensor]:
    inputs = batch(kind)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def greedy_logits(bank, kind: str, users) -> torch.Tensor:
    """[GENERATED, rows, vocab]: `Bank.generate` (transformers' generate(), the prefix put in at every step), as the
    references were made: greedy on the raw logits, no token ending a row."""
    config = copy.deepcopy(bank.model.generation_config)
    config.update(do_sample=False, max_new_tokens=GENERATED, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=1, eos_token_id=NO_TOKEN)
    out = bank.generate(**generation_inputs(kind), users=users, generation_config=config)
    return torch.stack(out.logits)


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2", "llama"])
def test_adapterhub_prefix_rows_mix_with_other_methods_and_with_prefixes_that_shift_positions(kind):
    """AdapterHub's prefix rows (real tokens from position 0) beside Houlsby rows, base rows, LoRA rows and slimtune
    prefix rows (real tokens after the prefix) in one padded batch: each row is AdapterHub's output for it, or that
    tuning run alone."""
    inputs = batch(kind)
    bank = slimtune.Bank(base_model(kind))
    bank.add("ah-prefix", HERE / f"{kind}/prefix")
    bank.add("houlsby", HERE / f"{kind}/houlsby")
    torch.manual_seed(0)
    bank.add("prefix", slimtune.PrefixTuning(length=3, reparam=None, init="random"))
    bank.add("lora", slimtune.LoRA(rank=4))
    perturb(bank.user_parameters("lora"), seed=3)
    mixes = [["ah-prefix", "houlsby", "prefix", "lora"], ["prefix", "ah-prefix", None, "ah-prefix"]]
    if kind == "llama":  # two AdapterHub prefixes of different lengths (6, 3), one made by its MLP, one flat
        bank.add("ah-flat", HERE / "llama/prefix-flat")
        mixes.append(["ah-flat", "prefix", "ah-prefix", "ah-flat"])
    with torch.no_grad():
        alone = {u: bank(**inputs, users=[u] * 4, output_hidden_states=True).hidden_states[-1] for u in ("prefix", "lora")}
    want = {"ah-prefix": REFERENCE[f"{kind}/prefix.hidden"], "ah-flat": REFERENCE.get("llama/prefix-flat.hidden"),
            "houlsby": REFERENCE[f"{kind}/houlsby.hidden"], None: REFERENCE[f"{kind}.base.hidden"], **alone}
    for users in mixes:
        with torch.no_grad():
            mixed = bank(**inputs, users=users, output_hidden_states=True)
        for row, user in enumerate(users):
            mask = inputs["attention_mask"][row:row + 1]
            assert gap(mixed.hidden_states[-1][row:row + 1], want[user][row:row + 1], mask) < TOLERANCE, (users, user)
            if kind == "bert-cls" and user in ("ah-prefix", "houlsby"):
                folder = f"{kind}/{user.removeprefix('ah-')}"
                assert (mixed.logits[row] - REFERENCE[f"{folder}.logits"][row]).abs().max() < TOLERANCE
    assert gap(alone["prefix"], REFERENCE[f"{kind}.base.hidden"], inputs["attention_mask"]) > 0.1


@pytest.mark.parametrize("folder", GENERATING)
def test_generating_with_an_adapterhub_prefix_gives_adapterhubs_logits(folder):
    """transformers' generate() through the bank, from left-padded rows: the positions of each new token follow
    the mask, with nothing added for the prefix."""
    kind = folder.split("/")[0]
    tuned = slimtune.load(base_model(kind), HERE / folder)
    got = greedy_logits(tuned.bank, kind, ["default"] * 4)
    assert (got - REFERENCE[f"{folder}.generate.logits"]).abs().max() < TOLERANCE


def engine_logits(engine: Engine, kind: str, users) -> list[torch.Tensor]:
    """Each row's [GENERATED, vocab] logits from the engine (its KV cache: a prefix goes in once, at prefill),
    the rows streamed together."""
    inputs = generation_inputs(kind)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    handles = [engine.stream(user, prompts[row % 4], max_new_tokens=GENERATED, keep_logits=True, ignore_eos=True)
               for row, user in enumerate(users)]
    return [h.result().logits for h in handles]


@pytest.mark.parametrize("kind, compile", [("gpt2", None), ("llama", None), ("llama", "aot_eager")])
def test_the_engine_decodes_adapterhub_prefix_rows_from_the_cache_as_adapterhub_generates(kind, compile):
    """In the engine the prefix is k cache columns before the row's tokens; decoding steps count positions from
    the mask less those k columns for AdapterHub's rows, not for slimtune's. A mix of both, LoRA and base rows,
    eager and compiled: each row's logits are AdapterHub's, or transformers' generate() of that tuning."""
    engine = Engine(base_model(kind), vocab_tokenizer(), compile=compile)  # eager attention, as the references
    if compile:  # each new batch shape's first step waits for its graph: every step runs compiled
        engine._captured.background = False
    engine.add("ah-prefix", HERE / f"{kind}/prefix")
    torch.manual_seed(0)
    engine.add("prefix", slimtune.PrefixTuning(length=3, reparam=None, init="random"))
    engine.add("lora", slimtune.LoRA(rank=4))
    perturb(engine.bank.user_parameters("lora"), seed=3)
    users = ["ah-prefix", "prefix", "ah-prefix", None, "lora", "ah-prefix", "prefix", "ah-prefix"]
    want = {"ah-prefix": REFERENCE[f"{kind}/prefix.generate.logits"]}
    want.update({u: greedy_logits(engine.bank, kind, [u] * 4) for u in ("prefix", None, "lora")})
    try:
        got = engine_logits(engine, kind, users)
        if compile:
            assert engine.stats.compiled_steps == engine.stats.steps > 0
    finally:
        engine.close()
    for row, user in enumerate(users):
        assert (got[row] - want[user][:, row % 4]).abs().max() < TOLERANCE, (row, user)
    assert (want["prefix"] - want[None]).abs().max() > 0.1


def test_a_reloaded_adapterhub_prefix_keeps_its_positions_and_its_logits(tmp_path):
    inputs = batch("llama")
    tuned = slimtune.load(base_model("llama"), HERE / "llama/prefix")
    tuned.save(tmp_path / "saved")
    again = slimtune.load(base_model("llama"), tmp_path / "saved")
    assert again.method == tuned.method and again.method.positions == "from-zero"
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, tuned(**inputs).logits)
    with pytest.raises(TuningError, match="positions='from-zero'"):  # PEFT's real tokens follow its prefix
        tuned.save(tmp_path / "peft", format="peft")


def test_a_store_takes_an_adapterhub_prefix_folder(tmp_path):
    store = slimtune.Store(tmp_path / "store", base_model("bert-cls"))
    store.add("alice", HERE / "bert-cls/prefix")
    tuned = slimtune.load(base_model("bert-cls"), store.entry("alice").path)
    with torch.no_grad():
        logits = tuned(**batch("bert-cls")).logits
    assert (logits - REFERENCE["bert-cls/prefix.logits"]).abs().max() < TOLERANCE


def test_a_prefix_without_positions_is_refused_on_sliding_window_layers():
    with pytest.raises(TuningError, match="sliding window"):
        slimtune.attach(build("gemma3"), slimtune.PrefixTuning(length=2, reparam=None, init="random",
                                                               positions="from-zero"))
    with pytest.raises(TuningError, match="positions must be one of"):
        slimtune.PrefixTuning(positions="before")


def copy_with_config(tmp_path, folder: str, **changes):
    """A copy of a fixture folder with settings of its adapter config changed."""
    out = tmp_path / folder.replace("/", "-")
    shutil.copytree(HERE / folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["config"].update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes, refused", [
    ({"phm_layer": True}, "Compacter"),
    ({"is_parallel": True}, "parallel adapters"),
    ({"use_gating": True}, "use_gating"),
    ({"ln_after": True}, "ln_after"),
    ({"inv_adapter": "nice"}, "invertible"),
    ({"scaling": "learned"}, "scaling='learned'"),
    ({"residual_before_ln": False}, "residual_before_ln=False"),
    ({"mh_adapter": True}, "after attention too"),
    ({"non_linearity": "gelu_new"}, "non_linearity 'gelu_new'"),
    ({"leave_out": [0, 7]}, "cannot express"),
    ({"architecture": "prompt_tuning"}, "prompt tuning"),
    ({"architecture": "union"}, "ConfigUnion"),
])
def test_what_has_no_equivalent_is_refused_with_its_option_named(tmp_path, changes, refused):
    folder = copy_with_config(tmp_path, "bert-mlm/pfeiffer", **changes)
    with pytest.raises(TuningError, match=refused.replace("(", r"\(").replace("'", "'")):
        slimtune.load(base_model("bert-mlm"), folder)


@pytest.mark.parametrize("changes, refused", [
    ({"use_gating": True}, "use_gating"),
    ({"leave_out": [0]}, "leave_out"),
    ({"non_linearity": "mish"}, "non_linearity 'mish'"),
    ({"flat": True}, "does not fit its config"),
])
def test_prefix_options_without_an_equivalent_are_refused(tmp_path, changes, refused):
    folder = copy_with_config(tmp_path, "bert-mlm/prefix", **changes)
    with pytest.raises(TuningError, match=refused):
        slimtune.load(base_model("bert-mlm"), folder)


def test_cross_attention_prefixes_are_refused(tmp_path):
    folder = copy_with_config(tmp_path, "gpt2/prefix")
    tensors = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    torch.save({k.replace(".self_prefix.", ".cross_prefix."): v for k, v in tensors.items()},
               folder / "pytorch_adapter.bin")
    with pytest.raises(TuningError, match="location 'cross_prefix'"):
        slimtune.load(base_model("gpt2"), folder)


def test_a_prefix_for_another_shape_of_model_is_a_model_mismatch():
    model = base_model("llama")
    model.model.layers = model.model.layers[:1]  # one layer: the prefix holds two layers' keys and values
    model.config.num_hidden_layers = 1
    with pytest.raises(ModelMismatchError, match="this model needs"):
        slimtune.load(model, HERE / "llama/prefix")


@pytest.mark.parametrize("changes, refused", [
    ({"composition_mode": "scale"}, "composition_mode='scale'"),
    ({"use_dora": True}, "DoRA"),
    ({"vera_d": 0.1}, "VeRA"),
])
def test_lora_options_without_an_equivalent_are_refused(tmp_path, changes, refused):
    folder = copy_with_config(tmp_path, "llama/lora", **changes)
    with pytest.raises(TuningError, match=refused.replace("(", r"\(")):
        slimtune.load(base_model("llama"), folder)


def test_a_folder_for_another_model_is_a_model_mismatch():
    with pytest.raises(ModelMismatchError, match="'bert' model"):
        slimtune.load(base_model("llama"), HERE / "bert-mlm/pfeiffer")
    with pytest.raises(ModelMismatchError, match="hidden size 64"):
        model = base_model("bert-mlm")
        model.config.hidden_size = 32  # the check reads the config before any shape
        slimtune.load(model, HERE / "bert-mlm/pfeiffer")


def test_a_head_needs_a_model_with_that_head():
    with pytest.raises(TuningError, match="carries a task head"):
        slimtune.load(base_model("bert-mlm"), HERE / "bert-cls/pfeiffer")
    with pytest.raises(TuningError, match="carries none"):  # the head left out of the folder
        slimtune.load(base_model("bert-cls"), HERE / "bert-mlm/pfeiffer")


def test_flex_heads_are_refused(tmp_path):
    folder = tmp_path / "flex"
    shutil.copytree(HERE / "bert-cls/pfeiffer", folder)
    head = json.loads((folder / "head_config.json").read_text())
    head["config"] = {"head_type": "classification", "num_labels": 3, "layers": 2}
    (folder / "head_config.json").write_text(json.dumps(head))
    with pytest.raises(TuningError, match="flex heads"):
        slimtune.load(base_model("bert-cls"), folder)


def test_hostile_weights_are_refused_without_running_code(tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(HERE / "bert-mlm/houlsby-string", folder)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Boom()}, folder / "pytorch_adapter.bin")
    with pytest.raises(TuningFileError, match="cannot be read"):
        slimtune.load(base_model("bert-mlm"), folder)
    tensors = torch.load(HERE / "bert-mlm/houlsby-string/pytorch_adapter.bin", weights_only=True)
    name = next(iter(tensors))
    torch.save({**tensors, name: torch.full_like(tensors[name], float("nan"))}, folder / "pytorch_adapter.bin")
    with pytest.raises(TuningFileError, match="finite"):
        slimtune.load(base_model("bert-mlm"), folder)
    bias = next(k for k in tensors if k.endswith("adapter_up.bias"))
    torch.save({**tensors, bias: tensors[bias][:-1]}, folder / "pytorch_adapter.bin")  # a wrong shape
    with pytest.raises(ModelMismatchError, match="up.bias' has shape"):
        slimtune.load(base_model("bert-mlm"), folder)


def test_an_adapter_saved_when_pfeiffer_meant_houlsby_after_ffn_is_refused_saying_how_to_load_it():
    model = base_model("bert-mlm")
    old = slimtune.attach(model, slimtune.Adapter(size=4, placement="houlsby-ffn"))
    perturb(old.tuning_parameters(), seed=2)
    state = old.bank.state("default")
    bank = slimtune.Bank(base_model("bert-mlm"))
    with pytest.raises(TuningError, match="now placement 'houlsby-ffn'"):
        bank.add("old", (slimtune.Adapter(size=4, placement="pfeiffer", ffn_output=old.method.ffn_output), state))


@pytest.mark.parametrize("folder", ["llama/houlsby", "llama/lora", "llama/prefix"])
def test_an_adapterhub_folder_uploaded_to_the_server_answers_as_loaded_alone(tmp_path, folder):
    """POST /v1/tunings takes the AdapterHub folder's own files (adapter_config.json, pytorch_adapter.bin), and the
    server's greedy answer is the one of that folder loaded alone."""
    import httpx

    from slimtune.keys import KeyRing
    from slimtune.server import create_app, running

    admin, prompt = "admin-key-for-tests-0123456789", "t5 t9 t20 t33"
    with Engine(base_model("llama"), vocab_tokenizer()) as alone:
        alone.add("t", HERE / folder)
        want = alone.generate("t", prompt, max_new_tokens=6).text
        assert want != alone.generate(None, prompt, max_new_tokens=6).text  # the tuning changes the answer
    model = base_model("llama")
    store = slimtune.Store(tmp_path / "store", model)
    app = create_app(Engine(model, vocab_tokenizer(), store), store, KeyRing(store.path / "keys.json", admin), "tiny")
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        key = http.post("/v1/keys", headers={"Authorization": f"Bearer {admin}"}, json={}).json()["key"]
        files = [("files", (p.name, p.read_bytes())) for p in sorted((HERE / folder).iterdir()) if p.is_file()]
        stored = http.post("/v1/tunings", headers={"Authorization": f"Bearer {key}"}, data={"name": "mine"}, files=files)
        assert stored.status_code == 201, stored.text
        answer = http.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "mine", "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == want
