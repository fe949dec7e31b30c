"""slimtune: lightweight fine-tuning of frozen language models, and many users' tunings in one batch."""

from .bank import Bank, TunedBank, TunedModel, attach, load
from .errors import ModelMismatchError, TuningError, TuningFileError, UnknownUserError
from .methods import IA3, Adapter, BitFit, DoRA, FullFineTuning, LoRA, Method, PrefixTuning, PromptTuning
from .report import ParameterReport, parameter_report
from .store import Store, StoreEntry

__version__ = "0.1.0"

__all__ = [
    "IA3", "Adapter", "Bank", "BitFit", "DoRA", "FullFineTuning", "LoRA", "Method", "ModelMismatchError", "ParameterReport",
    "PrefixTuning", "PromptTuning", "Store", "StoreEntry", "TunedBank", "TunedModel", "TuningError", "TuningFileError",
    "UnknownUserError", "attach", "load", "parameter_report",
]
