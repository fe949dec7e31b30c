"""slimtune under transformers' Trainer, TRL's SFTTrainer and accelerate, with their default arguments:
columns are kept, checkpoints hold the tuning alone and load with slimtune.load, a resumed run ends where an
uninterrupted one does, activation checkpointing and bf16 work, two processes equal one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import slimtune
from slimtune import hf
from slimtune.methods.base import slot_key

from conftest import VOCAB, build
from helpers import vocab_tokenizer

datasets = pytest.importorskip("datasets")


def token_data(rows: int = 16, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": ids})


def arguments(out, **options) -> TrainingArguments:
    settings = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                    disable_tqdm=True, save_strategy="no", seed=0)
    return TrainingArguments(output_dir=str(out), **{**settings, **options})


def tuned_model(arch: str, method: slimtune.Method, seed: int = 0) -> slimtune.TunedModel:
    torch.manual_seed(seed)
    return slimtune.attach(build(arch), method)


def parameters(tuned) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in hf.trainable(tuned).items()}


def logits(tuned, seed: int = 5) -> torch.Tensor:
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return tuned(input_ids=ids).logits


@pytest.mark.parametrize(("arch", "method"), [("gpt2", slimtune.LoRA(rank=4)), ("llama", slimtune.PrefixTuning(length=3))],
                         ids=["gpt2-lora", "llama-prefix"])
def test_the_trainer_trains_and_its_checkpoints_hold_only_the_tuning(tmp_path, arch, method):
    tuned = tuned_model(arch, method)
    base = {n: t.clone() for n, t in tuned.model.state_dict().items()}
    start = parameters(tuned)
    trainer = Trainer(model=tuned, args=arguments(tmp_path, save_strategy="steps", save_steps=2), train_dataset=token_data())
    trainer.train()
    trainer.save_model(tmp_path / "final")

    assert all(not torch.equal(start[n], p) for n, p in parameters(tuned).items())
    assert all(torch.equal(base[n], t) for n, t in tuned.model.state_dict().items())
    tuning_bytes = sum(p.numel() * p.element_size() for p in tuned.tuning_parameters())
    for folder in (tmp_path / "checkpoint-4", tmp_path / "final"):
        saved = load_file(folder / "model.safetensors")
        assert set(saved) == set(hf.trainable(tuned)) | {hf.RECORD_KEY}
        assert (folder / "model.safetensors").stat().st_size < tuning_bytes + 4096  # the tensors, a header, the record
        loaded = slimtune.load(build(arch, seed=0), folder)
        torch.testing.assert_close(logits(loaded), logits(tuned), atol=0, rtol=0)
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(tmp_path / "checkpoint-4"))


def test_the_forward_shows_the_models_signature_and_takes_positional_inputs():
    import inspect

    tuned = tuned_model("llama", slimtune.PromptTuning(length=2))
    assert inspect.signature(tuned.forward) == inspect.signature(tuned.model.forward)
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, tuned(input_ids=ids).logits, atol=0, rtol=0)
        body = tuned.base_model(input_ids=ids).last_hidden_state  # what TRL's fused loss reads
        torch.testing.assert_close(tuned.get_output_embeddings()(body), tuned(input_ids=ids).logits)


def test_save_pretrained_writes_slimtune_or_peft_folders(tmp_path):
    tuned = tuned_model("gpt2", slimtune.LoRA(rank=4))
    tuned.save_pretrained(tmp_path / "own")
    tuned.save_pretrained(tmp_path / "peft", format="peft")
    assert sorted(os.listdir(tmp_path / "own")) == ["slimtune.json", "tuning.safetensors"]
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "peft")
    for folder in ("own", "peft"):
        torch.testing.assert_close(logits(slimtune.load(build("gpt2"), tmp_path / folder)), logits(tuned))


def test_a_state_dict_loads_only_into_the_same_method():
    state = tuned_model("gpt2", slimtune.LoRA(rank=4)).state_dict()
    with pytest.raises(slimtune.TuningError, match="Attach the same method"):
        tuned_model("gpt2", slimtune.LoRA(rank=2)).load_state_dict(state)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize(("arch", "method"), [("gpt2", slimtune.LoRA(rank=4)), ("llama", slimtune.PrefixTuning(length=3))],
                         ids=["gpt2-lora", "llama-prefix"])
def test_resuming_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, arch, method):
    options = dict(max_steps=6, save_strategy="steps", save_steps=3)
    whole = tuned_model(arch, method)
    Trainer(model=whole, args=arguments(tmp_path / "whole", **options), train_dataset=token_data()).train()

    cut = tuned_model(arch, method)
    Trainer(model=cut, args=arguments(tmp_path / "cut", **options), train_dataset=token_data(),
            callbacks=[StopAt(4)]).train()
    resumed = tuned_model(arch, method, seed=1)  # another start: only the checkpoint can make it match
    trainer = Trainer(model=resumed, args=arguments(tmp_path / "cut", **options), train_dataset=token_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))

    expected = parameters(whole)
    for name, p in parameters(resumed).items():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=0)


def test_activation_checkpointing_changes_nothing_and_bf16_runs_in_bf16(tmp_path):
    method = slimtune.PrefixTuning(length=3)
    plain = tuned_model("llama", method)
    Trainer(model=plain, args=arguments(tmp_path / "plain"), train_dataset=token_data()).train()
    recomputed = tuned_model("llama", method)
    trainer = Trainer(model=recomputed, args=arguments(tmp_path / "recomputed", gradient_checkpointing=True),
                      train_dataset=token_data())
    trainer.train()
    assert recomputed.model.is_activation_checkpointing
    expected = parameters(plain)
    for name, p in parameters(recomputed).items():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=0)

    half = tuned_model("llama", method)
    seen = []
    half.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    base = {n: t.clone() for n, t in half.model.state_dict().items()}
    Trainer(model=half, args=arguments(tmp_path / "bf16", bf16=True, activation_checkpointing=True),
            train_dataset=token_data()).train()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in half.tuning_parameters())
    assert all(torch.equal(base[n], t) for n, t in half.model.state_dict().items())
    assert all(not torch.equal(expected[n], p) for n, p in parameters(half).items())


def test_trls_sft_trainer_trains_a_tuning_and_saves_only_it(tmp_path):
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{i}" for i in torch.randint(2, VOCAB, (8,), generator=g).tolist()) for _ in range(16)]
    tuned = tuned_model("llama", slimtune.PromptTuning(length=2))
    start = parameters(tuned)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                           report_to=[], use_cpu=True, disable_tqdm=True, save_steps=3)
    trainer = trl.SFTTrainer(model=tuned, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=vocab_tokenizer())
    trainer.train()
    assert all(not torch.equal(start[n], p) for n, p in parameters(tuned).items())
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert set(saved) == {"prompt.prompt", hf.RECORD_KEY}
    # SFTConfig trains in bf16 where it can: accelerate's autocast stays on the forward until it is unwrapped.
    trained = trainer.accelerator.unwrap_model(tuned, keep_fp32_wrapper=False)
    torch.testing.assert_close(logits(slimtune.load(build("llama"), tmp_path / "checkpoint-3")), logits(trained),
                               atol=0, rtol=0)


@pytest.mark.parametrize("bank", [False, True], ids=["tuning", "bank"])
def test_accelerate_launch_with_two_processes_equals_one_at_the_same_global_batch(tmp_path, bank):
    import trainer_launch

    trainer_launch.main(str(tmp_path / "one"), 8, bank)
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
               str(here / "trainer_launch.py"), str(tmp_path / "two"), "4", *(["bank"] if bank else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=5e-5, rtol=1e-4)  # Adam steps magnify the summing order
    if bank:  # carol had no rows in any process: she is where she started
        start = trainer_launch.tuning(bank=True).state_dict()
        carol = [n for n in one if slot_key("carol") in n and not n.endswith(hf.RECORD_KEY)]
        assert carol and all(torch.equal(two[n], start[n]) for n in carol)
        assert any(not torch.equal(two[n], start[n]) for n in one if slot_key("bob") in n and not n.endswith(hf.RECORD_KEY))


def user_data(bank: slimtune.TunedBank, users: list[str], rows: int = 16, length: int = 8, seed: int = 0):
    """Token rows, each a user's (the `user` column: indices into bank.users), the users taking turns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length), generator=g).tolist()
    owners = bank.user_ids([users[i % len(users)] for i in range(rows)])
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": ids,
                                       "user": owners})


def tuned_bank(seed: int = 0) -> slimtune.TunedBank:
    torch.manual_seed(seed)
    bank = slimtune.Bank(build("llama"))
    bank.add("alice", slimtune.LoRA(rank=4))
    bank.add("bob", slimtune.PrefixTuning(length=3))
    bank.add("carol", slimtune.LoRA(rank=2))  # no rows: must not move
    return slimtune.TunedBank(bank)


def bank_parameters(tuned: slimtune.TunedBank) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tuned.state_dict().items() if not name.endswith(hf.RECORD_KEY)}


def test_a_bank_trains_many_users_under_the_trainer_and_saves_each_users_tuning_alone(tmp_path):
    import inspect

    tuned = tuned_bank()
    assert "user" in inspect.signature(tuned.forward).parameters  # the Trainer keeps the column
    base = {n: t.clone() for n, t in tuned.model.state_dict().items()}
    start = bank_parameters(tuned)
    trainer = Trainer(model=tuned, args=arguments(tmp_path, save_strategy="steps", save_steps=2),
                      train_dataset=user_data(tuned, ["alice", "bob"]))
    trainer.train()
    trainer.save_model(tmp_path / "final")
    tuned.save_pretrained(tmp_path / "each")

    after = bank_parameters(tuned)
    for name, value in after.items():
        moved = not torch.equal(start[name], value)
        assert moved == (slot_key("carol") not in name), name  # carol had no rows
    assert all(torch.equal(base[n], t) for n, t in tuned.model.state_dict().items())
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert set(saved) == set(tuned.state_dict())  # every user's tuning and record, no base weight
    ids = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rows = tuned(input_ids=ids, user=torch.tensor(tuned.user_ids(["alice", "bob", "carol"]))).logits
        for row, user in enumerate(tuned.users):
            alone = slimtune.load(build("llama"), tmp_path / "each" / user)
            torch.testing.assert_close(alone(input_ids=ids[row:row + 1]).logits[0], rows[row], atol=1e-5, rtol=0)
    with pytest.raises(slimtune.TuningError, match="each row's user"):
        tuned(input_ids=ids)


def test_a_resumed_bank_ends_where_an_uninterrupted_run_ends(tmp_path):
    options = dict(max_steps=6, save_strategy="steps", save_steps=3)
    whole = tuned_bank()
    data = user_data(whole, ["alice", "bob"])
    Trainer(model=whole, args=arguments(tmp_path / "whole", **options), train_dataset=data).train()
    cut = tuned_bank()
    Trainer(model=cut, args=arguments(tmp_path / "cut", **options), train_dataset=data, callbacks=[StopAt(4)]).train()
    resumed = tuned_bank(seed=1)  # another start: only the checkpoint can make it match
    Trainer(model=resumed, args=arguments(tmp_path / "cut", **options), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    expected = bank_parameters(whole)
    for name, p in bank_parameters(resumed).items():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=0)


def test_trls_sft_trainer_trains_a_bank_of_users_each_from_their_own_rows(tmp_path):
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    tuned = tuned_bank()
    texts = [" ".join(f"t{i}" for i in torch.randint(2, VOCAB, (8,), generator=g).tolist()) for _ in range(16)]
    data = datasets.Dataset.from_dict({"text": texts, "user": tuned.user_ids(["alice", "bob"] * 8)})
    start = bank_parameters(tuned)

    def config(out):
        return trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_steps=3, remove_unused_columns=False)

    trainer = trl.SFTTrainer(model=tuned, args=config(tmp_path), train_dataset=data, processing_class=vocab_tokenizer())
    trainer.data_collator = tuned.collator(trainer.data_collator)
    trainer.train()
    for name, value in bank_parameters(tuned).items():
        assert (not torch.equal(start[name], value)) == (slot_key("carol") not in name), name  # carol had no rows
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert set(saved) == set(tuned.state_dict())  # the users' tunings alone
    # each user's rows trained that user: the same run with bob's rows given to alice leaves bob where he started
    again = tuned_bank()
    data = datasets.Dataset.from_dict({"text": texts, "user": again.user_ids(["alice"] * 16)})
    trainer = trl.SFTTrainer(model=again, args=config(tmp_path / "b"),
                             train_dataset=data, processing_class=vocab_tokenizer())
    trainer.data_collator = again.collator(trainer.data_collator)
    trainer.train()
    for name, value in bank_parameters(again).items():
        assert (not torch.equal(start[name], value)) == (slot_key("alice") in name), name


def test_the_bank_collator_says_what_is_missing():
    tuned = tuned_bank()
    collate = tuned.collator()
    with pytest.raises(slimtune.TuningError, match="remove_unused_columns=False"):
        collate([{"input_ids": [2, 3]}])
    batch = collate([{"input_ids": [2, 3], "user": 1}, {"input_ids": [4, 5], "user": 0}])
    assert batch["user"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 2)
