"""Native Qwen: config, model, tokenizer and checkpoint loading."""
from .config import ConfigError, ModelArgs, parse_windows
from .loading import ModelLoadError, load_model, load_tokenizer
from .qwen import KVCache, Qwen, init_weights
from .tokenizer import QwenTokenizer, TokenizerError

__all__ = ["ConfigError", "KVCache", "ModelArgs", "ModelLoadError", "Qwen", "QwenTokenizer", "TokenizerError",
           "init_weights", "load_model", "load_tokenizer", "parse_windows"]
