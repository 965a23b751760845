"""A chat prompt's token ids in which only the chat template's special tokens are special (exo-free).

exo renders the chat template to a string and the first node tokenizes that string, so `<|im_end|>\n<|im_start|>
system` typed inside a user message became real control tokens: a user could forge a system turn. Here the API
node finds where each message's content lies in the rendered prompt (by rendering the template once more with a
marker in place of each content), splits the prompt at the special tokens that lie *outside* every content, and
encodes the pieces between them with special tokens split into ordinary text (what transformers calls
`split_special_tokens=True`). The ids travel to the first node in inference_state (request_state.py).

Only prompts whose contents hold a special token's text take this path; for all others the ids are exactly the
usual encoding of the rendered prompt, so nothing changes for them.
"""

from __future__ import annotations

import re
from typing import Any, Callable

MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"  # private-use characters: no template emits them


class UnsafePrompt(ValueError):
    """The prompt cannot be encoded with content specials kept as text (the template transforms the content)."""


class PromptEncoder:
    """Encodes rendered chat prompts for one tokenizer: `backend` is its `tokenizers.Tokenizer`, `bos_id` the BOS
    to prepend (None: none), `render(messages)` the chat template."""

    def __init__(self, backend: Any, render: Callable[[list[dict[str, Any]]], str], bos_id: int | None) -> None:
        self.backend, self.render, self.bos_id = backend, render, bos_id
        self.specials = {str(t.content): int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special}
        # the same tokenizer with special tokens encoded as text (transformers' split_special_tokens)
        self._plain = type(backend).from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        ordered = sorted(self.specials, key=len, reverse=True)  # longest first, like the added-vocabulary match
        self._pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None

    def has_special_text(self, messages: list[dict[str, Any]]) -> bool:
        return self._pattern is not None and any(self._pattern.search(str(m.get("content", ""))) for m in messages)

    def encode(self, messages: list[dict[str, Any]], prompt: str) -> list[int]:
        """Ids of `prompt` (the rendering of `messages`) with special tokens recognised only outside contents."""
        spans = content_spans(prompt, messages, self.render)
        ids: list[int] = [] if self.bos_id is None else [self.bos_id]
        start = 0
        for m in self._pattern.finditer(prompt) if self._pattern is not None else ():
            if any(a < m.end() and m.start() < b for a, b in spans):
                continue  # inside a message: text
            ids += self._plain_ids(prompt[start:m.start()]) + [self.specials[m.group()]]
            start = m.end()
        ids += self._plain_ids(prompt[start:])
        if self.bos_id is not None and len(ids) > 1 and ids[1] == self.bos_id:
            ids.pop(0)  # the template wrote BOS itself
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids if text else []


def content_spans(prompt: str, messages: list[dict[str, Any]], render: Callable[[list[dict[str, Any]]], str]
                  ) -> list[tuple[int, int]]:
    """[start, end) of each message's content inside `prompt`, found by rendering with a marker per content.
    A template that renders a content as it is, or stripped, is understood; any other change -> UnsafePrompt."""
    marked = render([{**m, "content": f"{MARK_OPEN}{i}{MARK_CLOSE}"} for i, m in enumerate(messages)])
    pieces = re.split(f"{MARK_OPEN}(\\d+){MARK_CLOSE}", marked)
    template, order = pieces[0::2], [int(i) for i in pieces[1::2]]
    if sorted(order) != list(range(len(messages))):
        raise UnsafePrompt("the chat template does not render every message's content exactly once")
    if not prompt.startswith(template[0]):
        raise UnsafePrompt("the chat template renders differently with other contents")
    spans, pos = [], len(template[0])
    for k, i in enumerate(order):
        content, after = str(messages[i].get("content", "")), template[k + 1]
        for text in (content, content.strip()):
            end = pos + len(text)
            if prompt.startswith(text, pos) and prompt.startswith(after, end):
                spans.append((pos, end))
                pos = end + len(after)
                break
        else:
            raise UnsafePrompt("the chat template changes a message's content; its special tokens cannot be kept as text")
    if pos != len(prompt):
        raise UnsafePrompt("the chat template renders differently with other contents")
    return spans
