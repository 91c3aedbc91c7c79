"""`seedlm push OUT_DIR REPO_ID`: upload an exported folder to the Hugging Face Hub.

The token comes from HF_TOKEN or the login cache that `hf auth login` writes; it is passed to huggingface_hub
and never printed or logged. --dry-run lists what would be uploaded and contacts nobody.
"""

from __future__ import annotations

from pathlib import Path


class PushError(ValueError):
    """The folder or the request is not pushable; the message says why."""


def files_to_upload(folder: Path) -> list[tuple[str, int]]:
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} has no config.json: push a folder made by `seedlm export`")
    if not any(folder.glob("*.safetensors")):
        raise PushError(f"{folder} has no *.safetensors weights: push a folder made by `seedlm export`")
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def push_folder(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                dry_run: bool = False, commit_message: str | None = None) -> str:
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"repo id {repo_id!r} must look like OWNER/NAME")
    files = files_to_upload(folder)
    if dry_run:
        total = sum(size for _, size in files)
        lines = [f"would upload {len(files)} files ({total / 2**20:.1f} MiB) from {folder} to {repo_id}"
                 f"{'@' + revision if revision else ''} ({'private' if private else 'public'}):"]
        lines += [f"  {name}  {size:,} bytes" for name, size in files]
        lines.append("token: " + ("found (HF_TOKEN or login cache)" if get_token()
                                  else "none found: set HF_TOKEN or run `hf auth login`"))
        return "\n".join(lines)
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (huggingface_hub's CLI), "
                        "then push again")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                             commit_message=commit_message or f"Upload {folder.name} with seedlm")
    return f"pushed {len(files)} files to {info.commit_url if hasattr(info, 'commit_url') else repo_id}"
