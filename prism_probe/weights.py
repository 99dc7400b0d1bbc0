"""Where weights come from, in order: a local weights directory, the download cache, the hub.

1. Local directories (``--weights DIR``, then ``PRISM_PROBE_WEIGHTS``, several separated by
   ``os.pathsep``) are searched for the entry's ``weights.file``, or for ``<name>.safetensors``,
   ``<name>.pth``, ``<name>.pt``, ``<name>.bin``, or a folder ``<name>/`` (a saved transformers or
   diffusers model).
2. URL weights are downloaded once into ``$PRISM_PROBE_CACHE`` (default
   ``~/.cache/prism-probe/weights``) and their sha256 is checked before they are used.
3. Hub weights are left to the backend's own library and its cache (timm, open_clip,
   transformers and diffusers all use the Hugging Face cache).

A file whose sha256 is known and does not match is refused, never loaded. Pickles are only read
with ``torch.load(..., weights_only=True)``. This module imports no model library (torch only
inside :func:`load_state_dict`), so marking which weights are present is instant.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import WeightsError
from .registry import EncoderEntry

WEIGHTS_ENV = "PRISM_PROBE_WEIGHTS"
CACHE_ENV = "PRISM_PROBE_CACHE"
OFFLINE_ENVS = ("PRISM_PROBE_OFFLINE", "HF_HUB_OFFLINE")
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".th")


@dataclass
class ResolvedWeights:
    """What a backend should load.

    ``path`` is a local file or folder when one was found; ``hub`` the hub id to hand to the
    library otherwise; ``random`` means build the architecture with random weights.
    ``decoder_path`` is the decoder's file for autoencoders whose decoder is a separate file.
    """

    source: str  # "file", "url", "hub", "random", "none"
    path: Path | None = None
    hub: str | None = None
    sha256: str | None = None
    decoder_path: Path | None = None
    random: bool = False

    @property
    def location(self) -> str | None:
        return str(self.path) if self.path is not None else self.hub

    def info(self):
        from .loading.base import WeightsInfo

        return WeightsInfo(self.source, self.location, self.sha256)


def offline() -> bool:
    """True when the user asked for no network (PRISM_PROBE_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in OFFLINE_ENVS)


def weights_dirs(explicit: Iterable[str | Path] | str | Path | None = None) -> list[Path]:
    """Local weight folders in search order: explicit ones, then PRISM_PROBE_WEIGHTS."""
    if explicit is None:
        explicit = []
    elif isinstance(explicit, (str, Path)):
        explicit = [explicit]
    dirs = [Path(d).expanduser() for d in explicit]
    dirs += [Path(p).expanduser() for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]
    return dirs


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "prism-probe" / "weights"


def _hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    return [base / "hub"]


def hf_cached(repo_id: str) -> Path | None:
    """The newest snapshot folder of ``repo_id`` in the Hugging Face cache, if it has one."""
    folder = "models--" + repo_id.replace("/", "--")
    for root in _hf_cache_dirs():
        snaps = root / folder / "snapshots"
        if snaps.is_dir():
            found = sorted((p for p in snaps.iterdir() if any(p.iterdir())),
                           key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    return None


def _candidates(entry: EncoderEntry, key: str = "weights") -> list[str]:
    spec = getattr(entry, key) or {}
    if spec.get("file"):
        return [spec["file"]]
    if key != "weights":
        return []
    return [entry.name + s for s in SUFFIXES] + [entry.name]


def find_local(entry: EncoderEntry, dirs: Iterable[Path], key: str = "weights") -> Path | None:
    """The first local file (or model folder) for ``entry`` in ``dirs``."""
    names = _candidates(entry, key)
    for d in dirs:
        for name in names:
            p = d / name
            if p.is_file() or (p.is_dir() and any(p.iterdir())):
                return p
    spec = getattr(entry, key) or {}
    if spec.get("url"):
        p = cache_dir() / Path(spec["url"]).name
        if p.is_file():
            return p
    return None


def presence(entry: EncoderEntry, dirs: Iterable[Path] = ()) -> tuple[str, str | None]:
    """Whether the entry's weights are here without any network: (state, where).

    state is ``"local"`` (a weights folder or the download cache), ``"cache"`` (the hub cache),
    ``"builtin"`` (needs no weights), ``"run"`` (a UAE run folder named as ``uae:RUN``) or
    ``"missing"``.
    """
    if entry.backend == "pixels":
        return "builtin", None
    if entry.backend == "uae":
        return "run", None  # weights live in a run folder named on the command line
    p = find_local(entry, list(dirs))
    if p is not None:
        return "local", str(p)
    hub = entry.weights.get("hub")
    if hub:
        snap = hf_cached(hub)
        if snap is not None:
            return "cache", str(snap)
    return "missing", None


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str | None, entry: EncoderEntry) -> str | None:
    if path.is_dir():
        return None
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise WeightsError(
            f"{path}: sha256 {actual[:16]}… does not match {expected[:16]}… recorded for "
            f"'{entry.name}'; refusing to load it (replace the file with the right one)")
    return actual


def _download(url: str, dest: Path, sha256: str, entry: EncoderEntry) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            shutil.copyfileobj(resp, out)
        _verify(Path(tmp), sha256, entry)
        os.replace(tmp, dest)
    except WeightsError:
        raise
    except OSError as exc:
        raise WeightsError(
            f"could not download weights for '{entry.name}' from {url} ({exc}); put "
            f"{dest.name} in a folder given with --weights DIR (or {WEIGHTS_ENV})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def missing(entry: EncoderEntry, dirs: Iterable[Path], detail: str = "") -> WeightsError:
    """The one error for weights that cannot be found, naming the file and where to put it."""
    names = _candidates(entry)
    what = names[0] if entry.weights.get("file") else f"{entry.name}.safetensors (or a folder "\
        f"{entry.name}/ saved by the library)"
    searched = ", ".join(str(d) for d in dirs) or "no --weights folder"
    hub = entry.weights.get("hub")
    hub_txt = f" or the hub cache for '{hub}'" if hub else ""
    extra = f" ({detail})" if detail else ""
    return WeightsError(
        f"weights for '{entry.name}' not found{extra}: put {what} in a folder given with "
        f"--weights DIR or {WEIGHTS_ENV} (searched: {searched}{hub_txt}); "
        f"random:{entry.name} runs the architecture with random weights")


def require_hub_cache(entry: EncoderEntry, hub: str, dirs: Iterable[Path]) -> None:
    """Offline, fail at once with :func:`missing` when ``hub`` is not in the Hugging Face cache.

    Backends call this before handing a hub id to their library, so that an offline run gets the
    one clear error instead of the library's retries and tracebacks.
    """
    repo = hub.removeprefix("hf-hub:").strip("/")
    if offline() and hf_cached(repo) is None:
        raise missing(entry, dirs, f"offline, and '{repo}' is not in the hub cache")


def resolve(
    entry: EncoderEntry,
    *,
    dirs: Iterable[str | Path] | None = None,
    random_init: bool = False,
) -> ResolvedWeights:
    """Find the weights of ``entry`` (see the module docstring for the order)."""
    dirs = weights_dirs(dirs)
    if random_init:
        return ResolvedWeights("random", random=True)
    if entry.backend in ("pixels", "uae"):
        return ResolvedWeights("none")
    spec = entry.weights

    local = find_local(entry, dirs)
    decoder = None
    if entry.decoder:
        decoder = find_local(entry, dirs, key="decoder")
        if decoder is not None:
            _verify(decoder, entry.decoder.get("sha256"), entry)
    if local is not None:
        sha = _verify(local, spec.get("sha256"), entry)
        return ResolvedWeights("file", path=local, sha256=sha, decoder_path=decoder)

    if spec.get("url"):
        if offline():
            raise missing(entry, dirs, "offline, and not in the download cache")
        dest = cache_dir() / Path(spec["url"]).name
        path = _download(spec["url"], dest, spec["sha256"], entry)
        return ResolvedWeights("url", path=path, sha256=spec["sha256"].lower(),
                               decoder_path=decoder)
    if spec.get("hub") or spec.get("tag"):
        return ResolvedWeights("hub", hub=spec.get("hub") or spec.get("tag"),
                               decoder_path=decoder)
    raise missing(entry, dirs)


def load_state_dict(path: Path | str, *, what: str = "weights") -> dict[str, Any]:
    """A state dict from safetensors or a pickle read with ``weights_only=True`` (never code)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: report, never fall back to unsafe
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused to load {what}: not a plain tensor file that torch.load(..., "
            f"weights_only=True) accepts ({first[:160]}); convert it to safetensors") from None
