"""Public: text for evaluation, calibration and training, read from local files offline.

One loader shared by ``mlxlm perplexity``, mlxlm-quant's calibration and mlxlm-tune:
:func:`read_texts` reads a ``.txt`` file (one document) or a ``.jsonl`` file (one
``{"text": ...}`` object per line), :func:`token_windows` cuts documents into fixed-length
token windows, and :func:`builtin_text` is the evaluation prose shipped in this folder
(``eval.txt``, original text written for mlxlm and released under its licence).
"""

from .._textdata import BUILTIN_TEXT_NAME, builtin_text, read_texts, token_windows

__all__ = ["BUILTIN_TEXT_NAME", "builtin_text", "read_texts", "token_windows"]
