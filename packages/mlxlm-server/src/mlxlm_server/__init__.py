"""mlxlm-server: an OpenAI-compatible HTTP server on mlxlm-core's continuous batching.

Run it with ``mlxlm server --model PATH`` (or ``mlxlm-server``), or embed it::

    from mlxlm_server import ServerConfig, create_app, load_slots
    config = ServerConfig(model="path/to/model", api_keys=("secret",))
    slots, base = load_slots(config)
    app = create_app(config, slots, base)      # any ASGI server can run it

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings,
/v1/responses (stateless), /v1/messages (Anthropic), /health, /metrics, /tokenize,
/detokenize; the OpenAPI document is at /openapi.json.
"""

from ._app import batched_weights, create_app, load_slots
from ._config import ServerConfig
from ._engine_bridge import EngineBridge, Slot
from ._prefix_cache import PrefixCache
from ._structured_schema import SchemaError
from ._tools import PARSERS, ParsedCall, ToolParser, get_parser, register_parser

__version__ = "0.1.0"

__all__ = [
    "PARSERS",
    "EngineBridge",
    "ParsedCall",
    "PrefixCache",
    "SchemaError",
    "ServerConfig",
    "Slot",
    "ToolParser",
    "__version__",
    "batched_weights",
    "create_app",
    "get_parser",
    "load_slots",
    "register_parser",
]
