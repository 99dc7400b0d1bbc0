"""Comparison figures from profiles: radial spectra overlaid, and e(k) bars side by side.

Every figure states the protocol its profiles share in its caption (units, window, mean removal,
grid mode, image count), and each encoder's input size and feature grid in its legend entry,
taken from the profiles themselves, so a figure cut out of a paper still says how it was made.

Profiles are checked before anything is drawn: a hand-edited or truncated file is refused with
one line naming the file and the field. Overlaying profiles measured differently (units, image
set, window, mean removal, grid mode) is allowed but logged as a warning naming the difference.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PrismError
from .profile import Profile, atomic_write_bytes

NORMALIZE = ("white", "total", "peak", "none")
#: Figure formats :func:`save_figure` writes, by file suffix.
FORMATS = ("png", "pdf", "svg")
#: Protocol entries that change what a spectrum's numbers mean; the others (grid, stride, input
#: size, layer, dtype) legitimately differ between the encoders of one figure.
MEASURE_KEYS = ("measure", "modality", "units", "spectrum", "grid_mode")

log = logging.getLogger(__name__)


def save_figure(fig, out: str | Path, pdf: bool = False, dpi: int = 150) -> list[Path]:
    """Write ``fig`` in the format ``out``'s suffix names (png, pdf or svg; PNG when it has
    none), plus a PDF beside it when ``pdf``; each file atomically.

    Raises
    ------
    PrismError
        The suffix names another format.
    """
    written = []
    for fmt, path in figure_targets(out, pdf):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        written.append(atomic_write_bytes(path, buf.getvalue()))
    return written


def figure_targets(out: str | Path, pdf: bool = False) -> list[tuple[str, Path]]:
    """(format, path) of each file :func:`save_figure` writes; checked before drawing."""
    out = Path(out)
    fmt = out.suffix.lower().lstrip(".")
    if not fmt:
        fmt, out = "png", out.with_suffix(".png")
    if fmt not in FORMATS:
        raise PrismError(f"{out}: cannot write .{fmt} figures; use a file ending in "
                         f"{', '.join('.' + f for f in FORMATS)}")
    targets = [(fmt, out)]
    if pdf and fmt != "pdf":
        targets.append(("pdf", out.with_suffix(".pdf")))
    return targets


def load_profiles(paths: Sequence[str | Path]) -> list[Profile]:
    """:meth:`Profile.load` each file, remembering its path (``source``) for messages."""
    loaded = []
    for path in paths:
        p = Profile.load(path)
        p.source = str(path)
        loaded.append(p)
    return loaded


def _name(p: Profile) -> str:
    return getattr(p, "source", None) or f"the profile of {p.label}"


def _array(p: Profile, value, field: str, length: int | None = None) -> np.ndarray:
    """``value`` as a finite 1-D float array (of ``length``), or a one-line PrismError."""
    try:
        a = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise PrismError(f"{_name(p)}: result {field} is not a list of numbers") from None
    if a.ndim != 1:
        raise PrismError(f"{_name(p)}: result {field} is not a list of numbers")
    if length is not None and len(a) != length:
        raise PrismError(f"{_name(p)}: result {field} has {len(a)} values, but freqs has "
                         f"{length}; the file was truncated or edited")
    if not np.isfinite(a).all():
        raise PrismError(f"{_name(p)}: result {field} holds {int((~np.isfinite(a)).sum())} "
                         "value(s) that are NaN or infinite; re-measure it")
    return a


def validate_spectrum(p: Profile, units: str, normalize: str = "white",
                      yscale: str = "log") -> None:
    """Refuse, with one line naming the file and field, a profile :func:`plot_profiles` cannot
    draw: a missing key, values that are not numbers, lengths that disagree with ``freqs``."""
    r = p.result if isinstance(p.result, dict) else {}
    needed = ["freqs_pixel" if units == "pixel" else "freqs", "power", "dct_band_energy"]
    if normalize == "white":
        needed += ["ring_counts", "grid"]
    missing = [k for k in needed if k not in r]
    if missing:
        raise PrismError(f"{_name(p)}: result lacks '{missing[0]}'; is it a spectrum profile "
                         "from `spectrum --out`?")
    for key in ("grid_mode", "spectrum", "grid", "input_size"):
        if key not in p.protocol:
            raise PrismError(f"{_name(p)}: protocol lacks '{key}'")
    freqs = _array(p, r[needed[0]], needed[0])
    power = _array(p, r["power"], "power", len(freqs))
    for key in ("power_stderr", "ring_counts"):
        if r.get(key) is not None:
            _array(p, r[key], key, len(freqs))
    energy = _array(p, r["dct_band_energy"], "dct_band_energy")
    if r.get("dct_band_energy_stderr") is not None:
        _array(p, r["dct_band_energy_stderr"], "dct_band_energy_stderr", len(energy))
    if (power < 0).any():
        raise PrismError(f"{_name(p)}: result power has negative values; power cannot be "
                         "negative: re-measure it")


def _set_up_warnings(profiles: Sequence[Profile]) -> list[str]:
    """What differs in how the profiles were measured, against the first one."""
    out = []
    first = profiles[0]
    for p in profiles[1:]:
        # Profile.comparable_with names every differing field; keep those that change what the
        # numbers mean (encoders of one figure differ in entry, weights, grid and input size).
        diffs = [d for d in first.comparable_with(p)
                 if d.startswith("image set:")
                 or d.split(":")[0] in {f"protocol {k}" for k in MEASURE_KEYS}]
        sa, sb = first.protocol.get("spectrum"), p.protocol.get("spectrum")
        if isinstance(sa, dict) and isinstance(sb, dict):
            # The spectrum options as one repr are unreadable; name the options instead.
            diffs = [d for d in diffs if not d.startswith("protocol spectrum:")]
            diffs += [f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}"
                      for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
        if diffs:
            out.append(f"{_name(p)} was measured unlike {_name(first)} ({'; '.join(diffs)}); "
                       "its curve is not comparable")
    return out


def _size(v) -> str:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return str(v[0]) if len(set(v)) == 1 and len(v) == 2 else "×".join(map(str, v))


def legend_labels(profiles: Sequence[Profile]) -> list[str]:
    """``"taef2 (pixel; 256 px → 32×32)"`` per profile, made distinct (file stem appended)."""
    names = [p.label for p in profiles]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        log.warning("the label(s) %s appear more than once; the legend tells them apart by "
                    "file name", ", ".join(sorted(dupes)))
    out = []
    for i, p in enumerate(profiles):
        name = p.label
        if name in dupes:
            src = getattr(p, "source", None)
            name += f" [{Path(src).stem}]" if src else f" [{i + 1}]"
        pr = p.protocol
        out.append(f"{name} ({p.family}; {_size(pr['input_size'])} px → "
                   f"{'×'.join(map(str, pr['grid']))})")
    if len(set(out)) < len(out):  # same label and same file stem: number them
        out = [f"{o} #{i + 1}" for i, o in enumerate(out)]
    return out


def _curve(p: Profile, units: str, normalize: str):
    r = p.result
    f = np.asarray(r["freqs_pixel"] if units == "pixel" else r["freqs"], dtype=float)
    y = np.asarray(r["power"], dtype=float)
    se = r.get("power_stderr")
    se = np.zeros_like(y) if se is None else np.asarray(se, dtype=float)
    if normalize == "white":
        # Mean power per cell, corners included: a white field of the same variance is flat at 1
        # on any grid, so encoders with different grids share one axis.
        counts = np.asarray(r["ring_counts"], dtype=float)
        ring_total = float((y * counts).sum())
        corner = float(r.get("corner_power_share", 0.0))
        scale = ring_total / max(1.0 - corner, 1e-12) / float(np.prod(r["grid"]))
    elif normalize == "total":
        scale = y.sum()
    elif normalize == "peak":
        scale = y[f > 0].max() if (f > 0).any() else y.max()
    else:
        scale = 1.0
    scale = scale if scale > 0 else 1.0
    return f, y / scale, 1.96 * se / scale


def protocol_caption(profiles: Sequence[Profile], units: str) -> str:
    """The protocol the profiles share (each encoder's input and grid are in its legend)."""
    pr = profiles[0].protocol
    cfg = pr["spectrum"]
    n = sorted({p.images.get("n_used") for p in profiles}, key=str)
    return (f"{pr['grid_mode']} feature grids (input size → grid per encoder in the legend); "
            f"window {cfg.get('window') or 'none'}; channel mean "
            f"{'removed' if cfg.get('remove_mean') else 'kept'}; "
            f"{'cycles per input pixel' if units == 'pixel' else 'cycles per grid cell'}; "
            f"{'/'.join(map(str, n))} images; shading: ±1.96 standard errors over images")


def plot_profiles(
    profiles: Sequence[Profile],
    out: str | Path,
    *,
    pdf: bool = False,
    size: tuple[float, float] = (10.0, 4.0),
    font_size: float = 9.0,
    xscale: str = "log",
    yscale: str = "log",
    normalize: str = "white",
    units: str | None = None,
) -> list[Path]:
    """Draw all profiles' radial spectra (left) and DCT band energies e(k) (right).

    ``normalize``: ``white`` (default) divides each spectrum by its mean power per cell, so a
    white field of the same variance is flat at 1 whatever the grid, and encoders of different
    widths, scales and grids share an axis; ``total`` divides by the sum of its ring means;
    ``peak`` by its largest non-DC ring; ``none`` keeps raw power (feature units², per cell).
    Returns the files written (``out`` in the format its suffix names, and a PDF beside it when
    ``pdf``; :func:`save_figure`), each written atomically. Ablation profiles (from `ablate`)
    are drawn by :func:`prism_probe.plot_ablation.plot_ablation`.
    """
    if not profiles:
        raise PrismError("nothing to plot: give at least one profile")
    kinds = {p.kind for p in profiles}
    if "ablation" in kinds:
        if kinds != {"ablation"}:
            raise PrismError("ablation and spectrum profiles do not share a figure; plot "
                             "each kind on its own")
        from .plot_ablation import plot_ablation

        return plot_ablation(profiles, out, pdf=pdf, font_size=font_size)
    if normalize not in NORMALIZE:
        raise PrismError(f"--normalize {normalize}: use one of {', '.join(NORMALIZE)}")
    for scale in (xscale, yscale):
        if scale not in ("log", "linear"):
            raise PrismError(f"axis scale {scale!r}: use log or linear")
    units = units or profiles[0].protocol.get("units", "cell")
    if units not in ("cell", "pixel"):
        raise PrismError(f"--units {units}: use cell or pixel")
    figure_targets(out, pdf)
    for p in profiles:
        validate_spectrum(p, units, normalize, yscale)
    bands = {len(p.result["dct_band_energy"]) for p in profiles}
    if len(bands) > 1:
        raise PrismError(f"the profiles have different numbers of DCT bands "
                         f"({', '.join(map(str, sorted(bands)))}); plot them separately")
    for warning in _set_up_warnings(profiles):
        log.warning("%s", warning)
    labels = legend_labels(profiles)

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": font_size}):
        fig, (ax, bx) = plt.subplots(1, 2, figsize=size, gridspec_kw={"width_ratios": [3, 2]})
        for i, p in enumerate(profiles):
            f, y, ci = _curve(p, units, normalize)
            if yscale == "log" and not (y > 0).any():
                # Constant maps (blank images) have no power to draw on a log axis; the profile
                # records them (n_zero_power), the figure says they are left out.
                log.warning("%s: zero power at every frequency (constant feature maps); left "
                            "out of the log-scale spectrum panel", labels[i])
                ax.plot([], [], color=f"C{i % 10}", label=labels[i] + " — zero power")
                continue
            keep = f > 0 if xscale == "log" else np.ones_like(f, dtype=bool)
            color = f"C{i % 10}"
            style = "--" if p.family == "pixel" else "-"
            ax.plot(f[keep], y[keep], style, color=color, lw=1.5, label=labels[i])
            lo = np.clip(y - ci, 1e-30 if yscale == "log" else None, None)
            ax.fill_between(f[keep], lo[keep], (y + ci)[keep], color=color, alpha=0.2, lw=0)
        ax.set_xscale(xscale)
        ax.set_yscale(yscale)
        if xscale == "log":
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        if normalize == "white":
            ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("radial frequency (" + ("cycles / input pixel" if units == "pixel"
                                               else "cycles / grid cell") + ")")
        ax.set_ylabel({"white": "power / mean power per cell (white = 1)",
                       "total": "power / total power", "peak": "power / peak power",
                       "none": "power per ring"}[normalize])
        ax.set_title("Radially averaged power spectrum")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(frameon=False)

        k = len(profiles[0].result["dct_band_energy"])
        width = 0.8 / len(profiles)
        x = np.arange(1, k + 1)
        for i, p in enumerate(profiles):
            e = np.asarray(p.result["dct_band_energy"], dtype=float)
            se = p.result.get("dct_band_energy_stderr")
            err = 1.96 * (np.zeros_like(e) if se is None else np.asarray(se, dtype=float))
            bx.bar(x - 0.4 + width * (i + 0.5), e, width, yerr=err, color=f"C{i % 10}",
                   label=labels[i], error_kw={"lw": 0.8})
        bx.set_yscale("log" if yscale == "log" else "linear")
        bx.set_xticks(x)
        bx.set_xlabel("DCT zig-zag band k (low → high)")
        bx.set_ylabel("e(k), share of energy")
        bx.set_title(f"DCT band energy ({k} bands, raw)")
        bx.grid(True, axis="y", which="both", alpha=0.3)
        fig.text(0.5, 0.005, protocol_caption(profiles, units), ha="center", va="bottom",
                 fontsize=font_size * 0.8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        written = save_figure(fig, out, pdf)
        plt.close(fig)
    return written
