"""``mlxlm server`` / ``mlxlm-server``: load a model and serve it over HTTP.

Binds 127.0.0.1 unless told otherwise. When the engine fails more often than
``--max-restarts`` (or at once with ``--on-engine-failure exit``) the process exits with
status 3, so a supervisor (systemd, Docker, Kubernetes) can restart it. With ``--shard``
under ``mlx.launch``, rank 0 serves and the other ranks follow its engine
(:mod:`._distributed`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os

from mlxlm_core import InvalidArgumentError
from mlxlm_core.cli import Command, add_model_args, console, load_from_args

from ._config import ServerConfig

__all__ = ["COMMAND", "main"]

ENGINE_FAILURE_STATUS = 3


def _pairs(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidArgumentError(f"--adapter wants NAME=PATH, got {item!r}")
        out[name] = path
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--served-model-name", default=None, help="the model id clients use")
    g.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="serve a LoRA adapter under NAME (repeatable)",
    )
    g.add_argument(
        "--api-key",
        action="append",
        help="require this key (repeatable; also MLXLM_API_KEYS, comma-separated)",
    )
    g.add_argument(
        "--allowed-origins", action="append", help="CORS origins to allow (default: none)"
    )
    g.add_argument(
        "--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"]
    )
    b = parser.add_argument_group("bounds")
    b.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    b.add_argument(
        "--max-tokens-limit",
        type=int,
        default=d.max_tokens_limit,
        help="largest max_tokens a request may ask",
    )
    b.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    b.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="default: the model's context"
    )
    b.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="generations queued or running before 429",
    )
    b.add_argument("--max-n", type=int, default=d.max_n)
    b.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds")
    e = parser.add_argument_group("engine")
    e.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    e.add_argument("--prefill-batch-size", type=int, default=d.prefill_batch_size)
    e.add_argument("--prefill-step-size", type=int, default=d.prefill_step_size)
    e.add_argument(
        "--prefix-cache-bytes",
        type=int,
        default=d.prefix_cache_bytes,
        help="0 disables prefix reuse",
    )
    e.add_argument(
        "--prompt-cache-file", default=None, help="a file from `mlxlm cache-prompt` to start with"
    )
    e.add_argument("--on-engine-failure", choices=["restart", "exit"], default=d.on_engine_failure)
    e.add_argument("--max-restarts", type=int, default=d.max_restarts)
    e.add_argument(
        "--tool-parser", default=d.tool_parser, help="auto, hermes, qwen, llama3, mistral"
    )
    e.add_argument(
        "--chat-template-args", default=None, help='JSON object, e.g. {"enable_thinking": false}'
    )
    e.add_argument(
        "--shard-timeout",
        type=float,
        default=300.0,
        help="with --shard: give up on the other ranks after this many seconds without "
        "progress inside an engine step (default 300)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    keys = list(args.api_key or [])
    keys += [k for k in os.environ.get("MLXLM_API_KEYS", "").split(",") if k.strip()]
    template_args = {}
    if args.chat_template_args:
        try:
            template_args = json.loads(args.chat_template_args)
        except ValueError as exc:
            raise InvalidArgumentError(f"--chat-template-args is not JSON ({exc})") from None
        if not isinstance(template_args, dict):
            raise InvalidArgumentError("--chat-template-args must be a JSON object")
    origins = [o for item in args.allowed_origins or [] for o in item.split(",") if o]
    return ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        adapters=_pairs(args.adapter),
        host=args.host,
        port=args.port,
        api_keys=tuple(k.strip() for k in keys),
        allowed_origins=tuple(origins),
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_queue=args.max_queue,
        max_n=args.max_n,
        request_timeout=args.request_timeout,
        max_batch_size=args.max_batch_size,
        prefill_batch_size=args.prefill_batch_size,
        prefill_step_size=args.prefill_step_size,
        prefix_cache_bytes=args.prefix_cache_bytes,
        prompt_cache_file=args.prompt_cache_file,
        on_engine_failure=args.on_engine_failure,
        max_restarts=args.max_restarts,
        tool_parser=args.tool_parser,
        chat_template_args=template_args,
        dtype=args.dtype,
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ._app import create_app
    from ._engine_bridge import Slot

    config = config_from_args(args)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    from ._app import batched_weights

    auto = getattr(args, "weight_mode", "auto") == "auto"
    with batched_weights() if auto else contextlib.nullcontext():
        model, tokenizer = load_from_args(args)
    sharded = None
    if getattr(args, "shard", None):
        from ._distributed import Sharded

        sharded = Sharded.join(model, timeout=args.shard_timeout)
        config = sharded.adjust(config)
        if not sharded.primary:
            return sharded.follow()  # never binds a port
    base = config.served_model_name or args.model or "default"
    slots = {base: Slot(base, model, tokenizer)}
    if config.adapters:
        from mlxlm_core import load

        for name, path in config.adapters.items():
            with batched_weights() if auto else contextlib.nullcontext():
                m, t = load(
                    args.model,
                    adapter_path=path,
                    dtype=args.dtype,
                    weight_mode=args.weight_mode,
                    revision=args.revision,
                )
            slots[name] = Slot(name, m, t)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config, slots, base, on_fatal=on_fatal)
    if sharded is not None:
        sharded.leader(app.state.server.bridge)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level)
    )
    server.run()
    return ENGINE_FAILURE_STATUS if failed else 0


COMMAND = Command(
    name="server",
    help="serve a model over an OpenAI-compatible HTTP API",
    add_arguments=add_arguments,
    run=run,
)
main = console(COMMAND)
