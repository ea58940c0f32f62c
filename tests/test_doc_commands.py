"""Every command in the repository's documentation is run by a test, so none can rot.

The commands are the lines of the fenced and indented code blocks of every tracked Markdown
file (README.md, docs/, container/README.md, slurm/README.md, ...) whose first word, after
`VAR=value` prefixes, is a program of PROGRAMS or a file of the repository; a trailing
backslash continues a command, a trailing `# comment` is not part of it. Each one is in
exactly one of three reviewed tables:

- RUN: run here, in a temporary copy of the repository's tracked files (a fresh clone), in
  the order the document gives them. `fada-batch` commands run in this process through
  `cli.main` (one import of torch for all of them, not one each), everything else under bash.
  Where the command is not run exactly as written, its entry says what is changed and why.
- ELSEWHERE: run, as written or nearly, by the named test; its program and options must
  appear in that test's source.
- NOT_RUN: not run, with the reason (a GPU, Docker/Apptainer, the network, a placeholder).

A command that appears in a document and in none of the tables fails
`test_every_documented_command_is_run_or_listed`, as does a table entry no document holds any
more. Add the new command to RUN (preferred) or, with its reason, to NOT_RUN.

What the copy holds besides the tracked files, as `make demo` leaves a fresh clone plus the
docs' example inputs: the tiny model in `models/tiny-blip2` (the tests' cached build, copied,
not rebuilt), the demo data in `data/demo`, `scan.png` and `scans/` (demo scans), and a Femur
adapter trained by `fada-batch train --job job/full.yaml --category Femur` (the README's own
command) for the docs that ask it questions.

The production jobs (job/full.yaml, validation, workstation, cluster) name blip2-opt-2.7b, a
GPU and site paths. Their `fada-batch` commands get, right after `--job FILE` (so the
document's own `-p` still win), the overrides of PRODUCTION: the tiny model on the CPU,
unquantised, the demo data, 6 images and 1 epoch, and outputs inside the copy. The demo job
keeps its own paths and gets only the size overrides. Every `fada-batch` command, run or not,
and every inline `fada-batch ...` span of the docs is also checked against the real parser:
its subcommand exists and so does each of its options.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fada_batch import cli

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# The first word of a documented command line. Extend it when the docs start using another
# program, so that its lines are extracted (and must then be run or listed).
PROGRAMS = frozenset(
    {
        "fada-batch", "make", "python", "python3", "pip", "bash", "sh", "source", "eval", "cd",
        "export", "git", "sbatch", "srun", "squeue", "sacct", "scancel", "scontrol", "sinfo",
        "docker", "apptainer", "singularity", "curl", "wget", "huggingface-cli", "hf", "pytest",
        "tensorboard",
    }
)  # fmt: skip


# ------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is and its text as the key of the tables."""

    doc: str  # path relative to the repository
    line: int
    text: str  # continuation lines joined, trailing comment dropped, runs of spaces as one


def tracked_docs() -> list[str]:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return sorted(out.stdout.split(), key=lambda p: (p != "README.md", p))


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The (line number, line) lists of the fenced and the indented code blocks."""
    lines, blocks, i = text.splitlines(), [], 0
    previous_blank = True
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            j, body = i + 1, []
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                body.append((j + 1, lines[j]))
                j += 1
            blocks.append(body)
            i, previous_blank = j + 1, False
            continue
        if previous_blank and line.startswith("    ") and line.strip():
            body = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append((i + 1, lines[i][4:]))
                i += 1
            blocks.append(body)
            continue
        previous_blank = not line.strip()
        i += 1
    return blocks


def first_word(line: str) -> str | None:
    try:
        words = shlex.split(line, comments=False)
    except ValueError:  # an unbalanced quote: not a shell command
        words = line.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words.pop(0)
    return words[0] if words else None


def is_command(line: str) -> bool:
    word = first_word(line)
    return word is not None and (word in PROGRAMS or (REPO / word).is_file())


def extract_commands(doc: str) -> list[DocCommand]:
    found = []
    for block in code_blocks((REPO / doc).read_text()):
        start, pending = 0, ""
        for number, line in block:
            if not pending:
                start = number
            pending = f"{pending} {line.strip()}" if pending else line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            text = " ".join(re.sub(r"\s+#\s.*$", "", pending).split())
            pending = ""
            if is_command(text):
                found.append(DocCommand(doc, start, text))
    return found


def all_commands() -> list[DocCommand]:
    return [c for doc in tracked_docs() for c in extract_commands(doc)]


# ------------------------------------------------------------------ the reviewed tables


@dataclass(frozen=True)
class Run:
    """How a documented command runs here: `command` instead of the text (None: as written,
    optional `[...]` parts left out), and why it differs."""

    command: str | None = None
    why: str = ""
    slurm: bool = False  # needs the local SLURM test cluster (tests marked `slurm`)
    timeout_s: int = 600


SUBMITS = (
    "submitting needs a SLURM cluster with GPUs: --dry-run runs the pre-flight check and "
    "prints the plan; the real submission runs against the local cluster in tests/test_launch.py"
)
MAKE = (
    "set-up builds a virtual environment from PyPI (minutes) and `make test` runs this very "
    "suite: `make -n` checks that the target exists and expands its recipe"
)
SHORT_BENCH = "--steps 1: one timed step instead of ten (the figures are not checked here)"


def dry(command: str) -> Run:
    return Run(f"{command} --dry-run", SUBMITS)


RUN: dict[str, Run] = {
    # README.md
    "make demo": Run("make -n demo", MAKE),
    "make test": Run("make -n test", MAKE),
    "make test-fast": Run("make -n test-fast", MAKE),
    "make lint": Run("make -n lint", MAKE),
    "fada-batch train --job job/validation.yaml --category Abdomen -p num_epochs=3": Run(),
    "fada-batch submit --job job/full.yaml": dry("fada-batch submit --job job/full.yaml"),
    "fada-batch collect --job job/full.yaml": Run(),
    "fada-batch train --job job/full.yaml --category Femur [--force]": Run(),
    "fada-batch submit --job job/full.yaml --dry-run": Run(),
    "fada-batch submit --job job/full.yaml --categories Femur,Thorax": dry(
        "fada-batch submit --job job/full.yaml --categories Femur,Thorax"
    ),
    "fada-batch submit --job job/demo.yaml --executor local": Run(),
    "fada-batch make-demo-data data/demo-workbook --form workbook": Run(),
    "fada-batch validate --job job/demo.yaml -p data.root=data/demo-workbook -p data.normalize=canonical": Run(),
    "sbatch --array=0-13 slurm/train_array.sbatch job/full.yaml": Run(
        "sbatch --test-only --array=0-13 slurm/train_array.sbatch job/full.yaml",
        "--test-only: the local SLURM cluster checks the request and the script and answers when "
        "it would start; nothing is queued (the plain-sbatch path runs for real in "
        "tests/test_launch.py::test_plain_sbatch_array_trains_the_demo_categories)",
        slurm=True,
    ),
    "fada-batch collect --job job/full.yaml [--compare outputs/previous-run]": Run(),
    "fada-batch evaluate --job job/full.yaml [--category Femur]": Run(),
    'fada-batch ask --adapter outputs/blip2_femur/final_model --image scan.png [--question "..."] [--json]': Run(),
    "fada-batch bench --job job/bench-cpu.yaml --make-bench-model --baseline --threads 1": Run(
        "fada-batch bench --job job/bench-cpu.yaml --make-bench-model --baseline --threads 1 --steps 1",
        SHORT_BENCH,
    ),
    "fada-batch export --adapter outputs/blip2_femur/final_model --to publish/femur": Run(),
    "fada-batch export --adapter outputs/blip2_femur/final_model --to serve/femur --merge": Run(),
    # docs/evaluation.md
    "fada-batch evaluate --job job/full.yaml --category Femur": Run(),
    "fada-batch evaluate --job job/full.yaml": Run(),
    "fada-batch ask --adapter outputs/blip2_femur/final_model --image scan.png": Run(),
    'fada-batch ask --adapter outputs/blip2_femur/final_model --image scans/ --question "Estimate the gestational age" --json': Run(),
    # docs/performance.md
    "fada-batch bench --job job/full.yaml": Run(
        "fada-batch bench --job job/full.yaml --steps 1", SHORT_BENCH
    ),
    "fada-batch bench --job job/full.yaml --baseline": Run(
        "fada-batch bench --job job/full.yaml --baseline --steps 1", SHORT_BENCH
    ),
    "fada-batch bench --job job/full.yaml --category Abdomen": Run(
        "fada-batch bench --job job/full.yaml --category Abdomen --steps 1", SHORT_BENCH
    ),
    "fada-batch bench --job job/full.yaml --images 2424": Run(
        "fada-batch bench --job job/full.yaml --images 2424 --steps 1", SHORT_BENCH
    ),
    "fada-batch bench --job job/full.yaml --gpus 1,2,4,8,16 --network-gbps 25": Run(
        "fada-batch bench --job job/full.yaml --gpus 1,2,4,8,16 --network-gbps 25 --steps 1", SHORT_BENCH
    ),
    "python scripts/scale_benchmark.py": Run(
        "python scripts/scale_benchmark.py --images 40",
        "--images 40 instead of 2,424 scans (~20 s more; the full size runs in the slow "
        "tests/test_scale.py::test_seed_sized_category_validates_and_splits_in_seconds)",
    ),
    "python scripts/scale_benchmark.py --workbook --size 64": Run(
        "python scripts/scale_benchmark.py --workbook --size 32 --images 140",
        "--images 140: the same 14 categories, 10 rows each instead of 19,019 (the figures are not checked here)",
    ),
    "python scripts/scale_benchmark.py --size 720": Run(
        "python scripts/scale_benchmark.py --size 720 --images 20",
        "--images 20 instead of 2,424 scans of 720 px (~80 s more)",
    ),
    # container/README.md
    "fada-batch validate --job job/cluster.yaml": Run(),
    "fada-batch submit --job job/cluster.yaml": dry("fada-batch submit --job job/cluster.yaml"),
    "fada-batch collect --job job/cluster.yaml": Run(),
    # slurm/README.md
    "fada-batch submit --job job/full.yaml --sort-by-size": dry(
        "fada-batch submit --job job/full.yaml --sort-by-size"
    ),
    # slurm/testcluster/README.md: the cluster the slurm tests share; start.sh is a no-op when up
    "bash slurm/testcluster/start.sh": Run(slurm=True, timeout_s=900),
    "source slurm/testcluster/env.sh": Run(
        'source slurm/testcluster/env.sh && test -f "$SLURM_CONF" && sinfo --noheader',
        "then checks that SLURM_CONF names the running cluster's config and sinfo answers",
        slurm=True,
    ),
    "bash slurm/testcluster/status.sh": Run(slurm=True),
}

# Run as written (or nearly) by another test: its program and options are in that test.
ELSEWHERE: dict[str, str] = {
    "python scripts/gpu_benchmark.py --scale tiny --device cpu --out b.json": (
        "test_gpu_benchmark.py::test_tiny_run_on_cpu_writes_figures"
    ),
    # README.md, joint mode: on the demo data and the tiny model (the fixture trains through `train`)
    "fada-batch validate --job job/full.yaml -p train.mode=joint": (
        "test_joint.py::test_cli_validate_submit_and_train_in_joint_mode"
    ),
    "fada-batch train --job job/full.yaml -p train.mode=joint": (
        "test_joint.py::test_cli_validate_submit_and_train_in_joint_mode"
    ),
    "fada-batch submit --job job/full.yaml -p train.mode=joint": (
        "test_joint.py::test_cli_validate_submit_and_train_in_joint_mode"
    ),
    # README.md, the saved joint adapter: the joint fixture's (no joint adapter in the copy)
    "fada-batch evaluate --job job/full.yaml -p train.mode=joint": (
        "test_joint.py::test_joint_evaluate_from_disk_equals_training"
    ),
    # docs/evaluation.md
    "fada-batch evaluate --job job/full.yaml --category joint": (
        "test_joint.py::test_joint_evaluate_from_disk_equals_training"
    ),
    "fada-batch ask --adapter outputs/blip2_joint/final_model --image scan.png --category Femur": (
        "test_joint.py::test_ask_a_joint_adapter_with_its_category_answers_as_evaluation_did"
    ),
    "sbatch --dependency=afterany:<ARRAY_JOB_ID> slurm/collect.sbatch job/full.yaml": (
        "test_launch.py::test_plain_sbatch_array_trains_the_demo_categories"
    ),
}

NO_ENGINE = "needs Docker or Apptainer, which CI lacks; tests/test_container.py checks the recipes"
HUB = (
    "downloads blip2-opt-2.7b (~15 GB) from the Hugging Face hub; tests/test_stage.py stages the "
    "tiny model from a local folder and from a fake hub instead"
)
NOT_RUN: dict[str, str] = {
    # README.md
    "tensorboard --logdir outputs/demo": (
        "starts a web server that runs until stopped; the event files it reads are read back "
        "with tensorboard's own reader in tests/test_tensorboard.py"
    ),
    "make test-container": (
        "the container check itself: .ci/run runs it after the tests (it builds the image with "
        "podman and runs tests/test_image.py and tests/test_image_cluster.py against it)"
    ),
    # container/README.md
    "docker build -f container/Dockerfile -t fada-batch .": NO_ENGINE,
    "apptainer build fada-batch.sif container/fada-batch.def": NO_ENGINE,
    "apptainer test fada-batch.sif": NO_ENGINE
    + " (its %test script runs in test_apptainer_smoke_test_runs_here)",
    "fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to /shared/models/blip2-opt-2.7b": HUB,
    "docker run --rm -e HF_HUB_OFFLINE=0 -v /models:/models fada-batch stage-model --model "
    "Salesforce/blip2-opt-2.7b --to /models/blip2-opt-2.7b": NO_ENGINE + "; and " + HUB,
    "apptainer exec --env HF_HUB_OFFLINE=0 --bind /shared fada-batch.sif fada-batch stage-model "
    "--model Salesforce/blip2-opt-2.7b --to /shared/models/blip2-opt-2.7b": NO_ENGINE + "; and " + HUB,
    "docker run --gpus all -v $PWD/data:/data -v $PWD/outputs:/outputs -v /models:/models fada-batch "
    "submit --job job/workstation.yaml --executor local": NO_ENGINE + "; and a GPU",
    "docker run --rm -v $PWD/data:/data:ro fada-batch validate --job job/workstation.yaml": NO_ENGINE,
    "docker run --gpus all -v $PWD/data:/data -v $PWD/outputs:/outputs -v /models:/models fada-batch "
    "train --job job/workstation.yaml --category Abdomen -p num_epochs=1": NO_ENGINE + "; and a GPU",
    "docker run --rm -v $PWD/outputs:/outputs fada-batch demo --job job/demo.yaml -p "
    "model.name_or_path=/opt/fada-batch/models/tiny-blip2 -p data.root=/tmp/demo-data -p "
    "output.root=/outputs/demo": NO_ENGINE + " (the same demo runs here as `submit --job job/demo.yaml`)",
    "apptainer build /shared/containers/fada-batch.sif container/fada-batch.def": NO_ENGINE,
    "docker build -f container/Dockerfile -t fada-batch . && docker run --rm fada-batch --version": NO_ENGINE,
    # docs/performance.md
    "python scripts/gpu_benchmark.py --out gpu_benchmark.json": (
        "the full 3.7B-parameter model: minutes on a GPU, ~15 GB and ~7 min on a CPU; its "
        "tiny form runs in tests/test_gpu_benchmark.py"
    ),
    "bash scripts/device_wheels.sh": "downloads wheels from PyPI (the network)",
    "OUT=/some/dir bash scripts/gpu_checks.sh": (
        "needs a GPU; it runs scaled down on the CPU in "
        "tests/test_gpu_benchmark.py::test_gpu_checks_script_runs_scaled_down_on_cpu"
    ),
    # slurm/README.md
    'FADA_BATCH="apptainer exec --nv --bind /shared fada-batch.sif fada-batch" sbatch ...': (
        "needs Apptainer and an image, and `...` stands for the sbatch arguments above"
    ),
    # slurm/testcluster/README.md
    "bash slurm/testcluster/stop.sh": "stops the SLURM cluster that the slurm tests (and other users) share",
    "bash slurm/testcluster/stop.sh --purge": "stops the shared SLURM cluster and deletes its state",
}

# The overrides that turn a production job into one this machine runs (see the docstring).
SMALL = ["data.num_images=6", "train.num_epochs=1"]
TINY = ["model.name_or_path=models/tiny-blip2", "model.device=cpu", "model.quantization=none"]
PRODUCTION: dict[str, list[str]] = {
    "job/full.yaml": [*TINY, "data.root=data/demo", *SMALL],
    "job/validation.yaml": [*TINY, "data.root=data/demo"],  # already 5 images, 1 epoch
    "job/workstation.yaml": [*TINY, "data.root=data/demo", *SMALL, "output.root=outputs/workstation"],
    "job/cluster.yaml": [*TINY, "data.root=data/demo", *SMALL, "output.root=outputs/cluster"],
    "job/demo.yaml": SMALL,  # its own tiny model and demo data
    "job/bench-cpu.yaml": [],  # its own bench model, built by --make-bench-model
}


# ------------------------------------------------------------------ checks without running


def test_every_documented_command_is_run_or_listed():
    commands = all_commands()
    assert len(commands) > 40, "the extraction found almost nothing: is the parsing broken?"
    texts = {c.text for c in commands}
    tables = {"RUN": set(RUN), "ELSEWHERE": set(ELSEWHERE), "NOT_RUN": set(NOT_RUN)}
    problems = [
        f"{c.doc}:{c.line}: {c.text!r} is in none of RUN, ELSEWHERE, NOT_RUN: run it (RUN) or "
        "list it with the reason it cannot run here (NOT_RUN)"
        for c in commands
        if not any(c.text in keys for keys in tables.values())
    ]
    for name, keys in tables.items():
        problems += [f"{name} holds {k!r}, which no document has any more" for k in sorted(keys - texts)]
        for other, other_keys in tables.items():
            if name < other:
                problems += [f"{k!r} is in both {name} and {other}" for k in sorted(keys & other_keys)]
    problems += [f"NOT_RUN[{k!r}] gives no reason" for k, why in NOT_RUN.items() if len(why) < 10]
    problems += [
        f"RUN[{k!r}] changes the command without saying why"
        for k, r in RUN.items()
        if r.command and not r.why
    ]
    assert not problems, "\n".join(problems)


def test_the_extraction_finds_commands_and_skips_listings(tmp_path):
    text = "\n".join(
        [
            "Intro:",
            "",
            "    fada-batch train --job job/full.yaml \\",
            "        --category Femur   # one category",
            "    final_model/            adapter files",
            "",
            "```bash",
            "make lint",
            "model:",
            "```",
            "",
            "    data/",
            "      Fetal Ultrasound/{Category}/",
        ]
    )
    blocks = code_blocks(text)
    lines = [" ".join(line.split()) for block in blocks for _, line in block]
    assert "final_model/ adapter files" in lines and "make lint" in lines
    assert is_command("fada-batch train --job job/full.yaml")
    assert is_command('FADA_BATCH="apptainer exec x.sif" sbatch --array=0-8 x') and is_command(
        "OUT=/x bash s.sh"
    )
    assert not is_command("final_model/            adapter files") and not is_command("model:")
    assert not is_command("data/") and not is_command("wall time of this attempt")


def _options(parser, argv: list[str]) -> list[str]:
    """The options of `argv` that `parser` does not know (after its subcommand)."""
    unknown = []
    for token in argv:
        if token.startswith("-") and not re.match(r"^-\d", token):
            name = token.split("=", 1)[0]
            if name not in parser._option_string_actions:
                unknown.append(name)
    return unknown


def fada_batch_calls(text: str) -> list[list[str]]:
    """Each `fada-batch SUBCOMMAND args...` in a command or a span, up to `&&`, `|`, `;`."""
    text = re.sub(r"<[^>]+>", "PLACEHOLDER", text).replace("[", " ").replace("]", " ")
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    calls, i = [], 0
    while i < len(words):
        if words[i] == "fada-batch" and i + 1 < len(words) and not words[i + 1].startswith("-"):
            j = i + 1
            while j < len(words) and words[j] not in ("&&", "||", "|", ";"):
                j += 1
            calls.append(words[i + 1 : j])
            i = j
        i += 1
    return calls


def test_every_documented_fada_batch_call_names_a_real_subcommand_and_options():
    """Blocks and inline spans alike, run or not: `fada-batch SUB --opt` must parse as far as
    its names go (placeholders such as <it> and [optional] brackets are allowed)."""
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices
    texts = [(c.doc, c.line, c.text) for c in all_commands()]
    for doc in tracked_docs():
        for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
            texts += [(doc, number, span) for span in re.findall(r"`(fada-batch [^`]+)`", line)]
    problems, checked = [], 0
    for doc, line, text in texts:
        for call in fada_batch_calls(text):
            sub = call[0]
            if sub not in subs:
                if re.match(r"^[a-z][a-z-]+$", sub):
                    problems.append(f"{doc}:{line}: `fada-batch {sub}` is not a subcommand")
                continue
            checked += 1
            problems += [
                f"{doc}:{line}: `fada-batch {sub}` has no option {o}" for o in _options(subs[sub], call[1:])
            ]
    assert checked > 40 and not problems, "\n".join(problems)


def test_fada_batch_calls_in_comments_and_docstrings_use_real_options():
    """Job files, batch scripts, container recipes, scripts and the package's docstrings show
    commands too (`#   fada-batch train --job job/full.yaml ...`): their options exist."""
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    problems, checked = [], 0
    for name in filter(None, out.stdout.split("\0")):
        if name.startswith("tests/") or name.endswith(".md"):
            continue  # the docs: above; the tests build wrong commands on purpose
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for call in fada_batch_calls(line) if "fada-batch " in line else []:
                if call[0] in subs:  # prose ("fada-batch saves a ...") names no subcommand
                    checked += 1
                    problems += [
                        f"{name}:{number}: `fada-batch {call[0]}` has no option {o}"
                        for o in _options(subs[call[0]], call[1:])
                    ]
    assert checked > 20 and not problems, "\n".join(problems)


def test_commands_run_elsewhere_are_in_those_tests():
    for command, test in ELSEWHERE.items():
        file, name = test.split("::")
        source = (TESTS / file).read_text()
        match = re.search(rf"^def {name}\(.*?(?=^\S|\Z)", source, re.S | re.M)
        assert match, f"{test} (named for {command!r}) does not exist"
        words = shlex.split(command)
        # the options in the test itself; the script (run through a helper) in its module
        missing = [
            w.split("=", 1)[0]
            for w in words
            if w.startswith("--") and w.split("=", 1)[0] not in match.group(0)
        ]
        scripts = [Path(w).name for w in words if (REPO / w).is_file() and not w.startswith("job/")]
        missing += [s for s in scripts if s not in source]
        assert not missing, f"{test} does not run {command!r}: no {missing}"


# ------------------------------------------------------------------ running them


def _prepare_clone(root: Path, tiny_model_dir: Path, demo_root: Path) -> None:
    """The tracked files, plus what `make demo` and the docs' examples assume (docstring)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, out.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-blip2")
    shutil.copytree(demo_root, root / "data" / "demo")
    scans = sorted((root / "data" / "demo" / "Fetal Ultrasound" / "Femur").iterdir())[:2]
    shutil.copy2(scans[0], root / "scan.png")
    (root / "scans").mkdir()
    for scan in scans:
        shutil.copy2(scan, root / "scans" / scan.name)


@dataclass
class Clone:
    root: Path
    passed: set[str]  # commands that already ran here and exited 0 (a doc repeating one)


@pytest.fixture(scope="module")
def clone(tmp_path_factory, tiny_model_dir, demo_root) -> Clone:
    root = tmp_path_factory.mktemp("fresh clone")
    _prepare_clone(root, tiny_model_dir, demo_root)
    result = run_command("fada-batch train --job job/full.yaml --category Femur", root)
    assert result.code == 0, result.output
    return Clone(root, set())


@dataclass
class Result:
    code: int | None
    output: str
    seconds: float


def with_substitutions(words: list[str]) -> list[str]:
    """`fada-batch SUB ...` with PRODUCTION's overrides for its job inserted after `--job FILE`."""
    if "--job" not in words:
        return words
    i = words.index("--job") + 2
    job = words[i - 1]
    assert job in PRODUCTION, f"{job}: add how it runs here to PRODUCTION"
    return words[:i] + [x for p in PRODUCTION[job] for x in ("-p", p)] + words[i:]


def run_command(command: str, root: Path, *, timeout_s: int = 600) -> Result:
    """Run one command in `root`: `fada-batch` in this process, anything else under bash."""
    command = " ".join(re.sub(r"\[[^\]]*\]", " ", command).split())  # [optional] parts out
    t0 = time.monotonic()
    if command.startswith("fada-batch "):
        argv = with_substitutions(shlex.split(command)[1:])
        out = io.StringIO()
        with contextlib.chdir(root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
        return Result(code, out.getvalue(), time.monotonic() - t0)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    try:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        return Result(None, f"timed out after {timeout_s} s: {e.stdout or ''}{e.stderr or ''}", timeout_s)
    return Result(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0)


def run_documented(doc: str, clone: Clone, *, slurm: bool) -> None:
    """Run the doc's RUN commands (those needing SLURM, or the others) in order, each once per
    clone; fail with all that did not exit 0, each with its output's tail."""
    failures = []
    for c in extract_commands(doc):
        how = RUN.get(c.text)
        if how is None or how.slurm != slurm or (how.command or c.text) in clone.passed:
            continue
        command = how.command or c.text
        result = run_command(command, clone.root, timeout_s=how.timeout_s)
        print(f"{doc}:{c.line}: exit {result.code} in {result.seconds:.1f} s: {command}")
        if result.code == 0:
            clone.passed.add(command)
        else:
            tail = "\n".join(result.output.strip().splitlines()[-15:])
            failures.append(f"{doc}:{c.line}: {command}\n  exit {result.code}:\n{tail}")
    assert not failures, "\n\n".join(failures)


def docs_running(*, slurm: bool) -> list[str]:
    """The docs that hold commands RUN runs (with SLURM, or without)."""
    return [
        doc
        for doc in tracked_docs()
        if any(c.text in RUN and RUN[c.text].slurm == slurm for c in extract_commands(doc))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("doc", docs_running(slurm=False))
def test_documented_commands_run(doc, clone):
    run_documented(doc, clone, slurm=False)


@pytest.mark.slurm
@pytest.mark.parametrize("doc", docs_running(slurm=True))
def test_documented_slurm_commands_run_against_the_local_cluster(doc, slurm_conf, clone):
    run_documented(doc, clone, slurm=True)
