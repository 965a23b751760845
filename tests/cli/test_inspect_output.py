"""`inspect` and `compile` print for a person: one row per slice in layer order, CPU placement summarised,
figures rounded; `--json` keeps everything."""

from __future__ import annotations

import json
from pathlib import Path

from exo_rknpu.cli.main import main
from exo_rknpu.cli.report import format_cpu, slice_order
from exo_rknpu.fileio import sha256_file
from exo_rknpu.slices.manifest import FORMAT, write_manifest

FALLBACK = ("Transpose will fallback to CPU, because input shape has exceeded the max limit, height({h}) * width(64) "
            "= {p}, required product no larger than 8192!")


def fake_slice(cache: Path, key: str, name: str, layer: int) -> Path:
    """A compiled-slice folder as the compiler leaves it, with eight prefill buckets' fallback warnings."""
    folder = cache / "slices" / key / name
    folder.mkdir(parents=True)
    (folder / f"{name}.rknn").write_bytes(b"\0" * 1000)
    fallbacks = [FALLBACK.format(h=h, p=h * 64) for h in (272, 528, 1040, 2064, 320, 576, 1088, 2112)]
    write_manifest(folder, {
        "format": FORMAT, "key": key, "slice": {"name": name}, "layers": [layer], "model_fingerprint": "ab" * 32,
        "dtype": "fp16", "platform": "rk3588", "buckets": {"seq": [1, 16, 64], "context": [256, 512, 1024, 2048]},
        "files": [{"file": f"{name}.rknn", "bytes": 1000, "sha256": sha256_file(folder / f"{name}.rknn")}],
        "build": {"cpu_ops": ["Reshape:/attn/Reshape_3"], "fallbacks": fallbacks, "cycles": [1234567, 7654321]},
        "verify": {"cos_hidden_out": 0.99999123456789, "cos_delta": 0.9998765432123, "maxabs_hidden_out": 0.01},
    })
    return folder


def test_slices_sort_in_layer_order_not_by_name_or_hash():
    names = ["layers.10", "head", "layers.6", "layers.4-5", "embed", "layers.5"]
    assert sorted(names, key=slice_order) == ["embed", "layers.4-5", "layers.5", "layers.6", "layers.10", "head"]


def test_cpu_placement_is_summarised_by_op_with_its_reason_once():
    fallbacks = [FALLBACK.format(h=h, p=h * 64) for h in (272, 528, 1040)]
    assert format_cpu(["Reshape:/a", "Reshape:/b"], fallbacks) == (
        "Transpose x3 (input shape has exceeded the max limit); Reshape x2 (placed by the compiler)")
    assert format_cpu([], []) == "none"


def test_inspect_prints_one_short_row_per_slice_in_layer_order(tmp_path, capsys):
    # Hash-named folders in an order that is not layer order.
    for key, name, layer in (("c3", "layers.6", 6), ("a1", "layers.5", 5), ("b2", "layers.4", 4), ("d4", "layers.10", 10)):
        fake_slice(tmp_path, key, name, layer)
    assert main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line for line in lines if line.startswith("abababab")]
    assert [r.split()[1] for r in rows] == ["layers.4", "layers.5", "layers.6", "layers.10"]
    for r in rows:
        assert len(r) < 200, r
        assert r.count("Transpose") == 1 and "Transpose x8 (input shape has exceeded the max limit)" in r
        assert " 0.999877 " in r and "0.9998765432123" not in r  # the worst cosine, rounded
        assert " 1.2M-7.7M " in r  # est. cycles, rounded


def test_inspect_json_keeps_every_warning_and_figure(tmp_path, capsys):
    fake_slice(tmp_path, "a1", "layers.5", 5)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert len(row["fallbacks"]) == 8 and row["cpu_ops"] == ["Reshape:/attn/Reshape_3"]
    assert row["verify"]["cos_hidden_out"] == 0.99999123456789 and row["est_cycles"] == [1234567, 7654321]


def test_inspect_marks_a_damaged_slice_and_says_why_on_its_own_line(tmp_path, capsys):
    folder = fake_slice(tmp_path, "a1", "layers.5", 5)
    (folder / "layers.5.rknn").write_bytes(b"\1" * 1000)
    assert main(["inspect", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if " layers.5 " in line)
    assert " BAD " in lines[row] and "sha256" in lines[row + 1]
