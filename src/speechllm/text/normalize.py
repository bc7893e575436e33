"""Text normalisation for scoring (ESPnet ``whisper_basic`` cleaner equivalent).

Only scoring code should call these; raw references and hypotheses are stored untouched.

Known flaw (kept for comparability with BLOOMZMMS): ``BasicTextNormalizer`` replaces Unicode
combining marks (category ``M*``) with spaces, which splits Brahmic, Thai and vowelled Arabic
words and lowers their WER artificially. Report CER alongside WER for such languages.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.metadata import version


@cache
def _basic_normalizer() -> Callable[[str], str]:
    """Shared normaliser instance (default options, as ESPnet's ``whisper_basic``). Imported here: importing
    transformers takes most of a second, which jobs that only read scores (tables, plots) should not pay."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def basic_normalize(text: str) -> str:
    """Lower-case, drop bracketed spans and punctuation/symbols, collapse whitespace, strip."""
    return _basic_normalizer()(text).strip()


def normalizer_version() -> str:
    """Identify the normaliser implementation, e.g. ``transformers==5.23.0 BasicTextNormalizer``."""
    return f"transformers=={version('transformers')} BasicTextNormalizer"
