"""Evaluation on held-out images: answers from the adapter, the base model alone and the
majority answer, scored per question.

    metrics = evaluate_category(cfg, "Femur")    # -> blip2_femur/eval/{predictions.csv,metrics.json}

The held-out images are the `eval.split` part ("test" by default) of the category's
`split.json`, so evaluation never sees a training image. Base model and adapter load once: the
base model's answers come from the same PeftModel with the adapter switched off
(`disable_adapter()`). The majority baseline answers every question with its most frequent
training answer (`metrics.majority_answers`).

Generation (see docs/blip2.md): each row is `[<image> * N] <bos> prompt`
(`collate.Encoder.prompt_ids`), LEFT-padded so that every row's last token is its own last
prompt token (with right padding, batched rows came back empty); the frozen image features go
where the `<image>` tokens are (as `model.lm_logits` does); the language model's `generate`
returns prompt + new tokens, so the prompt's width is cut off; decoding stops at the EOS the
adapter was trained with ("\\n" for blip2-opt-2.7b), recorded in `final_model/fada_batch.json`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fada_batch.config import normalize_level
from fada_batch.data.normalize import Normalizer
from fada_batch.data.samples import JOINT_PARTS_DIR, Sample, format_prompt
from fada_batch.evaluation.clinical import clinical_scores
from fada_batch.evaluation.metrics import aggregate, majority_answers, question_label
from fada_batch.fsutil import JobProbe, category_lock
from fada_batch.text import plural
from fada_batch.training.collate import Encoder

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
MODELS = ("adapter", "base", "majority")  # the blocks of metrics.json, in this order
PREDICTION_COLUMNS = (
    "image",
    "question",
    "question_text",
    "reference",
    "adapter_prediction",
    "base_prediction",
    "majority_prediction",
    "adapter_no_eos",  # 1: the answer reached max_new_tokens without EOS (cut off)
    "base_no_eos",
)
# the generation settings a summary and results.csv record beside the scores
GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "repetition_penalty", "max_new_tokens")
FALLBACK_MAX_NEW_TOKENS = 128  # an adapter that records no limit (the seed's answer budget)


class AdapterError(RuntimeError):
    """A missing, incomplete or mismatched adapter folder; the message says how to fix it."""


class EvaluationError(RuntimeError):
    """The category cannot be evaluated (not trained, no split, no held-out answers)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (greedy by default)."""

    # None: what the adapter's training answers need (`with_default`), else FALLBACK_MAX_NEW_TOKENS
    max_new_tokens: int | None = None
    num_beams: int = 1  # 1 = greedy
    batch_size: int = 16  # prompts per generate() call
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice in one answer
    repetition_penalty: float = 1.0  # > 1: repeated tokens are less likely; 1.0 = off

    def check(self) -> None:
        bad = [
            f"{k} must be >= {low}, got {v}"
            for k, v, low in (
                ("max_new_tokens", self.max_new_tokens, 1),
                ("num_beams", self.num_beams, 1),
                ("batch_size", self.batch_size, 1),
                ("no_repeat_ngram_size", self.no_repeat_ngram_size, 0),
            )
            if v is not None and v < low
        ]
        if self.repetition_penalty <= 0:
            bad.append(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if bad:
            raise ValueError("generation settings: " + "; ".join(bad))

    def with_default(self, max_new_tokens: int | None) -> GenerationSettings:
        """These settings with `max_new_tokens` filled in where they leave it open."""
        if self.max_new_tokens is not None:
            return self
        return replace(self, max_new_tokens=max_new_tokens or FALLBACK_MAX_NEW_TOKENS)


@dataclass(frozen=True)
class Generated:
    """One generated answer."""

    text: str
    ended: bool  # True: it ended with EOS; False: cut off at max_new_tokens


DEFAULT_SETTINGS = GenerationSettings()


# ------------------------------------------------------------------------------ the adapter


@dataclass(frozen=True)
class AdapterInfo:
    """What a `final_model/` folder says about itself."""

    path: Path
    base_model: str | None  # adapter_config.json's base_model_name_or_path
    questions: list[str] | None  # from fada_batch.json (None for a bare peft adapter)
    prompt_template: str | None
    eos_token_id: int | None
    category: str | None
    quantization: str | None = None  # how the base was loaded in training (none/8bit/4bit)
    dtype: str | None = None  # the base's dtype in training (float32, bfloat16, ...)
    max_new_tokens: int | None = None  # what the training answers need (longest + margin)
    # a joint adapter (train.mode=joint): "joint", the categories it was trained on, and what
    # each category's prompts start with (None: nothing, train.category_in_prompt false)
    mode: str | None = None
    categories: list[str] | None = None
    prompt_prefixes: dict[str, str | None] | None = None

    @property
    def joint(self) -> bool:
        return self.mode == "joint"


def read_adapter_info(adapter_dir: Path) -> AdapterInfo:
    """Read `adapter_config.json` (required) and `fada_batch.json` (when present).

    Raises:
        AdapterError: the folder or its adapter_config.json is missing or unreadable.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    example = "e.g. outputs/blip2_femur/final_model"
    if not adapter_dir.is_dir():
        raise AdapterError(
            f"adapter folder {adapter_dir} does not exist. Pass the final_model/ folder of a "
            f"trained category ({example}); `fada-batch collect` lists the trained ones."
        )
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        hint = f"pass the final_model/ folder of a trained category ({example})"
        if (adapter_dir / "final_model" / "adapter_config.json").is_file():
            hint = f"did you mean {adapter_dir / 'final_model'}?"
        elif (adapter_dir.parent / "training_summary.json").is_file():
            hint = (
                f"training has not finished writing it: see {adapter_dir.parent / 'training_summary.json'} "
                "and rerun `fada-batch train` for that category"
            )
        raise AdapterError(
            f"{adapter_dir} holds no adapter_config.json, so it is not a LoRA adapter: {hint}."
        )
    for weights in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / weights).is_file():
            break
    else:
        raise AdapterError(
            f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors: the adapter "
            "was not saved completely. Retrain the category (`fada-batch train ... --force`)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"cannot read {config_path}: {e}. Retrain the category or restore the file."
        ) from e
    marker: dict[str, Any] = {}
    marker_path = adapter_dir / "fada_batch.json"
    if marker_path.is_file():
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot read {marker_path}: {e}. Retrain the category.") from e
    eos = marker.get("eos_token_id")
    joint = marker.get("mode") == "joint"
    return AdapterInfo(
        path=adapter_dir,
        base_model=config.get("base_model_name_or_path") or marker.get("base_model"),
        questions=list(marker["questions"]) if marker.get("questions") else None,
        prompt_template=marker.get("prompt_template"),
        eos_token_id=int(eos) if eos is not None else None,
        category=marker.get("category"),
        quantization=marker.get("quantization"),
        dtype=marker.get("dtype"),
        max_new_tokens=marker.get("max_new_tokens"),
        mode=marker.get("mode"),
        categories=list(marker.get("categories") or []) if joint else None,
        prompt_prefixes=_recorded_prefixes(adapter_dir, marker) if joint else None,
    )


def _recorded_prefixes(adapter_dir: Path, marker: dict[str, Any]) -> dict[str, str | None]:
    """A joint adapter's prompt prefix per category, as training wrote its prompts: recorded
    in `fada_batch.json` (`prompt_prefixes`); for a joint adapter saved before that was
    recorded, the display names of the job config saved beside it (`config.yaml`).

    Raises:
        AdapterError: neither says what the prompts started with.
    """
    from fada_batch.data.samples import joint_prefix

    names = list(marker.get("categories") or [])
    recorded = marker.get("prompt_prefixes")
    if isinstance(recorded, dict) and set(recorded) == set(names):
        return {n: recorded[n] for n in names}
    in_prompt = bool(marker.get("category_in_prompt", True))
    if not in_prompt:
        return dict.fromkeys(names)
    config_path = adapter_dir / "config.yaml"
    try:
        from fada_batch.config import load_job

        cfg = load_job(config_path)
        return {n: joint_prefix(cfg.data.category(n), in_prompt) for n in names}
    except (OSError, ValueError) as e:  # ConfigError, UnknownCategoryError: ValueErrors
        raise AdapterError(
            f"{adapter_dir / 'fada_batch.json'} is a joint adapter's that does not record its prompt "
            f"prefixes, and {config_path} cannot supply them ({e}): retrain it with `fada-batch "
            "train --job JOB -p train.mode=joint --force`."
        ) from e


def load_like_training(
    info: AdapterInfo, name_or_path: str, *, device: str, dtype: str, quantization: str
) -> Any:
    """Load the base model as training loaded it for this adapter (its recorded quantization
    and dtype), so that answers match those of training's own evaluation; `dtype` and
    `quantization` apply only to adapters that record none.
    """
    from fada_batch.training.model import load_base_model

    q = info.quantization or quantization
    d = info.dtype or dtype
    for key, asked, used in (("quantization", quantization, q), ("dtype", dtype, d)):
        if asked not in ("auto", used):
            log.warning(
                "model.%s=%s, but the adapter in %s was trained on a base loaded with %s=%s: "
                "loading it that way, as training did",
                key,
                asked,
                info.path,
                key,
                used,
            )
    return load_base_model(name_or_path, device=device, dtype=d, quantization=q)


def _identity(name: str) -> tuple[str | None, set[str]]:
    """(resolved local folder or None, hub-style names it stands for), all lower-case.

    A local folder stands for the hub id in its HF-cache name (`models--Org--name/...`) and
    for its own folder name, so a staged `/shared/models/blip2-opt-2.7b` matches the hub id
    `Salesforce/blip2-opt-2.7b`.
    """
    path = Path(name).expanduser()
    if path.exists():
        resolved = path.resolve()
        names = {resolved.name.lower()}
        for part in resolved.parts:
            if part.startswith("models--"):
                org_name = part.removeprefix("models--").split("--")
                names |= {"/".join(org_name).lower(), org_name[-1].lower()}
        return str(resolved), names
    return None, {name.lower(), name.rstrip("/").rsplit("/", 1)[-1].lower()}


def same_base_model(a: str, b: str) -> bool:
    """Whether two model names/paths name the same base model (local paths normalised).

    Two local folders match only when they are the same folder; a local folder and a hub id
    match when the folder is that hub id's download or is named like its repository.
    """
    if a == b:
        return True
    local_a, names_a = _identity(a)
    local_b, names_b = _identity(b)
    if local_a and local_b:
        return local_a == local_b
    if local_a or local_b:
        return bool(names_a & names_b)
    return a.lower() == b.lower()


def check_base_model(
    info: AdapterInfo, base_model: str, *, allow_mismatch: bool = False, fix: str | None = None
) -> None:
    """Refuse to put an adapter on a base model other than the one it was trained on.

    Args:
        fix: how the caller's user picks the right base model (a CLI flag or a config key).

    Raises:
        AdapterError: naming both models and the way out.
    """
    if info.base_model is None or same_base_model(info.base_model, base_model):
        return
    message = (
        f"the adapter in {info.path} was trained on the base model {info.base_model!r} "
        f"(adapter_config.json: base_model_name_or_path), but {base_model!r} is being loaded"
    )
    if allow_mismatch:
        log.warning("%s; going on as asked.", message)
        return
    fix = fix or f"load {info.base_model!r} instead"
    raise AdapterError(f"{message}. An adapter only works on the base model it was trained on: {fix}.")


def load_adapter(loaded: Any, adapter_dir: Path) -> Any:
    """Put the trained adapter on `loaded.model` (a plain base model); returns the PeftModel.

    Raises:
        AdapterError: the adapter's weights do not fit this base model.
    """
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(
            f"cannot load the adapter in {adapter_dir} onto {loaded.name_or_path}: "
            f"{str(e).splitlines()[0][:300]}. It was most likely trained on another base model: "
            "load the base model named in its adapter_config.json."
        ) from e
    model.eval()
    loaded.model = model
    return model


# ------------------------------------------------------------------------------- generation


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id rows to the longest one.

    Returns:
        input_ids (B, T) and attention_mask (B, T), 0 on the padding at the left.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def decode_answer(tokenizer: Any, new_ids: list[int], eos_token_id: int) -> str:
    """The text of the generated ids up to (not including) the first EOS, stripped."""
    if eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(eos_token_id)]
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def decode_generated(tokenizer: Any, new_ids: list[int], eos_token_id: int) -> Generated:
    """`decode_answer`, and whether the answer ended with EOS (else it was cut off)."""
    return Generated(decode_answer(tokenizer, new_ids, eos_token_id), eos_token_id in new_ids)


@torch.no_grad()
def _generate_batch(
    model: Any,
    encoder: Encoder,
    prompts: list[str],
    features: torch.Tensor,
    *,
    eos_token_id: int,
    settings: GenerationSettings,
) -> list[Generated]:
    from fada_batch.training.model import base_of

    base = base_of(model)
    device = features.device
    input_ids, attention_mask = left_pad([encoder.prompt_ids(p) for p in prompts], encoder.pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    embeds = base.get_input_embeddings()(input_ids)  # (B, T, H)
    image_mask = (input_ids == encoder.image_token_id).unsqueeze(-1)  # (B, T, 1)
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.device, embeds.dtype))
    out = base.language_model.generate(
        input_ids=input_ids,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        max_new_tokens=settings.max_new_tokens or FALLBACK_MAX_NEW_TOKENS,
        num_beams=settings.num_beams,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=settings.repetition_penalty,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=encoder.pad_token_id,
    )  # (B, T + new): generate() returns the prompt, then the new tokens
    new = out[:, input_ids.shape[1] :].tolist()
    return [decode_generated(encoder.tokenizer, ids, eos_token_id) for ids in new]


def generate_answers(
    model: Any,
    encoder: Encoder,
    prompts: list[str],
    features: list[torch.Tensor],
    *,
    eos_token_id: int,
    settings: GenerationSettings = DEFAULT_SETTINGS,
) -> list[str]:
    """The answers' texts of `generate`."""
    got = generate(model, encoder, prompts, features, eos_token_id=eos_token_id, settings=settings)
    return [g.text for g in got]


def generate(
    model: Any,
    encoder: Encoder,
    prompts: list[str],
    features: list[torch.Tensor],
    *,
    eos_token_id: int,
    settings: GenerationSettings = DEFAULT_SETTINGS,
) -> list[Generated]:
    """Answer each prompt about its image, in left-padded batches; results in input order.

    Args:
        prompts: formatted prompts ("Question: ... Answer:").
        features: one (num_query_tokens, text_hidden) tensor per prompt (`model.image_features`).
        eos_token_id: where an answer ends.

    Rows are batched by prompt length (less padding); a CUDA out-of-memory halves the batch.
    """
    assert len(prompts) == len(features), (len(prompts), len(features))
    settings.check()
    order = sorted(range(len(prompts)), key=lambda i: (len(encoder.prompt_ids(prompts[i])), i))
    answers: list[Generated] = [Generated("", True)] * len(prompts)
    batch = settings.batch_size
    start = 0
    was_training = model.training
    model.eval()
    try:
        while start < len(order):
            idx = order[start : start + batch]
            try:
                got = _generate_batch(
                    model,
                    encoder,
                    [prompts[i] for i in idx],
                    torch.stack([features[i] for i in idx]),  # (B, Q, H)
                    eos_token_id=eos_token_id,
                    settings=settings,
                )
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = max(1, batch // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("out of memory while generating: batch halved to %d", batch)
                continue
            for i, a in zip(idx, got, strict=True):
                answers[i] = a
            start += len(idx)
    finally:
        model.train(was_training)
    return answers


def make_encoder(loaded: Any, eos_token_id: int) -> Encoder:
    from fada_batch.training.model import base_of

    config = base_of(loaded.model).config
    return Encoder(
        loaded.processor,
        num_query_tokens=config.num_query_tokens,
        image_token_id=config.image_token_id,
        eos_token_id=eos_token_id,
    )


def adapter_touches_vision(model: Any) -> bool:
    """True when adapter weights sit outside the language model (then image features differ)."""
    return any(
        ("lora_" in name or "modules_to_save" in name) and ".language_model." not in f".{name}"
        for name, _ in model.named_parameters()
    )


def _features(
    loaded: Any, image_paths: dict[str, Path], names: list[str], max_pixels: int
) -> dict[str, torch.Tensor]:
    """(Q, H) frozen features per image name, computed once in batches."""
    from fada_batch.training.features import FeatureSource

    source = FeatureSource(loaded, image_paths, cache=True, max_pixels=max_pixels)
    source.warm(names)
    return dict(source.cache)


def answer_both(
    loaded: Any,
    encoder: Encoder,
    items: list[tuple[str, str]],
    image_paths: dict[str, Path],
    *,
    eos_token_id: int,
    settings: GenerationSettings,
    max_pixels: int,
    with_base: bool = True,
) -> tuple[list[Generated], list[Generated] | None]:
    """Answers of the adapter and (with_base) of the base model alone to (image name, prompt) items."""
    model = loaded.model
    names = list(dict.fromkeys(name for name, _ in items))
    prompts = [p for _, p in items]
    feats = _features(loaded, image_paths, names, max_pixels)
    adapter = generate(
        model, encoder, prompts, [feats[n] for n, _ in items], eos_token_id=eos_token_id, settings=settings
    )
    if not with_base:
        return adapter, None
    with model.disable_adapter():
        if adapter_touches_vision(model):
            feats = _features(loaded, image_paths, names, max_pixels)
        base = generate(
            model,
            encoder,
            prompts,
            [feats[n] for n, _ in items],
            eos_token_id=eos_token_id,
            settings=settings,
        )
    return adapter, base


# ------------------------------------------------------------------------------- evaluation


def settings_from(eval_cfg: Any, default_max_new_tokens: int | None = None) -> GenerationSettings:
    """The generation part of the config's `eval:` section; `eval.max_new_tokens: null` takes
    `default_max_new_tokens` (what the adapter's training answers need)."""
    settings = GenerationSettings(
        max_new_tokens=eval_cfg.max_new_tokens,
        num_beams=eval_cfg.num_beams,
        batch_size=eval_cfg.batch_size,
        no_repeat_ngram_size=eval_cfg.no_repeat_ngram_size,
        repetition_penalty=float(eval_cfg.repetition_penalty),
    )
    return settings.with_default(default_max_new_tokens) if default_max_new_tokens else settings


def no_eos_counts(held_out: list[Sample], answers: list[Generated]) -> dict[str, int]:
    """Answers cut off at max_new_tokens (no EOS), per question ("Q1".."Q8") and "overall"."""
    counts: dict[str, int] = {}
    for s, g in zip(held_out, answers, strict=True):
        q = question_label(s.question_index)
        counts[q] = counts.get(q, 0) + (not g.ended)
    counts = dict(sorted(counts.items(), key=lambda kv: int(kv[0][1:])))
    counts["overall"] = sum(counts.values())
    return counts


def evaluate_loaded(
    loaded: Any,
    samples: Any,
    out_dir: Path,
    *,
    eos_token_id: int,
    prompt_template: str,
    split: str = "test",
    settings: GenerationSettings = DEFAULT_SETTINGS,
    max_pixels: int = 100_000_000,
    normalize: str = "clean",
    prefix: str | None = None,
) -> dict[str, Any]:
    """Evaluate an adapter that is already loaded (a PeftModel in `loaded.model`).

    Writes `out_dir/eval/predictions.csv` and `out_dir/eval/metrics.json` (atomically).

    Args:
        loaded: `model.LoadedModel` whose model is a PeftModel with the trained adapter.
        samples: `data.samples.CategorySamples` (train answers for the majority baseline, the
            held-out samples, image paths, question texts).
        prompt_template: the template the adapter was trained with.
        split: "test" or "val": which held-out part of split.json.
        normalize: the job's `data.normalize` level: predictions are normalised like the
            references were before scoring (predictions.csv keeps them as generated).
        prefix: the category name a joint adapter's prompts start with (`format_prompt`).

    Returns:
        the metrics.json content: {"adapter", "base", "majority"} blocks from
        `metrics.aggregate` ("Q1".."Q8" and "overall"), "settings", "n_images", "n_pairs".

    Raises:
        EvaluationError: no held-out question/answer pairs in that split.
    """
    held_out: list[Sample] = {"test": samples.test, "val": samples.val}[split]
    if not held_out:
        raise EvaluationError(
            f"no {split} question/answer pairs to evaluate on in {out_dir / 'split.json'}: the "
            f"{split} part is empty. Raise data.{split}_fraction (and retrain) or set eval.split."
        )
    questions = samples.questions
    majority = majority_answers((s.question_index, s.answer) for s in samples.train)
    encoder = make_encoder(loaded, eos_token_id)
    items = [(s.image, format_prompt(prompt_template, questions[s.question_index], prefix)) for s in held_out]
    t0 = time.time()
    adapter, base = answer_both(
        loaded,
        encoder,
        items,
        samples.image_paths,
        eos_token_id=eos_token_id,
        settings=settings,
        max_pixels=max_pixels,
    )
    assert base is not None
    seconds = time.time() - t0
    rows = prediction_rows(held_out, questions, adapter, base, majority)
    no_eos = {"adapter": no_eos_counts(held_out, adapter), "base": no_eos_counts(held_out, base)}
    if no_eos["adapter"]["overall"]:
        log.warning(
            "%d of %d adapter answers reached max_new_tokens=%s without EOS (cut off): raise "
            "eval.max_new_tokens if the references are that long",
            no_eos["adapter"]["overall"],
            len(held_out),
            settings.max_new_tokens,
        )
    metrics = score_models(held_out, rows, normalize)
    metrics.update(
        settings={**asdict(settings), "do_sample": False, "split": split, "eos_token_id": eos_token_id},
        n_images=len({s.image for s in held_out}),
        n_pairs=len(held_out),
        majority_answers={question_label(q): a for q, a in majority.items()},
        # answers that ended without EOS: cut off by max_new_tokens (scored as they are)
        no_eos=no_eos,
        generation_s=round(seconds, 2),
    )
    write_eval(out_dir, rows, metrics)
    return metrics


def score_models(held_out: list[Sample], rows: list[dict[str, str]], normalize: str) -> dict[str, Any]:
    """Every model's text metrics per question (`aggregate`), and "questions": each question
    on its own terms, with intervals and paired tests (`clinical.clinical_scores`)."""
    scored = {model: scored_rows(held_out, rows, model, normalize) for model in MODELS}
    metrics: dict[str, Any] = {model: aggregate(scored[model]) for model in MODELS}
    metrics["questions"] = clinical_scores(
        [s.question_index for s in held_out],
        [s.image for s in held_out],
        [s.answer for s in held_out],
        {model: [r["prediction"] for r in scored[model]] for model in MODELS},
    )
    return metrics


def scored_rows(
    held_out: list[Sample], rows: list[dict[str, str]], model: str, normalize: str
) -> list[dict[str, Any]]:
    """(question, reference, prediction) of one model for `aggregate`, the prediction put
    through the same answer normalisation as the references (`data.normalize`), so that a
    model is not scored down for a spelling the data step would have fixed."""
    norm = Normalizer(normalize) if normalize in ("spelling", "canonical") else None
    out = []
    for s, r in zip(held_out, rows, strict=True):
        pred = r[f"{model}_prediction"]
        if norm is not None:
            pred = norm(s.question_index, pred) or ""
        out.append({"question": s.question_index, "reference": s.answer, "prediction": pred})
    return out


def prediction_rows(
    held_out: list[Sample],
    questions: list[str],
    adapter: list[Generated],
    base: list[Generated],
    majority: dict[int, str],
) -> list[dict[str, str]]:
    """The rows of predictions.csv (PREDICTION_COLUMNS), one per held-out answer."""
    return [
        {
            "image": s.image,
            "question": question_label(s.question_index),
            "question_text": questions[s.question_index],
            "reference": s.answer,
            "adapter_prediction": a.text,
            "base_prediction": b.text,
            "majority_prediction": majority.get(s.question_index, ""),
            "adapter_no_eos": "" if a.ended else "1",
            "base_no_eos": "" if b.ended else "1",
        }
        for s, a, b in zip(held_out, adapter, base, strict=True)
    ]


def write_eval(out_dir: Path, rows: list[dict[str, str]], metrics: dict[str, Any]) -> Path:
    """Write eval/predictions.csv and eval/metrics.json atomically; returns the eval folder."""
    from fada_batch.fsutil import atomic_write_json, atomic_write_text

    folder = Path(out_dir) / EVAL_DIR
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(PREDICTION_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / PREDICTIONS_FILE, buf.getvalue())
    atomic_write_json(folder / METRICS_FILE, metrics)  # last: its presence = evaluation done
    return folder


def summary_block(metrics: dict[str, Any]) -> dict[str, Any]:
    """The `eval` entry of training_summary.json: overall scores and the per-question table."""
    return {
        "overall": metrics["adapter"]["overall"],
        "base_overall": metrics["base"]["overall"],
        "majority_overall": metrics["majority"]["overall"],
        "per_question": {
            q: {m: metrics[m][q] for m in MODELS if q in metrics[m]}
            for q in metrics["adapter"]
            if q != "overall"
        },
        "n_images": metrics["n_images"],
        "n_pairs": metrics["n_pairs"],
        "split": metrics["settings"]["split"],
        "max_new_tokens": metrics["settings"]["max_new_tokens"],
        "generation": {k: metrics["settings"].get(k) for k in GENERATION_KEYS},
        "no_eos": {m: metrics["no_eos"][m]["overall"] for m in metrics["no_eos"]},
    }


def evaluate_after_training(
    loaded: Any,
    samples: Any,
    out_dir: Path,
    *,
    eos_token_id: int,
    cfg: Any,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Training's last step: evaluate the adapter in memory; returns the summary's `eval` entry.

    `max_new_tokens` is what the training answers need (the default of `eval.max_new_tokens:
    null`), the same number `fada-batch evaluate` reads from the adapter later.

    A failure here is logged and reported in the entry (`{"error": ...}`), not raised: the
    adapter is already saved, and `fada-batch evaluate` can run the evaluation again.
    """
    try:
        if getattr(samples, "parts", None):  # a joint adapter: per category and overall
            metrics = evaluate_joint_loaded(
                loaded, samples, out_dir, eos_token_id=eos_token_id, cfg=cfg, max_new_tokens=max_new_tokens
            )
            publish_scores(out_dir, metrics, tensorboard=cfg.train.tensorboard)
            return {**summary_block(metrics), "categories": metrics["categories"]}
        metrics = evaluate_loaded(
            loaded,
            samples,
            out_dir,
            eos_token_id=eos_token_id,
            prompt_template=cfg.data.prompt_template,
            split=cfg.eval.split,
            settings=settings_from(cfg.eval, max_new_tokens),
            max_pixels=cfg.data.max_image_pixels,
            normalize=normalize_level(cfg.data),
        )
    except EvaluationError as e:  # e.g. an empty test split: nothing to evaluate, no traceback
        log.warning("no evaluation after training: %s", e)
        return {"error": str(e)}
    except Exception as e:
        log.exception("evaluation after training failed; rerun it with `fada-batch evaluate`")
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}
    publish_scores(out_dir, metrics, tensorboard=cfg.train.tensorboard)
    return summary_block(metrics)


def evaluate_joint_loaded(
    loaded: Any,
    samples: Any,
    out_dir: Path,
    *,
    eos_token_id: int,
    cfg: Any,
    max_new_tokens: int | None,
    prompt_template: str | None = None,
) -> dict[str, Any]:
    """A joint adapter (train.mode=joint) evaluated per category and overall, with the same
    metrics and baselines as a category's own evaluation. Each category's prompts start as
    they did in training (`samples.prompt_prefixes`, with `prompt_template`, default
    data.prompt_template).

    Each category's held-out images are answered and scored on their own (its questions, its
    majority baseline from its training answers), written to
    `{out_dir}/categories/<slug>/eval/`; the overall scores pool every category's rows and go
    to `{out_dir}/eval/` with a "categories" block holding each category's summary block.

    Returns:
        the overall metrics.json content.
    """
    rows: list[dict[str, str]] = []
    held_out: list[Sample] = []
    per_category: dict[str, Any] = {}
    settings = settings_from(cfg.eval, max_new_tokens)
    for name, part in samples.parts.items():
        folder = Path(out_dir) / JOINT_PARTS_DIR / cfg.data.category(name).slug
        metrics = evaluate_loaded(
            loaded,
            part,
            folder,
            eos_token_id=eos_token_id,
            prompt_template=prompt_template or cfg.data.prompt_template,
            split=cfg.eval.split,
            settings=settings,
            max_pixels=cfg.data.max_image_pixels,
            normalize=normalize_level(cfg.data),
            prefix=samples.prompt_prefixes.get(name),
        )
        per_category[name] = summary_block(metrics)
        held_out += {"test": part.test, "val": part.val}[cfg.eval.split]
        with open(folder / EVAL_DIR / PREDICTIONS_FILE, newline="") as f:
            rows += list(csv.DictReader(f))
    overall = score_models(held_out, rows, normalize_level(cfg.data))
    overall.update(
        settings={
            **asdict(settings),
            "do_sample": False,
            "split": cfg.eval.split,
            "eos_token_id": eos_token_id,
        },
        n_images=len({s.image for s in held_out}),
        n_pairs=len(held_out),
        no_eos={m: {"overall": sum(r[f"{m}_no_eos"] == "1" for r in rows)} for m in ("adapter", "base")},
        categories=per_category,
    )
    write_eval(out_dir, rows, overall)
    return overall


def publish_scores(out_dir: Path, metrics: dict[str, Any], *, tensorboard: bool) -> None:
    """Put an evaluation's scores where people look: the adapter's model card (its evaluation
    section, rewritten atomically) and the category's TensorBoard folder (tags
    `eval/<model>/<question>/<metric>` at the step whose adapter shipped, replacing an earlier
    evaluation's)."""
    from fada_batch.fsutil import atomic_write_text
    from fada_batch.training.card import CARD_FILE, EVAL_SECTION, replace_section
    from fada_batch.training.outputs import FINAL_MARKER, FINAL_MODEL
    from fada_batch.training.tblog import TENSORBOARD_DIR, append_scalars

    card = Path(out_dir) / FINAL_MODEL / CARD_FILE
    if card.is_file():
        atomic_write_text(card, replace_section(card.read_text(), EVAL_SECTION, card_scores(metrics)))
    if not tensorboard:
        return
    try:
        marker = json.loads((Path(out_dir) / FINAL_MODEL / FINAL_MARKER).read_text())
        step = int((marker.get("shipped") or {}).get("step") or 0)
    except (OSError, ValueError, TypeError):
        step = 0
    values = {
        f"eval/{model}/{q}/{name}": value
        for model in MODELS
        for q, block in metrics[model].items()
        for name, value in block.items()
        if name != "n"
    }
    append_scalars(Path(out_dir) / TENSORBOARD_DIR, values, step, replace="eval/")


def card_scores(metrics: dict[str, Any]) -> str:
    """The model card's evaluation section: per question, the adapter against the base model
    alone and the majority answer (exact match and token F1)."""
    st = metrics["settings"]
    head = ["question", "pairs"] + [f"{m} {k}" for m in MODELS for k in ("EM", "F1")]
    rows = []
    for q, block in metrics["adapter"].items():
        cells = [
            f"{(metrics[m].get(q) or {}).get(k, float('nan')):.3f}"
            for m in MODELS
            for k in ("exact_match", "token_f1")
        ]
        rows.append([f"**{q}**" if q == "overall" else q, block.get("n", ""), *cells])
    lines = [
        f"{plural(metrics['n_pairs'], 'question/answer pair')} on "
        f"{plural(metrics['n_images'], 'held-out image')} (the `{st['split']}` part of `split.json`), "
        f"greedy decoding, at most {st['max_new_tokens']} new tokens. EM: exact match; F1: token F1 "
        "(docs/evaluation.md of fada-batch); base: the base model without the adapter; majority: "
        "each question's most frequent training answer.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]
    return "\n".join(lines)


def evaluate_category(cfg: Any, category_name: str, *, job_probe: JobProbe | None = None) -> dict[str, Any]:
    """Evaluate a trained category's `final_model/` on its held-out images.

    Loads the base model (cfg.model) and the adapter once, answers every held-out question
    with the adapter and with the base model alone, scores both and the majority baseline,
    and writes `{output.root}/blip2_{slug}/eval/predictions.csv` and `eval/metrics.json`.

    Args:
        job_probe: asks the scheduler whether the holder of the category's lock still runs
            (`run.slurmjobs.job_phase`); None: judge by its pid and age alone.

    Returns:
        the metrics.json content (see `evaluate_loaded`).

    Raises:
        EvaluationError: the category is not trained or has no split.json.
        AdapterError: the adapter is incomplete or belongs to another base model.
        ModelLoadError: the base model cannot be loaded (e.g. offline and not cached).
        DataError: the data no longer matches split.json.
    """
    from fada_batch.data.split import SPLIT_FILE
    from fada_batch.training.outputs import FINAL_MODEL, category_output_dir, final_model_complete

    category = cfg.data.category(category_name)
    out_dir = category_output_dir(cfg, category)
    if not final_model_complete(out_dir):
        raise EvaluationError(
            f"{category.name} has no complete trained adapter in {out_dir / FINAL_MODEL}: train it "
            f"first (`fada-batch train --job JOB --category {category.name}`)."
        )
    if not (out_dir / SPLIT_FILE).is_file():
        raise EvaluationError(
            f"{out_dir / SPLIT_FILE} is missing, so the held-out images are unknown; evaluating on "
            f"others could include training images. Retrain {category.name} with --force."
        )
    info = read_adapter_info(out_dir / FINAL_MODEL)
    mc = cfg.model
    check_base_model(
        info,
        mc.name_or_path,
        fix=f"set model.name_or_path back to it (-p model.name_or_path={info.base_model})",
    )
    settings = settings_from(cfg.eval)
    settings.check()
    # not while a task trains (or --force retrains) this category, nor beside another evaluation
    with category_lock(out_dir, purpose="evaluated", job_probe=job_probe):
        return _evaluate_locked(cfg, category, out_dir, info, settings)


def _load_for_evaluation(
    cfg: Any, info: AdapterInfo, train: list[Sample], settings: GenerationSettings
) -> tuple[Any, int, GenerationSettings]:
    """The base model loaded as training loaded it, with the adapter on it; the EOS it was
    trained with; `settings` with the answer length limit its training answers need."""
    from fada_batch.training.collate import answer_length_stats
    from fada_batch.training.model import eos_token_id

    mc = cfg.model
    loaded = load_like_training(
        info, mc.name_or_path, device=mc.device, dtype=mc.dtype, quantization=mc.quantization
    )
    load_adapter(loaded, info.path)
    eos = info.eos_token_id if info.eos_token_id is not None else eos_token_id(loaded.model, loaded.processor)
    budget = info.max_new_tokens
    if budget is None:  # an adapter from before the limit was recorded: its training answers say it
        encoder = make_encoder(loaded, eos)
        budget = int(answer_length_stats([encoder.encode(s) for s in train])["max_new_tokens"])
    return loaded, eos, settings.with_default(budget)


def _evaluate_locked(
    cfg: Any, category: Any, out_dir: Path, info: AdapterInfo, settings: GenerationSettings
) -> dict[str, Any]:
    from fada_batch.data.samples import prepare_data
    from fada_batch.training.outputs import final_model_complete

    if not final_model_complete(out_dir):  # removed by a --force retraining since the check
        raise EvaluationError(f"{category.name}: {out_dir} no longer holds a complete trained adapter")
    # resuming=True: refuse (rather than rewrite) a split.json that no longer matches the data
    samples = prepare_data(cfg, category, out_dir, resuming=True)
    if info.questions and list(info.questions) != list(samples.questions):
        log.warning("%s: the sheet's questions differ from those the adapter was trained with", category.name)
    loaded, eos, settings = _load_for_evaluation(cfg, info, samples.train, settings)
    metrics = evaluate_loaded(
        loaded,
        samples,
        out_dir,
        eos_token_id=eos,
        prompt_template=info.prompt_template or cfg.data.prompt_template,
        split=cfg.eval.split,
        settings=settings,
        max_pixels=cfg.data.max_image_pixels,
        normalize=normalize_level(cfg.data),
    )
    publish_scores(out_dir, metrics, tensorboard=cfg.train.tensorboard)
    log.info(
        "%s: exact match adapter %.3f, base %.3f, majority %.3f on %d %s pairs; %s",
        category.name,
        metrics["adapter"]["overall"]["exact_match"],
        metrics["base"]["overall"]["exact_match"],
        metrics["majority"]["overall"]["exact_match"],
        metrics["n_pairs"],
        cfg.eval.split,
        out_dir / EVAL_DIR,
    )
    return metrics


def evaluate_joint(cfg: Any, *, job_probe: JobProbe | None = None) -> dict[str, Any]:
    """Evaluate the joint adapter (`{output.root}/blip2_joint/final_model/`) on every
    category's held-out images, per category and overall, as its evaluation after training
    does: the categories, and the prefix each category's prompts start with, are the ones its
    `fada_batch.json` records (train.mode, categories, category_in_prompt, prompt_prefixes), not
    the job's; the split is each category's `split.json` under `blip2_joint/categories/`.

    Writes `blip2_joint/eval/` (overall, with a "categories" block) and
    `blip2_joint/categories/<slug>/eval/`, and the scores into the model card and TensorBoard.

    Returns:
        the overall metrics.json content (see `evaluate_joint_loaded`).

    Raises:
        EvaluationError: no complete joint adapter, or it is not a joint adapter.
        AdapterError, ModelLoadError, DataError: as `evaluate_category`.
    """
    from fada_batch.data.split import SPLIT_FILE
    from fada_batch.training.outputs import FINAL_MODEL, final_model_complete, joint_output_dir

    out_dir = joint_output_dir(cfg)
    if not final_model_complete(out_dir):
        raise EvaluationError(
            f"there is no complete joint adapter in {out_dir / FINAL_MODEL}: train it first "
            "(`fada-batch train --job JOB -p train.mode=joint`)."
        )
    info = read_adapter_info(out_dir / FINAL_MODEL)
    if not info.joint or not info.categories:
        raise EvaluationError(
            f"{out_dir / FINAL_MODEL / 'fada_batch.json'} does not record a joint adapter (mode "
            f"{info.mode!r}, categories {info.categories}): retrain it with train.mode=joint --force."
        )
    if not (out_dir / SPLIT_FILE).is_file():
        raise EvaluationError(
            f"{out_dir / SPLIT_FILE} is missing, so the held-out images are unknown; evaluating on "
            "others could include training images. Retrain the joint adapter with --force."
        )
    check_base_model(
        info,
        cfg.model.name_or_path,
        fix=f"set model.name_or_path back to it (-p model.name_or_path={info.base_model})",
    )
    settings = settings_from(cfg.eval)
    settings.check()
    with category_lock(out_dir, purpose="evaluated", job_probe=job_probe):
        return _evaluate_joint_locked(cfg, out_dir, info, settings)


def _evaluate_joint_locked(
    cfg: Any, out_dir: Path, info: AdapterInfo, settings: GenerationSettings
) -> dict[str, Any]:
    from fada_batch.data.samples import prepare_joint_data
    from fada_batch.training.outputs import final_model_complete

    if not final_model_complete(out_dir):  # removed by a --force retraining since the check
        raise EvaluationError(f"joint: {out_dir} no longer holds a complete trained adapter")
    names = list(info.categories or [])
    prefixes = dict(info.prompt_prefixes or {})
    in_prompt = any(p is not None for p in prefixes.values())
    if [cfg.data.category(c).name for c in cfg.data.categories] != names:
        log.warning(
            "the joint adapter in %s was trained on %s; evaluating on those (data.categories: %s)",
            out_dir,
            ", ".join(names),
            ", ".join(cfg.data.categories),
        )
    # the job as training saw it: its categories and prompt rule, from the adapter's record
    as_trained = replace(
        cfg,
        data=replace(cfg.data, categories=names),
        train=replace(cfg.train, mode="joint", category_in_prompt=in_prompt),
    )
    categories = [cfg.data.category(n) for n in names]
    # resuming=True: refuse (rather than rewrite) a split.json that no longer matches the data
    samples = prepare_joint_data(as_trained, categories, out_dir, resuming=True)
    samples.prompt_prefixes = prefixes
    loaded, eos, settings = _load_for_evaluation(cfg, info, samples.train, settings)
    metrics = evaluate_joint_loaded(
        loaded,
        samples,
        out_dir,
        eos_token_id=eos,
        cfg=as_trained,
        max_new_tokens=settings.max_new_tokens,
        prompt_template=info.prompt_template,
    )
    publish_scores(out_dir, metrics, tensorboard=cfg.train.tensorboard)
    log.info(
        "joint: exact match adapter %.3f, base %.3f, majority %.3f on %d %s pairs of %s; %s",
        metrics["adapter"]["overall"]["exact_match"],
        metrics["base"]["overall"]["exact_match"],
        metrics["majority"]["overall"]["exact_match"],
        metrics["n_pairs"],
        cfg.eval.split,
        plural(len(names), "category", "categories"),
        out_dir / EVAL_DIR,
    )
    return metrics


def trained_categories(cfg: Any) -> list[str]:
    """Categories with a complete final_model/ under the output root (job's categories first)."""
    from fada_batch.training.outputs import category_output_dir, final_model_complete

    table = cfg.data.table()
    names = [table.get(c).name for c in cfg.data.categories]
    names += [n for n in table.names if n not in names]
    return [n for n in names if final_model_complete(category_output_dir(cfg, table.get(n)))]


def format_metrics(category: str, metrics: dict[str, Any]) -> str:
    """A plain-text table: exact match per question for adapter, base and majority, and F1."""
    head = (
        f"{category}: {plural(metrics['n_pairs'], 'question/answer pair')} on "
        f"{plural(metrics['n_images'], 'held-out image')} ({metrics['settings']['split']})"
    )
    lines = [head, f"  {'':8} {'adapter EM':>10} {'base EM':>8} {'majority EM':>11} {'adapter F1':>10}"]
    for q in metrics["adapter"]:
        a, b, m = (metrics[k].get(q, {}) for k in MODELS)
        lines.append(
            f"  {q:8} {a.get('exact_match', float('nan')):10.3f} {b.get('exact_match', float('nan')):8.3f} "
            f"{m.get('exact_match', float('nan')):11.3f} {a.get('token_f1', float('nan')):10.3f}"
        )
    for name, block in (metrics.get("categories") or {}).items():  # a joint adapter's, per category
        lines.append(
            f"  {name}: exact match adapter {block['overall']['exact_match']:.3f}, base "
            f"{block['base_overall']['exact_match']:.3f}, majority {block['majority_overall']['exact_match']:.3f}; "
            f"adapter F1 {block['overall']['token_f1']:.3f} ({plural(block['n_pairs'], 'pair')})"
        )
    return "\n".join(lines)
