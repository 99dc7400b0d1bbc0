"""Smoke run of benchmarks/run.py at tiny sizes, so that the script does not rot.

Nothing here asserts a timing: the machine is shared and timings are noise. The checks are on
the structure of the table (every row present, values finite, ratios positive) and on the
markdown file it writes.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from conftest import ROOT, require_shared


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("prism_benchmarks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    require_shared("data", "imagenet-sample")
    require_shared("weights")
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    rows = bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    return rows, out


def test_every_section_and_row_is_present(quick_run):
    rows, _ = quick_run
    sections = {r.section for r in rows}
    assert sections == {"kernel", "e2e", "memory", "startup"}
    kernel = [r for r in rows if r.section == "kernel"]
    assert len({r.group for r in kernel}) == 4  # the four stack sizes of issue 6
    for group in {r.group for r in kernel}:
        names = [r.name for r in kernel if r.group == group]
        assert any("RAPS + DCT" in n for n in names) and any("RAPS only" in n for n in names)
        assert any(n.startswith("pysteps") for n in names)
        assert any(n.startswith("powerbox") for n in names)
        assert any(n.startswith("numpy") for n in names)
        assert any(n.startswith("floor") for n in names)
    e2e_names = {r.name for r in rows if r.section == "e2e"}
    assert {"decode (draft JPEG decoding)", "preprocess", "bare forward",
            "spectrum (forward + spectra)"} <= e2e_names
    assert len([r for r in rows if r.section == "memory"]) == 2


def test_values_are_sane(quick_run):
    rows, _ = quick_run
    for r in rows:
        assert math.isfinite(r.value) and r.value >= 0, r
        if r.ratio is not None:
            assert math.isfinite(r.ratio) and r.ratio > 0, r
        assert r.command, f"{r.name} has no command beside it"
    floors = [r for r in rows if r.name.startswith("floor")]
    assert all(r.ratio == pytest.approx(1.0) for r in floors)
    heavy = [r for r in rows if r.name.startswith("heavy modules")]
    assert heavy and heavy[0].unit == "none"  # `encoders` must not import torch & co.


def test_markdown_is_written(quick_run):
    _, out = quick_run
    text = out.read_text()
    for heading in ("## Machine", "load average", "## 1. Radial spectrum kernel",
                    "## 2. End to end", "## 3. Peak memory", "## 4. Start-up", "## Targets"):
        assert heading in text
    assert "benchmarks/run.py --quick" in text
