"""The encoder registry: encoders described as data.

The default registry is ``encoders.yaml`` inside the package. A user adds to it or overrides it
with files of the same format, named by ``--registry FILE`` or by the environment variable
``PRISM_PROBE_REGISTRY`` (several files separated by ``os.pathsep``); later files win by name.

An entry is a mapping under ``encoders:``::

    dinov2-b:
      family: semantic            # semantic | pixel | unified
      backend: timm               # which loader builds it (see BACKENDS)
      id: vit_base_patch14_dinov2.lvd142m
      weights: {hub: timm/vit_base_patch14_dinov2.lvd142m}
      input: {size: 224}          # plus resize, crop_pct, interpolation, mean, std, value_range
      features: {layer: final}    # which output is the feature map
      options: {img_size: 224}    # keyword arguments for the backend's constructor
      description: DINOv2 ViT-B/14, final-normed patch tokens

``modality`` (optional, default ``image``) says what the encoder takes in: ``image``, ``video``
(clips; ``input.frames`` frames per clip) or ``sequence`` (token ids; ``input.max_tokens``
instead of ``input.size``); see ``docs/modalities.md``.

An entry may start from another with ``base: NAME`` and override fields (mappings are merged one
level deep). This module imports neither torch nor any model library, so listing the registry and
marking which weights are present is instant.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import RegistryError

FAMILIES = ("semantic", "pixel", "unified")
# What an encoder takes in: still images (the default), clips of frames, or token sequences.
MODALITIES = ("image", "video", "sequence")
BACKENDS = (
    "timm",
    "open_clip",
    "transformers",
    "diffusers",
    "tae",
    "cifar_resnet",
    "torch_module",
    "pixels",
    "uae",
    "transformers_video",
    "transformers_sequence",
)
WEIGHT_KEYS = ("hub", "subfolder", "filename", "url", "sha256", "file", "tag", "revision")
INPUT_KEYS = ("size", "resize", "crop_pct", "interpolation", "mean", "std", "value_range",
              "frames", "max_tokens")
FIELDS = (
    "family",
    "backend",
    "id",
    "weights",
    "input",
    "features",
    "options",
    "description",
    "license",
    "trust_remote_code",
    "split",
    "decoder",
    "base",
    "modality",
)
REQUIRED = ("family", "backend", "input", "description")
REGISTRY_ENV = "PRISM_PROBE_REGISTRY"


@dataclass(frozen=True)
class EncoderEntry:
    """One registry entry, validated.

    ``weights`` says where the weights come from: ``hub`` (a model-hub repository, with optional
    ``subfolder``/``filename``/``revision``), ``url`` + ``sha256``, ``file`` (a file name looked up
    in the weights directory, with optional ``sha256``), ``tag`` (an open_clip pretrained tag).
    ``features`` says which output is the feature map; ``options`` are passed to the backend.
    """

    name: str
    family: str
    backend: str
    id: str | None
    description: str
    input: Mapping[str, Any]
    weights: Mapping[str, Any] = field(default_factory=dict)
    features: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    license: str | None = None
    trust_remote_code: bool = False
    split: Mapping[str, Any] = field(default_factory=dict)
    decoder: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<default>"
    modality: str = "image"

    @property
    def input_size(self) -> tuple[int, int]:
        """Input (height, width) in pixels."""
        size = self.input["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def to_dict(self) -> dict[str, Any]:
        """The entry as plain JSON-able data (recorded in every profile)."""
        out = {
            "name": self.name,
            "family": self.family,
            "backend": self.backend,
            "id": self.id,
            "description": self.description,
            "input": dict(self.input),
            "weights": dict(self.weights),
            "features": dict(self.features),
            "options": dict(self.options),
        }
        for key in ("license", "split", "decoder"):
            value = getattr(self, key)
            if value:
                out[key] = value if isinstance(value, str) else dict(value)
        if self.trust_remote_code:
            out["trust_remote_code"] = True
        if self.modality != "image":
            out["modality"] = self.modality
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, refusing duplicate keys (plain YAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path | str, text: str | None = None) -> dict[str, Any]:
    try:
        text = Path(path).read_text() if text is None else text
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RegistryError(f"{path}:{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get("encoders"), dict):
        raise RegistryError(f"{path}: a registry file needs a top-level mapping 'encoders:'")
    return data["encoders"]


def _validate(name: str, raw: Mapping[str, Any], source: str) -> EncoderEntry:
    where = f"{source}: entry '{name}'"
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}: must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        fix = f" (did you mean '{hint[0]}'?)" if hint else f"; known fields: {', '.join(FIELDS)}"
        raise RegistryError(f"{where}: unknown field '{unknown[0]}'{fix}")
    for key in REQUIRED:
        if key not in raw:
            raise RegistryError(f"{where}: missing required field '{key}'")
    if raw["family"] not in FAMILIES:
        raise RegistryError(
            f"{where}: field 'family' must be one of {', '.join(FAMILIES)}, got {raw['family']!r}")
    if raw["backend"] not in BACKENDS:
        hint = difflib.get_close_matches(str(raw["backend"]), BACKENDS, n=1)
        fix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise RegistryError(
            f"{where}: unknown backend {raw['backend']!r}{fix}; known: {', '.join(BACKENDS)}")
    if raw["backend"] not in ("pixels",) and not raw.get("id"):
        raise RegistryError(f"{where}: missing required field 'id' (the library identifier)")
    for key in ("input", "weights", "features", "options", "split", "decoder"):
        if key in raw and not isinstance(raw[key], Mapping):
            raise RegistryError(f"{where}: field '{key}' must be a mapping")
    modality = raw.get("modality", "image")
    if modality not in MODALITIES:
        raise RegistryError(
            f"{where}: field 'modality' must be one of {', '.join(MODALITIES)}, got {modality!r}")
    inp = raw["input"]
    bad = sorted(set(inp) - set(INPUT_KEYS))
    if bad:
        raise RegistryError(f"{where}: unknown key 'input.{bad[0]}'; known: {', '.join(INPUT_KEYS)}")
    for key in ("frames", "max_tokens"):
        value = inp.get(key)
        if value is not None and not (isinstance(value, int) and value > 0):
            raise RegistryError(f"{where}: field 'input.{key}' must be a positive int, got "
                                f"{value!r}")
    size = inp.get("size")
    ok_size = (isinstance(size, int) and size > 0) or (
        isinstance(size, (list, tuple)) and len(size) == 2
        and all(isinstance(s, int) and s > 0 for s in size))
    if modality == "sequence":
        # Token sequences have no pixel size; their input is bounded by a token count.
        if "max_tokens" not in inp:
            raise RegistryError(f"{where}: a sequence entry needs 'input.max_tokens'")
    elif not ok_size:
        raise RegistryError(
            f"{where}: field 'input.size' must be a positive int or [height, width], got {size!r}")
    weights = raw.get("weights", {}) or {}
    bad = sorted(set(weights) - set(WEIGHT_KEYS))
    if bad:
        raise RegistryError(
            f"{where}: unknown key 'weights.{bad[0]}'; known: {', '.join(WEIGHT_KEYS)}")
    if "url" in weights and "sha256" not in weights:
        raise RegistryError(f"{where}: 'weights.url' needs 'weights.sha256' so downloads are "
                            "verified")
    sha = weights.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdef" for c in sha.lower())):
        raise RegistryError(f"{where}: 'weights.sha256' must be 64 hex digits, got {sha!r}")
    trust = raw.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise RegistryError(f"{where}: field 'trust_remote_code' must be true or false")
    return EncoderEntry(
        name=name,
        family=raw["family"],
        backend=raw["backend"],
        id=raw.get("id"),
        description=str(raw["description"]),
        input=dict(inp),
        weights=dict(weights),
        features=dict(raw.get("features", {}) or {}),
        options=dict(raw.get("options", {}) or {}),
        license=raw.get("license"),
        trust_remote_code=trust,
        split=dict(raw.get("split", {}) or {}),
        decoder=dict(raw.get("decoder", {}) or {}),
        source=source,
        modality=modality,
    )


def _resolve_bases(layer: dict[str, tuple[dict, str]],
                   earlier: dict[str, tuple[dict, str]]) -> dict[str, tuple[dict, str]]:
    """Expand ``base: NAME`` by merging the named entry's fields (mappings one level deep).

    ``NAME`` is looked up in the same file first, then in the files read before it; an entry
    whose base is its own name starts from the earlier file's entry of that name (an override).
    """
    out: dict[str, tuple[dict, str]] = {}

    def expand(name: str, stack: tuple[str, ...]) -> dict:
        if name in out:
            return out[name][0]
        raw, source = layer[name]
        if not isinstance(raw, Mapping) or "base" not in raw:
            out[name] = (raw, source)
            return raw
        base = raw["base"]
        if base == name and name in earlier:
            parent = earlier[name][0]
        elif base in stack or base == name:
            raise RegistryError(f"{source}: entry '{name}': 'base' chain loops through '{base}'")
        elif base in layer:
            parent = expand(base, stack + (name,))
        elif base in earlier:
            parent = earlier[base][0]
        else:
            raise RegistryError(f"{source}: entry '{name}': 'base' names unknown entry '{base}'")
        merged = copy.deepcopy(parent)
        for key, value in raw.items():
            if key == "base":
                continue
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        out[name] = (merged, source)
        return merged

    for name in layer:
        expand(name, ())
    return out


class Registry:
    """Validated encoder entries by name, from the default file and any user files."""

    def __init__(self, entries: Mapping[str, EncoderEntry], files: Iterable[str] = ()):
        self.entries = dict(entries)
        self.files = list(files)

    @classmethod
    def load(cls, user_files: Iterable[str | Path] = (), *, use_env: bool = True) -> "Registry":
        """Read the packaged registry, then ``PRISM_PROBE_REGISTRY``, then ``user_files``."""
        default = resources.files("prism_probe").joinpath("encoders.yaml")
        layers = [("encoders.yaml", _read_yaml("encoders.yaml", default.read_text()))]
        paths = []
        if use_env and os.environ.get(REGISTRY_ENV):
            paths += [p for p in os.environ[REGISTRY_ENV].split(os.pathsep) if p]
        paths += [str(p) for p in user_files]
        for path in paths:
            layers.append((path, _read_yaml(path)))
        resolved: dict[str, tuple[dict, str]] = {}
        for source, encoders in layers:
            layer = {}
            for name, raw in encoders.items():
                if not isinstance(name, str) or not name or ":" in name or " " in name:
                    raise RegistryError(f"{source}: entry name {name!r} must be a non-empty "
                                        "string without ':' or spaces")
                layer[name] = (raw, source)
            resolved.update(_resolve_bases(layer, resolved))
        entries = {name: _validate(name, raw, src) for name, (raw, src) in resolved.items()}
        return cls(entries, [p for p, _ in layers])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> EncoderEntry:
        """The entry called ``name``, or an error that suggests the closest names."""
        if name in self.entries:
            return self.entries[name]
        close = difflib.get_close_matches(name, self.entries, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RegistryError(
            f"unknown encoder '{name}'{hint} (`prism-probe encoders` lists them; a file given with "
            "--registry can add one)")


@dataclass(frozen=True)
class EncoderSpec:
    """What a user names on the command line.

    ``NAME`` is a registry entry; ``random:NAME`` the same architecture with random weights (the
    standard control in representation analysis); ``pixels`` / ``pixels:P`` the image itself
    rearranged into a P×P patch grid (P = 16 by default, ``pixels:1`` the image at pixel
    resolution); ``uae:RUN`` a trained UAE run folder.
    """

    text: str
    entry: EncoderEntry
    random_init: bool = False
    run_dir: str | None = None

    @property
    def label(self) -> str:
        return self.text


def parse_spec(text: str, registry: Registry) -> EncoderSpec:
    """Turn ``dinov2-b``, ``random:dinov2-b``, ``pixels:8`` or ``uae:RUN`` into an EncoderSpec."""
    head, sep, rest = text.partition(":")
    if sep and head == "random":
        entry = registry.get(rest)
        if entry.backend in ("pixels", "uae"):
            raise RegistryError(f"'{text}': the {entry.backend} backend has no random variant")
        return EncoderSpec(text, entry, random_init=True)
    if head == "pixels":
        patch = 16
        if sep:
            if not rest.isdigit() or int(rest) < 1:
                raise RegistryError(f"'{text}': the patch size after 'pixels:' must be a positive "
                                    "integer, e.g. pixels:16 or pixels:1")
            patch = int(rest)
        base = registry.get("pixels")
        options = {**base.options, "patch": patch}
        entry = EncoderEntry(**{**base.__dict__, "name": f"pixels:{patch}", "options": options})
        return EncoderSpec(text, entry)
    if sep and head == "uae":
        base = registry.get("uae")
        entry = EncoderEntry(**{**base.__dict__, "name": text, "id": rest})
        return EncoderSpec(text, entry, run_dir=rest)
    return EncoderSpec(text, registry.get(text))
