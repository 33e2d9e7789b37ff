"""``harness run``: every task x method x seed cell is unlearned from the task's start model and
then scored with the same code as ``harness eval``. Cells are content-addressed run directories:
a finished cell is skipped on rerun (resume), a changed config gets a new directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import HarnessError, __version__
from harness.commands import sweep, train_eval
from harness.commands.job import LOG_ENV
from harness.commands.share import check_sharing, open_trackers, share_cell
from harness.methods import build_method, check_required
from harness.models.profiles import ModelChoice, check_reference_placeholder, resolve_model
from harness.options import RunOptions
from harness.plugins import get_registry, one_line
from harness.results.rundir import claim, is_complete, replacing, run_dir, write_config
from harness.results.state import clear_failure, record_grid, write_failure
from harness.results.tables import Sheet, console_value, to_console
from harness.tasks import Task, select
from harness.training.distributed import is_main_process

log = logging.getLogger("harness")


@dataclass
class Cell:
    task: Task
    method_name: str
    method: object
    seed: int
    choice: ModelChoice
    train: dict
    config: dict
    dir: Path
    plugin: str = ""
    point: dict = dataclasses.field(default_factory=dict)  # the swept keys' values ({"lr": 1e-5, "npo.beta": 0.1})
    during: dict | None = None  # --eval-every / --keep-best settings (commands/train_eval.py)


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    if not shard:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise HarnessError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise HarnessError(f"--shard {shard!r}: need 0 <= i < n")
    return i, n


# --flag (or sweep key) -> TrainConfig field; --lr and --epochs arrive through the sweep point
TRAIN_FLAGS = {"epochs": "epochs", "max_steps": "max_steps", "lr": "lr", "train_batch_size": "batch_size",
               "per_device_batch": "per_device_batch", "optimizer": "optimizer", "max_length": "max_length"}


def peft_of(opts) -> dict | None:
    """The adapter settings of ``--peft`` and the ``--lora-*`` flags (run and finetune), or None."""
    from harness.training.adapters import peft_settings

    return peft_settings(opts.peft, r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout,
                         target_modules=opts.lora_target_modules, load_in_4bit=opts.load_in_4bit)


def training_config(task: Task, choice: ModelChoice, opts: RunOptions, seed: int, method: str | None = None,
                    point: dict | None = None, peft: dict | None = None) -> dict:
    """Task defaults, then the task's defaults for this method (``methods.<name>.training``, e.g. UNDIAL's
    learning rate), then the profile's (e.g. the tiny model's learning rate), then the flags and the sweep
    point's training values (``point``: lr, epochs, ...)."""
    from harness.training import TrainConfig

    method_training = task.method_defaults(method)[1] if method else {}
    # an adapter run takes the profile's peft_training over its training (a LoRA update starts at zero and
    # wants a larger learning rate; the tiny profile's)
    profile = {**choice.training, **(choice.peft_training if peft is not None else {})}
    cfg = {**task.training, **method_training, **profile}
    given = {flag: getattr(opts, flag) for flag in TRAIN_FLAGS if flag not in ("lr", "epochs")}
    given.update(point or {})
    flags = {TRAIN_FLAGS[flag]: v for flag, v in given.items() if v is not None}
    cfg.update(flags)
    if opts.epochs is not None and opts.max_steps is None:
        cfg.pop("max_steps", None)  # --epochs asks for epochs: a task's step count (WMDP's 80) gives way
    if opts.gradient_checkpointing:
        cfg["gradient_checkpointing"] = True
    cfg["seed"] = seed
    cfg["accelerate"] = opts.accelerate or "single"
    cfg["attention_mask"] = opts.attention_mask
    if peft is not None:  # only when set: runs without an adapter keep their identity
        cfg["peft"] = peft
    if isinstance(cfg.get("epochs"), float) and cfg["epochs"].is_integer():
        cfg["epochs"] = int(cfg["epochs"])
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = key.replace("_", "-")
            where = (f"--{flag}" if key in flags
                     else f"model profile '{choice.profile}'" if key in profile else f"{task.file}")
            raise HarnessError(f"training.{key} must be a finite number, got {value} (from {where})")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise HarnessError(f"task '{task.name}' training: unknown key(s) {sorted(unknown)}; valid: {sorted(known)}")
    TrainConfig(**cfg).validate()
    return cfg


def expand(opts: RunOptions, reg) -> list[Cell]:
    tasks = select(opts.tasks, reg.tasks, kind="task", tags_of=lambda t: t.tag, failures=reg.failures)
    methods = select(opts.methods, reg.methods, kind="method", failures=reg.failures)
    # every sweep value is typed and checked before any model or data is touched
    grid = sweep.axes(opts, {m: reg.methods[m] for m in methods}, reg.methods)
    swept = sweep.swept(grid)
    check_reference_placeholder(opts.reference, len(tasks))
    try:
        seeds = [int(s) for s in str(opts.seeds).split(",") if s.strip()]
    except ValueError:
        raise HarnessError(f"--seeds {opts.seeds!r}: expected comma separated integers") from None
    from harness.commands.eval import attack_config, scoring_config
    from harness.data.corpus import is_tiny_model, resolve_task_data
    from harness.results.identity import check_inputs, identity_config
    from harness.scoring.attacked import check_attack_metrics

    peft = peft_of(opts)
    attacks = attack_config(opts, reg)
    cells = []
    seen: dict[Path, dict] = {}
    from harness.commands.eval import with_lm_eval_options

    for tname in tasks:
        task = with_lm_eval_options(reg.tasks[tname], opts)
        choice = resolve_model(opts.model, task, template_file=opts.template, reference=opts.reference)
        # Everything that chooses data (profile substitutions, tiny fallback, hub vs bundled vs --data-dir)
        # is decided here, before the hash: training and scoring then read exactly these sources.
        task, sources = resolve_task_data(choice.apply(task), opts.data_dir, tiny=is_tiny_model(choice.start))
        check_inputs(task, choice, opts.data_dir, reg)
        fingerprints = identity_config(task, choice, reg, opts.data_dir)
        if attacks:
            check_attack_metrics(task, reg)
        during = train_eval.settings(task, choice, opts, reg)
        for mname, point in ((m, p) for m in methods for p in sweep.points(grid, m)):
            try:
                method, plugin = build_cell_method(task, mname, reg, sweep.method_part(point, mname),
                                                   choice.methods.get(mname, {}))
            except HarnessError as exc:
                raise HarnessError(f"{mname} at sweep point {_point_text(point)}: {exc}") if point else exc from None
            for seed in seeds:
                train = training_config(task, choice, opts, seed, mname, sweep.training_part(point), peft)
                config = {"task": task.to_config(), "model": choice.to_config(),
                          "method": {"name": mname, "params": dataclasses.asdict(method)},
                          "training": {k: v for k, v in train.items() if k != "accelerate"},
                          "eval": scoring_config(opts),
                          "limit": opts.limit, "seed": seed, "data_dir": opts.data_dir,
                          "data_sources": sources, "fingerprints": fingerprints}
                if attacks:  # only then: runs without attacks keep their hashes
                    config["attacks"] = {"attacks": attacks, "task": task.attack.to_dict()}
                if during and "keep_best" in during:  # it changes the model scored; --eval-every alone does not
                    config["during_training"] = during
                d = run_dir(opts.output, choice.label, tname, mname, config, seed)
                if d in seen:  # two points resolving to one configuration would share (and fight over) a folder
                    raise HarnessError(f"{tname} x {mname} x seed {seed}: sweep points {_point_text(seen[d])} and "
                                       f"{_point_text(point)} resolve to the same configuration ({d.name})")
                seen[d] = point
                cells.append(Cell(task, mname, method, seed, choice, train, config, d, plugin,
                                  {k: v for k, v in point.items() if k in swept}, during))
    return cells


def rel(cell: Cell, output) -> str:
    """The cell's name in its results tree: ``<model>/<task>/<method>/<hash8>-s<seed>``."""
    return Path(cell.dir).relative_to(Path(output)).as_posix()


def only_cells(cells: list[Cell], wanted: list[str], output) -> list[Cell]:
    by_rel = {rel(c, output): c for c in cells}
    missing = [w for w in wanted if w.strip("/") not in by_rel]
    if missing:
        raise HarnessError(f"--cell {missing[0]}: not a cell of this grid ({len(cells)} cells; see --dry-run)")
    return [by_rel[w.strip("/")] for w in dict.fromkeys(wanted)]


def _point_text(point: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in point.items()) + "}"


def build_cell_method(task: Task, mname: str, reg, sets: dict, profile: dict | None = None):
    """The method of one task's cells: class defaults < the task's ``methods.<name>`` < the model profile's
    ``methods.<name>`` (what its architecture needs) < ``--set``."""
    cls = reg.methods[mname]
    plugin = reg.sources.get(("methods", mname), "?")
    task_params, _ = task.method_defaults(mname)
    try:
        if task_params:
            try:
                build_method(cls, task_params)  # a bad task default names the task file, not --set
            except HarnessError as exc:
                raise HarnessError(f"task '{task.name}' ({task.file}): methods.{mname}: {exc}") from None
        method = build_method(cls, {**task_params, **(profile or {}), **sets})
    except HarnessError:
        raise
    except Exception as exc:
        raise HarnessError(f"method '{mname}' from plugin '{plugin}' failed to build: {one_line(exc)}") from exc
    check_required(method, f"task '{task.name}' ({task.file}): ")
    if getattr(cls, "uses_idk", False) and ("idk" not in task.data or task.train_format == "corpus"):
        raise HarnessError(f"method '{mname}' trains towards alternative answers (data role 'idk') of question-"
                           f"answer rows, which task '{task.name}' ({task.file}) does not have; use it on a QA task "
                           "(e.g. tofu_*) or add data.idk to the task")
    return method, plugin


def run_cell(cell: Cell, opts: RunOptions, registry=None) -> dict | None:
    """Unlearn and score one cell; returns the scores dict, or None when another process holds it.
    With ``--overwrite`` the finished result stays in the cell (``replacing``) until the new one is scored.

    ``registry``: the one built with the command's --plugins-dir / --include-tasks (by default the cached
    one for ``opts``), so a plugin's metric scores the unlearned model as it scored the baseline."""
    from harness.scoring.shard import agree

    with claim(cell.dir) as mine:
        if not agree(mine):  # the ranks of a job take rank 0's decisions
            log.warning("skip %s: another process is running it", cell.dir)
            return None
        if agree(is_complete(cell.dir) and not opts.overwrite):
            return read_scores(cell.dir)
        try:
            with replacing(cell.dir, opts.overwrite):
                scores = _unlearn_and_score(cell, opts, registry)
        except BaseException as exc:  # `harness status` lists the cell as failed with this line
            if is_main_process() and not is_complete(cell.dir):
                write_failure(cell.dir, one_line(exc), os.environ.get(LOG_ENV))
            raise
        clear_failure(cell.dir)
        return scores


def _unlearn_and_score(cell: Cell, opts: RunOptions, registry) -> dict | None:
    import torch

    from harness import training
    from harness.commands.eval import score_model
    from harness.data.items import idk_items, training_items
    from harness.models.load import check_checkpoint, check_lengths, load_model, load_tokenizer
    from harness.models.profiles import finalize_template
    from harness.plugins import guard_method

    t0 = time.time()
    task, choice = cell.task, cell.choice
    tok = load_tokenizer(choice.tokenizer_path(), trust_remote_code=opts.trust_remote_code)
    template = finalize_template(choice, tok)
    torch.manual_seed(cell.seed)
    cfg = training.TrainConfig(**cell.train)
    # a start model given as an adapter is merged first: unlearning trains its own weights (or adapter)
    model = load_model(choice.start_path(), dtype=choice.dtype, trust_remote_code=opts.trust_remote_code,
                       adapter=choice.adapter, merge_adapter=True,
                       load_in_4bit=bool(cfg.peft and cfg.peft.get("load_in_4bit")))
    check_checkpoint(model, tok, choice.start)
    forget, forget_rows = training_items(task, tok, template, "forget", opts.data_dir, opts.limit, cfg.max_length)
    retain, _ = training_items(task, tok, template, "retain", opts.data_dir, opts.limit, cfg.max_length)
    for role, items in (("forget", forget), ("retain", retain)):
        check_lengths(model, [len(it["input_ids"]) for it in items], choice.start,
                      what=f"task '{task.name}' data role '{role}'")
    idk = None
    if getattr(cell.method, "uses_idk", False):
        idk = idk_items(task, tok, template, forget_rows, opts.data_dir, cfg.max_length)
    first_plan = training.plan(cfg, len(forget), 1)
    recorded = {"during_training": cell.during} if cell.during else {}
    write_config(cell.dir, cell.config, {"plan": first_plan, **recorded})
    log.info("unlearning %s with %s (seed %d): %d forget / %d retain items -> %s",
             task.name, cell.method_name, cell.seed, len(forget), len(retain), cell.dir)
    save = opts.save_model or bool(opts.push_to_hub)
    save_dir = None
    if save:  # with --merge: the merged plain checkpoint in model/, the adapter in model/adapter/
        save_dir = cell.dir / "model" / "adapter" if opts.merge else cell.dir / "model"
    tracker = open_trackers(cell, opts, first_plan)
    if registry is None:
        registry = get_registry(plugins_dirs=opts.plugins_dir, include_tasks=opts.include_tasks)
    evaluator = train_eval.evaluator(cell.during, task, tok, template, choice, opts, registry)
    try:
        result = training.unlearn(model, tok, guard_method(cell.method, cell.method_name, cell.plugin), forget,
                                  retain, cfg, idk_items=idk, out_dir=cell.dir, template=template,
                                  forget_qa=_forget_qa(task, forget_rows), cache_reference=not opts.no_cache_reference,
                                  save_dir=save_dir, tracker=tracker, evaluator=evaluator)
        if is_main_process():
            write_config(cell.dir, cell.config, {"plan": result.info, **recorded})
        # every rank holds the consolidated model and scores a shard of each source (scoring/shard.py)
        meta = {"method": cell.method_name, "method_display": type(cell.method).display_name or cell.method_name,
                "seed": cell.seed, "model": choice.label, "harness_version": __version__,
                "train_seconds": round(time.time() - t0, 1), "hparams": hparams(cell), "sweep": cell.point}
        if train_eval.best_of(result.info):  # the scored model is the best --eval-every step's
            meta["keep_best"] = train_eval.best_of(result.info)
        if save_dir is not None and cfg.peft is not None and is_main_process():
            save_template(save_dir, template)  # `harness eval --model <adapter dir>` prompts as this run did
        score_model(task, result.model, tok, template, choice, opts, out_dir=cell.dir, dtype=choice.dtype,
                    identity=meta, registry=registry, print_table=False, trained=True,
                    model_path=str(cell.dir / "model") if save else None)
        if opts.merge and cfg.peft is not None and is_main_process():
            # after scoring: merging changes the model in place, and the scores are those of the adapter applied
            from harness.training.adapters import save_merged

            save_merged(result.model, tok, cell.dir / "model")
            save_template(cell.dir / "model", template)
        scores = read_scores(cell.dir)
        if tracker is not None:
            tracker.log_scores(scores["metrics"])
        return scores
    finally:
        if tracker is not None:
            tracker.finish()


def hparams(cell: Cell) -> dict:
    """What the report shows of a sweep point: lr, epochs and the method's scalar hyper-parameters."""
    out = {k: cell.train.get(k) for k in ("lr", "epochs", "batch_size")}
    for k, v in cell.config["method"]["params"].items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[f"{cell.method_name}.{k}"] = v
    return out


def save_template(directory: Path, template) -> None:
    """The prompt template beside a saved checkpoint or adapter (``harness_template.yaml``)."""
    from harness.io import write_yaml
    from harness.models.load import CHECKPOINT_TEMPLATE

    write_yaml(Path(directory) / CHECKPOINT_TEMPLATE, {k: v for k, v in template.to_dict().items() if v is not None})


def _forget_qa(task: Task, rows: list[dict]) -> list[tuple[str, str]] | None:
    """The forget (question, answer) texts a method's prepare step sees (none for corpus tasks)."""
    if task.train_format != "qa":
        return None
    q, a = task.field_name("question"), task.field_name("answer")
    return [(r[q], r[a]) for r in rows]


def read_scores(d: Path) -> dict:
    return json.loads((Path(d) / "scores.json").read_text())


def baseline(task: Task, opts: RunOptions) -> dict | None:
    """Score the start model once per task (the Finetuned row), so a run shows what unlearning changed."""
    from harness.commands.eval import score_tasks

    out = score_tasks(opts.baseline(task.name)).get(task.name)
    return read_scores(out) if out is not None and is_complete(out) else None


def print_grid(cells: list[Cell]) -> None:
    import yaml

    print(f"{len(cells)} run(s):")
    for i, c in enumerate(cells):
        status = "done" if is_complete(c.dir) else "todo"
        point = f"  {_point_text(c.point)}" if c.point else ""
        print(f"[{i}] {c.task.name} x {c.method_name} x seed {c.seed}{point}  model={c.choice.label}  "
              f"hash={c.dir.name.rpartition('-s')[0]}  ({status}) -> {c.dir}")
        resolved = {"start": c.choice.start, "reference": c.choice.reference,
                    "method": c.config["method"]["params"], "training": c.config["training"]}
        if c.choice.data:
            resolved["data"] = {role: spec.label() for role, spec in c.choice.data.items()}
        fallbacks = {role: f"{r['path']}/{r['name']}:{r['split']} instead of {r['instead_of']}"
                     for role, r in c.config["data_sources"].items() if "instead_of" in r}
        if fallbacks:
            resolved["fallback"] = fallbacks
        print("    " + yaml.safe_dump(resolved, sort_keys=False, default_flow_style=True, width=1_000_000).strip())


def print_tables(rows: list[tuple[str, str, int, dict]]) -> None:
    print(summary_table(rows))
    attacked = attack_table(rows)
    if attacked:
        print()
        print(attacked)


def summary_table(rows: list[tuple[str, str, int, dict]]) -> str:
    cols: list[str] = []
    for *_, sc in rows:
        for k in sc.get("metrics", {}):
            if k not in cols:
                cols.append(k)
    keep = [c for c in ("forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                        "privleak", "extraction_strength", "forget_knowmem_ROUGE", "forget_verbmem_ROUGE",
                        "retain_knowmem_ROUGE") if c in cols]
    keep += [c for c in cols if "/" in c]  # lm-eval values (<task>/<metric>): WMDP accuracy, utility
    sheet = Sheet(["task", "method", "seed", *keep])
    for task, method, seed, sc in rows:
        m = sc.get("metrics", {})
        sheet.rows.append([task, method, str(seed)] + [console_value(m.get(c, {}).get("value")) for c in keep])
    return to_console(sheet)


def attack_table(rows: list[tuple[str, str, int, dict]]) -> str | None:
    """Per run and attack: each re-scored metric before (same rows) and after the attack."""
    sheet = Sheet(["task", "method", "seed", "attack", "metric", "before", "after"])
    for task, method, seed, sc in rows:
        m = sc.get("metrics", {})
        for attack, rec in (sc.get("attacks") or {}).items():
            for name in rec.get("metrics", []):
                before = m.get(f"attack/{attack}/before/{name}", {}).get("value")
                after = m.get(f"attack/{attack}/{name}", {}).get("value")
                sheet.rows.append([task, method, str(seed), attack, name, console_value(before), console_value(after)])
    return to_console(sheet) if sheet.rows else None


def check_grid_data(cells: list[Cell], opts: RunOptions) -> None:
    """Fail before any model work when a task's data is missing offline or cannot train."""
    from harness.data import corpus
    from harness.data.items import check_data

    for task, start, sources in {c.task.name: (c.task, c.choice.start, c.config["data_sources"])
                                 for c in cells}.values():
        err = corpus.missing_data_error(task, opts.data_dir)  # the task's specs are already resolved
        if err:
            raise err
        corpus.announce_fallbacks(task, sources)
        check_data(task, opts.data_dir, opts.limit, start)
        if any(name == "lm_eval" for name, _ in task.metrics):
            from harness.metrics.lmeval import check_tasks

            check_tasks(task)  # lm-eval tasks and their data, before any training


def main(opts: RunOptions) -> int:
    from harness.training import distributed

    reg = get_registry(plugins_dirs=opts.plugins_dir, include_tasks=opts.include_tasks)
    cells = expand(opts, reg)
    shard = parse_shard(opts.shard)
    if shard:
        cells = [c for i, c in enumerate(cells) if i % shard[1] == shard[0]]
    if opts.cell:
        cells = only_cells(cells, opts.cell, opts.output)
    check_grid_data(cells, opts)  # --dry-run too: a dry run that passes means the run will start
    check_sharing(cells, opts)
    if opts.dry_run:
        print_grid(cells)
        return 0
    if opts.launcher:  # before --accelerate's relaunch: each job relaunches its own cell
        from harness.commands.launch import submit

        rc = submit([rel(c, opts.output) for c in cells], opts)
        names = sweep.row_names(cells)
        rows = [(c.task.name, names[id(c)], c.seed, read_scores(c.dir)) for c in cells if is_complete(c.dir)]
        if rows and opts.launcher == "local":
            print_tables(rows)
        return rc
    if not opts.cell and is_main_process():  # a launched cell's grid was recorded when it was submitted
        record_grid(opts.output, [rel(c, opts.output) for c in cells], ["harness", "run", *opts.launch_argv()])
    if opts.accelerate and opts.accelerate != "single":
        rc = distributed.relaunch(sys.argv[1:], opts.accelerate)
        if rc != -1:
            return rc
    for note in dict.fromkeys(c.choice.note for c in cells if c.choice.note):
        log.warning(note)
    rows = []
    done_tasks = set()
    names = sweep.row_names(cells)
    for cell in cells:
        if cell.task.name not in done_tasks:  # every rank: the baseline is scored in shards too
            done_tasks.add(cell.task.name)
            base = baseline(cell.task, opts)
            if base:
                rows.append((cell.task.name, "finetuned (start)", 0, base))
        was_done = is_complete(cell.dir) and not opts.overwrite
        scores = run_cell(cell, opts, reg)
        if was_done:
            log.info("skip %s x %s x seed %d: finished earlier (%s)", cell.task.name, cell.method_name, cell.seed, cell.dir)
            if (opts.save_model or opts.push_to_hub) and not (cell.dir / "model").is_dir():
                log.warning("--save-model: %s x %s x seed %d finished earlier without a saved model, so none was "
                            "saved; pass --overwrite to retrain it and save the model", cell.task.name,
                            cell.method_name, cell.seed)
        if scores is not None:
            rows.append((cell.task.name, names[id(cell)], cell.seed, scores))
            if (opts.save_model or opts.push_to_hub) and is_main_process():
                share_cell(cell, opts, scores)
    if rows and is_main_process():
        print()
        print_tables(rows)
    if opts.accelerate and opts.accelerate != "single":
        distributed.clean_exit(0)
    return 0
