"""The transformers sequence backend: encoders of text (BERT), code (PLBART) and proteins (ESM-2).

Weights are found exactly as for the transformers image backend (hub cache, a saved folder, a
single file into the architecture of ``options.config``, or ``random:NAME`` from that config;
:mod:`prism_probe.loading.transformers_backend`). Encoder-decoder models (PLBART) contribute
their encoder only.

Entry options besides ``config`` and ``dtype``:

- ``tokenizer``: the hub id of the tokenizer (read from the Hugging Face cache, or from a saved
  model folder when the weights are one). Tokenizer vocabularies are never fetched offline;
  without one, feed token ids through the Python API.
- ``special_ids``: token ids that are never measured (CLS/BOS, SEP/EOS, padding, mask, language
  codes). With a tokenizer its own special-token mask is used instead.

Features: every layer's hidden states, ``hidden_states`` as the library returns them
(embeddings output first, labelled ``embeddings``, then ``layers.0`` …); ``features.layer`` is
``all`` (the default) or one index into that list.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers

from .. import weights as W
from ..errors import PrismError, WeightsError
from ..registry import EncoderEntry
from .base import WeightsInfo, model_dtype, place
from .transformers_backend import _create

SEQUENCE_OPTIONS = ("tokenizer", "special_ids")
_ENCODER_DECODER = ("plbart", "bart", "mbart", "t5")


def _blocks(module: torch.nn.Module, depth: int) -> list[torch.nn.Module]:
    """The transformer blocks: the first ModuleList of ``depth`` modules under ``module``."""
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) == depth:
            return list(child)
    raise PrismError(f"cannot find the {depth} transformer blocks of {type(module).__name__}")


class SequenceEncoder:
    """A loaded sequence encoder: token ids in, hidden states of every layer out.

    Attributes
    ----------
    entry, label, weights, library
        As for image encoders (:class:`prism_probe.loading.base.Encoder`).
    model : torch.nn.Module
        The encoder (for encoder-decoder models, their encoder).
    blocks : list of torch.nn.Module
        Its transformer blocks in order (for ablation hooks).
    special_ids : tuple of int
    pad_id : int
    max_tokens : int
    """

    modality = "sequence"

    def __init__(self, entry: EncoderEntry, model, *, weights: WeightsInfo, pad_id: int,
                 special_ids: Sequence[int], tokenizer: str | None, tokenizer_dir: Path | None,
                 depth: int):
        self.entry = entry
        self.model = model
        self.label = entry.name
        self.weights = weights
        self.pad_id = int(pad_id)
        self.special_ids = tuple(int(i) for i in special_ids)
        self.tokenizer_name = tokenizer
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer = None
        self.max_tokens = int(entry.input["max_tokens"])
        self.blocks = _blocks(model, depth)
        self.layer_names = ["embeddings"] + [f"layers.{i}" for i in range(depth)]
        self.library = {"transformers": transformers.__version__}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenizer(self):
        """The entry's tokenizer, from a saved folder or the hub cache (offline-safe)."""
        if self._tokenizer is not None:
            return self._tokenizer
        from transformers import AutoTokenizer

        sources = [str(self._tokenizer_dir)] if self._tokenizer_dir else []
        if self.tokenizer_name:
            sources.append(self.tokenizer_name)
        if not sources:
            raise PrismError(f"entry '{self.entry.name}' names no tokenizer (options.tokenizer); "
                             "feed token ids through the Python API")
        errors = []
        for src in sources:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    src, local_files_only=W.offline() or Path(src).is_dir())
                return self._tokenizer
            except (OSError, ValueError) as exc:
                errors.append(f"{src}: {str(exc).strip().splitlines()[0][:120]}")
        raise WeightsError(
            f"tokenizer for '{self.entry.name}' not found ({'; '.join(errors)}): put the "
            f"tokenizer files of '{self.tokenizer_name}' in the hub cache or in the model "
            "folder given with --weights DIR; without a tokenizer, feed token ids through "
            "prism_probe.sequence.measure_sequence_encoder(token_ids=...)")

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``special_tokens_mask`` (B, L), padded and
        truncated to ``max_tokens``."""
        tok = self.tokenizer()
        enc = tok(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                  return_special_tokens_mask=True, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "special_tokens_mask")}

    def valid_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   special_tokens_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens to measure: attended to, and not special (tokenizer mask, else the ids)."""
        if special_tokens_mask is None:
            ids = torch.tensor(self.special_ids, dtype=input_ids.dtype, device=input_ids.device)
            special_tokens_mask = torch.isin(input_ids, ids)
        return attention_mask.bool() & ~special_tokens_mask.bool()

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states (B, L, C) of the embeddings and of every layer, float32."""
        dev = self.device
        out = self.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                         output_hidden_states=True)
        return tuple(h.float() for h in out.hidden_states)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "entry": self.entry.to_dict(),
                "weights": self.weights.to_dict(),
                "preprocess": {"tokenizer": self.tokenizer_name, "max_tokens": self.max_tokens,
                               "special_ids": list(self.special_ids)},
                "library": dict(self.library)}


def build(entry: EncoderEntry, *, weights: W.ResolvedWeights, device, image_size, dirs):
    """Build a sequence encoder (module docstring); ``image_size`` does not apply."""
    if image_size is not None:
        raise PrismError(f"--image-size does not apply to the sequence model '{entry.name}'")
    # Only the architecture's own options become config fields.
    core = replace(entry, options={k: v for k, v in entry.options.items()
                                   if k not in SEQUENCE_OPTIONS})
    dtype = model_dtype(entry)
    model = _create(core, weights, dirs)
    config = model.config
    if config.model_type in _ENCODER_DECODER:
        model = model.get_encoder()
    depth = int(getattr(config, "num_hidden_layers", None) or config.encoder_layers)
    model = place(model, device, dtype)
    special = entry.options.get("special_ids")
    if special is None:
        special = [i for i in (getattr(config, k, None) for k in
                               ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id",
                                "sep_token_id", "mask_token_id")) if i is not None]
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    folder = weights.path if weights.path is not None and weights.path.is_dir() else None
    return SequenceEncoder(entry, model, weights=weights.info(), pad_id=pad, special_ids=special,
                           tokenizer=entry.options.get("tokenizer"), tokenizer_dir=folder,
                           depth=depth)
