"""What the routes share: settings, the engine bridge, model slots, metrics, helpers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlxlm_core import MlxlmError

from ._config import ServerConfig
from ._engine_bridge import EngineBridge, Slot
from ._errors import APIError, bad_request
from ._generation import GenParams, parse_logit_bias, parse_stop
from ._metrics import Metrics
from ._schemas_common import ResponseFormat, SamplingFields
from ._structured import SchemaError, compile_constraint, json_processor, schema_constraint
from ._tools import ToolParser, get_parser

__all__ = ["ServerState", "new_id"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class ServerState:
    config: ServerConfig
    bridge: EngineBridge
    slots: dict[str, Slot]
    base: str  # the base model's served name
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))

    # --- models --------------------------------------------------------------------------
    def slot(self, name: str | None) -> Slot:
        """The slot a request's ``model`` names; nothing outside the allow-list loads."""
        if name is None or name == "" or name == "default":
            return self.slots[self.base]
        found = self.slots.get(name)
        if found is None:
            known = ", ".join(sorted(self.slots))
            raise APIError(
                404,
                f"model {name!r} is not served here (served: {known})",
                param="model",
                code="model_not_found",
            )
        return found

    def context_length(self, slot: Slot) -> int | None:
        args = getattr(slot.model, "args", None)
        return getattr(args, "max_position_embeddings", None)

    def vocab_size(self, slot: Slot) -> int:
        return len(slot.tokenizer)

    def eos(self, slot: Slot) -> list[int]:
        return sorted(int(i) for i in slot.tokenizer.eos_token_ids)

    # --- bounds --------------------------------------------------------------------------
    def check_prompt(self, slot: Slot, prompt: Sequence[int]) -> None:
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        limit = self.config.max_prompt_tokens or self.context_length(slot)
        if limit and len(prompt) > limit:
            raise bad_request(
                f"the prompt has {len(prompt)} tokens, more than this server's limit of {limit}",
                code="context_length_exceeded",
            )
        vocab = self.vocab_size(slot)
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")

    def max_tokens(self, *values: int | None) -> int:
        wanted = next((v for v in values if v is not None), self.config.default_max_tokens)
        if wanted > self.config.max_tokens_limit:
            raise bad_request(
                f"max_tokens {wanted} exceeds this server's limit of {self.config.max_tokens_limit}",
                param="max_tokens",
            )
        return wanted

    def check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise bad_request(f"n must be <= {self.config.max_n}", param="n")

    # --- sampling ------------------------------------------------------------------------
    def params(
        self, slot: Slot, req: SamplingFields, *, max_tokens: int, logprobs: int | None
    ) -> GenParams:
        if logprobs is not None and logprobs > self.config.max_top_logprobs:
            raise bad_request(
                f"top_logprobs must be <= {self.config.max_top_logprobs}", param="top_logprobs"
            )
        return GenParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=parse_logit_bias(req.logit_bias, self.vocab_size(slot)),
            seed=req.seed,
            stop=parse_stop(req.stop),
            stop_token_ids=list(req.stop_token_ids or []),
            logprobs=logprobs,
        )

    def response_format(self, slot: Slot, fmt: ResponseFormat | None, params: GenParams) -> None:
        if fmt is None or fmt.type == "text":
            return
        if fmt.type == "json_object":
            schema: Any = {"type": "object"}
        else:
            if fmt.json_schema is None:
                raise bad_request(
                    "response_format json_schema needs a json_schema", param="response_format"
                )
            schema = fmt.json_schema.schema_
        try:
            constraint = schema_constraint(schema, slot.tokenizer, self.eos(slot))
        except SchemaError as exc:
            raise bad_request(f"response_format: {exc}", param="response_format") from None
        except (RecursionError, MlxlmError, ValueError, TypeError) as exc:
            raise bad_request(
                f"response_format: cannot use this schema ({exc})", param="response_format"
            ) from None
        params.constraint = lambda: json_processor(constraint)

    def plan_tools(
        self,
        slot: Slot,
        params: GenParams,
        tools: list[dict[str, Any]] | None,
        choice: str,
        *,
        named: str | None = None,
        parallel: bool = True,
        structured: bool = False,
    ) -> tuple[list[dict[str, Any]] | None, ToolParser | None]:
        """Which tools the chat template sees and which parser reads the reply.

        ``tools`` are OpenAI function tools; ``choice`` is ``auto``, ``none``, ``required``
        or ``named`` (then ``named`` is the tool). A required or named call is forced by
        constrained decoding in the parser's format; ``structured`` says a response format
        is already enforced (the two cannot be combined).
        """
        if not tools:
            if choice in ("required", "named"):
                raise bad_request("tool_choice needs tools", param="tool_choice")
            return None, None
        if choice == "none":
            return None, None
        if choice != "auto":
            forced = tools
            if choice == "named":
                forced = [t for t in tools if t["function"]["name"] == named]
                if not forced:
                    raise bad_request(
                        f"tool_choice names an unknown tool {named!r}", param="tool_choice"
                    )
            if structured:
                raise bad_request(
                    "response_format cannot be combined with a forced tool call",
                    param="response_format",
                )
            self.force_tool_call(slot, forced, params, parallel=parallel and choice != "named")
        return tools, self.tool_parser(slot)

    def tool_parser(self, slot: Slot) -> ToolParser:
        return get_parser(self.config.tool_parser, slot.tokenizer.chat_template)

    def force_tool_call(
        self, slot: Slot, tools: list[dict[str, Any]], params: GenParams, *, parallel: bool
    ) -> None:
        parser = self.tool_parser(slot)
        key = json.dumps([parser.name, parallel, tools], sort_keys=True)
        try:
            constraint = compile_constraint(
                key,
                lambda c: parser.build_format(c, tools, parallel=parallel),
                slot.tokenizer,
                self.eos(slot),
            )
        except SchemaError as exc:
            raise bad_request(f"tools: {exc}", param="tools") from None
        params.constraint = lambda: json_processor(constraint)
