"""Zero-shot prompts and scoring with hand-made embeddings and hand-computed probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvlm.anatomy import Anatomy, AnatomyTable, Disease, load_anatomy_table
from fvlm.evaluation import PromptTemplates, build_prompts, whole_scan_embedding, zero_shot_scores

ONE = PromptTemplates(
    positive=("{anatomy} shows {term}.",), negative=("{anatomy} shows no {term}.",)
)
E = torch.eye(6, dtype=torch.float32)  # orthonormal directions e0..e5


def _anatomy(id_: int, name: str, diseases: tuple[Disease, ...]) -> Anatomy:
    return Anatomy(id_, name, name, "organs", (), (), (name,), diseases)


def _table() -> AnatomyTable:
    emphysema = Disease("emphysema", "Emphysema", "lung", ("emphysema",), ("t",))
    cardiomegaly = Disease("cardiomegaly", "Cardiomegaly", "heart", ("an enlarged heart",), ("t",))
    nodes = Disease("lymphadenopathy", "Lymphadenopathy", None, ("lymphadenopathy",), ("t",))
    return AnatomyTable(
        "tiny",
        (_anatomy(1, "lung", (emphysema,)), _anatomy(2, "heart", (cardiomegaly,))),
        global_diseases=(nodes,),
    )


# Prompt embeddings: lung/emphysema pos e0, neg e1; heart/cardiomegaly pos e2, neg e3;
# global/lymphadenopathy pos = normalised (e0 + e2) (the mean of a lung and heart image), neg e4.
PROMPT_EMB = {
    "lung shows emphysema.": E[0],
    "lung shows no emphysema.": E[1],
    "heart shows an enlarged heart.": E[2],
    "heart shows no enlarged heart.": E[3],
    "scan shows lymphadenopathy.": F.normalize(E[0] + E[2], dim=0),
    "scan shows no lymphadenopathy.": E[4],
}


class Encoder:
    """Looks prompts up in a table and records every call."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([3.0 * self.table[t] for t in texts])  # unnormalised on purpose


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_prompts_follow_templates_and_terms() -> None:
    prompts = build_prompts(_table(), templates=ONE)
    assert prompts["lung/emphysema"] == (["lung shows emphysema."], ["lung shows no emphysema."])
    # the article is dropped only on the negative side
    assert prompts["heart/cardiomegaly"][1] == ["heart shows no enlarged heart."]
    assert prompts["global/lymphadenopathy"][0] == ["scan shows lymphadenopathy."]


def test_default_prompts_cover_the_chest_preset() -> None:
    table = load_anatomy_table("chest")
    prompts = build_prompts(table)
    assert len(prompts) == 18
    pos, neg = prompts["heart/cardiomegaly"]
    # 4 positive templates x 2 terms; the 4 default negatives describe a normal heart (no term)
    assert len(pos) == 8 and len(neg) == 4
    assert table["heart"].default_text in neg  # "heart shows no significant abnormalities."
    assert "There is an enlarged heart in the heart." in pos
    assert "Unremarkable heart." in neg
    assert all("{" not in t for p, n in prompts.values() for t in (*p, *n))


def test_anatomy_equal_to_positive_or_negative_prompt() -> None:
    table = _table()
    # study 0: lung image = positive prompt; study 1: lung image = negative prompt
    image = torch.stack([torch.stack([E[0], E[2]]), torch.stack([E[1], E[3]])])
    valid = torch.ones(2, 2, dtype=torch.bool)
    scores = zero_shot_scores(image, valid, Encoder(PROMPT_EMB), 10.0, table, templates=ONE)
    assert list(scores.columns) == [
        "lung/emphysema",
        "heart/cardiomegaly",
        "global/lymphadenopathy",
    ]
    # cos(pos) - cos(neg) = +1 / -1  ->  P = sigmoid(+-10)
    assert scores.loc[0, "lung/emphysema"] == pytest.approx(_sigmoid(10.0), rel=1e-6)
    assert scores.loc[1, "lung/emphysema"] == pytest.approx(_sigmoid(-10.0), rel=1e-4)
    assert scores.loc[0, "heart/cardiomegaly"] > 0.5 > scores.loc[1, "heart/cardiomegaly"]


def test_probability_is_monotonic_in_logit_scale() -> None:
    table = _table()
    image = torch.stack([F.normalize(E[0] + 0.5 * E[1], dim=0), E[2]]).unsqueeze(0)
    image = torch.cat([image, torch.stack([F.normalize(E[1] + 0.5 * E[0], dim=0), E[3]])[None]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    previous = None
    for scale in (1.0, 5.0, 14.3, 50.0):
        p = zero_shot_scores(image, valid, Encoder(PROMPT_EMB), scale, table, templates=ONE)
        p = p["lung/emphysema"].to_numpy()
        assert p[0] > 0.5 > p[1]
        if previous is not None:
            assert p[0] > previous[0] and p[1] < previous[1]
        previous = p
    # exact: cos(pos) - cos(neg) = (1 - 0.5) / sqrt(1.25) for study 0
    assert previous[0] == pytest.approx(_sigmoid(50.0 * 0.5 / math.sqrt(1.25)), rel=1e-5)


def test_global_diseases_use_the_mean_of_valid_anatomies() -> None:
    table = _table()
    image = torch.stack([E[0], E[2]])[None]  # lung e0, heart e2
    valid = torch.ones(1, 2, dtype=torch.bool)
    scores = zero_shot_scores(image, valid, Encoder(PROMPT_EMB), 10.0, table, templates=ONE)
    # whole-scan = (e0 + e2)/sqrt 2 = positive prompt exactly; negative e4 is orthogonal
    assert scores.loc[0, "global/lymphadenopathy"] == pytest.approx(_sigmoid(10.0), rel=1e-6)
    whole = whole_scan_embedding(image, valid)
    assert torch.allclose(whole[0], F.normalize(E[0] + E[2], dim=0))


def test_invalid_anatomy_is_not_evaluable_and_counted() -> None:
    table = _table()
    # study a: heart invalid -> cardiomegaly NaN (no substitute); lymphadenopathy on the lung alone
    # study b: nothing valid -> NaN everywhere
    image = torch.stack([torch.stack([E[0], E[2]]), torch.stack([E[0], E[2]])])
    valid = torch.tensor([[True, False], [False, False]])
    scores = zero_shot_scores(
        image, valid, Encoder(PROMPT_EMB), 10.0, table, templates=ONE, study_ids=["a", "b"]
    )
    assert math.isnan(scores.loc["a", "heart/cardiomegaly"])
    assert scores.loc["a", "lung/emphysema"] == pytest.approx(_sigmoid(10.0), rel=1e-6)
    # whole scan = e0 (the lung alone): cos to the positive (e0 + e2)/sqrt 2, to the negative 0
    expected = _sigmoid(10.0 / math.sqrt(2.0))
    assert scores.loc["a", "global/lymphadenopathy"] == pytest.approx(expected, rel=1e-6)
    assert scores.loc["b"].isna().all()
    assert scores.attrs["not_evaluable"] == {
        "lung/emphysema": 1, "heart/cardiomegaly": 2, "global/lymphadenopathy": 1,
    }  # fmt: skip
    assert scores.attrs["whole_scan_mean"] == {"global/lymphadenopathy": 1}
    assert scores.attrs["no_valid_anatomy"] == 1
    assert scores.index.name == "study_id"


def test_global_mode_scores_every_disease_with_one_embedding() -> None:
    table = _table()
    image = torch.stack([E[0], E[3]])[:, None, :]  # (S, 1, E)
    scores = zero_shot_scores(
        image, None, Encoder(PROMPT_EMB), 10.0, table, mode="global", templates=ONE
    )
    assert scores.loc[0, "lung/emphysema"] == pytest.approx(_sigmoid(10.0), rel=1e-6)
    assert scores.loc[0, "heart/cardiomegaly"] == pytest.approx(0.5)
    assert scores.loc[1, "heart/cardiomegaly"] == pytest.approx(_sigmoid(-10.0), rel=1e-4)
    assert scores.attrs["not_evaluable"] == {} and scores.attrs["whole_scan_mean"] == {}


def test_embedding_and_probability_ensembles_by_hand() -> None:
    lung = _anatomy(1, "lung", (Disease("x", "X", "lung", ("x",), ("t",)),))
    table = AnatomyTable("one", (lung,))
    templates = PromptTemplates(
        positive=("{anatomy} has {term}.", "{term} in {anatomy}."),
        negative=("no {term} in {anatomy}.",),
    )
    emb = {"lung has x.": E[0], "x in lung.": E[1], "no x in lung.": E[2]}
    image = E[0][None, None, :]
    valid = torch.ones(1, 1, dtype=torch.bool)
    scale = 4.0
    by_emb = zero_shot_scores(image, valid, Encoder(emb), scale, table, templates=templates)
    # mean positive prompt (e0 + e1)/sqrt 2 -> cos 1/sqrt 2; negative cos 0
    assert by_emb.iloc[0, 0] == pytest.approx(_sigmoid(scale / math.sqrt(2)), rel=1e-6)
    by_prob = zero_shot_scores(
        image, valid, Encoder(emb), scale, table, templates=templates, ensemble="probability"
    )
    # pairs (e0, e2): sigmoid(4); (e1, e2): sigmoid(0) = .5
    assert by_prob.iloc[0, 0] == pytest.approx((_sigmoid(scale) + 0.5) / 2, rel=1e-6)


def test_each_distinct_prompt_is_encoded_once_in_batches() -> None:
    table = load_anatomy_table("chest")
    prompts = build_prompts(table)
    distinct = sorted({t for p, n in prompts.values() for t in (*p, *n)})
    rng = torch.Generator().manual_seed(0)
    lookup = {t: torch.randn(8, generator=rng) for t in distinct}
    encoder = Encoder(lookup)
    image = torch.randn(3, len(table), 8, generator=rng)
    scores = zero_shot_scores(
        image, torch.ones(3, len(table), dtype=torch.bool), encoder, 1 / 0.07, table, batch_size=50
    )
    sent = [t for call in encoder.calls for t in call]
    assert sorted(sent) == sorted(distinct)
    assert max(len(c) for c in encoder.calls) <= 50
    assert scores.shape == (3, 18)
    assert np.all((scores.to_numpy() > 0) & (scores.to_numpy() < 1))
    logits = zero_shot_scores(
        image, torch.ones(3, len(table), dtype=torch.bool), encoder, 1 / 0.07, table, output="logit"
    )
    assert np.allclose(1 / (1 + np.exp(-logits.to_numpy())), scores.to_numpy())


def test_bad_arguments() -> None:
    table = _table()
    image = torch.zeros(1, 2, 6)
    valid = torch.ones(1, 2, dtype=torch.bool)
    enc = Encoder(PROMPT_EMB)
    with pytest.raises(ValueError, match="only"):
        PromptTemplates(positive=("{organ} shows {term}.",))
    with pytest.raises(ValueError, match="empty"):
        PromptTemplates(negative=())
    with pytest.raises(ValueError, match="mode"):
        zero_shot_scores(image, valid, enc, 10.0, table, mode="local", templates=ONE)
    with pytest.raises(ValueError, match="logit_scale"):
        zero_shot_scores(image, valid, enc, 0.0, table, templates=ONE)
    with pytest.raises(ValueError, match="anatomies"):
        zero_shot_scores(torch.zeros(1, 3, 6), valid, enc, 10.0, table, templates=ONE)
    with pytest.raises(ValueError, match="valid"):
        zero_shot_scores(image, None, enc, 10.0, table, templates=ONE)
    with pytest.raises(ValueError, match="one embedding"):
        zero_shot_scores(image, None, enc, 10.0, table, mode="global", templates=ONE)
    other = Disease("x", "X", "liver", ("x",), ("t",))
    with pytest.raises(ValueError, match="liver"):
        build_prompts(table, [other])


def test_logit_output_keeps_saturated_probabilities_apart() -> None:
    table = _table()
    # lung images with cos(pos) - cos(neg) = 0.5 and 0.6 (times sqrt 2 after normalisation)
    image = torch.stack(
        [torch.stack([F.normalize(E[0] + c * E[5], dim=0), E[2]]) for c in (1.0, 0.5)]
    )
    valid = torch.ones(2, 2, dtype=torch.bool)
    prob = zero_shot_scores(image, valid, Encoder(PROMPT_EMB), 100.0, table, templates=ONE)
    logit = zero_shot_scores(
        image, valid, Encoder(PROMPT_EMB), 100.0, table, templates=ONE, output="logit"
    )
    assert prob["lung/emphysema"].tolist() == [1.0, 1.0]  # saturated: a tie
    expected = [100.0 / math.sqrt(1 + c * c) for c in (1.0, 0.5)]
    assert logit["lung/emphysema"].to_numpy() == pytest.approx(expected, rel=1e-9)
