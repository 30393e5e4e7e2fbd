"""Incremental detokenization with stop strings, one instance per completion.

Text is decoded over a sliding window of tokens (prefix/read offsets), so each new token costs
a short decode, not a decode of the whole output. Text that could still turn into a stop string,
and incomplete UTF-8 (a trailing U+FFFD), is held back until it is certain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is already in self._text
        self._text = ""  # decoded so far (may include held-back characters)
        self._emitted = 0  # characters of self._text already returned
        self.stopped = False  # a stop string was found; text ends right before it

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; returns the text that is now certain (possibly "")."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_INCOMPLETE):
            self._text += full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of output: returns whatever was held back."""
        if not self.stopped and self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            full_text = self._decode(self._ids[self._prefix :])
            if len(full_text) > len(prefix_text):
                self._text += full_text[len(prefix_text) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self._stop and not self.stopped:
            # A stop string may straddle already-emitted text: search from where it could start.
            start = max(0, self._emitted - self._hold)
            hits = [i for s in self._stop if (i := self._text.find(s, start)) != -1]
            if hits:
                self._text = self._text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self._text) if final else max(self._emitted, len(self._text) - self._hold)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
