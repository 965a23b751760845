"""What `exo-rknpu node` passes to the engine exo instantiates (exo constructs engines itself, by name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exo_rknpu.engine import EngineConfig


API_KEY_ENV = "EXO_RKNPU_API_KEY"  # the API key, when --api-key is not given


@dataclass(frozen=True)
class NodeOptions:
    engine: EngineConfig = field(default_factory=EngineConfig)
    model_dir: Path | None = None  # model_dir/<model_id> (HF folder or .gguf) is used instead of downloading
    api_host: str = "127.0.0.1"  # exo hard-codes 0.0.0.0; a LAN needs --api-host
    api_key: str | None = None  # required on every API route when set (--api-key / EXO_RKNPU_API_KEY)
    cors_origins: tuple[str, ...] = ()  # web origins allowed to call the API (none: only the API's own pages)
    allow_node_control: bool = False  # /quit, model deletion, /download, image and animation endpoints
    memory_mb: int | None = None  # override the memory reported to exo's partitioner
    enable_thinking: bool = False  # chat template option (Qwen3); see exo_rknpu.model.chat
    stock_engine: str | None = None  # "tinygrad" / "mlx": run exo's own engine with the launcher's fixes instead


_current = NodeOptions()


def current() -> NodeOptions:
    return _current


def set_current(options: NodeOptions) -> None:
    global _current
    _current = options
