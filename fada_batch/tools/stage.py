"""Stage a base model for compute nodes that run offline.

    fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to /shared/models/blip2-opt-2.7b

Compute nodes often have no internet, and the image sets HF_HUB_OFFLINE=1. On a machine with
internet (a login node), `stage_model` downloads the model and its processor into a temporary
sibling of the target folder, checks that they load, and renames the folder into place, so the
target is either absent or complete. The job then names the folder in `model.name_or_path`.

`--model` may also be a local model folder (a copy elsewhere, a snapshot in the Hugging Face
cache, or the tiny test model): it is copied and checked the same way, with no network.

Why the check does not load the weights: blip2-opt-2.7b has 3.8B parameters, ~15 GB of RAM in
fp32 (the CPU default) and ~8 GB in bf16, more than a login node usually allows one user. The
default check instead proves everything that loading needs except the weight values:

- the files `load_base_model` needs are there (`check_model_folder`), every shard named by the
  weight index exists, and every safetensors header parses and covers its file (a truncated
  download fails here);
- the config is a BLIP-2 config; the processor (tokenizer + image processor) loads, and its
  `num_query_tokens` and `<image>` token id agree with the model config (a mismatch trains
  silently without the image);
- `from_pretrained(device_map="meta")` runs the real loader against the checkpoint without
  reading tensor data (measured: +24 MB RSS for a 1.2 GB checkpoint) and reports missing or
  wrongly shaped weights.

`full_load=True` (`--full-load`) also loads every weight on the CPU in bf16 through
`load_base_model`, for machines that have the memory.

An old revision of a BLIP-2 repository (before transformers moved the image tokens into the
processor) has no `num_query_tokens` in its processor config and no `image_token_index` in
config.json. Staging brings both up to date (`update_old_revision`): the count from the
model config, the id of the `<image>` token the processor adds to the tokenizer. The marker
lists what was changed.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fada_batch import __version__
from fada_batch.fsutil import TMP_MARK, atomic_write_json, replace_dir
from fada_batch.text import plural
from fada_batch.training.model import ModelLoadError, check_model_folder

log = logging.getLogger(__name__)

MARKER_NAME = "fada_staged.json"  # written into the folder before it is renamed into place
STAGING_SUFFIX = f"{TMP_MARK}staging"  # `.{name}.tmp-staging`: a rerun resumes a hub download

# Weight formats other than safetensors: left out when the repository also has safetensors
# (blip2-opt-2.7b publishes both, which would double a 15 GB download).
_OTHER_WEIGHTS = ("*.bin", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.pt", "*.pth", "*.ckpt", "*.gguf")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_LISTED = 10  # names listed in an error before "... and N more"


class StageError(ModelLoadError):
    """Staging failed; the message names what, where, and how to fix it.

    A ModelLoadError, because a failed stage leaves the model unloadable for the job.
    """


@dataclass
class Verification:
    """What `verify_model_folder` checked."""

    weight_files: list[str]
    tensors: int  # tensors in the checkpoint, all found by the model class with the right shape
    num_query_tokens: int
    full_load: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class StageResult:
    """A staged folder, ready for `model.name_or_path`."""

    path: Path
    source: str
    revision: str | None  # the hub commit staged (None for a local source)
    files: int
    size_bytes: int
    reused: bool  # the folder was already staged from this source: checked again, not copied
    verification: Verification
    updated: list[str] = field(default_factory=list)  # what update_old_revision changed


def stage_model(
    model: str,
    to: str | Path,
    *,
    revision: str | None = None,
    force: bool = False,
    full_load: bool = False,
) -> StageResult:
    """Download (or copy) `model` into `to`, verify that it loads, and rename it into place.

    Args:
        model: a hub id (`Salesforce/blip2-opt-2.7b`) or a local model folder.
        to: the folder to create; its parent is created if needed.
        revision: hub branch, tag or commit (default: the repository's main branch).
        force: replace `to` when it exists (default: reuse it if it holds this model).
        full_load: also load every weight on the CPU in bf16 (needs ~2 bytes of RAM/parameter).

    Returns:
        The staged folder and what was checked.

    Raises:
        StageError: unwritable target, incomplete or invalid model, no network or offline mode,
            unknown repository or revision, not enough disk space.
    """
    target = Path(to).expanduser().absolute()
    local = _local_source(model)
    if target.exists() and not force:
        reused = _reuse_existing(target, model, local, revision, full_load=full_load)
        if reused is not None:
            return reused
    staging = target.parent / f".{target.name}{STAGING_SUFFIX}"
    if local is not None:
        files, commit = _plan_local(local), None
        _make_writable_dir(staging, target)
        _check_space(staging, sum(files.values()))
        try:
            _copy_local(local, files, staging, target)
            updated = update_old_revision(staging)
            verification = verify_model_folder(staging, full_load=full_load)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a copy is not resumed: leave nothing behind
            raise
    else:
        files, commit = _plan_hub(model, revision)
        _make_writable_dir(staging, target)
        _check_space(staging, sum(files.values()) - _present_bytes(staging, files))
        _download_hub(model, commit, list(files), staging, target)
        try:
            updated = update_old_revision(staging)
            verification = verify_model_folder(staging, full_load=full_load)
        except StageError as e:
            raise StageError(
                f"{e} (downloaded from {model} @ {commit}; the download stays in {staging}, where a "
                "rerun reuses its complete files; delete it to start over.)"
            ) from e
    atomic_write_json(
        staging / MARKER_NAME,
        {
            "source": str(local) if local is not None else model,
            "revision": commit,
            "requested_revision": revision,
            "files": {name: (staging / name).stat().st_size for name in sorted(files)},
            "staged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fada_batch_version": __version__,
            "updated": updated,
        },
    )
    replace_dir(staging, target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and p.name != MARKER_NAME)
    return StageResult(target, model, commit, len(files), size, False, verification, updated)


def verify_model_folder(path: Path, *, full_load: bool = False) -> Verification:
    """Check that `path` holds a BLIP-2 model and processor that `load_base_model` can load.

    Raises:
        StageError: listing what is missing, damaged or inconsistent.
    """
    missing = check_model_folder(path)
    if missing:
        raise StageError(f"the model folder {path} is incomplete: it lacks {', '.join(missing)}.")
    weight_files, tensors, damaged = _check_weight_files(path)
    if damaged:
        raise StageError(f"the model folder {path} is incomplete: " + "; ".join(damaged) + ".")
    config = _load_config(path)
    processor = _load_processor(path)
    problems = _processor_problems(processor, config)
    if problems:
        raise StageError(f"the model and processor in {path} do not match: " + "; ".join(problems) + ".")
    model_tensors, warnings = _check_weights_on_meta(path)
    if full_load:
        _full_load(path)
    return Verification(
        weight_files, tensors or model_tensors, int(config.num_query_tokens), full_load, warnings
    )


def format_report(result: StageResult) -> str:
    """What `fada-batch stage-model` prints: what was staged and the line to put in the job."""
    v = result.verification
    source = result.source + (f" @ {result.revision}" if result.revision else "")
    head = (
        f"already staged: {result.path} holds {source}; checked again, nothing copied"
        if result.reused
        else f"staged {source} into {result.path}"
    )
    lines = [
        f"{head} ({plural(result.files, 'file')}, {result.size_bytes / 1e9:.2f} GB)",
        f"verified: config (BLIP-2, {v.num_query_tokens} query tokens), processor (tokenizer + "
        f"image processor), {plural(v.tensors, 'weight tensor')} in {plural(len(v.weight_files), 'file')} "
        + (
            "loaded on the CPU"
            if v.full_load
            else "matched to the model by name and shape (checked without loading them)"
        ),
    ]
    lines += [f"brought up to date (an old revision): {u}" for u in result.updated]
    lines += [f"warning: {w}" for w in v.warnings]
    lines += [
        "Put this in the job (compute nodes then load it offline):",
        "  model:",
        f"    name_or_path: {result.path}",
        f"or pass: -p model.name_or_path={result.path}",
    ]
    return "\n".join(lines)


# --- sources -------------------------------------------------------------------------------


def _local_source(model: str) -> Path | None:
    """The local folder `model` names, or None for a hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.absolute()
    if model.startswith(("/", ".", "~")) or path.exists():
        raise StageError(
            f"--model {model} is not a folder. Pass a hub id (e.g. Salesforce/blip2-opt-2.7b) or "
            "an existing model folder."
        )
    return None


def _choose_files(names: list[str]) -> list[str]:
    """The files to stage: everything but git/cache metadata and duplicate weight formats."""
    keep = [n for n in names if not any(part.startswith(".") for part in Path(n).parts)]
    if any(n.endswith(".safetensors") for n in keep):
        keep = [n for n in keep if not any(fnmatch.fnmatch(Path(n).name, p) for p in _OTHER_WEIGHTS)]
        keep = [n for n in keep if n != "pytorch_model.bin.index.json"]
    return sorted(keep)


def _plan_local(source: Path) -> dict[str, int]:
    """Files to copy from a local folder (name -> size), after checking the folder is complete."""
    missing = check_model_folder(source)
    if missing:
        raise StageError(
            f"the model folder {source} is incomplete: it lacks {', '.join(missing)}. Stage from a "
            "complete folder, or from the hub id on a machine with internet."
        )
    _weights, _tensors, damaged = _check_weight_files(source)
    if damaged:
        raise StageError(f"the model folder {source} is incomplete: " + "; ".join(damaged) + ".")
    names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    return {n: (source / n).stat().st_size for n in _choose_files(names)}


def _copy_local(source: Path, files: dict[str, int], staging: Path, target: Path) -> None:
    """Copy `files` into a fresh `staging`; modes follow the umask (a model folder on shared
    storage must be readable by the group, whatever the source's modes were)."""
    for child in staging.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for name in files:
        dest = staging / name
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, dest)  # follows symlinks (HF cache snapshots)
        except OSError as e:
            raise StageError(_write_error_text(target, dest, e)) from e


def _offline_text(model: str) -> str:
    return (
        f"cannot download {model}: HF_HUB_OFFLINE=1 is set, so the hub is not contacted. Staging "
        "needs the internet: run it on a machine that has it (a login node) with HF_HUB_OFFLINE=0 "
        "(in the image: `docker run -e HF_HUB_OFFLINE=0 ...` or `apptainer exec --env "
        "HF_HUB_OFFLINE=0 ...`), or pass --model a local folder that holds the model (e.g. its "
        "snapshot in the Hugging Face cache, hub/models--ORG--NAME/snapshots/<commit>)."
    )


def _plan_hub(model: str, revision: str | None) -> tuple[dict[str, int], str]:
    """Files to download from the hub (name -> size) and the commit they are taken at."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import ENDPOINT, is_offline_mode
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if is_offline_mode():
        raise StageError(_offline_text(model))
    try:
        info = HfApi().model_info(model, revision=revision, files_metadata=True)
    except GatedRepoError as e:
        raise StageError(
            f"{model} is gated: accept its terms on its hub page, then log in (`hf auth login`) or "
            "set HF_TOKEN, and stage again."
        ) from e
    except RepositoryNotFoundError as e:
        raise StageError(
            f"no model {model!r} on the hub (or it is private): check the id, e.g. "
            "Salesforce/blip2-opt-2.7b; for a private one log in (`hf auth login`) or set HF_TOKEN."
        ) from e
    except RevisionNotFoundError as e:
        raise StageError(
            f"{model} has no revision {revision!r}: pass a branch, tag or commit that exists."
        ) from e
    except HFValidationError as e:
        raise StageError(f"--model {model!r} is neither an existing folder nor a valid hub id ({e}).") from e
    except Exception as e:
        if _is_network_error(e):
            raise StageError(
                f"cannot reach the hub ({ENDPOINT}) to download {model}: {e}. Staging needs the "
                "internet: run it on a machine that has it (a login node, not a compute node), "
                "check a proxy (HTTPS_PROXY) if the site needs one, or pass --model a local folder "
                "that holds the model."
            ) from e
        raise
    names = [s.rfilename for s in info.siblings or []]
    chosen = _choose_files(names)
    missing = _missing_from_names(chosen)
    if missing:
        raise StageError(
            f"the hub repository {model} (revision {info.sha}) is incomplete for fada-batch: it "
            f"lacks {', '.join(missing)}. Stage a BLIP-2 repository with model and processor, "
            "e.g. Salesforce/blip2-opt-2.7b."
        )
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    return {n: sizes.get(n, 0) for n in chosen}, str(info.sha)


def _is_network_error(e: BaseException) -> bool:
    """A failure to reach the server (huggingface_hub raises its HTTP client's own classes,
    which are not OSErrors; they are matched by name so a client change does not break this)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "RequestError", "ConnectionError", "Timeout", "TimeoutException"})


def _missing_from_names(names: list[str]) -> list[str]:
    """What a file list lacks for `from_pretrained` (the names-only twin of check_model_folder)."""
    have = {Path(n).name for n in names if "/" not in n}
    missing = []
    if "config.json" not in have:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") or fnmatch.fnmatch(n, "pytorch_model*.bin") for n in have):
        missing.append("model weights (*.safetensors)")
    if not have & {"preprocessor_config.json", "processor_config.json"}:
        missing.append("preprocessor_config.json / processor_config.json")
    if not have & {"tokenizer.json", "vocab.json", "tokenizer_config.json"}:
        missing.append("tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return missing


def _present_bytes(staging: Path, files: dict[str, int]) -> int:
    """Bytes already downloaded into `staging` by an interrupted run (reused, not fetched)."""
    total = 0
    for name, size in files.items():
        p = staging / name
        if p.is_file() and p.stat().st_size == size:
            total += size
    return total


def _download_hub(model: str, commit: str, names: list[str], staging: Path, target: Path) -> None:
    """Download `names` at `commit` into `staging`; files a previous run finished are kept."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model, revision=commit, local_dir=staging, allow_patterns=names)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise StageError(_write_error_text(target, staging, e)) from e
        raise StageError(
            f"the download of {model} into {staging} failed: {e}. Run the same command again: "
            "files already downloaded are kept and the rest is fetched."
        ) from e
    except Exception as e:
        if _is_network_error(e):
            raise StageError(
                f"the download of {model} into {staging} was cut off: {e}. Run the same command "
                "again: files already downloaded are kept and the rest is fetched."
            ) from e
        raise
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download metadata


# --- target folder -------------------------------------------------------------------------


def _reuse_existing(
    target: Path, model: str, local: Path | None, revision: str | None, *, full_load: bool
) -> StageResult | None:
    """Re-check and return `target` if it is this model staged before; None if it may be
    replaced (an empty folder); otherwise refuse to touch it."""
    if not target.is_dir():
        raise StageError(f"--to {target} exists and is not a folder. Pass a new folder path.")
    if not any(target.iterdir()):
        return None
    marker = _read_marker(target)
    source = str(local) if local is not None else model
    if marker is None:
        raise StageError(
            f"--to {target} exists and was not staged by fada-batch (no {MARKER_NAME}); refusing to "
            "replace it. Pass a new folder, or --force to replace it."
        )
    same = marker.get("source") == source and (
        revision is None or revision in (marker.get("revision"), marker.get("requested_revision"))
    )
    if not same:
        was = f"{marker.get('source')} @ {marker.get('revision')}"
        raise StageError(
            f"--to {target} already holds {was}, not {source}"
            + (f" @ {revision}" if revision else "")
            + ". Pass another folder, or --force to replace it."
        )
    try:
        verification = verify_model_folder(target, full_load=full_load)
    except StageError as e:
        raise StageError(
            f"{e} It was staged before and has changed since: stage it again with --force."
        ) from e
    files = [p for p in target.rglob("*") if p.is_file() and p.name != MARKER_NAME]
    size = sum(p.stat().st_size for p in files)
    return StageResult(target, model, marker.get("revision"), len(files), size, True, verification)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_error_text(target: Path, tried: Path, err: OSError) -> str:
    """Why the model folder `target` could not be written at `tried`, and what to do about it."""
    where = _first_existing(tried)
    if not where.is_dir():
        return (
            f"cannot create the model folder {target}: {where} is a file, not a folder. Pass --to "
            "a path under an existing folder."
        )
    try:
        st = where.stat()
        owner = f"{where} belongs to uid {st.st_uid}, mode {st.st_mode & 0o777:o}"
    except OSError:
        owner = f"{where} cannot be read"
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free space there, or pass --to a folder on a file system with room."
    elif err.errno == errno.EROFS:
        fix = f"{where} is on a read-only file system (e.g. a container mount with :ro); pass --to a writable folder."
    else:
        fix = (
            "Pass --to a folder you can write (e.g. under $HOME, or a shared models folder your "
            f"group can write), or ask the owner of {where} to let you write there "
            f"(e.g. `chmod g+w {where}`)."
        )
    return f"cannot write the model folder {target}: {reason} ({owner}). {fix}"


def _make_writable_dir(staging: Path, target: Path) -> None:
    """Create the staging folder (and parents) and write a probe in it, before any download."""
    try:
        staging.mkdir(parents=True, exist_ok=True)
        probe = staging / f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            staging.rmdir()  # only if this call made it (an empty folder)
        raise StageError(_write_error_text(target, staging, e)) from e


def _check_space(staging: Path, need: int) -> None:
    free = shutil.disk_usage(staging).free
    if need > 0 and free < need * 1.02:
        raise StageError(
            f"not enough disk space for the model in {staging.parent}: it needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free. Free space there or pass --to a folder on a file "
            "system with room."
        )


# --- old revisions -------------------------------------------------------------------------


def update_old_revision(path: Path) -> list[str]:
    """Give an old revision's processor its `num_query_tokens` and its config.json the
    `image_token_index`, in place; returns what was changed (empty for a current revision).

    Raises:
        StageError: it cannot be done here (no count in the config, or an `<image>` id outside
            the model's vocabulary); the message gives the whole fix.
    """
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return []  # verify_model_folder names the problem
    processor = _load_processor(path)  # Blip2Processor adds `<image>` to a tokenizer without it
    image_token = str(getattr(processor, "image_token", None) or "<image>")
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    nq, have_nq = config.get("num_query_tokens"), getattr(processor, "num_query_tokens", None)
    vocab = (config.get("text_config") or {}).get("vocab_size")
    fix = (
        f'Fix by hand: "num_query_tokens": N (the model\'s query tokens, 32 for blip2-opt-2.7b) in '
        f'{path / "processor_config.json"}, and "image_token_index": the id of {image_token} in the '
        f"tokenizer (here {image_id}) in {config_path}; that id must be below text_config.vocab_size "
        f"({vocab}), or stage a newer revision of the model (--revision main)."
    )
    changed = []
    if have_nq is None:
        if not isinstance(nq, int):
            raise StageError(
                f"the processor in {path} has no num_query_tokens and config.json none either. {fix}"
            )
        processor.num_query_tokens = nq
        changed.append(f"processor num_query_tokens = {nq} (from config.json)")
    if config.get("image_token_index") is None:
        if not isinstance(vocab, int) or not 0 <= image_id < vocab:
            raise StageError(
                f"config.json in {path} has no image_token_index, and the tokenizer's {image_token} "
                f"id {image_id} lies outside the language model's vocabulary ({vocab}). {fix}"
            )
        config["image_token_index"] = image_id
        changed.append(f"config.json image_token_index = {image_id} (the tokenizer's {image_token})")
    if changed:
        processor.save_pretrained(str(path))  # processor_config.json; the tokenizer with <image>
        atomic_write_json(config_path, config)
        log.info("%s: brought an old revision up to date: %s", path, "; ".join(changed))
    return changed


# --- verification --------------------------------------------------------------------------


def _listed(names: list[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def _check_weight_files(path: Path) -> tuple[list[str], int, list[str]]:
    """(weight files, tensors in them, problems): every shard the index names exists; every
    safetensors header parses and covers its file (a truncated download fails here)."""
    from safetensors import safe_open

    problems = []
    for index_name in _INDEX_FILES:
        index = path / index_name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"{index_name} is not a valid weight index ({e})")
            continue
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            problems.append(f"it lacks weight files named in {index_name}: {_listed(absent)}")
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    tensors = 0
    for name in weights:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                tensors += len(list(f.keys()))
        except Exception as e:  # safetensors raises its own error type for a bad header
            problems.append(f"{name} is damaged or truncated ({e})")
    if not weights:
        weights = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    return weights, tensors, problems


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig, Blip2Config

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise StageError(f"the config in {path} does not load: {e}") from e
    if not isinstance(config, Blip2Config):
        raise StageError(
            f"{path} holds a {getattr(config, 'model_type', '?')!r} model; fada-batch fine-tunes "
            "BLIP-2 (model_type 'blip-2', e.g. Salesforce/blip2-opt-2.7b)."
        )
    return config


def _load_processor(path: Path) -> Any:
    from transformers import Blip2Processor

    try:
        return Blip2Processor.from_pretrained(path)
    except Exception as e:  # tokenizers and image processors raise several types on bad files
        raise StageError(f"the processor (tokenizer + image processor) in {path} does not load: {e}") from e


def _processor_problems(processor: Any, config: Any) -> list[str]:
    """Mismatches between processor and model that would otherwise train silently."""
    problems = []
    nq = getattr(processor, "num_query_tokens", None)
    if nq is None:
        problems.append(
            "the processor has no num_query_tokens, so it would insert no <image> tokens and the "
            "model would ignore the image; stage a newer revision of the model"
        )
    elif nq != config.num_query_tokens:
        problems.append(f"processor num_query_tokens {nq} != model config {config.num_query_tokens}")
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", None) or "<image>"
    image_id = tok.convert_tokens_to_ids(str(image_token))
    want = getattr(config, "image_token_id", None)
    if want is None:
        want = getattr(config, "image_token_index", None)
    if want is not None and image_id != want:
        problems.append(f"the tokenizer's {image_token} id is {image_id}, the model config says {want}")
    vocab = config.text_config.vocab_size
    if len(tok) > vocab:
        problems.append(
            f"the tokenizer has {plural(len(tok), 'token')}, more than the model's vocab_size {vocab}"
        )
    return problems


def _check_weights_on_meta(path: Path) -> tuple[int, list[str]]:
    """Run the real loader on the meta device: no tensor data is read, every weight is matched
    by name and shape. Returns (tensors in the checkpoint, warnings)."""
    from transformers import Blip2ForConditionalGeneration

    try:
        model, info = Blip2ForConditionalGeneration.from_pretrained(
            path, device_map="meta", output_loading_info=True
        )
    except Exception as e:  # OSError, ValueError, safetensors' own error
        raise StageError(f"the weights in {path} do not load: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(
        str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []
    )
    problems = []
    if missing:
        problems.append(f"{plural(len(missing), 'weight')} missing from the checkpoint: {_listed(missing)}")
    if mismatched:
        problems.append(f"{plural(len(mismatched), 'weight')} with the wrong shape: {_listed(mismatched)}")
    if problems:
        raise StageError(f"the model folder {path} is incomplete: " + "; ".join(problems) + ".")
    warnings = []
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.append(
            f"{plural(len(unexpected), 'tensor')} in the checkpoint that Blip2ForConditionalGeneration does "
            f"not use (ignored when loading): {_listed(unexpected)}"
        )
    return len(model.state_dict()), warnings


def _full_load(path: Path) -> None:
    from fada_batch.training.model import load_base_model

    try:
        loaded = load_base_model(str(path), device="cpu", dtype="bfloat16")
    except ModelLoadError as e:
        raise StageError(str(e)) from e
    del loaded
