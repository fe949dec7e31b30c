"""The trainer on the real packaged encoder and data: MiniLM with a classification head learns
Rotten Tomatoes sentiment with LoRA in a few dozen steps."""

import pytest
import torch

import slimtune
from slimtune.data import load_task
from slimtune.formats import Format, predict
from slimtune.formats import metrics as score
from slimtune.train import TrainConfig, Trainer

pytestmark = pytest.mark.integration


def test_lora_on_minilm_beats_chance_on_rotten_tomatoes(tmp_path):
    from slimtune.assets import MissingAssetError
    from slimtune.models import load_model

    try:
        task = load_task("rotten-tomatoes")
        model, tokenizer = load_model("minilm-l6", "classification", num_labels=len(task.labels))
    except MissingAssetError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    tuned = slimtune.attach(model, slimtune.LoRA(rank=8, targets=("query", "value")))
    fmt = Format.for_model(task, tokenizer, model, max_length=64)
    assert fmt.style == "head"
    users = ["default"] * len(task.train)
    config = TrainConfig(steps=60, batch_size=16, lr=5e-3, eval_every=60, eval_examples=100, seed=0)
    summary = Trainer(tuned.bank, fmt, config, tmp_path, task.train, users, task.validation, users).run()
    test = task.test[:300]
    result = score(task, test, predict(tuned.bank, fmt, test, ["default"] * len(test)))
    # 300 test examples, about half of each label: chance is 0.5 and its 3-sigma band ends near 0.59.
    assert result["accuracy"] > 0.62, (result, summary)
    assert (tmp_path / "tuning" / "slimtune.json").is_file()
