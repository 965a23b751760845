"""What `exo-rknpu node` passes to the engine exo instantiates (exo constructs engines itself, by name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exo_rknpu.engine import EngineConfig


@dataclass(frozen=True)
class NodeOptions:
    engine: EngineConfig = field(default_factory=EngineConfig)
    model_dir: Path | None = None  # model_dir/<model_id> (HF folder or .gguf) is used instead of downloading
    api_host: str = "0.0.0.0"  # exo hard-codes 0.0.0.0
    memory_mb: int | None = None  # override the memory reported to exo's partitioner
    enable_thinking: bool = False  # chat template option (Qwen3); see exo_rknpu.model.chat
    stock_engine: str | None = None  # "tinygrad" / "mlx": run exo's own engine with the launcher's fixes instead


_current = NodeOptions()


def current() -> NodeOptions:
    return _current


def set_current(options: NodeOptions) -> None:
    global _current
    _current = options
