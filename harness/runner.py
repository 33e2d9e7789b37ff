"""``harness run``: every task x method x seed cell is unlearned from the task's start model and
then scored with the same code as ``harness eval``. Cells are content-addressed run directories:
a finished cell is skipped on rerun (resume), a changed config gets a new directory."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import HarnessError, __version__
from harness.methods import build_method
from harness.plugins import get_registry
from harness.profiles import ModelChoice, check_reference_placeholder, resolve_model
from harness.results import claim, is_complete, run_dir, write_config
from harness.tasks import Task, select

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


def parse_sets(sets: list[str], methods: dict) -> dict[str, dict[str, str]]:
    """``--set npo.beta=0.2`` -> {"npo": {"beta": "0.2"}} (values parsed against the field types later)."""
    out: dict[str, dict[str, str]] = {}
    for s in sets:
        key, eq, value = s.partition("=")
        meth, dot, field = key.partition(".")
        if not eq or not dot or not field:
            raise HarnessError(f"--set {s!r}: expected METHOD.FIELD=VALUE, e.g. npo.beta=0.2")
        if meth not in methods:
            raise HarnessError(f"--set {s!r}: method '{meth}' is not selected (selected: {', '.join(methods)})")
        out.setdefault(meth, {})[field] = value
    return out


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


def training_config(task: Task, choice: ModelChoice, args, seed: int) -> dict:
    """Task defaults, then the profile's (e.g. the tiny model's learning rate), then the flags."""
    from harness.train import TrainConfig

    cfg = {**task.training, **choice.training}
    for flag, key in (("epochs", "epochs"), ("lr", "lr"), ("batch_size", "batch_size"),
                      ("per_device_batch", "per_device_batch"), ("optimizer", "optimizer"),
                      ("max_length", "max_length")):
        v = getattr(args, flag, None)
        if v is not None:
            cfg[key] = v
    if getattr(args, "gradient_checkpointing", False):
        cfg["gradient_checkpointing"] = True
    cfg["seed"] = seed
    cfg["accelerate"] = getattr(args, "accelerate", None) or "single"
    cfg["attention_mask"] = "pad_eq" if getattr(args, "attention_mask", "reference") == "reference" else "length"
    if isinstance(cfg.get("epochs"), float) and cfg["epochs"].is_integer():
        cfg["epochs"] = int(cfg["epochs"])
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = key.replace("_", "-")
            where = (f"--{flag}" if getattr(args, key, None) is not None
                     else f"model profile '{choice.profile}'" if key in choice.training else f"{task.file}")
            raise HarnessError(f"training.{key} must be a finite number, got {value} (from {where})")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(cfg) - known
    if unknown:
        raise HarnessError(f"task '{task.name}' training: unknown key(s) {sorted(unknown)}; valid: {sorted(known)}")
    TrainConfig(**cfg).validate()
    return cfg


def expand(args, reg) -> list[Cell]:
    tasks = select(args.tasks, reg.tasks, kind="task", tags_of=lambda t: t.tag, failures=reg.failures)
    methods = select(args.methods, reg.methods, kind="method", failures=reg.failures)
    check_reference_placeholder(args.reference, len(tasks))
    sets = parse_sets(args.set, methods)
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise HarnessError(f"--seeds {args.seeds!r}: expected comma separated integers") from None
    cells = []
    for tname in tasks:
        task = reg.tasks[tname]
        choice = resolve_model(args.model, task, template_file=args.template, reference=args.reference)
        task = choice.apply(task)
        for mname in methods:
            cls = reg.methods[mname]
            plugin = reg.sources.get(("methods", mname), "?")
            try:
                method = build_method(cls, sets.get(mname, {}))
            except HarnessError:
                raise
            except Exception as exc:
                raise HarnessError(f"method '{mname}' from plugin '{plugin}' failed to build: {_one_line(exc)}") from exc
            for seed in seeds:
                train = training_config(task, choice, args, seed)
                config = {"task": task.to_config(), "model": choice.to_config(),
                          "method": {"name": mname, "params": dataclasses.asdict(method)},
                          "training": {k: v for k, v in train.items() if k != "accelerate"},
                          "eval": {"batch_size": args.eval_batch_size, "attention_mask": args.attention_mask,
                                   "max_length": args.max_length},
                          "limit": args.limit, "seed": seed, "data_dir": args.data_dir}
                d = run_dir(args.output, choice.label, tname, mname, config, seed)
                cells.append(Cell(task, mname, method, seed, choice, train, config, d, plugin))
    return cells


def _items(task: Task, tok, template, role: str, data_dir, limit, max_length):
    from harness.data import load_split
    from harness.formatting import chunk_corpus, encode_qa

    if task.benchmark == "MUSE":
        from harness import muse

        # raw corpora as pretraining chunks; the embedded tiny models may fall back to bundled retain texts
        rows = muse.corpus_rows(task, role, data_dir, tiny=muse.is_tiny_model(getattr(tok, "name_or_path", None)))
    else:
        rows = load_split(task.data_spec(role), data_dir)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise HarnessError(f"task '{task.name}': data role '{role}' ({task.data[role].label()}) is empty")
    if task.benchmark == "MUSE":
        key = muse.text_key(task, rows, role)
        return chunk_corpus(tok, [r[key] for r in rows if r[key]], max_length), rows
    q, a = task.field_name("question"), task.field_name("answer")
    for r in rows[:1]:
        for k in (q, a):
            if k not in r:
                raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' has no field '{k}' "
                                   f"(fields: {', '.join(r)}); fix prompt.question/prompt.answer")
    return [encode_qa(tok, template, r[q], r[a], max_length=max_length) for r in rows], rows


def _idk_items(task: Task, tok, template, forget_rows, data_dir, max_length):
    """``items[i][j]``: forget question i with idk answer j, encoded when first drawn (each example draws one
    alternative per epoch, so encoding all 100 answers for every row up front wastes nearly all of it)."""
    from harness.data import load_split
    from harness.formatting import encode_qa

    idk = [r["text"] for r in load_split(task.data_spec("idk"), data_dir)]
    q = task.field_name("question")

    @functools.cache
    def encode(i: int, j: int) -> dict:
        return encode_qa(tok, template, forget_rows[i][q], idk[j], max_length=max_length)

    return [_Alternatives(len(idk), functools.partial(encode, i)) for i in range(len(forget_rows))]


@dataclass(frozen=True)
class _Alternatives(Sequence):
    """A read-only sequence whose items are built on access (``build`` memoises them)."""
    size: int
    build: Callable[[int], dict]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, j: int) -> dict:
        if not -self.size <= j < self.size:
            raise IndexError(j)
        return self.build(j % self.size)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, HarnessError):
        return text[0] if text else "error"
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def guard_method(method, name: str, plugin: str):
    """A copy of ``method`` whose ``loss()`` turns any exception into one error line naming the method and
    the plugin that registered it (a third-party bug must not read like a harness crash)."""
    guarded = copy.copy(method)
    loss = method.loss

    def checked_loss(*a, **kw):
        try:
            return loss(*a, **kw)
        except Exception as exc:
            raise HarnessError(f"method '{name}' from plugin '{plugin}' failed: {_one_line(exc)}") from exc

    object.__setattr__(guarded, "loss", checked_loss)
    return guarded


def check_data(task: Task, data_dir, limit, start: str | None = None) -> None:
    """Fail before any model is loaded when the training data cannot work: an empty forget/retain split or
    rows without the fields the task's ``prompt`` names (``start``: the checkpoint, for MUSE's tiny fallback)."""
    from harness.data import load_split

    muse_task = task.benchmark == "MUSE"
    keys = [task.field_name("text")] if muse_task else [task.field_name("question"), task.field_name("answer")]
    for role in ("forget", "retain"):
        if role not in task.data:
            raise HarnessError(f"task '{task.name}' ({task.file}): no data role '{role}'; unlearning needs "
                               "data.forget and data.retain")
        if muse_task:
            from harness import muse

            rows = muse.corpus_rows(task, role, data_dir, tiny=muse.is_tiny_model(start))
        else:
            rows = load_split(task.data[role], data_dir)
        if limit:
            rows = rows[:limit]
        if not rows:
            raise HarnessError(f"task '{task.name}': data role '{role}' ({task.data[role].label()}) is empty")
        for n, row in enumerate(rows):
            missing = [k for k in keys if k not in row]
            if missing:
                raise HarnessError(f"task '{task.name}' ({task.file}): data role '{role}' row {n} has no field "
                                   f"'{missing[0]}' (fields: {', '.join(row)}); fix prompt: in the task file")


def run_cell(cell: Cell, args) -> dict | None:
    """Unlearn and score one cell; returns the scores dict, or None when another process holds it."""
    import torch

    from harness import evaluation, train
    from harness.modeling import check_checkpoint, check_lengths, load_model, load_tokenizer
    from harness.profiles import finalize_template

    with claim(cell.dir) as mine:
        if not mine:
            log.warning("skip %s: another process is running it", cell.dir)
            return None
        if is_complete(cell.dir) and not args.overwrite:
            return _read_scores(cell.dir)
        t0 = time.time()
        task, choice = cell.task, cell.choice
        tok = load_tokenizer(choice.tokenizer, trust_remote_code=args.trust_remote_code)
        template = finalize_template(choice, tok)
        torch.manual_seed(cell.seed)
        model = load_model(choice.start, dtype=choice.dtype, trust_remote_code=args.trust_remote_code)
        check_checkpoint(model, tok, choice.start)
        cfg = train.TrainConfig(**cell.train)
        forget, forget_rows = _items(task, tok, template, "forget", args.data_dir, args.limit, cfg.max_length)
        retain, _ = _items(task, tok, template, "retain", args.data_dir, args.limit, cfg.max_length)
        for role, items in (("forget", forget), ("retain", retain)):
            check_lengths(model, [len(it["input_ids"]) for it in items], choice.start,
                          what=f"task '{task.name}' data role '{role}'")
        idk = None
        if getattr(cell.method, "uses_idk", False):
            idk = _idk_items(task, tok, template, forget_rows, args.data_dir, cfg.max_length)
        write_config(cell.dir, cell.config, {"plan": train.plan(cfg, len(forget), 1)})
        log.info("unlearning %s with %s (seed %d): %d forget / %d retain items -> %s",
                 task.name, cell.method_name, cell.seed, len(forget), len(retain), cell.dir)
        model = train.unlearn(model, tok, guard_method(cell.method, cell.method_name, cell.plugin), forget, retain,
                              cfg, idk_items=idk, out_dir=cell.dir,
                              cache_reference=not args.no_cache_reference,
                              save_dir=cell.dir / "model" if args.save_model else None)
        info = getattr(model, "train_info", {})
        write_config(cell.dir, cell.config, {"plan": info})
        if not _is_main():
            return None
        meta = {"method": cell.method_name, "method_display": type(cell.method).display_name or cell.method_name,
                "seed": cell.seed, "model": choice.label, "harness_version": __version__,
                "train_seconds": round(time.time() - t0, 1)}
        evaluation.evaluate_task(task, model, tok, template, reference=choice.reference, out_dir=cell.dir,
                                 batch_size=args.eval_batch_size, limit=args.limit,
                                 attention_mask=args.attention_mask, data_dir=args.data_dir,
                                 model_label=choice.label, print_table=False,
                                 max_length=args.max_length, identity=meta,
                                 reference_options={"dtype": choice.dtype, "trust_remote_code": args.trust_remote_code})
        return _read_scores(cell.dir)


def _is_main() -> bool:
    from harness.distributed import is_main_process

    return is_main_process()


def _read_scores(d: Path) -> dict:
    import json

    return json.loads((Path(d) / "scores.json").read_text())


def baseline(task: Task, args) -> dict | None:
    """Score the start model once per task (the Finetuned row), so a run shows what unlearning changed."""
    from harness import evaluation

    eargs = dataclasses.replace(_EvalArgs(), tasks=task.name, model=args.model, template=args.template,
                                reference=args.reference, output=args.output, name="finetuned",
                                batch_size=args.eval_batch_size, limit=args.limit, data_dir=args.data_dir,
                                attention_mask=args.attention_mask, trust_remote_code=args.trust_remote_code,
                                include_tasks=args.include_tasks, plugins_dir=args.plugins_dir,
                                max_length=args.max_length)
    out = evaluation.score(eargs).get(task.name)
    return _read_scores(out) if out is not None and is_complete(out) else None


@dataclass
class _EvalArgs:
    tasks: str = ""
    model: str | None = None
    template: str | None = None
    reference: str | None = None
    output: str = "results"
    name: str = "eval"
    batch_size: int = 32
    limit: int | None = None
    data_dir: str | None = None
    attention_mask: str = "reference"
    trust_remote_code: bool = False
    include_tasks: list = dataclasses.field(default_factory=list)
    plugins_dir: list = dataclasses.field(default_factory=list)
    overwrite: bool = False
    max_length: int | None = None
    debug: bool = False
    verb: str = "eval"


def print_grid(cells: list[Cell]) -> None:
    import yaml

    print(f"{len(cells)} run(s):")
    for i, c in enumerate(cells):
        status = "done" if is_complete(c.dir) else "todo"
        print(f"[{i}] {c.task.name} x {c.method_name} x seed {c.seed}  model={c.choice.label}  ({status}) -> {c.dir}")
        resolved = {"start": c.choice.start, "reference": c.choice.reference,
                    "method": c.config["method"]["params"], "training": c.config["training"]}
        if c.choice.data:
            resolved["data"] = {role: spec.label() for role, spec in c.choice.data.items()}
        print("    " + yaml.safe_dump(resolved, sort_keys=False, default_flow_style=True, width=1_000_000).strip())


def format_value(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
        return f"{v:.3e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_table(rows: list[tuple[str, str, int, dict]]) -> str:
    cols: list[str] = []
    for *_, sc in rows:
        for k in sc.get("metrics", {}):
            if k not in cols:
                cols.append(k)
    keep = [c for c in ("forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                        "privleak", "extraction_strength", "forget_knowmem_ROUGE", "forget_verbmem_ROUGE",
                        "retain_knowmem_ROUGE") if c in cols]
    header = ["task", "method", "seed", *keep]
    body = []
    for task, method, seed, sc in rows:
        m = sc.get("metrics", {})
        body.append([task, method, str(seed)] + [format_value(m.get(c, {}).get("value")) for c in keep])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(args) -> int:
    from harness import distributed

    reg = get_registry(plugins_dirs=args.plugins_dir, include_tasks=args.include_tasks)
    cells = expand(args, reg)
    shard = parse_shard(args.shard)
    if shard:
        cells = [c for i, c in enumerate(cells) if i % shard[1] == shard[0]]
    if args.dry_run:
        print_grid(cells)
        return 0
    if args.accelerate and args.accelerate != "single":
        rc = distributed.relaunch(sys.argv[1:], args.accelerate)
        if rc != -1:
            return rc
    from harness import muse
    from harness.data import missing_splits

    for task, start in {c.task.name: (c.task, c.choice.start) for c in cells}.values():
        if muse.is_muse(task):
            err = muse.missing_data_error(task, args.data_dir, tiny=muse.is_tiny_model(start))
            if err:
                raise err
        else:
            missing = missing_splits(task.data, args.data_dir)
            if missing:
                raise HarnessError(f"task '{task.name}': data not available offline: {', '.join(missing)}; supply "
                                   "them with --data-dir DIR holding <name>/<split>.jsonl, or run with hub access")
        check_data(task, args.data_dir, args.limit, start)
    for note in dict.fromkeys(c.choice.note for c in cells if c.choice.note):
        log.warning(note)
    rows = []
    done_tasks = set()
    for cell in cells:
        if cell.task.name not in done_tasks and _is_main():
            done_tasks.add(cell.task.name)
            base = baseline(cell.task, args)
            if base:
                rows.append((cell.task.name, "finetuned (start)", 0, base))
        was_done = is_complete(cell.dir) and not args.overwrite
        scores = run_cell(cell, args)
        if was_done:
            log.info("skip %s x %s x seed %d: finished earlier (%s)", cell.task.name, cell.method_name, cell.seed, cell.dir)
        if scores is not None:
            rows.append((cell.task.name, cell.method_name, cell.seed, scores))
    if rows and _is_main():
        print()
        print(summary_table(rows))
    if args.accelerate and args.accelerate != "single":
        distributed.clean_exit(0)
    return 0
