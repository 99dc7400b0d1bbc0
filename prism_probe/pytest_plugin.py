"""pytest plugin: check an encoder's spectral profile against a baseline file kept beside a test.

Installed with the package (entry point ``pytest11``), so any project that has prism-probe
installed can write::

    def test_encoder_spectrum(prism_profile_check, image_dir):
        prism_profile_check("resnet20-cifar", image_dir, weights_dir="weights/")

The first run (or ``pytest --prism-update-baselines``) writes ``baselines/resnet20-cifar.json``
in the test file's folder; later runs measure again and fail, showing the table of what moved at
which frequency, when the profile drifted beyond tolerance or cannot be compared with the
baseline. Commit the baseline files with the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pytest

UPDATE_OPTION = "--prism-update-baselines"


def pytest_addoption(parser) -> None:
    group = parser.getgroup("prism-probe", "spectral profile baselines")
    group.addoption(UPDATE_OPTION, action="store_true", default=False,
                    help="Rewrite the baseline files that prism_profile_check compares with, "
                         "instead of checking them.")


def pytest_configure(config) -> None:
    config._prism_baselines_written = []


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    written = getattr(config, "_prism_baselines_written", [])
    if written:
        terminalreporter.write_sep("-", f"prism-probe: {len(written)} baseline(s) written")
        for action, path in written:
            terminalreporter.write_line(f"{action} {path}")


class ProfileCheck:
    """The callable behind the ``prism_profile_check`` fixture (one per test)."""

    def __init__(self, request):
        self._request = request
        self.update = bool(request.config.getoption(UPDATE_OPTION))
        self.folder = Path(request.path).parent

    def baseline_path(self, baseline: str | Path | None, label: str) -> Path:
        """``baseline`` relative to the test's folder, or ``baselines/<label>.json`` there."""
        from .profile import profile_filename

        if baseline is None:
            return self.folder / "baselines" / profile_filename(label)
        path = Path(baseline)
        return path if path.is_absolute() else self.folder / path

    def __call__(self, encoder: Any, images: Any = None, *, baseline: str | Path | None = None,
                 tolerances: Any = None, threads: int | None = 1, **options):
        """Measure ``encoder`` on ``images`` and check the profile against its baseline.

        Parameters
        ----------
        encoder : str, Encoder or Profile
            A registry name (measured with :func:`prism_probe.check.measure_baseline`), an
            already loaded :class:`~prism_probe.loading.base.Encoder` (measured with
            :func:`prism_probe.measure.measure_encoder`, so a session fixture can load a model
            once), or a :class:`~prism_probe.profile.Profile` measured by the test itself.
        images
            An image source (folder, list of paths, :class:`~prism_probe.data.ImageList`).
        baseline : str or Path, optional
            The baseline file, relative to the test's folder; default
            ``baselines/<encoder label>.json``.
        tolerances : Tolerances, mapping, or path of a YAML file, optional
            Per-quantity tolerances (:class:`prism_probe.check.Tolerances`); default float
            tolerance.
        threads : int or None
            torch intra-op threads while measuring; 1 by default, so that the float sums do not
            depend on the CI machine's core count. None keeps torch's setting.
        **options
            Measurement options (``weights_dir``, ``image_size``, ``batch_size``, ``config``,
            ``grid``, ``units``, ``limit``, ``seed``, ...).

        Returns
        -------
        CheckResult
            Only when the check passes (or the baseline was rewritten); otherwise the test fails
            with the table of what moved, or of the set-up fields that differ.
        """
        from .check import CheckResult, compare, write_baseline

        profile = self._measure(encoder, images, threads, options)
        path = self.baseline_path(baseline, profile.label)
        if self.update:
            action = write_baseline(profile, path, force=True)
            self._request.config._prism_baselines_written.append((action, path))
            return CheckResult("ok", labels=(profile.label, str(path)),
                               notes=[f"baseline {action}"])
        if not path.exists():
            pytest.fail(f"no baseline {path} for {profile.label}; run pytest {UPDATE_OPTION} "
                        "to write it, then commit it", pytrace=False)
        from .profile import Profile

        result = compare(profile, Profile.load(path), _tolerances(tolerances, self.folder),
                         labels=(profile.label, _relative(path)))
        if not result.ok:
            pytest.fail(f"spectral profile check failed (exit {result.exit_code}; "
                        f"pytest {UPDATE_OPTION} rewrites the baseline if the change is "
                        f"intended)\n{result.render()}", pytrace=False)
        return result

    def _measure(self, encoder, images, threads, options):
        from .check import measure_baseline, reproducible
        from .loading.base import Encoder
        from .profile import Profile

        if isinstance(encoder, Profile):
            return encoder
        if isinstance(encoder, Encoder):
            from .data import ImageList, collect_images
            from .measure import measure_encoder

            if not isinstance(images, ImageList):
                images = collect_images(images, limit=options.pop("limit", None),
                                        seed=options.pop("seed", 0))
            with reproducible(threads):
                return measure_encoder(encoder, images, **options)
        return measure_baseline(encoder, images, threads=threads, **options)


def _tolerances(value: Any, folder: Path):
    from .check import Tolerances

    if value is None or isinstance(value, Tolerances):
        return value
    if isinstance(value, Mapping):
        return Tolerances.from_mapping(value)
    path = Path(value)
    return Tolerances.from_file(path if path.is_absolute() else folder / path)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@pytest.fixture
def prism_profile_check(request) -> ProfileCheck:
    """Check an encoder's spectral profile against a baseline file beside the test.

    ``prism_profile_check(encoder, images, baseline=None, tolerances=None, threads=1, **opts)``
    measures (or takes) a profile and compares it with ``baselines/<label>.json`` in the test's
    folder; ``pytest --prism-update-baselines`` rewrites the files instead. See
    :meth:`ProfileCheck.__call__`.
    """
    return ProfileCheck(request)
