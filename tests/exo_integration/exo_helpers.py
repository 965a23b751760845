"""Tests of the exo adapter. Those that need legacy exo use the `exo` fixture / marker and skip without it."""

from __future__ import annotations

import pytest

from exo_rknpu.exo import exo_importable

EXO_OK, EXO_WHY = exo_importable()
needs_exo = pytest.mark.skipif(not EXO_OK, reason=EXO_WHY or "legacy exo is not importable")
# `exo-rknpu node` options of a ring whose answers a test asserts exactly: float32 weights give the model's own
# answer on every CPU (compact weights with int8 activations round differently per instruction set)
FP32 = ["--weights", "fp32"]


def fake_shard_downloader(fetch):
    """An exo ShardDownloader (imports exo) whose ensure_shard records (shard, engine class name) in `.calls` and
    returns fetch(shard): a stand-in for exo's Hugging Face downloader."""
    from exo.download.shard_download import ShardDownloader

    class FakeShardDownloader(ShardDownloader):
        def __init__(self) -> None:
            self.calls: list = []

        async def ensure_shard(self, shard, inference_engine_name):
            self.calls.append((shard, inference_engine_name))
            return fetch(shard)

        @property
        def on_progress(self):
            raise NotImplementedError

        async def get_shard_download_status(self, inference_engine_name):
            if False:
                yield

    return FakeShardDownloader()
