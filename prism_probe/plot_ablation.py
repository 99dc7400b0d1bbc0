"""Reports of band-ablation sweeps: the rich table, the figure, and the files ``--out`` writes.

The figure has one panel per score (own-head, kNN, linear probe, cosine; or PSNR, SSIM for
latent ablation), score against cutoff, one colour per encoder and one line style per band
type (low-pass solid with round markers, high-pass long dashes with square markers, so they
differ in a small legend too), and each encoder's unablated score as a dotted horizontal line.
Several encoders share one figure; the legend sits below the panels, where it covers no line,
and the caption states the mode, units, domain and image count from the profiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import PrismError
from .plot import figure_targets, save_figure
from .profile import Profile, profile_filename

#: Scores in display order, with their axis labels.
SCORES = {
    "head_top1": "own head top-1 (%)",
    "knn_top1": "kNN top-1 (%)",
    "linear_top1": "linear probe top-1 (%)",
    "cosine": "cosine to unablated",
    "psnr": "PSNR vs image (dB)",
    "ssim": "SSIM vs image",
    "psnr_vs_recon": "PSNR vs reconstruction (dB)",
    "ssim_vs_recon": "SSIM vs reconstruction",
    "spectrum_high_share": "power share > 0.25 cyc/px",
}
#: Line style per band type: (dashes, marker). Matplotlib's "--" is too short to tell from a
#: solid line in a legend handle, hence explicit long dashes.
STYLES = {"low": ((0, ()), "o"), "high": ((0, (6, 3)), "s")}


def validate_ablation(p: Profile) -> None:
    """Refuse, in one line naming the file and field, an ablation profile that cannot be drawn."""
    name = getattr(p, "source", None) or f"the ablation profile of {p.label}"
    r = p.result if isinstance(p.result, dict) else {}
    for key, kind in (("unablated", dict), ("rows", list), ("units", str)):
        if not isinstance(r.get(key), kind):
            raise PrismError(f"{name}: result {key} is missing or malformed; is it a profile "
                             "from `ablate`?")
    ab = p.protocol.get("ablation")
    if not isinstance(ab, dict) or "mode" not in ab or "domain" not in ab:
        raise PrismError(f"{name}: protocol ablation (mode, domain) is missing")
    for i, row in enumerate(r["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("scores"), dict) \
                or "band" not in row or "cutoff" not in row:
            raise PrismError(f"{name}: result rows[{i}] lacks band, cutoff or scores")


def scores_of(profiles: Sequence[Profile]) -> list[str]:
    """The score names present in any profile, in :data:`SCORES` order."""
    names = set()
    for p in profiles:
        names |= set(p.result["unablated"])
        for row in p.result["rows"]:
            names |= set(row["scores"])
    return [s for s in SCORES if s in names]


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if name.startswith("psnr"):
        return f"{value:.2f}"
    if name.endswith("top1"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def ablation_table(profiles: Sequence[Profile]):
    """A rich table: one row per encoder × (band, cutoff), plus each encoder's unablated row."""
    from rich.table import Table

    if not profiles:
        return Table(title="no ablation profiles")
    p0 = profiles[0]
    names = scores_of(profiles)
    short = {"cycles per input pixel": "cycles/px", "cycles per cell": "cycles/cell",
             "cycles per latent cell": "cycles/latent cell"}.get(p0.result["units"],
                                                                  p0.result["units"])
    title = (f"Band ablation — {p0.protocol['ablation']['mode']}, "
             f"{p0.protocol['ablation']['domain']}")
    table = Table(title=title, caption=f"cutoffs in {p0.result['units']}; accuracies in %")
    table.add_column("encoder")
    table.add_column("band")
    table.add_column(f"cutoff ({short})", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for p in profiles:
        table.add_row(p.label, "unablated", "–",
                      *[_fmt(n, p.result["unablated"].get(n)) for n in names])
        for row in p.result["rows"]:
            cut = "–" if row["cutoff"] is None else f"{row['cutoff']:g}"
            table.add_row("", row["band"], cut,
                          *[_fmt(n, row["scores"].get(n)) for n in names])
    return table


def plot_ablation(profiles: Sequence[Profile], out: str | Path, *, pdf: bool = False,
                  font_size: float = 9.0) -> list[Path]:
    """Draw score against cutoff for every profile; returns the files written (atomically).

    Parameters
    ----------
    profiles : sequence of Profile
        Ablation profiles (kind ``"ablation"``) of one mode.
    out : path
        PNG file; a PDF beside it with ``pdf=True``.

    Returns
    -------
    list of Path
    """
    if not profiles:
        raise PrismError("nothing to plot: give at least one ablation profile")
    if any(p.kind != "ablation" for p in profiles):
        raise PrismError("plot_ablation draws profiles of kind 'ablation' (from `ablate`)")
    figure_targets(out, pdf)
    for p in profiles:
        validate_ablation(p)
    names = [n for n in scores_of(profiles) if n not in ("psnr_vs_recon",)]
    if not names:
        raise PrismError("the ablation profiles hold no scores to plot")

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    p0 = profiles[0]
    spectra = p0.result.get("spectra")
    n_panels = len(names) + (1 if spectra else 0)
    ncol = min(n_panels, 3)
    nrow = (n_panels + ncol - 1) // ncol
    with plt.rc_context({"font.size": font_size}):
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.2 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for i, p in enumerate(profiles):
                color = f"C{i % 10}"
                for band, (dashes, marker) in STYLES.items():
                    pts = [(r["cutoff"], r["scores"][name]) for r in p.result["rows"]
                           if r["band"] == band and name in r["scores"]
                           and r["cutoff"] is not None and r["scores"][name] is not None]
                    if pts:
                        xs, ys = zip(*sorted(pts))
                        ax.plot(xs, ys, linestyle=dashes, marker=marker, ms=4, color=color,
                                label=f"{p.label} {band}-pass")
                ref = p.result["unablated"].get(name)
                if ref is not None:
                    ax.axhline(ref, color=color, ls=":", lw=1, label=f"{p.label} unablated")
            ax.set_xlabel(f"cutoff ({p0.result['units']})")
            ax.set_ylabel(SCORES[name])
            ax.grid(True, alpha=0.3)
        if spectra:
            _plot_spectra(axes.flat[len(names)], p0)
        for ax in list(axes.flat)[n_panels:]:
            ax.axis("off")
        mode = p0.protocol["ablation"]["mode"]
        where = f" at {p0.protocol['ablation']['layer']}" if mode == "feature" else ""
        n = sorted({p.images.get("n_used") for p in profiles})
        fig.suptitle(f"Band ablation ({mode}{where}); low-pass keeps |f| ≤ cutoff, high-pass "
                     f"the rest; domain {p0.protocol['ablation']['domain']}; "
                     f"{'/'.join(map(str, n))} images", fontsize=font_size)
        # Below the panels: inside the first one, it covered the unablated line.
        handles, texts = axes.flat[0].get_legend_handles_labels()
        ncol_legend = min(len(texts), 3 * max(1, len(profiles))) or 1
        nrow_legend = -(-len(texts) // ncol_legend)
        bottom = min(0.4, (0.15 + 0.2 * nrow_legend) / (3.2 * nrow))  # inches → share
        fig.legend(handles, texts, loc="lower center", ncol=ncol_legend, frameon=False,
                   fontsize=font_size * 0.8, handlelength=3.5)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        written = save_figure(fig, out, pdf)
        plt.close(fig)
    return written


def _plot_spectra(ax, profile: Profile) -> None:
    """Radial spectra of the images, the unablated and the low-passed reconstructions."""
    import numpy as np

    sp = profile.result["spectra"]
    f = np.asarray(sp["freqs_pixel"], dtype=float)
    keep = f > 0
    power = sp["power"]
    low = sorted((float(k.split("@")[1]), k) for k in power if k.startswith("low@"))
    ax.plot(f[keep], np.asarray(power["image"])[keep], "k-", lw=2, label="images")
    ax.plot(f[keep], np.asarray(power["unablated"])[keep], "k:", lw=1.5,
            label="reconstruction")
    for i, (cut, key) in enumerate(low):
        ax.plot(f[keep], np.asarray(power[key])[keep], color=f"C{i % 10}", lw=1,
                label=f"low-pass {cut:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("radial frequency (cycles / image pixel)")
    ax.set_ylabel("power per ring")
    ax.set_title(f"{profile.label}: reconstructions' spectra", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False, fontsize="x-small")


def write_ablation_outputs(profiles: Sequence[Profile], out: str | Path) -> list[Path]:
    """One JSON profile per encoder (``ablation-LABEL.json``) and ``ablation.png``/``.pdf``."""
    out = Path(out)
    written = [p.save(out / ("ablation-" + profile_filename(p.label))) for p in profiles]
    written += plot_ablation(profiles, out / "ablation.png", pdf=True)
    return written
