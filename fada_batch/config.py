"""The job config: one typed tree of dataclasses, loaded from YAML plus `-p key=value` overrides.

    cfg = load_job("job/validation.yaml", overrides=["num_epochs=3", "model.quantization=none"])

Every problem (unknown keys, wrong types, bad values) is collected and reported together. An
unknown key gets the closest valid keys ("did you mean 'train.num_epochs'?"); when none is
close, the valid keys are listed. The seed's papermill parameter names work as short aliases
(`num_images`, `num_epochs`, `batch_size`, `learning_rate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from fada_batch.data.categories import (
    CATEGORY_NAMES,
    Category,
    CategoryTable,
    UnknownCategoryError,
    build_table,
)
from fada_batch.text import plural


@dataclass
class CategoryEntry:
    """One category of the job's own (`data.category_table`): a new one, or a default one
    re-described. Every field is optional."""

    folder: str | None = None  # image folder under `Fetal Ultrasound/`; default: the name
    sheet: str | None = None  # sheet stem, `{sheet}_image_list.xlsx`; default: the name
    aliases: list[str] = field(default_factory=list)  # other names: folders, sheets, `Folder Name` values
    display: str | None = None  # the name reports and logs show ("Renal View"); default: the name


@dataclass
class DataConfig:
    """Where the scans and label sheets are, and how they become training samples."""

    root: str = "data"  # holds `Fetal Ultrasound/` and `Fetal Ultrasound Labeled/`
    categories: list[str] = field(default_factory=lambda: list(CATEGORY_NAMES))  # to train
    num_images: int | None = None  # first N usable images of a sheet; None = all (5 = validation)
    train_fraction: float = 0.8  # split is by image, never by question
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 42  # fixed so evaluation later sees the same held-out images
    # an existing split (image -> train/val/test, JSON; relative to data.root or absolute) used
    # instead of ours, e.g. the FADA team's dataset_splits.json (fada_batch.data.given_split)
    split_file: str | None = None
    clean_answers: bool = True  # collapse whitespace, drop a trailing period (false = normalize none)
    # answer normalisation, each level including the ones before: none, clean (the clean-up
    # above), spelling (whole-word fixes), canonical (per-question forms); the tables are
    # data files in fada_batch/data/normalize/
    normalize: Literal["none", "clean", "spelling", "canonical"] = "clean"
    # per_category: `Fetal Ultrasound Labeled/<Category>_image_list.xlsx`; workbook: one master
    # workbook with a `Folder Name` column (`data.workbook`); auto: the workbook when it exists
    # and no per-category sheet does (fada_batch.data.workbook)
    labels: Literal["auto", "per_category", "workbook"] = "auto"
    # more names per category for folders, sheets and workbook `Folder Name` values, on top of
    # the built-in aliases: {Abdomen: [Abdo, ABD]}
    category_aliases: dict[str, list[str]] = field(default_factory=dict)
    # categories of the job's own, or the defaults re-described: name -> folder, sheet,
    # aliases, display (each optional), e.g. {Kidney: {display: Renal View, aliases: [Renal]}};
    # list a new one in data.categories to train it (fada_batch.data.categories.build_table)
    category_table: dict[str, CategoryEntry] = field(default_factory=dict)
    workbook: str = "Fetal Ultrasound Annotations Final.xlsx"  # relative to data.root, or absolute
    prompt_template: str = "Question: {question} Answer:"  # BLIP-2's VQA prompt
    max_image_pixels: int = 40_000_000  # larger images are refused (decompression-bomb guard)

    def table(self) -> CategoryTable:
        """The job's categories: the defaults with `category_table` and `category_aliases`
        (problems in them are refused when the config is built)."""
        entries = {
            k: asdict(v) if dataclasses.is_dataclass(v) else dict(v) for k, v in self.category_table.items()
        }
        return build_table(entries, self.category_aliases)[0]

    def category(self, name: str) -> Category:
        """The job's category for a name or alias.

        Raises:
            UnknownCategoryError: naming the job's categories.
        """
        return self.table().get(name.strip())


@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

    name_or_path: str = "Salesforce/blip2-opt-2.7b"  # hub id or a local folder
    # auto: bf16/fp32 (none) when the model fits the GPU with room, else 8bit, else 4bit
    # (fada_batch.training.model.pick_quantization); none/8bit/4bit force one.
    quantization: Literal["auto", "none", "8bit", "4bit"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # auto: bf16 on GPUs that have it, else fp32
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gradient_checkpointing: bool = False  # trade compute for memory in the language model


@dataclass
class LoraSection:
    """LoRA on the language model (the seed's recipe by default)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Extra modules trained in full and saved with the adapter (e.g. the tiny model's
    # `language_model.model.decoder.final_layer_norm`); empty for the seed's recipe.
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    num_epochs: int = 1
    batch_size: int = 1  # micro-batch (QA pairs per forward pass)
    grad_accum_steps: int = 1  # optimizer step every N micro-batches
    group_by_length: bool = True  # batch rows of similar length (less padding)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # linear warm-up, as a fraction of all optimizer steps
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42  # data order and LoRA init
    feature_cache: bool = True  # compute frozen vision+Q-Former features once per image
    checkpoint_every_steps: int = 100  # optimizer steps between checkpoints (0 = epoch ends only)
    keep_checkpoints: int = 2  # keep the last K complete checkpoints
    log_every_s: float = 30.0  # progress line interval when not on a terminal
    # TensorBoard event files in {category folder}/tensorboard/ as training goes (loss, learning
    # rate, samples/s, validation loss, evaluation scores): `tensorboard --logdir {output.root}`
    tensorboard: bool = True
    max_steps: int | None = None  # stop after N optimizer steps (smoke runs); None = all epochs
    eval_every_steps: int = 0  # validation loss also every N optimizer steps (0 = epoch ends only)
    # best: the adapter of the step with the lowest validation loss ships as final_model/ (as
    # the seed's load_best_model_at_end=True); last: the last step's.
    final_model: Literal["best", "last"] = "best"
    early_stopping_patience: int | None = None  # stop after N validations without improvement
    early_stopping_min_delta: float = 0.0  # a validation loss must beat the best by more than this
    # per_category: one adapter per category (blip2_<category>/); joint: ONE adapter trained on
    # all of data.categories together (blip2_joint/), each category split by image as usual
    mode: Literal["per_category", "joint"] = "per_category"
    # joint mode: start each prompt with the category's name ("Abdomen. Question: ..."), so the
    # adapter knows the view; false: the same prompt as a per-category adapter's
    category_in_prompt: bool = True


@dataclass
class EvalConfig:
    """Evaluation on held-out images (`fada-batch evaluate`, or at the end of training)."""

    after_training: bool = False  # evaluate right after training; the summary carries the metrics
    split: Literal["test", "val"] = "test"  # held-out part of split.json to answer
    batch_size: int = 16  # prompts per generate() call (left-padded)
    # answer length limit; null: what the training answers need (the longest in tokens plus a
    # margin, recorded with the adapter in final_model/fada_batch.json)
    max_new_tokens: int | None = None
    num_beams: int = 1  # 1 = greedy decoding (the default); > 1 = beam search
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size appears twice in an answer
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens (CTRL, Keskar et al. 2019)


@dataclass
class OutputConfig:
    """Where results land: `{root}/blip2_{category}/`."""

    root: str = "outputs"


@dataclass
class ClusterConfig:
    """SLURM settings for `fada-batch submit` (site-specific values live only here)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int = 1  # GPUs of a one-process task (0: CPU); see gpus_per_node for more
    # data parallel (docs/data-parallel.md): `nodes` x processes per node train one adapter;
    # one process per GPU. gpus_per_node: GPUs (= processes) per node; null: one process
    # with gpus_per_task GPUs, as before the key existed
    nodes: int = 1
    gpus_per_node: int | None = None
    # processes per node; null: gpus_per_node (or 1). Without GPUs (gpus_per_task=0 or
    # gpus_per_node=0) the processes train on CPU (gloo): a test of the set-up, not a speed-up
    tasks_per_node: int | None = None
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, else gloo
    dist_timeout_s: int = 1800  # a rank waiting longer than this for the others fails
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 240  # per array task
    constraint: str | None = None
    extra_sbatch: dict[str, str | int | bool] = field(
        default_factory=dict
    )  # other sbatch flags (true = bare flag)
    array_parallelism: int = 16  # max array tasks running at once
    python: str | None = None  # e.g. "apptainer exec --nv --bind /shared fada-batch.sif python"
    max_requeues: int = 3  # time-outs/preemptions before a task gives up
    signal_delay_s: int = 120  # warning signal this long before the time limit
    log_dir: str | None = None  # default: {output.root}/logs (shared storage)
    collector_time_min: int = 30


@dataclass
class JobConfig:
    """A whole job: one YAML file in `job/`."""

    name: str = "job"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config_hash(self) -> str:
        """A short, stable hash of the resolved config (for summaries and checkpoints)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# The seed's papermill parameter names.
ALIASES: dict[str, str] = {
    "num_images": "data.num_images",
    "num_epochs": "train.num_epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
}


class ConfigError(ValueError):
    """A job config with one or more problems; the message lists them all."""


def valid_keys(cls: type = JobConfig, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass, e.g. `train.learning_rate`."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value: Any, t: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `t`; return it (ints widened to floats)."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            out = _coerce(value, a, key, sub)
            if not sub:
                return out
            sub.clear()
        problems.append(f"{key}: expected {_type_name(t)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        return {str(k): _coerce(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(t):
        return _coerce_entry(value, t, key, problems)
    if t is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if t is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {t!r} for {key}")


def _coerce_entry(value: Any, t: type, key: str, problems: list[str]) -> Any:
    """A mapping inside a mapping (a `data.category_table` entry) to its dataclass; unknown
    keys are refused with the valid ones."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping, got {value!r}")
        return t()
    hints = typing.get_type_hints(t)
    valid = [f.name for f in fields(t)]
    kwargs = {}
    for k, v in value.items():
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key '{key}.{k}'{hint}; valid keys there: {', '.join(valid)}")
            continue
        kwargs[k] = _coerce(v, hints[k], f"{key}.{k}", problems)
    return t(**kwargs)


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[str], unmatched: list[str]) -> Any:
    """`cls` from `raw`; problems are appended, unknown keys with no close match to `unmatched`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            # a misspelt section: name each key in it (`trian.num_epochs`), not just the section
            inner = _flatten(value, f"{dotted}.") if isinstance(value, dict) and value else {dotted: value}
            for unknown in inner:
                close = suggest_keys(unknown, section=unknown == dotted and isinstance(value, dict))
                hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
                problems.append(f"unknown key {unknown!r}{hint}")
                if not close:
                    unmatched.append(unknown)
            continue
        t = hints[key]
        if dataclasses.is_dataclass(t):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(t, value, f"{dotted}.", problems, unmatched)
        else:
            kwargs[key] = _coerce(value, t, dotted, problems)
    return cls(**kwargs)


# Names other tools use (peft, HF TrainingArguments, sbatch) for one of our keys: suggested
# for an unknown key, never accepted in its place.
KNOWN_ELSEWHERE: dict[str, str] = {
    "lr": "train.learning_rate",
    "epochs": "train.num_epochs",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "warmup_steps": "train.warmup_ratio",
    "gpus": "cluster.gpus_per_task",
    "mem": "cluster.mem_gb",
    "time": "cluster.time_min",
}


def suggest_keys(dotted: str, *, section: bool = False, limit: int = 3) -> list[str]:
    """The valid keys closest to an unknown dotted key, best first (empty when none is close).

    Looks at the whole dotted key (`trian.num_epochs` -> `train.num_epochs`), at its last part
    in every section (`num_epoch`, `model.max_steps` -> `train.max_steps`), at names other tools
    use (`lr`), and, for a mapping (`section`), at the section names (`modle` -> `model`).
    Keys in the unknown key's own section come first.
    """
    keys = valid_keys()
    leaf = dotted.rsplit(".", 1)[-1]
    own = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    found: list[str] = []
    if section:
        sections = [f.name for f in fields(JobConfig) if f.name != "name"]
        found += difflib.get_close_matches(leaf, sections, n=1, cutoff=0.6)
    if leaf in KNOWN_ELSEWHERE:
        found.append(KNOWN_ELSEWHERE[leaf])
    found += difflib.get_close_matches(dotted, keys, n=limit, cutoff=0.8)
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    for near in difflib.get_close_matches(leaf, list(leaves), n=limit, cutoff=0.7):
        found += leaves[near]
    if len(leaf) >= 3:  # a whole word of a key: `gpus` -> `gpus_per_task`, `seed` -> `split_seed`
        found += [k for name, ks in leaves.items() if leaf in name.split("_") for k in ks]
    unique = list(dict.fromkeys(k for k in found if k != dotted))
    if own and any(k.startswith(own) for k in unique):  # a near miss in its own section wins
        unique = [k for k in unique if k.startswith(own)]
    return unique[:limit]


def format_valid_keys(sections: set[str] | None = None, width: int = 100) -> str:
    """The valid keys, one line per section (only `sections` when given; else all, and the
    short aliases)."""
    import textwrap

    by_section: dict[str, list[str]] = {}
    for k in valid_keys():
        head, _, tail = k.rpartition(".")
        by_section.setdefault(head, []).append(tail)
    lines = []
    for head, names in by_section.items():
        if sections is not None and head not in sections:
            continue
        label = f"{head}: " if head else ""
        lines += textwrap.wrap(
            label + ", ".join(names), width=width, initial_indent="    ", subsequent_indent="        "
        )
    if sections is None:
        aliases = "Short aliases: " + ", ".join(f"{a} -> {k}" for a, k in ALIASES.items())
        lines += textwrap.wrap(aliases, width=width, subsequent_indent="    ")
    return "\n".join(lines)


def parallel_layout(c: ClusterConfig) -> tuple[int, int, int]:
    """(nodes, processes per node, GPUs per node) of one training task's SLURM job."""
    tasks = c.tasks_per_node or c.gpus_per_node or 1
    gpus = c.gpus_per_node if c.gpus_per_node is not None else c.gpus_per_task * tasks
    return c.nodes, tasks, gpus


def _check_cluster_layout(c: ClusterConfig, problems: list[str]) -> None:
    """Data parallel: one process per GPU, whole numbers where they must be."""
    for key, value, low in (
        ("cluster.nodes", c.nodes, 1),
        ("cluster.tasks_per_node", c.tasks_per_node, 1),
        ("cluster.gpus_per_node", c.gpus_per_node, 0),
        ("cluster.gpus_per_task", c.gpus_per_task, 0),
        ("cluster.dist_timeout_s", c.dist_timeout_s, 1),
    ):
        if isinstance(value, int) and value < low:
            problems.append(f"{key} must be >= {low}, got {value}")
    if not all(
        isinstance(v, int) or v is None for v in (c.nodes, c.tasks_per_node, c.gpus_per_node, c.gpus_per_task)
    ):
        return  # the type check said so already
    g, t = c.gpus_per_node, c.tasks_per_node
    if g and t is not None and t != g:
        problems.append(
            f"cluster.tasks_per_node={t} but cluster.gpus_per_node={g}: data parallel runs one "
            f"process per GPU; set cluster.tasks_per_node={g} or leave it null"
        )
    if g is not None and c.gpus_per_task > 1:
        problems.append(
            f"cluster.gpus_per_task={c.gpus_per_task} with cluster.gpus_per_node={g}: each "
            "data-parallel process uses one GPU; drop cluster.gpus_per_task (or set it to 1)"
        )
    nodes, tasks, gpus = parallel_layout(c) if c.nodes >= 1 else (1, 1, 0)
    if nodes * tasks > 1 and g is None and c.gpus_per_task > 1:
        problems.append(
            f"cluster.gpus_per_task={c.gpus_per_task} with {nodes * tasks} processes: each "
            "data-parallel process uses one GPU; use cluster.gpus_per_node (one process each)"
        )
    if c.dist_backend == "nccl" and gpus == 0:
        problems.append(
            "cluster.dist_backend=nccl needs GPUs, but the job asks for none (cluster.gpus_per_node"
            " / gpus_per_task = 0): use gloo (or auto) for CPU processes"
        )


def _check_rules(cfg: JobConfig, problems: list[str]) -> None:
    """Cross-field rules, checked once the tree is built."""
    d, t, lo = cfg.data, cfg.train, cfg.lora
    fr = (d.train_fraction, d.val_fraction, d.test_fraction)
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        problems.append(
            "data.train_fraction + data.val_fraction + data.test_fraction must be >= 0 each "
            f"and sum to 1 (got {fr[0]} + {fr[1]} + {fr[2]} = {sum(fr):g})"
        )
    if d.train_fraction <= 0:
        problems.append("data.train_fraction must be > 0")
    if d.num_images is not None and d.num_images < 1:
        problems.append(f"data.num_images must be >= 1 or null (all), got {d.num_images}")
    c = cfg.cluster
    # SLURM may send the warning up to ~30 s earlier than asked: a warning in the first half
    # of the run would reach a task still starting (before its handler: killed)
    timed = isinstance(c.time_min, int) and isinstance(c.signal_delay_s, int) and c.time_min > 0
    if timed and not 0 < c.signal_delay_s < c.time_min * 30:
        problems.append(
            f"cluster.signal_delay_s must be > 0 and under half of cluster.time_min "
            f"({c.time_min} min = {c.time_min * 60} s), got {c.signal_delay_s}: the task needs "
            "the warning late enough to have started and early enough to save a checkpoint"
        )
    _check_cluster_layout(c, problems)
    if "{question}" not in d.prompt_template:
        problems.append("data.prompt_template must contain '{question}'")
    if t.mode == "joint" and not d.categories:
        problems.append("train.mode=joint needs at least one category in data.categories")
    if t.mode == "joint" and any(re.sub(r"[\s_\-]+", "", c).lower() == "joint" for c in d.categories):
        problems.append(
            "train.mode=joint: a category named 'joint' would share the joint adapter's folder "
            "(blip2_joint/): rename it in data.category_table"
        )
    _check_categories(d, problems)
    for key, value, low in (
        ("train.num_epochs", t.num_epochs, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum_steps", t.grad_accum_steps, 1),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("lora.r", lo.r, 1),
        ("lora.alpha", lo.alpha, 1),
    ):
        if isinstance(value, int) and value < low:
            problems.append(f"{key} must be >= {low}, got {value}")
    if isinstance(t.learning_rate, float) and not t.learning_rate > 0:
        problems.append(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if isinstance(lo.dropout, float) and not 0 <= lo.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules:
        problems.append("lora.target_modules must name at least one module")
    problems.extend(image_side_modules(lo.target_modules, "lora.target_modules"))
    problems.extend(image_side_modules(lo.modules_to_save, "lora.modules_to_save"))
    _check_validation_rules(cfg, problems)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._\-]*$")


def _check_categories(d: DataConfig, problems: list[str]) -> None:
    """data.categories against the job's table; data.category_table and
    data.category_aliases: known names, safe new names, no name given to two categories."""
    entries = {k: asdict(v) if dataclasses.is_dataclass(v) else {} for k, v in d.category_table.items()}
    bad = [k for k in entries if not _SAFE_NAME.match(k)]
    for name in bad:
        problems.append(
            f"data.category_table: {name!r} cannot name a category (it names its output folder): "
            "use letters, digits, spaces, '.', '_' and '-'"
        )
    table, found = build_table({k: v for k, v in entries.items() if k not in bad}, d.category_aliases)
    problems.extend(found)
    for name in d.categories:
        try:
            table.get(name.strip())
        except UnknownCategoryError as e:
            problems.append(f"data.categories: {e}")


def _check_validation_rules(cfg: JobConfig, problems: list[str]) -> None:
    """Validation-loss schedule, best-model choice and early stopping."""
    t, d = cfg.train, cfg.data
    if t.eval_every_steps < 0:
        problems.append(
            f"train.eval_every_steps must be >= 0 (0 = epoch ends only), got {t.eval_every_steps}"
        )
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        problems.append(
            f"train.early_stopping_patience must be >= 1 or null (off), got {t.early_stopping_patience}"
        )
    if t.early_stopping_min_delta < 0:
        problems.append(f"train.early_stopping_min_delta must be >= 0, got {t.early_stopping_min_delta}")
    needs_val = [
        f"{k}={v}"
        for k, v, on in (
            ("train.final_model", "best", t.final_model == "best"),
            ("train.early_stopping_patience", t.early_stopping_patience, t.early_stopping_patience),
        )
        if on
    ]
    if needs_val and d.val_fraction <= 0:
        problems.append(
            f"{' and '.join(needs_val)} need a validation loss, but data.val_fraction is 0: set "
            "data.val_fraction > 0 (e.g. 0.1), or train.final_model=last without early stopping"
        )
    if isinstance(cfg.eval.max_new_tokens, int) and cfg.eval.max_new_tokens < 1:
        problems.append(
            f"eval.max_new_tokens must be >= 1 or null (from the training answers), got {cfg.eval.max_new_tokens}"
        )
    for key, value, low in (
        ("num_beams", cfg.eval.num_beams, 1),
        ("no_repeat_ngram_size", cfg.eval.no_repeat_ngram_size, 0),
    ):
        if isinstance(value, int) and value < low:
            problems.append(f"eval.{key} must be >= {low}, got {value}")
    if isinstance(cfg.eval.repetition_penalty, (int, float)) and cfg.eval.repetition_penalty <= 0:
        problems.append(
            f"eval.repetition_penalty must be > 0 (1.0 = none), got {cfg.eval.repetition_penalty}"
        )


# Modules of BLIP-2's image side (vision tower, Q-Former, language_projection). They run frozen,
# under no_grad, and their output is computed once per image (the feature cache), so LoRA or
# modules_to_save placed there would never get a gradient. Names that only exist there:
_IMAGE_SIDE_PREFIXES = ("vision_model", "qformer", "language_projection", "query_tokens")
_IMAGE_SIDE_NAMES = frozenset(
    {"qkv", "projection", "query", "key", "value", "dense", "patch_embedding", "post_layernorm",
     "layernorm", "layer_norm1", "layer_norm2", "crossattention", "intermediate_query", "output_query"}
)  # fmt: skip


def image_side_modules(names: list[str], key: str) -> list[str]:
    """Problems for module names that can only match BLIP-2's frozen image side."""
    bad = [
        n for n in names if n.split(".")[-1] in _IMAGE_SIDE_NAMES or n.split(".")[0] in _IMAGE_SIDE_PREFIXES
    ]
    if not bad:
        return []
    return [
        f"{key}: {', '.join(map(repr, bad))} would train modules of the image side (vision "
        "tower, Q-Former, language_projection), which runs frozen under no_grad with its output "
        "cached once per image: they would never get a gradient. Train the language model's modules "
        "instead (e.g. q_proj, k_proj, v_proj, out_proj; "
        "language_model.model.decoder.final_layer_norm for modules_to_save)"
    ]


# Keys that do not change the adapter a run produces: where data and outputs live, where and
# how the run is scheduled, checkpointed and logged, and how it is evaluated afterwards. Every
# other key (a new one too, unless added here) is part of the training fingerprint.
NOT_IN_FINGERPRINT = (
    "name",
    "data.root",
    "data.categories",
    "data.category_aliases.",  # how names are matched; split.json pins the images read
    "data.category_table.",  # names, folders and display names, likewise
    "data.labels",  # where the labels are read from, like data.root: split.json pins the images
    "data.workbook",
    "data.max_image_pixels",
    "model.device",
    "model.gradient_checkpointing",
    "train.feature_cache",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_s",
    "train.tensorboard",
    "eval.",
    "output.",
    "cluster.",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not (prefix == "cluster." and k == "extra_sbatch"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """The config keys that change the trained adapter, dotted, with their values.

    Two runs with equal fingerprints train the same adapter on the same data; a completed
    category is skipped, and a checkpoint resumed, only under an equal fingerprint.
    """
    flat = _flatten(cfg.to_dict())
    # the steps hold batch_size x grad_accum_steps samples whatever the split into micro-batches
    # (the loss is the mean over the step's tokens): only the product changes the adapter
    flat["train.effective_batch_size"] = flat.pop("train.batch_size") * flat.pop("train.grad_accum_steps")
    # the level that gives the answers every run had before the key existed stays out, so
    # those runs still resume; any other level changes the answers and is in
    flat["data.normalize"] = normalize_level(cfg.data)
    if flat["data.normalize"] == "clean":
        del flat["data.normalize"]
    if flat.get("data.split_file") is None:  # ours, as before the key existed
        flat.pop("data.split_file", None)
    if flat.pop("train.mode") == "joint":  # which categories train together changes the adapter
        flat["train.mode"] = "joint"
        flat["joint.categories"] = sorted(cfg.data.category(c).name for c in cfg.data.categories)
    else:  # per-category runs keep the fingerprint they had before the keys existed
        flat.pop("train.category_in_prompt")
    return {
        k: v
        for k, v in sorted(flat.items())
        if not any(k == x or (x.endswith(".") and k.startswith(x)) for x in NOT_IN_FINGERPRINT)
    }


def normalize_level(data: DataConfig) -> str:
    """The answer normalisation a job applies: `data.normalize`, or ``none`` when
    `data.clean_answers` is false (the older key, which turns every layer off)."""
    return data.normalize if data.clean_answers else "none"


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short, stable hash of a training fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key whose value differs (absent keys shown as such)."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(absent)"), new.get(k, "(absent)")
        if a != b:
            lines.append(f"{k}: {a!r} -> {b!r}")
    return lines


class FingerprintMismatch(ConfigError):
    """Earlier work in a category's folder was trained under another training config."""


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is parsed as YAML (so `3`, `1e-4`, `null`, `[a, b]` work)."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} is not key=value (e.g. -p train.num_epochs=3 or -p num_epochs=3)"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    value = safe_load_yaml(raw) if raw.strip() else ""
    return ALIASES.get(key, key), value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.2; PyYAML's 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load_yaml(text: str) -> Any:
    """Parse YAML with the safe loader (nothing in a job file is ever executed)."""
    return yaml.load(text, Loader=_Loader)


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> JobConfig:
    """Build and validate a JobConfig from a plain mapping; all problems reported at once."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the job file must be a mapping of sections, got {raw!r}")
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    tree: dict[str, Any] = {}
    for k, v in raw.items():
        if "." in k:
            _set_dotted(tree, k, v)
        else:
            tree[k] = v
    unmatched: list[str] = []
    cfg = _build(JobConfig, tree, "", problems, unmatched)
    if not problems:
        _check_rules(cfg, problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        hint = ""
        if unmatched:  # no close match for some key: list the valid ones (of its section)
            heads = {k.rsplit(".", 1)[0] if "." in k else None for k in unmatched}
            scope = None if None in heads else {h for h in heads if h is not None}
            hint = "\nValid keys:\n" + format_valid_keys(scope)
        raise ConfigError(f"{source}: {plural(len(problems), 'problem')} in the job config:\n{lines}{hint}")
    return cfg


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load a job YAML (safe loader) and apply `key=value` overrides.

    Raises:
        ConfigError: the file is missing or unreadable, or the config has problems (all listed).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(
            f"cannot read job file {path}: {e.strerror}. Pass an existing file, e.g. --job job/demo.yaml"
        ) from e
    try:
        raw = safe_load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the job file must be a mapping of sections, got {type(raw).__name__}")
    for text_override in overrides or []:
        key, value = parse_override(text_override)
        _set_dotted(raw, key, value)
    cfg = config_from_dict(raw, source=str(path))
    # Relative data/output roots are relative to the current directory (where users run
    # `fada-batch`); the resolved config written next to the outputs records absolute paths.
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    cfg.output.root = str(Path(cfg.output.root).expanduser().resolve())
    name = cfg.model.name_or_path
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        cfg.model.name_or_path = str(Path(name).expanduser().resolve())
    if cfg.cluster.log_dir:
        cfg.cluster.log_dir = str(Path(cfg.cluster.log_dir).expanduser().resolve())
    return cfg


def dump_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML (written next to the outputs)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
