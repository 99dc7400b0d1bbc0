"""`prism-probe check` / `baseline` and the pytest plugin, on real weights and images.

The regression tests break the pipeline silently: the encoder entry and the protocol stay the
same on paper (the profile's metadata does not change), but the code computes something else.
The check must see it in the numbers (exit 1) and say at which frequency the spectrum moved.
Differences the metadata records must exit 2 and name the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prism_probe import spectra
from prism_probe.check import (Tolerances, compare, reproducible, set_up_differences,
                               write_baseline)
from prism_probe.cli import app
from prism_probe.data import Preprocess, collect_images
from prism_probe.errors import PrismError
from prism_probe.loading import load_encoder
from prism_probe.measure import measure_encoder
from prism_probe.profile import Profile
from prism_probe.registry import Registry

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.shared

BATCH = 8
TINY_VIT = """\
version: 1
encoders:
  vit-tiny-test:
    family: semantic
    backend: timm
    id: vit_tiny_patch16_224
    input: {size: 128, resize: shorter, crop_pct: 1.0,
            mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
    features: {layer: final}
    options: {img_size: 128}
    weights: {}
    description: ViT-Ti/16 at 128 px (8×8 tokens), random weights, for tests only
"""


# ------------------------------------------------------------------------------------------------
# Fixtures: models and images loaded once per module


@pytest.fixture(scope="module")
def images(imagenet16):
    return collect_images(imagenet16[:8])


@pytest.fixture(scope="module")
def other_images(imagenet16):
    return collect_images(imagenet16[8:])


@pytest.fixture(scope="module")
def resnet20(shared_weights):
    return load_encoder("resnet20-cifar", weights_dir=shared_weights, device="cpu")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("registry") / "vit.yaml"
    path.write_text(TINY_VIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_encoder("random:vit-tiny-test", registry=Registry.load([path]),
                            device="cpu")


def measure(encoder, images, **options):
    with reproducible(threads=1):
        return measure_encoder(encoder, images, batch_size=BATCH, **options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Save a profile to a file and return its path."""
    folder = tmp_path_factory.mktemp("profiles")

    def save(profile: Profile, name: str) -> Path:
        return profile.save(folder / f"{name}.json")

    return save


@pytest.fixture(scope="module")
def resnet_baseline(resnet20, images, saved):
    profile = measure(resnet20, images)
    return profile, saved(profile, "resnet20-baseline")


@pytest.fixture(scope="module")
def vit_baseline(tiny_vit, images, saved):
    profile = measure(tiny_vit, images)
    return profile, saved(profile, "vit-baseline")


runner = CliRunner()


def check(profile_path, baseline_path, *args):
    result = runner.invoke(app, ["check", str(profile_path), "--baseline", str(baseline_path),
                                 *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def assert_drift_at_ring(result, baseline: Profile, profile: Profile):
    """exit 1, the message names the power at a ring, and that ring did move most."""
    assert result.exit_code == 1, result.output
    assert set_up_differences(profile, baseline) == []  # the metadata is unchanged on paper
    assert "drifted" in result.output
    assert "power: " in result.output and "at ring" in result.output
    import math

    moves = [abs(math.log(a / b)) for a, b in zip(profile.result["power"],
                                                  baseline.result["power"])]
    worst = baseline.result["freqs"][moves.index(max(moves))]
    assert f"power: {sum(m > 1e-4 for m in moves)} value(s) moved, most at ring {worst:.4g} " \
           "cycles/cell" in result.output, result.output


# ------------------------------------------------------------------------------------------------
# Unchanged re-run


def test_unchanged_rerun_is_bit_for_bit_and_passes(resnet20, images, resnet_baseline, saved):
    baseline, path = resnet_baseline
    again = measure(resnet20, images)
    assert again.result == baseline.result  # exact float equality, every value
    result = check(saved(again, "resnet20-again"), path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def test_thread_count_and_batch_size_stay_within_float_tolerance(resnet20, images,
                                                                 resnet_baseline):
    baseline, _ = resnet_baseline
    with reproducible(threads=2):
        other = measure_encoder(resnet20, images, batch_size=5)
    assert other.environment["batch_size"] == 5
    assert compare(other, baseline).status == "ok"


# ------------------------------------------------------------------------------------------------
# Silent regressions: metadata unchanged, numbers moved -> exit 1


def test_dropped_normalization_drifts(resnet20, images, resnet_baseline, saved, monkeypatch):
    baseline, path = resnet_baseline
    original = Preprocess.__call__

    def without_normalization(self, img):
        plain = Preprocess(size=self.size, resize=self.resize, crop_pct=self.crop_pct,
                           interpolation=self.interpolation)
        return original(plain, img)

    monkeypatch.setattr(Preprocess, "__call__", without_normalization)
    broken = measure(resnet20, images)
    assert broken.encoder["preprocess"]["mean"] == baseline.encoder["preprocess"]["mean"]
    assert_drift_at_ring(check(saved(broken, "no-norm"), path), baseline, broken)


def test_wrong_layer_drifts(resnet20, images, resnet_baseline, saved, monkeypatch):
    baseline, path = resnet_baseline
    # layer3's last block passes its input through: the map is the penultimate block's output,
    # same 64×8×8 shape, still labelled layer3.
    monkeypatch.setattr(resnet20.model.layer3[-1], "forward", lambda x: x)
    broken = measure(resnet20, images)
    assert broken.protocol["layer"] == "layer3"
    assert_drift_at_ring(check(saved(broken, "wrong-layer"), path), baseline, broken)


def test_changed_window_drifts(resnet20, images, resnet_baseline, saved, monkeypatch):
    baseline, path = resnet_baseline

    def periodic_hann(n, device, dtype):
        return torch.hann_window(n, periodic=True, device=device, dtype=dtype)

    monkeypatch.setattr(spectra, "_hann_1d", periodic_hann)
    spectra._plan.cache_clear()  # the window is cached per grid
    try:
        broken = measure(resnet20, images)
    finally:
        monkeypatch.undo()
        spectra._plan.cache_clear()
    assert broken.protocol["spectrum"]["window"] == "hann"
    result = check(saved(broken, "periodic-window"), path)
    assert_drift_at_ring(result, baseline, broken)
    assert "dct_band_energy" not in result.output  # the DCT takes no window: it did not move


@pytest.mark.parametrize("bug", ["channels-first reshape", "prefix off by one"])
def test_wrong_token_order_drifts(tiny_vit, images, vit_baseline, saved, monkeypatch, bug):
    baseline, path = vit_baseline
    from prism_probe.loading import timm_backend

    def misread(tokens, grid, prefix):
        b, _, c = tokens.shape
        h, w = grid
        if bug == "channels-first reshape":
            # (B, N, C) memory read as if it were (B, C, h, w): tokens and channels interleave.
            return tokens[:, prefix:].contiguous().reshape(b, c, h, w)
        # The CLS token taken as the first cell, the last patch dropped: every row shifts.
        shifted = tokens[:, prefix - 1:-1]
        return shifted.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    monkeypatch.setattr(timm_backend, "tokens_to_grid", misread)
    broken = measure(tiny_vit, images)
    assert broken.protocol["prefix_tokens_dropped"] == baseline.protocol["prefix_tokens_dropped"]
    assert_drift_at_ring(check(saved(broken, bug.replace(" ", "-")), path), baseline, broken)


# ------------------------------------------------------------------------------------------------
# Recorded differences -> exit 2, naming the field


@pytest.fixture(scope="module")
def recorded_variants(resnet20, images, other_images, shared_weights, saved):
    """Profiles that differ from the resnet20 baseline in one recorded field each."""
    resnet56 = load_encoder("resnet56-cifar", weights_dir=shared_weights, device="cpu")
    return {
        "encoder name": measure(resnet56, images),
        "protocol units": measure(resnet20, images, units="pixel"),
        "protocol grid": measure(resnet20, images, grid=6),
        "protocol spectrum": measure(resnet20, images,
                                     config=spectra.SpectrumConfig(window=None)),
        "image set": measure(resnet20, other_images),
    }


@pytest.mark.parametrize("field", ["encoder name", "protocol units", "protocol grid",
                                   "protocol spectrum", "image set"])
def test_recorded_difference_is_incomparable(recorded_variants, resnet_baseline, saved, field):
    _, path = resnet_baseline
    result = check(saved(recorded_variants[field], field.replace(" ", "-")), path)
    assert result.exit_code == 2, result.output
    assert result.output.count("incomparable") == 1
    assert field in result.output


def test_changed_registry_entry_is_incomparable(resnet_baseline, saved, tmp_path):
    baseline, path = resnet_baseline
    data = json.loads(baseline.to_json())
    data["encoder"]["entry"]["input"]["mean"] = [0.5, 0.5, 0.5]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    result = check(edited, path, "--json")
    assert result.exit_code == 2
    out = json.loads(result.output)
    assert out["status"] == "incomparable"
    assert any(d.startswith("encoder input: ") for d in out["differences"])


# ------------------------------------------------------------------------------------------------
# Output forms and tolerances


def test_json_output_says_where(resnet20, images, resnet_baseline, saved, monkeypatch):
    _, path = resnet_baseline
    monkeypatch.setattr(resnet20.model.layer3[-1], "forward", lambda x: x)
    broken = saved(measure(resnet20, images), "json-drift")
    out = json.loads(check(broken, path, "--json").output)
    assert out["status"] == "drifted" and out["exit_code"] == 1
    power = [m for m in out["moves"] if m["quantity"] == "power"]
    assert power and power[0]["frequency"] is not None and power[0]["log_space"]
    assert out["frequency_units"] == "cycles/cell"


def test_tolerance_file_and_options(resnet_baseline, saved, tmp_path):
    baseline, path = resnet_baseline
    data = json.loads(baseline.to_json())
    data["result"]["summaries"]["slope"]["mean"] += 0.01
    nudged = tmp_path / "nudged.json"
    nudged.write_text(json.dumps(data))
    assert check(nudged, path).exit_code == 1
    loose = tmp_path / "tol.yaml"
    loose.write_text("power: {log_atol: 0.05}\ndct_energy: {atol: 0.002}\n"
                     "summaries.slope: {atol: 0.02}\n")
    assert check(nudged, path, "--tolerances", str(loose)).exit_code == 0
    assert check(nudged, path, "--atol", "0.1").exit_code == 0
    loose.write_text("powr: {log_atol: 0.05}\n")
    bad = check(nudged, path, "--tolerances", str(loose))
    assert bad.exit_code == 2 and "powr" in bad.output


def test_tolerance_in_log_space():
    tol = Tolerances.from_mapping({"default": {"rtol": 0.01}})
    assert tol.for_path("power").log_atol == 0.01
    assert tol.for_path("summaries.slope.mean").log_atol is None
    with pytest.raises(PrismError, match="unknown tolerance field"):
        Tolerances.from_mapping({"power": {"ltol": 1}})


# ------------------------------------------------------------------------------------------------
# Values that are not numbers, undefined intervals, incomparable output (synthetic profiles)


@pytest.fixture(scope="module")
def pixel_profiles(tmp_path_factory):
    """`pixels:8` measured on three random images, on one of them, and in pixel units."""
    import numpy as np
    from PIL import Image

    from prism_probe.measure import measure_spectra

    folder = tmp_path_factory.mktemp("random-images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (three,) = measure_spectra(["pixels:8"], str(folder), device="cpu")
    (one,) = measure_spectra(["pixels:8"], [str(folder / "0.png")], device="cpu")
    (pixel,) = measure_spectra(["pixels:8"], str(folder), device="cpu", units="pixel")
    return {"three": three, "one": one, "pixel": pixel}


def edited(profile: Profile, path: Path, edit) -> Path:
    """``profile`` saved to ``path`` after ``edit(result)``; NaN written as JSON's NaN."""
    data = json.loads(profile.to_json())
    edit(data["result"])
    path.write_text(json.dumps(data))
    return path


NAN_EDITS = {
    "power": lambda r: r.__setitem__("power", [float("nan")] * len(r["power"])),
    "dct_band_energy": lambda r: r["dct_band_energy"].__setitem__(2, float("nan")),
    "summaries.slope.mean": lambda r: r["summaries"]["slope"].__setitem__("mean", float("nan")),
}


@pytest.mark.parametrize("side", ["profile", "baseline", "both"])
@pytest.mark.parametrize("quantity", sorted(NAN_EDITS))
def test_nan_is_never_ok(pixel_profiles, tmp_path, quantity, side):
    good = pixel_profiles["three"].save(tmp_path / "good.json")
    bad = edited(pixel_profiles["three"], tmp_path / "nan.json", NAN_EDITS[quantity])
    mine, theirs = {"profile": (bad, good), "baseline": (good, bad), "both": (bad, bad)}[side]
    result = check(mine, theirs)
    assert result.exit_code == 1, result.output
    assert "not a number" in result.output and quantity in result.output
    assert "ok" not in result.output.split()

    out = json.loads(check(mine, theirs, "--json").output)  # strict JSON: no bare NaN
    assert out["status"] == "drifted" and out["exit_code"] == 1
    move = out["moves"][0]
    assert move["quantity"] == quantity and move["reason"] == "not a number"
    assert "nan" in (move["value"], move["baseline"])


def test_infinite_on_both_sides_fails(pixel_profiles, tmp_path):
    inf = edited(pixel_profiles["three"], tmp_path / "inf.json",
                 lambda r: r["power"].__setitem__(3, float("inf")))
    result = check(inf, inf, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["moves"][0]["value"] == "inf"


def test_null_interval(pixel_profiles, tmp_path):
    one = pixel_profiles["one"]
    assert one.result["summaries"]["slope"]["ci95"] is None
    path = one.save(tmp_path / "one.json")
    same = check(path, path)  # null on both sides agrees
    assert same.exit_code == 0, same.output

    nulled = edited(pixel_profiles["three"], tmp_path / "nulled.json",
                    lambda r: r["summaries"]["slope"].__setitem__("ci95", None))
    result = check(nulled, pixel_profiles["three"].save(tmp_path / "three.json"))
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # the runner's console wraps at 80 columns
    assert "undefined in the profile (3 images)" in text, result.output
    assert "— → —" not in text and "appeared" not in text


def test_incomparable_lists_each_difference_once(pixel_profiles, tmp_path):
    cell = pixel_profiles["three"].save(tmp_path / "cell.json")
    pixel = pixel_profiles["pixel"].save(tmp_path / "pixel.json")
    result = check(pixel, cell)
    assert result.exit_code == 2
    assert result.output.count("'pixel'") == 1, result.output  # the value, in the table only
    assert " ".join(result.output.split()).count("recorded field(s): protocol units") == 1
    headline = compare(pixel_profiles["pixel"], pixel_profiles["three"]).headline()
    assert "protocol units" in headline and "'pixel'" not in headline and len(headline) < 120


# ------------------------------------------------------------------------------------------------
# Baselines


def test_write_baseline_refuses_another_protocol(resnet_baseline, recorded_variants, tmp_path):
    baseline, _ = resnet_baseline
    path = tmp_path / "b.json"
    assert write_baseline(baseline, path) == "created"
    assert write_baseline(baseline, path) == "unchanged"
    with pytest.raises(PrismError, match="protocol units"):
        write_baseline(recorded_variants["protocol units"], path)
    assert Profile.load(path).protocol["units"] == "cell"
    assert write_baseline(recorded_variants["protocol units"], path, force=True) == "updated"
    # New weights or images of the same set-up are what updating a baseline is for.
    assert write_baseline(recorded_variants["image set"], tmp_path / "c.json") == "created"


def test_baseline_command(imagenet16, shared_weights, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(p) for p in imagenet16[:4]))
    out = tmp_path / "resnet20.json"
    args = ["baseline", "resnet20-cifar", "--images", str(listing), "--weights",
            str(shared_weights), "--out", str(out), "--threads", "1", "--batch-size", "4"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and first.stdout.startswith("created"), first.output
    assert runner.invoke(app, args).stdout.startswith("unchanged")
    refused = runner.invoke(app, args + ["--units", "pixel"])
    assert refused.exit_code == 2 and "--force" in refused.output
    forced = runner.invoke(app, args + ["--units", "pixel", "--force"])
    assert forced.exit_code == 0 and forced.stdout.startswith("updated")


# ------------------------------------------------------------------------------------------------
# The pytest plugin, run by pytest's own pytester


PLUGIN_TEST = """
from prism_probe.profile import Profile

def test_profile(prism_profile_check):
    prism_profile_check(Profile.load({path!r}))
"""

PLUGIN_MEASURE_TEST = """
def test_measured(prism_profile_check):
    result = prism_profile_check("resnet20-cifar", {images!r}, weights_dir={weights!r},
                                 batch_size=4)
    assert result.ok
"""


def test_plugin_writes_then_checks_baselines(pytester, resnet_baseline):
    _, path = resnet_baseline
    pytester.makepyfile(test_spec=PLUGIN_TEST.format(path=str(path)))
    missing = pytester.runpytest("-p", "no:cacheprovider")
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*no baseline*--prism-update-baselines*"])

    written = pytester.runpytest("--prism-update-baselines")
    written.assert_outcomes(passed=1)
    written.stdout.fnmatch_lines(["*1 baseline(s) written*", "created *resnet20-cifar.json"])
    assert (pytester.path / "baselines" / "resnet20-cifar.json").is_file()
    pytester.runpytest().assert_outcomes(passed=1)


def test_plugin_failure_shows_the_table(pytester, resnet20, images, resnet_baseline, saved,
                                        monkeypatch):
    baseline, _ = resnet_baseline
    write_baseline(baseline, pytester.path / "baselines" / "resnet20-cifar.json")
    monkeypatch.setattr(resnet20.model.layer3[-1], "forward", lambda x: x)
    broken = saved(measure(resnet20, images), "plugin-drift")
    pytester.makepyfile(test_spec=PLUGIN_TEST.format(path=str(broken)))
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*spectral profile check failed (exit 1*",
                                 "*quantity*at*baseline*now*",
                                 "*power*ring 0.*",
                                 "drifted: *"])


def test_plugin_measures_through_the_public_api(pytester, imagenet16, shared_weights):
    images = [str(p) for p in imagenet16[:4]]
    pytester.makepyfile(test_measured=PLUGIN_MEASURE_TEST.format(
        images=images, weights=str(shared_weights)))
    pytester.runpytest("--prism-update-baselines").assert_outcomes(passed=1)
    pytester.runpytest().assert_outcomes(passed=1)
