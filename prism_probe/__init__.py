"""prism-probe: frequency spectra of vision encoders' features.

Importing the package is cheap: torch, timm and the other ecosystem libraries are only imported
by the modules that need them, so the command line starts quickly.
"""

__version__ = "0.1.0"
