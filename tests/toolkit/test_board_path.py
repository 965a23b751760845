"""The board path: the npu backend prepares a shard from the compiled manifests and `.rknn` files alone.

No board here, so RKNNLite is a stand-in module that records what it is asked to load and forwards every
`inference(inputs, data_format)` call, exactly as the npu backend marshals it, to the rknn-toolkit2 simulator
running the same slice (built from the original weights). The model's layer and head tensors are deleted after
compiling, so any attempt to read them on the "board" fails. Skipped (with the command to run) without the toolkit.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from exo_rknpu.rknn.io import cosine
from exo_rknpu.rknn.compile import compile_range
from exo_rknpu.errors import ArtifactError, WeightsError
from exo_rknpu.model.base import LayerRange
from exo_rknpu.model.loader import load_shard, resolve_model
from exo_rknpu.runtime.pipeline import LocalRing
from exo_rknpu.runtime.placement import open_shard
from exo_rknpu.slices.spec import Buckets, SliceSpec, shape_key

from tiny_models import make_tiny_gguf, make_tiny_hf, shard_file_name
from toolkit_common import NEEDS_TOOLKIT, greedy

pytestmark = NEEDS_TOOLKIT

N_LAYERS = 2
BUCKETS = Buckets(seq=(1, 16), context=(64,))  # few shapes: two builds per slice file stay quick


class SimulatedRKNNLite:
    """RKNNLite's calls as the npu backend makes them; runs go to the simulator's copy of the loaded slice."""

    loads: list[str] = []
    core_masks: list[int] = []
    handed: list[tuple[str, str]] = []  # (data_type, data_format) of every input handed over
    sim = None  # RknnSimBackend
    weights = None  # ShardWeights of the intact model (the simulator builds from them)

    def __init__(self, verbose: bool = False) -> None:
        self.runner = None

    def load_rknn(self, path: str) -> int:
        type(self).loads.append(path)
        m = json.loads((Path(path).parent / "manifest.json").read_text())  # which slice this file is
        d = m["slice"]
        spec = SliceSpec(d["kind"], d["start"], d["stop"], kv_layout=d["kv_layout"])
        self.runner = type(self).sim.prepare(spec, type(self).weights, BUCKETS)
        return 0

    def init_runtime(self, core_mask: int = 0) -> int:
        type(self).core_masks.append(core_mask)
        return 0

    def inference(self, inputs, data_type=None, data_format=None, reuse_outputs=False):
        assert data_type == [a.dtype.name for a in inputs]  # what RKNNLite is told is what it gets: nothing to convert
        type(self).handed += list(zip(data_type, data_format))
        # positional, as RKNNLite receives them; an 'nhwc' array is (N, H, W, C) of the compiled (N, C, H, W)
        given = [(a.shape[0], a.shape[3], a.shape[1], a.shape[2]) if f == "nhwc" else tuple(a.shape)
                 for a, f in zip(inputs, data_format)]
        found = [sh for sh in self.runner.shapes.values() if [tuple(v) for v in sh["inputs"].values()] == given]
        assert found, f"no prepared shape set takes {given}: {[list(sh['inputs'].values()) for sh in self.runner.shapes.values()]}"
        sh = found[0]
        mid = self.runner.models[shape_key(sh["inputs"])]
        head, outs = type(self).sim.worker().request({"op": "run", "id": mid, "data_format": data_format}, inputs)
        assert head.get("ok"), head
        return outs

    def release(self) -> None:
        self.runner.close()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """(compiled cache, the model as the board has it: layer/head tensor files deleted, the intact copy)."""
    root = tmp_path_factory.mktemp("board")
    intact = make_tiny_hf(root / "intact", n_layers=N_LAYERS, sharded=True)
    cache = root / "cache"
    res = compile_range(str(intact), f"0-{N_LAYERS - 1}", buckets=BUCKETS, cache_dir=cache, progress=False)
    assert [r.name for r in res] == ["layers.0", "layers.1", "head"]
    on_board = root / "on-board"
    shutil.copytree(intact, on_board)
    total = N_LAYERS + 2  # embedding, one file per layer, norm + head
    for part in range(2, total + 1):
        (on_board / shard_file_name(part, total)).unlink()  # everything but the embedding is gone
    return cache, on_board, intact


class LoadOnlyRKNNLite(SimulatedRKNNLite):
    """For refusals: records loads, never runs."""

    def load_rknn(self, path: str) -> int:
        type(self).loads.append(path)
        return 0

    def release(self) -> None:
        pass


def _install(monkeypatch, cls: type) -> None:
    api = types.ModuleType("rknnlite.api")
    api.RKNNLite = cls
    pkg = types.ModuleType("rknnlite")
    pkg.api = api
    monkeypatch.setitem(sys.modules, "rknnlite", pkg)
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    cls.loads, cls.core_masks, cls.handed = [], [], []


@pytest.fixture
def load_only(monkeypatch):
    _install(monkeypatch, LoadOnlyRKNNLite)
    return LoadOnlyRKNNLite


@pytest.fixture
def rknnlite(monkeypatch, board):
    from exo_rknpu.rknn.sim import RknnSimBackend

    _, _, intact = board
    _install(monkeypatch, SimulatedRKNNLite)
    SimulatedRKNNLite.sim = RknnSimBackend()
    SimulatedRKNNLite.weights = load_shard(resolve_model(str(intact)), LayerRange(0, N_LAYERS, N_LAYERS), weights="fp32")
    yield SimulatedRKNNLite
    SimulatedRKNNLite.sim.close()
    SimulatedRKNNLite.sim = SimulatedRKNNLite.weights = None


def _npu(cache: Path) -> dict:
    return {"cache_dir": cache, "check_board": False}


def test_npu_prepares_from_manifest_and_files_alone(board, rknnlite, monkeypatch):
    from exo_rknpu.model import loader

    cache, on_board, intact = board
    src = resolve_model(str(on_board))
    loaded = []  # what open_shard loaded (a ShardRunner keeps only what its runners need, not the ShardWeights)
    real_load = loader.load_shard  # ShardSource.load reads through it
    monkeypatch.setattr(loader, "load_shard", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    shards = [open_shard(src, LayerRange(0, 1, N_LAYERS), "npu", BUCKETS, backend_options=_npu(cache)),
              open_shard(src, LayerRange(1, 2, N_LAYERS), "npu", BUCKETS, backend_options=_npu(cache))]
    ref = LocalRing([open_shard(resolve_model(str(intact)), LayerRange(0, 2, N_LAYERS), "onnx", BUCKETS, weights="fp32")])
    try:
        # nothing but the embedding was loaded: no layer, norm or head weights on the board
        first, last = loaded[:2]
        assert first.layers == {} and first.embed_tokens is not None and first.lm_head is None
        assert last.layers == {} and last.embed_tokens is None and last.final_norm is None and last.lm_head is None
        assert {n: b.name for n, b in shards[0].backends.items()} == {"embed": "onnx", "layers.0": "npu"}
        assert {n: b.name for n, b in shards[1].backends.items()} == {"layers.1": "npu", "head": "npu"}
        # RKNNLite loaded exactly the compiled files, one context each, on the default core mask
        want = [str(p) for name in ("layers.0", "layers.1", "head")
                for p in cache.glob(f"slices/*/*/{name}.rknn")]
        assert rknnlite.loads == want and rknnlite.core_masks == [0, 0, 0]
        prompt = [5, 9, 13, 17, 21, 25, 29]  # 7 tokens: seq bucket 16, then decode steps at seq 1
        got_toks, got_logits = greedy(LocalRing(shards), prompt, 5)
        want_toks, want_logits = greedy(ref, prompt, 5)
        assert got_toks == want_toks
        for g, w in zip(got_logits, want_logits):
            assert cosine(g, w) >= 0.9999  # fp16 on the simulator vs float32 onnxruntime
        # every input went over as the compiled files record it: float16 (the fp16 build's dtype); 4-D ones as NHWC
        assert {t for t, _ in rknnlite.handed} == {"float16"} and "nhwc" in {f for _, f in rknnlite.handed}
    finally:
        for s in shards:
            s.close()
        ref.close()


def test_board_model_without_layer_files_cannot_serve_cpu_backends(board):
    """The on-board copy really lacks the layer tensors: a backend that needs them fails to load them."""
    _, on_board, _ = board
    with pytest.raises(WeightsError, match="model-00002-of-00004"):
        open_shard(resolve_model(str(on_board)), LayerRange(0, 1, N_LAYERS), "onnx", BUCKETS)


def test_gguf_with_corrupted_layer_bytes_opens_on_npu_reading_only_the_embedding(board, load_only, monkeypatch, tmp_path):
    """Same model as GGUF: after compiling, every layer and head tensor's bytes are overwritten in place (the tensor
    table, hence the fingerprint, is unchanged). The npu shards open and only token_embd is ever read."""
    from exo_rknpu.model.gguf import GGUFFile

    _, _, intact = board
    path = make_tiny_gguf(tmp_path / "m.gguf", intact)
    cache = tmp_path / "cache"
    compile_range(str(path), f"0-{N_LAYERS - 1}", buckets=BUCKETS, cache_dir=cache, progress=False)
    g = GGUFFile(path)
    with open(path, "r+b") as f:
        for t in g.tensors.values():
            if t.name != "token_embd.weight":
                f.seek(t.offset)
                f.write(b"\xff" * t.nbytes)  # float32 NaN everywhere
    src = resolve_model(str(path))
    assert np.isnan(load_shard(src, LayerRange(1, 2, N_LAYERS), weights="fp32").layers[1].q_proj).all()  # the damage is real
    read: list[str] = []
    real = GGUFFile.tensor
    monkeypatch.setattr(GGUFFile, "tensor", lambda self, name: read.append(name) or real(self, name))
    real_raw = GGUFFile.raw  # compact tensors are read as stored bytes
    monkeypatch.setattr(GGUFFile, "raw", lambda self, name: read.append(name) or real_raw(self, name))
    shards = [open_shard(src, LayerRange(0, 1, N_LAYERS), "npu", BUCKETS, backend_options=_npu(cache)),
              open_shard(src, LayerRange(1, 2, N_LAYERS), "npu", BUCKETS, backend_options=_npu(cache))]
    try:
        assert read == ["token_embd.weight"]
        assert [Path(p).name for p in load_only.loads] == ["layers.0.rknn", "layers.1.rknn", "head.rknn"]
    finally:
        for s in shards:
            s.close()


def _entry(cache: Path, name: str) -> Path:
    return next(cache.glob(f"slices/*/*/{name}.rknn")).parent


def _one_line_with_command(e: pytest.ExceptionInfo, layers: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    assert f"run: exo-rknpu compile --model MODEL --layers {layers} --dtype fp16 --platform rk3588 --seq 1,16 --context 64" in msg


@pytest.mark.parametrize("field, value, match", [
    ("weights_digest", "0" * 64, "content address"),
    ("model_fingerprint", "f" * 64, "another model"),
    ("exporter_version", "0123456789abcdef", "another version of the slice graph"),
    ("slice", {"name": "layers.1", "kind": "layers", "start": 1, "stop": 2, "blocks": ["attn", "mlp"], "kv_layout": "seq"},
     "kv_layout"),
])
def test_edited_manifest_facts_are_refused_with_the_compile_command(board, load_only, field, value, match):
    cache, on_board, _ = board
    mp = _entry(cache, "layers.1") / "manifest.json"
    saved = mp.read_text()
    m = json.loads(saved)
    m[field] = value
    mp.write_text(json.dumps(m))
    try:
        with pytest.raises(ArtifactError, match=match) as e:
            open_shard(resolve_model(str(on_board)), LayerRange(1, 2, N_LAYERS), "npu", BUCKETS,
                       backend_options=_npu(cache))
        _one_line_with_command(e, "1-1")
    finally:
        mp.write_text(saved)
    assert load_only.loads == []  # refused before RKNNLite saw the file


def test_tampered_rknn_and_missing_buckets_are_refused(board, load_only):
    cache, on_board, _ = board
    src = resolve_model(str(on_board))
    rknn = _entry(cache, "head") / "head.rknn"
    saved = rknn.read_bytes()
    data = bytearray(saved)
    data[len(data) // 2] ^= 0xFF
    rknn.write_bytes(bytes(data))
    try:
        with pytest.raises(ArtifactError, match="sha256") as e:
            open_shard(src, LayerRange(1, 2, N_LAYERS), "npu", BUCKETS, backend_options=_npu(cache))
        _one_line_with_command(e, "1-1")
        assert [Path(p).name for p in load_only.loads] == ["layers.1.rknn"]  # the intact slice before it loaded
    finally:
        rknn.write_bytes(saved)
    bigger = Buckets(seq=(1, 16), context=(64, 128))
    with pytest.raises(ArtifactError, match=r"lacks buckets \[.s1c128., .s16c128.\]") as e:
        open_shard(src, LayerRange(0, 1, N_LAYERS), "npu", bigger, backend_options=_npu(cache))
    assert "--seq 1,16 --context 64,128" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ArtifactError, match="no compiled w8a8 slice layers.0") as e:
        open_shard(src, LayerRange(0, 1, N_LAYERS), "npu", BUCKETS, backend_options=_npu(cache) | {"dtype": "w8a8"})
    assert "run: exo-rknpu compile --model MODEL --layers 0-0 --dtype w8a8" in str(e.value)


def test_resident_bytes_come_from_the_compiled_sizes(board):
    from exo_rknpu.rknn.npu import NpuBackend

    cache, on_board, _ = board
    src = resolve_model(str(on_board))
    ws = load_shard(src, LayerRange(0, N_LAYERS, N_LAYERS), layers=False, weights="fp32")
    a = ws.args
    be = NpuBackend(cache_dir=cache, check_board=False)
    mem = be.resident_bytes(ws.fingerprint, a, LayerRange(1, 2, N_LAYERS), max_context=64, max_requests=3)
    files = {name: (_entry(cache, name) / f"{name}.rknn").stat().st_size for name in ("layers.1", "head")}
    assert mem.rknn_bytes == files  # the .rknn files on disk, as the manifests record them
    assert mem.embed_bytes == 0  # not the first shard
    kv_one = 2 * a.num_key_value_heads * 64 * a.head_dim * 2  # K and V, float16 (the NPU form), one layer at ctx 64
    assert mem.kv_bytes == 3 * kv_one
    assert mem.total == sum(files.values()) + 2 * mem.internal_bytes + 3 * kv_one and mem.internal_bytes > 0
    first = be.resident_bytes(ws.fingerprint, a, LayerRange(0, 1, N_LAYERS), max_context=64, kv_cap_bytes=0)
    assert first.embed_bytes == ws.embed_tokens.nbytes and first.kv_bytes == kv_one  # the current request always fits
    with pytest.raises(ArtifactError, match="no compiled fp16 slice layers.0"):
        NpuBackend(cache_dir=cache.parent / "empty", check_board=False).resident_bytes(
            ws.fingerprint, a, LayerRange(0, 1, N_LAYERS), max_context=64)


@pytest.fixture
def reads(monkeypatch):
    """Counts every tensor read from a safetensors file, and the LayerWeights alive at each read."""
    import gc

    from exo_rknpu.model import hf
    from exo_rknpu.model.weights import LayerWeights

    def count() -> int:
        return sum(isinstance(o, LayerWeights) for o in gc.get_objects())

    log: dict[str, int] = {}
    alive: list[int] = []
    real = hf._SafetensorsFile.get
    before = count()  # held by other tests' fixtures

    def get(self, name: str):
        log[name] = log.get(name, 0) + 1
        alive.append(count() - before)
        return real(self, name)

    monkeypatch.setattr(hf._SafetensorsFile, "get", get)
    return log, alive


def test_compile_reads_each_layer_once_and_holds_one_at_a_time(board, reads, tmp_path):
    _, _, intact = board
    log, alive = reads
    res = compile_range(str(intact), f"0-{N_LAYERS - 1}", buckets=BUCKETS, cache_dir=tmp_path / "a", progress=False)
    assert [r.status for r in res] == ["built"] * 3
    layer_tensors = {n for n in log if n.startswith("model.layers.")}
    assert len(layer_tensors) == 9 * N_LAYERS and set(log) == layer_tensors | {"model.norm.weight", "lm_head.weight"}
    assert set(log.values()) == {1}  # every tensor read once; the embedding (host-side) not at all
    assert max(alive) <= 1  # a layer's weights are gone before the next layer is read


def test_compile_with_verify_reads_the_prefix_once(board, reads, tmp_path):
    """--verify captures real activations from layer 0: the layers before the range are read too, still once."""
    _, _, intact = board
    log, _ = reads
    res = compile_range(str(intact), f"{N_LAYERS - 1}-{N_LAYERS - 1}", buckets=BUCKETS, verify=True,
                        cache_dir=tmp_path / "v", progress=False)
    assert [(r.name, r.status) for r in res] == [(f"layers.{N_LAYERS - 1}", "built"), ("head", "built")]
    assert all(r.verify["cos_" + ("logits" if r.name == "head" else "hidden_out")] >= 0.9999 for r in res)
    assert "model.embed_tokens.weight" in log and "model.layers.0.mlp.down_proj.weight" in log
    assert set(log.values()) == {1}


def test_a_librknnrt_older_than_the_compiling_toolkit_is_refused_before_loading(board, load_only, monkeypatch):
    """On a board whose /usr/lib/librknnrt.so is 2.3.2, files built by rknn-toolkit2 2.5.0 (manifest librknnrt_min)
    are refused in one line naming both versions, before RKNNLite reads them (rknn_init would fail with "Invalid
    RKNN model version")."""
    from exo_rknpu.backends import board as board_facts
    from exo_rknpu.errors import BackendUnavailableError
    from exo_rknpu.rknn import npu

    cache, on_board, _ = board
    monkeypatch.setattr(npu, "board_problems", lambda *a: [])  # the rest of the board is fine
    monkeypatch.setattr(board_facts, "librknnrt_version", lambda *a: "2.3.2 (429f97ae6b@2025-04-09T09:09:27)")
    with pytest.raises(BackendUnavailableError) as e:
        open_shard(resolve_model(str(on_board)), LayerRange(1, 2, N_LAYERS), "npu", BUCKETS,
                   backend_options={"cache_dir": cache})
    msg = str(e.value)
    assert "\n" not in msg and "is librknnrt 2.3.2" in msg and "need 2.5.0 or newer" in msg, msg
    assert load_only.loads == []
