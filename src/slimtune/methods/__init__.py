"""The tuning methods, one file each, and the registry that maps a saved `kind` to its config."""

from ..errors import TuningFileError
from .adapter import Adapter
from .base import Method
from .bitfit import BitFit
from .full import FullFineTuning
from .lora import LoRA
from .prefix import PrefixTuning
from .prompt import PromptTuning

METHODS: dict[str, type[Method]] = {
    m.kind: m for m in (PromptTuning, PrefixTuning, Adapter, LoRA, BitFit, FullFineTuning)
}


def method_from_dict(data: dict) -> Method:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in METHODS:
        raise TuningFileError(f"unknown tuning method {kind!r}; expected one of {sorted(METHODS)}")
    try:
        return METHODS[kind](**data)
    except TypeError as err:
        raise TuningFileError(f"bad settings for method {kind!r}: {err}") from err


__all__ = ["METHODS", "Adapter", "BitFit", "FullFineTuning", "LoRA", "Method", "PrefixTuning", "PromptTuning", "method_from_dict"]
