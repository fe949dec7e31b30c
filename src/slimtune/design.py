"""Prompt design: the no-training baseline. A hand-written text prompt with the input slotted in,
zero-shot or with k in-context examples from the training split, scored through the same
verbalizer as the tuned methods (classification) or generated from (generation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .bank import Bank
from .data import Task
from .formats import Format
from .methods import PrefixTuning
from .modules import is_causal_decoder

# Hand-written instructions per built-in task; the tuned methods' template follows them.
INSTRUCTIONS = {
    "rotten-tomatoes": "Is the sentiment of this movie review positive or negative?",
    "amazon-food": "Is the sentiment of this food review positive or negative?",
    "bbc-topic": "Is this news article about business, entertainment, politics, sports or tech?",
    "snli": "Does the premise imply the hypothesis? Answer yes, maybe or no.",
    "bbc-headline": "Write a short headline for this news article.",
    "bbc-headline-ood": "Write a short headline for this news article.",
}


@dataclass(frozen=True)
class PromptDesign:
    """A hand-written prompt: `template` with {text} (and {text_pair}), and `examples` demonstrations."""

    template: str | None = None
    examples: int = 0
    seed: int = 0
    kind = "design"

    def parts(self, task: Task, tokenizer) -> tuple[str, str]:
        """(head, cue): the instruction and demonstrations, the same for every input, and the
        template of the input itself."""
        style = "generation" if task.kind == "generation" else "verbalizer"
        cue = self.template or Format(task, tokenizer, style).template  # "Review: {text}\nSentiment:"
        instruction = "" if self.template else INSTRUCTIONS.get(task.name, "")
        demos = ""
        if self.examples:
            shots = []
            for e in random.Random(self.seed).sample(task.train, min(self.examples, len(task.train))):
                answer = task.label_words[e.label] if task.kind == "classification" else e.target
                shots.append(cue.format(text=_short(e.text), text_pair=e.text_pair or "") + f" {answer}")
            demos = "\n\n".join(shots) + "\n\n"
        return (instruction + "\n" if instruction else "") + demos, cue

    def format(self, task: Task, tokenizer, max_length: int = 128, max_new_tokens: int = 24) -> Format:
        """A Format whose prompt is the instruction, the demonstrations, then the input."""
        head, cue = self.parts(task, tokenizer)
        style = "generation" if task.kind == "generation" else "verbalizer"
        # Instructions and demonstrations take room: the prompt gets that much more than the bare input's budget.
        room = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        escaped = head.replace("{", "{{").replace("}", "}}")
        return Format(task, tokenizer, style, max_length=max_length + room, max_new_tokens=max_new_tokens,
                      template=escaped + cue)

    def prepare(self, model, tokenizer, task: Task, max_length: int = 128, max_new_tokens: int = 24):
        """(bank, user, format) to predict with. On a decoder the shared head (instruction and
        demonstrations) is computed once, as a prefix of its own keys and values (prefix tuning's
        `init="text"`, exact), so each input costs only its own tokens; elsewhere the head is
        written into every prompt."""
        head, cue = self.parts(task, tokenizer)
        bank = Bank(model, tokenizer)
        if head and is_causal_decoder(model):
            ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            bank.add("design", PrefixTuning(length=len(ids), reparam=None, init="text", text=head))
            style = "generation" if task.kind == "generation" else "verbalizer"
            return bank, "design", Format(task, tokenizer, style, max_length=max_length, max_new_tokens=max_new_tokens,
                                          template=cue)
        return bank, None, self.format(task, tokenizer, max_length, max_new_tokens)

    def describe(self) -> str:
        return "prompt design" + (f" ({self.examples}-shot)" if self.examples else " (0-shot)")


def _short(text: str, words: int = 60) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")
