"""Spectral profiles: the versioned JSON record of one encoder measured on one image set.

A profile holds everything needed to say whether two measurements are comparable (the encoder
entry, the weights' checksum, the protocol, the image set's digest, library versions) next to the
spectra and summaries themselves. Files are written atomically: a reader never sees half a file,
and a process killed while writing leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import OutputError, PrismError

SCHEMA = "prism-probe/profile"
SCHEMA_VERSION = 1
LIBRARIES = ("prism-probe", "torch", "numpy", "timm", "open_clip_torch", "transformers",
             "diffusers", "pillow")


def library_versions(names=LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that can change a measurement."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Profile:
    """One encoder's spectral profile.

    Attributes
    ----------
    kind : str
        ``"spectrum"`` or ``"ablation"``.
    encoder : dict
        The encoder's label, registry entry, weights (source, location, sha256), preprocessing.
    protocol : dict
        How the numbers were made: spectrum options (window, mean removal, binning, bands,
        cutoff), units, grid mode (native or a common N×N grid), feature grid, stride, input size,
        layer, device and dtype. Two profiles are only comparable when their protocols agree.
    images : dict
        n_used, n_skipped, the skipped files with reasons, duplicates, source and digest.
    result : dict
        The measures (see :meth:`prism_probe.spectra.SpectrumAccumulator.result`).
    """

    kind: str
    encoder: dict[str, Any]
    protocol: dict[str, Any]
    images: dict[str, Any]
    result: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))
    schema_version: int = SCHEMA_VERSION

    @property
    def label(self) -> str:
        return self.encoder.get("label") or self.encoder.get("entry", {}).get("name", "?")

    @property
    def family(self) -> str:
        return self.encoder.get("entry", {}).get("family", "?")

    def to_json(self) -> str:
        data = {"schema": SCHEMA, "schema_version": self.schema_version, "kind": self.kind,
                "created": self.created, "encoder": self.encoder, "protocol": self.protocol,
                "images": self.images, "environment": self.environment, "result": self.result}
        return json.dumps(data, indent=1, allow_nan=False, default=_jsonable)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> "Profile":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{source}: not a JSON profile ({exc.msg} at line {exc.lineno})")
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise PrismError(f"{source}: not a prism-probe profile (no \"schema\": \"{SCHEMA}\")")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PrismError(f"{source}: profile schema version {version} is not the supported "
                             f"{SCHEMA_VERSION}; re-run the measurement with this version")
        missing = [k for k in ("kind", "encoder", "protocol", "images", "result") if k not in data]
        if missing:
            raise PrismError(f"{source}: profile lacks the field '{missing[0]}'")
        return cls(kind=data["kind"], encoder=data["encoder"], protocol=data["protocol"],
                   images=data["images"], result=data["result"],
                   environment=data.get("environment", {}), created=data.get("created", ""),
                   schema_version=version)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PrismError(f"{path}: cannot read profile ({exc.strerror})") from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json() + "\n")

    def comparable_with(self, other: "Profile") -> list[str]:
        """What differs between the two measurements' set-ups (empty when comparable).

        Checked: the kind, the encoder entry (name, backend, identifier, layer), the weights'
        checksum, the protocol (every key), and the image set's digest.
        """
        diffs = []
        if self.kind != other.kind:
            diffs.append(f"kind: {self.kind} vs {other.kind}")
        ea, eb = self.encoder.get("entry", {}), other.encoder.get("entry", {})
        for key in ("name", "backend", "id", "features", "input"):
            if ea.get(key) != eb.get(key):
                diffs.append(f"encoder {key}: {ea.get(key)!r} vs {eb.get(key)!r}")
        wa, wb = self.encoder.get("weights", {}), other.encoder.get("weights", {})
        if wa.get("sha256") != wb.get("sha256") or wa.get("source") != wb.get("source"):
            diffs.append(f"weights: {wa.get('source')} {str(wa.get('sha256'))[:12]} vs "
                         f"{wb.get('source')} {str(wb.get('sha256'))[:12]}")
        for key in sorted(set(self.protocol) | set(other.protocol)):
            if self.protocol.get(key) != other.protocol.get(key):
                diffs.append(f"protocol {key}: {self.protocol.get(key)!r} vs "
                             f"{other.protocol.get(key)!r}")
        if self.images.get("digest") != other.images.get("digest"):
            diffs.append(f"image set: {self.images.get('n_used')} images "
                         f"({str(self.images.get('digest'))[:12]}) vs {other.images.get('n_used')} "
                         f"images ({str(other.images.get('digest'))[:12]})")
        return diffs


def _jsonable(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, because two threads doing
    # the set-and-restore at the same time can leave the process with a umask of 0.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _cannot_write(where: Path, exc: OSError) -> OutputError:
    return OutputError(f"{where}: cannot write output here ({exc.strerror or exc}); choose a "
                       "writable folder with --out")


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be created in it, before any long run.

    Raises :class:`OutputError` (one line) when it cannot; leaves nothing behind.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".prism-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    return folder


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The rename is atomic on POSIX and Windows, so readers (and concurrent writers of the same
    file) see either the old or the new content, never a mixture; a kill leaves the old file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path.parent, exc) from None
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, target is a folder, ...: one line, old file kept
            raise _cannot_write(path, exc) from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def profile_filename(label: str) -> str:
    """A file name for an encoder label (``random:dinov2-b`` → ``random_dinov2-b.json``)."""
    safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in label)
    return f"{safe}.json"


def command_line() -> str:
    return " ".join(["prism-probe"] + sys.argv[1:])
