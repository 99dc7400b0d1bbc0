"""Sequences: 1-D token-axis spectra (known answers), exclusion of special tokens and padding,
random-weight BERT / ESM-2 / PLBART from tiny configs, band ablation, inputs, offline errors.
Token ids are fed directly: tokenizer vocabularies cannot be fetched here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prism_probe import weights as W
from prism_probe.check import compare
from prism_probe.errors import PrismError, WeightsError
from prism_probe.loading import sequence_backend
from prism_probe.registry import EncoderEntry, Registry
from prism_probe.sequence import (ablate_sequence, load_sequence_encoder,
                                  measure_sequence_encoder, read_sequences)
from prism_probe.spectra_nd import (SequenceSpectrumConfig, TokenSpectrumAccumulator,
                                    token_band_filter, token_power_spectrum)

CPU = torch.device("cpu")
RANDOM = W.ResolvedWeights("random", random=True)
RAW = SequenceSpectrumConfig(window=None, remove_mean=False, n_dct_bands=4, min_tokens=4)
CONFIGS = {
    "bert": (dict(model_type="bert", vocab_size=120, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128),
             [0, 101, 102, 103]),
    "esm": (dict(model_type="esm", vocab_size=33, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
                 position_embedding_type="rotary", pad_token_id=1, mask_token_id=32,
                 token_dropout=True, emb_layer_norm_before=False), [0, 1, 2, 32]),
    "plbart": (dict(model_type="plbart", vocab_size=100, d_model=32, encoder_layers=2,
                    decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=130,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2), [0, 1, 2]),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)


def build(kind: str):
    config, special = CONFIGS[kind]
    entry = EncoderEntry(name=f"tiny-{kind}", family="semantic",
                         backend="transformers_sequence", id="tiny", description="test",
                         input={"max_tokens": 128}, features={"layer": "all"},
                         options={"config": config, "special_ids": special},
                         modality="sequence")
    torch.manual_seed(0)
    return sequence_backend.build(entry, weights=RANDOM, device=CPU, image_size=None, dirs=[])


@pytest.fixture(scope="module")
def bert():
    return build("bert")


def bert_ids(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[101] + torch.randint(5, 100, (n,), generator=g).tolist() + [102] for n in lengths]


# ---------------------------------------------------------------- known answers


def test_plane_wave_along_tokens_lands_in_its_bin_on_any_length():
    cfg = SequenceSpectrumConfig(window=None, n_dct_bands=4, min_tokens=4)
    for n in (64, 128, 96):  # k/n = 0.25 exactly for each
        k = torch.arange(n, dtype=torch.float64)
        x = torch.cos(2 * math.pi * 0.25 * k)[None, :, None].repeat(1, 1, 3)
        s = token_power_spectrum(x, torch.ones(1, n, dtype=torch.bool), cfg)
        assert int(s.power[0].argmax()) == 16 and s.freqs[16] == 0.25
        assert float(s.low_power[0]) == pytest.approx(0.0, abs=1e-9)
        assert float(s.freq_moment[0] / s.total_power[0]) == pytest.approx(0.25)


def test_white_noise_is_flat_and_parseval_holds():
    torch.manual_seed(0)
    x = torch.randn(64, 128, 16, dtype=torch.float64)
    mask = torch.ones(64, 128, dtype=torch.bool)
    s = token_power_spectrum(x, mask, RAW)
    assert torch.allclose(s.total_power, x.square().sum(1).mean(1))
    mean = s.power.mean(0)
    assert torch.allclose(mean, torch.ones_like(mean), atol=0.12)
    acc = TokenSpectrumAccumulator(SequenceSpectrumConfig())
    acc.update(x, mask)
    r = acc.result()
    # Low-band share of white noise: the share of frequencies at f <= 0.125 (folded cells).
    share = (1 + 2 * 16) / 128
    assert r["summaries"]["low_band_share"]["mean"] == pytest.approx(share, abs=0.02)
    assert r["dct_band_energy"] == pytest.approx([0.1] * 10, abs=0.02)


def test_padding_and_special_tokens_do_not_change_the_spectrum():
    torch.manual_seed(1)
    core = [torch.randn(n, 8) for n in (40, 23, 57)]
    alone = TokenSpectrumAccumulator()
    for c in core:
        alone.update(c[None], torch.ones(1, len(c), dtype=torch.bool))
    # The same tokens in one padded batch, with a CLS before and a SEP after each, and garbage
    # hidden states at every special and padding position.
    width = 70
    x = torch.randn(3, width, 8) * 100
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, c in enumerate(core):
        x[i, 1:1 + len(c)] = c
        mask[i, 1:1 + len(c)] = True
    batched = TokenSpectrumAccumulator()
    batched.update(x, mask)
    a, b = alone.result(), batched.result()
    for key in ("power", "bin_sequences", "dct_band_energy"):
        assert np.allclose(a[key], b[key], rtol=1e-5, atol=1e-9), key
    assert a["summaries"]["slope"]["mean"] == pytest.approx(b["summaries"]["slope"]["mean"])


def test_short_sequences_are_skipped_and_counted():
    x = torch.randn(2, 30, 4)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 10:] = False
    acc = TokenSpectrumAccumulator()
    acc.update(x, mask)
    r = acc.result()
    assert r["n_sequences"] == 1 and r["n_short"] == 1 and r["tokens"] == [30, 30.0, 30]


def test_token_band_filter_splits_exactly_and_leaves_special_tokens():
    x = torch.randn(2, 20, 4)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 0] = mask[:, -1] = False
    mask[1, 12:] = False
    low = token_band_filter(x, mask, 0.1)
    high = token_band_filter(x, mask, 0.1, "high")
    assert torch.allclose(low[mask] + high[mask], x[mask], atol=1e-6)
    assert torch.equal(low[~mask], x[~mask])
    assert torch.allclose(token_band_filter(x, mask, 0.5), x, atol=1e-6)


# ---------------------------------------------------------------- random-weight models


@pytest.mark.parametrize("kind", ["bert", "esm", "plbart"])
def test_random_models_give_per_layer_spectra(kind):
    enc = build(kind)
    special = CONFIGS[kind][1]
    first, last = (special[0], 102) if kind == "bert" else (special[0], 2)
    g = torch.Generator().manual_seed(2)
    ids = [[first] + torch.randint(5, 30, (n,), generator=g).tolist() + [last]
           for n in (40, 25, 60)]
    p = measure_sequence_encoder(enc, token_ids=ids)
    assert p.protocol["modality"] == "sequence"
    assert p.result["layer_names"] == ["embeddings", "layers.0", "layers.1"]
    for layer in p.result["layers"]:
        assert layer["n_sequences"] == 3
        assert len(layer["power"]) == 33 and all(v >= 0 for v in layer["power"])
        assert layer["summaries"]["centroid"]["mean"] > 0
    assert compare(p, p).status == "ok"


def test_padding_does_not_change_a_models_profile(bert):
    ids = bert_ids([30, 45, 20])
    together = measure_sequence_encoder(bert, token_ids=ids, batch_size=3)
    one_by_one = measure_sequence_encoder(bert, token_ids=ids, batch_size=1)
    for a, b in zip(together.result["layers"], one_by_one.result["layers"]):
        assert np.allclose(a["power"], b["power"], rtol=1e-4, atol=1e-8)
    assert together.images["digest"] == one_by_one.images["digest"]


def test_sequence_ablation_continues_the_forward_pass(bert):
    r = ablate_sequence(bert, bert_ids([30, 40]), [0.0, 0.1, 0.5], layer=0)
    assert r["cosine"][-1] == pytest.approx(1.0, abs=1e-5)
    assert r["cosine"][0] < r["cosine"][1] < 1.0
    assert r["kept_energy"][-1] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- inputs, registry, offline


def test_reads_fasta_and_line_files(tmp_path):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">sp|A\nMKT\nAYI\n\n>sp|B\nQQ\n>empty\n")
    assert read_sequences(fasta) == [("sp|A", "MKTAYI"), ("sp|B", "QQ")]
    lines = tmp_path / "s.txt"
    lines.write_text("the cat\n\nsat on\n")
    assert read_sequences(lines) == [("line 1", "the cat"), ("line 3", "sat on")]
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(PrismError, match="no sequence"):
        read_sequences(tmp_path / "blank.txt")


def test_registry_entries_and_offline_missing_weights():
    reg = Registry.load(use_env=False)
    for name in ("bert-base", "esm2-8m", "plbart-b"):
        entry = reg.get(name)
        assert entry.modality == "sequence" and entry.options["tokenizer"]
        with pytest.raises(WeightsError) as info:
            load_sequence_encoder(name, registry=reg)
        msg = str(info.value)
        assert "\n" not in msg and f"weights for '{name}' not found" in msg
        assert f"random:{name}" in msg
    with pytest.raises(PrismError, match="--text measures sequence entries"):
        load_sequence_encoder("dinov2-b", registry=reg)


def test_tokenizer_missing_offline_says_to_feed_token_ids(bert):
    with pytest.raises(PrismError, match="token ids"):
        bert.tokenize(["hello"])


def test_cli_text_offline_fails_with_the_offline_message(tmp_path):
    from typer.testing import CliRunner

    from prism_probe.cli import app

    text = tmp_path / "prots.fasta"
    text.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n")
    res = CliRunner().invoke(app, ["spectrum", "esm2-8m", "bert-base", "--text", str(text)])
    assert res.exit_code == 2
    assert "weights for 'esm2-8m' not found" in res.output
    res = CliRunner().invoke(app, ["spectrum", "esm2-8m", "--text", str(text), "--grid", "8"])
    assert res.exit_code == 2 and "--grid applies to images only" in res.output


# ---------------------------------------------------------------- ablate --text (the CLI)


def _tiny_text_setup(tmp_path):
    """A registry YAML naming a tiny BERT whose tokenizer is a local folder, and a text file."""
    import yaml
    from transformers import BertTokenizer

    words = [chr(ord("a") + i) for i in range(16)]
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
             + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)
    assert len(vocab) == 120
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok_dir = tmp_path / "tok"
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(tok_dir))
    config, special = CONFIGS["bert"]
    entry = {"family": "semantic", "modality": "sequence",
             "backend": "transformers_sequence", "id": "tiny", "input": {"max_tokens": 128},
             "features": {"layer": "all"}, "description": "test",
             "options": {"config": config, "special_ids": special,
                         "tokenizer": str(tok_dir)}}
    reg = tmp_path / "tiny-seq.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "encoders": {"tiny-bert": entry}}))
    rng = np.random.default_rng(0)
    text = tmp_path / "s.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, n)) for n in (24, 31, 40)) + "\n")
    return reg, text


def test_cli_ablate_text_all_pass_is_exact_and_writes_a_profile(tmp_path):
    import json

    from typer.testing import CliRunner

    from prism_probe.cli import app
    from prism_probe.profile import Profile

    reg, text = _tiny_text_setup(tmp_path)
    out = tmp_path / "out"
    common = ["ablate", "random:tiny-bert", "--registry", str(reg), "--text", str(text),
              "--device", "cpu"]
    res = CliRunner().invoke(app, common + ["--json", "--bands", "all,low", "--cutoffs",
                                            "0,0.5", "--layer", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    (p,) = json.loads(res.stdout)
    assert p["kind"] == "ablation" and p["protocol"]["modality"] == "sequence"
    assert p["result"]["units"] == "cycles per token" and p["images"]["n_used"] == 3
    rows = {(r["band"], r["cutoff"]): r["scores"] for r in p["result"]["rows"]}
    assert rows[("all", None)]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("all", None)]["kept_energy"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("low", 0.5)]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("low", 0.0)]["cosine"] < rows[("low", 0.5)]["cosine"]
    assert Profile.load(out / "ablation-random_tiny-bert.json").kind == "ablation"
    assert (out / "ablation.png").is_file()
    res = CliRunner().invoke(app, common + ["--bands", "all"])
    assert res.exit_code == 0 and "cosine" in res.stdout
    for extra, msg in ((["--train", str(tmp_path)], "--train applies to images only"),
                       (["--mode", "input"], "along tokens only"),
                       (["--video", str(tmp_path)], "run them separately")):
        res = CliRunner().invoke(app, common + extra)
        assert res.exit_code == 2 and msg in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
