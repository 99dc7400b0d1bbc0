"""Benchmarks of prism-probe against its peers and against the bare-FFT floor.

    python benchmarks/run.py            # full sizes, writes BENCHMARKS.md at the repo root
    python benchmarks/run.py --quick    # tiny sizes (the test suite's smoke run)

Every figure is the median over ``--repeats`` runs; candidates of one row group are run
interleaved (baseline, candidate, baseline, ...), so a load spike from other processes on the
machine hits all of them alike and the ratio column stays meaningful when absolute times do not.
Each run of a candidate loops until ``--min-time`` seconds have passed, so that scheduler time
slices of a loaded machine average out instead of quantising the figure.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGES = SHARED / "data" / "imagenet-sample"
WEIGHTS = SHARED / "weights"
SCRIPT = "python benchmarks/run.py"


@dataclass
class Row:
    """One figure: a median, its unit, its ratio to the group's baseline, and how it was made."""

    section: str
    group: str
    name: str
    value: float
    unit: str
    ratio: float | None = None
    note: str = ""
    command: str = ""
    samples: list[float] = field(default_factory=list)


@dataclass
class Settings:
    quick: bool
    repeats: int
    min_time: float


# ------------------------------------------------------------------------------------------------
# Timing


def _time_once(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call of ``fn``, looping until ``min_time`` has passed."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def interleaved(cands: dict[str, Callable[[], object]], repeats: int,
                min_time: float) -> dict[str, list[float]]:
    """Per-call seconds of every candidate, ``repeats`` samples each, taken round-robin."""
    names = list(cands)
    for name in names:  # warm-up: caches, lazy imports, allocator
        cands[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        # Rotate the order so no candidate always runs right after the same neighbour.
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out[name].append(_time_once(cands[name], min_time))
    return out


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------
# 1. Radial spectrum kernel


def _ring_index_np(h: int, w: int):
    from prism_probe.spectra import _ring_geometry

    ring, centers, _ = _ring_geometry(h, w, "physical", True)
    return ring.ravel(), len(centers)


def _numpy_batched(x_np, ring, n_bins: int):
    import numpy as np

    b, c = x_np.shape[:2]
    spec = np.fft.rfft2(x_np, norm="ortho")
    power = (spec.real**2 + spec.imag**2).mean(axis=1).reshape(b, -1)
    offsets = (np.arange(b)[:, None] * (n_bins + 1) + ring[None, :]).ravel()
    sums = np.bincount(offsets, weights=power.ravel(), minlength=b * (n_bins + 1))
    return sums.reshape(b, n_bins + 1)


def bench_kernel(s: Settings) -> list[Row]:
    import contextlib

    import numpy as np
    import powerbox
    import torch

    with contextlib.redirect_stdout(io.StringIO()):  # pysteps announces its config file
        from pysteps.utils.spectral import rapsd

    from prism_probe.spectra import SpectrumAccumulator, SpectrumConfig

    if s.quick:
        shapes = [(2, 8, 16, 16), (1, 8, 37, 37), (2, 4, 32, 32), (2, 4, 64, 64)]
        n_sub = 4
    else:
        shapes = [(32, 768, 16, 16), (4, 1024, 37, 37), (32, 32, 32, 32), (64, 4, 64, 64)]
        n_sub = 64
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for shape in shapes:
        b, c, h, w = shape
        x = torch.randn(shape, generator=gen)
        x_np = x.numpy()
        fields = x_np.reshape(-1, h, w)[:n_sub].astype(np.float64)
        ring, n_bins = _ring_index_np(h, w)
        full, nodct = SpectrumConfig(), SpectrumConfig(n_dct_bands=0)

        def floor():
            spec = torch.fft.rfft2(x, norm="ortho")
            return (spec.real.square() + spec.imag.square()).mean(dim=1)

        def pysteps_sub():
            for f in fields:
                rapsd(f, fft_method=np.fft)

        def powerbox_sub():
            for f in fields:
                powerbox.get_power(f, boxlength=1.0, bins=n_bins)

        def floor_serial():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return floor()
            finally:
                torch.set_num_threads(threads)

        cands = {
            "floor": floor,
            "floor1": floor_serial,
            "full": lambda: SpectrumAccumulator(full).update(x),
            "nodct": lambda: SpectrumAccumulator(nodct).update(x),
            "numpy": lambda: _numpy_batched(x_np, ring, n_bins),
            "rfft2": lambda: torch.fft.rfft2(x, norm="ortho"),
            "pysteps": pysteps_sub,
            "powerbox": powerbox_sub,
        }
        import warnings

        with warnings.catch_warnings():
            # powerbox warns on every call that its default binning will change.
            warnings.simplefilter("ignore")
            times = interleaved(cands, s.repeats, s.min_time)
        n_fields = b * c
        per = {k: n_fields if k not in ("pysteps", "powerbox") else len(fields) for k in cands}
        per_k = {k: [t / per[k] * 1000 for t in v] for k, v in times.items()}
        med = {k: _median(v) for k, v in per_k.items()}
        group = f"{b}×{c}×{h}×{w}"
        labels = {
            "full": ("prism-probe accumulator update, RAPS + DCT e(k)",
                     "SpectrumAccumulator(SpectrumConfig()).update(x)"),
            "nodct": ("prism-probe accumulator update, RAPS only",
                      "SpectrumAccumulator(SpectrumConfig(n_dct_bands=0)).update(x)"),
            "pysteps": (f"pysteps rapsd, per field ({len(fields)} fields, scaled)",
                        "rapsd(f, fft_method=np.fft) per field"),
            "powerbox": (f"powerbox get_power, per field ({len(fields)} fields, scaled)",
                         f"powerbox.get_power(f, boxlength=1, bins={n_bins}) per field"),
            "numpy": ("numpy batched rfft2 + bincount",
                      "np.fft.rfft2 → |·|² → mean(C) → np.bincount"),
            "floor": ("floor: torch rfft2 + |·|² + mean(C), no binning",
                      "s = torch.fft.rfft2(x); (s.real²+s.imag²).mean(1)"),
            "rfft2": ("(reference) torch rfft2 alone", "torch.fft.rfft2(x, norm='ortho')"),
            "floor1": ("(reference) the floor on one intra-op thread",
                       "torch.set_num_threads(1); floor"),
        }
        for key in ("full", "nodct", "numpy", "pysteps", "powerbox", "floor", "floor1", "rfft2"):
            name, cmd = labels[key]
            note = ""
            if key in ("full", "nodct"):
                note = f"{med['pysteps'] / med[key]:.0f}× faster than pysteps"
            rows.append(Row("kernel", group, name, med[key], "s / 1000 fields",
                            med[key] / med["floor"], note, cmd, per_k[key]))
    return rows


def kernel_profile(s: Settings) -> str:
    """Self CPU time by operator of one accumulator update (what dominates the kernel)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from prism_probe.spectra import SpectrumAccumulator, SpectrumConfig

    shape = (2, 8, 16, 16) if s.quick else (32, 768, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    SpectrumAccumulator(SpectrumConfig()).update(x)  # warm caches out of the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            SpectrumAccumulator(SpectrumConfig()).update(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    lines = [f"Operators of `SpectrumAccumulator(SpectrumConfig()).update(x)`, x = "
             f"{'×'.join(map(str, shape))}, 3 calls, by self CPU time:", "",
             "| operator | calls | self CPU ms | share |", "| --- | --- | --- | --- |"]
    for e in events[:10]:
        lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{e.self_cpu_time_total / total:.0%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# 2. End-to-end: spectrum against the bare forward


def _e2e_cases(s: Settings) -> list[tuple[str, int]]:
    if s.quick:
        return [("pixels", 4), ("resnet20-cifar", 4)]
    return [("random:dinov2-b", 24), ("resnet20-cifar", 250), ("resnet56-cifar", 250),
            ("taef2", 16), ("pixels", 64)]


def bench_e2e(s: Settings) -> list[Row]:
    import torch

    from prism_probe.data import collect_images, read_image
    from prism_probe.loading import load_encoder
    from prism_probe.loading.base import check_finite
    from prism_probe.spectra import SpectrumAccumulator, SpectrumConfig

    rows: list[Row] = []
    all_paths = list(collect_images(str(IMAGES)).paths)
    for spec, n in _e2e_cases(s):
        paths = all_paths[:n]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            enc = load_encoder(spec, weights_dir=str(WEIGHTS), device="cpu")
        pre = enc.preprocess
        batch_size = 32

        # Decode and preprocess split, in this process (one image at a time, as worker 0 does).
        def decode():
            return [read_image(p, target_size=pre.decode_hint) for p in paths]

        imgs = decode()

        def preprocess():
            return [pre(im) for im in imgs]

        split = interleaved({"decode": decode, "preprocess": preprocess},
                            max(1, s.repeats // 2), 0.0)
        tensors = preprocess()
        batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, n, batch_size)]

        def forward():
            for px in batches:
                enc.encode(px)

        def spectrum():
            # The per-batch work of measure_encoder, decoding aside.
            acc = SpectrumAccumulator(SpectrumConfig())
            for k, px in enumerate(batches):
                fmap = enc.encode(px)
                fmap.tensor = fmap.tensor.float()
                check_finite(fmap, encoder=spec, batch=k)
                acc.update(fmap.tensor)
            return acc.result()

        # A heavy forward takes seconds per pass: three interleaved pairs bound the run time.
        times = interleaved({"forward": forward, "spectrum": spectrum}, min(s.repeats, 3), 0.0)
        fwd, spc = _median(times["forward"]), _median(times["spectrum"])
        dec, prp = _median(split["decode"]), _median(split["preprocess"])
        grid = "×".join(map(str, enc.encode(batches[0][:1]).tensor.shape[1:]))
        group = f"{spec}, {n} images, {pre.size[0]} px → {grid}"
        per_img = [("decode (draft JPEG decoding)", dec, split["decode"],
                    "read_image(p, target_size=pre.decode_hint)"),
                   ("preprocess", prp, split["preprocess"], "pre(img)"),
                   ("bare forward", fwd, times["forward"], "enc.encode(px) per batch of 32"),
                   ("spectrum (forward + spectra)", spc, times["spectrum"],
                    "encode + float + check_finite + acc.update")]
        for name, t, samples, cmd in per_img:
            ratio = t / fwd if name.startswith(("bare", "spectrum")) else None
            rows.append(Row("e2e", group, name, t / n * 1000, "ms / image", ratio, "", cmd,
                            [x / n * 1000 for x in samples]))
        rows.append(Row("e2e", group, "spectra alone (spectrum − forward)",
                        max(spc - fwd, 0.0) / n * 1000, "ms / image", None,
                        f"{max(spc - fwd, 0.0) / (dec + prp + spc):.1%} of decode + "
                        "preprocess + spectrum", "difference of medians"))
        del enc
    return rows


# ------------------------------------------------------------------------------------------------
# 3. Peak memory


_RSS_CHILD = textwrap.dedent("""
    import resource, sys, tempfile
    from prism_probe.measure import measure_spectra
    profiles = measure_spectra([sys.argv[1]], images=sys.argv[2], weights_dir=sys.argv[3],
                               device="cpu", image_size=int(sys.argv[4]))
    assert profiles[0].images["n_used"] == int(sys.argv[5]), profiles[0].images["n_used"]
    # VmHWM is this process image's own peak. ru_maxrss is not: Linux carries the peak of the
    # forked parent (here a benchmark process holding torch and test tensors) across exec.
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(rss, int(hwm[0].split()[1]) if hwm else rss)
""")


def bench_memory(s: Settings) -> list[Row]:
    from prism_probe.data import collect_images

    paths = [str(p) for p in collect_images(str(IMAGES)).paths]
    sizes = (4, 40) if s.quick else (250, 2500)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoder in ("resnet20-cifar",):
            base = None
            for n in sizes:
                listing = Path(tmp) / f"images-{n}.txt"
                listing.write_text("\n".join(paths[i % len(paths)] for i in range(n)) + "\n")
                samples = []
                for _ in range(1 if s.quick else 2):
                    out = subprocess.run(
                        [sys.executable, "-c", _RSS_CHILD, encoder, str(listing), str(WEIGHTS),
                         "32", str(n)], capture_output=True, text=True, check=True, cwd=ROOT)
                    samples.append(int(out.stdout.split()[-1]) / 1024)  # VmHWM, KiB
                mib = _median(samples)
                base = base or mib
                rows.append(Row("memory", f"{encoder} at 32 px", f"N = {n} images", mib,
                                "MiB peak RSS (VmHWM)", mib / base,
                                f"{mib - base:+.1f} MiB vs N = {sizes[0]}",
                                f"measure_spectra(['{encoder}'], images=list-of-{n}.txt) "
                                "in a subprocess; VmHWM", samples))
    return rows


# ------------------------------------------------------------------------------------------------
# 4. Start-up


_IMPORT_CHECK = textwrap.dedent("""
    import contextlib, io, sys
    from prism_probe.cli import app
    sys.argv = ["prism-probe", "encoders", "--weights", sys.argv[1]]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            app()
        except SystemExit:
            pass
    heavy = sorted(m for m in ("torch", "timm", "huggingface_hub", "transformers",
                               "open_clip", "diffusers") if m in sys.modules)
    print(",".join(heavy) or "none")
""")


def bench_startup(s: Settings) -> list[Row]:
    exe = Path(sys.executable).with_name("prism-probe")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "prism_probe.cli"]
    cmds = {
        "prism-probe --help": cli + ["--help"],
        "prism-probe encoders": cli + ["encoders", "--weights", str(WEIGHTS)],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        # The interpreter alone: on a loaded machine even this is far from instant.
        'python -c "pass"': [sys.executable, "-c", "pass"],
    }

    def runner(argv):
        return lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      check=True, cwd=ROOT)

    times = interleaved({k: runner(v) for k, v in cmds.items()}, s.repeats, 0.0)
    base = _median(times['python -c "import torch"'])
    rows = [Row("startup", "wall time of a fresh process", name, _median(t), "s",
                _median(t) / base, "ratio to import torch", name, t) for name, t in times.items()]
    heavy = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, str(WEIGHTS)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    rows.append(Row("startup", "wall time of a fresh process",
                    "heavy modules imported by `encoders`", 0.0, heavy, None,
                    "must be none (torch, timm, huggingface_hub, …)",
                    "sys.modules after running the encoders command"))
    return rows


# ------------------------------------------------------------------------------------------------
# Machine and output


def machine() -> dict[str, str]:
    import numpy
    import torch

    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            return "absent"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "gpu": "none (no device lent to this task: the GPU benchmark, item 5, was skipped)",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "numpy": numpy.__version__,
        "pysteps": version("pysteps"),
        "powerbox": version("powerbox"),
        "pillow": version("pillow"),
    }


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _table_rows(rows: list[Row]):
    for r in rows:
        value = r.unit if r.value == 0 and r.section == "startup" else f"{_fmt(r.value)} {r.unit}"
        spread = (f"{_fmt(min(r.samples))}–{_fmt(max(r.samples))}" if len(r.samples) > 1 else "")
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}×"
        yield r.group, r.name, value, spread, ratio, r.note, r.command


HEADERS = ("case", "what", "median", "range", "ratio", "note", "command")
RATIO_BASE = {
    "kernel": "ratio = time ÷ the floor (torch rfft2 + |·|² + channel mean) in the same run",
    "e2e": "ratio = time ÷ the bare forward over the same pre-decoded batches",
    "memory": "ratio = peak RSS ÷ peak RSS at the smaller N",
    "startup": "ratio = wall time ÷ `python -c \"import torch\"`",
}
TITLES = {"kernel": "1. Radial spectrum kernel", "e2e": "2. End to end: `spectrum` vs bare "
          "forward", "memory": "3. Peak memory of `spectrum`", "startup": "4. Start-up"}


def print_table(rows: list[Row]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for cells in _table_rows(rows):
            print(" | ".join(cells[:6]))
        return
    console = Console(width=max(Console().width, 150))
    for section in TITLES:
        sub = [r for r in rows if r.section == section]
        if not sub:
            continue
        table = Table(title=TITLES[section], caption=RATIO_BASE[section])
        for h in HEADERS[:6]:
            table.add_column(h)
        for cells in _table_rows(sub):
            table.add_row(*cells[:6])
        console.print(table)


def write_markdown(path: Path, rows: list[Row], info: dict, s: Settings, load: dict,
                   profile_text: str, argv: list[str], gaps: list[str]) -> None:
    out = io.StringIO()
    w = out.write
    w("# Benchmarks\n\nGenerated by `" + " ".join([SCRIPT, *argv]) + f"` on "
      f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; do not edit by hand.\n"
      f"Each figure is the median of {s.repeats} runs (range beside it); candidates in one case "
      "were run interleaved, so ratios compare like with like even on a loaded machine.\n\n")
    w("## Machine\n\n| | |\n| --- | --- |\n")
    for k, v in info.items():
        w(f"| {k} | {v} |\n")
    w(f"| load average (1, 5, 15 min) | before: {load['before']}; after: {load['after']} |\n\n")
    if load["busy"]:
        w("The load average was above the core count: other processes shared the CPUs, so "
          "absolute times are inflated and noisy; read the ratio column.\n\n")
    for section in TITLES:
        sub = [r for r in rows if r.section == section]
        if not sub:
            continue
        w(f"## {TITLES[section]}\n\n{RATIO_BASE[section]}.\n\n")
        w("| " + " | ".join(HEADERS) + " |\n|" + " --- |" * len(HEADERS) + "\n")
        for cells in _table_rows(sub):
            w("| " + " | ".join(c.replace("|", "\\|") if i < 6 else f"`{c}`" if c else ""
                                for i, c in enumerate(cells)) + " |\n")
        w("\n")
        if section == "kernel" and profile_text:
            w(profile_text + "\n\n")
    if gaps:
        w("## Targets\n\n")
        for g in gaps:
            w(f"- {g}\n")
        w("\n" + NOTES)
    path.write_text(out.getvalue())


NOTES = """## What dominates, and why

- The floor is one `rfft2` plus its epilogue (|·|² and the channel mean), and at 16×16 the
  epilogue costs more than the FFT itself: both are passes over memory. The accumulator adds
  passes the floor does not make: mean removal and the Hann window (two passes over the input),
  ring binning (small), and, for e(k), a separable DCT (two matrix products over the input) with
  its own |·|² and channel mean (see the operator profile above). The DCT cannot share the
  FFT (e(k) is taken without window or mean removal, and a DCT-II is not a function of the DFT
  power), so it needs a second transform of the input; an FFT-based DCT-II would cost a second
  `rfft2` plus a twiddle pass, no cheaper than the matrix products at these grid sizes.
  `n_dct_bands=0` skips it.
- On a CPU shared with other processes every parallel operator waits at an OpenMP barrier for a
  descheduled thread. The update runs ~25 operators against the floor's ~4, so on two threads
  it pays the barrier ~6× as often; it therefore runs on one intra-op thread for tiny batches
  (up to 512 kB, `_SERIAL_MAX_NUMEL` in `prism_probe/spectra.py`), which brings small-encoder
  batches on a loaded machine from ~140 ms to a few ms; larger batches use every thread, which
  on idle cores is 1.4–2× faster. Ratios are taken against the default (multi-thread) floor, as
  issue 6 defines it; the one-thread floor row is the reference for single-thread use.
- End to end the spectra are ~1 % of a ViT-B forward. For the small CIFAR ResNets at 32 px the
  forward is a few ms per image, and JPEG decoding (already at reduced size through `draft`) is of
  the same order: decoding in worker processes (`--workers`, one thread each) takes it off the
  compute path.
- Peak memory is fixed by the model, the batch and the libraries; the accumulator keeps 4 numbers
  per image, so 10× more images add ~0.1 MB.
- No GPU was lent to this task, so item 5 of issue 6 (GPU throughput) was not measured.
"""


def targets(rows: list[Row]) -> list[str]:
    """One line per target of issue 6: met or not, from this run's figures."""
    lines = []
    kernel = [r for r in rows if r.section == "kernel" and r.name.startswith("prism-probe")]
    for r in kernel:
        mark = "met" if r.ratio <= 1.5 else "NOT met"
        lines.append(f"kernel {r.group}, {r.name.split(', ')[1]}: {r.ratio:.2f}× the floor "
                     f"(target ≤ 1.5×): {mark}")
    for r in rows:
        if r.section == "e2e" and r.name.startswith("spectrum") and "dinov2" in r.group:
            mark = "met" if r.ratio <= 1.10 else "NOT met"
            lines.append(f"end to end {r.group}: {r.ratio:.3f}× the bare forward "
                         f"(target ≤ 1.10×): {mark}")
    mem = [r for r in rows if r.section == "memory"]
    if len(mem) >= 2:
        grow = mem[-1].value - mem[0].value
        mark = "met" if grow <= 5 else "NOT met"
        lines.append(f"memory: {grow:+.1f} MiB from {mem[0].name} to {mem[-1].name} "
                     f"(target: a few MB): {mark}")
    for r in rows:
        if r.section == "startup" and r.name.startswith("prism-probe"):
            mark = "met" if r.value < 0.5 else "NOT met"
            lines.append(f"start-up `{r.name}`: {r.value:.2f} s (target < 0.5 s): {mark}")
        if r.section == "startup" and r.name.startswith("heavy"):
            lines.append(f"`encoders` imports {r.unit}: {'met' if r.unit == 'none' else 'NOT met'}")
    return lines


SECTIONS = {"kernel": bench_kernel, "e2e": bench_e2e, "memory": bench_memory,
            "startup": bench_startup}


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (median)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds each kernel run loops for")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="markdown file to write (default: BENCHMARKS.md at the repo root)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    s = Settings(quick=args.quick, repeats=args.repeats or (2 if args.quick else 5),
                 min_time=args.min_time if args.min_time is not None else
                 (0.0 if args.quick else 0.5))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PRISM_PROBE_OFFLINE", "1")
    before = _load()
    rows: list[Row] = []
    profile_text = ""
    for name in args.only:
        rows += SECTIONS[name](s)
        if name == "kernel":
            profile_text = kernel_profile(s)
    after = _load()
    busy = max(os.getloadavg()) > (os.cpu_count() or 1)
    print_table(rows)
    gaps = targets(rows)
    for line in gaps:
        print(line)
    if not args.no_write:
        write_markdown(args.out, rows, machine(), s, {"before": before, "after": after,
                                                       "busy": busy},
                       profile_text, list(argv if argv is not None else sys.argv[1:]), gaps)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
