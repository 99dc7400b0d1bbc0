"""Video: spatiotemporal spectra (known answers), VideoMAE token order, per-frame encoders,
clips from PyAV files, frame folders and synthetic motion, offline errors, check across
modalities. Random weights from tiny configs; nothing is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prism_probe import weights as W
from prism_probe.check import compare
from prism_probe.errors import PrismError, WeightsError
from prism_probe.loading import video_backend
from prism_probe.loading.base import Encoder, FeatureMap, WeightsInfo
from prism_probe.profile import Profile
from prism_probe.registry import EncoderEntry, Registry
from prism_probe.spectra import SpectrumConfig, radial_power_spectrum
from prism_probe.spectra_nd import (SpatiotemporalAccumulator, VideoSpectrumConfig,
                                    spatiotemporal_power_spectrum, temporal_band_filter)
from prism_probe.video import (FrameEncoder, ablate_video, collect_clips, in_memory_clips,
                               load_video_encoder, measure_video_encoder, read_frame_folder,
                               read_video, synthetic_clip)

CPU = torch.device("cpu")
RANDOM = W.ResolvedWeights("random", random=True)
RAW = VideoSpectrumConfig(SpectrumConfig(window=None, remove_mean=False), temporal_window=None)
TINY = dict(model_type="videomae", image_size=48, patch_size=8, num_frames=8, tubelet_size=2,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            use_mean_pooling=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def videomae():
    entry = EncoderEntry(name="tiny-videomae", family="semantic", backend="transformers_video",
                         id="tiny", description="test", input={"size": 48, "frames": 8},
                         features={"layer": "final"}, options={"config": TINY},
                         modality="video")
    torch.manual_seed(0)
    return video_backend.build(entry, weights=RANDOM, device=CPU, image_size=None, dirs=[])


def tiny_image_encoder() -> Encoder:
    """A random conv image encoder (stride 4), standing in for any image entry."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.GELU(),
                              torch.nn.Conv2d(8, 8, 1)).eval()
    entry = EncoderEntry(name="tiny-conv", family="semantic", backend="torch_module", id="x",
                         description="test", input={"size": 48})

    def forward(x):
        return FeatureMap(net(x), "conv2", 4.0)

    from prism_probe.loading import make_preprocess

    return Encoder(entry, net, make_preprocess(entry), forward, weights=WeightsInfo("random"))


def pixels_encoder(patch: int):
    reg = Registry.load(use_env=False)
    return load_video_encoder(f"pixels:{patch}", registry=reg)


# ---------------------------------------------------------------- known answers of the measure


def test_parseval_and_frame_average_without_windows():
    x = torch.randn(3, 5, 6, 8, 10, dtype=torch.float64)
    s = spatiotemporal_power_spectrum(x, RAW)
    assert torch.allclose(s.total_power, x.square().sum(dim=(2, 3, 4)).mean(1))
    # The spatial spectrum is the mean over frames of each frame's image spectrum.
    frames = x.transpose(1, 2).reshape(18, 5, 8, 10)
    per_frame = radial_power_spectrum(frames, SpectrumConfig(window=None, remove_mean=False))
    assert torch.allclose(s.spatial_power, per_frame.power.reshape(3, 6, -1).mean(1))


def test_moving_plane_wave_lands_in_its_temporal_bin():
    t, h, w = 8, 16, 16
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                indexing="ij")
    # 3/16 cycles per cell across, moving at 3/8 cycles per temporal cell.
    wave = torch.cos(2 * math.pi * (3 / 16 * xx - 3 / 8 * tt)).double()[None, None]
    s = spatiotemporal_power_spectrum(wave, RAW)
    assert int(s.temporal_power[0].argmax()) == 3
    assert float(s.temporal_power[0, 3] * 2 * h * w / s.total_power[0]) == pytest.approx(1.0)
    kt, ks = divmod(int(s.power_map[0].argmax()), s.power_map.shape[-1])
    assert (kt, ks) == (3, 3)
    # With the default Hann windows the peak stays in its bin.
    d = spatiotemporal_power_spectrum(wave)
    assert int(d.temporal_power[0].argmax()) == 3


def test_static_clip_has_no_temporal_energy_beyond_dc_with_default_windows():
    frame = torch.randn(2, 4, 1, 9, 9)
    s = spatiotemporal_power_spectrum(frame.expand(-1, -1, 8, -1, -1))
    assert torch.all(s.temporal_power[:, 1:] <= 1e-10 * s.temporal_power[:, :1])
    assert torch.allclose(s.static_power, s.total_power)


def test_white_noise_is_flat_and_accumulator_merges():
    torch.manual_seed(0)
    x = torch.randn(16, 8, 8, 12, 12, dtype=torch.float64)
    s = spatiotemporal_power_spectrum(x, VideoSpectrumConfig(temporal_window=None))
    assert torch.allclose(s.temporal_power.mean(0)[1:], torch.ones(4, dtype=torch.float64),
                          atol=0.06)
    whole, a, b = (SpatiotemporalAccumulator() for _ in range(3))
    whole.update(x)
    a.update(x[:7])
    b.update(x[7:])
    ra, rw = a.merge(b).result(), whole.result()
    assert np.allclose(ra["temporal_power"], rw["temporal_power"])
    assert ra["summaries"]["static_share"]["n"] == 16


def test_temporal_band_filter_splits_exactly():
    x = torch.randn(2, 3, 8, 4, 4)
    low = temporal_band_filter(x, 0.2)
    assert torch.allclose(low + temporal_band_filter(x, 0.2, "high"), x, atol=1e-6)
    assert torch.allclose(temporal_band_filter(x, 0.0), x.mean(2, keepdim=True).expand_as(x),
                          atol=1e-6)


# ---------------------------------------------------------------- VideoMAE backend


def test_videomae_marker_tubelet_lands_in_its_cell(videomae):
    base = torch.zeros(1, 8, 3, 48, 48)
    marked = base.clone()
    # Tubelet (t=2, y=3, x=1): frames 4-5, rows 24-31, columns 8-15.
    marked[:, 4:6, :, 24:32, 8:16] = 3.0
    a = videomae.encode(base).tensor
    b = videomae.encode(marked).tensor
    assert a.shape == (1, 32, 4, 6, 6)  # every tubelet encoded: no mask
    change = (b - a).norm(dim=1)[0]
    assert tuple(np.unravel_index(int(change.argmax()), change.shape)) == (2, 3, 1)
    assert float(change.max()) > 3 * float(change.flatten().sort().values[-2])
    # No random masking or shuffling: the same clip gives the same grid.
    assert torch.equal(videomae.encode(marked).tensor, b)


def test_videomae_profile_records_modality_and_refuses_wrong_frames(videomae):
    rng = np.random.default_rng(0)
    clips = in_memory_clips([rng.integers(0, 255, (8, 48, 48, 3), dtype=np.uint8)
                             for _ in range(3)])
    p = measure_video_encoder(videomae, clips)
    assert p.protocol["modality"] == "video" and p.protocol["feature_grid"] == [4, 6, 6]
    assert p.protocol["layer"] == "layers.1+layernorm"
    assert p.result["temporal_freqs_frame"] == [0.0, 0.125, 0.25]
    assert p.images["n_used"] == 3
    again = Profile.from_json(p.to_json())
    assert compare(again, p).status == "ok"
    short = in_memory_clips([np.zeros((4, 48, 48, 3), np.uint8)])
    with pytest.raises(PrismError, match="--frames 8"):
        measure_video_encoder(videomae, short)


def test_check_refuses_to_compare_across_modalities(videomae):
    image = Profile.load(sorted(Path(__file__).parent.joinpath("baselines").glob("*.json"))[0])
    clips = in_memory_clips([np.full((8, 48, 48, 3), 7, np.uint8)])
    video = measure_video_encoder(videomae, clips)
    result = compare(video, image)
    assert result.status == "incomparable"
    assert any("modality" in d for d in result.differences)


def test_token_ablation_continues_the_forward_pass(videomae):
    rng = np.random.default_rng(1)
    clips = in_memory_clips([rng.integers(0, 255, (8, 48, 48, 3), dtype=np.uint8)])
    r = ablate_video(videomae, clips, [0.0, 0.25, 0.5], layer=0)
    assert r["cosine"][-1] == pytest.approx(1.0, abs=1e-5)  # keeps every temporal frequency
    assert r["cosine"][0] < r["cosine"][1] < 1.0
    assert r["kept_energy"][-1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(PrismError, match="mode='input'"):
        ablate_video(FrameEncoder(tiny_image_encoder()), clips, [0.1])


def test_missing_videomae_weights_offline_is_one_clear_error():
    with pytest.raises(WeightsError) as info:
        load_video_encoder("videomae-b")
    msg = str(info.value)
    assert "\n" not in msg and "weights for 'videomae-b' not found" in msg
    assert "random:videomae-b" in msg


def test_cli_video_offline_fails_with_the_offline_message(tmp_path):
    from typer.testing import CliRunner

    from prism_probe.cli import app

    clip = tmp_path / "frames"
    clip.mkdir()
    for i in range(16):
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(clip / f"{i:03d}.png")
    res = CliRunner().invoke(app, ["spectrum", "videomae-b", "dinov2-b", "--video", str(clip)])
    assert res.exit_code == 2
    assert "weights for 'videomae-b' not found" in res.output


# ---------------------------------------------------------------- per-frame image encoders


@pytest.mark.parametrize("make", [tiny_image_encoder, lambda: pixels_encoder(4)])
def test_per_frame_spectra_of_a_static_clip_have_no_energy_beyond_dc(make):
    enc = make()
    enc = enc if isinstance(enc, FrameEncoder) else FrameEncoder(enc)
    still = np.random.default_rng(2).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    clips = in_memory_clips([np.stack([still] * 6)])
    enc.preprocess = type(enc.preprocess)(size=48)  # keep 48 px for both encoders
    r = measure_video_encoder(enc, clips).result
    assert all(p <= 1e-9 * r["temporal_power"][0] for p in r["temporal_power"][1:])
    assert r["summaries"]["static_share"]["mean"] == pytest.approx(1.0)


def test_synthetic_pan_of_a_plane_wave_has_its_known_temporal_frequency():
    # A vertical-stripe plane wave of 1/16 cycles per pixel panned 4 px per frame: 0.25 cycles
    # per frame; pixels:4 sees 0.25 cycles per cell across.
    frames, size, speed = 8, 64, 4
    x = np.arange(size + speed * (frames - 1))
    row = (127.5 + 100 * np.cos(2 * np.pi * x / 16)).astype(np.uint8)
    still = Image.fromarray(np.repeat(np.repeat(row[None, :, None], size, 0), 3, 2))
    clip = synthetic_clip(still, "pan", frames, size=size, speed=speed)
    assert np.array_equal(np.asarray(clip[1])[:, :-speed], np.asarray(clip[0])[:, speed:])
    enc = pixels_encoder(4)
    enc.preprocess = type(enc.preprocess)(size=size)
    clips = in_memory_clips([np.stack([np.asarray(f) for f in clip])])
    r = measure_video_encoder(enc, clips, config=VideoSpectrumConfig(temporal_window=None)).result
    tp = np.asarray(r["temporal_power"])
    assert int(tp.argmax()) == 2 and r["temporal_freqs_frame"][2] == 0.25
    assert tp[2] * 2 / (tp * np.asarray(r["temporal_counts"])).sum() > 0.99
    zoom = synthetic_clip(still, "zoom", 3, size=32, zoom=1.1)
    assert [f.size for f in zoom] == [(32, 32)] * 3


# ---------------------------------------------------------------- reading clips


def _encode_gray_clip(path: Path, levels, size=32):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv444p"
        for v in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), v, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_pyav_reads_a_clip_with_known_content(tmp_path):
    levels = [20 * i for i in range(10)]
    path = tmp_path / "ramp.mkv"
    _encode_gray_clip(path, levels)
    frames = read_video(path, 4, step=2)
    got = [float(np.asarray(f, dtype=float).mean()) for f in frames]
    assert got == pytest.approx([0, 40, 80, 120], abs=2.0)
    with pytest.raises(PrismError, match="needs 19 decoded frames"):
        read_video(path, 10, step=2)
    clips = collect_clips([path, tmp_path / "absent.mp4"], frames=4, step=2)
    assert len(clips) == 1 and clips.missing == [str(tmp_path / "absent.mp4")]


def test_frame_folder_and_unreadable_clips_are_skipped_and_counted(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i * 50, i * 50, i * 50)).save(good / f"f{i}.png")
    frames = read_frame_folder(good, 3, step=2)
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [0, 100, 200]
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    clips = collect_clips([good, tmp_path / "bad.mp4"], frames=3, step=2)
    enc = pixels_encoder(4)
    enc.preprocess = type(enc.preprocess)(size=24)
    p = measure_video_encoder(enc, clips)
    assert p.images["n_used"] == 1 and p.images["n_skipped"] == 1
    assert "bad.mp4" in json.dumps(p.images["skipped"])


# ---------------------------------------------------------------- ablate --video (the CLI)


def _tiny_video_registry(tmp_path: Path) -> Path:
    import yaml

    entry = {"family": "semantic", "modality": "video", "backend": "transformers_video",
             "id": "tiny", "input": {"size": 48, "frames": 8}, "features": {"layer": "final"},
             "options": {"config": TINY}, "description": "test"}
    path = tmp_path / "tiny-video.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "encoders": {"tiny-videomae": entry}}))
    return path


def _static_clip_folder(tmp_path: Path, frames: int = 8) -> Path:
    folder = tmp_path / "static"
    folder.mkdir()
    rng = np.random.default_rng(0)
    still = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    for i in range(frames):
        still.save(folder / f"{i:03d}.png")
    return folder


def test_cli_ablate_video_known_answers_json_and_out(tmp_path):
    from typer.testing import CliRunner

    from prism_probe.cli import app

    reg, clip = _tiny_video_registry(tmp_path), _static_clip_folder(tmp_path)
    common = ["ablate", "random:tiny-videomae", "--registry", str(reg), "--video", str(clip),
              "--device", "cpu", "--json"]
    # tokens (default): the all-pass band and a cutoff above 0.5 keep the features exactly
    res = CliRunner().invoke(app, common + ["--bands", "all,low", "--cutoffs", "0,0.5"])
    assert res.exit_code == 0, res.output
    (p,) = json.loads(res.stdout)
    assert p["kind"] == "ablation" and p["schema_version"] >= 1
    assert p["protocol"]["modality"] == "video"
    assert p["protocol"]["ablation"]["mode"] == "tokens"
    rows = {(r["band"], r["cutoff"]): r["scores"] for r in p["result"]["rows"]}
    assert rows[("all", None)]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("low", 0.5)]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("low", 0.0)]["cosine"] < 0.999  # position embeddings vary along time
    # input mode: a static clip has no temporal energy beyond DC, so a low-pass at 0 keeps it
    out = tmp_path / "out"
    res = CliRunner().invoke(app, common + ["--mode", "input", "--bands", "low,high",
                                            "--cutoffs", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (p,) = json.loads(res.stdout)
    rows = {r["band"]: r["scores"] for r in p["result"]["rows"]}
    assert rows["low"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["low"]["kept_energy"] == pytest.approx(1.0, abs=1e-5)
    assert rows["high"]["kept_energy"] == pytest.approx(0.0, abs=1e-6)
    saved = Profile.load(out / "ablation-random_tiny-videomae.json")
    assert saved.kind == "ablation" and saved.protocol["modality"] == "video"
    assert (out / "ablation.png").is_file()
    # the table, and image-only options refused in one line
    res = CliRunner().invoke(app, common[:-1] + ["--bands", "all"])
    assert res.exit_code == 0 and "cosine" in res.stdout and "1.000" in res.stdout
    res = CliRunner().invoke(app, common + ["--image-size", "64"])
    assert res.exit_code == 2 and "--image-size applies to images only" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, common + ["--layer", "blocks.1"])
    assert res.exit_code == 2 and "block index" in res.output
