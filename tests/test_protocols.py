"""Evaluation protocols: the anchors' prompts, exactly, and ours unchanged by default."""

from __future__ import annotations

import pytest

from fvlm.anatomy import AnatomyTable, Disease
from fvlm.cli import build_parser
from fvlm.evaluation.zero_shot import (
    DEFAULT_NEGATIVE_TEMPLATES,
    DEFAULT_POSITIVE_TEMPLATES,
    PROTOCOLS,
    PromptTemplates,
    build_prompts,
)


def steatosis(table: AnatomyTable) -> Disease:
    return next(d for d in table.diseases() if d.key == "liver/steatosis")


def test_fvlm_protocol_is_the_authors_x_and_not_x(paper_table: AnatomyTable) -> None:
    prompts = build_prompts(paper_table, [steatosis(paper_table)], PROTOCOLS["fvlm"])
    assert prompts == {"liver/steatosis": (["Hepatic steatosis."], ["Not hepatic steatosis."])}


def test_ctclip_protocol_is_x_is_present_and_x_is_not_present(paper_table: AnatomyTable) -> None:
    prompts = build_prompts(paper_table, None, PROTOCOLS["ctclip"])
    assert prompts["liver/steatosis"] == (
        ["Hepatic steatosis is present."],
        ["Hepatic steatosis is not present."],
    )
    # one pair per disease, from its printed label, for every disease of the table
    for disease in paper_table.diseases():
        positive, negative = prompts[disease.key]
        assert positive == [f"{disease.label} is present."]
        assert negative == [f"{disease.label[0].upper()}{disease.label[1:]} is not present."]


def test_acronym_labels_keep_their_case() -> None:
    from fvlm.evaluation.zero_shot import _label_term

    assert _label_term("COPD") == "COPD"
    assert _label_term("Cirrhosis") == "cirrhosis"


def test_ours_is_the_default_and_unchanged(paper_table: AnatomyTable) -> None:
    assert PROTOCOLS["ours"] == PromptTemplates()
    assert PromptTemplates().positive == DEFAULT_POSITIVE_TEMPLATES
    assert PromptTemplates().negative == DEFAULT_NEGATIVE_TEMPLATES
    positive, negative = build_prompts(paper_table, [steatosis(paper_table)])["liver/steatosis"]
    assert positive == [
        "liver shows hepatic steatosis.", "liver shows fatty liver.",
        "There is hepatic steatosis in the liver.", "There is fatty liver in the liver.",
        "hepatic steatosis is seen in the liver.", "fatty liver is seen in the liver.",
        "Findings in the liver are consistent with hepatic steatosis.",
        "Findings in the liver are consistent with fatty liver.",
    ]  # fmt: skip
    assert negative == [
        "liver shows no significant abnormalities.", "Unremarkable liver.",
        "The liver is normal.", "Normal liver.",
    ]  # fmt: skip


def test_evaluate_takes_a_protocol_option() -> None:
    parser = build_parser("evaluate")
    base = ["--ckpt", "a.ckpt", "--cache", "c", "--labels", "l.csv"]
    assert parser.parse_args(base).protocol == "ours"
    assert parser.parse_args([*base, "--protocol", "ctclip"]).protocol == "ctclip"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--protocol", "merlin"])


def test_evaluation_scores_with_the_protocols_prompts(
    tmp_path, tiny_bert, paper_table: AnatomyTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``evaluate_checkpoints(protocol=...)`` scores with that protocol's templates, and says so."""
    import json

    import pandas as pd
    from cache_factory import write_cache
    from eval_fixtures import tiny_checkpoint

    import fvlm.evaluation.run as run

    cache = write_cache(tmp_path / "cache", n_train=0, n_val=0, n_test=4, shape=(8, 16, 16))
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", len(paper_table), tiny_bert())
    studies = run.StudyCache(cache).ok_studies("test")
    labels = pd.DataFrame({"study_id": studies, "liver/steatosis": [0, 1, 0, 1]})
    used = []
    real = run.zero_shot_scores

    def recording(*args, templates=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        used.append(templates)
        return real(*args, templates=templates, **kwargs)

    monkeypatch.setattr(run, "zero_shot_scores", recording)
    for protocol in ("ours", "ctclip"):
        run.evaluate_checkpoints(
            [ckpt], [protocol], cache, labels, tmp_path / "eval", protocol=protocol
        )
        summary = json.loads(
            next((tmp_path / "eval" / protocol).glob("*_summary.json")).read_text()
        )
        assert summary["extra"]["protocol"] == protocol
    assert used == [PROTOCOLS["ours"], PROTOCOLS["ctclip"]]
