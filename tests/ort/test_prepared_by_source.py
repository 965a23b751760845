"""A start finds the slices prepared earlier from the same source files by those files (backends/prepared.py's
index), so it never builds their compact weights; a source file changed in place is not served from the index, and
a damaged entry is rebuilt and filed again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.backends.prepared import WEIGHTS_FILE
from exo_rknpu.model import gguf as gguf_reader
from exo_rknpu.model import hf as hf_reader
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import ShardSource
from exo_rknpu.model.quant import DEFAULT_WEIGHTS
from exo_rknpu.model.weights import LeftOut
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.runtime.shard import ShardRunner, left_out
from exo_rknpu.slices.spec import SliceSpec
from helpers import SMALL_BUCKETS
from tiny_models import make_tiny_gguf, make_tiny_hf

PROMPT = np.array([[5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 31]])
N_LAYERS = 3


class Builds:
    """Counts what the loaders build: GGUF matrices in a compact form, HF matrices quantized, and what every
    ShardSource.load hands back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.matrices = 0
        self.loaded: list = []
        linear, compact, load = gguf_reader.GGUFFile.linear, hf_reader.compact, ShardSource.load

        def count_linear(g, name, mode):
            self.matrices += 1
            return linear(g, name, mode)

        def count_compact(*a, **kw):
            self.matrices += 1
            return compact(*a, **kw)

        def record_load(source, *a, **kw):
            shard = load(source, *a, **kw)
            self.loaded.append((len(shard.layers), shard.lm_head is not None))
            return shard

        monkeypatch.setattr(gguf_reader.GGUFFile, "linear", count_linear)
        monkeypatch.setattr(hf_reader, "compact", count_compact)
        monkeypatch.setattr(ShardSource, "load", record_load)

    def reset(self) -> None:
        self.matrices, self.loaded = 0, []


def _logits(path: Path, root: Path, weights: str = DEFAULT_WEIGHTS) -> np.ndarray:
    """Open the whole model as every command does (open_plan, 2 layers per slice) and run PROMPT."""
    shard = open_shard(resolve_model(str(path)), LayerRange.full(N_LAYERS), "onnx", SMALL_BUCKETS, layers_per_slice=2,
                       backend_options={"cache_dir": root, "threads": 1}, weights=weights)
    try:
        return shard.forward("a", PROMPT, logits="all")
    finally:
        shard.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("by-source")
    hf = make_tiny_hf(d / "hf", n_layers=N_LAYERS, seed=5)
    return {"hf": hf, "Q4_0": make_tiny_gguf(d / "q4_0.gguf", hf, qtype="Q4_0"),
            "Q8_0": make_tiny_gguf(d / "q8_0.gguf", hf, qtype="Q8_0")}


@pytest.mark.parametrize("weights", sorted({"auto", DEFAULT_WEIGHTS}))
@pytest.mark.parametrize("model", ["Q4_0", "Q8_0", "hf"])
def test_a_warm_start_builds_no_weights_of_the_slices_it_finds_and_gives_the_cold_logits(models, model, weights,
                                                                                          tmp_path, monkeypatch):
    builds, root = Builds(monkeypatch), tmp_path / "prepared"
    cold = _logits(models[model], root, weights)
    assert builds.matrices > 0 and builds.loaded == [(N_LAYERS, True)]
    builds.reset()
    warm = _logits(models[model], root, weights)
    assert builds.matrices == 0  # no layer matrix and no head was read into a compact form
    assert builds.loaded == [(0, False)]  # the embedding alone was loaded (it stays mapped in the file)
    assert np.array_equal(warm, cold)


# What only a cold start needs (reading tensors, a tokenizer, package metadata, sampling at a temperature):
# ~15 MiB resident together, a tenth of smollm2's whole peak, so a warm greedy start must not import them.
COLD_ONLY = ("gguf", "sentencepiece", "yaml", "safetensors", "tokenizers", "importlib.metadata", "numpy.random")
WARM_RUN = """
import json, sys
sys.path.insert(0, sys.argv[3])
from helpers import SMALL_BUCKETS
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.zoo import resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.runtime.sampling import Sampler
shard = open_shard(resolve_model(sys.argv[1]), LayerRange.full(3), "onnx", SMALL_BUCKETS, layers_per_slice=2,
                   backend_options={"cache_dir": sys.argv[2], "threads": 1})
ids = list(LocalRing([shard]).generate("a", [5, 17, 42, 7], 4, Sampler(), frozenset()))
print(json.dumps({"ids": ids, "imported": [m for m in sys.argv[4].split(",") if m in sys.modules]}))
"""


@pytest.mark.parametrize("model", ["Q4_0", "Q8_0"])
def test_a_warm_greedy_start_imports_nothing_only_a_cold_start_needs(models, model, tmp_path):
    root = tmp_path / "prepared"
    _logits(models[model], root)  # cold: prepares and files the slices
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", WARM_RUN, str(models[model]), str(root),
                           str(Path(__file__).resolve().parents[1]), ",".join(COLD_ONLY)],
                          capture_output=True, text=True, env=env, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["ids"]) == 4 and out["imported"] == []


def test_a_source_file_changed_in_place_is_not_served_from_the_index(models, tmp_path, monkeypatch):
    """Same path, same size, same tensor table, modification time set back: only the content differs."""
    path, root = tmp_path / "model.gguf", tmp_path / "prepared"
    make_tiny_gguf(path, models["hf"], qtype="Q4_0")
    old = _logits(path, root)
    other = make_tiny_gguf(tmp_path / "other.gguf", make_tiny_hf(tmp_path / "hf2", n_layers=N_LAYERS, seed=6), qtype="Q4_0")
    st, data = path.stat(), other.read_bytes()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:  # rewritten in place: same inode
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    builds = Builds(monkeypatch)
    new = _logits(path, root)
    assert builds.loaded == [(N_LAYERS, True)]  # nothing was found by the old stamp
    assert np.array_equal(new, _logits(other, tmp_path / "fresh"))  # what a cold start on the new content gives
    assert not np.allclose(new, old)


def test_a_damaged_entry_is_rebuilt_and_found_by_its_sources_again(models, tmp_path, monkeypatch):
    root = tmp_path / "prepared"
    expected = _logits(models["Q4_0"], root)
    entries = sorted(p for p in root.glob("??/*") if p.is_dir())
    assert len(entries) == 3  # layers 0-1, layer 2, head
    weights = entries[0] / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    builds = Builds(monkeypatch)
    assert np.array_equal(_logits(models["Q4_0"], root), expected)
    assert builds.matrices > 0 and builds.loaded != [(0, False)]  # the damaged slice's weights were built again
    assert (entries[0] / WEIGHTS_FILE).read_bytes() != bytes(data)
    builds.reset()
    assert np.array_equal(_logits(models["Q4_0"], root), expected)
    assert builds.matrices == 0 and builds.loaded == [(0, False)]


def test_weights_handed_over_by_the_caller_are_never_filed_under_a_source(models, tmp_path):
    """Only weights a ShardSource loaded carry a stamp: a caller's ShardWeights (which it may have changed) is
    prepared as before and files nothing the next start could find by the source."""
    from exo_rknpu.backends.ort import OrtBackend
    from exo_rknpu.model.loader import load_shard

    root = tmp_path / "prepared"
    shard = load_shard(resolve_model(str(models["Q4_0"])), LayerRange.full(N_LAYERS))
    ShardRunner(shard, OrtBackend(cache_dir=root), SMALL_BUCKETS).close()
    assert len(list(root.glob("??/*"))) == 2 and not list(root.glob("index/*/*"))


def test_a_layer_is_left_out_only_when_every_slice_reading_it_is_found():
    attention, mlp = SliceSpec("layers", 1, 2, blocks=("attn",)), SliceSpec("layers", 1, 2, blocks=("mlp",))
    specs = [SliceSpec("embed", 0, 0), SliceSpec("layers", 0, 1), attention, mlp, SliceSpec("head", 2, 2)]
    found = {specs[1].name: object(), attention.name: object()}
    assert left_out(specs, found) == LeftOut(frozenset({0}), head=False)
    assert left_out(specs, {**found, mlp.name: object(), "head": object()}) == LeftOut(frozenset({0, 1}), head=True)


def test_a_start_parses_its_gguf_header_once(models, tmp_path, monkeypatch, capsys):
    """`generate` reads the config, the tokenizer, the fingerprint and the weights from one parse of the header
    (loader.ModelHeader, handed down), on a cold start and on a warm one."""
    from exo_rknpu.cli.main import main

    monkeypatch.setenv("EXO_RKNPU_HOME", str(tmp_path / "home"))
    parses: list[Path] = []
    parse = gguf_reader.GGUFFile._parse
    monkeypatch.setattr(gguf_reader.GGUFFile, "_parse", lambda g, c: parses.append(g.path) or parse(g, c))
    argv = ["generate", "--model", str(models["Q4_0"]), "--prompt", "hello", "--max-tokens", "2", "--max-context", "64",
            "--layers-per-slice", "2", "--json"]
    for start in ("cold", "warm"):
        parses.clear()
        assert main(argv) == 0
        assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 2
        assert parses == [models["Q4_0"]], start


def test_a_gguf_file_replaced_after_its_header_was_parsed_is_refused(models, tmp_path):
    """The header parsed at the start is applied only to the file it was parsed from."""
    from exo_rknpu.errors import WeightsError
    from exo_rknpu.model.loader import load_header

    path = tmp_path / "model.gguf"
    make_tiny_gguf(path, models["hf"], qtype="Q4_0")
    src = resolve_model(str(path))
    header = load_header(src)
    make_tiny_gguf(tmp_path / "other.gguf", make_tiny_hf(tmp_path / "hf2", n_layers=N_LAYERS, seed=6), qtype="Q8_0")
    os.replace(tmp_path / "other.gguf", path)
    with pytest.raises(WeightsError, match="changed while the model was being opened"):
        ShardSource(header, LayerRange.full(N_LAYERS), DEFAULT_WEIGHTS).load()
