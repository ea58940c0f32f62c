"""Load the BLIP-2 base model and processor, apply LoRA, and run the two halves of a forward.

The forward is split in two because only the language model trains: `image_features` (vision
tower -> Q-Former -> language_projection, frozen, in eval mode) can be computed once per image
and reused (the frozen-feature cache), and `lm_logits` puts those features where the
`<image>` tokens are and runs the language model with its LoRA. `Blip2ForConditionalGeneration`
does exactly this internally (masked_scatter of the projected query outputs over the image
token embeddings), so both paths give the same logits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The base model or processor could not be loaded; the message says how to fix it."""


@dataclass
class LoadedModel:
    """A base model with its processor and where it runs."""

    model: Any  # Blip2ForConditionalGeneration, or a PeftModel around it
    processor: Any  # Blip2Processor
    device: torch.device
    dtype: torch.dtype
    quantization: str
    name_or_path: str


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device is 'cuda' but no CUDA GPU is visible (check --gres/--gpus and "
            "CUDA_VISIBLE_DEVICES, or set model.device=auto to fall back to the CPU)."
        )
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere, unless the config names one."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def check_model_folder(path: Path) -> list[str]:
    """What a local model folder lacks for `from_pretrained` (empty when complete)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        missing.append("model weights (*.safetensors)")
    if not (path / "preprocessor_config.json").is_file() and not (path / "processor_config.json").is_file():
        missing.append("preprocessor_config.json / processor_config.json")
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        missing.append("tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return missing


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _stage_hint(name: str) -> str:
    return (
        f"On a machine with internet run `fada-batch stage-model --model {name} --to "
        "/shared/models/<name>` (or `huggingface-cli download`), then set model.name_or_path "
        "to that folder."
    )


def load_processor(name_or_path: str) -> Any:
    from transformers import Blip2Processor

    try:
        return Blip2Processor.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_error_text(name_or_path, "processor", e)) from e


def _load_error_text(name: str, what: str, err: Exception) -> str:
    if _is_local(name):
        missing = check_model_folder(Path(name).expanduser())
        detail = f" It lacks: {', '.join(missing)}." if missing else f" ({err})"
        return f"cannot load the {what} from the folder {name}.{detail} Re-stage it. " + _stage_hint(name)
    if _offline():
        return (
            f"cannot load the {what} {name!r}: HF_HUB_OFFLINE=1 and it is not in the local "
            f"cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}). " + _stage_hint(name)
        )
    return f"cannot load the {what} {name!r}: {err}. " + _stage_hint(name)


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """`BitsAndBytesConfig` for 8bit/4bit (the vision tower and Q-Former stay unquantised)."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # Quantise only the language model: the vision tower is frozen and small next to OPT, and
    # the Q-Former is kept in fp32 by the model class anyway.
    skip = ["vision_model", "qformer", "language_projection", "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
    )


def load_base_model(
    name_or_path: str, *, device: str = "auto", dtype: str = "auto", quantization: str = "none"
) -> LoadedModel:
    """Load a BLIP-2 model and its processor by hub id or local path.

    Raises:
        ModelLoadError: missing or incomplete model (what is missing and how to stage it).
    """
    from transformers import Blip2ForConditionalGeneration

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if _is_local(name_or_path):
        missing = check_model_folder(Path(name_or_path).expanduser())
        if missing:
            raise ModelLoadError(
                f"the model folder {name_or_path} is incomplete: it lacks {', '.join(missing)}. "
                + _stage_hint(name_or_path)
            )
    processor = load_processor(name_or_path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    qconf = quantization_config(quantization, torch_dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    try:
        model = Blip2ForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_error_text(name_or_path, "model", e)) from e
    if qconf is None:
        model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, processor, dev, torch_dtype, quantization, name_or_path)


def apply_lora(
    loaded: LoadedModel,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    modules_to_save: list[str],
    gradient_checkpointing: bool = False,
) -> Any:
    """Wrap the model with LoRA; only the adapter (and `modules_to_save`) trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = loaded.model
    if loaded.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    loaded.model = peft_model
    return peft_model


def base_of(model: Any) -> Any:
    """The `Blip2ForConditionalGeneration` inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Frozen vision -> Q-Former -> language_projection output, in eval mode.

    Args:
        pixel_values: (B, 3, H, W) in the vision tower's dtype.
    Returns:
        (B, num_query_tokens, text_hidden)
    """
    base = base_of(model)
    modes = [(m, m.training) for m in (base.vision_model, base.qformer, base.language_projection)]
    for m, _ in modes:
        m.eval()  # Q-Former dropout would make features differ between epochs
    try:
        out = base.get_image_features(pixel_values=pixel_values, return_dict=True)
        return out.pooler_output
    finally:
        for m, was in modes:
            m.train(was)


def lm_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Logits of the language model with image features placed at the `<image>` tokens.

    Args:
        input_ids, attention_mask: (B, T); each row holds num_query_tokens image tokens.
        features: (B, num_query_tokens, text_hidden) from `image_features`.
    Returns:
        logits (B, T, V)
    """
    base = base_of(model)
    embeds = base.get_input_embeddings()(input_ids)  # (B, T, H)
    mask = (input_ids == base.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
    embeds = embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))
    out = base.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
    return out.logits


def eos_token_id(model: Any, processor: Any) -> int:
    """The id generation stops at (blip2-opt-2.7b uses "\\n", not `</s>`)."""
    base = base_of(model)
    for conf in (getattr(base, "generation_config", None), base.config.text_config):
        eos = getattr(conf, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return int(processor.tokenizer.eos_token_id)


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
