"""Experiment tracking (``--report-to tensorboard,wandb,mlflow``) through accelerate's tracker classes.

One ``Trackers`` object spans one run (a cell): the resolved config goes in at the start, every
``train_log.jsonl`` row goes in as it is written (loss parts, grad norm, lr, and any scores logged during
training), the final scores at the end. Only the main process builds one; the other ranks get ``None``.
accelerate's ``Accelerator(log_with=...)`` would tie the trackers to the accelerator of the training loop,
which is released before scoring; the tracker classes themselves have the same behaviour and outlive it.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from harness import HarnessError

DEFAULT_PROJECT = "unlearn-harness"
# accelerate's tracker name -> the module it imports and the package to install for it.
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
IN_EXTRA = ("tensorboard", "wandb", "mlflow")  # what `pip install unlearn-harness[tracking]` brings


def supported() -> list[str]:
    """Tracker names accelerate knows (those ``--report-to`` takes)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(names: list[str]) -> None:
    """Fail before any training when a name is unknown or its package is missing (one line, naming it)."""
    from harness.tasks import suggest

    known = supported()
    for name in names:
        if name not in known:
            raise HarnessError(f"--report-to {name!r}: unknown tracker{suggest(name, known)}; "
                               f"accelerate supports {', '.join(known)}")
        module, package = PACKAGES.get(name, (name, name))
        if importlib.util.find_spec(module) is None:
            extra = " (or pip install 'unlearn-harness[tracking]')" if name in IN_EXTRA else ""
            raise HarnessError(f"--report-to {name}: the '{package}' package is not installed; "
                               f"pip install {package}{extra}")


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"a.b": value}`` with scalar values (what TensorBoard hparams and MLflow accept)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value if value is not None else "None"
        else:
            out[name] = str(value)
        if isinstance(out.get(name), str) and len(out[name]) > 250:  # MLflow refuses params over 500 characters
            out[name] = out[name][:247] + "..."
    return out


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a log row under ``prefix/`` (the step counter itself is the x axis)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Trackers:
    """The trackers of one run, named ``run_name`` (the run directory's name) in ``project``.

    TensorBoard writes to ``<log_dir>/tensorboard/<run_name>/``, W&B its run directory under
    ``<log_dir>/wandb/`` (``WANDB_MODE=offline`` works without network); MLflow follows
    ``MLFLOW_TRACKING_URI`` (unset: mlflow's default store, ``./mlflow.db`` with mlflow 3) with ``project`` as
    the experiment.
    """

    def __init__(self, names: list[str], *, run_name: str, log_dir: Path, project: str = DEFAULT_PROJECT,
                 config: dict | None = None):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_trackers(names)
        log_dir = Path(log_dir)
        self.trackers = []
        self.last_step = 0
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls(run_name, log_dir / "tensorboard")
            elif name == "wandb":
                (log_dir / "wandb").mkdir(parents=True, exist_ok=True)
                tracker = cls(project, name=run_name, dir=str(log_dir / "wandb"))
            elif name == "mlflow":
                tracker = cls(experiment_name=project, run_name=run_name)
            elif getattr(cls, "requires_logging_directory", False):  # as accelerate's init_trackers calls them
                tracker = cls(project, str(log_dir / name))
            else:
                tracker = cls(project)
            if hasattr(tracker, "start"):
                tracker.start()
            self.trackers.append(tracker)
        if config:
            flat = flat_config(config)
            for tracker in self.trackers:
                tracker.store_init_configuration(flat)

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            self.last_step = max(self.last_step, step)
            for tracker in self.trackers:
                tracker.log(values, step=step)

    def log_row(self, row: dict, prefix: str = "train") -> None:
        """One ``train_log.jsonl`` row (it carries its optimizer ``step``); its ``eval/<metric>`` values
        (``--eval-every``) keep their names, the names the final scores get."""
        scored = {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}
        rest = {k: v for k, v in row.items() if not k.startswith("eval/")}
        step = int(row.get("step", self.last_step))
        self.log({**scalars(rest, prefix), **scalars(scored, "eval")}, step)

    def log_scores(self, metrics: dict) -> None:
        """Final scores (``scores.json``'s ``metrics``) under ``eval/``, at the last training step."""
        self.log(scalars({n: m.get("value") for n, m in metrics.items()}, "eval"), self.last_step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
