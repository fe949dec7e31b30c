"""Module patterns (LoRA targets, Adapter sites, PEFT target_modules) come from users, and through the
server from anyone: they are matched in linear time, refused with a TuningError when RE2 cannot run
them, and resolved once into explicit module names that select exactly the same modules."""

import dataclasses
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import slimtune
from slimtune import Adapter, LoRA, TuningError, TuningFileError, modules
from slimtune.bank import read_tuning
from slimtune.methods import method_from_dict
from slimtune.methods.adapter import adapter_sites
from slimtune.methods.lora import lora_sites

from conftest import BUILDERS, batch_for, build
from helpers import perturb

TESTS = str(Path(__file__).parent)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations, seen through PEFT

# Backtracks on every split of the name after "bert": Python's re doubles its time with each character
# (1 s at 29 characters here), so on tiny BERT's first linear layer, bert.encoder.layer.0.attention.self.query
# (41 characters), it takes an hour, and about 13 hours over all of the model's linear layers.
CATASTROPHIC = r"bert([\w.]+)+!"

PEFT_PATTERNS = [
    r".*\.(q_proj|v_proj)",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
    r".*layers\.0\.mlp\.(up|gate)_proj",
    r"(.*\.)?(c_attn|query|value)",
]
# Names of architectures without a tiny model here (BART, OPT), so that every default site matches something.
OTHER_NAMES = ["model.decoder.layers.0.self_attn.out_proj", "model.decoder.layers.0.fc2", "model.encoder.layers.1.fc1"]


@functools.cache
def all_names() -> tuple[str, ...]:
    return (*(n for arch in BUILDERS for n, _ in build(arch).named_modules() if n), *OTHER_NAMES)


@pytest.mark.parametrize("pattern", [p for pair in modules.DEFAULT_ADAPTER_SITES for p in pair] + PEFT_PATTERNS)
def test_re2_selects_the_modules_python_re_selects(pattern):
    names = all_names()
    selected = modules.matcher(pattern)
    by_re2 = [n for n in names if selected(n)]
    assert by_re2 == [n for n in names if re.fullmatch(pattern, n)]
    assert by_re2, "a pattern that matches nothing proves nothing"


@pytest.mark.parametrize("targets", [["q_proj"], ["self_attn.q_proj", "mlp"], ["0.mlp.down_proj"], ["q", "v"],
                                     ["layers.0"], ["model.layers.1.self_attn.k_proj"], ["_proj"], ["proj"]])
def test_a_list_selects_names_and_dotted_suffixes_as_peft_does(targets):
    selected = modules.matcher(targets)
    for name in all_names():
        assert selected(name) == any(name == t or name.endswith("." + t) for t in targets), name


def run_isolated(script: str) -> subprocess.CompletedProcess:
    """Python's re holds the GIL while it backtracks, so only another process can be stopped in time."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {TESTS!r})\n" + script],
                          capture_output=True, text=True, timeout=30)


def test_a_catastrophic_lora_pattern_is_answered_at_once():
    result = run_isolated(f"""
import slimtune
from conftest import build
try:
    slimtune.attach(build("bert"), slimtune.LoRA(targets={CATASTROPHIC!r}))
except slimtune.TuningError as err:
    print(err)
""")
    assert result.returncode == 0, result.stderr
    assert "matches no linear layer of BertForSequenceClassification" in result.stdout


def test_a_catastrophic_adapter_pattern_from_an_upload_is_answered_at_once():
    result = run_isolated(f"""
import slimtune
from slimtune.methods import method_from_dict
from conftest import build
try:
    slimtune.attach(build("bert"), method_from_dict({{"kind": "adapter", "ffn_output": {CATASTROPHIC!r}}}))
except slimtune.TuningError as err:
    print(err)
""")
    assert result.returncode == 0, result.stderr
    assert "Adapter ffn_output" in result.stdout and "matches no linear layer" in result.stdout


UNRUNNABLE = [
    ("(", "missing \\)"),
    (r"(q_proj)\1", "invalid escape sequence"),  # a backreference
    ("(?=q)q_proj", "invalid perl operator"),  # lookahead
    (r".*(?<!k)_proj", "invalid perl operator"),  # lookbehind
]
MAKERS = {
    "LoRA targets": lambda p: LoRA(targets=p),
    "Adapter attention_output": lambda p: Adapter(attention_output=p),
    "Adapter ffn_output": lambda p: method_from_dict({"kind": "adapter", "ffn_output": p}),  # as uploaded
}


@pytest.mark.parametrize("what", list(MAKERS))
@pytest.mark.parametrize("pattern, reason", UNRUNNABLE)
def test_a_pattern_re2_cannot_run_is_refused_with_the_reason(what, pattern, reason):
    with pytest.raises(TuningError, match=f"^{what} .* is not a valid pattern: {reason}.*RE2 syntax") as caught:
        MAKERS[what](pattern)
    assert repr(pattern) in str(caught.value)


def test_an_overlong_pattern_is_refused_before_it_is_compiled():
    with pytest.raises(TuningError, match=f"is 1001 characters long; a pattern is at most {modules.MAX_PATTERN_CHARS}"):
        LoRA(targets="q" * 1001)
    assert LoRA(targets="q" * 1000).targets == "q" * 1000


@pytest.mark.parametrize("targets", [5, ["q_proj", 3], {"q_proj": 1}])
def test_patterns_of_another_type_are_refused(targets):
    with pytest.raises(TuningError, match="LoRA targets must be a regular expression .* or a list of module names"):
        LoRA(targets=targets)
    with pytest.raises(TuningError, match="targets must be a list of strings or a string or null"):  # a saved record's
        method_from_dict({"kind": "lora", "targets": targets})


def test_naming_more_modules_than_the_model_has_is_refused():
    model = build("llama")
    count = len(modules.body_modules(model))
    with pytest.raises(TuningError, match=f"LoRA targets lists {count + 1} module names, more than the {count} modules"):
        slimtune.attach(model, LoRA(targets=["q_proj"] * (count + 1)))


def peft_lora_folder(tmp_path, target_modules) -> Path:
    folder = tmp_path / "peft"
    get_peft_model(build("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": target_modules}))
    return folder


def test_peft_target_modules_string_is_matched_by_re2(tmp_path):
    folder = peft_lora_folder(tmp_path, r".*\.(q_proj|v_proj)")
    model = build("llama")
    method, _ = read_tuning(folder, model)
    assert method.targets == r".*\.(q_proj|v_proj)"  # picks exactly the layers with weights: kept as given
    assert method.resolve(model).targets == tuple(n for n, _ in modules.find_linears(model, ["q_proj", "v_proj"]))


def test_peft_target_modules_that_re2_cannot_run_is_a_tuning_error(tmp_path):
    folder = peft_lora_folder(tmp_path, "(")
    with pytest.raises(TuningError, match="PEFT target_modules '\\(' is not a valid pattern: missing \\)"):
        slimtune.load(build("llama"), folder)


def test_a_deeply_nested_peft_config_is_a_tuning_file_error(tmp_path):
    folder = peft_lora_folder(tmp_path, ["q_proj", "v_proj"])
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TuningFileError, match="nested more than"):
        slimtune.load(build("llama"), folder)


def round_trip(method: slimtune.Method) -> slimtune.Method:
    """As the server stores a method and reads it back."""
    return method_from_dict(json.loads(json.dumps(method.to_dict())))


LORA_CASES = [
    ("llama", r".*\.(q_proj|v_proj)"),
    ("t5", r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"),
    ("llama", ["k_proj", "mlp.down_proj"]),
    ("bert", ["query"]),
    *((arch, None) for arch in BUILDERS),  # each architecture's default targets
]


@pytest.mark.parametrize("arch, targets", LORA_CASES)
def test_a_resolved_lora_names_the_same_layers_and_survives_storing(arch, targets):
    model = build(arch)
    method = LoRA(rank=2, alpha=3.0, targets=targets)
    resolved = method.resolve(model)
    names = dict(model.named_modules())
    assert isinstance(resolved.targets, tuple) and all(n in names for n in resolved.targets)
    assert resolved == dataclasses.replace(method, targets=resolved.targets)  # nothing else changed
    assert lora_sites(model, resolved) == lora_sites(model, method)
    stored = round_trip(resolved)
    assert stored == resolved and lora_sites(model, stored) == lora_sites(model, method)
    assert resolved.resolve(model) == resolved


ADAPTER_CASES = [
    ("gpt2", Adapter(size=4)),
    ("llama", Adapter(size=4)),
    ("t5", Adapter(size=4)),
    ("bert", Adapter(size=4, attention_output=r".*\.attention\.output\.dense")),
    ("llama", Adapter(size=4, ffn_output=r".*layers\.1\.mlp\.down_proj", attention_output=["o_proj"])),
    ("gpt2", Adapter(size=4, placement="pfeiffer")),
    ("llama", Adapter(size=4, placement="pfeiffer", attention_output=r".*\.o_proj", ffn_output=r".*\.down_proj")),
]


@pytest.mark.parametrize("arch, method", ADAPTER_CASES)
def test_a_resolved_adapter_names_the_same_layers_and_survives_storing(arch, method):
    model = build(arch)
    resolved = method.resolve(model)
    names = dict(model.named_modules())
    assert isinstance(resolved.ffn_output, tuple) and all(n in names for n in resolved.ffn_output)
    if method.placement == "houlsby":
        assert isinstance(resolved.attention_output, tuple) and all(n in names for n in resolved.attention_output)
    else:  # unused: no pattern is kept
        assert resolved.attention_output is None
    assert adapter_sites(model, resolved) == adapter_sites(model, method)
    stored = round_trip(resolved)
    assert stored == resolved and adapter_sites(model, stored) == adapter_sites(model, method)
    assert resolved.resolve(model) == resolved


def test_methods_without_patterns_resolve_to_themselves():
    method = slimtune.PrefixTuning(length=3)
    assert method.resolve(build("llama")) is method


class Nested(nn.Module):
    """`block.0` and `encoder.block.0`: the first name is also a suffix of the second."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList([nn.Linear(4, 4)])
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([nn.Linear(4, 4)])


def test_a_selection_no_list_of_names_can_say_is_refused_not_widened():
    model = Nested()
    with pytest.raises(TuningError, match="the name 'block.0' also selects 'encoder.block.0'"):
        LoRA(targets=r"block\.0").resolve(model)
    assert LoRA(targets=r".*block\.0").resolve(model).targets == ("block.0", "encoder.block.0")


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch_for("llama", batch=2)).logits


def test_a_regex_targeted_lora_saved_then_loaded_resolved_gives_the_same_logits(tmp_path):
    pattern = r".*layers\.[01]\.self_attn\.(q|v|o)_proj"
    tuned = slimtune.attach(build("llama"), LoRA(rank=4, targets=pattern))
    perturb(tuned.tuning_parameters(), scale=0.3)
    expected = logits(tuned)
    path = tuned.save(tmp_path / "tuning")

    model = build("llama")
    base = logits(model)
    method, state = read_tuning(path, model)
    assert method.targets == pattern
    stored = round_trip(method.resolve(model))  # what the server keeps
    assert len(stored.targets) == 6 and not isinstance(stored.targets, str)
    bank = slimtune.Bank(model)
    bank.add("user", (stored, state))
    loaded = logits(slimtune.TunedModel(bank, "user"))
    assert torch.allclose(loaded, expected, atol=1e-6)
    assert not torch.allclose(loaded, base, atol=1e-3)  # the tuning is not a no-op
