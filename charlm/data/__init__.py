"""Data: the vocabulary, reading text, token files on disk, (T, N) batches for BPTT, and the
atomic, checksummed .npz files that checkpoints are made of. NumPy only (no kernels)."""
from .batches import Batches, eval_windows, split_train_val
from .corpus import check_text_file, default_corpus, iter_text, read_text
from .tokens import TOKENS_FILE, VAL_TOKENS_FILE, file_digest, open_tokens, write_tokens
from .vocab import EOS_CHAR, EOS_WORD, UNK_WORD, Vocab, id_dtype, scan_vocab

__all__ = ["Batches", "eval_windows", "split_train_val", "check_text_file", "default_corpus", "iter_text",
           "read_text", "TOKENS_FILE", "VAL_TOKENS_FILE", "file_digest", "open_tokens", "write_tokens",
           "EOS_CHAR", "EOS_WORD", "UNK_WORD", "Vocab", "id_dtype", "scan_vocab"]
