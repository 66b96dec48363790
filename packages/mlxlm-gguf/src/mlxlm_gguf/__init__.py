"""mlxlm-gguf: GGUF files (llama.cpp's format) in and out of MLX.

`import_gguf` converts a file once into a directory that `mlxlm_core` (or mlx-lm) loads;
`GGUFLoader` is the `mlxlm.loaders` plugin through which core opens `.gguf` paths,
caching each import. `export` writes a loaded model and its tokenizer as a GGUF file
that llama.cpp runs (float or quantized), and is what `mlxlm fuse --export-gguf` calls.
"""

from ._encode import OUT_TYPES
from ._export import ExportReport, export
from ._import import import_gguf
from ._loader import GGUFLoader, imported_cache_dir

__version__ = "0.1.0"

__all__ = [
    "OUT_TYPES",
    "ExportReport",
    "GGUFLoader",
    "__version__",
    "export",
    "import_gguf",
    "imported_cache_dir",
]
