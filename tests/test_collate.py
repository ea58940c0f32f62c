"""Teacher-forced rows and label masking, checked by hand and against the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from fada_batch.data.samples import Sample
from fada_batch.training.collate import (
    IGNORE_INDEX,
    Encoded,
    Encoder,
    TokenLayoutError,
    answer_length_stats,
    collate,
    masked_lm_loss_sum,
)
from fada_batch.training.model import eos_token_id, image_features, lm_logits, load_base_model


def test_masked_loss_matches_hand_computation():
    # B=1, T=4, V=3. Labels mask positions 0-1 (prompt); the answer is tokens 2 and 3.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.5, 0.0, 2.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2]])
    # position 1 predicts token 2 (label 1): -log softmax([1,2,0])[1]
    # position 2 predicts token 3 (label 2): -log softmax([0.5,0,2])[2]
    l1 = -(2.0 - math.log(math.e**1 + math.e**2 + math.e**0))
    l2 = -(2.0 - math.log(math.e**0.5 + math.e**0 + math.e**2))
    total, n = masked_lm_loss_sum(logits, labels)
    assert n == 2
    assert float(total) == pytest.approx(l1 + l2, abs=1e-6)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def encoder(loaded):
    cfg = loaded.model.config
    return Encoder(
        loaded.processor,
        num_query_tokens=cfg.num_query_tokens,
        image_token_id=cfg.image_token_id,
        eos_token_id=eos_token_id(loaded.model, loaded.processor),
    )


def test_row_layout_is_processor_layout(loaded, encoder):
    s = Sample("a.png", 5, "Question: Image Quality: how good? Answer:", "Good image quality")
    enc = encoder.encode(s)
    n = loaded.model.config.num_query_tokens
    ids = enc.input_ids
    # the processor's own layout for the prompt: N image tokens, then the tokenizer's output
    from PIL import Image

    proc = loaded.processor(images=Image.new("RGB", (32, 32)), text=s.prompt)
    assert ids[: enc.prompt_len] == list(proc["input_ids"][0])
    assert ids[:n] == [loaded.model.config.image_token_id] * n
    assert ids[-1] == encoder.eos_token_id
    answer = loaded.processor.tokenizer.decode(ids[enc.prompt_len : -1])
    assert answer.strip() == "Good image quality"


def test_collate_masks_all_but_answer_and_eos(encoder):
    a = encoder.encode(Sample("a", 0, "Question: q one? Answer:", "left"))
    b = encoder.encode(Sample("b", 1, "Question: a longer question here? Answer:", "right side"))
    batch = collate(
        [a, b],
        pad_token_id=encoder.pad_token_id,
        image_token_id=encoder.image_token_id,
        num_query_tokens=encoder.num_query_tokens,
    )
    ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    width = max(len(a.input_ids), len(b.input_ids))
    assert ids.shape == (2, width)  # dynamic padding: the longest row, no fixed length
    for row, e in enumerate((a, b)):
        n = len(e.input_ids)
        assert att[row, :n].all() and not att[row, n:].any()
        assert (lab[row, : e.prompt_len] == IGNORE_INDEX).all()
        assert lab[row, e.prompt_len : n].tolist() == e.input_ids[e.prompt_len :]
        assert (lab[row, n:] == IGNORE_INDEX).all()
        assert lab[row, n - 1] == encoder.eos_token_id


def test_our_loss_equals_the_models_own_loss(loaded, encoder):
    """lm_logits + masked loss must equal Blip2ForConditionalGeneration(labels=...).loss."""
    from PIL import Image

    model = loaded.model
    samples = [
        Sample("x", 1, "Question: Fetal Orientation: where? Answer:", "Fetus lies on the left side"),
        Sample("y", 5, "Question: Image Quality: how? Answer:", "Poor"),
    ]
    enc = [encoder.encode(s) for s in samples]
    batch = collate(
        enc,
        pad_token_id=encoder.pad_token_id,
        image_token_id=encoder.image_token_id,
        num_query_tokens=encoder.num_query_tokens,
    )
    images = [Image.new("RGB", (64, 64), (i * 80, i * 80, i * 80)) for i in range(2)]
    pv = loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(
            pixel_values=pv,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        feats = image_features(model, pv)
        logits = lm_logits(model, batch["input_ids"], batch["attention_mask"], feats)
    total, n = masked_lm_loss_sum(logits, batch["labels"])
    assert torch.allclose(logits, ref.logits, atol=1e-5)
    assert float(total / n) == pytest.approx(float(ref.loss), rel=1e-5)


def test_wrong_image_token_count_is_refused(encoder):
    e = encoder.encode(Sample("a", 0, "Question: q? Answer:", "x"))
    from fada_batch.training.collate import Encoded

    cut = Encoded(input_ids=e.input_ids[1:], prompt_len=e.prompt_len - 1)
    with pytest.raises(TokenLayoutError, match="image tokens"):
        collate(
            [cut],
            pad_token_id=encoder.pad_token_id,
            image_token_id=encoder.image_token_id,
            num_query_tokens=encoder.num_query_tokens,
        )


def test_processor_without_query_tokens_is_refused(loaded):
    import copy

    proc = copy.copy(loaded.processor)
    proc.num_query_tokens = None
    cfg = loaded.model.config
    with pytest.raises(TokenLayoutError, match="would ignore the image") as e:
        Encoder(
            proc, num_query_tokens=cfg.num_query_tokens, image_token_id=cfg.image_token_id, eos_token_id=2
        )
    # the whole fix: both the processor's count and the config's image token id
    assert "fada-batch stage-model" in str(e.value) and '"image_token_index"' in str(e.value)
    with pytest.raises(TokenLayoutError, match="has no image_token_index"):
        Encoder(loaded.processor, num_query_tokens=cfg.num_query_tokens, image_token_id=None, eos_token_id=2)
    proc.num_query_tokens = cfg.num_query_tokens + 1
    with pytest.raises(TokenLayoutError, match="different checkpoints"):
        Encoder(
            proc, num_query_tokens=cfg.num_query_tokens, image_token_id=cfg.image_token_id, eos_token_id=2
        )


def test_tokenizer_that_does_not_prepend_bos_is_refused(loaded):
    """OPT was trained with BOS (`</s>`) first; a tokenizer without it would shift every row."""
    import copy

    cfg = loaded.model.config
    kwargs = {
        "num_query_tokens": cfg.num_query_tokens,
        "image_token_id": cfg.image_token_id,
        "eos_token_id": 2,
    }
    Encoder(loaded.processor, **kwargs)  # the model's own tokenizer prepends it
    proc = copy.copy(loaded.processor)
    proc.tokenizer = copy.deepcopy(loaded.processor.tokenizer)
    proc.tokenizer.add_bos_token = False
    assert proc.tokenizer("a")["input_ids"][0] != proc.tokenizer.bos_token_id
    with pytest.raises(TokenLayoutError, match=r"does not start a text with its BOS token \(bos_token_id=2"):
        Encoder(proc, **kwargs)


def test_answer_length_stats_give_the_generation_limit():
    rows = [Encoded(input_ids=list(range(10 + n)), prompt_len=10) for n in (2, 3, 5, 40)]
    stats = answer_length_stats(rows)
    assert stats == {"max": 40, "p99": 40, "mean": 12.5, "max_new_tokens": 50}  # 40 + 40 / 4
    assert answer_length_stats(rows[:1])["max_new_tokens"] == 2 + 8  # a margin of at least 8
