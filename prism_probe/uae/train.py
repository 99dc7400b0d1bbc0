"""Staged UAE training: ``prism-probe train-uae`` and ``python -m prism_probe.uae.train``.

The loop, top to bottom: configuration, data, model, optimisers, then per step: stage, learning
rate, micro-batches (forward, losses, backward), clip, step, EMA, log, evaluate, checkpoint.

Configuration
-------------
A run is described by one mapping (YAML preset, then ``--config FILE``, then ``--set key=value``
overrides, merged in that order; see ``presets/tiny-cpu.yaml`` for every key with comments). The
resolved configuration is saved as ``RUN/config.json``.

Stages (``stages:``) run one after the other, each for ``steps`` (or ``epochs``) optimisation
steps; each names which parts train (``encoder``, ``modulator``, ``decoder``) and whether the
semantic loss, band masking and the adversarial loss are on. The paper's order: decoder warm-up
with the encoder frozen, joint training with semantic loss and masking, adversarial last.

Per step, with target images x in [0, 1]::

    clean pass   x̂ = D(M(E(x)))                     L_clean = L1 + w_p · perceptual
    masked pass  x̃ = D(M(E(x); bands masked, noise)) L_mask  (per sample; FFT: × kept share)
    loss = c · L_clean + L_mask  (masking stages; c = loss.clean_weight)   or   L_clean
         + w_sem · L_sem(E(x), teacher(x))           (semantic stages)
         + w_gan · λ · (−D_disc(x̂))                  (adversarial stages; λ adaptive)

Distributed runs
----------------
Under ``torchrun`` the same command uses DistributedDataParallel (NCCL on GPU, gloo on CPU).
A global batch (``data.batch_size``) is drawn from a seeded permutation per epoch and dealt out
strided over ranks, then cut into ``optim.accum`` micro-batches; every crop, flip, noise draw
and band mask comes from a generator keyed by (seed, epoch or step, global sample index). Since
the encoder and teacher stay in eval mode (frozen BatchNorm) and the decoders and discriminator
use no batch statistics, W processes give the losses of one process on the same global batch,
to float rounding. Only global rank 0 writes files.

Run folder
----------
``config.json``, ``metrics.jsonl`` (one JSON object per line: ``"kind": "train"`` steps and
``"kind": "val"`` evaluations), ``grids/step-XXXXXXX.png`` (originals over reconstructions),
``checkpoint.json`` (trainer state; the commit point) naming ``ckpt/step-XXXXXXX.safetensors``
(model, EMA, teacher, discriminator) and ``ckpt/step-XXXXXXX.optim.safetensors`` (optimiser
moments, RNG state). Every file is written to a temporary name, flushed and renamed, and
``checkpoint.json`` last, so a kill at any moment leaves the previous checkpoint whole.
Ctrl-C (SIGINT, single process) lets the current step finish, writes its checkpoint and stops
(the CLI exits 130); ``--resume`` continues from it. A second Ctrl-C stops at once, leaving the
last committed checkpoint. Before any step, ``--resume`` reads the checkpoint (any damaged or
missing file is named) and ``--out`` is proven writable.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ImageSourceError, PrismError
from ..profile import atomic_write_text, ensure_writable
from .losses import (PatchDiscriminator, adaptive_weight, band_cosine, build_perceptual,
                     hinge_d_loss, hinge_g_loss, l1_per_image, semantic_loss)
from .model import UAE, build_uae, sample_generator

log = logging.getLogger("prism_probe")

PARTS = ("encoder", "modulator", "decoder")
CHECKPOINT_SCHEMA = "prism-probe/uae-checkpoint"

DEFAULTS: dict[str, Any] = {
    "name": "uae",
    "seed": 0,
    "device": "auto",
    "precision": "auto",  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    "image_size": 32,
    "weights_dir": None,
    "encoder": {"name": "resnet56-cifar", "input_size": None},
    "modulator": {"kind": "dct", "edges": [0.25], "fusion_hidden": None, "mask_prob": 0.5,
                  "noise_max": 0.8, "k_min_fraction": 0.25},
    "decoder": {"kind": "conv"},  # other keys: the decoder class's own arguments
    "loss": {"l1": 1.0, "perceptual_weight": 1.0, "perceptual_masked": True,
             "clean_weight": 10.0, "semantic": 0.5,
             "gan": 0.75, "perceptual": {"kind": "auto", "encoder": "teacher", "stages": []},
             "disc": {"width": 64, "layers": 3, "lr": None}},
    "stages": [
        {"name": "warmup", "steps": 100, "train": ["modulator", "decoder"],
         "semantic": False, "masking": False, "gan": False},
    ],
    "optim": {"lr": 2e-4, "min_lr": 2e-5, "betas": [0.9, 0.95], "weight_decay": 0.0,
              "warmup_steps": 10, "grad_clip": 1.0, "accum": 1, "ema": 0.999,
              "encoder_lr_scale": 1.0},
    "data": {"train": None, "val": None, "batch_size": 32, "workers": 0, "cache": True,
             "crop_scale": [0.8, 1.0], "crop_ratio": [0.75, 1.3333], "flip": True,
             "limit": None, "val_images": 256},
    "eval": {"every": 100, "batch_size": 64, "grid": 16, "ema": True},
    "checkpoint": {"every": 100, "keep": 1},
}


# ------------------------------------------------------------------------------------------------
# Configuration


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, mappings merged recursively, lists replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_preset(name: str) -> dict[str, Any]:
    """A packaged preset (``tiny-cpu``, ``paper-dinov2-b``) as a mapping."""
    import yaml

    files = resources.files("prism_probe.uae").joinpath("presets")
    path = files.joinpath(f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))
        raise PrismError(f"unknown UAE preset '{name}'; known: {', '.join(known)}")
    return yaml.safe_load(path.read_text()) or {}


def parse_set(items) -> dict[str, Any]:
    """``["optim.lr=1e-4", "stages.0.steps=50"]`` to a nested override (values parsed as YAML).

    A numeric key indexes into a list (``stages.0.steps``); such overrides are applied by
    :func:`apply_sets` on the merged configuration.
    """
    import yaml

    out = []
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise PrismError(f"--set {item!r}: use KEY=VALUE, e.g. --set optim.lr=1e-4")
        out.append((key.split("."), yaml.safe_load(value)))
    return out


def apply_sets(cfg: dict[str, Any], sets) -> dict[str, Any]:
    """Apply parsed ``--set`` items (see :func:`parse_set`) in place; returns ``cfg``."""
    for keys, value in sets:
        node: Any = cfg
        for i, k in enumerate(keys[:-1]):
            nxt = node[int(k)] if isinstance(node, list) else node.get(k)
            if nxt is None:
                if isinstance(node, list):
                    raise PrismError(f"--set {'.'.join(keys)}: index {k} out of range")
                nxt = node[k] = {}
            node = nxt
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise PrismError(f"--set {'.'.join(keys)}: index {last} out of range")
            node[int(last)] = value
        else:
            node[last] = value
    return cfg


def resolve_config(preset: str | None = None, config_file=None, sets=()) -> dict[str, Any]:
    """Defaults, then the preset, then a YAML file, then ``--set`` overrides."""
    import yaml

    cfg = merge(DEFAULTS, load_preset(preset)) if preset else copy.deepcopy(DEFAULTS)
    if config_file:
        try:
            cfg = merge(cfg, yaml.safe_load(Path(config_file).read_text()) or {})
        except OSError as exc:
            raise PrismError(f"{config_file}: cannot read config ({exc.strerror})") from None
    return apply_sets(cfg, parse_set(sets) if sets and isinstance(sets[0], str) else sets)


def _resolve_path(value) -> Path | None:
    """A configured path: as given when it exists, else relative to the project checkout."""
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = Path(__file__).resolve().parents[2] / p
    return alt if alt.exists() else p


def stage_table(cfg: Mapping[str, Any], n_train: int) -> list[dict[str, Any]]:
    """Stages with ``start``/``stop`` steps filled in (``epochs`` turned into steps)."""
    per_epoch = max(1, n_train // int(cfg["data"]["batch_size"]))
    out, start = [], 0
    for i, st in enumerate(cfg["stages"]):
        st = {"semantic": False, "masking": False, "gan": False, **st}
        steps = st.get("steps")
        if steps is None:
            if st.get("epochs") is None:
                raise PrismError(f"stages.{i} ({st.get('name')}): give steps or epochs")
            steps = int(math.ceil(float(st["epochs"]) * per_epoch))
        bad = [p for p in st.get("train", []) if p not in PARTS]
        if bad:
            raise PrismError(f"stages.{i}.train names {bad[0]!r}; parts are {', '.join(PARTS)}")
        st.update(name=st.get("name", f"stage{i}"), start=start, stop=start + int(steps))
        start += int(steps)
        out.append(st)
    if start == 0:
        raise PrismError("the stages add up to 0 steps; give each stage steps or epochs")
    return out


def stage_at(stages: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The stage that optimisation step ``step`` (0-based) belongs to."""
    for st in stages:
        if st["start"] <= step < st["stop"]:
            return st
    return stages[-1]


def set_trainable(model: UAE, stage: Mapping[str, Any]) -> None:
    """Unfreeze exactly the parts the stage names; the teacher stays frozen."""
    for name, part in model.trainable_groups().items():
        part.requires_grad_(name in stage.get("train", ()))
    for k, p in model.encoder.net.named_parameters():
        if k in model.encoder.unused:  # e.g. the classifier head: no gradient ever reaches it
            p.requires_grad_(False)
    if model.teacher is not None:
        model.teacher.requires_grad_(False)


def param_groups(model: UAE, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and kernels only; the encoder's learning rate
    scaled by ``optim.encoder_lr_scale`` (a pretrained encoder drifts fast at a decoder's rate).
    """
    groups = []
    for part, mod in model.trainable_groups().items():
        scale = float(optim.get("encoder_lr_scale", 1.0)) if part == "encoder" else 1.0
        params = [p for _, p in mod.named_parameters()]
        for decayed in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decayed]
            if chosen:
                groups.append({"params": chosen, "lr_scale": scale, "part": part,
                               "weight_decay": float(optim["weight_decay"]) if decayed else 0.0})
    return groups


def lr_at(step: int, total: int, optim: Mapping[str, Any]) -> float:
    """Linear warm-up over ``warmup_steps`` to ``lr``, then cosine to ``min_lr`` at ``total``."""
    lr, min_lr, warm = float(optim["lr"]), float(optim["min_lr"]), int(optim["warmup_steps"])
    if step < warm:
        return lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# Data


class TrainImages(torch.utils.data.Dataset):
    """Training images: item ``(index, epoch)`` is image ``index`` cropped and flipped by its own
    generator, (3, S, S) in [0, 1].

    Random-resized crop: area share ~ U(crop_scale), log aspect ratio ~ U(log crop_ratio),
    position uniform (ten tries, then the centred square), resized bilinear with antialiasing;
    horizontal flip with probability ½.
    """

    def __init__(self, paths, image_size: int, seed: int, data_cfg: Mapping[str, Any]):
        self.paths = list(paths)
        self.size = int(image_size)
        self.seed = int(seed)
        self.scale = tuple(float(v) for v in data_cfg["crop_scale"])
        self.ratio = tuple(math.log(float(v)) for v in data_cfg["crop_ratio"])
        self.flip = bool(data_cfg["flip"])
        self.cache: dict[int, Tensor] | None = {} if data_cfg.get("cache") else None

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        from ..data import read_image

        img = read_image(self.paths[index])
        t = torch.from_numpy(_pil_array(img)).permute(2, 0, 1).contiguous()  # uint8 (3, H, W)
        if self.cache is not None:
            self.cache[index] = t
        return t

    def __getitem__(self, item) -> tuple[int, Tensor]:
        index, epoch = item
        img = self.image(index).float() / 255.0
        g = sample_generator(self.seed, 1, epoch, index)
        _, H, W = img.shape
        top, left, h, w = (H - min(H, W)) // 2, (W - min(H, W)) // 2, min(H, W), min(H, W)
        for _ in range(10):
            u, v = torch.rand(2, generator=g).tolist()
            share = self.scale[0] + (self.scale[1] - self.scale[0]) * u
            logr = self.ratio[0] + (self.ratio[1] - self.ratio[0]) * v
            cw = int(round(math.sqrt(H * W * share * math.exp(logr))))
            ch = int(round(math.sqrt(H * W * share / math.exp(logr))))
            if 0 < cw <= W and 0 < ch <= H:
                top = int(torch.randint(0, H - ch + 1, (), generator=g))
                left = int(torch.randint(0, W - cw + 1, (), generator=g))
                h, w = ch, cw
                break
        crop = img[:, top:top + h, left:left + w][None]
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                            align_corners=False, antialias=True)[0].clamp(0, 1)
        if self.flip and float(torch.rand((), generator=g)) < 0.5:
            out = out.flip(-1)
        return index, out


def _pil_array(img):
    import numpy as np

    return np.asarray(img, dtype=np.uint8).copy()


def global_batch(n: int, batch: int, seed: int, step: int) -> tuple[int, Tensor]:
    """(epoch, indices) of the global batch of optimisation step ``step`` (drop-last epochs)."""
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=sample_generator(seed, 0, epoch))
    return epoch, perm[pos * batch:(pos + 1) * batch]


class MicroBatches(torch.utils.data.Sampler):
    """This rank's micro-batches for steps ``start``…``stop − 1``, as lists of (index, epoch).

    Global batch positions are dealt strided over ranks (rank r takes r, r + W, …), then cut into
    ``accum`` consecutive micro-batches.
    """

    def __init__(self, n, batch, seed, start, stop, rank, world, accum):
        self.args = (n, batch, seed)
        self.start, self.stop = start, stop
        self.rank, self.world, self.accum = rank, world, accum

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            epoch, idx = global_batch(*self.args, step)
            mine = idx[self.rank::self.world]
            for chunk in mine.chunk(self.accum):
                yield [(int(i), epoch) for i in chunk]


def load_val(paths, image_size: int) -> Tensor:
    """Validation images: shorter side resized to ``image_size``, centre crop; (N, 3, S, S)."""
    from ..data import Preprocess, read_image

    pre = Preprocess(size=image_size, resize="shorter", value_range=(0.0, 1.0))
    return torch.stack([pre(read_image(p)) for p in paths])


# ------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of parameters, with the usual early-steps warm-up.

    After update ``n`` (1-based), ``shadow ← d·shadow + (1 − d)·param`` with
    ``d = min(decay, (1 + n) / (10 + n))``. ``num_updates`` is saved with the shadow weights.
    """

    def __init__(self, named: Mapping[str, Tensor], decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in named.items()}

    @torch.no_grad()
    def update(self, named: Mapping[str, Tensor]) -> None:
        self.num_updates += 1
        n = self.num_updates
        d = min(self.decay, (1 + n) / (10 + n))
        for k, v in named.items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def swap_into(self, named: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Copy the shadow into the parameters; return the previous values (for restore)."""
        saved = {k: v.detach().clone() for k, v in named.items()}
        for k, v in named.items():
            v.copy_(self.shadow[k])
        return saved

    @staticmethod
    @torch.no_grad()
    def restore(named: Mapping[str, Tensor], saved: Mapping[str, Tensor]) -> None:
        for k, v in named.items():
            v.copy_(saved[k])


def ema_params(model: UAE) -> dict[str, Tensor]:
    """The parameters the EMA follows: every trainable part, keyed like the checkpoint."""
    return {f"{part}.{k}": v for part, mod in model.trainable_groups().items()
            for k, v in mod.named_parameters()}


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata=None) -> None:
    """safetensors file written to a temporary name in the same folder, fsynced, renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _optim_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"{prefix}.{pid}.{k}": v for pid, st in sd["state"].items()
               for k, v in st.items() if isinstance(v, Tensor)}
    scalars = {f"{pid}.{k}": v for pid, st in sd["state"].items()
               for k, v in st.items() if not isinstance(v, Tensor)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_load(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta, prefix: str):
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run: Path, *, rank: int, step: int, model: UAE, ema: EMA, opt, disc=None,
                    dopt=None, extra: Mapping[str, Any] | None = None,
                    keep: int = 1) -> Path | None:
    """Write the checkpoint of ``step`` (global rank 0 only; others return None).

    Order: weights file, optimiser file, then ``checkpoint.json`` (the commit point); older
    step files beyond ``keep`` are removed only after the commit.
    """
    if rank != 0:
        return None
    ck = run / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    tag = f"step-{step:07d}"
    weights = {f"model.{k}": v for k, v in ema_params(model).items()}
    weights.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    if model.teacher is not None:
        weights.update({f"teacher.{k}": v for k, v in model.teacher.net.state_dict().items()})
    weights.update({f"buffers.encoder.{k}": v for k, v in model.encoder.net.named_buffers()})
    if disc is not None:
        weights.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
    _atomic_save_tensors(ck / f"{tag}.safetensors", weights, {"schema": CHECKPOINT_SCHEMA})
    otensors, ometa = _optim_tensors(opt, "opt")
    state = {"optimizer": ometa}
    if dopt is not None:
        dt, dmeta = _optim_tensors(dopt, "dopt")
        otensors.update(dt)
        state["disc_optimizer"] = dmeta
    otensors["rng.torch"] = torch.get_rng_state()
    _atomic_save_tensors(ck / f"{tag}.optim.safetensors", otensors)
    record = {"schema": CHECKPOINT_SCHEMA, "step": step, "weights": f"ckpt/{tag}.safetensors",
              "optim": f"ckpt/{tag}.optim.safetensors", "ema_updates": ema.num_updates,
              "ema_decay": ema.decay, **state, **(extra or {})}
    atomic_write_text(run / "checkpoint.json", json.dumps(record, indent=1) + "\n")
    tags = sorted({p.name.split(".")[0] for p in ck.glob("step-*.safetensors")})
    for old in tags[:-max(1, keep)]:
        for p in ck.glob(f"{old}.*"):
            p.unlink(missing_ok=True)
    return run / "checkpoint.json"


def read_checkpoint(run: Path) -> dict[str, Any]:
    """The trainer state of the run's last committed checkpoint."""
    path = Path(run) / "checkpoint.json"
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        raise PrismError(f"{path}: cannot read ({exc.strerror}); not a UAE run folder, or no "
                         "checkpoint written yet (start one with train-uae, without --resume)"
                         ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise PrismError(f"{path}: not valid JSON ({why}); the checkpoint is damaged, restore "
                         "it or start a new run in another --out") from None
    if not isinstance(record, dict) or record.get("schema") != CHECKPOINT_SCHEMA:
        schema = record.get("schema") if isinstance(record, dict) else None
        raise PrismError(f"{path}: not a UAE checkpoint (schema {schema!r})")
    missing = [k for k in ("step", "weights", "optim", "ema_updates", "optimizer")
               if k not in record]
    if missing:
        raise PrismError(f"{path}: damaged checkpoint, lacks {', '.join(missing)}")
    return record


def load_checkpoint_tensors(run: Path, name: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint file ``name`` (relative to ``run``), or a one-line error
    naming the file (missing, truncated or not safetensors)."""
    path = Path(run) / name
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise PrismError(f"{path}: missing (named by {Path(run) / 'checkpoint.json'}); restore "
                         "it or start a new run in another --out") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PrismError(f"{path}: cannot read the checkpoint ({why}); the file is damaged "
                         "(truncated?), restore it or start a new run in another --out") from None


def load_weights_into(model: UAE, tensors: Mapping[str, Tensor], *, use_ema: bool) -> None:
    """Put checkpoint tensors into ``model`` (EMA weights when ``use_ema``)."""
    src = "ema." if use_ema else "model."
    named = ema_params(model)
    missing = [k for k in named if src + k not in tensors]
    if missing:
        raise PrismError(f"checkpoint lacks {len(missing)} weights of this model (e.g. "
                         f"{missing[0]}); was it trained with another configuration?")
    with torch.no_grad():
        for k, v in named.items():
            v.copy_(tensors[src + k])
        for k, b in model.encoder.net.named_buffers():
            if "buffers.encoder." + k in tensors:
                b.copy_(tensors["buffers.encoder." + k])
    if model.teacher is not None:
        teacher = {k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")}
        if teacher:
            model.teacher.net.load_state_dict(teacher)


# ------------------------------------------------------------------------------------------------
# Evaluation during training


@torch.no_grad()
def validate(model: UAE, images: Tensor, batch: int, device) -> dict[str, float]:
    """PSNR and SSIM of clean reconstructions and the student/teacher low-band cosine."""
    from ..metrics import psnr, ssim

    ps, ss, cos = [], [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        z = model.encode(x)
        y = model.decode(z).float().clamp(0, 1)
        ps.append(psnr(y, x))
        if min(x.shape[-2:]) >= 11:
            ss.append(ssim(y, x))
        if model.teacher is not None:
            cos.append(band_cosine(z.float(), model.teacher(x).float(), model.modulator))
    out = {"psnr": float(torch.cat(ps).mean())}
    if ss:
        out["ssim"] = float(torch.cat(ss).mean())
    if cos:
        out["cos_low_band"] = float(torch.cat(cos).mean())
    return out


def save_grid(path: Path, *rows: Tensor) -> None:
    """PNG with one row per (n, 3, S, S) batch (originals first, then reconstructions),
    values in [0, 1], written atomically."""
    import io

    from PIL import Image

    grid = torch.cat([torch.cat(list(r.float().clamp(0, 1).cpu()), dim=-1) for r in rows],
                     dim=-2)
    arr = (grid.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    from ..profile import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------
# Distributed helpers


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _mean_over_ranks(values: dict[str, float], world: int, device) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


class _Progress:
    """A rich progress bar with loss, learning rate and images per second (rank 0, a TTY)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task("train-uae", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _DeferredInterrupt:
    """While the loop runs, a first Ctrl-C (SIGINT) lets the current step finish, so that the
    checkpoint then written is a whole step (model, EMA, optimisers and RNG agree) and
    ``--resume`` continues exactly; a second Ctrl-C stops at once, leaving the last committed
    checkpoint. Single process only: under torchrun the ranks could see the signal at
    different steps and wait for each other in a collective forever.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pending = False
        self.previous: Any = None

    def _handle(self, signum, frame) -> None:
        self.pending = True
        signal.signal(signal.SIGINT, self.previous)

    def __enter__(self) -> "_DeferredInterrupt":
        if self.enabled:
            self.previous = signal.getsignal(signal.SIGINT)
            if self.previous is signal.SIG_IGN:  # the caller chose to ignore Ctrl-C
                self.enabled = False
                return self
            if not callable(self.previous) and self.previous != signal.SIG_DFL:
                self.previous = signal.default_int_handler  # installed outside Python
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


# ------------------------------------------------------------------------------------------------
# The loop


def step_losses(wrapped: nn.Module, model: UAE, x: Tensor, idx: Tensor, step: int,
                stage: Mapping[str, Any], cfg: Mapping[str, Any], *, perceptual=None,
                disc=None, world: int = 1) -> dict[str, Tensor]:
    """The generator-side losses of one micro-batch (see the module docstring's formula).

    Parameters
    ----------
    wrapped : module
        ``model`` itself, or its DistributedDataParallel wrapper.
    x : Tensor (B, 3, S, S)
        Target images in [0, 1].
    idx : LongTensor (B,)
        Their global data-set indices (keys of the per-sample noise and masks).
    step : int
        Optimisation step (0-based).
    stage : mapping
        The current stage (``semantic``, ``masking``, ``gan`` flags).

    Returns
    -------
    dict of Tensor
        ``loss`` (scalar, to back-propagate), ``clean`` (B, 3, S, S) reconstruction, and the
        scalar parts ``l1``, ``perceptual``, ``semantic``, ``gan``, ``gan_weight``.
    """
    lcfg, mcfg = cfg["loss"], cfg["modulator"]
    zero = torch.zeros((), device=x.device)
    plan = None
    if stage["masking"]:
        shape = (len(x), model.modulator.channels, *model.modulator.grid)
        plan = model.make_plan(shape, idx, step, int(cfg["seed"]),
                               mask_prob=float(mcfg["mask_prob"]),
                               noise_max=float(mcfg["noise_max"]),
                               k_min_fraction=float(mcfg["k_min_fraction"]))
    outs = wrapped(x, plan, teacher=stage["semantic"])
    y = outs["clean"].float()
    w_l1, w_p = float(lcfg["l1"]), float(lcfg["perceptual_weight"])
    l1 = l1_per_image(y, x)
    per = perceptual(y, x) if perceptual is not None else torch.zeros_like(l1)
    rec = (w_l1 * l1 + w_p * per).mean()
    loss = rec
    if plan is not None:
        ym = outs["masked"].float()
        lm = w_l1 * l1_per_image(ym, x)
        if perceptual is not None and lcfg.get("perceptual_masked", True):
            lm = lm + w_p * perceptual(ym, x)
        if model.modulator.kind == "fft":  # v1: scaled by the share of bands kept
            lm = lm * model.kept_fraction(plan, model.modulator.grid).to(lm)
        loss = float(lcfg["clean_weight"]) * rec + lm.mean()
    sem = zero
    if stage["semantic"]:
        sem = semantic_loss(outs["latent"].float(), outs["teacher"].float(), model.modulator)
        loss = loss + float(lcfg["semantic"]) * sem
    g_loss, lam = zero, zero
    if stage["gan"] and disc is not None:
        disc.requires_grad_(False)  # the generator step must not touch D's gradients
        g_loss = hinge_g_loss(disc(y))
        lam = adaptive_weight(rec, g_loss, model.decoder.last_layer.weight, world_size=world)
        loss = loss + float(lcfg["gan"]) * lam * g_loss
    return {"loss": loss, "clean": y, "l1": l1.mean(), "perceptual": per.mean(),
            "semantic": sem, "gan": g_loss, "gan_weight": lam}


def _collect(folder, limit, seed):
    from ..data import collect_images

    path = _resolve_path(folder)
    if path is None:
        raise PrismError("data.train is not set: give an image folder (ImageFolder or flat), "
                         "e.g. --set data.train=../shared/data/cifar10-small/train")
    _check_class_folders(path)
    return collect_images(path, limit=limit, seed=seed)


def _check_class_folders(root: Path) -> None:
    """In an ImageFolder layout (no images at the top, one sub-folder per class), name the
    class folders that hold no image: the recursive listing would silently train without
    them."""
    from ..data import IMAGE_EXTENSIONS

    def is_image(name: str) -> bool:
        return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS

    if not root.is_dir():
        return
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    if any(e.is_file() and is_image(e.name) for e in entries):
        return  # a flat folder (sub-folders, if any, are just more images)
    classes = sorted(e.name for e in entries if e.is_dir())

    def has_image(folder: Path) -> bool:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if any(is_image(n) for n in filenames):
                return True
        return False

    empty = [c for c in classes if not has_image(root / c)]
    if empty:
        raise ImageSourceError(f"class folder(s) with no images in {root}: {', '.join(empty)}; "
                               "add images or remove the folder(s)")


def saved_config(run: str | Path) -> dict[str, Any]:
    """The configuration a run folder was trained with (``RUN/config.json``)."""
    path = Path(run) / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise PrismError(f"{path}: not found, so there is no run in {run} to resume; start "
                         "without --resume") from None
    except json.JSONDecodeError as exc:
        raise PrismError(f"{path}: damaged ({exc.msg} at line {exc.lineno}); restore it, or "
                         "give the original --preset/--config/--set with --resume") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise PrismError(f"{path}: not a UAE run config (no 'config' mapping)")
    return data["config"]


def _config_differences(new: Any, old: Any, key: str = "") -> list[str]:
    """Dotted keys where two JSON-like configurations differ, with both values."""
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        out = []
        for k in sorted(set(new) | set(old), key=str):
            out += _config_differences(new.get(k), old.get(k), f"{key}.{k}" if key else str(k))
        return out
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [d for i, (a, b) in enumerate(zip(new, old))
                for d in _config_differences(a, b, f"{key}.{i}")]
    return [] if new == old else [f"{key}: {new!r} (now) vs {old!r} (run)"]


def _check_resume_config(cfg: Mapping[str, Any], run: Path) -> None:
    """Refuse to resume a run with a configuration other than the one it was trained with:
    the checkpoint's step, stage and schedule only mean something under the run's own."""
    if not (run / "config.json").exists():
        return  # read_checkpoint then says what is missing
    now = json.loads(json.dumps(cfg, default=str))
    diffs = [d for d in _config_differences(now, saved_config(run))
             if not d.startswith("optim.warmup_steps:")]  # derived from warmup_epochs
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise PrismError(f"{run}: --resume with a configuration that differs from the run's own "
                         f"({'; '.join(diffs[:3])}{more}); resume without --preset/--config/"
                         "--set to continue the run as it was, or start a new run in another "
                         "--out")


def train(cfg: Mapping[str, Any], out: str | Path, *, resume: bool = False,
          stop_after: int | None = None, progress: bool | None = None) -> list[dict[str, Any]]:
    """Train a UAE as ``cfg`` says, writing the run folder ``out``.

    Parameters
    ----------
    cfg : mapping
        A resolved configuration (:func:`resolve_config`).
    out : path
        The run folder (created).
    resume : bool
        Continue from ``out/checkpoint.json`` exactly (model, EMA, optimisers, schedule, RNG
        and data order).
    stop_after : int, optional
        Stop after this many optimisation steps in total (the schedule still spans every
        stage), writing a checkpoint: for interrupting and resuming.
    progress : bool, optional
        Show the progress bar (default: when stderr is a terminal).

    Returns
    -------
    list of dict
        The training records of this call's steps (losses averaged over ranks), as in
        ``metrics.jsonl``.
    """
    cfg = copy.deepcopy(dict(cfg))
    run = Path(out)
    if resume:
        _check_resume_config(cfg, run)
    rank, world, local = dist_info()
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
    from ..loading import resolve_device

    device = resolve_device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    precision = cfg.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise PrismError(f"precision {precision!r}: use auto, fp32 or bf16")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if precision == "bf16" else nullcontext
    seed = int(cfg["seed"])
    torch.manual_seed(seed)

    # ---- data
    dcfg, ocfg, lcfg = cfg["data"], cfg["optim"], cfg["loss"]
    train_list = _collect(dcfg["train"], dcfg.get("limit"), seed)
    val_list = _collect(dcfg["val"] or dcfg["train"], dcfg.get("val_images"), seed + 1)
    batch, accum = int(dcfg["batch_size"]), int(ocfg["accum"])
    if batch % (world * accum):
        raise PrismError(f"data.batch_size {batch} must be a multiple of world size {world} × "
                         f"optim.accum {accum}")
    if len(train_list) < batch:  # epochs drop the last partial batch: not one step possible
        more = " or raise data.limit" if dcfg.get("limit") else ""
        multiple = f" (a multiple of {world * accum})" if world * accum > 1 else ""
        raise PrismError(f"{_resolve_path(dcfg['train'])}: {len(train_list)} training image(s), "
                         f"fewer than one batch (data.batch_size {batch}); set data.batch_size "
                         f"to at most {len(train_list)}{multiple}, add images{more}")
    stages = stage_table(cfg, len(train_list))
    total = stages[-1]["stop"]
    if ocfg.get("warmup_epochs"):  # the paper counts warm-up in epochs
        ocfg["warmup_steps"] = int(float(ocfg["warmup_epochs"]) * (len(train_list) // batch))
    dataset = TrainImages(train_list.paths, int(cfg["image_size"]), seed, dcfg)

    # ---- the run folder: what --resume needs is read, and --out proven writable, before
    # any model is built or step taken, so a bad folder fails at once and writes nothing
    record = tensors = otensors = None
    if resume:
        record = read_checkpoint(run)
        tensors = load_checkpoint_tensors(run, record["weights"])
        otensors = load_checkpoint_tensors(run, record["optim"])
    elif (run / "checkpoint.json").exists():  # every rank sees it: none starts alone
        raise PrismError(f"{run} already holds a run; pass --resume to continue it or choose "
                         "another --out")
    if rank == 0:
        ensure_writable(run)
    val_images = load_val(val_list.paths, int(cfg["image_size"]))

    # ---- model, losses, optimisers
    weights_dir = _resolve_path(cfg.get("weights_dir"))
    model = build_uae(cfg, weights_dir=weights_dir, device=device)
    perceptual = None
    if float(lcfg["perceptual_weight"]) > 0:
        perceptual = build_perceptual(lcfg["perceptual"], teacher=model.teacher,
                                      weights_dir=weights_dir, device=device)
    use_gan = any(st["gan"] for st in stages) and float(lcfg["gan"]) > 0
    disc = PatchDiscriminator(int(lcfg["disc"]["width"]), int(lcfg["disc"]["layers"])) \
        .to(device) if use_gan else None
    betas = tuple(float(b) for b in ocfg["betas"])
    opt = torch.optim.AdamW(param_groups(model, ocfg), lr=float(ocfg["lr"]), betas=betas)
    dopt = torch.optim.AdamW(disc.parameters(), lr=float(lcfg["disc"].get("lr") or ocfg["lr"]),
                             betas=betas, weight_decay=0.0) if disc is not None else None
    ema = EMA(ema_params(model), float(ocfg["ema"]))
    desc = perceptual.describe() if perceptual is not None else "none"
    info = {"perceptual": desc, "world_size": world, "precision": precision,
            "n_train": len(train_list), "n_val": len(val_list), "total_steps": total,
            "train_images": train_list.to_dict(), "val_images": val_list.to_dict()}

    start = 0
    if record is not None:
        start = int(record["step"])
        load_weights_into(model, tensors, use_ema=False)
        ema.shadow = {k[len("ema."):]: v.clone() for k, v in tensors.items()
                      if k.startswith("ema.")}
        ema.num_updates = int(record["ema_updates"])
        _optim_load(opt, otensors, record["optimizer"], "opt")
        if disc is not None:
            disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
            _optim_load(dopt, otensors, record["disc_optimizer"], "dopt")
        torch.set_rng_state(otensors["rng.torch"])
    stop = total if stop_after is None else min(total, int(stop_after))

    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "grids").mkdir(exist_ok=True)
        atomic_write_text(run / "config.json", json.dumps({"config": cfg, **info}, indent=1))
        _trim_metrics(run / "metrics.jsonl", start)
        log.info("UAE run %s: %d train / %d val images, %d steps, perceptual loss %s, "
                 "%d process(es)", run, len(train_list), len(val_list), total, desc, world)

    def write_metrics(rec: Mapping[str, Any]) -> None:
        if rank == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def evaluate(step: int) -> None:
        if rank == 0:
            named = ema_params(model)
            saved = ema.swap_into(named) if cfg["eval"].get("ema", True) else None
            metrics = validate(model, val_images, int(cfg["eval"]["batch_size"]), device)
            n = int(cfg["eval"]["grid"])
            if n:
                with torch.no_grad():
                    x = val_images[:n].to(device)
                    save_grid(run / "grids" / f"step-{step:07d}.png", x,
                              model.decode(model.encode(x)).float())
            if saved is not None:
                EMA.restore(named, saved)
            write_metrics({"kind": "val", "step": step, **metrics})
            log.info("step %d: val PSNR %.2f dB%s", step, metrics["psnr"],
                     f", low-band cosine to teacher {metrics['cos_low_band']:.4f}"
                     if "cos_low_band" in metrics else "")
        if world > 1:
            torch.distributed.barrier()

    def checkpoint(step: int) -> None:
        save_checkpoint(run, rank=rank, step=step, model=model, ema=ema, opt=opt, disc=disc,
                        dopt=dopt, extra={"perceptual": desc, "stage": stage_at(stages, step - 1)
                                          ["name"]}, keep=int(cfg["checkpoint"]["keep"]))
        if world > 1:
            torch.distributed.barrier()

    if start == 0:
        evaluate(0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicroBatches(len(dataset), batch, seed, start, stop, rank, world,
                                            accum),
        num_workers=int(dcfg["workers"]), persistent_workers=False)
    batches = iter(loader)
    bar = _Progress(stop, start, progress if progress is not None else
                    (rank == 0 and sys.stderr.isatty()))
    records: list[dict[str, Any]] = []
    current, wrapped = None, model

    with bar, _DeferredInterrupt(world == 1) as ctrl_c:
        for step in range(start, stop):
            t_step = time.perf_counter()
            stage = stage_at(stages, step)
            if stage is not current:  # (re)wrap: DDP only covers the parameters that train now
                current = stage
                set_trainable(model, stage)
                if world > 1:
                    from torch.nn.parallel import DistributedDataParallel as DDP

                    ids = [device.index] if device.type == "cuda" else None
                    wrapped = DDP(model, device_ids=ids, broadcast_buffers=False)
            lr = lr_at(step, total, ocfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            logs = {"loss": 0.0, "l1": 0.0, "perceptual": 0.0, "semantic": 0.0, "gan": 0.0,
                    "gan_weight": 0.0, "disc": 0.0}
            params = [p for p in ema_params(model).values() if p.requires_grad]

            for micro in range(accum):
                idx, x = next(batches)
                x = x.to(device, non_blocking=True)
                sync = world > 1 and micro < accum - 1
                with (wrapped.no_sync() if sync else nullcontext()), autocast():
                    parts = step_losses(wrapped, model, x, idx, step, stage, cfg,
                                        perceptual=perceptual, disc=disc, world=world)
                loss, y = parts["loss"], parts["clean"]
                (loss / accum).backward()
                if stage["gan"] and disc is not None:
                    disc.requires_grad_(True)
                    with autocast():
                        logits = disc(torch.cat([x, y.detach()]))
                        d_loss = hinge_d_loss(logits[:len(x)], logits[len(x):])
                    (d_loss / accum).backward()
                    logs["disc"] += float(d_loss.detach()) / accum
                for key in ("loss", "l1", "perceptual", "semantic", "gan", "gan_weight"):
                    logs[key] += float(parts[key].detach()) / accum

            if disc is not None and stage["gan"]:
                if world > 1:  # the discriminator is small: average its gradients by hand
                    for p in disc.parameters():
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                dopt.step()
                dopt.zero_grad(set_to_none=True)
            clip = float(ocfg["grad_clip"])
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(ema_params(model))

            logs = _mean_over_ranks(logs, world, device)
            img_s = batch / max(time.perf_counter() - t_step, 1e-9)  # global images per second
            rec_out = {"kind": "train", "step": step + 1, "stage": stage["name"], "lr": lr,
                       "grad_norm": float(gnorm), **logs}
            records.append(rec_out)
            write_metrics({**rec_out, "img_s": img_s})
            bar.update(step + 1, f"{stage['name']} loss {logs['loss']:.4f} lr {lr:.2e} "
                                 f"{img_s:.1f} img/s")
            if (step + 1) % int(cfg["eval"]["every"]) == 0 or step + 1 == total:
                evaluate(step + 1)
            every = int(cfg["checkpoint"]["every"])
            if (step + 1) % every == 0 or step + 1 in (stop, total) or ctrl_c.pending:
                checkpoint(step + 1)
            if ctrl_c.pending and step + 1 < stop:
                raise KeyboardInterrupt  # after the checkpoint of this finished step
    if world > 1:
        torch.distributed.destroy_process_group()
    return records


def interrupted_message(run) -> str:
    """The line printed when Ctrl-C stops a run: what ``run`` holds to resume from."""
    try:
        step = int(read_checkpoint(Path(run))["step"])
    except PrismError:
        return f"prism-probe: interrupted before the first checkpoint; nothing in {run} to resume"
    return (f"prism-probe: interrupted; {run} holds the checkpoint of step {step}, continue with "
            "--resume")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (left by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    if step == 0:
        keep = []
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------------------------
# Entry point for torchrun


def main(argv=None) -> int:
    """``python -m prism_probe.uae.train --preset tiny-cpu --out RUN [--set k=v ...]``."""
    ap = argparse.ArgumentParser(prog="python -m prism_probe.uae.train",
                                 description="Train a UAE (same options as prism-probe "
                                             "train-uae); runs under torchrun too.")
    ap.add_argument("--preset")
    ap.add_argument("--config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = resolve_config(args.preset, args.config, args.sets)
        train(cfg, args.out, resume=args.resume, stop_after=args.stop_after,
              progress=False if args.no_progress else None)
    except PrismError as exc:
        print(f"prism-probe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted_message(args.out), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
