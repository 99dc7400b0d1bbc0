"""Comparison figures from profiles: radial spectra overlaid, and e(k) bars side by side.

Every figure states its protocol in its caption (units, window, mean removal, grid, input sizes),
taken from the profiles themselves, so a figure cut out of a paper still says how it was made.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PrismError
from .profile import Profile, atomic_write_bytes

NORMALIZE = ("white", "total", "peak", "none")


def save_figure(fig, out: str | Path, pdf: bool = False, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as PNG (and PDF when ``pdf`` or ``out`` ends in .pdf), each atomically."""
    out = Path(out)
    targets = [("png", out.with_suffix(".png"))]
    if pdf or out.suffix == ".pdf":
        targets.append(("pdf", out.with_suffix(".pdf")))
    written = []
    for fmt, path in targets:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        written.append(atomic_write_bytes(path, buf.getvalue()))
    return written


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
    pr = profiles[0].protocol
    cfg = pr["spectrum"]
    sizes = sorted({"×".join(map(str, p.protocol["input_size"])) for p in profiles})
    grids = sorted({"×".join(map(str, p.protocol["grid"])) for p in profiles})
    n = sorted({p.images["n_used"] for p in profiles})
    return (f"{pr['grid_mode']} grid ({', '.join(grids)}); input {', '.join(sizes)} px; "
            f"window {cfg['window'] or 'none'}; channel mean "
            f"{'removed' if cfg['remove_mean'] else 'kept'}; "
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
    ``peak`` by its largest non-DC ring; ``none`` keeps raw power (feature units², per cell). Returns the files written (PNG, and a
    PDF beside it when ``pdf``), each written atomically.
    """
    if not profiles:
        raise PrismError("nothing to plot: give at least one profile")
    if normalize not in NORMALIZE:
        raise PrismError(f"--normalize {normalize}: use one of {', '.join(NORMALIZE)}")
    for scale in (xscale, yscale):
        if scale not in ("log", "linear"):
            raise PrismError(f"axis scale {scale!r}: use log or linear")
    units = units or profiles[0].protocol["units"]
    if units not in ("cell", "pixel"):
        raise PrismError(f"--units {units}: use cell or pixel")

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": font_size}):
        fig, (ax, bx) = plt.subplots(1, 2, figsize=size, gridspec_kw={"width_ratios": [3, 2]})
        for i, p in enumerate(profiles):
            f, y, ci = _curve(p, units, normalize)
            keep = f > 0 if xscale == "log" else np.ones_like(f, dtype=bool)
            color = f"C{i % 10}"
            style = "--" if p.family == "pixel" else "-"
            ax.plot(f[keep], y[keep], style, color=color, lw=1.5,
                    label=f"{p.label} ({p.family})")
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
                   label=p.label, error_kw={"lw": 0.8})
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
