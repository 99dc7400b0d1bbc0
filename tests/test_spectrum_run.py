"""The main job end to end: CLI, profiles, figures, torchrun sharding, known-answer inputs."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from prism_probe.cli import app
from prism_probe.errors import PrismError
from prism_probe.profile import Profile

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_main_job_writes_profiles_and_figure(tmp_path, shared_weights, imagenet_dir):
    """The README's main command, on a 16-image subset (taef2 at 128 px to stay fast)."""
    out = tmp_path / "run"
    r = invoke("spectrum", "resnet56-cifar", "taef2", "--images", imagenet_dir, "--weights",
               shared_weights, "--limit", 16, "--image-size", 128, "--out", out)
    assert r.exit_code == 0, r.output
    assert "resnet56-cifar" in r.output and "taef2" in r.output
    for name in ("resnet56-cifar.json", "taef2.json", "spectra.png", "spectra.pdf"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "spectra.pdf").read_bytes()[:5] == b"%PDF-"
    taef2 = Profile.load(out / "taef2.json")
    resnet = Profile.load(out / "resnet56-cifar.json")
    # --image-size overrides both: resnet56 at 128 px has a 32×32 last-stage grid (stride 4),
    # taef2 a 16×16 latent (stride 8).
    assert taef2.protocol["grid"] == [16, 16] and taef2.protocol["stride_px"] == 8
    assert resnet.protocol["grid"] == [32, 32] and resnet.protocol["stride_px"] == 4
    assert taef2.images["n_used"] == 16 == resnet.images["n_used"]
    assert taef2.images["digest"] == resnet.images["digest"]
    assert taef2.encoder["weights"]["sha256"].startswith("10a4e1021e89d755")
    e = np.array(taef2.result["dct_band_energy"])
    assert e.shape == (10,) and math.isclose(e.sum(), 1.0, rel_tol=1e-9)
    # Redraw from the saved profiles with paper options.
    fig = tmp_path / "fig.pdf"
    r = invoke("plot", out / "taef2.json", out / "resnet56-cifar.json", "-o", fig,
               "--width", 7, "--height", 3, "--font-size", 7, "--yscale", "linear")
    assert r.exit_code == 0, r.output
    # The format follows the suffix: a .pdf name gives a PDF only.
    assert fig.read_bytes()[:5] == b"%PDF-" and not fig.with_suffix(".png").exists()


def test_json_on_stdout_logs_on_stderr(shared_weights, imagenet16):
    r = runner.invoke(app, ["spectrum", "resnet20-cifar", "--weights", str(shared_weights),
                            "--images", str(imagenet16[0].parent), "--limit", "4", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data[0]["schema"] == "prism-probe/profile" and data[0]["images"]["n_used"] == 4


def _plane_wave_images(folder: Path, n: int, size: int, cycles: int) -> None:
    """Grey images holding a horizontal cosine of `cycles` periods across the width."""
    x = np.arange(size)
    rng = np.random.default_rng(0)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        row = 0.5 + 0.4 * np.cos(2 * np.pi * cycles * x / size + phase)
        img = np.repeat(row[None, :], size, axis=0)
        rgb = (np.stack([img] * 3, -1) * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"wave{i}.png")


def test_pixels_plane_wave_peaks_at_its_frequency(tmp_path):
    """pixels:1 on images of a 8-cycle cosine over 64 px: all power in the 0.125 cycles/px ring."""
    _plane_wave_images(tmp_path, 3, 64, 8)
    r = runner.invoke(app, ["spectrum", "pixels:1", "--images", str(tmp_path), "--image-size",
                            "64", "--window", "none", "--json", "--units", "pixel"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)[0]["result"]
    power = np.array(res["power"])
    freqs = np.array(res["freqs_pixel"])
    assert freqs[power.argmax()] == pytest.approx(8 / 64)
    assert power[power.argmax()] / power.sum() > 0.99


def test_common_grid_refuses_to_upsample(shared_weights, imagenet16):
    from prism_probe.measure import measure_spectra

    with pytest.raises(PrismError, match="finer than the feature grid 8×8"):
        measure_spectra(["resnet20-cifar"], imagenet16[:2], weights_dir=shared_weights,
                        grid=16, device="cpu")


def test_cuda_requested_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = invoke("spectrum", "pixels", "--device", "cuda", "--limit", "1")
    assert r.exit_code != 0
    assert "no CUDA GPU is visible" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_SCRIPT = """
import sys
from prism_probe.measure import measure_spectra
from prism_probe.measure import is_main_process
profiles = measure_spectra(["resnet20-cifar", "pixels:8"], sys.argv[1], weights_dir=sys.argv[2],
                           limit=10, device="cpu", batch_size=3, image_size=64)
if is_main_process():
    for p in profiles:
        p.save(sys.argv[3] + "/" + p.label.replace(":", "_") + ".json")
"""


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, shared_weights, imagenet_dir):
    """Two gloo ranks sharding the images give the single-process profile to 1e-6 relative."""
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(imagenet_dir), str(shared_weights), str(one)],
                   check=True, env=env, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
         str(imagenet_dir), str(shared_weights), str(two)],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("resnet20-cifar.json", "pixels_8.json"):
        a, b = Profile.load(one / name), Profile.load(two / name)
        assert a.images["n_used"] == b.images["n_used"] == 10
        assert b.environment["world_size"] == 2
        for key in ("power", "dct_band_energy"):
            np.testing.assert_allclose(b.result[key], a.result[key], rtol=1e-6, atol=0)
        for key, s in a.result["summaries"].items():
            assert b.result["summaries"][key]["mean"] == pytest.approx(s["mean"], rel=1e-6)
            assert b.result["summaries"][key]["ci95"] == pytest.approx(s["ci95"], rel=1e-6)


def test_missing_weights_fail_before_any_encoder_runs(tmp_path, monkeypatch):
    """A missing file for the second encoder stops the run before the first one is measured."""
    import prism_probe.measure as M

    calls = []
    monkeypatch.setattr(M, "measure_encoder", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("PRISM_PROBE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PrismError, match="weights for 'taef2' not found"):
        M.measure_spectra(["pixels", "taef2"], None, weights_dir=tmp_path, device="cpu")
    assert calls == []


def test_pixel_units_centroid_and_one_image_row(tmp_path):
    """--units pixel: the recorded centroid_pixel is the cell centroid ÷ stride; a single image
    has a mean but no interval, and the table says so instead of 'zero power'."""
    _plane_wave_images(tmp_path, 1, 64, 8)
    r = runner.invoke(app, ["spectrum", "pixels:2", "--images", str(tmp_path), "--image-size",
                            "64", "--window", "none", "--units", "pixel"])
    assert r.exit_code == 0, r.output
    assert "no interval: 1 image" in r.output and "zero power" not in r.output
    r = runner.invoke(app, ["spectrum", "pixels:2", "--images", str(tmp_path), "--image-size",
                            "64", "--window", "none", "--units", "pixel", "--json"])
    s = json.loads(r.stdout)[0]["result"]["summaries"]
    assert s["centroid_pixel"]["mean"] == pytest.approx(s["centroid"]["mean"] / 2)
    # An 8-cycle cosine over 64 px: 0.125 cycles per pixel, 0.25 cycles per 2-px cell.
    assert s["centroid_pixel"]["mean"] == pytest.approx(0.125, abs=1e-6)
