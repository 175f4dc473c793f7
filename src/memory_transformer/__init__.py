"""memory-transformer: learnable, chapter-routed memory banks for `transformers` language models."""

from memory_transformer.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_model", "load_model"]


def __getattr__(name):  # keep `import memory_transformer` light: torch/transformers load on first use
    if name in ("build_model", "load_model"):
        from memory_transformer import model

        return getattr(model, name)
    raise AttributeError(name)
