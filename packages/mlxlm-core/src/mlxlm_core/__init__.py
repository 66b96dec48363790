"""mlxlm-core: load, generate and sample large language models on MLX.

The public face keeps MLX-LM's names, so code written for ``mlx_lm`` ports by changing the
import::

    from mlxlm_core import load, generate
    model, tokenizer = load()            # the default model, offline
    print(generate(model, tokenizer, "What is the capital of France?"))

Public submodules: ``mlxlm_core.models``, ``.cache``, ``.sampling``, ``.adapters``,
``.quantize``, ``.data``.

Importing this package has one deliberate side effect, before anything imports
``mlx.core``: on Linux it loads an optimised BLAS for MLX's CPU kernels if one is installed
(``MLXLM_BLAS=auto|off|/path/to/lib.so``; see ``mlxlm_core._blas``).
"""

# First, before anything imports mlx.core: load the BLAS (the one import-time side effect).
from . import _blas  # noqa: F401  (isort: keep first)
from ._engine import BatchGenerator, BatchResponse
from ._errors import (
    CheckpointError,
    ContextLengthError,
    InvalidArgumentError,
    MlxlmError,
    ModelNotFoundError,
    UnsupportedError,
)
from ._generate import (
    BatchResult,
    GenerationResponse,
    batch_generate,
    generate,
    generate_step,
    stream_generate,
)
from ._loading import load, load_config, load_model, save
from ._tokenizer import TokenizerWrapper, load_tokenizer
from .cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from .sampling import make_logits_processors, make_sampler

__version__ = "0.1.0"

__all__ = [
    "BatchGenerator",
    "BatchResponse",
    "BatchResult",
    "CheckpointError",
    "ContextLengthError",
    "GenerationResponse",
    "InvalidArgumentError",
    "MlxlmError",
    "ModelNotFoundError",
    "TokenizerWrapper",
    "UnsupportedError",
    "__version__",
    "batch_generate",
    "generate",
    "generate_step",
    "load",
    "load_config",
    "load_model",
    "load_prompt_cache",
    "load_tokenizer",
    "make_logits_processors",
    "make_prompt_cache",
    "make_sampler",
    "save",
    "save_prompt_cache",
    "stream_generate",
]
