"""`fada-batch export`: hand a trained adapter on, as a clean adapter folder or merged into the base.

    export_adapter(Path("outputs/blip2_femur/final_model"), Path("publish/femur"))
    export_adapter(adapter, Path("serve/femur"), merge=True, dtype="bfloat16")

Without `merge`: the adapter folder as it is published (adapter_config.json,
adapter_model.safetensors, tokenizer and processor files, the model card README.md and
fada_batch.json with the prompt, questions and EOS), without the job's config.yaml (site paths).
Trained on a folder staged by `fada-batch stage-model`, the adapter names the hub id it was
staged from as its base (`base_model_name_or_path`, the card's `base_model`), so it loads on
any machine that can reach the hub.

With `merge`: peft's `merge_and_unload` folds the LoRA weights (and the modules trained in
full) into a bf16 or fp32 copy of the base model, saved with the processor so that plain
`Blip2ForConditionalGeneration.from_pretrained(OUT)` and `Blip2Processor.from_pretrained(OUT)`
load it; its generation config stops at the adapter's EOS and carries its answer length limit,
so `generate` answers as the adapter does. A merge into 8-bit or 4-bit weights is refused:
the LoRA update would be rounded into the quantisation grid (and a bitsandbytes model cannot be
saved and reloaded as a plain one); merge in bf16 or fp32 and quantise when loading instead.

The output appears whole (written aside, renamed into place). The export is recorded in the
category's folder (`exports.json`) for the collector's report.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fada_batch.evaluation.evaluate import AdapterInfo, check_base_model, read_adapter_info
from fada_batch.fsutil import atomic_dir, atomic_write_json, category_lock
from fada_batch.text import plural
from fada_batch.training.card import CARD_FILE, front_matter, hub_base_model, with_front_matter
from fada_batch.training.outputs import CONFIG_FILE, EXPORTS_FILE, FINAL_MARKER
from fada_batch.training.summary import SUMMARY_FILE, now_iso

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
QUANTIZED = ("8bit", "4bit", "int8", "int4", "nf4", "fp4", "8-bit", "4-bit")


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says what works."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    merged: bool
    dtype: str | None  # the merged model's dtype; None for an adapter folder
    base_model: str
    files: list[str]
    bytes: int


def check_dtype(dtype: str) -> str:
    """`bfloat16` or `float32` (also `bf16`, `fp32`).

    Raises:
        ExportError: a quantised or other dtype, with what works.
    """
    d = dtype.strip().lower()
    if d in DTYPES:
        return DTYPES[d]
    if d in QUANTIZED:
        raise ExportError(
            f"cannot merge the adapter into a {dtype} base: merging LoRA into 8-bit or 4-bit weights "
            "rounds the update into the quantisation grid, and a bitsandbytes model does not save as "
            "a plain one. Merge into the bf16 or fp32 base (--dtype bfloat16, the default, or "
            "--dtype float32), then quantise when loading the merged model, e.g. "
            "Blip2ForConditionalGeneration.from_pretrained(OUT, "
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True))."
        )
    raise ExportError(f"--dtype {dtype!r} is not one of bfloat16 (bf16), float32 (fp32)")


def check_unquantized_base(name_or_path: str) -> None:
    """Refuse a base model folder saved with quantised weights (its config has a quantization_config).

    Raises:
        ExportError: naming the folder and the way that works.
    """
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        quant = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return  # a hub id, or no readable config: from_pretrained says what is wrong
    if quant:
        kind = "4-bit" if quant.get("load_in_4bit") else "8-bit" if quant.get("load_in_8bit") else "quantised"
        raise ExportError(
            f"the base model {name_or_path} is saved with {kind} weights ({config}: quantization_config), "
            "and merging LoRA into quantised weights is refused (the update would be rounded away). "
            "Merge into the original bf16/fp32 model instead: --base-model <the unquantised folder or "
            "hub id, e.g. Salesforce/blip2-opt-2.7b>."
        )


def export_adapter(
    adapter: Path,
    out: Path,
    *,
    merge: bool = False,
    dtype: str = "bfloat16",
    base_model: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Export the adapter in `adapter` (a `final_model/` folder) to `out`.

    Args:
        merge: fold the adapter into a copy of the base model (else copy the adapter folder).
        dtype: the merged model's dtype, bfloat16 or float32.
        base_model: the base to merge into (default: the adapter's own); for an adapter folder,
            the name it gives as its base (default: the hub id of a staged folder, else its own).
        force: replace `out` when it exists.

    Raises:
        AdapterError: `adapter` is not a complete adapter folder.
        ExportError: `out` exists (without force) or lies in the adapter; a quantised merge.
        ModelLoadError: the base model cannot be loaded.
    """
    adapter, out = Path(adapter).expanduser().resolve(), Path(out).expanduser().resolve()
    info = read_adapter_info(adapter)
    if out == adapter or out.is_relative_to(adapter) or adapter.is_relative_to(out):
        raise ExportError(f"--to {out} overlaps the adapter folder {adapter}: choose another folder")
    if out.exists() and not force:
        raise ExportError(f"{out} exists: choose another --to, or pass --force to replace it")
    dtype = check_dtype(dtype) if merge else dtype
    category_dir = adapter.parent if (adapter.parent / SUMMARY_FILE).is_file() else None
    # not while a --force retraining replaces the adapter (nor beside an evaluation)
    with category_lock(category_dir, purpose="exported") if category_dir else nullcontext():
        if merge:
            result = _merge(info, out, dtype=dtype, base_model=base_model or info.base_model or "")
        else:
            result = _copy(info, out, base_model=base_model)
        if category_dir is not None:
            _record(category_dir, result)
    return result


def _copy(info: AdapterInfo, out: Path, *, base_model: str | None) -> ExportResult:
    """The adapter folder as published: everything but the job's config.yaml."""
    base = base_model or hub_base_model(info.base_model or "")
    with atomic_dir(out) as tmp:
        for src in sorted(info.path.iterdir()):
            if src.is_file() and src.name != CONFIG_FILE:
                shutil.copy2(src, tmp / src.name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        if base:  # the name the published adapter gives as its base (peft loads it from there)
            config["base_model_name_or_path"] = base
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        card = tmp / CARD_FILE
        if card.is_file() and base:
            text = card.read_text()
            meta = front_matter(text)
            tags = [t for t in meta.get("tags", []) if not str(t).startswith("base_model:")]
            meta.update(base_model=base, tags=[f"base_model:adapter:{base}", *tags])
            card.write_text(with_front_matter(text, meta))
    return _result(out, merged=False, dtype=None, base=base)


def _merge(info: AdapterInfo, out: Path, *, dtype: str, base_model: str) -> ExportResult:
    """The adapter merged into a `dtype` copy of `base_model`, saved as a plain transformers model."""
    from peft import PeftModel

    from fada_batch.training.model import load_base_model, load_processor

    check_unquantized_base(base_model)
    check_base_model(info, base_model, fix=f"pass --base-model {info.base_model} (or leave it out)")
    if info.quantization in ("8bit", "4bit"):
        log.warning(
            "%s was trained on a %s base; merging it into the %s base instead (answers may differ "
            "slightly from those of the quantised base)",
            info.path,
            info.quantization,
            dtype,
        )
    loaded = load_base_model(base_model, device="cpu", dtype=dtype, quantization="none")
    merged = PeftModel.from_pretrained(loaded.model, str(info.path)).merge_and_unload()
    merged.eval()
    gen = merged.generation_config
    if info.eos_token_id is not None:  # stop where the adapter's answers stop
        # BLIP-2's generate hands over to its language model, whose generation config comes
        # from the text config: both carry the EOS
        gen.eos_token_id = merged.config.text_config.eos_token_id = info.eos_token_id
    if info.max_new_tokens:
        gen.max_new_tokens = int(info.max_new_tokens)
    processor = load_processor(str(info.path))  # the adapter's processor: the one it trained with
    hub = hub_base_model(base_model)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        _merged_card(info, tmp, dtype=dtype, base=hub)
        marker = _marker(info)
        marker["export"] = {"merged": True, "dtype": dtype, "base_model": hub, "adapter": str(info.path)}
        atomic_write_json(tmp / FINAL_MARKER, marker)
    return _result(out, merged=True, dtype=dtype, base=hub)


def _marker(info: AdapterInfo) -> dict[str, Any]:
    path = info.path / FINAL_MARKER
    return json.loads(path.read_text()) if path.is_file() else {}


def _merged_card(info: AdapterInfo, folder: Path, *, dtype: str, base: str) -> None:
    """The adapter's card, as the card of a plain transformers model merged from it."""
    src = info.path / CARD_FILE
    text = src.read_text() if src.is_file() else "# BLIP-2 merged with a LoRA adapter\n"
    meta = front_matter(text)
    tags = [t for t in meta.get("tags", []) if not str(t).startswith("base_model:") and t != "peft"]
    meta.update(base_model=base, library_name="transformers", tags=[*tags, "merged-lora"])
    title, _, rest = text.split("\n---\n", 1)[-1].partition("\n")
    note = (
        f"\n\nThis folder is the adapter merged into a {dtype} copy of `{base}` (peft's "
        "`merge_and_unload`): load it with plain transformers, "
        "`Blip2ForConditionalGeneration.from_pretrained(folder)` and "
        "`Blip2Processor.from_pretrained(folder)`, no peft needed. It stops at the adapter's EOS; "
        "pass `max_new_tokens` to `generate` (the adapter's limit is in generation_config.json: "
        "BLIP-2's `generate` hands over to its language model, which does not read that file). "
        "The prompt and questions are those below."
    )
    (folder / CARD_FILE).write_text(with_front_matter(title + note + "\n" + rest, meta))


def _result(out: Path, *, merged: bool, dtype: str | None, base: str) -> ExportResult:
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    return ExportResult(out, merged, dtype, base, files, size)


def _record(category_dir: Path, result: ExportResult) -> None:
    """Add (or update) this export in the category's `exports.json`, for the collector."""
    path = category_dir / EXPORTS_FILE
    try:
        entries = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:
        entries = []
    entry = {**asdict(result), "path": str(result.path), "created": now_iso()}
    entry.pop("files")
    keep = [e for e in entries if isinstance(e, dict) and e.get("path") != entry["path"]]
    atomic_write_json(path, [*keep, entry])


def format_result(r: ExportResult) -> str:
    what = f"merged model ({r.dtype})" if r.merged else "adapter folder"
    lines = [
        f"{what} written to {r.path} ({plural(len(r.files), 'file')}, {r.bytes / 2**20:.1f} MiB); base {r.base_model}"
    ]
    if r.merged:
        lines.append(
            f"load it with: Blip2ForConditionalGeneration.from_pretrained({str(r.path)!r}) and "
            f"Blip2Processor.from_pretrained({str(r.path)!r}); generate with max_new_tokens from its "
            "generation_config.json"
        )
    return "\n".join(lines)
