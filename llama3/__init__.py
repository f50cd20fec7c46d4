"""Pure-PyTorch Llama 3.1/3.2 with hook sites for activations and SAE functions."""

from .args import ModelArgs
from .generation import Completion, Llama, StreamStep
from .model import Site, Transformer, parse_site, site_name
from .tokenizer import ChatFormat, Tokenizer

__all__ = ["ChatFormat", "Completion", "Llama", "ModelArgs", "Site", "StreamStep", "Tokenizer", "Transformer",
           "parse_site", "site_name"]
