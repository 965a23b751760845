"""The models an exo-rknpu node serves, as exo model cards, and where each one's files come from.

* `smollm2-135m`: the bundled GGUF (resolved locally by exo_rknpu.model.zoo, no Hugging Face access). Its
  "repo" in exo's card is the marker `exo-rknpu/smollm2-135m`; the launcher teaches exo's API to build the
  tokenizer for it locally.
* `llama-3.2-1b` / `llama-3.2-3b`: the same Hugging Face repos exo's tinygrad engine uses, fetched through
  exo's shard downloader (only the shard's layer files when the repo has a safetensors index).
* `qwen-2.5-0.5b` / `-1.5b` / `-3b`: the ids legacy exo gives these models (its cards point MLX at 4-bit
  mlx-community repos); our repo is Qwen's own Instruct repo. Legacy exo's `qwen-2.5-0.5b` card says 28 layers,
  but Qwen2.5-0.5B has 24 (config.json); the launcher corrects exo's card to 24 in the node's process.
* `qwen-3-0.6b` / `-1.7b` / `-4b`: legacy exo has no Qwen3 cards; the ids follow its `qwen-2.5-*` naming.

`--model-dir DIR` overrides any of them: DIR/<model_id> (an HF folder or a .gguf) is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exo_rknpu.errors import UnknownModelError


@dataclass(frozen=True)
class ExoCard:
    model_id: str
    n_layers: int
    repo: str  # the value in exo's model_cards[model_id]["repo"]["RKNPUInferenceEngine"]
    pretty_name: str
    zoo_alias: str | None = None  # resolved by exo_rknpu.model.zoo instead of exo's downloader
    exo_wrong_layers: int | None = None  # legacy exo's card has this (wrong) layer count; the launcher corrects it
    in_stock_exo: bool = True  # legacy exo has a card with this id (a plain stock node without one cannot serve it)


CARDS: dict[str, ExoCard] = {
    "smollm2-135m": ExoCard("smollm2-135m", 30, "exo-rknpu/smollm2-135m", "SmolLM2 135M Instruct (exo-rknpu)",
                            zoo_alias="smollm2-135m", in_stock_exo=False),
    "llama-3.2-1b": ExoCard("llama-3.2-1b", 16, "unsloth/Llama-3.2-1B-Instruct", "Llama 3.2 1B"),
    "llama-3.2-3b": ExoCard("llama-3.2-3b", 28, "unsloth/Llama-3.2-3B-Instruct", "Llama 3.2 3B"),
    "qwen-2.5-0.5b": ExoCard("qwen-2.5-0.5b", 24, "Qwen/Qwen2.5-0.5B-Instruct", "Qwen 2.5 0.5B", exo_wrong_layers=28),
    "qwen-2.5-1.5b": ExoCard("qwen-2.5-1.5b", 28, "Qwen/Qwen2.5-1.5B-Instruct", "Qwen 2.5 1.5B"),
    "qwen-2.5-3b": ExoCard("qwen-2.5-3b", 36, "Qwen/Qwen2.5-3B-Instruct", "Qwen 2.5 3B"),
    "qwen-3-0.6b": ExoCard("qwen-3-0.6b", 28, "Qwen/Qwen3-0.6B", "Qwen 3 0.6B", in_stock_exo=False),
    "qwen-3-1.7b": ExoCard("qwen-3-1.7b", 28, "Qwen/Qwen3-1.7B", "Qwen 3 1.7B", in_stock_exo=False),
    "qwen-3-4b": ExoCard("qwen-3-4b", 36, "Qwen/Qwen3-4B", "Qwen 3 4B", in_stock_exo=False),
}


def get_card(model_id: str) -> ExoCard:
    card = CARDS.get(model_id)
    if card is None:
        raise UnknownModelError(
            f"model {model_id!r} has no exo-rknpu card; this node serves: {', '.join(sorted(CARDS))}"
        )
    return card


def plain_stock_card_missing(model_id: str) -> bool:
    """True if legacy exo, unpatched, has no card for `model_id`: no plain stock node can serve any layer of it."""
    card = CARDS.get(model_id)
    return card is not None and not card.in_stock_exo


def card_for_repo(repo: str) -> ExoCard | None:
    return next((c for c in CARDS.values() if c.repo == repo), None)


def local_override(card: ExoCard, model_dir: Path | None) -> Path | None:
    """model_dir/<model_id> (folder) or model_dir/<model_id>.gguf, if present."""
    if model_dir is None:
        return None
    for cand in (Path(model_dir) / card.model_id, Path(model_dir) / f"{card.model_id}.gguf"):
        if cand.exists():
            return cand
    return None
