"""SentencePiece (BPE) tokenizers from GGUF metadata (`tokenizer.ggml.model = "llama"`).

GGUF keeps SentencePiece's pieces, scores and piece types but no merge list. SentencePiece
BPE merges, at every step, the adjacent pair whose concatenation is the highest-scoring
piece, so ranking every (left, right) split of every piece by the score of the whole
piece gives a merge list with the same behaviour for the `tokenizers` BPE model. Unknown
characters fall back to the <0xXX> byte pieces, as SentencePiece's byte fallback does.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers

_NORMAL, _UNUSED = 1, 5
SPACE = "▁"


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges for every piece that splits into two known pieces, best-scoring piece first."""
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _UNUSED)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[pid], pid, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_spm_tokenizer(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    unk_token: str | None,
    add_prefix_space: bool,
) -> Tokenizer:
    """A `tokenizers` equivalent of the SentencePiece model the metadata describes."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    bpe = models.BPE(
        vocab=vocab,
        merges=spm_merges(tokens, scores, types),
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    replace = normalizers.Replace(" ", SPACE)
    if add_prefix_space:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace])
    else:
        tok.normalizer = replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok
