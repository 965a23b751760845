"""Our Tokenizer dressed as the Hugging Face tokenizer exo's ChatGPT API expects (no transformers, offline)."""

from __future__ import annotations

import logging
from typing import Any

from exo_rknpu.model.tokenizer import Tokenizer, encode_prompt

__all__ = ["ExoApiTokenizer", "encode_prompt"]  # encode_prompt lives in model/tokenizer.py (shared with the CLI)

log = logging.getLogger(__name__)


class ExoApiTokenizer:
    """What chatgpt_api.py uses: apply_chat_template(conversation=..., tokenize=False, add_generation_prompt=True),
    encode(prompt), decode(tokens), eos_token_id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.eos_token_ids = tokenizer.eos_token_ids  # every stop id (finish_reason "stop" vs "length")
        self.vocab_size = tokenizer.vocab_size

    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True, tools: Any = None, **_: Any) -> Any:
        if tools:
            log.warning("tools were passed with the request; exo-rknpu's chat templates are rendered without them")
        messages = [_text_message(m) for m in conversation]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
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
