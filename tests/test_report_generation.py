"""Report generation: targets, visual memory, teacher forcing, generation, encoder loading."""

from __future__ import annotations

import pytest
import torch

from fvlm.lit_modules.report_generation import load_encoder
from fvlm.models import build_network, network_options
from fvlm.models.text import load_tokenizer
from fvlm.models.vision import VisionConfig, VisionTransformer3D
from fvlm.report_generation import (
    ReportGenerator,
    VisualMemory,
    assemble_report,
    build_decoder,
    clean_description,
    prepare_targets,
)

A = 3  # anatomies of the tiny table
VISION = {"img_size": (8, 16, 16), "patch_size": (4, 8, 8), "hidden_size": 16, "mlp_dim": 32,
          "num_layers": 1, "num_heads": 2}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return load_tokenizer("minilm")


def _generator(tiny_bert, mode: str = "whole", frozen: bool = True) -> ReportGenerator:
    torch.manual_seed(0)
    return ReportGenerator(
        VisionTransformer3D(VisionConfig(**VISION)),
        build_decoder(config=tiny_bert(hidden_size=32, intermediate_size=64)),
        num_anatomies=A,
        mode=mode,
        frozen=frozen,
        max_target_length=32,
    )


def _batch(tokenizer, reports: list[str], texts: list[list[str]] | None = None) -> dict:
    size = len(reports)
    torch.manual_seed(1)
    anatomy = torch.zeros(size, 8, 16, 16, dtype=torch.uint8)
    anatomy[:, :4, :8, :8] = 1  # anatomy 0: token 0
    anatomy[:, 4:, 8:, :] = 2  # anatomy 1: tokens 6, 7
    image = torch.rand(size, 1, 8, 16, 16)
    image[1:, :, :4] += 1.0  # the studies look different
    report = tokenizer(reports, padding=True, return_tensors="pt")
    texts = texts or [["liver normal."] * A for _ in reports]
    text = tokenizer([t for row in texts for t in row], padding=True, return_tensors="pt")
    length = text["input_ids"].shape[-1]
    return {
        "image": image,
        "anatomy": anatomy,
        "valid": torch.tensor([[True, True, True]] * size),
        "normal": torch.tensor([[True, False, True]] * size),
        "text_input_ids": text["input_ids"].view(size, A, length),
        "text_attention_mask": text["attention_mask"].view(size, A, length),
        "report_input_ids": report["input_ids"],
        "report_attention_mask": report["attention_mask"],
        "study_id": [f"s{i}" for i in range(size)],
    }


def test_prepare_targets_counts_empty_and_truncated() -> None:
    ids = torch.tensor([[101, 7, 8, 9, 10, 102], [101, 102, 0, 0, 0, 0], [101, 5, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    ids2, mask2, labels, stats = prepare_targets(ids, mask, max_length=4)
    assert (stats.empty, stats.truncated) == (1, 1)
    assert ids2.shape == (3, 4) and mask2.shape == (3, 4)
    assert labels[0].tolist() == [101, 7, 8, 9]  # cut, loses its [SEP]
    assert (labels[1] == -100).all()  # an empty target teaches nothing
    assert labels[2].tolist() == [101, 5, 102, -100]


def test_clean_description_and_assembly_in_table_order() -> None:
    assert clean_description("The esophagus is unremarkable. null") == (
        "The esophagus is unremarkable."
    )
    assert clean_description("null") == ""
    report = assemble_report(
        ["Moderate hydronephrosis. null", None, "lung clear", "large liver cyst", "fine"],
        [False, True, True, False, True],
        ["kidney", "face", "lung", "liver", "small_bowel"],
    )
    assert report == (
        "Moderate hydronephrosis. large liver cyst. "
        "The lung and small bowel show no significant abnormalities."
    )
    with pytest.raises(ValueError, match="one entry per anatomy"):
        assemble_report(["a"], [True, False], ["x"])


def test_visual_memory_gathers_one_anatomys_tokens() -> None:
    torch.manual_seed(0)
    memory = VisualMemory(4, 6, num_anatomies=2)
    tokens = torch.randn(2, 5, 4)
    membership = torch.zeros(2, 2, 5, dtype=torch.bool)
    membership[0, 1, [1, 3]] = True
    membership[1, 0, [0, 2, 4]] = True
    out, mask, pooled = memory.anatomy(
        tokens, membership, torch.tensor([0, 1]), torch.tensor([1, 0])
    )
    assert out.shape == (2, 4, 6)  # pooled + the largest anatomy's 3 tokens
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    where = memory.anatomy_embedding.weight
    expected_first = memory.proj(
        torch.stack([tokens[0, [1, 3]].mean(0), tokens[0, 1], tokens[0, 3]])
    )
    torch.testing.assert_close(out[0, :3], expected_first + where[1])
    torch.testing.assert_close(pooled[1], memory.proj(tokens[1, [0, 2, 4]].mean(0)) + where[0])
    membership[0, 1] = False
    with pytest.raises(ValueError, match="at least one visual token"):
        memory.anatomy(tokens, membership, torch.tensor([0]), torch.tensor([1]))


def test_whole_report_overfits_and_generates_it(tiny_bert, tokenizer) -> None:
    reports = ["moderate left hydronephrosis.", "the liver is normal."]
    generator = _generator(tiny_bert)
    batch = _batch(tokenizer, reports)
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(80):
        loss = generator(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert all(p.grad is None for p in generator.encoder.parameters())  # frozen protocol
    out = generator.generate(batch["image"], max_new_tokens=12)
    assert tokenizer.batch_decode(out["ids"], skip_special_tokens=True) == reports
    beams = generator.generate(batch["image"], max_new_tokens=12, num_beams=3)
    assert tokenizer.batch_decode(beams["ids"], skip_special_tokens=True) == reports
    short = generator.generate(batch["image"], max_new_tokens=3)
    assert short["ids"].shape[1] <= 1 + 3  # start token + the limit


def test_finetune_protocol_trains_the_encoder(tiny_bert, tokenizer) -> None:
    generator = _generator(tiny_bert, frozen=False)
    generator(_batch(tokenizer, ["a cyst.", "no cyst."]))["loss"].backward()
    grads = [p.grad for p in generator.encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert generator.encoder.training


def test_empty_targets_are_counted_and_left_out(tiny_bert, tokenizer) -> None:
    generator = _generator(tiny_bert)
    out = generator(_batch(tokenizer, ["", ""]))
    assert out["stats"].empty == 2 and float(out["loss"]) == 0.0
    out["loss"].backward()  # still a graph: a step of only empty targets is not a crash


def test_anatomy_wise_training_and_generation(tiny_bert, tokenizer) -> None:
    texts = [["kidney cyst.", "liver normal.", "lung clear."]] * 2
    generator = _generator(tiny_bert, mode="anatomy")
    batch = _batch(tokenizer, ["x", "y"], texts)
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(60):
        out = generator(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        first = first if first is not None else float(out["lm_loss"])
    assert float(out["lm_loss"]) < 0.1 * first and "normal_loss" in out
    gen = generator.generate(batch["image"], batch["anatomy"], max_new_tokens=8)
    # Anatomy 2 owns no token of the crop: only anatomies 0 and 1 of each study are described.
    assert gen["sample"].tolist() == [0, 0, 1, 1] and gen["anatomy"].tolist() == [0, 1, 0, 1]
    decoded = tokenizer.batch_decode(gen["ids"], skip_special_tokens=True)
    assert decoded == ["kidney cyst.", "liver normal."] * 2
    assert gen["normal_prob"][1] < 0.5 < gen["normal_prob"][0]  # normal flags [T, F] learned
    with pytest.raises(ValueError, match="anatomy label map"):
        generator.generate(batch["image"])


def test_generator_rejects_bad_options(tiny_bert) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        ReportGenerator(VisionTransformer3D(VisionConfig(**VISION)),
                        build_decoder(config=tiny_bert()), A, mode="organ")  # fmt: skip
    with pytest.raises(ValueError, match="position limit"):
        ReportGenerator(VisionTransformer3D(VisionConfig(**VISION)),
                        build_decoder(config=tiny_bert()), A, max_target_length=1000)  # fmt: skip


def _checkpoint(tmp_path, tiny_bert, num_anatomies: int) -> tuple[str, torch.nn.Module]:
    hparams = network_options(
        {"num_anatomies": num_anatomies, "vision": VISION, "text_config": tiny_bert(),
         "embed_dim": 8, "pooling_heads": 2}
    )  # fmt: skip
    network = build_network("fine_grained", **hparams)
    path = tmp_path / "fvlm.ckpt"
    torch.save(
        {
            "fvlm_network": {"kind": "fine_grained"},
            "hyper_parameters": hparams,
            "state_dict": {f"network.{k}": v for k, v in network.state_dict().items()},
        },
        path,
    )
    return str(path), network


def test_encoder_from_a_checkpoint_and_of_another_anatomy_table(tmp_path, tiny_bert) -> None:
    path, network = _checkpoint(tmp_path, tiny_bert, num_anatomies=A)
    encoder = load_encoder(path, None, num_anatomies=A)
    image = torch.rand(1, 1, 8, 16, 16)
    torch.testing.assert_close(encoder(image), network.vision.eval()(image))
    with pytest.raises(
        ValueError, match="anatomy table of 3 anatomies, but the data's table has 35"
    ):
        load_encoder(path, None, num_anatomies=35)
    assert isinstance(load_encoder(None, VisionConfig(**VISION), A), VisionTransformer3D)


def test_max_pairs_keeps_abnormal_pairs_first(tiny_bert) -> None:
    generator = _generator(tiny_bert, mode="anatomy")
    generator.max_pairs = 2
    sample, index = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 0, 1])
    normal = torch.tensor([True, False, True, True, True])
    for seed in range(5):
        torch.manual_seed(seed)
        kept_sample, kept_index = generator._subsample(sample, index, normal)
        pairs = list(zip(kept_sample.tolist(), kept_index.tolist(), strict=True))
        assert len(pairs) == 2 and (0, 1) in pairs  # the abnormal pair is always trained on
    generator.max_pairs = None
    assert generator._subsample(sample, index, normal)[0] is sample
