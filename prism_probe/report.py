"""Reports: the rich table of a run and the files ``--out`` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .profile import Profile, profile_filename


def summary(profile: Profile, key: str) -> tuple[float, float | None, float | None] | None:
    """(mean, low, high) of a per-image summary: its mean and 95 % interval over images.

    None when no image had power to summarise (every map constant, e.g. blank images); low and
    high are None when the interval is undefined (a single image).
    """
    s = profile.result["summaries"].get(key)
    if s is None or s.get("mean") is None:
        return None
    lo, hi = s["ci95"] if s.get("ci95") is not None else (None, None)
    return s["mean"], lo, hi


def unit_label(units: str) -> str:
    return "cycles/px" if units == "pixel" else "cycles/cell"


def spectrum_table(profiles: Sequence[Profile]):
    """One row per encoder: family, grid, images used, low-band share, centroid, slope."""
    from rich.table import Table

    if not profiles:
        return Table(title="no profiles")
    p0 = profiles[0].protocol
    units = p0["units"]
    cfg = p0["spectrum"]
    cut = cfg["low_cutoff"]
    fmin, fmax = cfg["slope_range"]
    title = (f"Feature spectra — {p0['grid_mode']} grid, window {cfg['window'] or 'none'}, "
             f"mean {'removed' if cfg['remove_mean'] else 'kept'}, frequencies in "
             f"{unit_label(units)}")
    table = Table(title=title, caption="values: mean over images [95 % interval]")
    table.add_column("encoder")
    table.add_column("family")
    table.add_column("input")
    table.add_column("grid")
    table.add_column("images", justify="right")
    table.add_column(f"low share (≤{cut:g})", justify="right")
    table.add_column(f"centroid ({unit_label(units)})", justify="right")
    table.add_column(f"slope ({fmin:g}–{fmax:g})", justify="right")
    table.add_column("e(1)", justify="right")
    for p in profiles:
        pr = p.protocol
        n_used = str(p.images["n_used"])
        if p.result.get("n_zero_power"):
            n_used += f" ({p.result['n_zero_power']} constant)"
        row = [p.label, p.family, "×".join(str(s) for s in pr["input_size"]),
               "×".join(str(s) for s in pr["grid"]), n_used]
        centroid = "centroid_pixel" if units == "pixel" else "centroid"
        for key, fmt in (("low_band_share", "{:.3f}"), (centroid, "{:.3f}"), ("slope", "{:.2f}")):
            stats = summary(p, key)
            if stats is None:
                row.append("n/a (zero power)")
                continue
            m, lo, hi = stats
            if lo is None:
                row.append(f"{fmt.format(m)} (no interval: 1 image)")
            else:
                row.append(f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]")
        e = p.result.get("dct_band_energy") or []
        row.append(f"{e[0]:.3f}" if e else "–")
        table.add_row(*row)
    return table


def write_outputs(profiles: Sequence[Profile], out: str | Path) -> list[Path]:
    """Write one JSON profile per encoder and the comparison figure (PNG and PDF) into ``out``."""
    from .plot import plot_profiles

    out = Path(out)
    written = [p.save(out / profile_filename(p.label)) for p in profiles]
    written += plot_profiles(profiles, out / "spectra.png", pdf=True)
    return written
