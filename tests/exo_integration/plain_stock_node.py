"""A plain stock exo node for the tests: `python plain_stock_node.py EXO_ARGS...` runs legacy exo unpatched, except
that its API binds 127.0.0.1 instead of exo's hard-coded 0.0.0.0 (a test machine's API must not face the network).
Nothing of exo-rknpu is imported."""

import sys

import exo.api.chatgpt_api as api

_run = api.ChatGPTAPI.run


async def _run_on_loopback(self, host: str = "0.0.0.0", port: int = 52415) -> None:
    await _run(self, host="127.0.0.1", port=port)


api.ChatGPTAPI.run = _run_on_loopback
sys.argv = ["exo", *sys.argv[1:]]
import exo.main  # noqa: E402  (parses sys.argv and builds the node at import)

exo.main.run()
