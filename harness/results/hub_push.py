"""``harness run --push-to-hub REPO_ID``: the saved model, its card and the run's result files go to the
Hugging Face hub in one commit through ``huggingface_hub``. Everything that can make the upload fail
(offline, no token, a malformed or shared repository id) is checked before training starts."""

from __future__ import annotations

from pathlib import Path

from harness import HarnessError
from harness.hub import hub_available, offline_env

# Run files that travel with the model, under results/ in the repository.
RESULT_FILES = ("scores.json", "config.yaml", "train_log.jsonl", "results_*.json", "*_EVAL.json", "*_SUMMARY.json")


def repo_for(template: str, *, task: str, method: str, seed: int) -> str:
    """``REPO_ID`` with ``{task}``, ``{method}``, ``{seed}`` filled in (one repository per run of a grid)."""
    try:
        return template.format(task=task, method=method, seed=seed)
    except (KeyError, IndexError, ValueError) as exc:
        raise HarnessError(f"--push-to-hub {template!r}: only {{task}}, {{method}} and {{seed}} can be filled in "
                           f"({exc})") from None


def check_push(repo_ids: list[str], template: str) -> None:
    """Fail now, before any training, when the pushes cannot happen."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    for repo in dict.fromkeys(repo_ids):
        try:
            validate_repo_id(repo)
        except HFValidationError as exc:
            raise HarnessError(f"--push-to-hub {repo!r}: not a valid repository id ({str(exc).splitlines()[0]}); "
                               "use NAME or OWNER/NAME") from None
    if len(set(repo_ids)) < len(repo_ids):
        raise HarnessError(f"--push-to-hub {template!r}: {len(repo_ids)} runs would push to the same repository; "
                           "put {task}, {method} and/or {seed} in the id, e.g. me/{task}-{method}-s{seed}")
    if offline_env():
        raise HarnessError("--push-to-hub: offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set), so nothing "
                           "could be uploaded after training; unset it, or run without --push-to-hub and upload "
                           "the saved model later with `hf upload`")
    if not hub_available():
        raise HarnessError("--push-to-hub: the Hugging Face hub is not reachable from this machine, so nothing "
                           "could be uploaded after training; run without --push-to-hub and upload the saved "
                           "model later with `hf upload`")
    if get_token() is None:
        raise HarnessError("--push-to-hub: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN")


def push_run(repo_id: str, run_dir: Path, *, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``run_dir/model`` at the top level and the result files
    under ``results/``, in one commit. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise HarnessError(f"--push-to-hub: {model_dir} holds no saved model; rerun with --overwrite to save one")
    ops = [CommitOperationAdd(path_in_repo=f.relative_to(model_dir).as_posix(), path_or_fileobj=str(f))
           for f in sorted(model_dir.rglob("*")) if f.is_file()]
    seen: set[Path] = set()
    for pattern in RESULT_FILES:
        for f in sorted(run_dir.glob(pattern)):
            if f.is_file() and f not in seen:
                seen.add(f)
                ops.append(CommitOperationAdd(path_in_repo=f"results/{f.name}", path_or_fileobj=str(f)))
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(repo_id, operations=ops, commit_message=f"unlearn-harness: {run_dir.as_posix()}",
                             repo_type="model")
    return str(getattr(info, "commit_url", info))
