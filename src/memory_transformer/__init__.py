"""memory-transformer: learnable, chapter-routed memory banks for `transformers` language models."""

from memory_transformer.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_model", "load_model"]


def __getattr__(name):  # keep `import memory_transformer` light: torch/transformers load on first use
    if name == "build_model":
        from memory_transformer.model import build_model

        return build_model
    if name == "load_model":
        from memory_transformer.io import load_model

        return load_model
    raise AttributeError(name)
