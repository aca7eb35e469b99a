"""Text to token ids: tokenizers, corpora with their train/validation split and
reproducible batches, and memory-mapped corpora made by ``fractalformer prepare``."""

from .corpus import SHIPPED, Corpus, Ids, batch_generator, encode_cached, get_batch, read_text, text_sha256
from .prepared import is_prepared, load_prepared, prepare
from .tokenizers import Tokenizer, get_tokenizer, tokenizer_from_dict

__all__ = ["SHIPPED", "Corpus", "Ids", "Tokenizer", "batch_generator", "encode_cached", "get_batch",
           "get_tokenizer", "is_prepared", "load_prepared", "prepare", "read_text", "text_sha256",
           "tokenizer_from_dict"]
