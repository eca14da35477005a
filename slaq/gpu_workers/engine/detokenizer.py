"""Incremental detokenization with stop strings.

Text comes out as deltas: a token whose bytes end inside a multi-byte character produces no
text until the character is complete. Stop strings are matched on the decoded text; text that
might be the start of a stop string is held back until it is known not to be, so a stop string
never reaches the client, and the text before it does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Prompt tokens decoded in front of the output, so tokenizers that drop a leading space at
# the start of a decode (SentencePiece) still render the first output token's space.
PREFIX_CONTEXT_TOKENS = 4
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas; detects its stop strings."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer decodes without the Python wrapper's per-call overhead.
        self._decode_fn = backend.decode if backend is not None else tokenizer.decode
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PREFIX_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._held = ""  # decoded text not yet returned: it may begin a stop string
        self.stopped = False  # a stop string was found; nothing more is returned
        self.text = ""  # everything returned so far

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=self._skip_special)

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the text that can be released now (maybe empty)."""
        self._ids.extend(token_ids)
        if self.stopped:
            return ""
        return self._release(self._held + self._decode_new())

    def flush(self) -> str:
        """At a finish other than a stop string: release the held-back text."""
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        self.text += out
        return out

    def _decode_new(self) -> str:
        before = self._decode(self._ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._ids[self._prefix_offset:])
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of it.
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before):]

    def _release(self, pending: str) -> str:
        if not self._stop:  # most requests: nothing to match or hold back
            self.text += pending
            return pending
        hit = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            out, self._held = pending[:hit], ""
        else:
            keep = _longest_stop_prefix_suffix(pending, self._stop)
            out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
