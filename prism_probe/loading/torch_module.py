"""The ``torch_module`` backend: any importable torch module plus a state dict file.

An entry names the module and which submodule's output is the feature map::

    my-net:
      family: semantic
      backend: torch_module
      id: my_package.models:MyNet        # "module.path:Attribute" (dots after ':' allowed)
      options: {width: 64,               # constructor keyword arguments, except the two below
                state_dict_key: model,   # optional: the state dict is checkpoint["model"]
                strip_prefix: "module."} # optional: removed from every key that starts with it
      weights: {file: my_net.safetensors}   # safetensors, or a pickle torch reads weights-only
      input: {size: 224, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
      features: {layer: body.3}          # dotted submodule name; its output is the map
      split: {points: [body.1, body.3]}  # optional, see below

Feature layer: the output of submodule ``features.layer`` (taken by a forward hook; the rest of
the forward pass is skipped) is either a (B, C, h, w) map or (B, N, C) tokens. Tokens need
``features.prefix_tokens`` (leading tokens to drop, default 0) and optionally
``features.grid: [h, w]`` (default: a square grid of the remaining tokens). A tuple or list output
contributes its first element. Without ``features.layer`` the module's own output is the map.

Split points (for feature ablation): declared in ``split.points``. If the module defines
``split(at) -> (head, tail)`` it is used as is. Otherwise the module must be an
``nn.Sequential`` and each point names one of its top-level children: ``head`` runs the children
up to and including that one, ``tail`` the rest, so ``tail`` returns whatever the module returns
(logits for a classifier). Nested points are not supported.

Trust: the entry's id is imported and called. A class derived from ``torch.nn.Module`` is
built freely; any other callable (a factory function) runs only when the entry sets
``trust_remote_code: true``, since a registry file could otherwise name an arbitrary function.
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ..errors import PrismError, RegistryError, WeightsError
from ..registry import EncoderEntry
from ..weights import ResolvedWeights, load_state_dict
from . import make_preprocess
from .base import Encoder, FeatureMap, tokens_to_grid

RESERVED_OPTIONS = ("state_dict_key", "strip_prefix")


class _Captured(Exception):
    """Raised by the feature hook to stop the forward pass once the feature layer has run."""


def resolve_target(entry: EncoderEntry) -> Callable[..., Any]:
    """The class or factory named by ``entry.id`` ("package.module:Attr")."""
    ident = str(entry.id)
    module_name, sep, attr = ident.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"entry '{entry.name}': torch_module id must be "
                            f"'package.module:ClassOrFactory', got {ident!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PrismError(f"entry '{entry.name}': cannot import '{module_name}' ({exc}); install "
                         "the package that defines it or put it on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RegistryError(f"entry '{entry.name}': '{module_name}' has no attribute "
                                f"'{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise RegistryError(f"entry '{entry.name}': '{ident}' is not callable")
    is_module_class = isinstance(target, type) and issubclass(target, nn.Module)
    if not is_module_class and not entry.trust_remote_code:
        raise RegistryError(f"entry '{entry.name}': '{ident}' is not an nn.Module class; calling "
                            "a factory function needs 'trust_remote_code: true' in the entry")
    return target


def select_state_dict(raw: Any, entry: EncoderEntry, path) -> dict[str, torch.Tensor]:
    """Apply ``options.state_dict_key`` and ``options.strip_prefix`` to a loaded file."""
    key = entry.options.get("state_dict_key")
    if key is not None:
        if not isinstance(raw, dict) or key not in raw:
            have = ", ".join(map(str, list(raw)[:6])) if isinstance(raw, dict) else "not a dict"
            raise WeightsError(f"{path}: no key {key!r} (options.state_dict_key of "
                               f"'{entry.name}'); top-level keys: {have}")
        raw = raw[key]
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(raw).__name__}; set "
                           "options.state_dict_key if the weights are nested in a checkpoint")
    prefix = entry.options.get("strip_prefix")
    if prefix:
        raw = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
    return raw


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], path) -> None:
    """Strict load; a mismatch is one WeightsError naming the first bad keys."""
    own = model.state_dict()
    problems = []
    for label, keys in (("missing", [k for k in own if k not in sd]),
                        ("unexpected", [k for k in sd if k not in own]),
                        ("wrong-shape", [k for k, v in sd.items() if k in own
                                         and tuple(v.shape) != tuple(own[k].shape)])):
        if keys:
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            problems.append(f"{label} keys {', '.join(keys[:4])}{more}")
    if problems:
        raise WeightsError(f"{path}: the state dict does not fit the module: "
                           + "; ".join(problems)
                           + " (options.strip_prefix / state_dict_key may fix it)")
    model.load_state_dict(sd, strict=True)


def _as_map(out: Any, entry: EncoderEntry, pixels: torch.Tensor) -> FeatureMap:
    if isinstance(out, (tuple, list)):
        out = out[0]
    layer = str(entry.features.get("layer", "output"))
    prefix = int(entry.features.get("prefix_tokens", 0))
    if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PrismError(f"encoder '{entry.name}': layer '{layer}' gave {shape}; a feature map "
                         "must be (B, C, h, w) or (B, N, C) tokens")
    if out.ndim == 3:
        grid = entry.features.get("grid")
        if grid is None:
            side = math.isqrt(out.shape[1] - prefix)
            grid = (side, side)
        out = tokens_to_grid(out, (int(grid[0]), int(grid[1])), prefix)
    return FeatureMap(out, layer=layer, stride=pixels.shape[-2] / out.shape[-2],
                      prefix_tokens=prefix)


def _sequential_split(model: nn.Module, points, entry: EncoderEntry):
    if hasattr(model, "split") and callable(model.split):
        return model.split
    if not isinstance(model, nn.Sequential):
        raise RegistryError(f"entry '{entry.name}': split points need an nn.Sequential module "
                            "or one that defines split(at)")
    names = [name for name, _ in model.named_children()]
    bad = [p for p in points if p not in names]
    if bad:
        raise RegistryError(f"entry '{entry.name}': split point '{bad[0]}' is not a top-level "
                            f"child of the Sequential; children: {', '.join(names)}")

    def split(at: str):
        if at not in points:
            raise PrismError(f"encoder '{entry.name}': split point must be one of "
                             f"{', '.join(points)}, got {at!r}")
        # Plain Sequentials, not model[:cut]: slicing re-calls a subclass's own constructor.
        cut = names.index(at) + 1
        children = list(model.named_children())
        head = nn.Sequential(OrderedDict(children[:cut]))
        return head, nn.Sequential(OrderedDict(children[cut:]))

    return split


def build(entry: EncoderEntry, *, weights: ResolvedWeights, device, image_size=None,
          dirs=()) -> Encoder:
    """Build the module named by ``entry.id`` and load its state dict (module docstring)."""
    target = resolve_target(entry)
    kwargs = {k: v for k, v in entry.options.items() if k not in RESERVED_OPTIONS}
    model = target(**kwargs)
    if not isinstance(model, nn.Module):
        raise RegistryError(f"entry '{entry.name}': '{entry.id}' returned "
                            f"{type(model).__name__}, not a torch.nn.Module")
    if not weights.random:
        if weights.path is None or weights.path.is_dir():
            raise WeightsError(f"entry '{entry.name}': the torch_module backend loads one local "
                               f"state dict file; got {weights.location!r}")
        raw = load_state_dict(weights.path, what=f"weights of '{entry.name}'")
        load_weights(model, select_state_dict(raw, entry, weights.path), weights.path)
    model.to(device).eval().requires_grad_(False)

    layer_name = entry.features.get("layer")
    hooked = None
    if layer_name is not None:
        try:
            hooked = model.get_submodule(str(layer_name))
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][:12]
            raise RegistryError(f"entry '{entry.name}': features.layer '{layer_name}' is not a "
                                f"submodule; some names: {', '.join(names)}") from None

    def forward(pixels: torch.Tensor) -> FeatureMap:
        if hooked is None:
            return _as_map(model(pixels), entry, pixels)
        store: dict[str, Any] = {}

        def hook(_module, _inputs, output):
            store["out"] = output
            raise _Captured

        handle = hooked.register_forward_hook(hook)
        try:
            model(pixels)
        except _Captured:
            pass
        finally:
            handle.remove()
        if "out" not in store:
            raise PrismError(f"encoder '{entry.name}': layer '{layer_name}' never ran in the "
                             "forward pass")
        return _as_map(store["out"], entry, pixels)

    points = list(entry.split.get("points", []) or [])
    split = _sequential_split(model, points, entry) if points else None
    return Encoder(entry, model, make_preprocess(entry, image_size), forward,
                   weights=weights.info(), split=split, library={"torch": torch.__version__})
