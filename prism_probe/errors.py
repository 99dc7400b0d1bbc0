"""Errors a user can act on.

Every error raised to a user is a :class:`PrismError` whose message is one line naming the file,
entry or value that is wrong and what to do about it. The CLI prints the message (no traceback)
and exits with :attr:`PrismError.exit_code`.
"""


class PrismError(Exception):
    """Base class of errors reported to the user as one line."""

    exit_code = 2


class RegistryError(PrismError):
    """An encoder entry is malformed, unknown or duplicated."""


class WeightsError(PrismError):
    """Weights are missing, fail their checksum, or do not fit the architecture."""


class ImageReadError(PrismError):
    """One image file could not be decoded (callers usually skip and count it)."""


class NoImagesError(PrismError):
    """An image source yielded no readable image."""


class NumericsError(PrismError):
    """Features are non-finite, or a grid has no spectrum."""


class OutputError(PrismError):
    """An output path cannot be written."""


class ImageSourceError(PrismError):
    """An image source (folder, pattern, list, class folder) is missing or malformed."""


class PreprocessError(PrismError):
    """Preprocessing settings are invalid, or an image does not fit them."""
