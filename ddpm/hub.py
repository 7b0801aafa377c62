"""Pushing a run to the Hugging Face Hub (--push_to_hub): huggingface_hub does the work.

Before training, the token is checked and the repo created, so a run that cannot push stops at once. Each pipeline
save is then uploaded in the background: the pipeline folder, its model card and the sample grids, never
checkpoints. A failed upload is reported and training goes on; the local files are never touched.
"""

import os
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import filter_repo_objects, get_session
from tqdm.auto import tqdm

# What an upload sends, as paths relative to output_dir (patterns as upload_folder's allow_patterns)
UPLOADED = ["model_index.json", "scheduler/*", "unet/*", "class_labels.json", "README.md", "samples/*.png"]
# Hidden files are the temporary files of an interrupted save
NOT_UPLOADED = ["*/.*"]
# Without network a request can hang (the Hub client sets no timeout); one quick request tells us first
REACH_TIMEOUT_S = 5.0


class HubError(RuntimeError):
    """The Hub cannot be used for this run: the message says why and what to do."""


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def unreachable_reason(endpoint: str) -> str | None:
    """Why the Hub at `endpoint` cannot be reached within REACH_TIMEOUT_S seconds, or None if it answers."""
    try:
        get_session().head(endpoint, timeout=REACH_TIMEOUT_S)
    except Exception as error:  # whatever the failure (DNS, refused, timeout, proxy), the Hub is out of reach
        return first_line(error)
    return None


def hard_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        return False
    return True


class HubRepo:
    """A Hub model repo that the pipeline saves of one run are pushed to, one upload after another."""

    def __init__(self, api: HfApi, repo_id: str, url: str, token: str, output_dir: Path):
        self.api, self.repo_id, self.url, self.token, self.output_dir = api, repo_id, url, token, output_dir
        self.last_upload: Future | None = None

    def push(self, step: int) -> None:
        """Upload the pipeline folder, model card and sample grids as they are now, in the background."""
        found = (path.relative_to(self.output_dir).as_posix() for path in self.output_dir.rglob("*") if path.is_file())
        names = list(filter_repo_objects(found, allow_patterns=UPLOADED, ignore_patterns=NOT_UPLOADED))
        # The upload reads a snapshot, not the files a later save may rewrite: hard links for the pipeline and the
        # card, which each save replaces by renaming a new file into place (no copy of the weights), and copies of
        # the grids, which a final save may rewrite in place
        snapshot = Path(tempfile.mkdtemp(prefix=f".hub-upload-{step}-", dir=self.output_dir))
        for name in names:
            source, target = self.output_dir / name, snapshot / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.startswith("samples/") or not hard_link(source, target):
                shutil.copy2(source, target)
        # HfApi runs its background jobs one at a time, in order
        self.last_upload = self.api.run_as_future(self._upload, snapshot, step)

    def _upload(self, snapshot: Path, step: int) -> bool:
        try:
            self.api.upload_folder(repo_id=self.repo_id, folder_path=snapshot, token=self.token,
                                   commit_message=f"Step {step}: pipeline, model card and sample grids")
            tqdm.write(f"uploaded step {step} to {self.url}")
            return True
        except Exception as error:  # any failure: the run goes on, and the next save uploads everything again
            tqdm.write(f"warning: the upload of step {step} to {self.url} failed, training goes on and the local "
                       f"files are kept: {first_line(error)}")
            return False
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def wait(self) -> bool:
        """Return when the last upload has finished: whether it succeeded."""
        if self.last_upload is None:
            return True
        if not self.last_upload.done():
            tqdm.write(f"waiting for the last upload to {self.url} to finish")
        return self.last_upload.result()


def connect(output_dir: str | os.PathLike, repo_id: str | None, token: str | None, private: bool,
            api: HfApi | None = None) -> HubRepo:
    """Check the token and create the repo (default: the output folder's name under the token's user).

    Raises HubError, with the reason, when there is no token, the Hub cannot be reached or it refuses the repo.
    """
    output_dir = Path(output_dir)
    api = api if api is not None else HfApi()
    if constants.HF_HUB_OFFLINE:
        raise HubError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it, or train "
                       "without --push_to_hub")
    token = token or get_token()
    if token is None:
        raise HubError("--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass "
                       "--hub_token")
    reason = unreachable_reason(api.endpoint)
    if reason is not None:
        raise HubError(f"cannot reach the Hugging Face Hub at {api.endpoint} (offline?): {reason}")
    try:
        user = api.whoami(token=token)["name"]
    except Exception as error:
        raise HubError(f"the Hugging Face Hub refused the token: {first_line(error)}") from None
    repo_id = repo_id or output_dir.resolve().name
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        # create_repo leaves an existing repo as it is: a public one would receive what was meant to be private
        public = private and not api.repo_info(repo_id, token=token).private
    except Exception as error:
        raise HubError(f"cannot create Hub repo {repo_id!r}: {first_line(error)}") from None
    if public:
        raise HubError(f"Hub repo {repo_id!r} exists and is public, but --hub_private_repo was asked for; make it "
                       "private on the Hub, or choose another --hub_model_id")
    for stale in output_dir.glob(".hub-upload-*"):  # snapshots of a run killed while uploading
        shutil.rmtree(stale, ignore_errors=True)
    return HubRepo(api, url.repo_id, str(url), token, output_dir)
