"""The project's own spectral regression baselines, checked on every test run.

Three real encoders are measured on 16 ImageNet sample images (the ``imagenet16`` fixture: every
16th file of ../shared/data/imagenet-sample, in sorted order) and compared with the profiles kept
in ``tests/baselines/``: ResNet-20 and ResNet-56 for CIFAR at their native 32 px (layer3, 8×8),
and TAEF2 at 128 px instead of its native 256 px to stay fast (latent 16×16). The batch size and
the thread count (1, the fixture's default) are fixed so that the profiles are bit-for-bit
reproducible on CPU; the default float tolerance still admits another CPU's rounding.

After an intended change (new weights, a changed measure):
``pytest tests/test_regression.py --prism-update-baselines`` rewrites the files.
"""

from __future__ import annotations

import pytest

CASES = {
    "resnet20-cifar": {},
    "resnet56-cifar": {},
    "taef2": {"image_size": 128},
}


@pytest.mark.shared
@pytest.mark.parametrize("name", list(CASES))
def test_profile_matches_baseline(prism_profile_check, name, shared_weights, imagenet16):
    result = prism_profile_check(name, imagenet16, weights_dir=shared_weights, batch_size=16,
                                 device="cpu", **CASES[name])
    assert result.ok
