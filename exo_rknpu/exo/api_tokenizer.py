"""Our Tokenizer dressed as the Hugging Face tokenizer exo's ChatGPT API expects (no transformers, offline)."""

from __future__ import annotations

import logging
from typing import Any

from exo_rknpu.model.chat import chat_template_options, render_chat
from exo_rknpu.model.tokenizer import Tokenizer, encode_prompt

# encode_prompt lives in model/tokenizer.py (shared with the CLI)
__all__ = ["ExoApiTokenizer", "TemplateOptionsTokenizer", "encode_prompt"]

log = logging.getLogger(__name__)


class ExoApiTokenizer:
    """What chatgpt_api.py uses: apply_chat_template(conversation=..., tokenize=False, add_generation_prompt=True),
    encode(prompt), decode(tokens), eos_token_id."""

    def __init__(self, tokenizer: Tokenizer, enable_thinking: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.eos_token_ids = tokenizer.eos_token_ids  # every stop id (finish_reason "stop" vs "length")
        self.vocab_size = tokenizer.vocab_size
        self.enable_thinking = enable_thinking  # None: exo_rknpu.model.chat's default

    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True, tools: Any = None,
                            enable_thinking: bool | None = None, **_: Any) -> Any:
        if tools:
            log.warning("tools were passed with the request; exo-rknpu's chat templates are rendered without them")
        messages = [_text_message(m) for m in conversation]
        thinking = self.enable_thinking if enable_thinking is None else enable_thinking
        text = render_chat(self.tokenizer, messages, enable_thinking=thinking, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode(self, text: str, **_: Any) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def decode(self, tokens: Any, skip_special_tokens: bool = True, **_: Any) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=skip_special_tokens)


def _text_message(m: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content parts ([{"type": "text", "text": ...}]) -> one string; other parts are dropped."""
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return {**m, "content": content}


class TemplateOptionsTokenizer:
    """exo's own (transformers) tokenizer for a downloaded repo, with exo-rknpu's chat template options
    (enable_thinking) as defaults of apply_chat_template; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any, enable_thinking: bool | None = None) -> None:
        # Not `_tokenizer`: that is a transformers tokenizer's own attribute (exo's API probes for it).
        self._wrapped = tokenizer
        self._options = chat_template_options(enable_thinking)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped.apply_chat_template(*args, **{**self._options, **kwargs})

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """As exo-rknpu's tokenizer decodes: special tokens (the end-of-turn token that finished the answer) are not
        part of the text, unless asked for."""
        return self._wrapped.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)
