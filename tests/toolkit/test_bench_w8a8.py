"""`bench --backend rknn-sim --backend-dtype w8a8` runs our contender with compile's w8a8 recipe bound to the model
(it once failed on an import of a removed calibration class, and nothing ran it)."""

from __future__ import annotations

import json

from exo_rknpu.cli.main import main
from toolkit_common import NEEDS_TOOLKIT

pytestmark = NEEDS_TOOLKIT


def test_bench_runs_the_simulator_under_w8a8(capsys, tiny):
    argv = ["bench", "--model", str(tiny), "--backend", "rknn-sim", "--backend-dtype", "w8a8", "--max-context", "256",
            "--prompt-tokens", "4", "--gen-tokens", "2", "--repeat", "1", "--threads", "1", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["backend"] == "rknn-sim" and r["complete"] is True and r["n_runs"] == 1
    assert len(r["token_ids"]) == 2 + 1  # the prefill's token, then --gen-tokens steps
    assert all(0 <= t < json.loads((tiny / "config.json").read_text())["vocab_size"] for t in r["token_ids"])
