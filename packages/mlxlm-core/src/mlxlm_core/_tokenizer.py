"""The tokenizer: a Hugging Face fast tokenizer plus end-of-sequence ids, chat template and
streaming detokenizer, loaded from a local model directory.

:class:`TokenizerWrapper` keeps MLX-LM's shape (``tokenizer.detokenizer``,
``tokenizer.eos_token_ids``, every other attribute forwarded to the wrapped tokenizer) so
code written against ``mlx_lm.tokenizer_utils.TokenizerWrapper`` keeps working.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._detokenizer_select import DetokenizerFactory, make_detokenizer_factory
from ._detokenizers import StreamingDetokenizer
from ._errors import CheckpointError, InvalidArgumentError, ModelNotFoundError

__all__ = ["TokenizerWrapper", "load_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


class TokenizerWrapper:
    """A Hugging Face tokenizer with the extras generation needs.

    ``eos_token_ids`` is the set of ids that end generation: the tokenizer's own EOS,
    ``generation_config.json``'s ``eos_token_id`` and any ids given explicitly; any of them
    stops (chat checkpoints often name their end-of-turn token only in
    ``generation_config.json``, and missing it lets the model run on). ``vocab_size`` counts
    every id the tokenizer can produce or decode, added tokens included (Hugging Face's
    ``vocab_size`` leaves those out; ``len()`` and this agree).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        eos_token_ids: Iterable[int] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        ids = {int(i) for i in eos_token_ids or ()}
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        self._eos_token_ids = ids
        self._factory: DetokenizerFactory | None = None

    # --- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int] | int, *, skip_special_tokens: bool = False) -> str:
        # ints, numpy or mx.array items alike: transformers wants plain ints
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    @property
    def bos_token(self) -> str | None:
        return self._tokenizer.bos_token

    # --- end of sequence ------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, value: Iterable[int] | None) -> None:
        self._eos_token_ids = {int(i) for i in value or ()}

    def add_eos_token(self, token: str | int) -> None:
        """Stop generation on ``token`` too (an id, or a token string of this vocabulary)."""
        if isinstance(token, int) or (isinstance(token, str) and token.isdigit()):
            token_id = int(token)
        else:
            token_id = self._tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self._tokenizer.unk_token_id:
                raise InvalidArgumentError(f"{token!r} is not a token of this tokenizer")
        if not 0 <= token_id < len(self._tokenizer):
            raise InvalidArgumentError(f"token id {token_id} is outside the vocabulary")
        self._eos_token_ids.add(token_id)

    # --- chat -----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | dict | None:
        """The template in use: the explicit one if given, else the tokenizer's."""
        if self._chat_template is not None:
            return self._chat_template
        return self._tokenizer.chat_template

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self._chat_template = value

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any] | Any] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render one conversation with the chat template; token ids unless ``tokenize=False``.

        ``tools`` are JSON-schema dicts (or Python functions, which transformers describes
        from their signature and docstring). Extra keyword arguments reach the template
        (``enable_thinking=False``, ``continue_final_message=True``, ``documents=…``).
        """
        if not self.has_chat_template:
            raise InvalidArgumentError(
                "this tokenizer has no chat template; pass a chat template or a raw prompt"
            )
        if isinstance(messages, (str, bytes)) or not all(
            isinstance(m, Mapping) and "role" in m for m in messages
        ):
            raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...}")
        if self._chat_template is not None:
            template_kwargs.setdefault("chat_template", self._chat_template)
        import jinja2

        try:
            out = self._tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tools=None if tools is None else list(tools),
                add_generation_prompt=add_generation_prompt,
                tokenize=tokenize,
                return_dict=False,
                **template_kwargs,
            )
        except (jinja2.TemplateError, ValueError) as e:
            raise InvalidArgumentError(f"chat template failed: {_one_line(e)}") from e
        if not tokenize:
            return out
        if hasattr(out, "tolist"):
            out = out.tolist()
        return [int(i) for i in out]

    # --- streaming ------------------------------------------------------------------------

    @property
    def detokenizer_kind(self) -> str:
        """``"bpe"``, ``"spm"`` or ``"naive"``: which streaming detokenizer this vocabulary uses."""
        return self._detokenizer_factory().kind

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A NEW streaming detokenizer (one per sequence being generated)."""
        return self._detokenizer_factory()()

    def make_detokenizer(self, *, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A new streaming detokenizer; ``skip_special_tokens`` as in :meth:`decode`."""
        return self._detokenizer_factory()(skip_special_tokens=skip_special_tokens)

    def _detokenizer_factory(self) -> DetokenizerFactory:
        # Built on first use: the per-id tables cost a pass over the vocabulary.
        if self._factory is None:
            self._factory = make_detokenizer_factory(self._tokenizer)
        return self._factory

    # --- everything else is the wrapped tokenizer's -----------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The wrapped Hugging Face tokenizer."""
        return self._tokenizer

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks; private names never forward, so copying
        # or unpickling a half-built wrapper cannot recurse.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or hasattr(type(self), name):
            super().__setattr__(name, value)
        else:
            setattr(self._tokenizer, name, value)

    def __repr__(self) -> str:
        name = getattr(self._tokenizer, "name_or_path", "") or type(self._tokenizer).__name__
        return f"TokenizerWrapper({name!r}, vocab_size={len(self)})"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _eos_ids(value: Any, source: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{source}: eos_token_id must be an int or a list of ints")
    return list(values)


def load_tokenizer(
    model_path: Path,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    eos_token_ids: list[int] | None = None,
    chat_template: str | None = None,
) -> TokenizerWrapper:
    """Load the tokenizer of a local model directory, offline.

    Reads ``tokenizer.json`` (or another format transformers converts),
    ``tokenizer_config.json``, ``chat_template.jinja`` and ``generation_config.json``.
    ``tokenizer_config`` overrides entries of ``tokenizer_config.json`` (for example
    ``{"eos_token": "<|im_end|>"}``); ``eos_token_ids`` adds end-of-sequence ids;
    ``chat_template`` replaces the checkpoint's template.
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise ModelNotFoundError(f"model directory {model_path} does not exist")
    if not any((model_path / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {model_path} (expected tokenizer.json)")
    _read_json(model_path / "tokenizer_config.json")  # a clear message if it is corrupt
    generation = _read_json(model_path / "generation_config.json") or {}

    import transformers

    options = {"local_files_only": True, **(tokenizer_config or {})}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, **options)
    except Exception as e:  # transformers and tokenizers raise many types for a bad file
        raise CheckpointError(f"cannot load the tokenizer in {model_path}: {_one_line(e)}") from e

    template_file = model_path / "chat_template.jinja"
    if tokenizer.chat_template is None and template_file.is_file():
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")

    eos = _eos_ids(generation.get("eos_token_id"), model_path / "generation_config.json")
    eos += [int(i) for i in eos_token_ids or ()]
    return TokenizerWrapper(tokenizer, eos_token_ids=eos, chat_template=chat_template)
