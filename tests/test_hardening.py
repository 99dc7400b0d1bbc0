"""Hostile and careless use of the CLI and API: every failure is one line, early, non-zero, and
leaves nothing half-written (issue 7). Cases already tested next to their module are listed in
README.md ("What happens when…") rather than repeated here.

The CLI runs in-process (Typer's CliRunner) on tiny images with the ``pixels`` encoder, so no
model weights are needed; a real process is used only where a signal or a kill is the point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from prism_probe import profile as P
from prism_probe.cli import app
from prism_probe.errors import OutputError
from prism_probe.loading.base import Encoder
from prism_probe.measure import measure_spectra

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prism_probe"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _noise_images(folder: Path, n: int = 3, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"noise{i}.png")
    return folder


def _one_error_line(result) -> str:
    """The single ``prism-probe: error:`` line of a failed run (and no traceback)."""
    assert result.exit_code not in (0, 1), result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("prism-probe: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _pixels_args(images: Path, *extra):
    return ["spectrum", "pixels:4", "--images", images, "--image-size", "32", "--device", "cpu",
            *extra]


# ------------------------------------------------------------------------------------ registry

def test_unknown_encoder_on_the_command_line_suggests_close_names(tmp_path):
    line = _one_error_line(invoke("spectrum", "dinov2-bb", "--images", _noise_images(tmp_path)))
    assert "dinov2-bb" in line and "did you mean dinov2-b" in line


# ------------------------------------------------------------------------------------ numerics

def test_non_finite_features_are_reported_per_batch_and_nothing_is_written(tmp_path,
                                                                           monkeypatch):
    images = _noise_images(tmp_path / "img", n=3)
    real = Encoder.encode
    calls = []

    def poisoned(self, pixels):
        fmap = real(self, pixels)
        calls.append(len(pixels))
        if len(calls) == 2:  # the second batch overflows, as SDXL's VAE does in float16
            fmap.tensor[0, 0, 0, 0] = float("inf")
        return fmap

    monkeypatch.setattr(Encoder, "encode", poisoned)
    out = tmp_path / "out"
    line = _one_error_line(invoke(*_pixels_args(images, "--batch-size", "1", "--out", out)))
    assert "encoder 'pixels:4'" in line and "batch 1" in line and "non-finite" in line
    assert list(out.iterdir()) == []  # no profile, no figure


def test_half_precision_feature_maps_are_upcast_before_the_fft(tmp_path, monkeypatch):
    images = _noise_images(tmp_path / "img", n=2)
    (full,) = measure_spectra(["pixels:4"], images, device="cpu", image_size=32)
    real = Encoder.encode
    seen = []

    def half(self, pixels):
        fmap = real(self, pixels)
        fmap.tensor = fmap.tensor.half()
        return fmap

    monkeypatch.setattr(Encoder, "encode", half)
    # Float16 FFTs would lose most digits (and overflow on large grids): the spectra must
    # agree with float32 to the rounding of the float16 features themselves.
    import prism_probe.spectra as S

    update = S.SpectrumAccumulator.update

    def spy(self, x, *a, **k):
        seen.append(x.dtype)
        return update(self, x, *a, **k)

    monkeypatch.setattr(S.SpectrumAccumulator, "update", spy)
    (low,) = measure_spectra(["pixels:4"], images, device="cpu", image_size=32)
    assert seen and all(dt == torch.float32 for dt in seen)
    np.testing.assert_allclose(low.result["power"], full.result["power"], rtol=1e-2)


def test_a_one_by_one_grid_says_it_has_no_spectrum(tmp_path):
    images = _noise_images(tmp_path)
    line = _one_error_line(invoke(*_pixels_args(images, "--grid", "1")))
    assert "--grid 1" in line and "no spectrum" in line

    # An encoder whose own grid is one cell (pixels:32 on 32 px) is named with its grid.
    line = _one_error_line(invoke("spectrum", "pixels:32", "--images", images, "--image-size",
                                  "32", "--device", "cpu"))
    assert "'pixels:32'" in line and "1×1 feature grid" in line and "--image-size" in line


def test_constant_images_give_zero_power_without_nan(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for i, value in enumerate((0, 128, 255)):
        Image.new("RGB", (32, 32), (value, value, value)).save(folder / f"flat{i}.png")
    out = tmp_path / "out"
    r = invoke(*_pixels_args(folder, "--json", "--out", out))
    assert r.exit_code == 0, r.output
    (prof,) = json.loads(r.stdout)
    res = prof["result"]
    assert prof["images"]["n_used"] == 3 and res["n_zero_power"] == 3
    assert all(p == 0 for p in res["power"]) and res["dct_band_energy"][0] == pytest.approx(1)
    # Summaries of no power are undefined, recorded as such (not NaN, not a fake 0).
    for s in res["summaries"].values():
        assert s["n"] == 0 and s["mean"] is None
    assert (out / "pixels_4.json").is_file() and (out / "spectra.png").is_file()

    r = invoke(*_pixels_args(folder))  # the table says so instead of crashing
    assert r.exit_code == 0, r.output
    assert "n/a (zero power)" in r.stdout


# ------------------------------------------------------------------------------------- outputs

def test_output_folder_that_cannot_be_written_fails_before_measuring(tmp_path, monkeypatch):
    images = _noise_images(tmp_path / "img")
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    import prism_probe.measure as M

    def never(*a, **k):
        raise AssertionError("measured although the output folder is unusable")

    monkeypatch.setattr(M, "measure_spectra", never)
    # A path below a plain file cannot be a folder, even for root (chmod would not stop root).
    line = _one_error_line(invoke(*_pixels_args(images, "--out", blocker / "sub")))
    assert str(blocker / "sub") in line and "cannot write output" in line and "--out" in line
    assert blocker.read_text() == "keep me"


def _profile(tag: str, size: int = 1) -> P.Profile:
    return P.Profile(kind="spectrum", encoder={"label": tag}, protocol={}, images={},
                     result={"tag": tag, "power": [float(i) for i in range(size)]},
                     environment={})


def test_failed_profile_write_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    _profile("old").save(path)
    before = path.read_text()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P.os, "replace", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        _profile("new").save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


KILL_SCRIPT = """
import sys
from prism_probe.profile import Profile
path = sys.argv[1]
profile = Profile(kind="spectrum", encoder={"label": "x"}, protocol={}, images={},
                  result={"power": [float(i) for i in range(200_000)]}, environment={})
print("writing", flush=True)
while True:
    profile.save(path)
"""


def test_profile_write_killed_midway_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "p.json"
    _profile("old").save(path)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)],
                            stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        time.sleep(0.5)  # a few writes in, one of them in progress
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    data = json.loads(path.read_text())  # old or new, never a mixture
    assert data["result"].get("tag") == "old" or len(data["result"]["power"]) == 200_000
    # A killed process cannot clean up: at most one hidden temporary file, never a .json one.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "p.json"]
    assert len(leftovers) <= 1 and all(n.startswith(".p.json.") and n.endswith(".tmp")
                                       for n in leftovers)


def test_concurrent_writers_of_one_profile_never_corrupt_it(tmp_path):
    path = tmp_path / "p.json"
    _profile("w0").save(path)
    umask = os.umask(0o022)
    os.umask(umask)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(tag):
        try:
            for _ in range(30):
                _profile(tag, size=5000).save(path)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    reads = []

    def reader():
        while not stop.is_set():
            text = path.read_text()
            reads.append(json.loads(text)["result"]["tag"])

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(1, 4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors and reads
    assert set(reads) <= {"w0", "w1", "w2", "w3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
    # Permissions follow the umask, and concurrent writes did not change the process's umask.
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    now = os.umask(umask)
    assert now == umask


# ----------------------------------------------------------------------------------- resources

def _oom_above(limit: int, monkeypatch) -> list[int]:
    real = Encoder.encode
    sizes: list[int] = []

    def forward(self, pixels):
        sizes.append(len(pixels))
        if len(pixels) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(self, pixels)

    monkeypatch.setattr(Encoder, "encode", forward)
    return sizes


def test_out_of_gpu_memory_halves_the_batch_and_gives_the_same_profile(tmp_path, monkeypatch):
    images = _noise_images(tmp_path, n=5)
    (plain,) = measure_spectra(["pixels:4"], images, device="cpu", image_size=32, batch_size=8)
    sizes = _oom_above(2, monkeypatch)
    (retried,) = measure_spectra(["pixels:4"], images, device="cpu", image_size=32,
                                 batch_size=8)
    # One batch of 5: chunks of 8 (5 images) and 4 fail, 2 fits and is kept for the rest.
    assert sizes == [5, 4, 2, 2, 1]
    assert retried.images["n_used"] == 5
    np.testing.assert_allclose(retried.result["power"], plain.result["power"], rtol=1e-5)


def test_out_of_gpu_memory_at_one_image_is_a_clear_error(tmp_path, monkeypatch):
    images = _noise_images(tmp_path / "img", n=2)
    _oom_above(0, monkeypatch)
    out = tmp_path / "out"
    line = _one_error_line(invoke(*_pixels_args(images, "--batch-size", "4", "--out", out)))
    assert "'pixels:4' ran out of GPU memory" in line and "--image-size" in line
    assert list(out.iterdir()) == []


CTRL_C_SCRIPT = """
import sys, time
import prism_probe.measure as M
from prism_probe.cli import main

def slow(*args, **kwargs):
    print("measuring", flush=True)
    time.sleep(60)

M.measure_spectra = slow
sys.argv = ["prism-probe", "spectrum", "pixels:4", "--images", sys.argv[1], "--out",
            sys.argv[2], "--device", "cpu"]
main()
"""


def test_ctrl_c_during_spectrum_stops_cleanly(tmp_path):
    images = _noise_images(tmp_path / "img", n=1)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(images), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == b"measuring"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["prism-probe: interrupted; outputs already written are complete, nothing "
                     "half-written was left"], err
    assert list(out.iterdir()) == []


# -------------------------------------------------------------------------------------- images

def test_decompression_bomb_limit_is_set_from_the_command_line(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "big.png")
    Image.effect_noise((16, 16), 40).convert("RGB").save(folder / "small.png")
    r = invoke(*_pixels_args(folder, "--max-pixels", "1000", "--json"))
    assert r.exit_code == 0, r.output
    (prof,) = json.loads(r.stdout)
    assert prof["images"]["n_used"] == 1 and prof["images"]["n_skipped"] == 1
    ((path, reason),) = prof["images"]["skipped"]
    assert path.endswith("big.png") and "max_pixels=1000" in reason

    line = _one_error_line(invoke(*_pixels_args(folder, "--max-pixels", "100")))
    assert "could be read" in line and "max_pixels=100" in line


def test_duplicates_are_reported_in_the_profile_and_dropped_with_dedupe(tmp_path):
    folder = _noise_images(tmp_path / "img", n=2)
    (folder / "copy.png").write_bytes((folder / "noise0.png").read_bytes())

    r = invoke(*_pixels_args(folder, "--json"))
    assert r.exit_code == 0, r.output
    images = json.loads(r.stdout)[0]["images"]
    assert images["n_used"] == 3 and images["n_duplicates"] == 1
    assert images["duplicates"] == [["copy.png", "noise0.png"]] or \
        sorted(images["duplicates"][0]) == ["copy.png", "noise0.png"]

    r = invoke(*_pixels_args(folder, "--json", "--dedupe"))
    assert r.exit_code == 0, r.output
    images = json.loads(r.stdout)[0]["images"]
    assert images["n_used"] == 2 and "duplicates dropped" in images["source"]


def test_skipped_and_missing_files_are_counted_and_listed_in_the_profile(tmp_path):
    folder = _noise_images(tmp_path / "img", n=2)
    good = (folder / "noise0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("img/noise0.png\nimg/noise1.png\nimg/cut.png\nimg/empty.jpg\n"
                       "img/gone.jpg\n")
    out = tmp_path / "out"
    r = invoke(*_pixels_args(listing, "--out", out))
    assert r.exit_code == 0, r.output
    images = json.loads((out / "pixels_4.json").read_text())["images"]
    assert images["n_used"] == 2 and images["n_skipped"] == 3
    reasons = {Path(p).name: why for p, why in images["skipped"]}
    assert set(reasons) == {"cut.png", "empty.jpg", "gone.jpg"}
    assert "empty file" in reasons["empty.jpg"]


def test_an_image_smaller_than_the_patch_is_resized_not_refused(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.effect_noise((3, 2), 40).convert("RGB").save(folder / "tiny.png")
    r = invoke(*_pixels_args(folder, "--json"))
    assert r.exit_code == 0, r.output
    prof = json.loads(r.stdout)[0]
    assert prof["images"]["n_used"] == 1 and prof["protocol"]["grid"] == [8, 8]


# ------------------------------------------------------------------------------ unsafe loading

def _source_files():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return [(f, f.read_text()) for f in files]


def test_no_code_path_loads_pickles_or_yaml_unsafely():
    bad = []
    for path, text in _source_files():
        code = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())
        for m in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", code):
            if "weights_only=True" not in m.group("args"):
                bad.append(f"{path.name}: torch.load without weights_only=True")
        if re.search(r"weights_only\s*=\s*False", code):
            bad.append(f"{path.name}: weights_only=False")
        if re.search(r"\bpickle\.loads?\(|\bdill\.|cloudpickle|\bmarshal\.loads?\(", code):
            bad.append(f"{path.name}: raw unpickling")
        if re.search(r"yaml\.(unsafe_load|full_load|load_all)\b|"
                     r"yaml\.(Full|Unsafe)?Loader\b|yaml\.UnsafeLoader", code):
            bad.append(f"{path.name}: unsafe YAML loader")
        for m in re.finditer(r"yaml\.load\((?P<args>[^)]*)\)", code):
            loader = re.search(r"Loader\s*=\s*([\w.]+)", m.group("args"))
            name = loader.group(1) if loader else None
            safe = name is not None and (name.endswith("SafeLoader") or
                                         _is_safe_loader_subclass(code, name))
            if not safe:
                bad.append(f"{path.name}: yaml.load with Loader={name}")
    assert not bad, bad


def _is_safe_loader_subclass(code: str, name: str) -> bool:
    return re.search(rf"class {re.escape(name)}\(yaml\.(C?Safe)Loader\)", code) is not None


def test_trust_remote_code_is_off_unless_an_entry_sets_it():
    from prism_probe.registry import EncoderEntry, Registry

    for path, text in _source_files():
        code = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())
        for m in re.finditer(r"trust_remote_code\s*=\s*([^,)\n]+)", code):
            value = m.group(1).strip()
            assert value in ("False", "trust", "entry.trust_remote_code") or \
                value.startswith("bool("), f"{path.name}: trust_remote_code={value}"
    assert EncoderEntry.__dataclass_fields__["trust_remote_code"].default is False
    assert not [e.name for e in Registry.load(use_env=False) if e.trust_remote_code]


def test_a_grid_too_small_for_the_slope_fit_names_encoder_and_fix(tmp_path):
    line = _one_error_line(invoke("spectrum", "pixels:8", "--images", _noise_images(tmp_path),
                                  "--image-size", "32", "--device", "cpu"))
    assert "encoder 'pixels:8'" in line and "4x4 grid" in line and "--image-size" in line


# ------------------------------------------------------------------------------------ train-uae
# A tiny UAE (ResNet-20 encoder, 16-wide conv decoder, no perceptual loss, a handful of CIFAR
# images) so that each case costs seconds; the cases that fail before any model is built do not
# train at all.

def _uae_config(tmp_path: Path, cifar_dir: Path, weights: Path, *, steps: int = 1000) -> Path:
    import yaml

    cfg = {
        "device": "cpu", "image_size": 32, "weights_dir": str(weights),
        "encoder": {"name": "resnet20-cifar", "input_size": 32},
        "decoder": {"kind": "conv", "width": 16, "blocks": 1},
        "loss": {"perceptual_weight": 0.0},
        "stages": [{"name": "warmup", "steps": steps, "train": ["modulator", "decoder"]}],
        "optim": {"lr": 1e-3, "warmup_steps": 2, "ema": 0.9},
        "data": {"train": str(cifar_dir / "train"), "val": str(cifar_dir / "test"),
                 "batch_size": 4, "limit": 8, "val_images": 2},
        "eval": {"every": 100_000, "batch_size": 2, "grid": 0},
        "checkpoint": {"every": 100_000, "keep": 1},
    }
    path = tmp_path / "uae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_uae(config: Path, out: Path, *extra):
    return invoke("train-uae", "--config", config, "--out", out, *extra)


CTRL_C_TRAIN = [sys.executable, "-m", "prism_probe.cli", "train-uae"]


def test_ctrl_c_during_train_uae_checkpoints_the_finished_step_and_resumes(
        tmp_path, cifar_dir, shared_weights):
    from prism_probe.uae import train as T

    config = _uae_config(tmp_path, cifar_dir, shared_weights)
    run = tmp_path / "run"
    proc = subprocess.Popen([*CTRL_C_TRAIN, "--config", str(config), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no training step"
            time.sleep(0.05)
        # Checkpoints are due every 100000 steps: the one found below is the interrupt's.
        assert not (run / "checkpoint.json").exists()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    record = T.read_checkpoint(run)
    step = record["step"]
    lines = [ln for ln in err.splitlines() if ln.startswith("prism-probe:")]
    assert lines == [f"prism-probe: interrupted; {run} holds the checkpoint of step {step}, "
                     "continue with --resume"], err
    assert step >= 1 and T.load_checkpoint_tensors(run, record["weights"])
    assert T.load_checkpoint_tensors(run, record["optim"])["rng.torch"].numel() > 0
    assert not [p for p in run.rglob(".*.tmp")]

    r = _train_uae(config, run, "--resume", "--stop-after", step + 1)
    assert r.exit_code == 0, r.output
    assert T.read_checkpoint(run)["step"] == step + 1
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, step + 2))  # continued, not restarted, no step twice


def test_fewer_training_images_than_one_batch_is_an_error_naming_folder_and_fix(
        tmp_path, cifar_dir, shared_weights):
    config = _uae_config(tmp_path, cifar_dir, shared_weights)
    images = _noise_images(tmp_path / "three", n=3)
    out = tmp_path / "run"
    line = _one_error_line(_train_uae(config, out, "--set", f"data.train={images}"))
    assert str(images) in line and "3 training image(s)" in line
    assert "data.batch_size 4" in line and "data.batch_size to at most 3" in line
    assert not out.exists()


def test_an_empty_class_folder_in_the_training_data_is_named(tmp_path, cifar_dir,
                                                             shared_weights):
    config = _uae_config(tmp_path, cifar_dir, shared_weights)
    root = tmp_path / "classes"
    _noise_images(root / "cat", n=4)
    (root / "dog").mkdir()
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("no images here")
    out = tmp_path / "run"
    line = _one_error_line(_train_uae(config, out, "--set", f"data.train={root}"))
    assert f"class folder(s) with no images in {root}: dog, emu" in line
    assert not out.exists()


def test_train_uae_output_folder_that_cannot_be_written_fails_before_training(
        tmp_path, cifar_dir, shared_weights, monkeypatch):
    from prism_probe.uae import train as T

    def never(*a, **k):
        raise AssertionError("built a model although --out is unusable")

    monkeypatch.setattr(T, "build_uae", never)
    config = _uae_config(tmp_path, cifar_dir, shared_weights)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    # A path below a plain file cannot be a folder, even for root (chmod would not stop root).
    line = _one_error_line(_train_uae(config, blocker / "run"))
    assert str(blocker / "run") in line and "cannot write output" in line and "--out" in line
    assert blocker.read_text() == "keep me"


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, cifar_dir, shared_weights):
    base = tmp_path_factory.mktemp("uae-one-step")
    config = _uae_config(base, cifar_dir, shared_weights)
    r = _train_uae(config, base / "run", "--stop-after", 1)
    assert r.exit_code == 0, r.output
    return config, base / "run"


def _damaged_copy(src: Path, dst: Path, name: str, damage) -> Path:
    import shutil

    shutil.copytree(src, dst)
    path = dst / name
    path.write_bytes(damage(path.read_bytes()))
    return path


@pytest.mark.parametrize("name,damage", [
    ("ckpt/step-0000001.safetensors", lambda b: b[: len(b) // 2]),
    ("ckpt/step-0000001.optim.safetensors", lambda b: b[:5]),
    ("checkpoint.json", lambda b: b[: len(b) // 2]),
    ("checkpoint.json", lambda b: b"[1, 2]"),
])
def test_resume_from_a_damaged_checkpoint_names_the_file_and_changes_nothing(
        tmp_path, one_step_run, name, damage):
    config, src = one_step_run
    run = tmp_path / "run"
    bad = _damaged_copy(src, run, name, damage)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = _one_error_line(_train_uae(config, run, "--resume"))
    assert str(bad) in line and ("damaged" in line or "not a UAE checkpoint" in line)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # Nor does dropping --resume start over on top of it.
    line = _one_error_line(_train_uae(config, run))
    assert "already holds a run" in line and "--resume" in line


def test_resume_without_a_checkpoint_is_an_error_not_a_new_run(tmp_path, cifar_dir,
                                                               shared_weights):
    config = _uae_config(tmp_path, cifar_dir, shared_weights)
    empty = tmp_path / "empty"
    empty.mkdir()
    for run in (empty, tmp_path / "absent"):
        line = _one_error_line(_train_uae(config, run, "--resume"))
        assert str(run / "checkpoint.json") in line and "without --resume" in line
    assert list(empty.iterdir()) == [] and not (tmp_path / "absent").exists()


def test_uae_run_with_damaged_files_is_one_line_error(tmp_path):
    """eval-uae / uae:RUN on a run folder whose config.json is damaged: one line naming it."""
    from prism_probe.errors import PrismError
    from prism_probe.uae.eval import load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    with pytest.raises(PrismError, match=r"config.json: damaged"):
        load_run(run)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(PrismError, match="not a UAE run config"):
        load_run(run)


def test_ablate_and_baseline_refuse_an_unwritable_out_before_measuring(tmp_path, monkeypatch):
    """The same early check as `spectrum`: nothing is measured when --out cannot be written."""
    import prism_probe.check as C
    import prism_probe.probes as PR

    images = _noise_images(tmp_path / "img")
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")

    def never(*a, **k):
        raise AssertionError("measured although the output folder is unusable")

    monkeypatch.setattr(PR, "run_ablation", never)
    monkeypatch.setattr(C, "measure_baseline", never)
    line = _one_error_line(invoke("ablate", "pixels:4", "--mode", "input", "--images", images,
                                  "--image-size", "32", "--out", blocker / "sub"))
    assert str(blocker / "sub") in line and "cannot write output" in line
    line = _one_error_line(invoke("baseline", "pixels:4", "--images", images, "--image-size",
                                  "32", "--out", blocker / "sub" / "b.json"))
    assert str(blocker / "sub") in line and "cannot write output" in line
    assert blocker.read_text() == "keep me"


def test_resume_uses_the_runs_own_config_and_refuses_a_different_one(tmp_path, cifar_dir,
                                                                     shared_weights):
    """--resume alone continues the run as configured; --resume with another configuration is
    refused (it would silently train a different schedule on top of the checkpoint)."""
    import json as _json

    config = _uae_config(tmp_path, cifar_dir, shared_weights, steps=4)
    run = tmp_path / "run"
    r = _train_uae(config, run, "--stop-after", "2")
    assert r.exit_code == 0, r.output
    saved = (run / "config.json").read_text()

    line = _one_error_line(_train_uae(config, run, "--resume", "--set", "stages.0.steps=9"))
    assert "differs from the run's own" in line and "stages.0.steps: 9 (now) vs 4 (run)" in line
    assert (run / "config.json").read_text() == saved

    r = invoke("train-uae", "--out", run, "--resume")
    assert r.exit_code == 0, r.output
    assert _json.loads((run / "checkpoint.json").read_text())["step"] == 4
