"""`fada-batch stage-model`: copy or download a model, verify it loads, report the folder.

The saved tiny BLIP-2 stands in for Salesforce/blip2-opt-2.7b: as a local folder, and served
by a small fake hub on 127.0.0.1 (the real download path of huggingface_hub, no internet).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from fada_batch.cli import main
from fada_batch.tools.stage import MARKER_NAME, STAGING_SUFFIX, StageError, stage_model

REPO = Path(__file__).resolve().parent.parent


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders stage-model may have left next to its target."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name) if parent.is_dir() else []


def _cli(args: list[str], *, env: dict[str, str] | None = None, drop_root: bool = False):
    """Run `python -m fada_batch ARGS` in a fresh process (huggingface_hub reads HF_* at import).

    drop_root: as root, drop CAP_DAC_OVERRIDE so file permissions apply as to anyone else.
    """
    cmd = [sys.executable, "-m", "fada_batch", *args]
    if drop_root and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux setpriv is missing: permissions cannot apply")
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, "--bounding-set", caps, "--inh-caps", caps, *cmd]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=300)


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model to damage."""
    dst = tmp_path / "source model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


# --- the verify-and-report path ------------------------------------------------------------


def test_stage_from_a_local_folder_verifies_and_prints_name_or_path(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    target = tmp_path / "shared models" / "it's blip2"
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the stand-in needs no network
    assert main(["stage-model", "--model", str(tiny_model_dir), "--to", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"    name_or_path: {target}\n" in out
    assert f"-p model.name_or_path={target}" in out
    assert "verified: config (BLIP-2, 4 query tokens)" in out
    assert "123 weight tensors in 1 file" in out
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (target / name).is_file(), name
    marker = json.loads((target / MARKER_NAME).read_text())
    assert marker["source"] == str(tiny_model_dir.absolute())
    assert marker["revision"] is None
    assert marker["files"]["model.safetensors"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert _leftovers(target.parent) == []
    # Files are readable by the group whatever the source's modes (the tiny model's are 0600).
    assert (target / "model.safetensors").stat().st_mode & 0o044 == 0o044 & ~_umask()

    # What the compute node will do with it: load model + processor, offline.
    from fada_batch.training.model import load_base_model

    loaded = load_base_model(str(target), device="cpu")
    assert loaded.processor.num_query_tokens == loaded.model.config.num_query_tokens


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_full_load_loads_every_weight(tiny_model_dir: Path, tmp_path: Path):
    result = stage_model(str(tiny_model_dir), tmp_path / "m", full_load=True)
    assert result.verification.full_load and not result.reused


def test_stage_again_reuses_force_replaces(tiny_model_dir: Path, tmp_path: Path, capsys):
    target = tmp_path / "m"
    first = stage_model(str(tiny_model_dir), target)
    stamp = (target / MARKER_NAME).read_text()
    again = stage_model(str(tiny_model_dir), target)
    assert again.reused and (target / MARKER_NAME).read_text() == stamp
    assert main(["stage-model", "--model", str(tiny_model_dir), "--to", str(target)]) == 0
    assert "already staged" in capsys.readouterr().out
    forced = stage_model(str(tiny_model_dir), target, force=True)
    assert not forced.reused and forced.files == first.files
    assert _leftovers(tmp_path) == []


def test_a_folder_not_staged_here_is_not_replaced(tiny_model_dir: Path, tmp_path: Path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(StageError, match=r"was not staged by fada-batch .* --force"):
        stage_model(str(tiny_model_dir), target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_a_folder_staged_from_another_model_is_not_replaced(
    tiny_model_dir: Path, model_copy: Path, tmp_path: Path
):
    target = tmp_path / "m"
    stage_model(str(tiny_model_dir), target)
    with pytest.raises(StageError, match=r"already holds .* not .*source model.* --force"):
        stage_model(str(model_copy), target)


def test_an_empty_target_folder_is_used(tiny_model_dir: Path, tmp_path: Path):
    target = tmp_path / "m"
    target.mkdir()
    assert stage_model(str(tiny_model_dir), target).path == target
    assert (target / MARKER_NAME).is_file()


# --- clear errors ----------------------------------------------------------------------------


def test_unwritable_target_names_the_folder_and_the_fix(tiny_model_dir: Path, tmp_path: Path):
    shared = tmp_path / "read only"
    shared.mkdir()
    shared.chmod(0o555)
    target = shared / "models" / "blip2"
    try:
        r = _cli(["stage-model", "--model", str(tiny_model_dir), "--to", str(target)], drop_root=True)
    finally:
        shared.chmod(0o755)
    assert r.returncode == 1, r.stderr
    err = r.stderr
    assert f"error: cannot write the model folder {target}: Permission denied" in err
    assert f"{shared} belongs to uid {os.geteuid()}, mode 555" in err
    assert "Pass --to a folder you can write" in err and f"chmod g+w {shared}" in err
    assert "Traceback" not in err
    assert list(shared.iterdir()) == []  # nothing half-made


def test_target_under_a_file_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path):
    (tmp_path / "a file").write_text("x")
    target = tmp_path / "a file" / "blip2"
    with pytest.raises(StageError, match=r"a file, not a folder"):
        stage_model(str(tiny_model_dir), target)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1000)


def _drop_tensor(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = "language_model.model.decoder.layers.0.fc1.weight"
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    return name


def _set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


INCOMPLETE = {
    "no weights": (lambda d: (d / "model.safetensors").unlink(), r"lacks model weights \(\*\.safetensors\)"),
    "no tokenizer": (
        lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        r"lacks tokenizer files",
    ),
    "no processor config": (
        lambda d: (d / "processor_config.json").unlink(),
        r"lacks preprocessor_config.json / processor_config.json",
    ),
    "truncated weights": (
        lambda d: _truncate(d / "model.safetensors"),
        r"model.safetensors is damaged or truncated",
    ),
    "a weight missing": (
        _drop_tensor,
        r"1 weight missing from the checkpoint: language_model.model.decoder.layers.0.fc1.weight",
    ),
    "processor does not match model": (
        lambda d: _set_json(d / "processor_config.json", num_query_tokens=8),
        r"processor num_query_tokens 8 != model config 4",
    ),
}


@pytest.mark.parametrize("damage", list(INCOMPLETE), ids=lambda k: k.replace(" ", "-"))
def test_incomplete_model_says_what_is_missing(damage: str, model_copy: Path, tmp_path: Path):
    do, expected = INCOMPLETE[damage]
    do(model_copy)
    target = tmp_path / "staged" / "blip2"
    with pytest.raises(StageError, match=expected) as e:
        stage_model(str(model_copy), target)
    assert str(model_copy) in str(e.value) or ".tmp-staging" in str(e.value)
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_incomplete_model_through_the_cli(model_copy: Path, tmp_path: Path, capsys):
    (model_copy / "model.safetensors").unlink()
    code = main(["stage-model", "--model", str(model_copy), "--to", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: the model folder {model_copy} is incomplete: it lacks model weights" in err
    assert "Stage from a complete folder, or from the hub id on a machine with internet" in err


def test_missing_shard_is_named(tiny_model_dir: Path, tmp_path: Path):
    from transformers import Blip2ForConditionalGeneration

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    model.save_pretrained(sharded, max_shard_size="1MB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").is_file()
    assert stage_model(str(sharded), tmp_path / "ok").verification.weight_files == shards
    (sharded / shards[-1]).unlink()
    with pytest.raises(
        StageError, match=rf"lacks weight files named in model.safetensors.index.json: {shards[-1]}"
    ):
        stage_model(str(sharded), tmp_path / "m")


def test_hub_id_with_hf_hub_offline_says_how_to_stage(tmp_path: Path):
    r = _cli(["stage-model", "--model", "Salesforce/blip2-opt-2.7b", "--to", str(tmp_path / "m")])
    assert r.returncode == 1
    assert "error: cannot download Salesforce/blip2-opt-2.7b: HF_HUB_OFFLINE=1 is set" in r.stderr
    assert (
        "docker run -e HF_HUB_OFFLINE=0" in r.stderr and "apptainer exec --env HF_HUB_OFFLINE=0" in r.stderr
    )
    assert list(tmp_path.iterdir()) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_says_to_run_where_there_is_internet(tmp_path: Path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"  # nothing listens: connection refused
    r = _cli(
        ["stage-model", "--model", "Salesforce/blip2-opt-2.7b", "--to", str(tmp_path / "m")],
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint},
    )
    assert r.returncode == 1
    assert f"error: cannot reach the hub ({endpoint}) to download Salesforce/blip2-opt-2.7b" in r.stderr
    assert "run it on a machine that has it (a login node" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_model_path_that_does_not_exist(tmp_path: Path):
    with pytest.raises(StageError, match="is not a folder"):
        stage_model(str(tmp_path / "nope"), tmp_path / "m")


# --- the hub path, against a fake hub on 127.0.0.1 -------------------------------------------


class _FakeHub:
    """Serves one repository (a folder) the way the hub's API does, for huggingface_hub."""

    def __init__(self, repo_id: str, folder: Path, extra: dict[str, bytes]) -> None:
        self.repo_id, self.sha = repo_id, "0123456789abcdef0123456789abcdef01234567"
        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.files.update(extra)
        self.requests: list[str] = []
        self.fail_downloads = False

    def info(self) -> dict:
        siblings = [
            {"rfilename": n, "size": len(b), "blobId": _oid(b)} for n, b in sorted(self.files.items())
        ]
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.sha, "siblings": siblings}

    def tree(self) -> list[dict]:
        return [
            {"type": "file", "path": n, "size": len(b), "oid": _oid(b)} for n, b in sorted(self.files.items())
        ]


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _handler(hub: _FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None, head=False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            api = f"/api/models/{hub.repo_id}"
            if path in (api, f"{api}/revision/main", f"{api}/revision/{hub.sha}"):
                return self._send(200, json.dumps(hub.info()).encode(), head=head)
            if path.startswith(f"{api}/tree/"):
                return self._send(200, json.dumps(hub.tree()).encode(), head=head)
            prefix = f"/{hub.repo_id}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix) :].split("/", 1)[1]
                if name in hub.files and not (hub.fail_downloads and name.endswith(".safetensors")):
                    data = hub.files[name]
                    headers = {"X-Repo-Commit": hub.sha, "ETag": f'"{_oid(data)}"'}
                    return self._send(200, data, headers, head=head)
            self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head=head)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Handler


@pytest.fixture()
def fake_hub(tiny_model_dir: Path) -> Iterator[tuple[_FakeHub, str]]:
    # The repository also publishes .bin weights, as blip2-opt-2.7b does: they must be skipped.
    hub = _FakeHub(
        "Salesforce/blip2-tiny", tiny_model_dir, {"pytorch_model.bin": b"not used", ".gitattributes": b""}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_download_from_the_hub_verifies_and_records_the_commit(fake_hub, tmp_path: Path):
    hub, endpoint = fake_hub
    target = tmp_path / "models" / "blip2"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf home")}
    r = _cli(["stage-model", "--model", hub.repo_id, "--to", str(target)], env=env)
    assert r.returncode == 0, r.stderr
    assert f"staged {hub.repo_id} @ {hub.sha} into {target}" in r.stdout
    assert f"    name_or_path: {target}\n" in r.stdout
    assert not (target / "pytorch_model.bin").exists() and not (target / ".gitattributes").exists()
    assert not (target / ".cache").exists()
    assert (target / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    marker = json.loads((target / MARKER_NAME).read_text())
    assert (marker["source"], marker["revision"]) == (hub.repo_id, hub.sha)
    assert _leftovers(target.parent) == []

    # Staging the same again, offline (HF_HUB_OFFLINE=1), re-checks the folder and copies nothing.
    r = _cli(["stage-model", "--model", hub.repo_id, "--to", str(target)])
    assert r.returncode == 0 and "already staged" in r.stdout, r.stderr


@pytest.mark.slow
def test_an_interrupted_download_is_resumed(fake_hub, tmp_path: Path):
    hub, endpoint = fake_hub
    target = tmp_path / "blip2"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf home")}
    hub.fail_downloads = True
    r = _cli(["stage-model", "--model", hub.repo_id, "--to", str(target)], env=env)
    assert r.returncode == 1 and "Run the same command again" in r.stderr, r.stderr
    staging = tmp_path / f".blip2{STAGING_SUFFIX}"
    assert not target.exists() and (staging / "config.json").is_file()
    hub.fail_downloads = False
    hub.requests.clear()
    r = _cli(["stage-model", "--model", hub.repo_id, "--to", str(target)], env=env)
    assert r.returncode == 0, r.stderr
    fetched = {q.rsplit("/", 1)[1] for q in hub.requests if q.startswith("GET") and "/resolve/" in q}
    assert "model.safetensors" in fetched and "config.json" not in fetched
    assert not staging.exists()


def test_unknown_repository_is_a_clear_error(fake_hub, tmp_path: Path):
    _hub, endpoint = fake_hub
    r = _cli(
        ["stage-model", "--model", "Salesforce/no-such-model", "--to", str(tmp_path / "m")],
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint},
    )
    assert r.returncode == 1
    assert "no model 'Salesforce/no-such-model' on the hub" in r.stderr
    assert list(tmp_path.iterdir()) == []


# --- old revisions -------------------------------------------------------------------------


def _make_old_revision(folder: Path) -> None:
    """What an old hub revision of a BLIP-2 repository lacks: the processor's num_query_tokens,
    config.json's image_token_index and the tokenizer's <image> token."""
    proc = json.loads((folder / "processor_config.json").read_text())
    del proc["num_query_tokens"]
    (folder / "processor_config.json").write_text(json.dumps(proc))
    config = json.loads((folder / "config.json").read_text())
    del config["image_token_index"]
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image>"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def test_an_old_revision_is_brought_up_to_date(model_copy: Path, tmp_path: Path, capsys):
    """Staged, an old revision's processor gets the query-token count and its config the
    <image> id; it then trains with image tokens. Unstaged, the Encoder names the whole fix."""
    from fada_batch.training.collate import Encoder, TokenLayoutError
    from fada_batch.training.model import load_base_model

    _make_old_revision(model_copy)
    unstaged = load_base_model(str(model_copy), device="cpu")
    cfg = unstaged.model.config
    assert unstaged.processor.num_query_tokens is None and cfg.image_token_id is None
    with pytest.raises(TokenLayoutError) as e:
        Encoder(unstaged.processor, num_query_tokens=4, image_token_id=cfg.image_token_id, eos_token_id=2)
    for part in ("has no num_query_tokens", "has no image_token_index", "fada-batch stage-model"):
        assert part in str(e.value), part

    target = tmp_path / "staged"
    assert main(["stage-model", "--model", str(model_copy), "--to", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "brought up to date (an old revision): processor num_query_tokens = 4" in printed
    assert "config.json image_token_index = 724" in printed
    assert len(json.loads((target / MARKER_NAME).read_text())["updated"]) == 2
    staged = load_base_model(str(target), device="cpu")
    cfg = staged.model.config
    assert (staged.processor.num_query_tokens, cfg.image_token_id) == (4, 724)
    enc = Encoder(staged.processor, num_query_tokens=4, image_token_id=cfg.image_token_id, eos_token_id=2)
    assert enc.prompt_ids("Question: a? Answer:")[:4] == [724] * 4


def test_an_old_revision_that_cannot_be_updated_gives_the_whole_fix(model_copy: Path, tmp_path: Path):
    _make_old_revision(model_copy)
    _set_json(model_copy / "config.json", text_config={
        **json.loads((model_copy / "config.json").read_text())["text_config"], "vocab_size": 724
    })  # fmt: skip
    with pytest.raises(StageError) as e:
        stage_model(str(model_copy), tmp_path / "staged")
    for part in ('"num_query_tokens": N', '"image_token_index"', "below text_config.vocab_size (724)"):
        assert part in str(e.value), part
    assert not (tmp_path / "staged").exists()
