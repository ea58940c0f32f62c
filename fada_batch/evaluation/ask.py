"""Ask a trained adapter about scans: one image or a folder, one question or the standard eight.

    asker = Asker(Path("outputs/blip2_femur/final_model"))     # base + adapter, loaded once
    for row in asker.ask([Path("scan.png")]):                  # the adapter's 8 questions
        print(row["question"], "->", row["answer"])

The base model is the one named in the adapter's `adapter_config.json` unless `base_model`
overrides it; an adapter is refused on another base model. It is loaded as training loaded it
(quantization and dtype recorded in the adapter's `fada_batch.json`). Prompts, questions, the
EOS and the answer length limit come from `fada_batch.json` too, so the answers are generated
exactly as in evaluation (`evaluate.generate`). A joint adapter (train.mode=joint) is asked
about one category at a time, `Asker(path, category="Femur")`: its prompts start with the
prefix it recorded for that category, as in training (`adapter_category`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from fada_batch.data.categories import STANDARD_QUESTIONS
from fada_batch.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_image_rgb
from fada_batch.data.samples import format_prompt
from fada_batch.evaluation.evaluate import (
    DEFAULT_SETTINGS,
    AdapterError,
    AdapterInfo,
    GenerationSettings,
    answer_both,
    check_base_model,
    load_adapter,
    load_like_training,
    make_encoder,
    read_adapter_info,
)
from fada_batch.text import plural

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Question: {question} Answer:"


class AskError(RuntimeError):
    """Images or questions that cannot be asked about; the message lists every problem."""


def image_files(path: Path) -> list[Path]:
    """`path` itself, or the images directly inside the folder `path` (sorted by name).

    Raises:
        AskError: the path does not exist, or the folder holds no images.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise AskError(f"image {path} does not exist: pass an image file or a folder of images")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise AskError(f"the folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class Asker:
    """A base model with a trained adapter, loaded once, answering questions about images.

    Args:
        adapter_dir: a category's `final_model/` folder.
        base_model: hub id or folder of the base model; default: the adapter's own.
        allow_base_mismatch: accept a `base_model` other than the adapter's (same weights
            staged under another name); a warning is logged.
        device: as in the config's `model:` section (auto: the GPU when there is one).
        dtype, quantization: for adapters that do not record how training loaded the base
            (auto: fp32 on the CPU, bf16 on a GPU where it fits, else 8-bit or 4-bit).
        settings: generation settings (greedy, batches of 16; max_new_tokens None: what the
            adapter's training answers need, as recorded with it).
        category: the scans' category, for a joint adapter (train.mode=joint): its prompts
            start with the category's name as in training (`adapter_category`).

    Raises:
        AdapterError: missing/incomplete adapter, or one trained on another base model.
        AskError: `category` missing for a joint adapter that needs it, or not one of its own.
        ModelLoadError: the base model cannot be loaded (offline and not cached, ...).
    """

    def __init__(
        self,
        adapter_dir: Path,
        *,
        base_model: str | None = None,
        allow_base_mismatch: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "auto",
        settings: GenerationSettings = DEFAULT_SETTINGS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        category: str | None = None,
    ) -> None:
        from fada_batch.training.model import eos_token_id

        self.info = read_adapter_info(Path(adapter_dir))
        self.category, self.prefix = adapter_category(self.info, category)
        base = base_model or self.info.base_model
        if not base:
            raise AdapterError(f"{self.info.path}/adapter_config.json names no base model: pass --base-model")
        check_base_model(
            self.info,
            base,
            allow_mismatch=allow_base_mismatch,
            fix=f"leave out --base-model (or pass --base-model {self.info.base_model}); if "
            f"{base} is the same model staged at another path, add --allow-base-mismatch",
        )
        settings.check()
        self.settings = settings.with_default(self.info.max_new_tokens)
        self.max_pixels = max_pixels
        self.loaded = load_like_training(
            self.info, base, device=device, dtype=dtype, quantization=quantization
        )
        load_adapter(self.loaded, self.info.path)
        self.eos = (
            self.info.eos_token_id
            if self.info.eos_token_id is not None
            else eos_token_id(self.loaded.model, self.loaded.processor)
        )
        self.encoder = make_encoder(self.loaded, self.eos)
        self.template = self.info.prompt_template or DEFAULT_PROMPT

    @property
    def questions(self) -> list[str]:
        """The questions asked by default: those the adapter was trained on, else the standard 8."""
        return list(self.info.questions or STANDARD_QUESTIONS)

    def resolve_question(self, text: str) -> str:
        """`Q1`..`Q8` stand for the adapter's questions; anything else is asked as written."""
        t = text.strip()
        qs = self.questions
        if t[:1] in "Qq" and t[1:].isdigit():
            n = int(t[1:])
            if not 1 <= n <= len(qs):
                raise AskError(f"question {t}: there are only Q1..Q{len(qs)}")
            return qs[n - 1]
        if not t:
            raise AskError("an empty question cannot be asked")
        return t

    def ask(
        self, images: list[Path], questions: list[str] | None = None, *, with_base: bool = False
    ) -> list[dict[str, Any]]:
        """Answer every question about every image.

        Args:
            images: image files (see `image_files` for folders).
            questions: texts or `Q1`..`Q8`; default `self.questions`.
            with_base: also answer with the base model alone (adapter switched off).

        Returns:
            one dict per (image, question), image-major: {"image", "question", "question_id"
            ("Q2" for one of the adapter's questions, else None), "answer", "cut_off" (True:
            the answer reached max_new_tokens without EOS)} and "base_answer" when `with_base`.

        Raises:
            AskError: unreadable images (all listed) or bad questions.
        """
        texts = [self.resolve_question(q) for q in (questions or self.questions)]
        paths = [Path(p) for p in images]
        problems = []
        for p in paths:
            try:
                load_image_rgb(p, max_pixels=self.max_pixels)
            except ImageError as e:
                problems.append(f"  - {e}")
            except OSError as e:
                problems.append(f"  - {p}: {e.strerror or e}")
        if problems:
            raise AskError(f"{plural(len(problems), 'image')} cannot be read:\n" + "\n".join(problems))
        keys = {str(p): p for p in paths}
        items = [(str(p), format_prompt(self.template, q, self.prefix)) for p in paths for q in texts]
        adapter, base = answer_both(
            self.loaded,
            self.encoder,
            items,
            keys,
            eos_token_id=self.eos,
            settings=self.settings,
            max_pixels=self.max_pixels,
            with_base=with_base,
        )
        known = {q: f"Q{i + 1}" for i, q in enumerate(self.questions)}
        out = []
        for k, (image, _prompt) in enumerate(items):
            q = texts[k % len(texts)]
            row: dict[str, Any] = {
                "image": image,
                "question": q,
                "question_id": known.get(q),
                "answer": adapter[k].text,
                "cut_off": not adapter[k].ended,
            }
            if self.category is not None:
                row["category"] = self.category
            if base is not None:
                row["base_answer"] = base[k].text
            out.append(row)
        return out


def adapter_category(info: AdapterInfo, name: str | None) -> tuple[str | None, str | None]:
    """The category `ask` asks about and the prefix its prompts start with (None: none).

    A joint adapter trained with the category in its prompts (train.mode=joint,
    category_in_prompt) needs `name`, one of its own categories (by name, display name or an
    alias); one trained without accepts it and asks as it was trained. A category's own adapter
    takes no other category than its own.

    Raises:
        AskError: naming --category and the adapter's categories.
    """
    if not info.joint:
        mine = info.category
        if name is not None and mine and _match([mine], {}, name) is None:
            raise AskError(
                f"--category {name}: the adapter in {info.path} is {mine}'s own, trained on that "
                f"category alone; leave --category out (it is for joint adapters) or pass {mine}."
            )
        return (mine if name is not None else None), None
    names = list(info.categories or [])
    prefixes = info.prompt_prefixes or {}
    choices = ", ".join(names)
    if name is None:
        if any(prefixes.get(n) is not None for n in names):
            raise AskError(
                f"the adapter in {info.path} is a joint adapter whose prompts start with the "
                f"scan's category, as it was trained: name it with --category (one of: {choices})."
            )
        return None, None
    found = _match(names, prefixes, name)
    if found is None:
        raise AskError(
            f"--category {name!r} is not one the joint adapter in {info.path} was trained on: "
            f"pass one of: {choices}."
        )
    return found, prefixes.get(found)


def _match(names: list[str], prefixes: dict[str, str | None], given: str) -> str | None:
    """The name among `names` that `given` names: itself, its prompt prefix (display name) or
    a built-in alias of it (`Abodomen`), compared as category names are (case, spaces, dashes
    and underscores aside); None when none does."""
    from fada_batch.data.categories import UnknownCategoryError, category_key, get_category

    keys = {category_key(given)}
    with contextlib.suppress(UnknownCategoryError):
        keys.add(category_key(get_category(given).name))
    return next((n for n in names if keys & {category_key(n), category_key(prefixes.get(n) or n)}), None)


def format_answers(rows: list[dict[str, Any]]) -> str:
    """Answers grouped by image, one `Qn question: answer` line each."""
    lines: list[str] = []
    image = None
    for r in rows:
        if r["image"] != image:
            image = r["image"]
            lines.append(("\n" if lines else "") + image)
        label = f"{r['question_id']} " if r.get("question_id") else ""
        cut = "  [cut off: no EOS within max_new_tokens]" if r.get("cut_off") else ""
        lines.append(f"  {label}{r['question']}\n    -> {r['answer']}{cut}")
        if "base_answer" in r:
            lines.append(f"    base model alone: {r['base_answer']}")
    return "\n".join(lines)
