"""mlxlm-gguf: read GGUF files (llama.cpp's format) into MLX model directories.

`import_gguf` converts a file once into a directory that `mlxlm_core` (or mlx-lm) loads;
`GGUFLoader` is the `mlxlm.loaders` plugin through which core opens `.gguf` paths,
caching each import.
"""

from ._import import import_gguf
from ._loader import GGUFLoader, imported_cache_dir

__version__ = "0.1.0"

__all__ = ["GGUFLoader", "__version__", "import_gguf", "imported_cache_dir"]
