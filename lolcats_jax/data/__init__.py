"""Training data: sources → rendering/tokenisation → packing → grain datasets and iterators.

* :mod:`.sources`   — Alpaca JSON/JSONL, text (.txt, JSONL ``text``) and Hugging Face arrow shards.
* :mod:`.tokenize`  — Alpaca / chat templates, prompt-masked labels, text documents with EOS.
* :mod:`.packing`   — fixed-length chunks (LoLCATS ``ConcatDataset`` rules).
* :mod:`.cache`     — fingerprinted, atomically written ``.npy`` cache of packed chunks.
* :mod:`.pipeline`  — ``build_datasets``, ``make_train_iterator``, ``make_eval_iterator``.
* :mod:`.prepare`   — ``python -m lolcats_jax.data.prepare --demo --out data/demo`` (demo corpora).
"""

from lolcats_jax.data.packing import check_chunk_size, pack
from lolcats_jax.data.pipeline import build_datasets, make_eval_iterator, make_train_iterator, steps_per_epoch
from lolcats_jax.data.sources import AlpacaRecord, load_records, resolve_paths
from lolcats_jax.data.tokenize import IGNORE, render_alpaca_prompt, tokenize_records

__all__ = [
    "IGNORE",
    "AlpacaRecord",
    "build_datasets",
    "check_chunk_size",
    "load_records",
    "make_eval_iterator",
    "make_train_iterator",
    "pack",
    "render_alpaca_prompt",
    "resolve_paths",
    "steps_per_epoch",
    "tokenize_records",
]
