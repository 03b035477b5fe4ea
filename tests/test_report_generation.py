"""Report generation: targets, visual memory, teacher forcing, generation, encoder loading."""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from fvlm.lit_modules.report_generation import (
    ReportGenerationModule,
    encoder_arguments,
    load_encoder,
)
from fvlm.models import build_network, network_options
from fvlm.models.text import load_tokenizer
from fvlm.models.vision import VisionConfig, VisionTransformer3D
from fvlm.report_generation import (
    ReportGenerator,
    VisualMemory,
    assemble_report,
    build_decoder,
    clean_description,
    compact_decoder,
    pool_tokens,
    prepare_targets,
    target_vocabulary,
)

A = 3  # anatomies of the tiny table
VISION = {"img_size": (8, 16, 16), "patch_size": (4, 8, 8), "hidden_size": 16, "mlp_dim": 32,
          "num_layers": 1, "num_heads": 2}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return load_tokenizer("minilm")


def _generator(
    tiny_bert, mode: str = "whole", frozen: bool = True, vocabulary: list[int] | None = None
) -> ReportGenerator:
    torch.manual_seed(0)
    return ReportGenerator(
        VisionTransformer3D(VisionConfig(**VISION)),
        build_decoder(config=tiny_bert(hidden_size=32, intermediate_size=64)),
        num_anatomies=A,
        mode=mode,
        frozen=frozen,
        max_target_length=32,
        vocabulary=vocabulary,
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
    memory = VisualMemory(4, 6, num_anatomies=2, anatomy_width=3)
    tokens = torch.randn(2, 5, 4)
    membership = torch.zeros(2, 2, 5, dtype=torch.bool)
    membership[0, 1, [1, 3]] = True
    membership[1, 0, [0, 2, 4]] = True
    embedding = torch.randn(2, 3)  # each pair's anatomy token
    out, mask = memory.anatomy(
        tokens, membership, torch.tensor([0, 1]), torch.tensor([1, 0]), embedding
    )
    assert out.shape == (2, 4, 6)  # anatomy token + the largest anatomy's 3 tokens
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    where = memory.anatomy_embedding.weight
    torch.testing.assert_close(out[0, 0], memory.anatomy_proj(embedding[0]) + where[1])
    torch.testing.assert_close(out[0, 1:3], memory.proj(tokens[0, [1, 3]]) + where[1])
    torch.testing.assert_close(out[1, 1:], memory.proj(tokens[1, [0, 2, 4]]) + where[0])
    membership[0, 1] = False
    with pytest.raises(ValueError, match="at least one visual token"):
        memory.anatomy(tokens, membership, torch.tensor([0]), torch.tensor([1]), embedding[:1])
    whole = VisualMemory(4, 6, num_anatomies=2)  # whole mode: no anatomy parameters at all
    assert whole.anatomy_proj is None and whole.anatomy_embedding is None
    with pytest.raises(ValueError, match="without anatomy tokens"):
        whole.anatomy_token(embedding, torch.tensor([0, 1]))


def test_normal_head_learns_from_every_valid_pair(tiny_bert, tokenizer) -> None:
    """The LM reads max_pairs pairs; the normal head's BCE covers all of them (calibration)."""
    generator = _generator(tiny_bert, mode="anatomy")
    generator.max_pairs = 1
    batch = _batch(tokenizer, ["a", "b"])  # 2 studies x anatomies 0 and 1 present and valid
    torch.manual_seed(0)
    out = generator(batch)
    membership, sample, index = generator.pairs(batch["anatomy"], batch["valid"])
    assert sample.numel() == 4
    logits = generator.normal_logits(
        generator.anatomy_tokens(generator.visual_tokens(batch["image"]), membership, sample,
                                 index), index
    )  # fmt: skip
    target = batch["normal"][sample, index].float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(out["normal_loss"], expected)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_pretrained_anatomy_pooling_is_frozen_with_the_encoder(
    tmp_path, tiny_bert, frozen: bool
) -> None:
    path, network = _checkpoint(tmp_path, tiny_bert, num_anatomies=A)
    encoder, pooling = load_encoder(path, None, num_anatomies=A)
    assert pooling is not None
    decoder = build_decoder(config=tiny_bert(hidden_size=32, intermediate_size=64))
    fvlm = ReportGenerator(encoder, decoder, A, mode="anatomy", frozen=frozen, pooling=pooling,
                           pooling_pretrained=True, max_target_length=32)  # fmt: skip
    trained = {p.requires_grad for p in fvlm.pooling.parameters()}
    assert trained == {not frozen}
    fvlm.train()
    assert fvlm.pooling.training is not frozen
    random_encoder = VisionTransformer3D(VisionConfig(**VISION))
    fresh = ReportGenerator(
        random_encoder, build_decoder(config=tiny_bert()), A, mode="anatomy", max_target_length=32
    )
    assert all(p.requires_grad for p in fresh.pooling.parameters())  # a new pooling learns
    assert fresh.pooling.proj_weight.shape == (A, 16, 16)  # the encoder's width and heads
    assert fresh.pooling.num_heads == 2
    whole = ReportGenerator(
        random_encoder, build_decoder(config=tiny_bert()), A, mode="whole", max_target_length=32
    )
    assert whole.pooling is None and whole.normal_head is None


@pytest.mark.parametrize("compact", [False, True])
def test_whole_report_overfits_and_generates_it(tiny_bert, tokenizer, compact: bool) -> None:
    reports = ["moderate left hydronephrosis.", "the liver is normal."]
    batch = _batch(tokenizer, reports)
    specials = (101, 102, 0, 100)
    vocabulary = target_vocabulary(batch["report_input_ids"].tolist(), specials)
    generator = _generator(tiny_bert, vocabulary=vocabulary if compact else None)
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
    if compact:  # tokenizer ids out, only ids of the targets' vocabulary
        assert generator.decoder.config.vocab_size == len(vocabulary) == 15
        assert set(out["ids"].unique().tolist()) <= set(vocabulary)
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
    abnormal_only = generator.generate(
        batch["image"], batch["anatomy"], max_new_tokens=8, describe_normal=False
    )
    decoded = tokenizer.batch_decode(abnormal_only["ids"], skip_special_tokens=True)
    assert decoded == ["", "liver normal."] * 2  # the normal anatomy 0 is not decoded
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
    encoder, pooling = load_encoder(path, None, num_anatomies=A)
    image = torch.rand(1, 1, 8, 16, 16)
    torch.testing.assert_close(encoder(image), network.vision.eval()(image))
    membership = torch.rand(1, A, 8) > 0.5
    tokens = encoder(image)
    torch.testing.assert_close(pooling(tokens, membership), network.pooling(tokens, membership))
    with pytest.raises(
        ValueError, match="anatomy table of 3 anatomies, but the data's table has 35"
    ):
        load_encoder(path, None, num_anatomies=35)
    encoder, pooling = load_encoder(None, VisionConfig(**VISION), A)
    assert isinstance(encoder, VisionTransformer3D) and pooling is None


def test_max_pairs_keeps_abnormal_pairs_first(tiny_bert) -> None:
    generator = _generator(tiny_bert, mode="anatomy")
    generator.max_pairs = 2
    normal = torch.tensor([True, False, True, True, True])
    for seed in range(5):
        torch.manual_seed(seed)
        keep = generator._subsample(normal).tolist()
        assert len(keep) == 2 and 1 in keep  # the abnormal pair is always trained on
    generator.max_pairs = None
    assert generator._subsample(normal).tolist() == [0, 1, 2, 3, 4]


def test_target_vocabulary_and_compact_decoder_keep_the_logits_of_their_ids(tiny_bert) -> None:
    assert target_vocabulary([[101, 7, 9, 102], [101, 9, 102, 0]], (101, 102, 0, 100, None)) == [
        0, 7, 9, 100, 101, 102
    ]  # fmt: skip
    torch.manual_seed(0)
    full = build_decoder(config=tiny_bert())
    full.cls.predictions.bias.data.normal_()  # a bias that must follow its ids
    vocabulary = [0, 5, 100, 101, 102, 2054, 30000]
    small = compact_decoder(copy.deepcopy(full), vocabulary)
    assert small.config.vocab_size == 7 and small.get_input_embeddings().num_embeddings == 7
    assert small.cls.predictions.decoder.weight is small.get_input_embeddings().weight  # tied
    ids = torch.tensor([[101, 2054, 5, 30000, 102]])
    memory = torch.randn(1, 4, 16)
    lookup = {t: k for k, t in enumerate(vocabulary)}
    compact_ids = torch.tensor([[lookup[int(t)] for t in ids[0]]])
    expected = full(input_ids=ids, encoder_hidden_states=memory).logits[..., vocabulary]
    got = small(input_ids=compact_ids, encoder_hidden_states=memory).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must lie in 0..30521"):
        compact_decoder(copy.deepcopy(full), [0, 30522])
    with pytest.raises(ValueError, match="distinct"):
        compact_decoder(copy.deepcopy(full), [5, 5])


def test_compact_vocabulary_round_trip_and_unknown_targets(tiny_bert, tokenizer) -> None:
    the, liver = tokenizer("the liver")["input_ids"][1:3]
    hello = tokenizer("hello")["input_ids"][1]
    vocabulary = sorted([0, 100, 101, 102, the, liver])  # [PAD] [UNK] [CLS] [SEP] the liver
    generator = _generator(tiny_bert, vocabulary=vocabulary)
    ids = torch.tensor(vocabulary)
    compact, unknown = generator.compact(ids)
    assert compact.tolist() == list(range(6)) and unknown == 0
    assert generator.vocabulary[compact].tolist() == vocabulary  # and back
    compact, unknown = generator.compact(torch.tensor([101, the, hello, liver, 102]))
    index = vocabulary.index
    expected = [index(101), index(the), index(100), index(liver), index(102)]
    assert compact.tolist() == expected and unknown == 1  # "hello" is no target word
    out = generator(_batch(tokenizer, ["the liver.", "the liver."]))  # "." is unknown
    assert out["stats"].unknown == 2
    assert "vocabulary" in generator.state_dict()  # checkpoints carry the id mapping
    with pytest.raises(ValueError, match=r"lacks the special token ids \[100\]"):
        _generator(tiny_bert, vocabulary=[0, 101, 102, 1996])
    with pytest.raises(ValueError, match="already has a compact vocabulary"):
        generator.use_vocabulary(vocabulary)


def test_cached_visual_tokens_give_the_per_batch_loss(tiny_bert, tokenizer) -> None:
    generator = _generator(tiny_bert, mode="anatomy")
    batch = _batch(tokenizer, ["x", "y"], [["kidney cyst.", "liver normal.", "lung."]] * 2)
    torch.manual_seed(3)
    direct = generator(batch)
    tokens = generator.visual_tokens(batch["image"])
    blank = torch.zeros_like(batch["image"])  # the cached tokens, not the image, are read
    torch.manual_seed(3)  # the same pairs are drawn
    cached = generator({**batch, "visual_tokens": tokens, "image": blank})
    torch.testing.assert_close(cached["loss"], direct["loss"], atol=1e-5, rtol=0)
    whole = _generator(tiny_bert)
    tokens = whole.visual_tokens(batch["image"])
    torch.testing.assert_close(
        whole({**batch, "visual_tokens": tokens})["loss"], whole(batch)["loss"], atol=1e-5, rtol=0
    )
    finetuned = _generator(tiny_bert, frozen=False)
    with pytest.raises(ValueError, match="frozen protocol"):
        finetuned({**batch, "visual_tokens": tokens})


def _module(tiny_bert, **options) -> ReportGenerationModule:  # noqa: ANN003 - module options
    return ReportGenerationModule(
        num_anatomies=A, vision=VisionConfig(**VISION), decoder_config=tiny_bert(),
        max_target_length=32, **options,
    )  # fmt: skip


def test_module_caches_each_studys_tokens_once(tiny_bert, tokenizer) -> None:
    module = _module(tiny_bert, cache_features=True)
    batch = _batch(tokenizer, ["a.", "b."])
    first = module.visual_tokens(batch)
    torch.testing.assert_close(first, module.generator.visual_tokens(batch["image"]))
    again = module.visual_tokens({**batch, "image": torch.zeros_like(batch["image"])})
    torch.testing.assert_close(again, first)  # the encoder is not run again
    assert sorted(module.features) == ["s0", "s1"]
    with pytest.raises(ValueError, match="cache_features needs protocol 'frozen'"):
        _module(tiny_bert, protocol="finetune", cache_features=True)
    with pytest.raises(ValueError, match="output_vocabulary must be"):
        _module(tiny_bert, output_vocabulary="some")


def test_module_training_vocabulary_from_the_split_targets(tiny_bert, tokenizer) -> None:
    reports = {"s0": {"findings": "The liver is normal.", "impression": "No cyst."},
               "s1": {"findings": "Liver cyst.", "impression": None}}  # fmt: skip
    texts = {"s0": ["kidney clear."] * A, "s1": ["lung clear."] * A}
    dataset = SimpleNamespace(
        study_ids=["s0", "s1"],
        cache=SimpleNamespace(study_report=reports.__getitem__),
        read_texts=lambda report, study: (texts[study], None),
    )
    module = _module(tiny_bert, output_vocabulary="targets")
    words = tokenizer("the liver is normal. no cyst.")["input_ids"]
    expected = sorted({0, 100, 101, 102, *words})
    assert module.training_vocabulary(dataset) == expected
    module.generator.use_vocabulary(expected)
    rebuilt = _module(tiny_bert, output_vocabulary="targets", vocabulary=expected)
    rebuilt.load_state_dict(module.state_dict())  # hparams + state_dict rebuild the decoder
    assert rebuilt.generator.decoder.config.vocab_size == len(expected)
    config = module.generator.decoder.config.to_dict()  # an export's config.json
    assert config["tokenizer_vocab_size"] == 30522
    exported = _module(tiny_bert, output_vocabulary="targets", vocabulary=expected)
    exported.generator = ReportGenerator(
        VisionTransformer3D(VisionConfig(**VISION)), build_decoder(config=config), A,
        max_target_length=32, vocabulary=expected,
    )  # fmt: skip
    exported.load_state_dict(module.state_dict())
    ids = torch.tensor(expected[:5])
    assert exported.generator.compact(ids)[0].tolist() == [0, 1, 2, 3, 4]
    anatomy = _module(tiny_bert, mode="anatomy", output_vocabulary="targets")
    clear = sorted({0, 100, 101, 102, *tokenizer("kidney clear. lung clear.")["input_ids"]})
    assert anatomy.training_vocabulary(dataset) == clear


def test_pool_tokens_averages_grid_blocks() -> None:
    tokens = torch.arange(2 * 2 * 4, dtype=torch.float).view(1, 16, 1)  # grid (2, 2, 4)
    pooled = pool_tokens(tokens, (2, 2, 4), (2, 2, 2))
    # Block w 0-1 holds tokens 0, 1, 4, 5, 8, 9, 12, 13 (d, h, w order): mean 6.5; w 2-3: 8.5.
    assert pooled.flatten().tolist() == [6.5, 8.5]
    assert pool_tokens(tokens, (2, 2, 4), (1, 1, 1)) is tokens
    with pytest.raises(ValueError, match="no token grid"):
        pool_tokens(tokens, (2, 2, 4), (1, 1, 3))
    with pytest.raises(ValueError, match="no token grid"):
        pool_tokens(tokens, (2, 2, 2), (1, 1, 1))


def test_whole_mode_memory_pool_shortens_the_memory(tiny_bert, tokenizer) -> None:
    generator = _generator(tiny_bert)
    generator.memory_pool = (1, 2, 2)  # grid (2, 2, 2) of the 8x16x16 crop -> 2 memory tokens
    seen = []
    hook = generator.memory.proj.register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape))
    )
    generator(_batch(tokenizer, ["a cyst.", "no cyst."]))
    hook.remove()
    assert seen == [(2, 2, VISION["hidden_size"])]
    with pytest.raises(ValueError, match="memory_pool must be"):
        ReportGenerator(VisionTransformer3D(VisionConfig(**VISION)),
                        build_decoder(config=tiny_bert()), A, max_target_length=32,
                        memory_pool=(2, 2))  # fmt: skip


def test_encoder_entries_and_the_mae_inflated_encoder_offline() -> None:
    assert encoder_arguments("random") == ("random", [])
    assert encoder_arguments("fvlm=runs/x.ckpt") == (
        "fvlm", ["--model.init_args.encoder_checkpoint=runs/x.ckpt"]
    )  # fmt: skip
    assert encoder_arguments("mae=init_from:vit_base_patch16_224.mae") == (
        "mae", ["--model.init_args.vision.init_from=vit_base_patch16_224.mae"]
    )  # fmt: skip
    with pytest.raises(ValueError, match="has no name"):
        encoder_arguments("=x.ckpt")
    mae = VisionConfig(**VISION, init_from="vit_base_patch16_224.mae")
    with pytest.raises(RuntimeError, match="timm could not fetch the pretrained weights"):
        load_encoder(None, mae, A)  # offline: the existing clear error, nothing downloaded


def test_finetune_encoder_learns_at_its_own_rate(tmp_path, tiny_bert) -> None:
    path, _ = _checkpoint(tmp_path, tiny_bert, num_anatomies=A)
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    module = _module(
        tiny_bert, encoder_checkpoint=path, protocol="finetune", mode="anatomy",
        encoder_lr_scale=0.1, optimizer=optimizer,
    )  # fmt: skip
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    generator = module.generator
    pretrained = {id(p) for p in [*generator.encoder.parameters(), *generator.pooling.parameters()]}
    assert {id(p) for p in groups[1]["params"]} == pretrained  # the fVLM pooling is pre-trained
    assert not pretrained & {id(p) for p in groups[0]["params"]}
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trained
    frozen = _module(tiny_bert, encoder_checkpoint=path, mode="anatomy", optimizer=optimizer)
    assert len(frozen.configure_optimizers().param_groups) == 1  # nothing pre-trained learns
    with pytest.raises(ValueError, match="encoder_lr_scale"):
        _module(tiny_bert, encoder_lr_scale=0.0)
