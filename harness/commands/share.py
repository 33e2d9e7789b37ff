"""What a run shares beyond its directory: ``--report-to`` trackers, the model card of a saved model and
the ``--push-to-hub`` upload (checked before any training). ``cell`` is a ``harness.commands.run.Cell``."""

from __future__ import annotations

from harness.options import RunOptions, tracker_names
from harness.training.distributed import is_main_process


def open_trackers(cell, opts: RunOptions, plan: dict):
    """``--report-to``: the run's trackers, named after its directory (main process only; else None)."""
    names = tracker_names(opts.report_to)
    if not names or not is_main_process():
        return None
    from harness.training.tracking import Trackers

    return Trackers(names, run_name=cell.dir.name, log_dir=cell.dir, project=opts.tracker_project,
                    config={**cell.config, "plan": plan, "run_dir": str(cell.dir)})


def check_sharing(cells: list, opts: RunOptions) -> None:
    """``--report-to`` packages and ``--push-to-hub`` (online, token, one repository per run): checked before
    any training, so a missing package or an offline hub never surfaces after hours of work."""
    from harness.training.tracking import check_trackers

    check_trackers(tracker_names(opts.report_to))
    if opts.push_to_hub:
        from harness.results.hub_push import check_push

        check_push([hub_repo(c, opts) for c in cells], opts.push_to_hub)


def hub_repo(cell, opts: RunOptions) -> str:
    from harness.results.hub_push import repo_for

    return repo_for(opts.push_to_hub, task=cell.task.name, method=cell.method_name, seed=cell.seed)


def share_cell(cell, opts: RunOptions, scores: dict) -> None:
    """After a finished run with a saved model: its model card, then (``--push-to-hub``) the upload."""
    model_dir = cell.dir / "model"
    if not (model_dir / "config.json").is_file():
        return
    from harness.results.card import write_model_card

    repo = hub_repo(cell, opts) if opts.push_to_hub else None
    write_model_card(model_dir, scores, cell.config, repo_id=repo)
    if repo:
        from harness.results.hub_push import push_run

        url = push_run(repo, cell.dir, private=opts.private)
        print(f"pushed {cell.task.name} x {cell.method_name} x seed {cell.seed} to {repo}: {url}")
