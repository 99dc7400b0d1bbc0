"""Figures and output files of video and sequence profiles (the image figure is in plot.py).

Video: spatial radial spectrum, temporal spectrum (cycles per frame, so tubelet models and
per-frame encoders share an axis) and the (temporal × spatial frequency) map of the first
profile. Sequences: each profile's last-layer spectrum along tokens, and the low-band share of
every layer against relative depth. Spectra are divided by their mean power per cell (white
noise of the same variance reads 1), as the image figure does, so encoders of different widths
share an axis. Every figure states its protocol in a caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PrismError
from .plot import save_figure
from .profile import Profile, profile_filename


def modality(profile: Profile) -> str:
    """``image`` for profiles that record none (everything measured before modalities)."""
    return profile.protocol.get("modality", "image")


def _white_scale_video(r: dict) -> float:
    tp = np.asarray(r["temporal_power"], float)
    tc = np.asarray(r["temporal_counts"], float)
    scale = float((tp * tc).sum() / tc.sum())
    return scale if scale > 0 else 1.0


def plot_video_profiles(profiles: Sequence[Profile], out: str | Path, *, pdf: bool = False,
                        size=(13.0, 4.0), font_size: float = 9.0) -> list[Path]:
    """Spatial spectrum, temporal spectrum and spatiotemporal map of video profiles."""
    if not profiles:
        raise PrismError("nothing to plot: give at least one profile")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": font_size}):
        fig, (ax, tx, mx) = plt.subplots(1, 3, figsize=size)
        for i, p in enumerate(profiles):
            r, color = p.result, f"C{i % 10}"
            scale = _white_scale_video(r)
            f = np.asarray(r["freqs"], float)
            keep = f > 0
            ax.loglog(f[keep], np.asarray(r["power"], float)[keep] / scale, color=color,
                      label=f"{p.label}" + (" (per frame)" if p.protocol.get("per_frame")
                                            else ""))
            ft = np.asarray(r["temporal_freqs_frame"], float)
            tx.plot(ft, np.asarray(r["temporal_power"], float) / scale, "o-", color=color,
                    label=p.label)
        for a in (ax, tx):
            a.axhline(1.0, color="0.5", lw=0.8, ls=":")
            a.grid(True, which="both", alpha=0.3)
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("spatial radial frequency (cycles / grid cell)")
        ax.set_ylabel("power / mean power per cell (white = 1)")
        ax.set_title("Spatial spectrum (all temporal frequencies)")
        ax.legend(frameon=False)
        tx.set_yscale("log")
        tx.set_xlabel("temporal frequency |f_t| (cycles / frame)")
        tx.set_title("Temporal spectrum (all spatial cells)")
        first = profiles[0].result
        m = np.asarray(first["power_map"], float) / _white_scale_video(first)
        fs, ft = np.asarray(first["freqs"], float), np.asarray(first["temporal_freqs_frame"])
        im = mx.imshow(np.log10(np.maximum(m, 1e-12)), origin="lower", aspect="auto",
                       extent=(fs[0], fs[-1], ft[0], ft[-1]), cmap="viridis")
        fig.colorbar(im, ax=mx, label="log10 power / mean per cell")
        mx.set_xlabel("spatial frequency (cycles / cell)")
        mx.set_ylabel("temporal frequency (cycles / frame)")
        mx.set_title(f"Map: {profiles[0].label}")
        pr = profiles[0].protocol
        cfg = pr["spectrum"]
        caption = (f"clips of {pr['frames']} frames (step {pr['frame_step']}); grids "
                   f"{', '.join('×'.join(map(str, p.protocol['feature_grid'])) for p in profiles)}"
                   f" (t×h×w); spatial window {cfg['window'] or 'none'}, temporal window "
                   f"{cfg['temporal_window'] or 'none'}; channel mean per frame "
                   f"{'removed' if cfg['remove_mean'] else 'kept'}; "
                   f"{'/'.join(str(p.images['n_used']) for p in profiles)} clips")
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=font_size * 0.8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        written = save_figure(fig, out, pdf)
        plt.close(fig)
    return written


def plot_sequence_profiles(profiles: Sequence[Profile], out: str | Path, *, pdf: bool = False,
                           size=(10.0, 4.0), font_size: float = 9.0) -> list[Path]:
    """Last-layer token spectra and per-layer low-band share of sequence profiles."""
    if not profiles:
        raise PrismError("nothing to plot: give at least one profile")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": font_size}):
        fig, (ax, lx) = plt.subplots(1, 2, figsize=size, gridspec_kw={"width_ratios": [3, 2]})
        for i, p in enumerate(profiles):
            r, color = p.result, f"C{i % 10}"
            f = np.asarray(r["freqs"], float)
            last = r["layers"][-1]
            y = np.asarray(last["power"], float)
            have = np.asarray(last["bin_sequences"]) > 0
            scale = float(y[have].mean()) if have.any() and y[have].mean() > 0 else 1.0
            keep = (f > 0) & have
            ax.loglog(f[keep], y[keep] / scale, color=color,
                      label=f"{p.label} ({r['layer_names'][-1]})")
            share = [layer["summaries"]["low_band_share"]["mean"] for layer in r["layers"]]
            depth = np.linspace(0, 1, len(share))
            lx.plot(depth, share, "o-", color=color, label=p.label)
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("frequency along tokens (cycles / token)")
        ax.set_ylabel("power / mean power per bin (white = 1)")
        ax.set_title("Token-axis spectrum, last layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(frameon=False)
        cut = profiles[0].protocol["spectrum"]["low_cutoff"]
        lx.set_xlabel("relative depth (embeddings = 0, last layer = 1)")
        lx.set_ylabel(f"low-band share (f ≤ {cut:g} cycles / token)")
        lx.set_title("Low-frequency share by layer")
        lx.grid(True, alpha=0.3)
        cfg = profiles[0].protocol["spectrum"]
        caption = (f"valid tokens only (special tokens and padding excluded); bins of "
                   f"1/{cfg['resolution']} cycles per token; window {cfg['window'] or 'none'};"
                   f" channel mean {'removed' if cfg['remove_mean'] else 'kept'}; "
                   f"{'/'.join(str(p.images['n_used']) for p in profiles)} sequences")
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=font_size * 0.8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        written = save_figure(fig, out, pdf)
        plt.close(fig)
    return written


def plot_any(profiles: Sequence[Profile], out: str | Path, *, pdf: bool = False) -> list[Path]:
    """The figure for profiles of one modality; refuses a mixture (their axes differ)."""
    kinds = sorted({modality(p) for p in profiles})
    if len(kinds) != 1:
        raise PrismError(f"profiles of different modalities ({', '.join(kinds)}) do not share "
                         "a figure; plot each modality on its own")
    if kinds[0] == "video":
        return plot_video_profiles(profiles, out, pdf=pdf)
    if kinds[0] == "sequence":
        return plot_sequence_profiles(profiles, out, pdf=pdf)
    from .plot import plot_profiles

    return plot_profiles(profiles, out, pdf=pdf)


def write_outputs_nd(profiles: Sequence[Profile], out: str | Path) -> list[Path]:
    """One JSON profile per encoder and the modality's figure (PNG and PDF) into ``out``."""
    out = Path(out)
    written = [p.save(out / profile_filename(p.label)) for p in profiles]
    written += plot_any(profiles, out / "spectra.png", pdf=True)
    return written
