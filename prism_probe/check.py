"""Regression checks of spectral profiles: does a new measurement agree with a baseline?

>>> from prism_probe.check import compare, Tolerances
>>> result = compare(Profile.load("new.json"), Profile.load("baseline.json"))  # doctest: +SKIP
>>> result.status, result.exit_code                                          # doctest: +SKIP
('drifted', 1)

Three outcomes:

- ``ok`` (exit 0): every number of the result agrees with the baseline within tolerance.
- ``drifted`` (exit 1): the set-ups agree but some numbers moved; each move is reported with the
  quantity, the frequency it sits at (ring centre, or a DCT band's frequency range) and by how
  much, worst first.
- ``incomparable`` (exit 2): the two measurements differ in something the profile records (kind,
  encoder entry, weights, preprocessing, protocol, units, grid, image set), so a difference in
  the numbers would mean nothing; every differing field is named.

Tolerances. A value ``v`` agrees with its baseline ``b`` when ``|v - b| <= atol + rtol * |b|``
(numpy's ``isclose`` with the baseline as reference). Ring power spans decades, so it is compared
in log space: ``|ln v - ln b| <= log_atol`` (``log_atol`` defaults to ``rtol``, to which it is
equal for small moves); two powers both below ``atol`` agree. Tolerances are set per quantity by
a dotted key of the result (``power``, ``dct_band_energy``, ``summaries.slope``; the longest
matching key wins), or for everything at once. The defaults (``rtol = 1e-4``, ``atol = 1e-7``)
are float tolerance: they pass a re-run with another batch size, thread count or CPU, and fail
any change of the model, the preprocessing or the measure that the spectrum can see.

Values that are not numbers. A NaN in a compared value of either profile is a drift (NaN equals
nothing, itself included), as is an infinite value (on either side, or both); an interval or
spread that is undefined (``null``, e.g. the ``ci95`` of a one-image profile) on one side only is
a drift that says so, and ``null`` on both sides agrees. ``--json`` writes such values as the
strings ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has no numbers for them), a missing value as
``null``.

What a spectrum cannot see: a change that keeps every channel's power at every radial frequency,
such as transposing a square token grid (rows read as columns), or permuting channels. Such a
change passes the check.

Determinism. On CPU, a profile is bit-for-bit reproducible given the same weights, images (the
order is fixed by :func:`prism_probe.data.collect_images`), protocol, batch size, intra-op thread
count and library versions. Batch size and thread count can change float sums by about 1e-7
relative (oneDNN splits a convolution's work differently), which the default tolerances absorb;
:func:`reproducible` pins the thread count and turns on torch's deterministic algorithms, and the
profile's ``environment`` records both so that a mismatch explains itself.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import PrismError
from .profile import Profile

STATUS_CODES = {"ok": 0, "drifted": 1, "incomparable": 2}

# Quantities compared in log space by default.
LOG_KEYS = ("power",)
# Result keys that describe the measurement's layout rather than measure anything: when they
# differ, the profiles are incomparable.
STRUCTURAL_KEYS = ("freqs", "freqs_pixel", "ring_counts", "corner_count", "dct_band_sizes",
                   "grid", "config", "n_images", "interval_method")
# Other names people use for the same quantities.
ALIASES = {"dct_energy": "dct_band_energy", "e": "dct_band_energy", "log_power": "power"}
# Environment entries worth naming when a check drifts.
ENVIRONMENT_KEYS = ("torch", "numpy", "timm", "open_clip_torch", "transformers", "diffusers",
                    "pillow", "python", "device", "world_size", "batch_size", "threads",
                    "deterministic_algorithms")
MAX_ROWS = 25
# Uncertainty measures: reported after the measures themselves, which say where the spectrum moved.
SECONDARY_SUFFIXES = ("stderr", ".ci95", ".std", ".n")


# ------------------------------------------------------------------------------------------------
# Tolerances


@dataclass(frozen=True)
class Tolerance:
    """How far one quantity may move.

    Parameters
    ----------
    rtol, atol : float
        Agreement when ``|v - b| <= atol + rtol * |b|``.
    log_atol : float, optional
        When set, compare ``ln v`` with ``ln b`` instead: ``|ln v - ln b| <= log_atol``.
    skip : bool
        Do not compare this quantity at all.
    """

    rtol: float = 1e-4
    atol: float = 1e-7
    log_atol: float | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "log_atol"):
            value = getattr(self, name)
            if value is None and name == "log_atol":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PrismError(f"tolerance {name}={value!r} must be a number >= 0")

    def allowed(self, baseline: float) -> float:
        """The largest move allowed from ``baseline`` (in log units when log_atol is set)."""
        if self.log_atol is not None:
            return self.log_atol
        return self.atol + self.rtol * abs(baseline)

    def describe(self) -> str:
        if self.skip:
            return "skipped"
        if self.log_atol is not None:
            return f"|Δln| ≤ {self.log_atol:g}"
        return f"atol {self.atol:g} + rtol {self.rtol:g}"


_FIELDS = ("rtol", "atol", "log_atol", "skip")


@dataclass(frozen=True)
class Tolerances:
    """A default :class:`Tolerance` and overrides per dotted result key.

    Parameters
    ----------
    default : Tolerance
        For every quantity without an override. Log-space keys (``power``) get
        ``log_atol = default.rtol`` unless overridden.
    per_key : mapping of str to Tolerance
        ``{"power": Tolerance(log_atol=0.05), "summaries.slope": Tolerance(atol=0.02)}``; a key
        covers everything below it (``summaries.slope`` covers its mean, ci95 and std).
    """

    default: Tolerance = Tolerance()
    per_key: Mapping[str, Tolerance] = field(default_factory=dict)

    @classmethod
    def from_options(cls, rtol: float | None = None, atol: float | None = None,
                     file: str | Path | None = None) -> "Tolerances":
        """Tolerances from the command line: ``--rtol``, ``--atol`` and a YAML file.

        The file is a mapping of dotted keys to ``{rtol, atol, log_atol, skip}``; the key
        ``default`` sets the default. ``--rtol``/``--atol`` override the file's default.
        """
        tol = cls.from_file(file) if file is not None else cls()
        changes = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
        return replace(tol, default=replace(tol.default, **changes)) if changes else tol

    @classmethod
    def from_file(cls, path: str | Path) -> "Tolerances":
        """Read a YAML (or JSON) file of per-key tolerances (see :meth:`from_mapping`)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise PrismError(f"{path}: cannot read the tolerances file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise PrismError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_mapping(data or {}, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "tolerances") -> "Tolerances":
        """``{"default": {"rtol": 1e-3}, "power": {"log_atol": 0.05}, "power_stderr": "skip"}``.

        A value is a mapping of ``rtol``, ``atol``, ``log_atol``, ``skip``, or the word ``skip``.
        """
        if not isinstance(data, Mapping):
            raise PrismError(f"{source}: expected a mapping of result keys to tolerances, e.g. "
                             "'power: {log_atol: 0.05}'")
        default = Tolerance()
        raw_default = data.get("default")
        if raw_default is not None:
            default = _tolerance(raw_default, Tolerance(), f"{source}: default")
        per_key = {}
        for key, value in data.items():
            if key == "default":
                continue
            name = _canonical(str(key))
            per_key[name] = _tolerance(value, default, f"{source}: {key}", log=_is_log(name))
        return cls(default, per_key)

    def for_path(self, path: str) -> Tolerance:
        """The tolerance of the value at dotted ``path`` (list indices stripped)."""
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in self.per_key:
                return self.per_key[key]
        if _is_log(path):
            return replace(self.default, log_atol=self.default.rtol)
        return self.default

    def unused_keys(self, paths: set[str]) -> list[str]:
        """Override keys that match no quantity of the result (most likely a typo)."""
        return sorted(k for k in self.per_key
                      if not any(p == k or p.startswith(k + ".") for p in paths))


def _canonical(key: str) -> str:
    head, _, rest = key.partition(".")
    head = ALIASES.get(head, head)
    return f"{head}.{rest}" if rest else head


def _is_log(path: str) -> bool:
    return path.split(".")[0] in LOG_KEYS


def _tolerance(value: Any, base: Tolerance, where: str, log: bool = False) -> Tolerance:
    if value == "skip":
        return replace(base, skip=True)
    if not isinstance(value, Mapping):
        raise PrismError(f"{where}: expected a mapping such as {{atol: 0.002}} or 'skip', "
                         f"got {value!r}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise PrismError(f"{where}: unknown tolerance field(s) {', '.join(unknown)}; use "
                         f"{', '.join(_FIELDS)}")
    tol = replace(base, **{k: value[k] for k in _FIELDS if k in value})
    if log and "log_atol" not in value and tol.log_atol is None:
        # A log-space quantity stays in log space unless told otherwise; rtol reads as a
        # relative move there.
        tol = replace(tol, log_atol=tol.rtol)
    return tol


# ------------------------------------------------------------------------------------------------
# The comparison


@dataclass(frozen=True)
class Move:
    """One value that moved beyond its tolerance.

    Attributes
    ----------
    quantity : str
        Dotted key of the result (``power``, ``summaries.slope.mean``).
    index : int or None
        Position in the quantity's list (ring, band), None for a scalar.
    where : str
        The frequency the value sits at, in words (``"ring 0.375"``, ``"band 2 (0.14–0.25)"``;
        units in :attr:`CheckResult.units`), or ``""``.
    frequency : float or None
        The ring centre (or a band's middle frequency) in the profile's units.
    baseline, value : float or None
        The baseline's and the profile's value (None where one of them has no value).
    change : float
        ``value - baseline``, or ``ln value - ln baseline`` for log-space quantities.
    allowed : float
        The largest change the tolerance allows (same units as ``change``).
    log : bool
        Whether ``change`` is in log space.
    reason : str
        Why the values cannot be told apart by a number (``"not a number"``, ``"undefined in
        the baseline (1 image)"``), or ``""``.
    """

    quantity: str
    index: int | None
    where: str
    frequency: float | None
    baseline: float | None
    value: float | None
    change: float
    allowed: float
    log: bool
    reason: str = ""

    @property
    def excess(self) -> float:
        """``|change| / allowed``: how many tolerances away (inf for a zero tolerance, and
        for a change that is not a number: NaN would compare as within any tolerance)."""
        if math.isnan(self.change):
            return math.inf
        if self.allowed > 0:
            return abs(self.change) / self.allowed
        return math.inf if self.change else 0.0

    @property
    def secondary(self) -> bool:
        """Whether this is an uncertainty measure (standard error, interval, std)."""
        return self.quantity.endswith(SECONDARY_SUFFIXES)

    @property
    def relative(self) -> float | None:
        """``value / baseline - 1``, or None when the baseline is zero or missing."""
        if self.baseline in (None, 0) or self.value is None:
            return None
        rel = self.value / self.baseline - 1.0
        return rel if math.isfinite(rel) else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``baseline``/``value`` that are NaN or infinite become ``"nan"``,
        ``"inf"``, ``"-inf"``; ``change``/``excess`` that are not finite become null."""
        return {"quantity": self.quantity, "index": self.index, "where": self.where,
                "frequency": _json_number(self.frequency),
                "baseline": _json_number(self.baseline), "value": _json_number(self.value),
                "change": _finite(self.change), "log_space": self.log,
                "relative_change": self.relative, "allowed": _json_number(self.allowed),
                "excess": _finite(self.excess), "reason": self.reason or None}


@dataclass
class CheckResult:
    """The outcome of :func:`compare`.

    Attributes
    ----------
    status : str
        ``"ok"``, ``"drifted"`` or ``"incomparable"``.
    differences : list of str
        For ``incomparable``: each differing field, ``"<field>: <profile> vs <baseline>"``.
    moves : list of Move
        For ``drifted``: the values beyond tolerance, worst first.
    n_checked : int
        How many numbers were compared.
    largest : Move or None
        The value nearest its tolerance (or beyond it), for the ``ok`` message.
    notes : list of str
        Environment differences (library versions, threads, batch size, device) that may
        explain a drift, and tolerance keys that matched nothing.
    labels : (str, str)
        Profile and baseline labels (file names when loaded from files).
    """

    status: str
    differences: list[str] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    n_checked: int = 0
    largest: Move | None = None
    notes: list[str] = field(default_factory=list)
    labels: tuple[str, str] = ("profile", "baseline")
    units: str = "cycles/cell"

    @property
    def exit_code(self) -> int:
        return STATUS_CODES[self.status]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def headline(self) -> str:
        """One line: the status and, for a drift, where the spectrum moved most."""
        prof, base = self.labels
        if self.status == "incomparable":
            # Field names only: the values are in the table (or the lines) that go with it,
            # and repeating them here made one very long line.
            names = [d.partition(": ")[0] for d in self.differences]
            return (f"incomparable: {prof} and {base} differ in {len(self.differences)} "
                    f"recorded field(s): " + ", ".join(names))
        if self.status == "ok":
            tail = ""
            if self.largest is not None and self.largest.change:
                tail = (f"; largest move {_fmt_change(self.largest)} in "
                        f"{self._place(self.largest)} ({self.largest.excess:.2g} of its "
                        "tolerance)")
            return f"ok: {self.n_checked} values of {prof} agree with {base}{tail}"
        worst = self.moves[0]
        how = worst.reason or f"{_fmt_change(worst)}, allowed {worst.allowed:.2g}"
        return (f"drifted: {len(self.moves)} of {self.n_checked} values of {prof} moved beyond "
                f"tolerance from {base}; worst {self._place(worst)}: {_fmt(worst.baseline)} → "
                f"{_fmt(worst.value)} ({how})")

    def _at(self, m: Move) -> str:
        """`` at ring 0.25 cycles/cell``; no units for a position that is not a frequency."""
        if not m.where:
            return ""
        return f" at {m.where}" + (f" {self.units}" if m.frequency is not None else "")

    def _place(self, m: Move) -> str:
        return m.quantity + self._at(m)

    def summary_lines(self) -> list[str]:
        """One line per measure that moved: how many of its values, and where most; then one
        line naming the uncertainty measures (standard errors, intervals) that moved."""
        by_quantity: dict[str, list[Move]] = {}
        for m in self.moves:
            by_quantity.setdefault(m.quantity, []).append(m)
        lines, secondary = [], []
        for quantity, moves in by_quantity.items():
            worst = max(moves, key=lambda m: m.excess)
            if worst.secondary:
                secondary.append(quantity)
                continue
            count = f"{len(moves)} value(s) moved, most" if len(moves) > 1 else "moved"
            if worst.reason:
                count = f"{len(moves)} value(s) failed, first" if len(moves) > 1 else "failed"
            how = worst.reason or f"{_fmt_change(worst)}, {worst.excess:.3g}× the tolerance"
            lines.append(f"{quantity}: {count}{self._at(worst)} ({how})")
        if secondary:
            lines.append("uncertainties moved too: " + ", ".join(secondary))
        return lines

    def message(self) -> str:
        """The headline, the per-quantity lines and the notes, as plain text."""
        lines = [self.headline()]
        if self.status == "drifted":
            lines += ["  " + s for s in self.summary_lines()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self):
        """A rich Table of the moves (worst first, at most 25 rows), or of the differences."""
        from rich import box
        from rich.table import Table

        prof, base = self.labels
        if self.status == "incomparable":
            table = Table(title=f"{prof} cannot be compared with {base}")
            table.add_column("field")
            table.add_column("profile")
            table.add_column("baseline")
            for d in self.differences:
                name, _, rest = d.partition(": ")
                mine, _, theirs = rest.partition(" vs ")
                table.add_row(name, mine, theirs)
            return table
        title = (f"{prof} vs {base}: {len(self.moves)} of {self.n_checked} values beyond "
                 "tolerance" if self.moves else f"{prof} vs {base}: all {self.n_checked} values "
                 "within tolerance")
        table = Table(title=title, box=box.SIMPLE_HEAD, caption="Δ: change from the baseline "
                      f"(Δln: in log space); × tol: |Δ| over the allowed move; frequencies in "
                      f"{self.units}; summaries are means over images")
        for col in ("quantity", "at", "baseline", "now", "Δ", "rel.", "× tol"):
            table.add_column(col, justify="left" if col in ("quantity", "at") else "right",
                             no_wrap=True, overflow="ellipsis")
        for m in self.moves[:MAX_ROWS]:
            rel = m.relative
            change = m.reason or ("Δln " if m.log else "") + f"{m.change:+.3g}"
            table.add_row(_short_name(m.quantity), m.where or "—", _fmt(m.baseline),
                          _fmt(m.value), change, "—" if rel is None else f"{100 * rel:+.3g} %",
                          f"{m.excess:.3g}")
        if len(self.moves) > MAX_ROWS:
            table.add_row(f"… {len(self.moves) - MAX_ROWS} more (see --json)", *[""] * 6)
        return table

    def render(self, width: int = 110) -> str:
        """The table and the message as plain text (for logs and pytest failures)."""
        import io

        from rich.console import Console

        console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
        if self.status != "ok":
            console.print(self.table())
        console.print(self.message(), markup=False, highlight=False)
        return console.export_text()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as strings: :meth:`Move.to_dict`)."""
        return {"status": self.status, "exit_code": self.exit_code, "profile": self.labels[0],
                "baseline": self.labels[1], "message": self.headline(),
                "differences": list(self.differences), "n_checked": self.n_checked,
                "n_moved": len(self.moves), "moves": [m.to_dict() for m in self.moves],
                "largest": None if self.largest is None else self.largest.to_dict(),
                "frequency_units": self.units, "notes": list(self.notes)}


def compare(profile: Profile, baseline: Profile, tolerances: Tolerances | None = None, *,
            labels: tuple[str, str] | None = None) -> CheckResult:
    """Compare a profile with a baseline profile.

    Parameters
    ----------
    profile, baseline : Profile
        Two spectrum (or two ablation) profiles; ``baseline`` is the reference.
    tolerances : Tolerances, optional
        Per-quantity tolerances; default float tolerance (module docstring).
    labels : (str, str), optional
        Names for messages (default: the encoder labels).

    Returns
    -------
    CheckResult
        ``incomparable`` when :meth:`Profile.comparable_with`, the preprocessing, the number of
        images used or the result's layout (ring centres, band sizes) differ; else ``drifted``
        when any compared value is beyond its tolerance; else ``ok``.

    Raises
    ------
    PrismError
        A tolerance key matches no quantity of the result.
    """
    tolerances = tolerances or Tolerances()
    labels = labels or (profile.label, baseline.label)
    units = "cycles/px" if profile.protocol.get("units") == "pixel" else "cycles/cell"

    differences = set_up_differences(profile, baseline)
    mine, theirs = dict(_leaves(profile.result)), dict(_leaves(baseline.result))
    differences += _layout_differences(mine, theirs)
    notes = _environment_notes(profile, baseline)
    if differences:
        return CheckResult("incomparable", differences=differences, notes=notes, labels=labels,
                           units=units)

    quantities = {_strip(p) for p in mine} | {_strip(p) for p in theirs}
    unused = tolerances.unused_keys(quantities)
    if unused:
        raise PrismError(f"tolerance key(s) {', '.join(unused)} match no quantity of the "
                         f"result; known: {', '.join(sorted(_top_keys(quantities)))}")

    axis = _FrequencyAxis(profile)
    moves, n_checked, largest = [], 0, None
    for path in _ordered(mine, theirs):
        quantity = _strip(path)
        if quantity.split(".")[0] in STRUCTURAL_KEYS:
            continue
        tol = tolerances.for_path(quantity)
        a, b = mine.get(path, _MISSING), theirs.get(path, _MISSING)
        if tol.skip or not (_is_number(a) or _is_number(b) or a is None or b is None):
            continue
        if (a is _MISSING and b is None and _has_items(mine, path)) or \
                (b is _MISSING and a is None and _has_items(theirs, path)):
            continue  # a null interval against a list: its items say so, one row each
        n_checked += 1
        move = _compare_value(path, quantity, a, b, tol, axis)
        if move is not None and not move.reason:
            for side, values, prof in (("profile", mine, profile),
                                       ("baseline", theirs, baseline)):
                if _undefined(values, path):
                    move = replace(move, reason=_undefined_reason(side, prof))
                    break
        if move is None:
            continue
        if move.excess > 1.0:
            moves.append(move)
        if largest is None or move.excess > largest.excess:
            largest = move
    # The measures first (they say where the spectrum moved), their uncertainties after.
    moves.sort(key=lambda m: (m.secondary, -m.excess))
    status = "drifted" if moves else "ok"
    if status == "ok":
        notes = []  # environment differences that changed nothing are not worth a line
    return CheckResult(status, moves=moves, n_checked=n_checked, largest=largest, notes=notes,
                       labels=labels, units=units)


def set_up_differences(profile: Profile, baseline: Profile) -> list[str]:
    """Recorded set-up fields that differ: :meth:`Profile.comparable_with`, plus the
    preprocessing and the number of images used (``"<field>: <profile> vs <baseline>"``)."""
    diffs = list(profile.comparable_with(baseline))
    pa, pb = profile.encoder.get("preprocess"), baseline.encoder.get("preprocess")
    if pa != pb:
        diffs.append(f"encoder preprocess: {pa!r} vs {pb!r}")
    na, nb = profile.images.get("n_used"), baseline.images.get("n_used")
    if na != nb:
        diffs.append(f"images used: {na} vs {nb}")
    return diffs


def load_and_compare(profile: str | Path, baseline: str | Path,
                     tolerances: Tolerances | None = None) -> CheckResult:
    """:func:`compare` two profile files, labelled by their file names."""
    return compare(Profile.load(profile), Profile.load(baseline), tolerances,
                   labels=(str(profile), str(baseline)))


# ------------------------------------------------------------------------------------------------
# Baselines


def _portable(profile: Profile) -> Profile:
    """The profile with local weight paths cut to their file name.

    A baseline is kept in version control and checked on other machines; the weights are
    identified by their sha256, so the folder they were read from on this machine is noise.
    """
    weights = profile.encoder.get("weights") or {}
    loc = weights.get("location")
    if weights.get("source") in ("file", "url") and loc and Path(loc).is_absolute():
        encoder = {**profile.encoder, "weights": {**weights, "location": Path(loc).name}}
        profile = replace(profile, encoder=encoder)
    return profile


def write_baseline(profile: Profile, path: str | Path, *, force: bool = False) -> str:
    """Write ``profile`` as the baseline at ``path``.

    Parameters
    ----------
    profile : Profile
    path : str or Path
    force : bool
        Replace a baseline of another set-up (kind, encoder entry, protocol), or a file that is
        not a readable profile.

    Returns
    -------
    str
        ``"created"``, ``"updated"`` (values or weights/images changed), or ``"unchanged"``: the
        existing baseline already holds these exact numbers and set-up, and is left untouched so
        that re-running does not churn a file kept in version control.

    Raises
    ------
    PrismError
        ``path`` holds a baseline of another set-up, or an unreadable one, and ``force`` is off.
    """
    path = Path(path)
    profile = _portable(profile)
    if not path.exists():
        profile.save(path)
        return "created"
    try:
        old = Profile.load(path)
    except PrismError as exc:
        if not force:
            raise PrismError(f"{exc}; pass --force to replace it with a new baseline") from None
        profile.save(path)
        return "updated"
    protocol = [d for d in set_up_differences(profile, old)
                if not d.startswith(("weights:", "image set:", "images used:"))]
    if protocol and not force:
        raise PrismError(f"{path} is a baseline of another set-up ({'; '.join(protocol)}); "
                         "pass --force to replace it, or write the new baseline elsewhere")
    if not protocol and not set_up_differences(profile, old) and profile.result == old.result:
        return "unchanged"
    profile.save(path)
    return "updated"


# ------------------------------------------------------------------------------------------------
# Determinism


@contextmanager
def reproducible(threads: int | None = None) -> Iterator[None]:
    """Run the enclosed measurement as reproducibly as torch allows; restore settings after.

    Turns on ``torch.use_deterministic_algorithms`` (``warn_only``, so an op without a
    deterministic implementation warns instead of failing), turns off cuDNN autotuning, and
    with ``threads`` pins torch's intra-op thread count (which can change float sums on CPU:
    module docstring). ``CUBLAS_WORKSPACE_CONFIG`` is set for CUDA matmuls if not set already;
    it only takes effect when CUDA has not been initialised yet in this process.
    """
    import torch

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise PrismError(f"threads={threads!r} must be a positive integer")
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.get_num_threads())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:4]
        torch.set_num_threads(saved[4])


def measure_baseline(encoder: str, images=None, *, threads: int | None = None,
                     **options) -> Profile:
    """Measure one encoder for a baseline, under :func:`reproducible`.

    Parameters
    ----------
    encoder : str
        A registry name (or ``random:NAME``, ``pixels:P``).
    images
        Any image source :func:`prism_probe.measure.measure_spectra` accepts.
    threads : int, optional
        Pin torch's intra-op thread count while measuring.
    **options
        Passed to :func:`prism_probe.measure.measure_spectra` (``weights_dir``, ``image_size``,
        ``limit``, ``seed``, ``config``, ``grid``, ``units``, ``batch_size``, ``device``, …).
    """
    from .measure import measure_spectra

    if not isinstance(encoder, str):
        raise PrismError(f"encoder {encoder!r}: pass one registry name (a string)")
    with reproducible(threads):
        (profile,) = measure_spectra([encoder], images, **options)
    return profile


# ------------------------------------------------------------------------------------------------
# Helpers

_MISSING = object()


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path with [i] indices, value) of every leaf of a JSON-like structure."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{prefix}[{i}]")
        if not obj:
            yield prefix, []
    else:
        yield prefix, obj


def _strip(path: str) -> str:
    """``power[3]`` → ``power``; ``summaries.slope.ci95[0]`` → ``summaries.slope.ci95``."""
    out, depth = [], 0
    for ch in path:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _index(path: str) -> int | None:
    if not path.endswith("]"):
        return None
    return int(path[path.rindex("[") + 1:-1])


def _top_keys(quantities: set[str]) -> set[str]:
    out = set()
    for q in quantities:
        parts = q.split(".")
        out.add(".".join(parts[:2]) if parts[0] == "summaries" else parts[0])
    return out


def _ordered(a: dict, b: dict) -> list[str]:
    return list(a) + [p for p in b if p not in a]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _json_number(x: float | None) -> float | str | None:
    """``x``, or ``"nan"``/``"inf"``/``"-inf"``, which JSON has no numbers for."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _not_finite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _parent(path: str) -> str | None:
    """``ci95[0]`` → ``ci95``; None for a path that is not a list item."""
    return path[:path.rindex("[")] if path.endswith("]") else None


def _has_items(values: dict, path: str) -> bool:
    return any(p.startswith(path + "[") for p in values)


def _undefined(values: dict, path: str) -> bool:
    """Whether the value at ``path`` is null, or an item of a list that is null."""
    if values.get(path, _MISSING) is None:
        return True
    parent = _parent(path)
    return parent is not None and path not in values and values.get(parent, _MISSING) is None


def _undefined_reason(side: str, profile: Profile) -> str:
    n = profile.images.get("n_used", profile.result.get("n_images"))
    what = "" if n is None else f" ({n} image{'' if n == 1 else 's'})"
    return f"undefined in the {side}{what}"


def _layout_differences(mine: dict, theirs: dict) -> list[str]:
    diffs = []
    for key in STRUCTURAL_KEYS:
        a = {p: v for p, v in mine.items() if _strip(p).split(".")[0] == key}
        b = {p: v for p, v in theirs.items() if _strip(p).split(".")[0] == key}
        if a != b:
            diffs.append(f"result {key}: {_short(a)} vs {_short(b)}")
    return diffs


def _short(leaves: dict) -> str:
    values = list(leaves.values())
    if not values:
        return "absent"
    text = repr(values[0]) if len(values) == 1 else repr(values)
    return text if len(text) <= 60 else text[:57] + "..."


def _environment_notes(profile: Profile, baseline: Profile) -> list[str]:
    ea, eb = profile.environment or {}, baseline.environment or {}
    diffs = [f"{k} {ea.get(k, 'absent')} vs {eb.get(k, 'absent')}" for k in ENVIRONMENT_KEYS
             if (k in ea or k in eb) and ea.get(k) != eb.get(k)]
    if not diffs:
        return []
    return ["the environment differs (profile vs baseline): " + ", ".join(diffs)
            + "; a library version, batch size or thread count can move float sums"]


def _compare_value(path: str, quantity: str, a: Any, b: Any, tol: Tolerance,
                   axis: "_FrequencyAxis") -> Move | None:
    """The Move of one value (even within tolerance), or None when they are equal."""
    index = _index(path)
    if _not_finite(a) or _not_finite(b):
        # Before the equality test: the same NaN object `is` itself, and inf == inf, yet a
        # value that is not a finite number is a broken measurement on either side.
        where, freq = axis.locate(quantity, index)
        value = float(a) if _is_number(a) else None
        base = float(b) if _is_number(b) else None
        nan = _is_nan(a) or _is_nan(b)
        return Move(quantity, index, where, freq, base, value, math.nan if nan else math.inf,
                    tol.allowed(0.0), tol.log_atol is not None,
                    reason="not a number" if nan else "infinite")
    if a is b or a == b:
        return None
    where, freq = axis.locate(quantity, index)
    value = float(a) if _is_number(a) else None
    base = float(b) if _is_number(b) else None
    log = tol.log_atol is not None
    if value is None or base is None:
        return Move(quantity, index, where, freq, base, value, math.inf, tol.allowed(0.0), log)
    if log:
        if value <= tol.atol and base <= tol.atol:
            return None
        if value <= 0 or base <= 0:
            return Move(quantity, index, where, freq, base, value, math.inf, tol.log_atol, log)
        change = math.log(value) - math.log(base)
    else:
        change = value - base
    return Move(quantity, index, where, freq, base, value, change, tol.allowed(base), log)


class _FrequencyAxis:
    """Says at which frequency a value of the result sits (ring centre or DCT band)."""

    def __init__(self, profile: Profile):
        result = profile.result
        self.pixel = profile.protocol.get("units") == "pixel"
        self.unit = "cycles/px" if self.pixel else "cycles/cell"
        freqs = result.get("freqs_pixel") if self.pixel else None
        self.freqs = freqs or result.get("freqs") or []
        self.scale = 1.0
        stride = profile.protocol.get("stride_px")
        if self.pixel and stride:
            self.scale = 1.0 / float(stride)
        self.grid = result.get("grid")
        self.band_sizes = result.get("dct_band_sizes") or []
        self._bands: list[tuple[float, float]] | None = None

    def locate(self, quantity: str, index: int | None) -> tuple[str, float | None]:
        if index is None:
            return "", None
        top = quantity.split(".")[0]
        if top.startswith("dct_band") and index < len(self.band_sizes):
            lo, hi = self.band_range(index)
            return f"band {index + 1} ({lo:.3g}–{hi:.3g})", (lo + hi) / 2
        if len(self.freqs) > index and ("power" in top or top.startswith("ring")):
            f = float(self.freqs[index])
            return f"ring {f:.4g}", f
        return f"[{index}]", None

    def band_range(self, k: int) -> tuple[float, float]:
        """Radial frequency range of DCT band ``k``: coefficient (u, v) is at (u/2h, v/2w)."""
        if self._bands is None:
            self._bands = self._band_ranges()
        return self._bands[k]

    def _band_ranges(self) -> list[tuple[float, float]]:
        h, w = self.grid
        order = _zigzag(h, w)
        out, start = [], 0
        for size in self.band_sizes:
            fs = [math.hypot(u / (2 * h), v / (2 * w)) * self.scale
                  for u, v in order[start:start + size]]
            out.append((min(fs), max(fs)))
            start += size
        return out


def _zigzag(h: int, w: int) -> list[tuple[int, int]]:
    """(u, v) in zig-zag order, as :func:`prism_probe.spectra.zigzag_order` visits them."""
    from .spectra import zigzag_order

    return [divmod(int(i), w) for i in zigzag_order(h, w).tolist()]


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.5g}"


def _short_name(quantity: str) -> str:
    """``summaries.slope.mean`` → ``slope``; ``summaries.slope.ci95`` → ``slope.ci95``."""
    name = quantity.removeprefix("summaries.")
    return name.removesuffix(".mean")


def _fmt_change(m: Move) -> str:
    if m.reason:
        return m.reason
    if not math.isfinite(m.change):
        return "appeared" if m.baseline is None or m.baseline == 0 else "vanished"
    if m.log:
        return f"Δln {m.change:+.3g} (×{math.exp(m.change):.4g})"
    rel = m.relative
    return f"Δ {m.change:+.3g}" + ("" if rel is None else f" ({100 * rel:+.3g} %)")
