"""The library backends (timm, open_clip, transformers, diffusers), offline, on random weights.

Every model here is built once per module with random weights and no download. Token ORDER is
checked with a marker: one patch of the input is changed and the grid cell whose features change
most must be that patch's cell. A cell off the diagonal ((1, 3) of a 4 × 4 grid, or a cell of a
non-square grid) catches transposed or flipped reshapes, and a wrong prefix count shifts the
marker by that many cells. Randomly initialised ViTs keep each token mostly itself through their
residual stream (attention spreads a change over all tokens only weakly), so the marker works on
the final layer as well as on block 0, where the change outside the marked token is at most one
attention step.
"""

from __future__ import annotations

import os

# transformers and huggingface_hub read this when imported: set it before they are.
os.environ["HF_HUB_OFFLINE"] = "1"

import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from prism_probe import weights as W  # noqa: E402
from prism_probe.errors import NumericsError, PrismError, RegistryError  # noqa: E402
from prism_probe.errors import WeightsError  # noqa: E402
from prism_probe.loading import load_encoder  # noqa: E402
from prism_probe.loading.base import check_finite, tokens_to_grid  # noqa: E402
from prism_probe.registry import EncoderEntry, Registry  # noqa: E402

CPU = torch.device("cpu")
RANDOM = W.ResolvedWeights("random", random=True)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # An empty hub cache, so that weights a developer happens to have cached are not found.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)


def entry(name, backend, id, size, layer="final", **options) -> EncoderEntry:
    return EncoderEntry(name=name, family="semantic", backend=backend, id=id,
                        description="test entry", input={"size": size},
                        features={"layer": layer}, options=options)


def build(e: EncoderEntry, image_size=None):
    from prism_probe.loading import backend_module

    return backend_module(e.backend).build(e, weights=RANDOM, device=CPU,
                                           image_size=image_size, dirs=[])


def marked_cell(forward, size, cell, patch):
    """The grid cell whose features change most when the input patch at ``cell`` is changed."""
    torch.manual_seed(0)
    base = torch.randn(1, 3, *size) * 0.5
    marked = base.clone()
    (r, c), (ph, pw) = cell, patch
    marked[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 3.0
    with torch.no_grad():
        change = (forward(marked).tensor - forward(base).tensor).norm(dim=1)[0]
    return divmod(int(change.argmax()), change.shape[-1])


# ---------------------------------------------------------------- timm

@pytest.fixture(scope="module")
def dino():
    return build(entry("t-dino", "timm", "vit_small_patch14_dinov2", 56, img_size=56, depth=4))


@pytest.fixture(scope="module")
def dino_reg():
    return build(entry("t-dino-reg", "timm", "vit_small_patch14_reg4_dinov2", 56, img_size=56,
                       depth=4))


@pytest.mark.parametrize("name, prefix", [("dino", 1), ("dino_reg", 5)])
def test_timm_dinov2_grid_prefix_and_order(request, name, prefix):
    from prism_probe.loading.timm_backend import vit_feature_fn

    enc = request.getfixturevalue(name)
    fmap = enc.encode(torch.zeros(2, 3, 56, 56))
    assert fmap.tensor.shape == (2, 384, 4, 4)
    assert fmap.prefix_tokens == prefix == enc.model.num_prefix_tokens
    assert fmap.stride == 14 and fmap.layer == "blocks.3+norm"
    assert marked_cell(enc.encode, (56, 56), (1, 3), (14, 14)) == (1, 3)
    assert marked_cell(vit_feature_fn(enc.model, 0), (56, 56), (1, 3), (14, 14)) == (1, 3)


def test_timm_register_tokens_are_counted_from_the_model(dino_reg):
    model = dino_reg.model
    assert model.num_prefix_tokens == 1 + model.num_reg_tokens == 5
    tokens = model.forward_features(torch.zeros(1, 3, 56, 56))
    assert tokens.shape[1] == 5 + 16
    with pytest.raises(PrismError, match="prefix tokens does not fill"):
        tokens_to_grid(tokens, (4, 4), 1)  # assuming one CLS token leaves registers in the grid


def test_timm_final_is_forward_features_and_intermediates_ascend(dino_reg):
    from prism_probe.loading.timm_backend import vit_feature_fn

    model, x = dino_reg.model, torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        final = dino_reg.encode(x).tensor
        ref = model.forward_features(x)[:, 5:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(final, ref)

        # Block i's map is the residual stream after blocks 0..i, run by hand: ascending depth.
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for i, block in enumerate(model.blocks):
            tokens = block(tokens)
            fmap = vit_feature_fn(model, i)(x)
            assert fmap.layer == f"blocks.{i}"
            torch.testing.assert_close(fmap.tensor, tokens_to_grid(tokens, (4, 4), 5))
        # The last block with the final norm is exactly forward_features.
        torch.testing.assert_close(tokens_to_grid(model.norm(tokens), (4, 4), 5), final)
        assert vit_feature_fn(model, -1)(x).layer == "blocks.3"


def test_timm_non_square_grid():
    enc = build(entry("t-dyn", "timm", "vit_small_patch14_dinov2", [448, 224],
                      dynamic_img_size=True, depth=2))
    assert enc.preprocess.size == (448, 224)
    fmap = enc.encode(torch.zeros(1, 3, 448, 224))
    assert fmap.grid == (32, 16)
    assert marked_cell(enc.encode, (448, 224), (20, 3), (14, 14)) == (20, 3)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_timm_split_round_trip(dino_reg, k):
    head, tail = dino_reg.split(f"blocks.{k}")
    x = torch.randn(2, 3, 56, 56)
    model = dino_reg.model
    with torch.no_grad():
        tokens = head(x)
        assert tokens.shape == (2, 5 + 16, 384)
        assert head.prefix_tokens == 5 and head.grid_for((56, 56)) == (4, 4)
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tail(tokens), ref)
    with pytest.raises(PrismError, match="blocks.K"):
        dino_reg.split("blocks.5")


def test_timm_mae_grid():
    enc = build(entry("t-mae", "timm", "vit_base_patch16_224.mae", 64, depth=4))
    fmap = enc.encode(torch.zeros(1, 3, 64, 64))
    assert fmap.tensor.shape == (1, 768, 4, 4) and fmap.prefix_tokens == 1
    assert enc.preprocess.crop_pct == pytest.approx(0.9)  # timm's own MAE config
    assert marked_cell(enc.encode, (64, 64), (3, 0), (16, 16)) == (3, 0)


def test_timm_local_file_goes_through_timm(dino, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dino.model.state_dict().items()},
              str(tmp_path / "t-local.safetensors"))
    e = entry("t-local", "timm", "vit_small_patch14_dinov2", 56, img_size=56, depth=4)
    enc = load_encoder("t-local", registry=Registry({"t-local": e}), weights_dir=tmp_path)
    assert enc.weights.source == "file" and enc.weights.sha256
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(enc.encode(x).tensor, dino.encode(x).tensor)


def test_timm_dinov2_preprocess_224_gives_16x16():
    enc = load_encoder("random:dinov2-s")
    assert enc.preprocess.size == (224, 224)
    assert (enc.preprocess.mean, enc.preprocess.std) == IMAGENET  # timm's config for DINOv2
    pixels = enc.preprocess(Image.new("RGB", (320, 240), (120, 30, 200)))
    fmap = enc.encode(pixels[None])
    assert fmap.grid == (16, 16) and fmap.stride == 14 and fmap.prefix_tokens == 1


# ---------------------------------------------------------------- open_clip

def test_open_clip_siglip_tower():
    base = Registry.load().get("siglip2-b16")
    # Without mean/std in the entry they must come from open_clip's config of the tag.
    e = replace(base, input={"size": 64})
    enc = build(e)
    assert (enc.preprocess.mean, enc.preprocess.std) == ((0.5,) * 3, (0.5,) * 3)
    fmap = enc.encode(torch.zeros(1, 3, 64, 64))
    assert fmap.tensor.shape == (1, 768, 4, 4)
    assert fmap.prefix_tokens == 0 == enc.model.trunk.num_prefix_tokens
    assert marked_cell(enc.encode, (64, 64), (1, 3), (16, 16)) == (1, 3)


def test_open_clip_native_tower_ln_post():
    # The same native tower class, two blocks deep (open_clip takes vision_cfg overrides).
    small = {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16}
    enc = build(replace(Registry.load().get("clip-b16"), input={"size": 64},
                        options={"vision_cfg": small}))
    fmap = enc.encode(torch.zeros(1, 3, 64, 64))
    assert fmap.tensor.shape == (1, 128, 4, 4) and fmap.prefix_tokens == 1
    assert fmap.layer == "resblocks.1+ln_post"
    with torch.no_grad():  # open_clip's own output_tokens path gives the same tokens
        enc.model.output_tokens = True
        _, tokens = enc.model(torch.ones(1, 3, 64, 64))
    torch.testing.assert_close(enc.encode(torch.ones(1, 3, 64, 64)).tensor,
                               tokens.reshape(1, 4, 4, -1).permute(0, 3, 1, 2))
    assert marked_cell(enc.encode, (64, 64), (2, 1), (16, 16)) == (2, 1)


def test_open_clip_quickgelu_mismatch_is_refused():
    good = Registry.load().get("clip-b16")
    bad = replace(good, name="clip-gelu", id="ViT-B-16")
    with pytest.raises(RegistryError, match="ViT-B-16-quickgelu"):
        build(bad)
    from prism_probe.loading.open_clip_backend import check_quick_gelu

    check_quick_gelu(good)  # the default entry is consistent


# ---------------------------------------------------------------- transformers

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=56, patch_size=14)


def hf(name, model_type, layer="final", **extra):
    return build(entry(name, "transformers", f"test/{name}", 56, layer,
                       config={"model_type": model_type, **TINY, **extra}))


@pytest.fixture(scope="module")
def hf_dino_reg():
    return hf("h-dino-reg", "dinov2_with_registers", num_register_tokens=4)


def test_hf_dinov2_registers(hf_dino_reg):
    fmap = hf_dino_reg.encode(torch.zeros(2, 3, 56, 56))
    assert fmap.tensor.shape == (2, 32, 4, 4)
    assert fmap.prefix_tokens == 1 + hf_dino_reg.model.config.num_register_tokens == 5
    assert marked_cell(hf_dino_reg.encode, (56, 56), (1, 3), (14, 14)) == (1, 3)
    # The count follows the model's config, not a constant.
    two = hf("h-dino-reg2", "dinov2_with_registers", layer=0, num_register_tokens=2)
    assert two.encode(torch.zeros(1, 3, 56, 56)).prefix_tokens == 3
    assert marked_cell(two.encode, (56, 56), (1, 3), (14, 14)) == (1, 3)


def test_hf_clip_post_layernorm_is_applied_and_recorded():
    enc = hf("h-clip", "clip_vision_model")
    x = torch.randn(1, 3, 56, 56)
    fmap = enc.encode(x)
    assert fmap.layer.endswith("+post_layernorm") and fmap.prefix_tokens == 1
    with torch.no_grad():
        raw = enc.model(pixel_values=x).last_hidden_state
        normed = enc.model.post_layernorm(raw)
    torch.testing.assert_close(fmap.tensor, tokens_to_grid(normed, (4, 4), 1))
    assert not torch.allclose(fmap.tensor, tokens_to_grid(raw, (4, 4), 1), atol=1e-3)
    assert marked_cell(enc.encode, (56, 56), (3, 1), (14, 14)) == (3, 1)


def test_hf_vitmae_shuffling_trap():
    enc = hf("h-mae", "vit_mae", mask_ratio=0.75)
    assert enc.model.config.mask_ratio == 0.0  # forced, so every patch is encoded
    cell = (1, 3)
    assert marked_cell(enc.encode, (56, 56), cell, (14, 14)) == cell

    # The plain call shuffles tokens by random noise: read naively, the marker moves.
    def naive(pixels):
        torch.manual_seed(1)
        out = enc.model(pixel_values=pixels)
        return type("F", (), {"tensor": tokens_to_grid(out.last_hidden_state, (4, 4), 1)})

    assert marked_cell(naive, (56, 56), cell, (14, 14)) != cell


# ---------------------------------------------------------------- diffusers

TINY_VAE = dict(block_out_channels=[32, 32, 32], latent_channels=4, layers_per_block=1,
                norm_num_groups=8, sample_size=32,
                down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3)


@pytest.fixture(scope="module")
def vae():
    e = replace(entry("d-vae", "diffusers", "AutoencoderKL", 32, "latent", config=TINY_VAE),
                family="pixel", input={"size": 32, "value_range": [-1, 1]})
    return build(e)


def test_diffusers_kl_latent_grid_order_and_decode(vae):
    assert vae.preprocess.value_range == (-1.0, 1.0)
    fmap = vae.encode(torch.zeros(2, 3, 32, 32))
    assert fmap.tensor.shape == (2, 4, 8, 8) and fmap.layer == "latent_mean"
    assert fmap.stride == 4 and fmap.prefix_tokens == 0
    # A random conv stack's receptive field spans the whole image, so a one-patch marker does
    # not stay local; translation does: shifting the input by 8 px along one axis shifts the
    # latent by 2 cells along the same axis (compared away from the zero-padded borders).
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64) * 0.5
    z = vae.encode(x).tensor
    inner = (slice(None), slice(None), slice(3, 13), slice(3, 13))

    def error(a, b):
        return float((a - b)[inner].norm() / z[inner].norm())

    for axis, other in ((-1, -2), (-2, -1)):
        shifted = vae.encode(torch.roll(x, 8, dims=axis)).tensor
        assert error(shifted, torch.roll(z, 2, dims=axis)) < 0.3
        assert error(shifted, torch.roll(z, 2, dims=other)) > 0.6
    images = vae.decode(fmap.tensor)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_diffusers_tiny_autoencoder():
    cfg = dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8],
               num_encoder_blocks=[1, 1], num_decoder_blocks=[1, 1], latent_channels=16)
    e = replace(entry("d-tiny", "diffusers", "AutoencoderTiny", 32, "latent", config=cfg),
                family="pixel", input={"size": 32, "value_range": [-1, 1]})
    enc = build(e)
    fmap = enc.encode(torch.zeros(1, 3, 32, 32))
    assert fmap.tensor.shape[1] == 16 and fmap.layer == "latent"
    assert enc.decode(fmap.tensor).shape[1] == 3


def test_registry_vae_configs_are_the_real_architectures():
    from diffusers import AutoencoderKL

    reg = Registry.load()
    counts = {}
    for name in ("sd-vae", "flux-vae"):
        with torch.device("meta"):  # no memory, no init: the architecture only
            model = AutoencoderKL.from_config(reg.get(name).options["config"])
        counts[name] = (model.config.latent_channels, sum(p.numel() for p in model.parameters()))
    # SD's VAE has 83,653,863 parameters and 4 latent channels; FLUX.1's has 16.
    assert counts["sd-vae"] == (4, 83_653_863)
    assert counts["flux-vae"][0] == 16


def test_non_finite_features_name_encoder_and_batch(vae, monkeypatch):
    def overflow(x):
        return torch.full((x.shape[0], 8, 8, 8), float("inf"))

    monkeypatch.setattr(vae.model.encoder, "forward", overflow)
    fmap = vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(NumericsError, match=r"encoder 'd-vae'.* batch 7"):
        check_finite(fmap, encoder=vae.label, batch=7)


# ---------------------------------------------------------------- offline, no weights

@pytest.mark.parametrize("name", ["dinov2-b", "siglip2-b16", "clip-l14", "sd-vae"])
def test_missing_weights_offline_is_one_clear_error(name):
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        load_encoder(name)
    message = str(info.value)
    assert time.monotonic() - start < 10
    assert "\n" not in message
    assert f"weights for '{name}' not found" in message and "--weights DIR" in message
    assert f"random:{name}" in message


def test_saved_folders_load_offline(hf_dino_reg, vae, tmp_path):
    # A folder written by save_pretrained, named after the entry, in a --weights folder.
    hf_dino_reg.model.save_pretrained(tmp_path / "h-saved")
    vae.model.save_pretrained(tmp_path / "d-saved")
    reg = Registry({
        "h-saved": replace(hf_dino_reg.entry, name="h-saved"),
        "d-saved": replace(vae.entry, name="d-saved"),
    })
    x = torch.randn(1, 3, 56, 56)
    for name, ref in (("h-saved", hf_dino_reg), ("d-saved", vae)):
        enc = load_encoder(name, registry=reg, weights_dir=tmp_path)
        assert enc.weights.source == "file" and enc.weights.location == str(tmp_path / name)
        torch.testing.assert_close(enc.encode(x).tensor, ref.encode(x).tensor)
