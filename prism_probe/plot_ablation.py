"""Reports of band-ablation sweeps: the rich table, the figure, and the files ``--out`` writes.

The figure has one panel per score (own-head, kNN, linear probe, cosine; or PSNR, SSIM for
latent ablation), score against cutoff, one colour per encoder and one line style per band
type, and each encoder's unablated score as a dotted horizontal line. Several encoders share
one figure; its caption states the mode, units, domain and image count from the profiles.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from .errors import PrismError
from .profile import Profile, atomic_write_bytes, profile_filename

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
STYLES = {"low": "-", "high": "--"}


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
    title = (f"Band ablation — mode {p0.protocol['ablation']['mode']}, cutoffs in "
             f"{p0.result['units']}, domain {p0.protocol['ablation']['domain']}")
    table = Table(title=title, caption="accuracies in %, on the images named in the profile")
    for col in ("encoder", "band", "cutoff"):
        table.add_column(col)
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
    names = [n for n in scores_of(profiles) if n not in ("psnr_vs_recon",)]
    if not names:
        raise PrismError("the ablation profiles hold no scores to plot")

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    p0 = profiles[0]
    ncol = min(len(names), 3)
    nrow = (len(names) + ncol - 1) // ncol
    with plt.rc_context({"font.size": font_size}):
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.2 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for i, p in enumerate(profiles):
                color = f"C{i % 10}"
                for band, style in STYLES.items():
                    pts = [(r["cutoff"], r["scores"][name]) for r in p.result["rows"]
                           if r["band"] == band and name in r["scores"]]
                    if pts:
                        xs, ys = zip(*sorted(pts))
                        ax.plot(xs, ys, style, marker="o", ms=3, color=color,
                                label=f"{p.label} {band}-pass")
                ref = p.result["unablated"].get(name)
                if ref is not None:
                    ax.axhline(ref, color=color, ls=":", lw=1, label=f"{p.label} unablated")
            ax.set_xlabel(f"cutoff ({p0.result['units']})")
            ax.set_ylabel(SCORES[name])
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(frameon=False, fontsize=font_size * 0.8)
        mode = p0.protocol["ablation"]["mode"]
        where = f" at {p0.protocol['ablation']['layer']}" if mode == "feature" else ""
        n = sorted({p.images.get("n_used") for p in profiles})
        fig.suptitle(f"Band ablation ({mode}{where}); low-pass keeps |f| ≤ cutoff, high-pass "
                     f"the rest; domain {p0.protocol['ablation']['domain']}; "
                     f"{'/'.join(map(str, n))} images", fontsize=font_size)
        fig.tight_layout()
        out = Path(out)
        targets = [("png", out.with_suffix(".png"))]
        if pdf or out.suffix == ".pdf":
            targets.append(("pdf", out.with_suffix(".pdf")))
        written = []
        for fmt, path in targets:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=150)
            written.append(atomic_write_bytes(path, buf.getvalue()))
        plt.close(fig)
    return written


def write_ablation_outputs(profiles: Sequence[Profile], out: str | Path) -> list[Path]:
    """One JSON profile per encoder (``ablation-LABEL.json``) and ``ablation.png``/``.pdf``."""
    out = Path(out)
    written = [p.save(out / ("ablation-" + profile_filename(p.label))) for p in profiles]
    written += plot_ablation(profiles, out / "ablation.png", pdf=True)
    return written
