"""`prism-probe plot` on small synthetic profiles: refusals in one line, formats, warnings.

Profiles are `pixels:8` measured on a few random images (no weights needed), then edited the
way a user editing JSON by hand would.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from prism_probe.cli import app
from prism_probe.errors import PrismError
from prism_probe.plot import legend_labels, load_profiles, plot_profiles, save_figure
from prism_probe.plot_ablation import STYLES
from prism_probe.profile import Profile

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two image sets and the profiles measured on them: a, b (other images), w (no window)."""
    from PIL import Image

    from prism_probe.measure import measure_spectra
    from prism_probe.spectra import SpectrumConfig

    root = tmp_path_factory.mktemp("plot")
    rng = np.random.default_rng(0)
    for name in ("set1", "set2"):
        (root / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (a,) = measure_spectra(["pixels:8"], str(root / "set1"), device="cpu")
    (b,) = measure_spectra(["pixels:4"], str(root / "set2"), device="cpu")
    (w,) = measure_spectra(["pixels:8"], str(root / "set1"), device="cpu",
                           config=SpectrumConfig(window=None))
    a.save(root / "a.json")
    b.save(root / "b.json")
    w.save(root / "w.json")
    return root


def plot(*args):
    result = runner.invoke(app, ["plot", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def edited(folder: Path, name: str, edit) -> Path:
    data = json.loads((folder / "a.json").read_text())
    edit(data)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


BROKEN = {
    "no-power": (lambda d: d["result"].pop("power"), "lacks 'power'"),
    "short-power": (lambda d: d["result"].__setitem__("power", d["result"]["power"][:3]),
                    "power has 3 values"),
    "text-power": (lambda d: d["result"].__setitem__("power", "abc"), "not a list of numbers"),
    "nan-power": (lambda d: d["result"].__setitem__("power",
                                                    [float("nan")] * len(d["result"]["power"])),
                  "NaN or infinite"),
    "nan-energy": (lambda d: d["result"]["dct_band_energy"].__setitem__(0, float("nan")),
                   "dct_band_energy"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_profile_is_refused_in_one_line(folder, case):
    edit, words = BROKEN[case]
    path = edited(folder, case, edit)
    result = plot(path, "-o", folder / f"{case}.png")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert str(path) in text and words in text, result.output
    assert not (folder / f"{case}.png").exists()


def ablation_profile(label: str) -> Profile:
    rows = [{"band": band, "cutoff": c, "scores": {"cosine": s, "knn_top1": 100 * s}}
            for band, scores in (("low", (0.6, 0.8, 0.95)), ("high", (0.5, 0.3, 0.1)))
            for c, s in zip((0.05, 0.1, 0.25), scores)]
    return Profile(kind="ablation",
                   encoder={"label": label, "entry": {"name": label, "family": "pixel"}},
                   protocol={"ablation": {"mode": "input", "domain": "fourier", "layer": None},
                             "units": "pixel"},
                   images={"n_used": 4},
                   result={"unablated": {"cosine": 1.0, "knn_top1": 100.0}, "rows": rows,
                           "units": "cycles per input pixel"})


def test_ablation_profile_draws_the_ablation_figure(folder):
    path = ablation_profile("enc").save(folder / "ablation.json")
    out = folder / "ablation-fig.png"
    result = plot(path, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    bad = edited(folder, "bad-ablation", lambda d: None)
    data = json.loads(path.read_text())
    del data["result"]["rows"]
    bad.write_text(json.dumps(data))
    refused = plot(bad, "-o", folder / "x.png")
    assert refused.exit_code != 0 and str(bad) in " ".join(refused.output.split())
    mixed = plot(path, folder / "a.json", "-o", folder / "x.png")
    assert mixed.exit_code != 0 and "do not share a figure" in mixed.output


def test_ablation_styles_differ():
    (low_dash, low_mark), (high_dash, high_mark) = STYLES["low"], STYLES["high"]
    assert low_mark != high_mark and low_dash != high_dash
    assert sum(high_dash[1]) >= 8  # a dash long enough to see in a legend handle


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"),
                                          (".svg", b"<?xml")])
def test_output_format_follows_the_suffix(folder, suffix, magic):
    out = folder / f"fig-{suffix[1:]}{suffix}"
    result = plot(folder / "a.json", "-o", out, "--pdf")
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(magic)
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    if suffix != ".png":
        assert not out.with_suffix(".png").exists()


def test_unsupported_format_is_refused(folder):
    result = plot(folder / "a.json", "-o", folder / "x.jpg")
    assert result.exit_code != 0
    assert ".png, .pdf, .svg" in " ".join(result.output.split())
    assert not list(folder.glob("x.*"))
    with pytest.raises(PrismError, match="cannot write .tiff"):
        save_figure(None, folder / "x.tiff")


def test_overlay_warns_about_different_set_ups(folder, caplog):
    a, b, w = load_profiles([folder / "a.json", folder / "b.json", folder / "w.json"])
    with caplog.at_level(logging.WARNING, logger="prism_probe"):
        plot_profiles([a, b, w], folder / "overlay.png")
    text = caplog.text
    assert "b.json" in text and "image set" in text
    assert "w.json" in text and "window: 'hann' vs None" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prism_probe"):
        plot_profiles([a, copy.copy(a)], folder / "same.png")
    assert "measured unlike" not in caplog.text


def test_duplicate_labels_are_told_apart(folder, caplog):
    a, w = load_profiles([folder / "a.json", folder / "w.json"])
    with caplog.at_level(logging.WARNING, logger="prism_probe"):
        labels = legend_labels([a, w])
    assert len(set(labels)) == 2 and "[a]" in labels[0] and "[w]" in labels[1]
    assert "more than once" in caplog.text


def test_legend_names_each_encoders_input_and_grid(folder):
    a, b = load_profiles([folder / "a.json", folder / "b.json"])
    labels = legend_labels([a, b])
    assert labels[0] == "pixels:8 (pixel; 256 px → 32×32)"
    assert labels[1] == "pixels:4 (pixel; 256 px → 64×64)"
