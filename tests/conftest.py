"""Fixtures shared by the test files: offline model hubs, the anatomy presets and a tiny BERT.

A fixture lives here once two files need it; a file's own helpers stay in that file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from fvlm.anatomy import AnatomyTable, load_anatomy_table

# Nothing downloads at test time, however pytest is started (the Makefile sets these as well).
# Set before any test module imports transformers or huggingface_hub, which read them on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# MiniLM's WordPiece vocabulary (that of bert-base-uncased): ids from the real tokenizer fit.
MINILM_VOCAB_SIZE = 30522

TinyBert = Callable[..., dict[str, int | float]]


@pytest.fixture(scope="session")
def paper_table() -> AnatomyTable:
    """The paper's 35-anatomy table (Tab. 6); immutable, so one instance serves every test."""
    return load_anatomy_table("paper")


@pytest.fixture(scope="session")
def chest_table() -> AnatomyTable:
    """The chest table of the CT-RATE evaluation."""
    return load_anatomy_table("chest")


@pytest.fixture(scope="session")
def tiny_bert() -> TinyBert:
    """Factory of keyword arguments for a 1-layer, 16-wide ``BertConfig``.

    ``tiny_bert()`` gives a fresh dict (so a test may change it); keyword overrides replace single
    values, e.g. ``tiny_bert(hidden_dropout_prob=0.1)``. The LightningModules take the dict as
    ``text_config``; the plain models take ``BertConfig(**tiny_bert())``. Dropout is 0 so two
    forward passes agree, and the vocabulary is MiniLM's so token ids from the real tokenizer fit.
    """

    def make(**overrides: int | float) -> dict[str, int | float]:
        config: dict[str, int | float] = {
            "vocab_size": MINILM_VOCAB_SIZE,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
        from transformers import BertConfig  # imported on use: not every test file needs it

        unknown = set(overrides) - set(BertConfig().to_dict())
        if unknown:  # BertConfig itself accepts any key silently
            raise TypeError(f"tiny_bert: unknown BertConfig keys {sorted(unknown)}")
        return config | overrides

    return make


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Millisecond training steps run faster on one intra-op thread on a shared machine; the
    thread count and Lightning's ``seed_everything`` variables come back afterwards."""
    threads = torch.get_num_threads()
    env = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
