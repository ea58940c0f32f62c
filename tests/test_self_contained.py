"""Everything the project cites is in the project: no tracked file points at notes or paths
outside the repository, and every document a file links to or names exists in it.

Example cluster paths such as `/shared/models/blip2-opt-2.7b` in a job file or a help text are
absolute paths on a user's cluster, not citations, and are allowed; a path into a relative
"shared" folder (the team's private notes), a developer machine's home or work folder, or a
team notes file is not. This file spells such paths only in pieces, so it is scanned too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What a citation of something outside the repository looks like.
OUTSIDE = {
    "a path into a relative shared folder (the team's notes live outside the repository)": re.compile(
        r"(?<![\w/.~-])(?:\.\./)*shared[/](?!\s)"
    ),
    "a team notes file (a name ending in -NOTES and .md)": re.compile(r"\b[A-Z][A-Z0-9]*-NOTES[.]md\b"),
    "a developer machine's path": re.compile(r"(?<![\w.])/(?:work|root|home)[/](?=\w)"),
}
SHARED, NOTES = "shared" + "/", "-NOTES" + ".md"  # in pieces: this file holds no citation


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): cannot list the tracked files")
    return [f for f in out.split("\0") if f]


def text_of(path: str) -> str | None:
    try:
        return (REPO / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (a test fixture) or absent in this checkout


def outside_citations(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, the line) for every citation of a path outside the repository."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in OUTSIDE.items():
            if pattern.search(line):
                found.append((number, what, line.strip()))
    return found


def test_the_patterns_catch_what_they_should_and_spare_cluster_paths():
    # the citations this test was written against, each caught
    for line in (
        f"The recipe fixes the seed's bugs (see `{SHARED}BLIP2{NOTES}`): each row is",
        f"# that cap (see ../{SHARED}BLIP2{NOTES})",
        f"- More measured facts: `{SHARED}SLURM{NOTES}`.",
        f"see CONTAINER{NOTES}",
        "    bench: job bench-cpu, model " + "/work" + "/main/models/bench-blip2",
    ):
        assert outside_citations(line), line
    # example cluster paths and ordinary words are not citations
    for line in (
        "fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to /shared/models/blip2-opt-2.7b",
        "python: apptainer exec --nv --bind /shared /shared/containers/fada-batch.sif python",
        "root: /shared/fada/data     # shared storage",
        "the `/shared/...` paths; they live nowhere else",
        "logs on shared storage, next to the outputs",
        "see docs/blip2.md and slurm/testcluster/README.md",
    ):
        assert not outside_citations(line), line


def test_no_tracked_file_cites_a_path_outside_the_repository():
    problems = []
    for path in tracked_files():
        if (text := text_of(path)) is None:
            continue
        problems += [f"{path}:{n}: {what}: {line}" for n, what, line in outside_citations(text)]
    assert not problems, (
        "tracked files cite paths outside the repository; put what they need into docs/ and "
        "cite that instead:\n" + "\n".join(problems)
    )


LINK = re.compile(r"\]\(([^)\s]+)\)")
# a document of the repository named in any file: docs/<name>.md or <folder>/README.md
DOC_NAME = re.compile(r"(?<![\w/.-])(docs/[\w-]+\.md|(?:[\w-]+/)+README\.md)\b")


def test_every_linked_or_named_document_exists_in_the_repository():
    """Markdown links between the repository's files, and the documents (`docs/<name>.md`,
    `<folder>/README.md`) that code, comments and docs name, all resolve to tracked files."""
    files = set(tracked_files())
    missing = []
    for path in files:
        if (text := text_of(path)) is None:
            continue
        here = (REPO / path).parent
        targets = []
        if path.endswith(".md"):
            for target in LINK.findall(text):
                target = target.split("#", 1)[0]
                if target and not re.match(r"^[a-z]+:", target):  # not http:, mailto: ...
                    targets.append(((here / target).resolve(), target))
        for name in DOC_NAME.findall(text):  # from the root, or from the naming file's folder
            from_root = (REPO / name).resolve()
            targets.append((from_root if from_root.is_file() else (here / name).resolve(), name))
        for resolved, target in targets:
            try:
                rel = resolved.relative_to(REPO).as_posix()
            except ValueError:
                missing.append(f"{path}: {target} points outside the repository")
                continue
            if rel not in files and not any(f.startswith(rel + "/") for f in files):
                missing.append(f"{path}: {target} is not a file of the repository")
    assert not missing, "\n".join(sorted(missing))
