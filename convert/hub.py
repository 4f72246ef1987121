"""Sources from the Hugging Face hub (or local folders), and uploads.

A source is fetched with only the files a conversion reads: configs,
tokenizer files and one kind of weights (safetensors when the repository has
them, else PyTorch `.bin`), never TensorFlow/Flax copies or training state.
huggingface-hub honours HF_HUB_OFFLINE and its local cache; offline, the
repository's list of files cannot be asked for, so whatever the cache holds
of either kind is used.
"""

from __future__ import annotations

from pathlib import Path

from mlx_llava.errors import LlavaError
from mlx_llava.weights import download, is_repo_id

SMALL_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
WEIGHTS = {"safetensors": ["*.safetensors"], "bin": ["*.bin"]}


def fetch(source, what: str = "model", weights: bool = True) -> Path:
    """A local folder as is, or a hub repository's files in the local cache.

    `what` names the source in messages ("model", "vision tower", ...);
    `weights=False` fetches configs and tokenizer files only."""
    path = Path(str(source)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LlavaError(f"{what} {path} is a file; expected a folder")
        return path
    repo = str(source)
    if not is_repo_id(repo):
        raise LlavaError(f"{what} not found: {repo} (no such folder, and not a hub repo id)")
    from huggingface_hub import constants

    patterns = list(SMALL_FILES)
    if weights:
        patterns += _weight_patterns(repo) if not constants.HF_HUB_OFFLINE else WEIGHTS["safetensors"] + WEIGHTS["bin"]
    return download(repo, patterns, what)


def _weight_patterns(repo: str) -> list:
    """Safetensors when the repository has them, else `.bin`. One request,
    never retried: with no network the answer is known at once
    (`list_repo_files` retries five times over 30 s, a warning each)."""
    from huggingface_hub import HfApi

    try:
        files = [s.rfilename for s in HfApi().model_info(repo).siblings or []]
    except Exception:  # offline in all but name, gated, ...: let snapshot_download decide
        return WEIGHTS["safetensors"] + WEIGHTS["bin"]
    return WEIGHTS["safetensors"] if any(f.endswith(".safetensors") for f in files) else WEIGHTS["bin"]


def upload(folder: Path, repo: str) -> str:
    """Upload a converted model directory to a hub repository (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # network, auth, permissions: all one line for the user
        raise LlavaError(f"upload to {repo} failed ({type(e).__name__}: {e})".splitlines()[0]) from None
    return f"https://huggingface.co/{repo}"
