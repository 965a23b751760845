"""The exo adapter: the only package of exo-rknpu that imports legacy exo (commit 5f18faec).

Modules that import exo (or its aiohttp) at import time: `inference_engine`, `launcher` and `ring`. The others
(`shards`, `cards`, `capabilities`, `api_tokenizer`, `chat_request`, `options`, `patching`) are exo-free so they can
be tested without exo.
"""

EXO_COMMIT = "5f18faec1758ffa79d6db1d463b4b8bca211a0a8"
ENGINE_NAME = "rknpu"  # what `--inference-engine` is set to
ENGINE_CLASS = "RKNPUInferenceEngine"  # the key of exo's model_cards[...]["repo"]


def exo_importable() -> tuple[bool, str]:
    """(True, "") if legacy exo can be imported here, else (False, why)."""
    try:
        import exo.inference.inference_engine  # noqa: F401
        import exo.inference.shard  # noqa: F401
    except Exception as e:  # ImportError, or a dependency failing at import
        return False, f"legacy exo is not importable ({type(e).__name__}: {e}); see docs/exo.md to install it"
    return True, ""
