"""Load the BLIP-2 base model and processor, apply LoRA, and run the two halves of a forward.

The forward is split in two because only the language model trains: `image_features` (vision
tower -> Q-Former -> language_projection, frozen, in eval mode) can be computed once per image
and reused (the frozen-feature cache), and `lm_logits` puts those features where the
`<image>` tokens are and runs the language model with its LoRA. `Blip2ForConditionalGeneration`
does exactly this internally (masked_scatter of the projected query outputs over the image
token embeddings), so both paths give the same logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fada_batch.text import plural

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The base model or processor could not be loaded; the message says how to fix it."""


class ModelFolderMissing(ModelLoadError):
    """model.name_or_path is a local path (absolute, `./`, `~`) where no folder exists."""


@dataclass
class LoadedModel:
    """A base model with its processor and where it runs."""

    model: Any  # Blip2ForConditionalGeneration, or a PeftModel around it
    processor: Any  # Blip2Processor
    device: torch.device
    dtype: torch.dtype
    quantization: str
    name_or_path: str
    # Set when `quantization: auto` chose 4-bit: the GPU is small, so activations must shrink too.
    gradient_checkpointing: bool = False
    quantization_reason: str = ""  # why `auto` chose what it chose (empty when configured)


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


def _is_path(name_or_path: str) -> bool:
    """A local path rather than a hub id (`load_job` makes `./x` and `~/x` absolute)."""
    return name_or_path.startswith(("/", ".", "~"))


def _missing_folder_text(name: str) -> str:
    return (
        f"the model folder {name} (model.name_or_path) does not exist. Point model.name_or_path at "
        f"a model folder, or make one there: `fada-batch stage-model --model Salesforce/blip2-opt-2.7b "
        f"--to {name}` on a machine with internet, or `fada-batch make-tiny-model {name}` for the "
        "demo's tiny model."
    )


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

    # Quantise only the language model's Linear layers: the image side runs once per image
    # (the feature cache) in the load dtype, and LoRA sits on the language model.
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


GiB = 2**30


@dataclass(frozen=True)
class QuantizationChoice:
    """What `model.quantization: auto` resolved to, and why."""

    quantization: str  # none, 8bit or 4bit
    gradient_checkpointing: bool  # advised on top of the config's own setting
    reason: str


def weight_bytes(config: Any, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the model's weights under none / 8bit / 4bit, counted from its config.

    The model is built on the meta device (no memory, no download) and counted the way
    `load_base_model` + `apply_lora` hold it (tests/test_bench.py checks this against a real
    load): everything in `dtype`, except the language model's Linear layers under 8bit/4bit
    (see `quantization_config`). transformers keeps the Q-Former and query tokens in fp32 only
    when `dtype` is float16 (`_keep_in_fp32_modules`); in bf16 they are bf16 too.
    LLM.int8 stores a byte per weight and an fp32 scale per output row; nf4 with double
    quantisation half a byte per weight, an 8-bit absmax per block of 64 and an fp32 absmax per
    256 blocks.
    """
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    elt = torch.empty((), dtype=dtype).element_size()
    linears = [
        m
        for name, m in model.language_model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name  # the head is tied to embeddings
    ]
    lm_linear = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    blocks = sum(math.ceil(m.weight.numel() / 64) for m in linears)
    fp32 = 0
    if dtype == torch.float16:
        fp32 = sum(p.numel() for p in model.qformer.parameters()) + model.query_tokens.numel()
    total = sum(p.numel() for p in model.parameters())
    base = (total - lm_linear - fp32) * elt + fp32 * 4
    return {
        "none": base + lm_linear * elt,
        "8bit": base + lm_linear + rows * 4,
        "4bit": base + lm_linear // 2 + blocks + math.ceil(blocks / 256) * 4,
    }


def training_bytes(weights: int) -> int:
    """GPU memory to train LoRA on weights of `weights` bytes: +20% (LoRA weights, AdamW state,
    gradients, allocator slack) and 3 GiB (activations, fp32 logits over OPT's 50k vocabulary
    for the loss, the CUDA context).

    Measured on the full blip2-opt-2.7b architecture in bf16 (scripts/gpu_benchmark.py
    --ours-only, docs/performance.md): autograd keeps 3.9 GB for a micro-batch of 16 rows
    padded to 75 tokens, ~3.2 MB per token. So 3 GiB holds a micro-batch of at least ~6 rows
    with the rest; on a card where 16 rows do not fit, the out-of-memory back-off halves it."""
    return int(weights * 1.2) + 3 * GiB


def pick_quantization(
    *, device_type: str, weights: dict[str, int], free_bytes: int, total_bytes: int, room: float = 0.6
) -> QuantizationChoice:
    """The rule behind `model.quantization: auto` (pure: memory figures are passed in).

    On a GPU: `none` (bf16) when training it needs at most `room` of the card and no more than
    is free; else `8bit` under the same test; else `4bit` with gradient checkpointing (the card
    is small, so activations must shrink too). 16-bit is the fast path (LLM.int8 runs 2-3x
    slower at this size), so quantisation is only for cards where 16-bit does not fit.
    Off the GPU: `none` (bitsandbytes on CPU is slower than fp32, and memory is not the limit).
    """
    if device_type != "cuda":
        return QuantizationChoice("none", False, f"on {device_type}: no quantisation")
    budget = min(free_bytes, room * total_bytes)
    gib = {q: training_bytes(b) / GiB for q, b in weights.items()}
    where = f"{free_bytes / GiB:.1f} of {total_bytes / GiB:.1f} GiB free, budget {budget / GiB:.1f} GiB"
    for q in ("none", "8bit"):
        if training_bytes(weights[q]) <= budget:
            return QuantizationChoice(q, False, f"training needs ~{gib[q]:.1f} GiB in {q}; {where}")
    fits = "" if training_bytes(weights["4bit"]) <= budget else " (may still not fit: expect OOM back-off)"
    return QuantizationChoice(
        "4bit",
        True,
        f"8bit needs ~{gib['8bit']:.1f} GiB, 4bit ~{gib['4bit']:.1f} GiB{fits}; {where}; "
        "gradient checkpointing on to cut activations on this small card",
    )


def resolve_quantization(name_or_path: str, device: torch.device, dtype: torch.dtype) -> QuantizationChoice:
    """`pick_quantization` for this model on this device (reads only the model's config)."""
    if device.type != "cuda":
        return pick_quantization(device_type=device.type, weights={}, free_bytes=0, total_bytes=0)
    from transformers import Blip2Config

    try:
        config = Blip2Config.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_error_text(name_or_path, "config", e)) from e
    free, total = torch.cuda.mem_get_info(device)
    return pick_quantization(
        device_type="cuda", weights=weight_bytes(config, dtype), free_bytes=free, total_bytes=total
    )


def load_base_model(
    name_or_path: str, *, device: str = "auto", dtype: str = "auto", quantization: str = "none"
) -> LoadedModel:
    """Load a BLIP-2 model and its processor by hub id or local path.

    `quantization` is none, 8bit, 4bit, or auto (`pick_quantization` decides from the model's
    size and the GPU's memory; the choice and why are kept on the returned LoadedModel).

    Raises:
        ModelFolderMissing: `name_or_path` is a local path where nothing exists.
        ModelLoadError: missing or incomplete model (what is missing and how to stage it).
    """
    from transformers import Blip2ForConditionalGeneration

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if _is_path(name_or_path) and not _is_local(name_or_path):
        raise ModelFolderMissing(_missing_folder_text(name_or_path))
    if _is_local(name_or_path):
        missing = check_model_folder(Path(name_or_path).expanduser())
        if missing:
            raise ModelLoadError(
                f"the model folder {name_or_path} is incomplete: it lacks {', '.join(missing)}. "
                + _stage_hint(name_or_path)
            )
    processor = load_processor(name_or_path)
    choice = None
    if quantization == "auto":
        choice = resolve_quantization(name_or_path, dev, torch_dtype)
        quantization = choice.quantization
        log.info("model.quantization=auto -> %s: %s", quantization, choice.reason)
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
    loaded = LoadedModel(model, processor, dev, torch_dtype, quantization, name_or_path)
    if choice is not None:
        loaded.gradient_checkpointing = choice.gradient_checkpointing
        loaded.quantization_reason = choice.reason
    return loaded


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
    """Wrap the model with LoRA; only the adapter (and `modules_to_save`) trains.

    Quantised or not, the base stays as loaded: every weight frozen, in the load dtype (bf16 on
    a GPU) except the int8/nf4 Linear layers. peft's `prepare_model_for_kbit_training` is not
    used: it upcasts every other parameter to fp32 (the ~1B-parameter vision tower, Q-Former,
    embeddings: 6.9 instead of 4.8 GiB for blip2-opt-2.7b in 8-bit), and a separate evaluation
    process, which does not train, would then run other numerics. The loss is taken in fp32
    (`collate.masked_lm_loss_sum`); LoRA's own weights are fp32 (peft's default).

    Raises:
        ConfigError: a target module or module to save lies outside the language model.
    """
    from peft import LoraConfig, get_peft_model

    model = loaded.model
    if gradient_checkpointing or loaded.gradient_checkpointing:
        lm = model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )
    with warnings.catch_warnings():  # peft reads transformers' renamed flag: noise, not news
        warnings.filterwarnings("ignore", r".*is_gradient_checkpointing.* is deprecated", FutureWarning)
        peft_model = get_peft_model(model, config)
    check_trainable_in_language_model(peft_model)
    loaded.model = peft_model
    return peft_model


def check_trainable_in_language_model(model: Any) -> None:
    """Refuse trainable parameters outside the language model: the image side (vision tower,
    Q-Former, language_projection) runs under no_grad, once per image (the feature cache), so
    they would stay as initialised while the run looks healthy.

    Raises:
        ConfigError: naming the modules, the config key that put them there, and the fix.
    """
    from fada_batch.config import ConfigError

    outside: dict[str, set[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and ".language_model." not in f".{name}":
            key = "lora.modules_to_save" if ".modules_to_save." in name else "lora.target_modules"
            module = name.removeprefix("base_model.model.").split(".lora_")[0].split(".modules_to_save")[0]
            outside.setdefault(key, set()).add(module.rsplit(".", 1)[0] if key.endswith("save") else module)
    if not outside:
        return
    lines = [
        f"  - {key} puts trainable weights in {plural(len(mods), 'module')} of the image side, e.g. "
        + ", ".join(sorted(mods)[:4])
        for key, mods in outside.items()
    ]
    raise ConfigError(
        "LoRA would train modules that never get a gradient:\n"
        + "\n".join(lines)
        + "\nThe vision tower, Q-Former and language_projection run frozen under no_grad (their "
        "output is computed once per image), so only the language model trains. Name modules of "
        "the language model only: q_proj, k_proj, v_proj, out_proj (fc1/fc2 also exist in the "
        "vision tower: leave them out), and for modules_to_save the full path, e.g. "
        "language_model.model.decoder.final_layer_norm."
    )


def apply_lora_section(loaded: LoadedModel, lora: Any, *, gradient_checkpointing: bool = False) -> Any:
    """`apply_lora` with the job's `lora:` section (r, alpha, dropout, target and saved modules)."""
    return apply_lora(
        loaded,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        gradient_checkpointing=gradient_checkpointing,
    )


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
    # use_cache=False: a training forward needs no key/value cache (it would only hold memory)
    out = base.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    return out.logits


def forward_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for the training and validation forward when the base is bf16 (quantised
    or not): LoRA's fp32 weights and the bf16 activations then meet in bf16 matmuls, as the
    rest of the model runs. fp32 and fp16 bases run as they are."""
    if dtype == torch.bfloat16 and (
        device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    ):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
