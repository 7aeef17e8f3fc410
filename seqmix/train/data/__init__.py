"""Data: read documents, tokenize them and pack them into batches with grain."""

from seqmix.train.data.errors import DataError
from seqmix.train.data.pipeline import Mixture, make_dataset, unigram_entropy
from seqmix.train.data.shakespeare import CORPORA, prepare_shakespeare
from seqmix.train.data.sources import read_documents
from seqmix.train.data.tokenized import TokenizedDocuments, read_manifest, tokenize_corpus
from seqmix.train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "CORPORA",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "Mixture",
    "Tokenizer",
    "TokenizedDocuments",
    "load_tokenizer",
    "make_dataset",
    "prepare_shakespeare",
    "read_documents",
    "read_manifest",
    "tokenize_corpus",
    "unigram_entropy",
]
