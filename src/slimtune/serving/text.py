"""A generated row's text as its tokens come: decoded a few tokens at a time, stop strings found in what is new.

Decoding the whole token list at every step costs time quadratic in the length of the generation. As
vLLM's incremental detokeniser does, a row keeps two offsets into its tokens: text is settled up to
`_read`, and each new token is decoded together with the tokens since `_prefix` (the previous read
point), so a tokenizer that spells a token differently at the start of a text (a leading space, a
byte of a character split across tokens) still gives the right new text: the difference between the
window decoded with and without the new tokens. While that difference ends in half a character
(U+FFFD), nothing is settled and the next token is waited for.

Stop strings are looked for only where they could end in the new text (its start, less the longest
stop string). What could still turn into a stop string is held back from streaming, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HALF = "\ufffd"  # what a decoder gives for the bytes of a character it has only part of


class RowText:
    """One row's tokens and text. `add` a token; `ready()` is what may be streamed; `text` what is settled."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.text = ""
        self.cut: int | None = None  # where a stop string begins, once one is found
        self._prefix = 0  # start of the window decoded with each new token
        self._read = 0  # tokens up to here are in `text`

    def add(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared (the text ends before it: `final()`)."""
        self.tokens.append(token)
        new = self._new_text()
        if not new or new.endswith(HALF):
            return False
        self._settle(new)
        return self.cut is not None

    def ready(self) -> int:
        """Characters of `text` that can be streamed: none that might still be the start of a stop string."""
        return max(0, len(self.text) - self.hold)

    def final(self) -> str:
        """The whole text once the row is done: what is settled, the tokens still unsettled (even half a
        character), cut before the first stop string."""
        if self.cut is None and self._read < len(self.tokens):
            self._settle(self._new_text())
        return self.text if self.cut is None else self.text[:self.cut]

    def _new_text(self) -> str:
        window = self.tokens[self._prefix:]
        before = self._decode(window[:self._read - self._prefix])
        after = self._decode(window)
        return after[len(before):] if len(after) > len(before) else ""

    def _settle(self, new: str) -> None:
        start = max(0, len(self.text) - self.hold)
        self.text += new
        self._prefix, self._read = self._read, len(self.tokens)
        if self.stops:
            tail = self.text[start:]
            found = [tail.find(s) for s in self.stops if s in tail]
            if found:
                self.cut = start + min(found)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
