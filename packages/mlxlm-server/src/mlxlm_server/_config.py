"""Server settings: one dataclass, filled by the CLI or by code that embeds the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxlm_core import InvalidArgumentError

__all__ = ["ServerConfig"]


@dataclass
class ServerConfig:
    """Everything the server needs to know before it loads a model.

    The defaults are safe for a workstation: loopback only, no CORS, bounded bodies,
    prompts, outputs and queues, and a dead engine restarted a few times before the
    process gives up (exits non-zero).
    """

    model: str | None = None  # a directory, .gguf file or repo id; None: the default model
    served_model_name: str | None = None  # the id clients use; default: the model reference
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter directory
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # Bounds: each one turns into a clear 4xx (413, 400, 429) instead of an overload.
    max_body_bytes: int = 4 << 20
    max_tokens_limit: int = 4096
    default_max_tokens: int = 512
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_queue: int = 64  # generations waiting or running; more get 429
    max_n: int = 8
    max_top_logprobs: int = 20
    request_timeout: float = 600.0  # seconds for one request, queueing included
    # Engine.
    max_batch_size: int = 16
    prefill_batch_size: int = 8
    # Prompt tokens per prefill chunk (and fed per step while others decode); None: the
    # execution policy's (512 on CPU, 2048 on GPU).
    prefill_step_size: int | None = None
    prefix_cache_bytes: int = 512 << 20  # 0 turns the prefix cache off
    prompt_cache_file: str | None = None
    on_engine_failure: str = "restart"  # "restart" or "exit"
    max_restarts: int = 3
    restart_delay: float = 1.0
    stall_timeout: float = 300.0  # a busy engine silent this long is reported unhealthy
    # Prompting.
    tool_parser: str = "auto"
    chat_template_args: dict[str, object] = field(default_factory=dict)
    dtype: str = "auto"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.on_engine_failure not in ("restart", "exit"):
            raise InvalidArgumentError(
                f"on_engine_failure must be 'restart' or 'exit', got {self.on_engine_failure!r}"
            )
        for name in ("max_body_bytes", "max_tokens_limit", "max_queue", "max_n", "max_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout <= 0:
            raise InvalidArgumentError(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
