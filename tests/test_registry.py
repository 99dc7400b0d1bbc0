"""The registry: default entries, user files, validation errors that name entry and field."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from prism_probe.errors import RegistryError
from prism_probe.registry import Registry, parse_spec

REQUIRED_DEFAULTS = [
    "dinov2-s", "dinov2-b", "dinov2-l", "dinov2-reg-s", "dinov2-reg-b", "dinov2-reg-l",
    "dinov3-b", "clip-b16", "clip-l14", "siglip2-b16", "mae-b16", "ijepa-h14", "sd-vae",
    "sdxl-vae", "flux-vae", "taesd", "taef1", "taef2", "resnet20-cifar", "resnet56-cifar",
    "pixels",
]


def write(tmp_path, text, name="user.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_present_and_valid():
    reg = Registry.load(use_env=False)
    for name in REQUIRED_DEFAULTS:
        assert name in reg, name
    # Base entries inherit and override: dinov2-b takes dinov2-s's input and options.
    b = reg.get("dinov2-b")
    assert b.id == "vit_base_patch14_dinov2.lvd142m"
    assert b.input_size == (224, 224) and b.options["img_size"] == 224
    assert reg.get("sdxl-vae").weights["hub"] == "stabilityai/sdxl-vae"
    assert reg.get("taef2").weights["sha256"].startswith("10a4e1021e89d755")


def test_user_file_adds_and_overrides(tmp_path):
    path = write(tmp_path, """
        encoders:
          my-vit:
            base: dinov2-s
            id: vit_small_patch14_reg4_dinov2.lvd142m
            input: {size: 112}
            description: a user entry
          taef2:
            base: taef2
            description: overridden
    """)
    reg = Registry.load([path], use_env=False)
    mine = reg.get("my-vit")
    assert mine.backend == "timm" and mine.input_size == (112, 112)
    assert mine.input["crop_pct"] == 1.0  # merged one level deep from the base
    assert reg.get("taef2").description == "overridden"
    assert reg.get("taef2").source == str(path)


def test_env_variable_registry(tmp_path, monkeypatch):
    path = write(tmp_path, """
        encoders:
          env-entry: {base: resnet20-cifar, description: from the environment}
    """)
    monkeypatch.setenv("PRISM_PROBE_REGISTRY", str(path))
    assert "env-entry" in Registry.load()


@pytest.mark.parametrize("body, message", [
    ("encoders:\n  x: {family: semantic, backend: timm, id: a, input: {size: 8}}\n",
     "entry 'x': missing required field 'description'"),
    ("encoders:\n  x: {family: semantc, backend: timm, id: a, input: {size: 8}, "
     "description: d}\n", "entry 'x': field 'family' must be one of"),
    ("encoders:\n  x: {family: pixel, backend: tim, id: a, input: {size: 8}, description: d}\n",
     "unknown backend 'tim' (did you mean 'timm'?)"),
    ("encoders:\n  x: {family: pixel, backend: timm, id: a, input: {size: -3}, "
     "description: d}\n", "field 'input.size' must be a positive int"),
    ("encoders:\n  x: {family: pixel, backend: timm, id: a, input: {size: 8}, description: d,"
     " wieghts: {}}\n", "unknown field 'wieghts' (did you mean 'weights'?)"),
    ("encoders:\n  x: {family: pixel, backend: timm, id: a, input: {size: 8}, description: d,"
     " weights: {url: 'http://x/y.pth'}}\n", "'weights.url' needs 'weights.sha256'"),
    ("encoders:\n  x: {base: nothing-like-it, description: d}\n",
     "'base' names unknown entry 'nothing-like-it'"),
    ("encoders:\n  x: {family: pixel\n", "malformed YAML"),
    ("encoders:\n  x: {base: taef2, description: a}\n  x: {base: taef2, description: b}\n",
     "duplicate key 'x'"),
    ("- just\n- a list\n", "needs a top-level mapping 'encoders:'"),
])
def test_invalid_entries_name_entry_and_field(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(RegistryError) as err:
        Registry.load([path], use_env=False)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_with_python_tags_is_refused(tmp_path):
    # The safe loader must not construct arbitrary objects.
    path = write(tmp_path, "encoders: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RegistryError, match="malformed YAML"):
        Registry.load([path], use_env=False)


def test_unknown_encoder_suggests_close_names():
    reg = Registry.load(use_env=False)
    with pytest.raises(RegistryError, match="did you mean dinov2-b"):
        reg.get("dinov2-bb")


def test_specs():
    reg = Registry.load(use_env=False)
    assert parse_spec("random:dinov2-b", reg).random_init
    assert parse_spec("pixels", reg).entry.options["patch"] == 16
    assert parse_spec("pixels:1", reg).entry.options["patch"] == 1
    assert parse_spec("uae:runs/x", reg).run_dir == "runs/x"
    with pytest.raises(RegistryError, match="positive integer"):
        parse_spec("pixels:zero", reg)
    with pytest.raises(RegistryError, match="unknown encoder"):
        parse_spec("random:nope-nope", reg)


def test_listing_does_not_import_torch():
    code = ("import sys; from prism_probe.cli import app; from typer.testing import CliRunner;"
            "r = CliRunner().invoke(app, ['encoders', '--json']); assert r.exit_code == 0;"
            "bad = [m for m in ('torch', 'timm', 'huggingface_hub', 'transformers') "
            "if m in sys.modules]; print(bad); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
