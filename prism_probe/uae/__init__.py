"""The Unified Autoencoder (UAE): the toolkit's reference unified encoder and its trainer.

- :mod:`prism_probe.uae.model`: unified encoder (a registered semantic encoder's token grid and
  a frozen teacher copy), the frequency-band modulator (FFT rings, paper v1; DCT zig-zag, v5),
  the MAE-style ViT and small conv pixel decoders.
- :mod:`prism_probe.uae.losses`: L1, perceptual (LPIPS or the feature-distance fallback),
  semantic, patch discriminator with hinge loss and the adaptive weight.
- :mod:`prism_probe.uae.train`: staged training (``prism-probe train-uae``), checkpoints,
  resume, torchrun.
- :mod:`prism_probe.uae.eval`: PSNR, SSIM, Fréchet distance, band-wise reconstructions
  (``prism-probe eval-uae``).

Presets live in ``prism_probe/uae/presets/*.yaml`` (``tiny-cpu``, ``paper-dinov2-b``).
Importing this package does not import torch.
"""

PRESETS = ("tiny-cpu", "paper-dinov2-b")
