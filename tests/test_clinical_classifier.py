"""The clinical-accuracy reader (paper A.1): learning, negation, class weights, save/load."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch

from fvlm.clinical_classifier import ClinicalClassifier, classifier_scores, positive_weights

DISEASES = ["kidney/cyst", "gallbladder/gallstone"]
# Each disease: two phrasings that state it and two that deny it. The cyst is denied by negation
# ("no renal cyst" holds every token of "renal cyst"), the gallstone by a normal description.
PRESENT = {
    "kidney/cyst": ["renal cyst.", "a cyst in the left kidney."],
    "gallbladder/gallstone": ["gallstone.", "a stone in the gallbladder."],
}
ABSENT = {
    "kidney/cyst": ["no renal cyst.", "no cyst in the left kidney."],
    "gallbladder/gallstone": ["normal gallbladder.", "the gallbladder is unremarkable."],
}
FILLERS = ["the liver is normal.", "spleen unremarkable.", "no free fluid."]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CACHE = Path("data/cache/phantom")
LABELS = Path("data/phantom/labels.csv")


def _reports(phrasings: tuple[int, int], filler: str) -> tuple[list[str], torch.Tensor]:
    """Every present/absent combination of the two diseases, in both orders.

    Args:
        phrasings: Which phrasing of each disease (in :data:`DISEASES` order) the reports use.
        filler: A sentence about neither disease, first in every report.
    """
    texts, labels = [], []
    for states in itertools.product((0, 1), repeat=len(DISEASES)):
        parts = [
            (PRESENT if state else ABSENT)[d][k]
            for d, state, k in zip(DISEASES, states, phrasings, strict=True)
        ]
        for order in (parts, parts[::-1]):  # a negation's reach is learnt, not its position
            texts.append(" ".join([filler, *order]))
            labels.append(list(states))
    return texts, torch.tensor(labels)


def _split() -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    """Training reports phrase both diseases alike; held-out ones mix the phrasings."""
    train = [_reports((k, k), f) for k in (0, 1) for f in FILLERS]
    held = [_reports(k, FILLERS[0]) for k in ((0, 1), (1, 0))]
    return (
        [t for part in train for t in part[0]],
        torch.cat([part[1] for part in train]),
        [t for part in held for t in part[0]],
        torch.cat([part[1] for part in held]),
    )


@pytest.fixture(scope="module")
def trained(tiny_bert) -> tuple[ClinicalClassifier, list[float]]:
    """A tiny randomly initialised BERT fitted on the templated reports (a few seconds)."""
    texts, labels, _, _ = _split()
    config = tiny_bert(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    torch.manual_seed(0)  # the random init; 3 of 4 seeds reach F1 = 1 (the fourth misses one)
    reader = ClinicalClassifier(DISEASES, config=config)
    history = reader.fit(
        texts, labels, epochs=30, batch_size=8, lr=3e-3, head_lr=3e-3, train_embeddings=True
    )
    return reader, history


def test_positive_weights_are_negatives_over_positives() -> None:
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]])
    # column 0: 2 of 4 positive -> 2/2; column 1: 1 of 4 -> 3/1; column 2: none -> 1.
    assert torch.equal(positive_weights(labels), torch.tensor([1.0, 3.0, 1.0]))
    assert torch.allclose(positive_weights(labels, power=0.5), torch.tensor([1.0, 3.0**0.5, 1.0]))


def test_fit_reads_held_out_phrasings_and_negations(trained) -> None:
    """F1 = 1 on unseen combinations of phrasings, negated and affirmed, in either order."""
    reader, history = trained
    _, _, held, held_labels = _split()
    assert history[-1] < 0.05 * history[0], history
    scores = classifier_scores(reader.predict(held), held_labels, DISEASES)
    assert scores["f1_macro"] == 1.0, scores


def test_fit_is_reproducible_and_leaves_the_global_rng_alone(tiny_bert) -> None:
    """Same seed, same losses (dropout included); the caller's random stream is untouched."""
    texts, labels, _, _ = _split()
    histories = []
    for _ in range(2):
        torch.manual_seed(123)
        reader = ClinicalClassifier(DISEASES, config=tiny_bert(hidden_dropout_prob=0.1))
        state = torch.get_rng_state()
        histories.append(reader.fit(texts[:8], labels[:8], epochs=2, batch_size=4))
        assert torch.equal(torch.get_rng_state(), state)
    assert histories[0] == histories[1]


def test_save_load_round_trip_gives_identical_probabilities(trained, tmp_path, monkeypatch):
    reader, _ = trained
    _, _, held, _ = _split()
    directory = reader.save(tmp_path / "reader")
    assert json.loads((directory / "diseases.json").read_text())["diseases"] == DISEASES
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the classifier must load without unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = ClinicalClassifier.load(directory)
    assert loaded.diseases == DISEASES and loaded.pooling == "mean"
    assert torch.equal(loaded.predict_proba(held), reader.predict_proba(held))


def test_bad_input_is_named(trained, tmp_path) -> None:
    reader, _ = trained
    texts, labels, _, _ = _split()
    with pytest.raises(ValueError, match="labels"):
        reader.fit(texts, labels[:, :1])
    with pytest.raises(FileNotFoundError, match="no clinical classifier"):
        ClinicalClassifier.load(tmp_path)
    with pytest.raises(ValueError, match="at least one disease"):
        ClinicalClassifier([])


@pytest.mark.slow  # fine-tunes MiniLM on the 240 phantom training reports (minutes on 2 cores)
@pytest.mark.skipif(
    not (CACHE / "manifest.csv").is_file() or not LABELS.is_file(),
    reason="needs the demo phantom cache and labels (make phantom preprocess)",
)
def test_phantom_reports_reach_the_papers_f1(tmp_path) -> None:
    """A.1's bar on the phantom: macro F1 > 0.9 on the validation reports (the paper's: 0.95)."""
    from fvlm.lit_modules.report_generation import train_phantom_classifier

    scores = train_phantom_classifier(str(CACHE), str(LABELS), str(tmp_path / "reader"), epochs=6)
    assert scores["f1_macro"] > 0.9, scores  # measured: 0.993 (0.89 after 4 epochs)
