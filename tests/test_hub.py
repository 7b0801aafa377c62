"""--push_to_hub: the repo is checked before training, each pipeline save is uploaded in the background.

No test touches the network: FakeHfApi stands in for huggingface_hub.HfApi and records what would be sent;
the unreachable-Hub tests talk to a socket on this machine.
"""

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import RepoUrl

from ddpm import hub
from oracle import single_thread  # noqa: F401  (autouse fixture)
from test_train import image_folder, tiny_args, train

PIPELINE = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"]


class FakeHfApi:
    """huggingface_hub.HfApi as far as ddpm.hub uses it: records repos and the files each upload sends."""

    endpoint = "https://hub.invalid"

    def __init__(self, public_repos=(), failing_uploads=(), upload_seconds=0.0):
        self.repos = {repo_id: False for repo_id in public_repos}  # repo_id -> private
        self.failing_uploads, self.upload_seconds = set(failing_uploads), upload_seconds
        self.uploads = []  # (repo_id, commit message, {path in repo: bytes})
        self.attempts = 0
        self.gate = threading.Event()  # cleared: uploads wait
        self.gate.set()
        self.pool = ThreadPoolExecutor(1)

    def whoami(self, token=None):
        if token != "hf_valid":
            raise OSError("Invalid user token.")
        return {"name": "someone"}

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False):
        if repo_id.startswith("google/"):
            raise OSError("403 Forbidden: You don't have the rights to create a model under the namespace 'google'.")
        self.repos.setdefault(repo_id, bool(private))
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def repo_info(self, repo_id, token=None):
        return SimpleNamespace(private=self.repos[repo_id])

    def run_as_future(self, fn, *args):
        return self.pool.submit(fn, *args)

    def upload_folder(self, repo_id, folder_path, token=None, commit_message=None):
        self.gate.wait()
        time.sleep(self.upload_seconds)
        self.attempts += 1
        if self.attempts in self.failing_uploads:
            raise OSError("503 Server Error: Service Unavailable for url: https://hub.invalid/api/commit")
        files = {path.relative_to(folder_path).as_posix(): path.read_bytes()
                 for path in Path(folder_path).rglob("*") if path.is_file()}
        self.uploads.append((repo_id, commit_message, files))


@pytest.fixture
def fake_hub(monkeypatch):
    """A logged-in user with network: hub.HfApi() returns this FakeHfApi."""
    fake = FakeHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda: fake)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_valid")
    monkeypatch.setattr(hub, "unreachable_reason", lambda endpoint: None)
    return fake


def output_folder(path: Path) -> Path:
    """What a run leaves in output_dir: the pipeline, its card, grids, checkpoints, logs, a stale temporary file."""
    for name in [*PIPELINE, "README.md", "samples/0001.png", "samples/0002.png", "checkpoint-5/model.safetensors",
                 "checkpoint-5/optimizer.bin", "abandoned-checkpoint-9/model.safetensors",
                 "logs/events.out.tfevents.1", "unet/.diffusion_pytorch_model.safetensors.tmp-123"]:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(name.encode())
    return path


def connect(path: Path, fake: FakeHfApi, repo_id: str | None = None, private: bool = False) -> hub.HubRepo:
    return hub.connect(path, repo_id, None, private, api=fake)


def files_in(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# -----------------------------------------------------------------------------
# Before training: the token and the repo


@pytest.mark.parametrize("repo_id, expected", [(None, "someone/out"), ("shapes", "someone/shapes"),
                                               ("team/shapes", "team/shapes")])
def test_the_repo_is_named_after_the_output_folder_under_the_users_name_by_default(
        tmp_path, fake_hub, repo_id, expected):
    repo = connect(tmp_path / "out", fake_hub, repo_id)
    assert repo.repo_id == expected and repo.url == f"https://hub.invalid/{expected}"
    assert fake_hub.repos == {expected: False}


def test_a_private_repo_is_created_private(tmp_path, fake_hub):
    connect(tmp_path / "out", fake_hub, private=True)
    assert fake_hub.repos == {"someone/out": True}


def test_an_existing_public_repo_is_refused_when_a_private_one_was_asked_for(tmp_path, fake_hub):
    fake_hub.repos["someone/out"] = False
    with pytest.raises(hub.HubError, match="'someone/out' exists and is public, but --hub_private_repo"):
        connect(tmp_path / "out", fake_hub, private=True)


def test_a_repo_the_hub_refuses_is_an_error_with_the_hubs_reason(tmp_path, fake_hub):
    with pytest.raises(hub.HubError, match="cannot create Hub repo 'google/shapes': 403 Forbidden: You don't have"):
        connect(tmp_path / "out", fake_hub, "google/shapes")


def test_a_refused_token_is_an_error(tmp_path, fake_hub):
    with pytest.raises(hub.HubError, match="the Hugging Face Hub refused the token: Invalid user token."):
        hub.connect(tmp_path, None, "hf_expired", False, api=fake_hub)


def test_no_token_is_an_error_saying_how_to_log_in(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(hub.HubError, match="run `hf auth login`, set HF_TOKEN, or pass --hub_token"):
        connect(tmp_path, fake_hub)


def test_offline_mode_is_an_error_before_any_request(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        connect(tmp_path, fake_hub)
    assert fake_hub.repos == {}


@pytest.fixture
def local_endpoint(monkeypatch):
    """(Hub URL, api) for a server on this machine; the real reachability check runs against it."""
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_valid")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))

    def api_at(listening: bool) -> FakeHfApi:
        if listening:
            server.listen(8)  # connections are queued and never answered, as behind a firewall that drops replies
        fake = FakeHfApi()
        fake.endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        return fake

    yield api_at
    server.close()


def test_a_refused_connection_fails_at_once(tmp_path, local_endpoint):
    fake = local_endpoint(listening=False)
    start = time.perf_counter()
    with pytest.raises(hub.HubError, match=f"cannot reach the Hugging Face Hub at {fake.endpoint} \\(offline\\?\\): "):
        connect(tmp_path, fake)
    assert time.perf_counter() - start < 2
    assert fake.repos == {}


def test_a_hub_that_never_answers_fails_after_the_reach_timeout(tmp_path, local_endpoint, monkeypatch):
    monkeypatch.setattr(hub, "REACH_TIMEOUT_S", 0.5)
    fake = local_endpoint(listening=True)
    start = time.perf_counter()
    with pytest.raises(hub.HubError, match="cannot reach the Hugging Face Hub"):
        connect(tmp_path, fake)
    assert 0.5 <= time.perf_counter() - start < 3


# -----------------------------------------------------------------------------
# Uploads


def test_an_upload_sends_the_pipeline_card_and_grids_and_never_checkpoints_or_logs(tmp_path, fake_hub):
    out = output_folder(tmp_path / "out")
    repo = connect(out, fake_hub)
    repo.push(5)
    repo.wait()
    [(repo_id, message, files)] = fake_hub.uploads
    assert (repo_id, message) == ("someone/out", "Step 5: pipeline, model card and sample grids")
    assert sorted(files) == sorted([*PIPELINE, "README.md", "samples/0001.png", "samples/0002.png"])
    assert all(files[name] == name.encode() for name in files)


def test_an_upload_leaves_the_local_files_as_they_were(tmp_path, fake_hub):
    out = output_folder(tmp_path / "out")
    before = files_in(out)
    repo = connect(out, fake_hub)
    repo.push(5)
    repo.wait()
    assert files_in(out) == before  # and its snapshot folder is gone


def test_an_upload_sends_its_saves_files_even_when_the_next_save_replaces_them_first(tmp_path, fake_hub):
    out = output_folder(tmp_path / "out")
    repo = connect(out, fake_hub)
    fake_hub.gate.clear()  # the upload has not started when the next save comes
    repo.push(5)
    weights = out / PIPELINE[-1]
    (out / "new-weights").write_bytes(b"the weights of step 10")
    os.replace(out / "new-weights", weights)  # as save_pipeline writes
    fake_hub.gate.set()
    repo.wait()
    [(_, _, files)] = fake_hub.uploads
    assert files[PIPELINE[-1]] == PIPELINE[-1].encode()


def test_an_upload_sends_its_saves_grid_even_when_the_grid_is_rewritten_in_place_first(tmp_path, fake_hub):
    out = output_folder(tmp_path / "out")
    repo = connect(out, fake_hub)
    fake_hub.gate.clear()
    repo.push(5)
    (out / "samples" / "0002.png").write_bytes(b"the grid of step 6")  # save_image rewrites the file it opens
    fake_hub.gate.set()
    repo.wait()
    [(_, _, files)] = fake_hub.uploads
    assert files["samples/0002.png"] == b"samples/0002.png"


def test_a_failed_upload_prints_one_warning_with_the_reason_and_keeps_the_local_files(tmp_path, fake_hub, capsys):
    out = output_folder(tmp_path / "out")
    before = files_in(out)
    fake_hub.failing_uploads = {1}
    repo = connect(out, fake_hub)
    repo.push(5)
    repo.wait()
    assert [line for line in capsys.readouterr().out.splitlines() if "upload of" in line] == [
        "warning: the upload of step 5 to https://hub.invalid/someone/out failed, training goes on and the local "
        "files are kept: 503 Server Error: Service Unavailable for url: https://hub.invalid/api/commit"]
    assert files_in(out) == before and fake_hub.uploads == []


# -----------------------------------------------------------------------------
# train.py --push_to_hub


def push_run(tmp_path: Path, **options) -> Path:
    """4 steps on 8 images in batches of 4: pipeline saves (and uploads) at the end of epochs 1 and 2."""
    train.main(tiny_args(tmp_path, train_data_dir=image_folder(tmp_path / "images", 8), max_train_steps=4,
                         save_model_epochs=1, save_images_epochs=1, checkpointing_steps=1, push_to_hub=True,
                         **options))
    return tmp_path / "out"


def test_train_uploads_each_pipeline_save_without_checkpoints_and_waits_for_the_last(tmp_path, fake_hub, capsys):
    fake_hub.upload_seconds = 0.5
    out = push_run(tmp_path, hub_model_id="shapes")
    assert [(repo_id, message) for repo_id, message, _ in fake_hub.uploads] == [
        ("someone/shapes", "Step 2: pipeline, model card and sample grids"),
        ("someone/shapes", "Step 4: pipeline, model card and sample grids")]
    first, last = (files for _, _, files in fake_hub.uploads)
    assert sorted(first) == sorted([*PIPELINE, "README.md", "samples/0001.png"])
    assert sorted(last) == sorted([*PIPELINE, "README.md", "samples/0001.png", "samples/0002.png"])
    assert b'DDPMPipeline.from_pretrained("someone/shapes")' in last["README.md"]
    assert last["unet/diffusion_pytorch_model.safetensors"] == (out / PIPELINE[-1]).read_bytes()
    log = capsys.readouterr().out
    assert "pushing each pipeline save to https://hub.invalid/someone/shapes" in log
    assert log.count("uploaded step") == 2
    assert not list(out.glob(".hub-upload-*"))


def test_train_goes_on_when_an_upload_fails_and_keeps_every_local_file(tmp_path, fake_hub, capsys):
    fake_hub.failing_uploads = {1}
    out = push_run(tmp_path)
    log = capsys.readouterr().out
    assert [line for line in log.splitlines() if "warning: the upload" in line] == [
        "warning: the upload of step 2 to https://hub.invalid/someone/out failed, training goes on and the local "
        "files are kept: 503 Server Error: Service Unavailable for url: https://hub.invalid/api/commit"]
    assert [message for _, message, _ in fake_hub.uploads] == ["Step 4: pipeline, model card and sample grids"]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == [f"checkpoint-{step}" for step in range(1, 5)]
    assert all((out / name).is_file() for name in [*PIPELINE, "README.md", "samples/0001.png", "samples/0002.png"])


@pytest.mark.parametrize("case", ["no_token", "offline", "unreachable", "refused_repo"])
def test_train_that_cannot_push_stops_with_one_line_before_writing_anything(case, tmp_path, fake_hub, monkeypatch):
    options, expected = {}, {
        "no_token": "--push_to_hub needs a Hugging Face token",
        "offline": "--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set",
        "unreachable": "cannot reach the Hugging Face Hub at https://hub.invalid (offline?): "
                       "[Errno -2] Name or service not known",
        "refused_repo": "cannot create Hub repo 'google/shapes': 403 Forbidden",
    }[case]
    if case == "no_token":
        monkeypatch.setattr(hub, "get_token", lambda: None)
    elif case == "offline":
        monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    elif case == "unreachable":
        monkeypatch.setattr(hub, "unreachable_reason", lambda endpoint: "[Errno -2] Name or service not known")
    else:
        options["hub_model_id"] = "google/shapes"
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(tmp_path, push_to_hub=True, **options))
    assert len(str(stopped.value.code).splitlines()) == 1
    assert str(stopped.value.code).startswith(f"train.py: error: {expected}")
    assert not (tmp_path / "out").exists()


def test_the_hub_token_is_not_stored_in_checkpoints(tmp_path, fake_hub):
    out = push_run(tmp_path, hub_token="hf_valid")
    assert b"hf_valid" not in b"".join(path.read_bytes() for path in out.rglob("*") if path.is_file())


def test_a_rank_other_than_0_never_talks_to_the_hub(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setattr(train.distributed, "setup", lambda device, timeout: train.distributed.Context(
        rank=1, local_rank=1, world_size=2, device=torch.device("cpu")))
    monkeypatch.setattr(hub, "get_token", lambda: None)  # rank 0 would stop here
    with pytest.raises(SystemExit) as stopped:  # stopped by the data, which comes after the Hub
        train.main(tiny_args(tmp_path, push_to_hub=True, train_data_dir=tmp_path / "nowhere"))
    assert "nowhere' is not a folder" in str(stopped.value.code)
    assert fake_hub.repos == {}
