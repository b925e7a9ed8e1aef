"""Data preparation: text -> cleaning -> tokenizer -> train/val token shards (memmap) + manifest.json."""

from kiln.data.prepare import prepare
from kiln.data.shards import TokenShards, read_manifest
from kiln.data.text import Corpus, clean_text
from kiln.data.tokenizer import eot_id, load_tokenizer, train_tokenizer

__all__ = ["prepare", "TokenShards", "read_manifest", "Corpus", "clean_text", "eot_id", "load_tokenizer",
           "train_tokenizer"]
