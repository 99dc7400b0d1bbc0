"""Backends that need no model library: tae, cifar_resnet, torch_module, pixels.

Real-weight tests read ../shared in place (skipping with a reason when it is absent); models are
built once per module and only small subsets are decoded, so the whole file runs in well under a
minute on two CPU cores.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prism_probe import weights as W
from prism_probe.data import load_image_folder, read_image
from prism_probe.errors import PrismError, RegistryError, WeightsError
from prism_probe.loading import load_encoder
from prism_probe.loading import cifar_resnet, tae
from prism_probe.metrics import psnr
from prism_probe.registry import EncoderEntry, EncoderSpec, Registry

# Measured here once (CPU, float32) and asserted within a tolerance: the JPEG copies in
# cifar10-small score well below the checkpoints' recorded 91.78 / 93.62 on the PNG test set.
CIFAR_TOP1 = {"resnet20-cifar": 80.4, "resnet56-cifar": 82.5}
CIFAR_TOL = 1.5
# taef2 at 128 px on 8 ImageNet sample images: 27.56 dB mean measured. The deliberately wrong
# architectures score lower: GroupNorm with 2 groups 23.25, with 8 groups 25.76, the pool branch
# after the block 24.79 (1 group 23.96, 16 groups 23.28).
TAEF2_PSNR_MIN = 26.8
WRONG_GAP = 1.5  # dB by which each wrong variant must trail the real one


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Never download, and never see a user's weight folders or download cache."""
    monkeypatch.setenv("PRISM_PROBE_OFFLINE", "1")
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------ taef2


@pytest.fixture(scope="module")
def taef2(shared_weights):
    return load_encoder("taef2", weights_dir=shared_weights)


@pytest.fixture(scope="module")
def photos128(imagenet_dir, taef2) -> torch.Tensor:
    """8 ImageNet sample photos, 128 px, [0, 1] (taef2's preprocessing): (8, 3, 128, 128)."""
    files = sorted(imagenet_dir.glob("*.JPEG"))[::31][:8]
    prep = tae.make_preprocess(taef2.entry, (128, 128))
    return torch.stack([prep(read_image(p)) for p in files])


def _reconstruction_psnr(encoder, decoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = decoder(encoder(x)).clamp(0, 1)
    return float(psnr(y, x).mean())


def test_taef2_loads_strictly_with_pool_branches(taef2):
    enc = taef2.model["encoder"]
    dec = taef2.model["decoder"]
    assert enc[-1].out_channels == 32 and dec[1].in_channels == 32
    pooled = [i for i, m in enumerate(enc) if isinstance(m, tae.Block) and m.pool is not None]
    assert pooled == [11, 12, 13]
    pooled = [i for i, m in enumerate(dec) if isinstance(m, tae.Block) and m.pool is not None]
    assert pooled == [3, 4, 5]
    assert enc[11].pool[1].num_groups == 4
    assert taef2.has_decoder
    assert taef2.weights.sha256.startswith("10a4e1021e89d755")
    assert taef2.preprocess.value_range == (0.0, 1.0)


def test_taef2_latent_shape_and_statistics(taef2, photos128):
    fmap = taef2.encode(photos128)
    assert fmap.tensor.shape == (8, 32, 16, 16)
    assert fmap.layer == "latent" and fmap.stride == 8
    z = fmap.tensor
    # Measured: std 0.89, range about -4.9 … 4.7 (shared/README.md: ±5, std near 1).
    assert 0.6 < float(z.std()) < 1.3
    assert abs(float(z.mean())) < 0.5
    assert 3.0 < float(z.abs().max()) < 8.0


def test_taef2_reconstruction_beats_wrong_architectures(taef2, photos128, shared_weights):
    x = photos128
    with torch.no_grad():
        right = float(psnr(taef2.decode(taef2.encode(x).tensor), x).mean())
    assert right > TAEF2_PSNR_MIN, f"taef2 reconstruction {right:.2f} dB"

    esd = W.load_state_dict(shared_weights / "taef2_encoder.pth")
    dsd = W.load_state_dict(shared_weights / "taef2_decoder.pth")
    for arch in ({"groups": 2}, {"groups": 8}, {"placement": "output"}):
        wrong = _reconstruction_psnr(tae.encoder_from_state_dict(esd, **arch).eval(),
                                     tae.decoder_from_state_dict(dsd, **arch).eval(), x)
        # The threshold must fail each plausible mistake, or it proves nothing.
        assert wrong < TAEF2_PSNR_MIN and wrong < right - WRONG_GAP, (arch, wrong, right)


def test_taef2_decode_keeps_gradients_to_the_latent(taef2):
    z = torch.randn(1, 32, 8, 8, requires_grad=True)
    img = taef2.decode(z)
    assert img.shape == (1, 3, 64, 64)
    assert 0 <= float(img.detach().min()) and float(img.detach().max()) <= 1
    img.mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------ TAESD/TAEF1 layout


def _tae_encoder_keys(channels: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a raw TAESD-layout encoder, written out from the published layout."""
    shapes = {"0.weight": (64, 3, 3, 3), "0.bias": (64,)}
    for i in range(1, 14):
        if i in (2, 6, 10):
            shapes[f"{i}.weight"] = (64, 64, 3, 3)  # stride-2 conv, no bias
            continue
        for j in (0, 2, 4):
            shapes[f"{i}.conv.{j}.weight"] = (64, 64, 3, 3)
            shapes[f"{i}.conv.{j}.bias"] = (64,)
    shapes.update({"14.weight": (channels, 64, 3, 3), "14.bias": (channels,)})
    return shapes


def _tae_decoder_keys(channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {"1.weight": (64, channels, 3, 3), "1.bias": (64,)}
    for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):
        for j in (0, 2, 4):
            shapes[f"{i}.conv.{j}.weight"] = (64, 64, 3, 3)
            shapes[f"{i}.conv.{j}.bias"] = (64,)
    for i in (7, 12, 17):
        shapes[f"{i}.weight"] = (64, 64, 3, 3)
    shapes.update({"19.weight": (3, 64, 3, 3), "19.bias": (3,)})
    return shapes


def _random_sd(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.05).half() for k, s in shapes.items()}


@pytest.mark.parametrize("channels", [4, 16])
def test_tae_layout_infers_channels_and_no_pool(channels):
    enc = tae.encoder_from_state_dict(_random_sd(_tae_encoder_keys(channels)))
    dec = tae.decoder_from_state_dict(_random_sd(_tae_decoder_keys(channels)))
    assert enc[-1].out_channels == channels and dec[1].in_channels == channels
    assert not any(isinstance(m, tae.PoolBranch) for m in [*enc.modules(), *dec.modules()])
    with torch.no_grad():
        z = enc(torch.rand(1, 3, 64, 48))
        assert z.shape == (1, channels, 8, 6)
        assert dec(z).shape == (1, 3, 64, 48)


def test_tae_raw_files_through_load_encoder(tmp_path):
    for part, keys in (("encoder", _tae_encoder_keys(4)), ("decoder", _tae_decoder_keys(4))):
        torch.save(_random_sd(keys), tmp_path / f"taesd_{part}.pth")
    enc = load_encoder("taesd-raw", weights_dir=tmp_path, image_size=64)
    assert enc.has_decoder and enc.weights.source == "file"
    fmap = enc.encode(torch.rand(2, 3, 64, 64))
    assert fmap.tensor.shape == (2, 4, 8, 8)
    assert enc.decode(fmap.tensor).shape == (2, 3, 64, 64)


def test_tae_bad_keys_are_named():
    sd = _random_sd(_tae_encoder_keys(4))
    del sd["5.conv.2.bias"]
    sd["5.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing keys 5\.conv\.2\.bias.*unexpected keys "
                                           r"5\.extra\.weight"):
        tae.encoder_from_state_dict(sd, "bad.pth")


def test_tae_input_not_multiple_of_8_is_refused():
    enc = load_encoder("random:taef2", image_size=64)
    with pytest.raises(PrismError, match="multiple of 8"):
        enc.encode(torch.rand(1, 3, 60, 64))


# ----------------------------------------------------------------------------- CIFAR ResNets


@pytest.fixture(scope="module")
def cifar_test(cifar_dir):
    paths, labels, _ = load_image_folder(cifar_dir / "test")
    return [read_image(p) for p in paths], torch.tensor(labels)


@pytest.fixture(scope="module")
def resnets(shared_weights):
    return {name: load_encoder(name, weights_dir=shared_weights) for name in CIFAR_TOP1}


def test_cifar_resnet_top1(resnets, cifar_test):
    images, labels = cifar_test
    assert len(images) == 1000
    top1 = {}
    for name, enc in resnets.items():
        x = torch.stack([enc.preprocess(im) for im in images])
        logits = enc.head(enc.encode(x).tensor)
        top1[name] = 100 * float((logits.argmax(1) == labels).float().mean())
    print("CIFAR-10 JPEG test top-1:", {k: round(v, 2) for k, v in top1.items()})
    for name, acc in top1.items():
        assert abs(acc - CIFAR_TOP1[name]) <= CIFAR_TOL, (name, acc)
    assert top1["resnet56-cifar"] > top1["resnet20-cifar"]


def test_cifar_resnet_grids_split_and_sha(resnets, cifar_test):
    enc = resnets["resnet20-cifar"]
    x = torch.stack([enc.preprocess(im) for im in cifar_test[0][:16]])
    assert enc.weights.sha256.startswith("12fca82f0bebc413")
    assert resnets["resnet56-cifar"].weights.sha256.startswith("4bfd97631478d6b6")
    fmap = enc.encode(x)
    assert fmap.tensor.shape == (16, 64, 8, 8) and fmap.stride == 4 and fmap.layer == "layer3"
    with torch.no_grad():
        full = enc.model(x)
        for at, (c, grid) in {"conv1": (16, 32), "layer1": (16, 32), "layer2": (32, 16),
                              "layer3": (64, 8)}.items():
            head, tail = enc.split(at)
            mid = head(x)
            assert mid.shape == (16, c, grid, grid), at
            pooled = tail(mid)
            assert pooled.shape == (16, 64)
            assert torch.equal(enc.head(pooled), full), at
    assert torch.equal(enc.head(fmap.tensor), full)
    with pytest.raises(PrismError, match="split point"):
        enc.split("layer4")


def test_cifar_feature_layer_choice(shared_weights):
    reg = Registry.load(use_env=False)
    base = reg.get("resnet20-cifar")
    entry = EncoderEntry(**{**base.__dict__, "name": "r20-l2", "features": {"layer": "layer2"}})
    fmap = load_encoder(EncoderSpec("r20-l2", entry), weights_dir=shared_weights).encode(
        torch.zeros(1, 3, 32, 32))
    assert fmap.tensor.shape == (1, 32, 16, 16) and fmap.stride == 2


def test_random_resnet_needs_no_files(tmp_path):
    enc = load_encoder("random:resnet20-cifar", weights_dir=tmp_path)
    assert enc.weights.source == "random"
    assert enc.encode(torch.zeros(2, 3, 32, 32)).tensor.shape == (2, 64, 8, 8)


def test_cifar_checkpoint_bad_keys_are_named(shared_weights, tmp_path):
    raw = W.load_state_dict(shared_weights / "resnet20-12fca82f.th")
    sd = dict(raw["state_dict"])
    del sd["module.layer2.1.conv1.weight"]
    sd["module.fc.weight"] = torch.zeros(10, 64)
    torch.save({"best_prec1": 1.0, "state_dict": sd}, tmp_path / "bad.th")
    with pytest.raises(WeightsError, match=r"missing keys layer2\.1\.conv1\.weight.*"
                                           r"unexpected keys fc\.weight"):
        cifar_resnet.load_checkpoint(cifar_resnet.CifarResNet(20), tmp_path / "bad.th")


# ------------------------------------------------------------------- weights: safety, errors


def test_wrong_checksum_is_refused(shared_weights, tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(shared_weights / "resnet20-12fca82f.th", folder / "resnet20-12fca82f.th")
    user = tmp_path / "user.yaml"
    user.write_text(textwrap.dedent(f"""\
        encoders:
          resnet20-cifar:
            base: resnet20-cifar
            weights: {{file: resnet20-12fca82f.th, sha256: "{'0' * 64}"}}
        """))
    reg = Registry.load([user], use_env=False)
    with pytest.raises(WeightsError, match="does not match.*refusing"):
        load_encoder("resnet20-cifar", registry=reg, weights_dir=folder)


def test_missing_file_offline_names_file_and_flag(tmp_path):
    with pytest.raises(WeightsError) as info:
        load_encoder("resnet56-cifar", weights_dir=tmp_path)
    msg = str(info.value)
    assert "resnet56-4bfd9763.th" in msg and "--weights" in msg and "\n" not in msg


class _Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"weight": torch.zeros(1), "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        W.load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it (here on a harmless copy).
    live = tmp_path / "live"
    torch.save({"evil": _Payload(live)}, tmp_path / "live.pth")
    torch.load(tmp_path / "live.pth", weights_only=False)
    assert live.exists()


# ------------------------------------------------------------------------------ torch_module

TINY_MODULE = '''
import torch
from torch import nn


class AddConst(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.c


class TinyNet(nn.Sequential):
    """stem (stride-2 conv) then AddConst layers: each one's output carries a known offset."""

    def __init__(self, width=4):
        super().__init__()
        self.add_module("stem", nn.Conv2d(3, width, 2, stride=2, bias=False))
        self.add_module("a", AddConst())
        self.add_module("b", AddConst())
        self.add_module("c", AddConst())


class Tokens(nn.Module):
    """A ViT-like module: CLS + row-major patch tokens (B, 1 + h*w, C)."""

    def __init__(self, dim=3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.out = nn.Identity()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.out(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))


def factory(width=4):
    return TinyNet(width)
'''


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    name = "prism_tiny_test_module"
    (tmp_path / f"{name}.py").write_text(TINY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    yield name
    sys.modules.pop(name, None)


def _tiny_entry(module: str, **fields) -> EncoderEntry:
    base = dict(name="tiny", family="semantic", backend="torch_module", id=f"{module}:TinyNet",
                description="test", input={"size": 8, "value_range": [0, 1]},
                options={"width": 4}, features={"layer": "b"})
    base.update(fields)
    return EncoderEntry(**base)


def _tiny_state_dict():
    sd = {"stem.weight": torch.zeros(4, 3, 2, 2), "a.c": torch.tensor([1.0]),
          "b.c": torch.tensor([10.0]), "c.c": torch.tensor([100.0])}
    for i in range(4):  # stem: output channel i averages input channel i % 3 over the patch
        sd["stem.weight"][i, i % 3] = 0.25
    return sd


def test_torch_module_safetensors_round_trip_and_marker_layer(tiny_module, tmp_path):
    from safetensors.torch import save_file

    save_file(_tiny_state_dict(), str(tmp_path / "tiny.safetensors"))
    entry = _tiny_entry(tiny_module, weights={"file": "tiny.safetensors"})
    enc = load_encoder(EncoderSpec("tiny", entry), weights_dir=tmp_path)
    x = torch.rand(2, 3, 8, 8)
    fmap = enc.encode(x)
    assert fmap.tensor.shape == (2, 4, 4, 4) and fmap.stride == 2 and fmap.layer == "b"
    # Layer b's output is the stem plus the markers of a and b (1 + 10), never c's 100.
    expected = F.avg_pool2d(x, 2)[:, [0, 1, 2, 0]] + 11
    assert torch.allclose(fmap.tensor, expected, atol=1e-6)
    assert enc.weights.sha256 == W.sha256_file(tmp_path / "tiny.safetensors")


def test_torch_module_nested_pickle_and_split(tiny_module, tmp_path):
    sd = {f"model.{k}": v for k, v in _tiny_state_dict().items()}
    torch.save({"epoch": 3, "ema": sd}, tmp_path / "tiny.pth")
    entry = _tiny_entry(tiny_module, weights={"file": "tiny.pth"},
                        options={"width": 4, "state_dict_key": "ema", "strip_prefix": "model."},
                        features={"layer": "c"}, split={"points": ["a", "b"]})
    enc = load_encoder(EncoderSpec("tiny", entry), weights_dir=tmp_path)
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(enc.encode(x).tensor, F.avg_pool2d(x, 2)[:, [0, 1, 2, 0]] + 111,
                          atol=1e-6)
    head, tail = enc.split("a")
    mid = head(x)
    assert torch.allclose(mid, F.avg_pool2d(x, 2)[:, [0, 1, 2, 0]] + 1, atol=1e-6)
    assert torch.equal(tail(mid), enc.model(x))
    with pytest.raises(PrismError, match="split point"):
        enc.split("c")


def test_torch_module_tokens_to_grid(tiny_module):
    entry = _tiny_entry(tiny_module, id=f"{tiny_module}:Tokens", options={},
                        input={"size": [8, 16], "value_range": [0, 1]},
                        features={"layer": "out", "prefix_tokens": 1, "grid": [2, 4]})
    enc = load_encoder(EncoderSpec("random:tiny", entry, random_init=True), image_size=(8, 16))
    x = torch.rand(1, 3, 8, 16)
    fmap = enc.encode(x)
    assert fmap.tensor.shape == (1, 3, 2, 4) and fmap.prefix_tokens == 1 and fmap.stride == 4
    assert torch.allclose(fmap.tensor, enc.model.embed(x), atol=1e-6)


def test_torch_module_errors(tiny_module, tmp_path):
    sd = _tiny_state_dict()
    del sd["b.c"]
    sd["d.c"] = torch.zeros(1)
    torch.save(sd, tmp_path / "tiny.pth")
    entry = _tiny_entry(tiny_module, weights={"file": "tiny.pth"})
    with pytest.raises(WeightsError, match=r"missing keys b\.c.*unexpected keys d\.c"):
        load_encoder(EncoderSpec("tiny", entry), weights_dir=tmp_path)

    factory = _tiny_entry(tiny_module, id=f"{tiny_module}:factory")
    with pytest.raises(RegistryError, match="trust_remote_code"):
        load_encoder(EncoderSpec("random:tiny", factory, random_init=True))
    trusted = _tiny_entry(tiny_module, id=f"{tiny_module}:factory", trust_remote_code=True)
    assert load_encoder(EncoderSpec("random:tiny", trusted, random_init=True)).model is not None

    with pytest.raises(RegistryError, match="not a submodule"):
        load_encoder(EncoderSpec("random:tiny", _tiny_entry(tiny_module, features={
            "layer": "nope"}), random_init=True))
    with pytest.raises(RegistryError, match="package.module:ClassOrFactory"):
        load_encoder(EncoderSpec("random:tiny", _tiny_entry(tiny_module, id="nocolon"),
                                 random_init=True))


# ------------------------------------------------------------------------------------ pixels


def test_pixels_marker_patch_lights_its_cell():
    enc = load_encoder("pixels:4", image_size=(16, 32))
    x = torch.zeros(1, 3, 16, 32)
    x[0, 1, 8:12, 20:24] = 1.0  # green patch at row 2, column 5 of the 4-px grid
    x[0, 2, 9, 22] = 0.5  # one blue pixel inside it, at (i, j) = (1, 2) within the patch
    fmap = enc.encode(x)
    assert fmap.tensor.shape == (1, 48, 4, 8) and fmap.stride == 4
    energy = fmap.tensor.abs().sum(1)[0]
    assert energy.nonzero().tolist() == [[2, 5]]
    cell = fmap.tensor[0, :, 2, 5]
    assert torch.equal(cell[16:32], torch.ones(16))  # green is channels 16..31
    assert cell[32 + 1 * 4 + 2] == 0.5  # channel c·P² + i·P + j
    assert torch.equal(fmap.tensor, F.pixel_unshuffle(x, 4))
    assert torch.equal(enc.decode(fmap.tensor), x)


def test_pixels_one_is_the_image_and_sizes_must_divide():
    enc = load_encoder("pixels:1", image_size=8)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(enc.encode(x).tensor, x)
    with pytest.raises(PrismError, match="multiple of the patch"):
        load_encoder("pixels:16", image_size=(24, 32))


# ------------------------------------------------------------------------------ public API


def test_public_api_taef2_and_resnet56(taef2, resnets):
    assert taef2.label == "taef2" and taef2.entry.backend == "tae"
    r56 = resnets["resnet56-cifar"]
    assert r56.label == "resnet56-cifar" and r56.model.depth == 56
    assert r56.weights.to_dict()["location"].endswith("resnet56-4bfd9763.th")
