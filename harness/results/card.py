"""The model card (``README.md``) that ``harness run --save-model`` writes beside the saved checkpoint: what
was unlearned from which model, how, and what it scores. Its metadata header is huggingface_hub's
``ModelCardData``, so the hub indexes the base model and tags."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from harness import __version__
from harness.io import write_text
from harness.metrics import ARROWS
from harness.results.tables import Sheet, console_value, to_markdown


def _hub_id(start: str) -> str | None:
    """The base model as the hub knows it (``base_model`` must be a hub id, not a local path)."""
    if not start or start.startswith(("tiny:", "/", ".")) or Path(start).exists() or start.count("/") != 1:
        return None
    return start


def _table(rows: list[list[str]], header: list[str]) -> str:
    return to_markdown(Sheet(header, rows))


def model_card(scores: dict, config: dict, *, command: list[str] | None = None, repo_id: str | None = None) -> str:
    """The card's text: metadata header, base model, task, method and hyper-parameters, training settings,
    the scores table with better-direction arrows, harness version and the command line."""
    from huggingface_hub import ModelCardData

    task = config.get("task", {}).get("task") or scores.get("task", "?")
    model = config.get("model", {})
    method = config.get("method", {})
    start = model.get("start") or scores.get("model", "?")
    base = _hub_id(start)
    tags = ["unlearning", "unlearn-harness", f"task:{task}", f"method:{method.get('name', '?')}"]
    data = ModelCardData(library_name="transformers", base_model=base, tags=tags)
    title = repo_id or f"{scores.get('model', 'model')} unlearned on {task} with {method.get('name', '?')}"
    cmd = shlex.join(["harness", *(command if command is not None else sys.argv[1:])])
    metrics = scores.get("metrics", {})
    top = [n for n, m in metrics.items() if m.get("top_level")] or list(metrics)
    score_rows = [[n, console_value(metrics[n].get("value")), ARROWS.get(metrics[n].get("better") or "", "")]
                  for n in top]
    params = [[k, f"`{v}`"] for k, v in (method.get("params") or {}).items()]
    training = [[k, f"`{v}`"] for k, v in (config.get("training") or {}).items()]
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title}", "",
        f"An unlearned model: the method **{method.get('name', '?')}** made **{start}** forget the forget set of the "
        f"task **{task}**. Written by unlearn-harness {__version__}.", "",
        "## Model", "",
        f"- base model: `{start}`" + (f" ([hub](https://huggingface.co/{base}))" if base else ""),
        f"- model profile / label: `{model.get('profile') or scores.get('model', '')}`",
        f"- reference (retain) model or log: `{model.get('reference')}`",
        f"- task: `{task}` (version {config.get('task', {}).get('version', scores.get('task_version'))})",
        f"- seed: `{scores.get('seed', config.get('seed'))}`", "",
        f"## Method: {method.get('name', '?')}", "",
        _table(params, ["hyper-parameter", "value"]) if params else "(no hyper-parameters)", "",
        "## Training", "",
        _table(training, ["setting", "value"]) if training else "(not recorded)", "",
        "## Scores", "",
        (f"Partial run (`--limit {config.get('limit')}`): not comparable with full runs." if scores.get("partial")
         else f"Scored on the full {task} evaluation splits."), "",
        _table(score_rows, ["metric", "value", "better"]), "",
        "All metrics (dependencies included) are in the run's `scores.json` (under `results/` in a pushed "
        "repository); `results_*.json` holds them in lm-evaluation-harness's results layout.", "",
        "## Reproduce", "",
        f"unlearn-harness {__version__}:", "",
        "```bash", cmd, "```", "",
    ]
    return "\n".join(lines)


def write_model_card(model_dir: Path, scores: dict, config: dict, *, repo_id: str | None = None) -> Path:
    path = Path(model_dir) / "README.md"
    write_text(path, model_card(scores, config, repo_id=repo_id))
    return path
