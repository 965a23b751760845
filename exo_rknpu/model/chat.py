"""Chat prompts: the template options exo-rknpu passes to a model's chat template, and what it does with Qwen3's
thinking text.

Qwen3's template takes `enable_thinking`. Left undefined (transformers' default) the model is prompted to think
first: it writes `<think>...</think>` and then the answer. exo-rknpu renders with **enable_thinking=False by
default**: the template then ends the prompt with an empty `<think>\\n\\n</think>\\n\\n` block, which is Qwen's own
switch for answering directly. Why: legacy exo's API has no separate reasoning field, so thinking text would be
streamed to clients as part of the answer; exo ignores a request's max_tokens, so a small model's long thinking
ties up a 6-TOPS NPU ring; and disabling it in the template (rather than stripping the text afterwards) means the
thinking tokens are never computed. `--thinking` (generate, node) turns it back on; then the `<think>` block is
generated and passed through unchanged, exactly as transformers would decode it.
Templates that do not use `enable_thinking` (Qwen2.5, Llama 3.2, SmolLM2) render identically either way.
"""

from __future__ import annotations

from typing import Any

from exo_rknpu.model.tokenizer import Tokenizer

ENABLE_THINKING_DEFAULT = False


def chat_template_options(enable_thinking: bool | None = None) -> dict[str, Any]:
    """The variables exo-rknpu passes to every chat template (None = the node's default)."""
    return {"enable_thinking": ENABLE_THINKING_DEFAULT if enable_thinking is None else bool(enable_thinking)}


def render_chat(tok: Tokenizer, messages: list[dict[str, Any]], *, enable_thinking: bool | None = None,
                add_generation_prompt: bool = True) -> str:
    """`messages` rendered with the model's template and exo-rknpu's template options (as transformers'
    apply_chat_template(..., tokenize=False, enable_thinking=...) renders them)."""
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                   **chat_template_options(enable_thinking))
