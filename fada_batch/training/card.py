"""The model card, `README.md` in `final_model/`: what an adapter is, what it was trained on, and its limits.

    text = render_card(facts)                            # written with the adapter (recipe)
    text = replace_section(text, EVAL_SECTION, body)     # evaluation puts its scores in later

The card is in the form the Hugging Face hub and peft read: YAML front matter (`base_model`,
`library_name: peft`, tags) and Markdown. It is written inside the `final_model/` swap, so it
is always the card of the adapter beside it; the held-out scores, which evaluation measures
after the adapter is saved, go into their own marked section (`replace_section`), rewritten
atomically each time evaluation runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fada_batch.data.samples import format_prompt
from fada_batch.text import plural

CARD_FILE = "README.md"
EVAL_SECTION = "evaluation"
STAGED_MARKER = "fada_staged.json"  # what `fada-batch stage-model` writes into a staged model folder

TAGS = ["lora", "peft", "blip-2", "visual-question-answering", "medical", "ultrasound", "fetal-ultrasound"]

LIMITS = """\
- A research model, not a medical device: it has not been validated clinically, and its answers
  must not be used for diagnosis, screening or any decision about a patient.
- It answers only the 8 questions it was trained on, for scans of its own category; another
  view, another question, another machine or another clinic's protocol may give confident
  wrong answers. Answers are short free text generated greedily, not calibrated probabilities.
- The held-out scores above come from a few images of the same data set (same sites, same
  annotators); they say little about other populations. Small splits make them noisy.
- The labels are one annotation per image; where annotators would disagree the model learned
  one of the readings. Measurements and gestational ages in answers are read from the labels'
  wording, not measured on the image.
- BLIP-2's base model was pretrained on web images and text and carries its biases."""


def hub_base_model(name_or_path: str) -> str:
    """The hub id of the base model: `name_or_path` itself, or, for a folder staged by
    `fada-batch stage-model`, the hub id it was staged from (else the folder's path)."""
    marker = Path(name_or_path).expanduser() / STAGED_MARKER
    try:
        source = json.loads(marker.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return name_or_path
    return source if isinstance(source, str) and source and not Path(source).exists() else name_or_path


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (empty when it has none)."""
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---\n", 1)[0]
    return yaml.safe_load(head) or {}


def with_front_matter(text: str, meta: dict[str, Any]) -> str:
    """`text` with its front matter replaced by `meta`."""
    body = text[4:].split("\n---\n", 1)[1] if text.startswith("---\n") else text
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body


def replace_section(text: str, name: str, body: str) -> str:
    """Replace the marked section `name` (`<!-- fada-batch:name -->` ... `<!-- /fada-batch:name -->`)
    with `body`; append it when the card has no such section (a card edited by hand)."""
    start, end = f"<!-- fada-batch:{name} -->", f"<!-- /fada-batch:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return [*lines, *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows), ""]


def _prefix_lines(prefixes: dict[str, str]) -> list[str]:
    """A joint adapter's prompts start with the scan's category: which text for which one."""
    if not prefixes:
        return []
    listed = ", ".join(f"{n}: `{p}. `" for n, p in prefixes.items())
    return [
        "This joint adapter was trained on several categories, each prompt starting with the "
        f"scan's category ({listed}); ask it the same way, as in the example above.",
        "",
    ]


def _usage(f: dict[str, Any]) -> list[str]:
    q1 = f["questions"][0] if f["questions"] else "..."
    prefixes = {n: p for n, p in (f.get("prompt_prefixes") or {}).items() if p}
    prompt = format_prompt(f["prompt_template"], q1, next(iter(prefixes.values()), None))
    return [
        "## How to use",
        "",
        "```python",
        "from peft import PeftModel",
        "from PIL import Image",
        "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
        "",
        f'base = Blip2ForConditionalGeneration.from_pretrained("{f["base_model"]}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder").eval()',
        'processor = Blip2Processor.from_pretrained("path/to/this/folder")',
        f'inputs = processor(images=Image.open("scan.png").convert("RGB"), text={prompt!r}, return_tensors="pt")',
        f"out = model.generate(**inputs, max_new_tokens={f['max_new_tokens']}, eos_token_id={f['eos_token_id']}, do_sample=False)",
        "print(processor.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())",
        "```",
        "",
        f"The prompt is `{f['prompt_template']}` with one of the questions below; the answer ends at "
        f"token {f['eos_token_id']} (the EOS it was trained with). With fada-batch: "
        "`fada-batch ask --adapter <this folder> --image scan.png"
        + (" --category <category>`" if prefixes else "`")
        + ". `fada-batch export --adapter <this folder> --to OUT --merge` merges it into a plain "
        "transformers model.",
        "",
        *_prefix_lines(prefixes),
        "Questions (Q1..Q8):",
        "",
        *(f"{i}. {q}" for i, q in enumerate(f["questions"], 1)),
        "",
    ]


def _data(f: dict[str, Any]) -> list[str]:
    images, pairs = f["images"], f["qa_pairs"]
    out = ["## Training data", ""]
    out += _table(
        ["split", "images", "question/answer pairs"],
        [[s, images.get(s, 0), pairs.get(s, 0)] for s in ("train", "val", "test")],
    )
    split = f.get("split_source") or (
        f"by image (never by question), seed {f['split_seed']}, fractions "
        f"{'/'.join(str(x) for x in f['split_fractions'])}"
    )
    norm = f.get("normalization") or {}
    before, after = norm.get("unique_answers_before"), norm.get("unique_answers_after")
    changed = sum((norm.get("cells_changed") or {}).values())
    norm_line = f"`data.normalize: {f['normalize']}`"
    if isinstance(before, list) and isinstance(after, list):
        norm_line += (
            f": unique answers over the 8 questions {sum(before)} as written, {sum(after)} after it "
            f"({changed} cells changed)"
        )
    first = f" (the first {f['num_images']} usable images)" if f.get("num_images") else ""
    out += [
        f"- Provenance: FADA fetal ultrasound scans of the category {f['category']}{_also(f)}, "
        f"`Fetal Ultrasound/{f['folder']}/`, labelled in "
        f"`{f['labels']}`{first}.",
        f"- Split: {split}; the test images were never seen in training or model selection.",
        f"- Answer normalisation: {norm_line}.",
        f"- Skipped: {f['empty_answers']} empty answers; rows skipped with a warning: "
        + (", ".join(f"{k} {v}" for k, v in f["warnings"].items()) or "none")
        + ".",
        "",
    ]
    return out


def _training(f: dict[str, Any]) -> list[str]:
    lora, t, s = f["lora"], f["train"], f["shipped"]
    return [
        "## Training",
        "",
        f"- Base model `{f['base_model']}`, loaded in {f['dtype']}"
        + (f" with {f['quantization']} weights" if f["quantization"] != "none" else "")
        + "; vision tower, Q-Former and projection frozen.",
        f"- LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on "
        f"{', '.join(lora['target_modules'])} of the language model"
        + (f"; trained in full: {', '.join(lora['modules_to_save'])}" if lora["modules_to_save"] else "")
        + ".",
        f"- {t['epochs']} epochs planned, {t['steps']} optimizer steps of {t['effective_batch_size']} "
        f"question/answer pairs; AdamW lr {t['learning_rate']} ({t['lr_schedule']}, warm-up "
        f"{plural(t['warmup_steps'], 'step')}), weight decay {t['weight_decay']}, gradient clipping "
        f"{t['max_grad_norm']}; seed {t['seed']}; labels only on the answer and EOS.",
        f"- Shipped: the adapter of step {s['step']} ({s['kind']}): {s['reason']}; training "
        f"ended after {s.get('training_ended', 'the planned steps')}.",
        f"- Trained with fada-batch {f['fada_batch_version']} on {f['created']}; training "
        f"fingerprint {f['fingerprint_hash']} (in `fada_batch.json`).",
        "",
    ]


def render_card(facts: dict[str, Any]) -> str:
    """The card of an adapter from `facts` (built by the recipe: category, data counts and
    provenance, normalisation, LoRA and training settings, the shipped step, usage)."""
    f = facts
    meta = {
        "base_model": f["base_model"],
        "library_name": "peft",
        "pipeline_tag": "image-text-to-text",
        "tags": [f"base_model:adapter:{f['base_model']}", *TAGS, f"category:{f['category']}", "fada-batch"],
    }
    body = [
        f"# BLIP-2 LoRA adapter: {f['category_display']} fetal ultrasound VQA",
        "",
        f"A LoRA adapter for [{f['base_model']}]({_hub_link(f['base_model'])}) that answers the FADA "
        f"team's 8 clinical questions about one fetal ultrasound scan of the category "
        f"**{f['category']}**{_also(f)}.",
        "",
        *_usage(f),
        *_data(f),
        *_training(f),
        "## Evaluation on held-out images",
        "",
        f"<!-- fada-batch:{EVAL_SECTION} -->",
        "Not evaluated yet: `fada-batch evaluate --job <job> --category " + f["category"] + "` writes "
        "the scores here.",
        f"<!-- /fada-batch:{EVAL_SECTION} -->",
        "",
        "## Intended use",
        "",
        "Research on visual question answering for fetal ultrasound: comparing fine-tuning "
        "recipes, categories and label sets, and studying what such a model gets right and wrong.",
        "",
        "## Limitations",
        "",
        LIMITS,
        "",
    ]
    return with_front_matter("\n".join(body), meta)


def _also(f: dict[str, Any]) -> str:
    """` (Transcerebellar Plane)`: the display name, when it is not the category's name."""
    return f" ({f['category_display']})" if f["category_display"] != f["category"] else ""


def _hub_link(name: str) -> str:
    return name if Path(name).expanduser().exists() else f"https://huggingface.co/{name}"
