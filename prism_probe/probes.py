"""Band-ablation probes: remove a band of spatial frequencies and measure what is lost.

>>> from prism_probe.probes import AblationConfig, run_ablation
>>> profile = run_ablation("resnet20-cifar", AblationConfig(mode="input"),
...                        test="cifar10-small/test", weights_dir="weights/")  # doctest: +SKIP

Three probes, each a causal test of the Prism Hypothesis:

``input``
    Filter the preprocessed images themselves (after the encoder's normalisation, so a high-pass
    sets each channel to the normalisation mean, i.e. 0 in the encoder's input space), encode
    and score. Cutoffs are in **cycles per input pixel** (Nyquist 0.5): the UAE paper's
    retrieval experiment, whose "fraction of Nyquist" is twice these numbers.
``feature``
    Cut the model at a split point (``encoder.split(layer)``), filter the map there and let
    the model's own forward pass continue to its pooled features. Cutoffs are in **cycles per
    cell** of that map. For ViTs the prefix tokens (CLS, registers) pass unfiltered. Ablating
    the last map before a global pool is refused: the pool only sees each channel's mean, so a
    low-pass changes nothing and a high-pass only removes the mean.
``latent``
    Filter an autoencoder's latent, decode, and compare with the image and with the unfiltered
    reconstruction (PSNR, SSIM; :mod:`prism_probe.metrics`), plus the radial power spectrum of
    the reconstructions against that of the images. Cutoffs in **cycles per latent cell**.

Bands: ``low`` keeps ``|f| <= cutoff``, ``high`` keeps the complement (so low + high at one
cutoff is the identity), ``all`` is the identity. A radial cutoff of at least √2 · 0.5 cycles
per cell reaches the corners of the spectrum, so ``low`` there is the identity too, and ``low``
at cutoff 0 keeps only each channel's mean. Filters come from :mod:`prism_probe.bands`.

Semantic scores (``input`` and ``feature`` modes), all from pooled features (the mean of the
encoder's feature map over the grid in ``input`` mode; the split's own pooled output in
``feature`` mode):

- ``head_top1``: top-1 accuracy (%) of the model's own classifier head, when it has one and
  the test images carry labels (``test`` in ImageFolder layout).
- ``knn_top1``: cosine kNN, k = 20, votes weighted by ``exp(cos / 0.07)`` (the DINO protocol),
  with the bank of **unablated** training features.
- ``linear_top1``: multinomial logistic regression fit in torch on the unablated training
  features (standardised), evaluated on the ablated test features.
- ``cosine``: mean cosine similarity of each image's ablated pooled feature to its unablated
  one; needs no labels.

So the probes read "how much of what a clean-trained reader relies on survives the ablation".
Unablated features are computed once and reused by every condition: a sweep costs one encoder
pass per (band, cutoff) plus one unablated pass (and one over the training images).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import ImageList, collect_images, iterate_batches, load_image_folder
from .errors import PrismError
from .loading import load_encoder, resolve_device
from .loading.base import Encoder, check_finite
from .measure import Distributed, _autocast
from .metrics import psnr, ssim
from .profile import Profile, library_versions
from .registry import Registry, parse_spec

log = logging.getLogger("prism_probe")

MODES = ("input", "feature", "latent")
BANDS = ("low", "high", "all")
DOMAINS = ("fft", "dct")
#: The radial frequency of a spectrum's corner (0.5, 0.5): a low-pass at or above it passes all.
CORNER = math.sqrt(2) * 0.5
KNN_K = 20
KNN_T = 0.07
#: Per-image PSNR is capped here (dB) so that identical images (MSE 0, PSNR ∞) stay JSON numbers.
PSNR_CAP = 100.0
#: Reconstruction spectra are summarised by their power share above this (cycles per pixel).
HIGH_SHARE_FROM = 0.25


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationConfig:
    """What to ablate and how to score it; recorded in the profile's protocol.

    Parameters
    ----------
    mode : {"input", "feature", "latent"}
        Where the filter acts (module docstring).
    bands : sequence of {"low", "high", "all"}
        Band types to sweep; ``all`` (the identity) is measured once, not per cutoff.
    cutoffs : sequence of float
        Radial cutoffs, >= 0, in cycles per input pixel (``input``) or per cell (``feature``,
        ``latent``).
    layer : str, optional
        Split point for ``feature`` mode (``layer1``, ``layer2`` for CIFAR ResNets;
        ``blocks.K`` for timm ViTs).
    domain : {"fft", "dct"}
        FFT: radial rings of ``|f|``; DCT: coefficients (u, v) of frequency
        ``hypot(u / 2h, v / 2w)`` (see :mod:`prism_probe.bands`).
    transition : float
        Width of a raised-cosine transition, in the cutoff's units; 0 is an ideal mask.
    knn_k, knn_temperature : int, float
        kNN neighbours and vote temperature.
    probe_weight_decay : float
        L2 penalty ``λ/2 · ||W||²`` of the linear probe (on standardised features).
    probe_max_iter : int
        L-BFGS iterations of the linear probe.
    seed : int
        Seeds the linear probe's initial weights.
    """

    mode: str = "input"
    bands: tuple[str, ...] = ("low", "high")
    cutoffs: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    layer: str | None = None
    domain: str = "fft"
    transition: float = 0.0
    knn_k: int = KNN_K
    knn_temperature: float = KNN_T
    probe_weight_decay: float = 1e-3
    probe_max_iter: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.mode not in MODES:
            raise PrismError(f"--mode {self.mode}: use one of {', '.join(MODES)}")
        bands = tuple(str(b).strip() for b in self.bands)
        bad = [b for b in bands if b not in BANDS]
        if bad or not bands:
            raise PrismError(f"--bands {','.join(bands)}: each band must be one of "
                             f"{', '.join(BANDS)}")
        set_(self, "bands", tuple(dict.fromkeys(bands)))
        cutoffs = tuple(float(c) for c in self.cutoffs)
        if any(not math.isfinite(c) or c < 0 for c in cutoffs):
            raise PrismError(f"--cutoffs {','.join(map(str, cutoffs))}: cutoffs must be finite "
                             "and >= 0 (cycles per pixel or per cell)")
        if not cutoffs and any(b != "all" for b in bands):
            raise PrismError("--cutoffs is empty: give at least one cutoff for low/high bands")
        set_(self, "cutoffs", tuple(sorted(set(cutoffs))))
        if self.domain not in DOMAINS:
            raise PrismError(f"--domain {self.domain}: use fft or dct")
        if not self.transition >= 0:
            raise PrismError(f"--transition {self.transition}: must be >= 0 (0: ideal mask)")
        if self.mode == "feature" and not self.layer:
            raise PrismError("--mode feature needs --layer (a split point such as layer2 for "
                             "CIFAR ResNets or blocks.6 for timm ViTs)")
        if self.knn_k < 1 or not self.knn_temperature > 0:
            raise PrismError(f"kNN needs k >= 1 and temperature > 0, got k={self.knn_k}, "
                             f"T={self.knn_temperature}")

    @property
    def units(self) -> str:
        """``"pixel"`` (cycles per input pixel) for input ablation, else ``"cell"``."""
        return "pixel" if self.mode == "input" else "cell"

    def conditions(self) -> list[tuple[str, float | None]]:
        """The (band, cutoff) pairs measured, ``("all", None)`` first when asked for."""
        out: list[tuple[str, float | None]] = []
        if "all" in self.bands:
            out.append(("all", None))
        for band in self.bands:
            if band != "all":
                out.extend((band, c) for c in self.cutoffs)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bands"], d["cutoffs"] = list(self.bands), list(self.cutoffs)
        return d


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def band_filter(x: Tensor, band: str, cutoff: float | None, *, domain: str = "fft",
                transition: float = 0.0) -> Tensor:
    """Apply one band of :mod:`prism_probe.bands` to maps (B, C, h, w).

    Parameters
    ----------
    x : Tensor, shape (B, C, h, w)
        Images or feature maps; frequencies in cycles per cell of this grid (per pixel for
        images).
    band : {"low", "high", "all"}
        ``low`` keeps ``|f| <= cutoff``, ``high`` its complement, ``all`` returns ``x``.
    cutoff : float or None
        Radial cutoff in cycles per cell (ignored for ``all``).
    domain, transition
        See :class:`AblationConfig`.

    Returns
    -------
    Tensor, shape and dtype of ``x``
        The filtered maps (float32 arithmetic for half-precision input).
    """
    from . import bands as B

    if band == "all":
        return x
    if band not in ("low", "high"):
        raise PrismError(f"band {band!r}: use low, high or all")
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    fn = B.lowpass if band == "low" else B.highpass
    return fn(xf, cutoff, domain=domain, transition=transition).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Semantic scores
# --------------------------------------------------------------------------------------------


def knn_predict(test: Tensor, bank: Tensor, bank_labels: Tensor, n_classes: int, *,
                k: int = KNN_K, temperature: float = KNN_T) -> Tensor:
    """Weighted kNN classification with cosine similarity (the DINO protocol).

    Parameters
    ----------
    test : Tensor, shape (N, D)
        Query features.
    bank : Tensor, shape (M, D)
        Reference features; ``bank_labels`` (M,) their classes in ``0 .. n_classes - 1``.
    k : int
        Neighbours (at most M are used).
    temperature : float
        Each of the k nearest neighbours votes for its class with weight ``exp(cos / T)``.

    Returns
    -------
    Tensor, shape (N,)
        Predicted class (ties go to the lower class index).
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise PrismError(f"kNN bank has {bank.shape[0]} features but {bank_labels.shape[0]} "
                         "labels")
    q = F.normalize(test.double(), dim=1)
    r = F.normalize(bank.double().to(q.device), dim=1)
    sims, idx = (q @ r.T).topk(min(k, r.shape[0]), dim=1)
    weights = (sims / temperature).exp()
    votes = torch.zeros(q.shape[0], n_classes, dtype=q.dtype, device=q.device)
    votes.scatter_add_(1, bank_labels.to(q.device)[idx], weights)
    return votes.argmax(dim=1)


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features, fit in torch.

    Fit by full-batch L-BFGS (strong Wolfe line search) in float64 on the mean cross-entropy
    plus ``λ/2 · ||W||²``; the initial weights are drawn from a generator seeded with ``seed``,
    so a fit is deterministic on a given machine.
    """

    weight_decay: float = 1e-3
    max_iter: int = 200
    seed: int = 0
    mean: Tensor | None = None
    std: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    train_accuracy: float | None = field(default=None, repr=False)

    def fit(self, features: Tensor, labels: Tensor, n_classes: int) -> "LinearProbe":
        """Fit on (N, D) features and (N,) integer labels; returns self."""
        x = features.detach().double().cpu()
        y = labels.detach().long().cpu()
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise PrismError(f"linear probe needs (N, D) features and (N,) labels, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.mean = x.mean(dim=0)
        self.std = x.std(dim=0, unbiased=False).clamp_min(1e-12)
        z = (x - self.mean) / self.std
        gen = torch.Generator().manual_seed(self.seed)
        w = (0.01 * torch.randn(x.shape[1], n_classes, generator=gen, dtype=torch.float64))
        w.requires_grad_(True)
        b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w + b, y) + 0.5 * self.weight_decay * w.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        self.train_accuracy = float((self.predict(x) == y).double().mean() * 100)
        return self

    def predict(self, features: Tensor) -> Tensor:
        """Predicted classes (N,) of (N, D) features."""
        if self.weight is None:
            raise PrismError("the linear probe is not fitted yet")
        z = (features.detach().double().cpu() - self.mean) / self.std
        return (z @ self.weight + self.bias).argmax(dim=1)


# --------------------------------------------------------------------------------------------
# Images with labels
# --------------------------------------------------------------------------------------------


@dataclass
class LabeledImages:
    """Images with optional class labels (ImageFolder layout) for the probes."""

    images: ImageList
    labels: Tensor | None = None
    class_names: list[str] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names or ())

    def to_dict(self) -> dict[str, Any]:
        d = self.images.to_dict()
        if self.class_names is not None:
            d["classes"] = list(self.class_names)
        return d


def labeled_folder(root: str | Path, *, per_class: int | None = None,
                   seed: int = 0) -> LabeledImages:
    """Read an ImageFolder layout, optionally keeping a seeded subset of ``per_class`` images
    from each class (kept in folder order).
    """
    import random

    images, labels, names = load_image_folder(root)
    if per_class is not None:
        if per_class < 1:
            raise PrismError(f"per-class limit {per_class} must be >= 1")
        rng = random.Random(seed)
        keep = []
        for c in range(len(names)):
            idx = [i for i, lab in enumerate(labels) if lab == c]
            keep += sorted(rng.sample(idx, min(per_class, len(idx))))
        keep.sort()
        images = collect_images([images.paths[i] for i in keep])
        labels = [labels[i] for i in keep]
    return LabeledImages(images, torch.tensor(labels, dtype=torch.int64), names)


def _as_labeled(source, limit: int | None, seed: int) -> LabeledImages:
    if isinstance(source, LabeledImages):
        return source
    if isinstance(source, ImageList):
        return LabeledImages(source)
    return LabeledImages(collect_images(source, limit=limit, seed=seed))


# --------------------------------------------------------------------------------------------
# Running an encoder on (filtered) input
# --------------------------------------------------------------------------------------------


class _Tally:
    """Running sums of per-condition scores (merged over ranks by summation)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: Tensor) -> None:
        v = values.detach().double()
        v = v[torch.isfinite(v)]
        self.sums[key] = self.sums.get(key, 0.0) + float(v.sum())
        self.counts[key] = self.counts.get(key, 0) + int(v.numel())

    def merge(self, other: "_Tally") -> None:
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + other.counts[k]

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}


def _to_unit_range(pixels: Tensor, preprocess) -> Tensor:
    """Undo an encoder's value scaling: its input tensor back to images in [0, 1]."""
    if getattr(preprocess, "value_range", None) is not None:
        lo, hi = preprocess.value_range
        return (pixels - lo) / (hi - lo)
    if getattr(preprocess, "mean", None) is not None:
        mean = pixels.new_tensor(preprocess.mean).view(1, 3, 1, 1)
        std = pixels.new_tensor(preprocess.std).view(1, 3, 1, 1)
        return pixels * std + mean
    return pixels


def _split_tokens(head_fn: Callable, x: Tensor, pixels_hw: tuple[int, int]):
    """Native split output → (grid map (B, C, h, w), function putting a map back)."""
    if x.ndim == 4:
        return x, lambda m: m
    if x.ndim != 3:
        raise PrismError(f"split output of shape {tuple(x.shape)} is neither a (B, C, h, w) "
                         "map nor a (B, N, C) token sequence")
    prefix = int(getattr(head_fn, "prefix_tokens", 0))
    grid_for = getattr(head_fn, "grid_for", None)
    if grid_for is None:
        side = math.isqrt(x.shape[1] - prefix)
        grid = (side, side)
    else:
        grid = tuple(grid_for(pixels_hw))
    b, n, c = x.shape
    h, w = grid
    if n - prefix != h * w:
        raise PrismError(f"{n} tokens minus {prefix} prefix tokens do not fill the {h}×{w} grid")
    fmap = x[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)

    def restore(m: Tensor) -> Tensor:
        tokens = m.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return torch.cat([x[:, :prefix], tokens.to(x.dtype)], dim=1)

    return fmap, restore


def _last_split_point(encoder: Encoder) -> str | None:
    """The split point whose map feeds the global pool directly, when the encoder says."""
    points = dict(encoder.entry.split or {}).get("points")
    if points:
        return str(points[-1])
    blocks = getattr(encoder.model, "blocks", None)
    if blocks is not None:
        return f"blocks.{len(blocks)}"
    return None


def _refuse_pooled(encoder: Encoder, layer: str) -> None:
    if layer == _last_split_point(encoder):
        raise PrismError(
            f"--layer {layer}: this is the last map of '{encoder.label}' before its global pool, "
            "and the pool only sees each channel's mean (a CLS-token pool not even that), so a "
            "low-pass changes nothing and a high-pass only removes the mean: not a probe; choose "
            "an earlier split point, or use --mode input")


def check_encoder(encoder: Encoder, config: AblationConfig) -> None:
    """Refuse, before any image is read, an ablation this encoder cannot support."""
    if config.mode == "latent" and not encoder.has_decoder:
        encoder.decode(torch.zeros(1))  # raises the backend's own explanation
    if config.mode == "feature":
        _refuse_pooled(encoder, config.layer)
        encoder.split(config.layer)  # an unknown split point fails here, naming the choices


class _Runner:
    """Encoder-specific pieces: pooled features and logits from pixels or a split map."""

    def __init__(self, encoder: Encoder, config: AblationConfig):
        self.encoder = encoder
        self.config = config
        self.split = None
        if config.mode == "feature":
            _refuse_pooled(encoder, config.layer)
            self.split = encoder.split(config.layer)

    def _logits(self, pooled: Tensor) -> Tensor | None:
        if not self.encoder.has_head:
            return None
        return self.encoder.head(pooled)

    @torch.no_grad()
    def pooled(self, pixels: Tensor) -> tuple[Tensor, Tensor | None, dict]:
        """Unablated pooled features (B, D), logits or None, and state for ablations."""
        pixels = pixels.to(self.encoder.device)
        if self.split is None:
            fmap = self.encoder.encode(pixels)
            fmap.tensor = fmap.tensor.float()
            check_finite(fmap, encoder=self.encoder.label, batch=0)
            pooled = fmap.tensor.mean(dim=(-2, -1))
            return pooled, self._logits(pooled), {"pixels": pixels, "fmap": fmap}
        head, tail = self.split
        native = head(pixels)
        grid, restore = _split_tokens(head, native, tuple(pixels.shape[-2:]))
        pooled = tail(native).float()
        return pooled, self._logits(pooled), {"grid": grid, "restore": restore}

    @torch.no_grad()
    def ablated(self, state: dict, band: str, cutoff: float | None) -> tuple[Tensor, Any]:
        """Pooled features and logits after filtering (input or split map)."""
        cfg = self.config
        if self.split is None:
            x = band_filter(state["pixels"], band, cutoff, domain=cfg.domain,
                            transition=cfg.transition)
            fmap = self.encoder.encode(x)
            pooled = fmap.tensor.float().mean(dim=(-2, -1))
            return pooled, self._logits(pooled)
        _, tail = self.split
        m = band_filter(state["grid"], band, cutoff, domain=cfg.domain,
                        transition=cfg.transition)
        pooled = tail(state["restore"](m)).float()
        return pooled, self._logits(pooled)


def _key(band: str, cutoff: float | None) -> str:
    return band if cutoff is None else f"{band}@{cutoff!r}"


def _encode_all(runner: _Runner, images: LabeledImages, *, batch_size, workers, amp,
                dist: Distributed) -> tuple[Tensor, Tensor | None]:
    """Unablated pooled features of every image (all ranks' shards, in list order)."""
    feats, idx = [], []
    stream = iterate_batches(images.images, runner.encoder.preprocess, batch_size=batch_size,
                             workers=workers, rank=dist.rank, world_size=dist.world_size)
    for batch in stream:
        with amp:
            pooled, _, _ = runner.pooled(batch.pixels)
        feats.append(pooled.float().cpu())
        idx.append(batch.indices)
    parts = dist.gather((torch.cat(feats) if feats else None, torch.cat(idx) if idx else None))
    f = torch.cat([p for p, _ in parts if p is not None])
    i = torch.cat([q for _, q in parts if q is not None])
    order = torch.argsort(i)
    labels = images.labels[i[order]] if images.labels is not None else None
    return f[order], labels


def _semantic(encoder: Encoder, config: AblationConfig, test: LabeledImages,
              train: LabeledImages | None, *, batch_size, workers, amp, dist, progress):
    runner = _Runner(encoder, config)
    knn_bank = probe = None
    info: dict[str, Any] = {}
    if train is not None:
        if train.labels is None or test.labels is None:
            raise PrismError("kNN and the linear probe need --train and --test folders in "
                             "ImageFolder layout (one sub-folder per class)")
        if train.class_names != test.class_names:
            raise PrismError(f"--train classes {train.class_names} differ from --test classes "
                             f"{test.class_names}")
        bank, bank_labels = _encode_all(runner, train, batch_size=batch_size, workers=workers,
                                        amp=amp, dist=dist)
        knn_bank = (bank, bank_labels)
        probe = LinearProbe(config.probe_weight_decay, config.probe_max_iter, config.seed)
        probe.fit(bank, bank_labels, train.n_classes)
        info = {"n_train": int(bank.shape[0]), "probe_train_top1": probe.train_accuracy}
        log.info("%s: %d training features; linear probe train top-1 %.2f %%",
                 encoder.label, bank.shape[0], probe.train_accuracy)

    labels_all = test.labels
    use_head = encoder.has_head and labels_all is not None
    tally = _Tally()
    conditions = config.conditions()
    stream = iterate_batches(test.images, encoder.preprocess, batch_size=batch_size,
                             workers=workers, rank=dist.rank, world_size=dist.world_size)
    task = progress.add_task(encoder.label, total=stream.n_total) if progress else None

    def score(key: str, pooled: Tensor, logits, ref: Tensor | None, labels) -> None:
        pooled = pooled.float().cpu()
        if ref is not None:
            tally.add(f"{key}|cosine", F.cosine_similarity(pooled, ref, dim=1))
        if labels is None:
            return
        if use_head:
            tally.add(f"{key}|head_top1", (logits.argmax(1).cpu() == labels).double() * 100)
        if knn_bank is not None:
            pred = knn_predict(pooled, *knn_bank, train.n_classes, k=config.knn_k,
                               temperature=config.knn_temperature).cpu()
            tally.add(f"{key}|knn_top1", (pred == labels).double() * 100)
            tally.add(f"{key}|linear_top1", (probe.predict(pooled) == labels).double() * 100)

    for batch in stream:
        labels = labels_all[batch.indices] if labels_all is not None else None
        with amp:
            pooled0, logits0, state = runner.pooled(batch.pixels)
            ref = pooled0.float().cpu()
            score("unablated", pooled0, logits0, ref, labels)
            for band, cutoff in conditions:
                pooled, logits = runner.ablated(state, band, cutoff)
                if not torch.isfinite(pooled).all():
                    raise PrismError(f"'{encoder.label}' gave non-finite features for band "
                                     f"{band} at cutoff {cutoff}; run it with --dtype float32")
                score(_key(band, cutoff), pooled, logits, ref, labels)
        if progress:
            progress.update(task, advance=len(batch) + len(batch.skipped))

    total = _Tally()
    for part in dist.gather(tally):
        total.merge(part)
    n_read = sum(dist.gather(stream.n_read))
    return total.means(), n_read, info


# --------------------------------------------------------------------------------------------
# Latent ablation
# --------------------------------------------------------------------------------------------


def _latent(encoder: Encoder, config: AblationConfig, test: LabeledImages, *, batch_size,
            workers, amp, dist, progress):
    from .spectra import SpectrumConfig, radial_power_spectrum

    spec_cfg = SpectrumConfig()
    tally = _Tally()
    spectra: dict[str, Tensor] = {}
    freqs = None
    conditions = config.conditions()
    stream = iterate_batches(test.images, encoder.preprocess, batch_size=batch_size,
                             workers=workers, rank=dist.rank, world_size=dist.world_size)
    task = progress.add_task(encoder.label, total=stream.n_total) if progress else None

    def add_spectrum(key: str, images: Tensor) -> None:
        nonlocal freqs
        rs = radial_power_spectrum(images.float(), spec_cfg)
        freqs = rs.freqs.cpu()
        spectra[key] = spectra.get(key, 0) + rs.power.double().sum(dim=0).cpu()

    for batch in stream:
        with amp, torch.no_grad():
            pixels = batch.pixels.to(encoder.device)
            image = _to_unit_range(pixels, encoder.preprocess).clamp(0, 1)
            fmap = encoder.encode(pixels)
            latent = fmap.tensor.float()
            check_finite(fmap, encoder=encoder.label, batch=0)
            recon0 = encoder.decode(latent).float()
            add_spectrum("image", image)
            add_spectrum("unablated", recon0)
            tally.add("unablated|psnr", psnr(recon0, image).clamp(max=PSNR_CAP))
            tally.add("unablated|ssim", ssim(recon0, image))
            for band, cutoff in conditions:
                z = band_filter(latent, band, cutoff, domain=config.domain,
                                transition=config.transition)
                rec = encoder.decode(z).float()
                key = _key(band, cutoff)
                tally.add(f"{key}|psnr", psnr(rec, image).clamp(max=PSNR_CAP))
                tally.add(f"{key}|ssim", ssim(rec, image))
                tally.add(f"{key}|psnr_vs_recon", psnr(rec, recon0).clamp(max=PSNR_CAP))
                tally.add(f"{key}|ssim_vs_recon", ssim(rec, recon0))
                add_spectrum(key, rec)
        if progress:
            progress.update(task, advance=len(batch) + len(batch.skipped))

    total, summed = _Tally(), {}
    grid = (list(latent.shape[1:]), fmap.stride) if freqs is not None else None
    parts = dist.gather((tally, spectra, freqs, grid))
    for part_tally, part_spectra, _, _ in parts:
        total.merge(part_tally)
        for k, v in part_spectra.items():
            summed[k] = summed.get(k, 0) + v
    n_read = sum(dist.gather(stream.n_read))
    # A rank whose shard was empty or unreadable takes the geometry from one that read images.
    found = [(f, g) for _, _, f, g in parts if f is not None]
    if not found:
        raise PrismError(f"no image could be read for '{encoder.label}': {stream.summary()}")
    freqs, ((channels, *latent_grid), stride) = found[0]
    mean_spectra = {k: (v / n_read).tolist() for k, v in summed.items()}
    means = total.means()
    high = freqs > HIGH_SHARE_FROM
    for key, power in summed.items():
        # Share of the mean spectrum's ring power above HIGH_SHARE_FROM cycles per pixel.
        share = float(power[high].sum() / power.sum()) if power.sum() > 0 else 0.0
        means["unablated|image_spectrum_high_share" if key == "image"
              else f"{key}|spectrum_high_share"] = share
    info = {"latent_grid": latent_grid, "latent_channels": int(channels), "stride_px": stride,
            "spectra": {"freqs_pixel": freqs.tolist(), "power": mean_spectra,
                        "config": spec_cfg.to_dict(),
                        "note": "radial power spectrum of images in [0, 1], channels "
                                "averaged, mean over images; frequencies in cycles per "
                                "image pixel; spectrum_high_share is the share of ring power "
                                f"above {HIGH_SHARE_FROM} cycles per pixel"}}
    return means, n_read, info


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------


def _rows(means: dict[str, float], config: AblationConfig, stride: float | None):
    """Flatten the tallies into the profile's rows: unablated scores and one row per condition."""
    def scores(key):
        prefix = key + "|"
        return {k[len(prefix):]: v for k, v in means.items() if k.startswith(prefix)}

    rows = []
    for band, cutoff in config.conditions():
        row = {"band": band, "cutoff": cutoff, "scores": scores(_key(band, cutoff))}
        if cutoff is not None and stride:
            # Keep both units: per cell of the filtered map and per input pixel.
            row["cutoff_pixel"] = cutoff / stride if config.units == "cell" else cutoff
        rows.append(row)
    return scores("unablated"), rows


def ablate_encoder(
    encoder: Encoder,
    config: AblationConfig,
    test: LabeledImages | ImageList,
    *,
    train: LabeledImages | None = None,
    batch_size: int = 32,
    workers: int = 0,
    dtype: str = "auto",
    progress=None,
    dist: Distributed | None = None,
) -> Profile:
    """Run one band-ablation sweep on a loaded encoder; returns a Profile of kind "ablation".

    Parameters
    ----------
    encoder : Encoder
        From :func:`prism_probe.loading.load_encoder`.
    config : AblationConfig
        Mode, bands, cutoffs, layer and scoring settings.
    test : LabeledImages or ImageList
        Images to ablate and score; with labels (``labeled_folder``) the accuracy scores are
        computed, without them only ``cosine`` (and all latent-mode scores).
    train : LabeledImages, optional
        Labeled training images for kNN and the linear probe (unablated).
    batch_size, workers, dtype, progress, dist
        As for :func:`prism_probe.measure.measure_encoder`.

    Returns
    -------
    Profile
        ``result["unablated"]`` maps score names to the unablated values; ``result["rows"]``
        has one entry per (band, cutoff) with ``scores`` of the same names. Accuracies are in
        %, cosine in [-1, 1], PSNR in dB, SSIM in [0, 1].
    """
    check_encoder(encoder, config)
    dist = dist or Distributed()
    test = _as_labeled(test, None, 0)
    amp, dtype_used = _autocast(encoder.device, dtype)
    common = dict(batch_size=batch_size, workers=workers, amp=amp, dist=dist,
                  progress=progress)
    if config.mode == "latent":
        if train is not None:
            log.warning("--train is not used by latent ablation (it scores pixels)")
        means, n_read, info = _latent(encoder, config, test, **common)
        stride = info["stride_px"]
    else:
        means, n_read, info = _semantic(encoder, config, test, train, **common)
        stride = None
    size = list(encoder.preprocess.size)
    if config.mode == "input":
        stride = 1.0
    elif config.mode == "feature":
        with torch.no_grad():
            head, _ = encoder.split(config.layer)
            probe_px = torch.zeros(1, 3, *size, device=encoder.device)
            grid, _ = _split_tokens(head, head(probe_px), tuple(size))
        info["feature_grid"] = list(grid.shape[-2:])
        stride = size[0] / grid.shape[-2]
    unablated, rows = _rows(means, config, stride)
    log.info("%s: %d images used", encoder.label, n_read)

    units = {"pixel": "cycles per input pixel", "cell": "cycles per cell"}[config.units]
    if config.mode == "latent":
        units = "cycles per latent cell"
    protocol = {
        "measure": f"band ablation ({config.mode})",
        "ablation": config.to_dict(),
        "units": config.units,
        "cutoff_units": units,
        "filtered": {"input": "preprocessed input tensor (after normalisation)",
                     "feature": f"map at split point {config.layer} (prefix tokens unfiltered)",
                     "latent": "encoder latent (decoded after filtering)"}[config.mode],
        "pooled": {"input": "mean of the encoder's feature map over its grid",
                   "feature": "the model's own pooling after the split",
                   "latent": None}[config.mode],
        "readers": "kNN bank and linear probe fit on unablated training features",
        "input_size": size,
        "stride_px": stride,
        "dtype": dtype_used,
        **{k: v for k, v in info.items() if k in ("feature_grid", "latent_grid",
                                                    "latent_channels")},
    }
    result = {"unablated": unablated, "rows": rows, "units": units}
    for key in ("spectra", "n_train", "probe_train_top1"):
        if key in info:
            result[key] = info[key]
    images_info = {**test.to_dict(), "n_used": n_read}
    if train is not None:
        images_info["train"] = train.to_dict()
    env = library_versions()
    env["device"] = str(encoder.device)
    env["world_size"] = dist.world_size
    return Profile(kind="ablation", encoder=encoder.describe(), protocol=protocol,
                   images=images_info, result=result, environment=env)


def run_ablation(
    encoders: str | Sequence[str],
    config: AblationConfig,
    *,
    test: str | Path | Sequence | None = None,
    train: str | Path | None = None,
    images: str | Path | Sequence | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    registry: Registry | None = None,
    weights_dir=None,
    device: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 32,
    workers: int = 0,
    dtype: str = "auto",
    progress=None,
) -> list[Profile]:
    """Load each encoder and run :func:`ablate_encoder` on the same images.

    ``test`` / ``train`` are ImageFolder layouts (labels from the class folders, optionally
    ``per_class`` images of each class, seeded); ``images`` is any unlabeled source accepted by
    :func:`prism_probe.data.collect_images` (``limit``, ``seed``), used when ``test`` is not
    given. Returns one Profile per encoder.
    """
    if isinstance(encoders, str):
        encoders = [encoders]
    registry = registry or Registry.load()
    specs = [parse_spec(e, registry) for e in encoders]
    if test is not None and images is not None:
        raise PrismError("give either --test (labeled folder) or --images, not both")
    if train is not None and test is None:
        raise PrismError("--train needs --test: kNN and the linear probe are scored on labeled "
                         "test images")
    if test is not None:
        test_set = labeled_folder(test, per_class=per_class, seed=seed)
    else:
        test_set = LabeledImages(collect_images(images, limit=limit, seed=seed))
    train_set = labeled_folder(train, per_class=per_class, seed=seed) if train else None
    dev = resolve_device(device)
    dist = Distributed.from_env(dev)
    profiles = []
    try:
        for spec in specs:
            enc = load_encoder(spec, registry=registry, weights_dir=weights_dir,
                               device=str(dev), image_size=image_size)
            profiles.append(ablate_encoder(enc, config, test_set, train=train_set,
                                           batch_size=batch_size, workers=workers, dtype=dtype,
                                           progress=progress, dist=dist))
            del enc
    finally:
        dist.close()
    return profiles
