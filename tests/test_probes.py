"""Band-ablation probes: known answers for the scores, identities, and measured real-weight values.

The real-weight expectations were measured with this code on fixed seeded subsets of
../shared/data (10 test images per class, 20 training images per class, seed 0) and are held
within ±2 images (±2 points on 100 images) or ±0.3 dB: a change in the filters, the split, the
head or the readers moves them by more than that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prism_probe.errors import PrismError
from prism_probe.metrics import psnr, ssim
from prism_probe.probes import (
    AblationConfig,
    LinearProbe,
    ablate_encoder,
    band_filter,
    knn_predict,
    labeled_folder,
)

ACC_TOL = 2.0  # points of top-1 on 100 images: two images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One intra-op thread is several times faster than two on a shared, busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(profile) -> dict:
    """(band, cutoff) → scores of an ablation profile."""
    return {(r["band"], r["cutoff"]): r["scores"] for r in profile.result["rows"]}


# --------------------------------------------------------------------------------------------
# Known answers without weights


def test_knn_votes_are_temperature_weighted():
    # Query (1, 0). Nearest: one class-1 point at cos 1; then two class-0 points at cos 0.8.
    # Majority of k=3 says class 0; DINO weights exp(cos/T) say class 1 when T is small:
    # exp(1/0.07) > 2·exp(0.8/0.07), but exp(1) < 2·exp(0.8).
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(q, bank, labels, 2, k=3, temperature=0.07).item() == 1
    assert knn_predict(q, bank, labels, 2, k=3, temperature=1.0).item() == 0
    # Cosine, not Euclidean: scaling the query or the bank changes nothing.
    assert knn_predict(5 * q, 3 * bank, labels, 2, k=3, temperature=0.07).item() == 1
    # k larger than the bank uses the whole bank.
    assert knn_predict(q, bank, labels, 2, k=20, temperature=1.0).item() == 0


def _gaussians(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(3, 16) * 12.0
    x = torch.cat([means[c] + torch.randn(n_per_class, 16, generator=g) for c in range(3)])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


def test_separable_gaussians_are_classified_perfectly():
    xtr, ytr = _gaussians(40, seed=1)
    xte, yte = _gaussians(30, seed=2)
    pred = knn_predict(xte, xtr, ytr, 3)
    assert (pred == yte).all()
    probe = LinearProbe(seed=0).fit(xtr, ytr, 3)
    assert probe.train_accuracy == 100.0
    assert (probe.predict(xte) == yte).all()


def test_linear_probe_is_deterministic_with_its_seed():
    x, y = _gaussians(20, seed=3)
    x = x + 8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))  # overlap
    a = LinearProbe(seed=7, max_iter=30).fit(x, y, 3)
    b = LinearProbe(seed=7, max_iter=30).fit(x, y, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_band_filter_low_plus_high_is_identity_and_all_is_input():
    x = torch.randn(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    for domain in ("fft", "dct"):
        lo = band_filter(x, "low", 0.2, domain=domain)
        hi = band_filter(x, "high", 0.2, domain=domain)
        torch.testing.assert_close(lo + hi, x, atol=1e-5, rtol=0)
    assert band_filter(x, "all", None) is x
    torch.testing.assert_close(band_filter(x, "low", math.sqrt(2) / 2), x)
    mean_only = band_filter(x, "low", 0.0)
    torch.testing.assert_close(mean_only, x.mean(dim=(-2, -1), keepdim=True).expand_as(x),
                               atol=1e-5, rtol=0)


def test_config_validation_names_the_fix():
    with pytest.raises(PrismError, match="--mode"):
        AblationConfig(mode="pixels")
    with pytest.raises(PrismError, match="each band"):
        AblationConfig(bands=("low", "mid"))
    with pytest.raises(PrismError, match=">= 0"):
        AblationConfig(cutoffs=(-0.1,))
    with pytest.raises(PrismError, match="--layer"):
        AblationConfig(mode="feature")
    cfg = AblationConfig(bands=("high", "all", "low"), cutoffs=(0.3, 0.1, 0.1))
    assert cfg.conditions() == [("all", None), ("high", 0.1), ("high", 0.3), ("low", 0.1),
                                ("low", 0.3)]


# --------------------------------------------------------------------------------------------
# PSNR / SSIM against scikit-image on real images


def test_psnr_ssim_match_skimage(imagenet16):
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    for path in imagenet16[:3]:
        ref = np.asarray(Image.open(path).convert("RGB").resize((72, 56)), np.float64) / 255
        noisy = np.clip(ref + rng.normal(0, 0.04, ref.shape), 0, 1)
        blurred = (ref + np.roll(ref, 1, 0) + np.roll(ref, 1, 1)) / 3
        for test in (noisy, blurred):
            want_s = structural_similarity(test, ref, data_range=1.0, channel_axis=2,
                                           gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False)
            want_p = peak_signal_noise_ratio(ref, test, data_range=1.0)
            t = torch.from_numpy(test).permute(2, 0, 1)[None]
            r = torch.from_numpy(ref).permute(2, 0, 1)[None]
            assert ssim(t, r).item() == pytest.approx(want_s, abs=1e-9)
            assert psnr(t, r).item() == pytest.approx(want_p, abs=1e-9)
            # float32 input gives the same to float32 precision
            assert ssim(t.float(), r.float()).item() == pytest.approx(want_s, abs=1e-5)
    same = torch.rand(1, 3, 16, 16)
    assert ssim(same, same).item() == pytest.approx(1.0)
    assert math.isinf(psnr(same, same).item())


# --------------------------------------------------------------------------------------------
# Real weights: CIFAR ResNets


@pytest.fixture(scope="module")
def cifar_sets(cifar_dir):
    test = labeled_folder(cifar_dir / "test", per_class=10, seed=0)
    train = labeled_folder(cifar_dir / "train", per_class=20, seed=0)
    assert len(test.images) == 100 and len(train.images) == 200
    return test, train


@pytest.fixture(scope="module")
def resnets(shared_weights):
    from prism_probe.loading import load_encoder

    return {name: load_encoder(name, weights_dir=shared_weights, device="cpu")
            for name in ("resnet20-cifar", "resnet56-cifar")}


@pytest.fixture(scope="module")
def r20_input(resnets, cifar_sets):
    test, train = cifar_sets
    cfg = AblationConfig(mode="input", bands=("all", "low", "high"), cutoffs=(0.0, 0.1, 0.71))
    return ablate_encoder(resnets["resnet20-cifar"], cfg, test, train=train, batch_size=100)


# Measured: resnet20-cifar, input ablation (cycles per input pixel), 100 test / 200 train images.
R20_INPUT = {
    "unablated": {"head_top1": 78.0, "knn_top1": 80.0, "linear_top1": 73.0},
    ("low", 0.0): {"head_top1": 14.0, "knn_top1": 12.0, "linear_top1": 9.0, "cosine": 0.4277},
    ("low", 0.1): {"head_top1": 10.0, "knn_top1": 14.0, "linear_top1": 15.0, "cosine": 0.6144},
    ("high", 0.0): {"head_top1": 74.0, "knn_top1": 76.0, "linear_top1": 77.0, "cosine": 0.9708},
    ("high", 0.1): {"head_top1": 58.0, "knn_top1": 63.0, "linear_top1": 58.0, "cosine": 0.9159},
}


def _check(scores: dict, want: dict) -> None:
    for name, value in want.items():
        tol = 0.01 if name == "cosine" else ACC_TOL
        assert scores[name] == pytest.approx(value, abs=tol), name


def test_resnet20_input_ablation_measured(r20_input):
    got = rows(r20_input)
    _check(r20_input.result["unablated"], R20_INPUT["unablated"])
    for cond, want in R20_INPUT.items():
        if cond != "unablated":
            _check(got[cond], want)
    assert r20_input.protocol["cutoff_units"] == "cycles per input pixel"
    assert r20_input.images["n_used"] == 100 and r20_input.result["n_train"] == 200


def test_identity_conditions_give_unablated_scores(r20_input):
    base = r20_input.result["unablated"]
    got = rows(r20_input)
    for cond in (("all", None), ("low", 0.71)):
        for name, value in base.items():
            assert got[cond][name] == pytest.approx(value, abs=1e-6), (cond, name)
    # Removing every frequency leaves a zero (mean-colour) image: chance level.
    assert got[("high", 0.71)]["head_top1"] == pytest.approx(10.0, abs=ACC_TOL)


def test_mean_only_input_drops_own_head_by_more_than_50_points(r20_input, resnets, cifar_sets):
    got = rows(r20_input)
    base = r20_input.result["unablated"]["head_top1"]
    assert base - got[("low", 0.0)]["head_top1"] > 50
    cfg = AblationConfig(mode="input", bands=("all", "low"), cutoffs=(0.0,))
    p56 = ablate_encoder(resnets["resnet56-cifar"], cfg, cifar_sets[0], batch_size=100)
    # Measured: resnet56-cifar 87 % unablated, 13 % from the mean colour alone.
    assert p56.result["unablated"]["head_top1"] == pytest.approx(87.0, abs=ACC_TOL)
    assert rows(p56)[("low", 0.0)]["head_top1"] == pytest.approx(13.0, abs=ACC_TOL)
    assert rows(p56)[("all", None)]["head_top1"] == p56.result["unablated"]["head_top1"]
    assert p56.result["unablated"]["head_top1"] - rows(p56)[("low", 0.0)]["head_top1"] > 50


# Measured: feature ablation at layer2 (16×16 cells, stride 2 px), cycles per cell, own head.
FEATURE_LAYER2 = {
    "resnet20-cifar": {("low", 0.0): 17.0, ("low", 0.125): 69.0, ("high", 0.0): 21.0,
                       ("high", 0.125): 10.0},
    "resnet56-cifar": {("low", 0.0): 22.0, ("low", 0.125): 67.0, ("high", 0.0): 41.0,
                       ("high", 0.125): 15.0},
}


@pytest.mark.parametrize("name", sorted(FEATURE_LAYER2))
def test_feature_ablation_at_layer2_measured(name, resnets, cifar_sets):
    cfg = AblationConfig(mode="feature", layer="layer2", bands=("low", "high"),
                         cutoffs=(0.0, 0.125, 0.71))
    p = ablate_encoder(resnets[name], cfg, cifar_sets[0], batch_size=100)
    got = rows(p)
    for cond, want in FEATURE_LAYER2[name].items():
        assert got[cond]["head_top1"] == pytest.approx(want, abs=ACC_TOL), cond
    base = p.result["unablated"]
    for key, value in base.items():
        assert got[("low", 0.71)][key] == pytest.approx(value, abs=1e-6)
    assert p.protocol["feature_grid"] == [16, 16] and p.protocol["stride_px"] == 2.0
    assert [r["cutoff_pixel"] for r in p.result["rows"]][:3] == [0.0, 0.0625, 0.355]


def test_pooled_last_map_is_refused(resnets):
    cfg = AblationConfig(mode="feature", layer="layer3", bands=("low",), cutoffs=(0.1,))
    with pytest.raises(PrismError, match="global pool.*only sees each channel's mean"):
        ablate_encoder(resnets["resnet20-cifar"], cfg, [])


def test_vit_split_filters_patch_tokens_only(tmp_path):
    # A random-weight 3-block ViT-Tiny at 64 px (4×4 patch grid, one CLS token): enough to run
    # the token path of feature ablation without downloading anything.
    from prism_probe.data import collect_images
    from prism_probe.loading import load_encoder
    from prism_probe.registry import Registry

    yaml = tmp_path / "tiny.yaml"
    yaml.write_text("version: 1\nencoders:\n  tiny-vit:\n    family: semantic\n"
                    "    backend: timm\n    id: vit_tiny_patch16_224\n"
                    "    input: {size: 64, resize: shorter}\n    features: {layer: final}\n"
                    "    options: {img_size: 64, depth: 3}\n    weights: {}\n"
                    "    description: test\n")
    enc = load_encoder("random:tiny-vit", registry=Registry.load([yaml]), device="cpu")
    images = collect_images(None, limit=4)
    cfg = AblationConfig(mode="feature", layer="blocks.1", bands=("all", "low", "high"),
                         cutoffs=(0.0, 0.71))
    p = ablate_encoder(enc, cfg, images, batch_size=4)
    got = rows(p)
    assert p.protocol["feature_grid"] == [4, 4] and p.protocol["stride_px"] == 16.0
    assert got[("all", None)]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got[("low", 0.71)]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got[("low", 0.0)]["cosine"] < 0.9999
    with pytest.raises(PrismError, match="last map of 'random:tiny-vit' before its global"):
        ablate_encoder(enc, AblationConfig(mode="feature", layer="blocks.3", bands=("low",),
                                           cutoffs=(0.1,)), images)


# --------------------------------------------------------------------------------------------
# Real weights: taef2 latent ablation


def test_taef2_latent_ablation_psnr_falls_with_cutoff(shared_weights, imagenet16):
    from prism_probe.data import collect_images
    from prism_probe.loading import load_encoder

    enc = load_encoder("taef2", weights_dir=shared_weights, device="cpu", image_size=128)
    images = collect_images(imagenet16[:4])
    cfg = AblationConfig(mode="latent", bands=("all", "low"), cutoffs=(0.0625, 0.125, 0.25))
    p = ablate_encoder(enc, cfg, images, batch_size=4)
    got = rows(p)
    base = p.result["unablated"]
    # Measured on these 4 images at 128 px (16×16 latent): 27.37 dB / SSIM 0.864 unablated.
    assert base["psnr"] == pytest.approx(27.37, abs=0.3)
    assert base["ssim"] == pytest.approx(0.864, abs=0.01)
    assert got[("all", None)]["psnr"] == pytest.approx(base["psnr"], abs=1e-6)
    assert got[("all", None)]["ssim_vs_recon"] == pytest.approx(1.0, abs=1e-9)
    curve = [got[("low", c)]["psnr"] for c in (0.0625, 0.125, 0.25)]
    for value, want in zip(curve, (14.84, 16.14, 17.80)):
        assert value == pytest.approx(want, abs=0.3)
    assert curve[0] < curve[1] < curve[2] < base["psnr"]
    spectra = p.result["spectra"]
    assert set(spectra["power"]) >= {"image", "unablated", "low@0.0625"}
    assert len(spectra["freqs_pixel"]) == len(spectra["power"]["image"])
    assert p.protocol["latent_grid"] == [16, 16]


def test_latent_ablation_needs_a_decoder(resnets):
    cfg = AblationConfig(mode="latent", bands=("low",), cutoffs=(0.1,))
    with pytest.raises(PrismError, match="no decoder"):
        ablate_encoder(resnets["resnet20-cifar"], cfg, [])


def test_cli_ablate_writes_profile_and_figure(tmp_path, cifar_dir, shared_weights):
    from typer.testing import CliRunner

    from prism_probe.cli import app
    from prism_probe.profile import Profile

    out = tmp_path / "out"
    res = CliRunner().invoke(app, [
        "ablate", "resnet20-cifar", "--mode", "input", "--bands", "all,low",
        "--cutoffs", "0,0.71", "--test", str(cifar_dir / "test"), "--per-class", "2",
        "--weights", str(shared_weights), "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "cutoff (cycles/px)" in res.output and "head_top1" in res.output
    p = Profile.load(out / "ablation-resnet20-cifar.json")
    assert p.kind == "ablation" and p.images["n_used"] == 20
    assert rows(p)[("low", 0.71)]["head_top1"] == p.result["unablated"]["head_top1"]
    assert (out / "ablation.png").stat().st_size > 10_000 and (out / "ablation.pdf").exists()

    res = CliRunner().invoke(app, [
        "ablate", "resnet20-cifar", "--mode", "feature", "--layer", "layer3",
        "--test", str(cifar_dir / "test"), "--per-class", "1",
        "--weights", str(shared_weights), "--device", "cpu"])
    assert res.exit_code == 2 and "global pool" in res.output
