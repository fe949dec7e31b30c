"""Parameter accounting: what a tuning trains, its share of the model, and what it costs to store."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import quantize, storage


@dataclass(frozen=True)
class ParameterReport:
    method: str
    trainable: int  # parameters that receive gradient in training
    total: int  # every parameter: the frozen model plus the tuning
    bytes_stored: int  # size of the saved tuning (tensors and record)

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable / self.total

    def __str__(self) -> str:
        return (
            f"{self.method}: {self.trainable:,} trainable of {self.total:,} parameters "
            f"({100 * self.share:.4f}%), {self.bytes_stored:,} bytes stored"
        )


def parameter_report(tuned: nn.Module) -> ParameterReport:
    """Count a `TunedModel`'s parameters and the bytes its saved tuning takes."""
    params = {id(p): p for p in tuned.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = quantize.parameter_count(tuned)  # a quantised base's weights counted as the weights they stand for
    record, tensors = tuned.saved_form()
    size = sum(len(part) for part in storage.serialise(record, tensors))
    return ParameterReport(tuned.method.kind, trainable, total, size)
