"""Sequences: 1-D spectra of hidden states along the token axis, per layer, for text, code and
protein encoders.

>>> from prism_probe.sequence import read_sequences, measure_sequence_spectra
>>> seqs = read_sequences("prots.fasta")                           # doctest: +SKIP
>>> profiles = measure_sequence_spectra(["esm2-8m"], seqs)         # doctest: +SKIP

Input is a text file with one sequence per line (blank lines skipped) or a FASTA file (records
``>name`` followed by sequence lines, joined), read by :func:`read_sequences` and tokenized by
the entry's tokenizer, truncated to ``input.max_tokens``. Token ids can be given directly instead
(:func:`measure_sequence_encoder` ``token_ids=``), which is how the tests run offline.

Measured tokens: those the attention mask keeps, minus special tokens (the tokenizer's special
token mask, or the entry's ``special_ids`` for token ids), so CLS/BOS, SEP/EOS, language codes
and padding never enter a spectrum; each sequence is measured on its own valid length and the
bins are of fixed width in cycles per token (:mod:`prism_probe.spectra_nd`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import ImageSourceError, PrismError
from .spectra_nd import SequenceSpectrumConfig, TokenSpectrumAccumulator, token_band_filter

log = logging.getLogger("prism_probe")


def read_sequences(path: str | Path) -> list[tuple[str, str]]:
    """(name, sequence) pairs from a FASTA file or a text file of one sequence per line.

    A file whose first non-blank line starts with ``>`` is FASTA; names are the header lines
    (without ``>``), sequence lines are joined without spaces. Otherwise every non-blank line is
    one sequence, named by its line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageSourceError(f"{path}: cannot read sequences ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ImageSourceError(f"{path}: not UTF-8 text; --text takes a text or FASTA file")
    lines = [ln.rstrip("\r") for ln in text.splitlines()]
    body = [ln for ln in lines if ln.strip()]
    if not body:
        raise ImageSourceError(f"{path}: holds no sequence")
    if body[0].lstrip().startswith(">"):
        records: list[tuple[str, str]] = []
        name, parts = None, []
        for ln in body:
            if ln.startswith(">"):
                if name is not None:
                    records.append((name, "".join(parts)))
                name, parts = ln[1:].strip(), []
            elif name is None:
                raise ImageSourceError(f"{path}: FASTA sequence line before any '>' header")
            else:
                parts.append(ln.strip())
        records.append((name, "".join(parts)))
        empty = [n for n, s in records if not s]
        if empty:
            log.warning("%s: %d FASTA record(s) without sequence left out (%s)", path,
                        len(empty), ", ".join(empty[:3]))
        return [(n, s) for n, s in records if s]
    return [(f"line {i + 1}", ln.strip()) for i, ln in enumerate(lines) if ln.strip()]


def pad_token_ids(token_ids: Sequence[Sequence[int]], pad_id: int,
                  max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, n_truncated) of lists of ids, right-padded with ``pad_id``."""
    rows = [list(map(int, ids)) for ids in token_ids]
    n_trunc = 0
    if max_tokens is not None:
        n_trunc = sum(len(r) > max_tokens for r in rows)
        rows = [r[:max_tokens] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask, n_trunc


def _batches(encoder, texts, token_ids, batch_size: int):
    """(input_ids, attention_mask, special_tokens_mask or None, n_truncated) per batch."""
    if token_ids is not None:
        for start in range(0, len(token_ids), batch_size):
            ids, mask, n_trunc = pad_token_ids(token_ids[start:start + batch_size],
                                               encoder.pad_id, encoder.max_tokens)
            yield ids, mask, None, n_trunc
        return
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = encoder.tokenize(chunk)
        lengths = [len(encoder.tokenizer()(t, add_special_tokens=True)["input_ids"])
                   for t in chunk]
        n_trunc = sum(n > encoder.max_tokens for n in lengths)
        yield enc["input_ids"], enc["attention_mask"], enc["special_tokens_mask"], n_trunc


def measure_sequence_encoder(encoder, texts: Sequence[str] | None = None, *,
                             token_ids: Sequence[Sequence[int]] | None = None,
                             config: SequenceSpectrumConfig = SequenceSpectrumConfig(),
                             batch_size: int = 16, source: str = "", progress=None):
    """Per-layer token-axis spectra of one loaded sequence encoder; returns a Profile.

    Parameters
    ----------
    encoder : :class:`prism_probe.loading.sequence_backend.SequenceEncoder`
    texts : sequences as strings (tokenized by the entry's tokenizer), or
    token_ids : lists of token ids, special tokens included as the model expects them
        (excluded from the measure by the entry's ``special_ids``); padding is added here.
    config : SequenceSpectrumConfig
    """
    from .profile import Profile, library_versions

    if (texts is None) == (token_ids is None):
        raise PrismError("give either texts or token_ids")
    n_in = len(texts if texts is not None else token_ids)
    if n_in == 0:
        raise PrismError("no sequence to measure")
    accs = [TokenSpectrumAccumulator(config) for _ in encoder.layer_names]
    digest = hashlib.sha256()
    n_trunc = 0
    task = progress.add_task(encoder.label, total=n_in) if progress else None
    for ids, attn, special, trunc in _batches(encoder, texts, token_ids, batch_size):
        n_trunc += trunc
        valid = encoder.valid_mask(ids, attn, special)
        for row, keep in zip(ids, valid):
            digest.update(row[keep].numpy().astype(np.int64).tobytes())
            digest.update(b"/")
        states = encoder.hidden_states(ids, attn)
        if len(states) != len(accs):
            raise PrismError(f"'{encoder.label}' returned {len(states)} hidden states; expected "
                             f"{len(accs)} (embeddings + {len(accs) - 1} layers)")
        for acc, h in zip(accs, states):
            if not torch.isfinite(h).all():
                raise PrismError(f"encoder '{encoder.label}' gave non-finite hidden states")
            acc.update(h, valid.to(h.device))
        if progress:
            progress.update(task, advance=len(ids))
    if n_trunc:
        log.warning("%s: %d sequence(s) truncated to %d tokens", encoder.label, n_trunc,
                    encoder.max_tokens)
    results = [acc.result() for acc in accs]
    for r in results:
        r.pop("config")
        r.pop("freqs")
    first = results[0]
    log.info("%s: %d sequences used, %d shorter than %d valid tokens skipped", encoder.label,
             first["n_sequences"], first["n_short"], config.min_tokens)
    result = {"freqs": config.freqs.tolist(), "layer_names": list(encoder.layer_names),
              "layers": results, "config": config.to_dict()}
    protocol = {
        "modality": "sequence",
        "measure": "1-D power spectrum along tokens per layer + DCT band energy",
        "spectrum": config.to_dict(),
        "units": "token",
        "layers": list(encoder.layer_names),
        "max_tokens": encoder.max_tokens,
        "excluded_tokens": "padding (attention mask) and special tokens "
                           + ("(tokenizer mask)" if texts is not None else "(entry special_ids)"),
        "input": "text" if texts is not None else "token ids",
        "dtype": "float32",
    }
    images = {"source": source or ("token ids" if token_ids is not None else "texts"),
              "n_sequences": n_in, "n_used": first["n_sequences"],
              "n_skipped": first["n_short"], "n_truncated": n_trunc,
              "digest": digest.hexdigest()}
    env = library_versions()
    env.update(device=str(encoder.device), batch_size=batch_size,
               threads=torch.get_num_threads())
    return Profile(kind="spectrum", encoder=encoder.describe(), protocol=protocol,
                   images=images, result=result, environment=env)


def load_sequence_encoder(spec, *, registry=None, weights_dir=None, device="cpu"):
    """A sequence entry's encoder; other modalities are refused with the option to use."""
    from .loading import load_encoder
    from .registry import Registry, parse_spec

    registry = registry or Registry.load()
    if isinstance(spec, str):
        spec = parse_spec(spec, registry)
    if spec.entry.modality != "sequence":
        raise PrismError(f"'{spec.text}' is an {spec.entry.modality} encoder; --text measures "
                         "sequence entries (`prism-probe encoders` lists them)")
    return load_encoder(spec, registry=registry, weights_dir=weights_dir, device=device)


def measure_sequence_spectra(encoders: Sequence[str], sequences: Sequence[tuple[str, str]], *,
                             registry=None, weights_dir=None, device: str = "auto",
                             seed: int = 0,
                             config: SequenceSpectrumConfig = SequenceSpectrumConfig(),
                             batch_size: int = 16, source: str = "", progress=None) -> list:
    """Measure each sequence entry on the same (name, sequence) pairs."""
    from .loading import resolve_device
    from .registry import Registry, parse_spec

    if not encoders:
        raise PrismError("name the sequence encoders to measure, e.g. esm2-8m bert-base")
    registry = registry or Registry.load()
    specs = [parse_spec(e, registry) for e in encoders]
    texts = [s for _, s in sequences]
    dev = str(resolve_device(device))
    profiles = []
    for spec in specs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = load_sequence_encoder(spec, registry=registry, weights_dir=weights_dir,
                                        device=dev)
        profiles.append(measure_sequence_encoder(enc, texts, config=config,
                                                 batch_size=batch_size, source=source,
                                                 progress=progress))
        del enc
    return profiles


def ablate_sequence(encoder, token_ids: Sequence[Sequence[int]], cutoffs: Sequence[float], *,
                    layer: int = 0, band: str = "low", transition: float = 0.0,
                    batch_size: int = 16) -> dict[str, Any]:
    """Band ablation along tokens: filter block ``layer``'s output, let the model continue.

    The output of transformer block ``layer`` is low- or high-passed along each sequence's
    valid tokens (:func:`prism_probe.spectra_nd.token_band_filter`; special tokens and padding
    unchanged) by a forward hook, and the model runs its remaining blocks with its own attention
    mask.

    Returns
    -------
    dict
        ``cutoffs`` (cycles per token); ``cosine``: mean over valid tokens of the cosine
        similarity between the ablated and clean last hidden states; ``relative_change``
        (``||ablated - clean|| / ||clean||`` over valid tokens); ``kept_energy`` (share of the
        filtered layer's valid-token energy the band keeps); settings.
    """
    blocks = encoder.blocks
    if not -len(blocks) <= layer < len(blocks):
        raise PrismError(f"layer {layer}: '{encoder.label}' has blocks 0..{len(blocks) - 1}")
    state: dict[str, Any] = {"cutoff": None}

    def hook(_module, _inputs, output):
        if state["cutoff"] is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        mask = state["valid"].to(hidden.device)
        y = token_band_filter(hidden, mask, state["cutoff"], band, transition=transition)
        state["kept"] = (float(y[mask].square().sum()), float(hidden[mask].square().sum()))
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y

    handle = blocks[layer].register_forward_hook(hook)
    sums = {c: np.zeros(4) for c in cutoffs}  # cosine sum, token count, |Δ|², |clean|²
    kept = {c: [0.0, 0.0] for c in cutoffs}
    try:
        for ids, attn, _, _ in _batches(encoder, None, token_ids, batch_size):
            valid = encoder.valid_mask(ids, attn)
            state["cutoff"] = None
            clean = encoder.hidden_states(ids, attn)[-1][valid]
            for c in cutoffs:
                state["cutoff"], state["valid"] = c, valid
                out = encoder.hidden_states(ids, attn)[-1][valid]
                cos = torch.nn.functional.cosine_similarity(out, clean, dim=-1)
                sums[c] += [float(cos.sum()), cos.numel(), float((out - clean).square().sum()),
                            float(clean.square().sum())]
                kept[c][0] += state["kept"][0]
                kept[c][1] += state["kept"][1]
    finally:
        handle.remove()
        state["cutoff"] = None
    return {"mode": "tokens", "band": band, "layer": layer, "transition": transition,
            "units": "cycles per token", "cutoffs": list(cutoffs),
            "cosine": [float(sums[c][0] / max(sums[c][1], 1)) for c in cutoffs],
            "relative_change": [float(np.sqrt(sums[c][2] / max(sums[c][3], 1e-30)))
                                for c in cutoffs],
            "kept_energy": [kept[c][0] / max(kept[c][1], 1e-30) for c in cutoffs]}


def sequence_table(profiles):
    """One row per encoder and layer: sequences, low-band share, centroid, slope, e(1)."""
    from rich.table import Table

    table = Table(title="Token-axis spectra of hidden states (cycles per token)",
                  caption="values: mean over sequences [95 % interval]")
    for col in ("encoder", "layer", "sequences", "low share", "centroid", "slope", "e(1)"):
        table.add_column(col, justify="left" if col in ("encoder", "layer") else "right")
    for p in profiles:
        for name, layer in zip(p.result["layer_names"], p.result["layers"]):
            row = [p.label, name, str(layer["n_sequences"])]
            for key in ("low_band_share", "centroid", "slope"):
                s = layer["summaries"][key]
                if s["mean"] is None:
                    row.append("—")
                elif s["ci95"] is None:
                    row.append(f"{s['mean']:.3f}")
                else:
                    row.append(f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
            e = layer["dct_band_energy"]
            row.append(f"{e[0]:.3f}" if e else "—")
            table.add_row(*row)
    return table
