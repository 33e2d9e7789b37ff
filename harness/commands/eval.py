"""``harness eval``: score a checkpoint (profile, hub id or directory) on the selected tasks, with the
same scoring code ``harness run`` uses after training."""

from __future__ import annotations

import json
from pathlib import Path

from harness.attacks import build_attacks, describe, parse_settings
from harness.io import config_hash
from harness.models.load import check_checkpoint, load_model, load_tokenizer
from harness.models.profiles import check_reference_placeholder, device, finalize_template, resolve_model
from harness.options import EvalOptions, ModelOptions, attack_names
from harness.paths import safe_name
from harness.plugins import get_registry
from harness.results.identity import check_inputs, identity_config
from harness.results.rundir import claim, is_complete, provenance, replacing, write_config
from harness.results.tables import ARROWS, Sheet, console_value, display_name, to_plain
from harness.scoring.attacked import check_attack_metrics
from harness.scoring.evaluate import evaluate_task, score_rows, template_dict
from harness.scoring.shard import agree, is_writer
from harness.tasks import select


def main(opts: EvalOptions) -> int:
    if opts.accelerate and opts.accelerate != "single":  # every rank scores a shard (scoring/shard.py)
        from harness.options import to_argv
        from harness.training import distributed

        rc = distributed.relaunch(["eval", *to_argv(opts)], opts.accelerate)
        if rc != -1:
            return rc
        score_tasks(opts)
        distributed.clean_exit(0)
        return 0
    score_tasks(opts)
    return 0


def score_tasks(opts: EvalOptions) -> dict[str, Path]:
    """Score the selected tasks; returns each task's run directory (finished now, earlier, or by another process)."""
    safe_name(opts.name, "--name")
    reg = get_registry(plugins_dirs=opts.plugins_dir, include_tasks=opts.include_tasks)
    names = select(opts.tasks, reg.tasks, kind="task", tags_of=lambda t: t.tag, failures=reg.failures)
    check_reference_placeholder(opts.reference, len(names))
    attacks = attack_config(opts, reg)
    plan = []
    for tname in names:  # every input of every task is checked before the first model is loaded
        task = with_lm_eval_options(reg.tasks[tname], opts)
        choice = resolve_model(opts.model, task, template_file=opts.template, reference=opts.reference,
                               retain=opts.retain_model)
        check_inputs(task, choice, opts.data_dir, reg)
        if attacks:
            check_attack_metrics(task, reg)
        plan.append((task, choice, identity_config(task, choice, reg, opts.data_dir)))
    loaded: dict[tuple, tuple] = {}
    dirs: dict[str, Path] = {}
    for task, choice, fingerprints in plan:
        key = (choice.start, choice.tokenizer, choice.dtype, choice.adapter)
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            tok = load_tokenizer(choice.tokenizer_path(), trust_remote_code=opts.trust_remote_code)
            dtype = choice.load_dtype()
            model = load_model(choice.start_path(), dtype=dtype, trust_remote_code=opts.trust_remote_code,
                               device=device(), adapter=choice.adapter)
            check_checkpoint(model, tok, choice.start)
            loaded[key] = (model, tok, dtype)
        model, tok, dtype = loaded[key]
        template = finalize_template(choice, tok)
        config = {"task": task.to_config(), "model": choice.to_config(), "template": template_dict(template),
                  "eval": {**scoring_config(opts), "limit": opts.limit, "dtype": dtype},
                  "fingerprints": fingerprints}
        if attacks:  # only then: runs without attacks keep their hashes
            config["attacks"] = {"attacks": attacks, "task": task.attack.to_dict()}
        out = Path(opts.output) / safe_name(choice.label, "model label") / task.name / opts.name / f"{config_hash(config)}-s0"
        dirs[task.name] = out
        # the ranks of a multi-process job take rank 0's decisions (another job may finish meanwhile)
        if agree(is_complete(out) and not opts.overwrite):
            _report_existing(task.name, out)
            continue
        with claim(out) as mine:
            if not agree(mine):
                print(f"{task.name}: another process is scoring {out}; skipped")
                continue
            if agree(is_complete(out) and not opts.overwrite):  # finished meanwhile, or restored by the claim
                _report_existing(task.name, out)
                continue
            with replacing(out, opts.overwrite):
                if is_writer():
                    write_config(out, config)
                identity = {"method": opts.name, "method_display": display_name(opts.name),
                            "seed": 0}
                score_model(task, model, tok, template, choice, opts, out_dir=out, dtype=dtype, identity=identity,
                            registry=reg)
            if is_writer():
                print(f"results: {out}")
    return dirs


def with_lm_eval_options(task, opts: ModelOptions):
    """``task`` with the command line's lm_eval settings (--utility, --lm-eval-*) in its metric list, so
    they enter the run hash like the task file's own."""
    import dataclasses

    over = opts.lm_eval_overrides()
    if not any(v is not None and v != [] for v in over.values()):
        return task
    from harness.metrics.lmeval import with_overrides

    metrics = with_overrides(task.metrics, **over)
    return task if metrics == task.metrics else dataclasses.replace(task, metrics=metrics)


def _report_existing(name: str, out: Path) -> None:
    if not is_writer():
        return
    print(f"{name}: results exist in {out} (use --overwrite to recompute)")
    _print_existing(out)


def scoring_config(opts) -> dict:
    """The scoring settings that enter the run hash (``run`` and ``eval``). ``--no-shared-prefix`` rounds the
    option sets differently (within 2e-7), so it gets cells of its own; the default keeps the older hashes."""
    out = {"batch_size": opts.eval_batch_size, "attention_mask": opts.attention_mask, "max_length": opts.max_length}
    if not opts.shared_prefix:
        out["shared_prefix"] = False
    return out


def attack_config(opts: ModelOptions, registry) -> dict:
    """``--attacks`` as it enters the run hash: name -> version and settings (did-you-mean on a typo)."""
    return {a.name: describe(a) for a in attacks_of(opts, registry)}


def attacks_of(opts: ModelOptions, registry) -> list:
    """The ``--attacks`` with their ``--attack-set`` settings, built and checked."""
    names = attack_names(opts)
    return build_attacks(names, registry, parse_settings(list(opts.attack_set or []), names, registry))


def score_model(task, model, tokenizer, template, choice, opts: ModelOptions, *, out_dir: Path, dtype: str,
               identity: dict, registry=None, print_table: bool = True, trained: bool = False,
               model_path: str | None = None):
    """The one scoring path of ``harness eval`` and ``harness run``: same settings, reference and files;
    with ``--attacks`` the attacked copies are scored here too.
    ``trained``: the model was unlearned by ``harness run`` (``model_path``: where ``--save-model`` saved it);
    the lm-eval results file names it so."""
    reg = registry or get_registry()
    attacks = attacks_of(opts, reg)
    scores = evaluate_task(task, model, tokenizer, template, reference=choice.reference, out_dir=out_dir,
                           batch_size=opts.eval_batch_size, limit=opts.limit, attention_mask=opts.attention_mask,
                           registry=registry, data_dir=opts.data_dir, model_label=choice.label,
                           max_length=opts.max_length, identity=identity,
                           lm_eval_run=lm_eval_run(model, choice, dtype, identity, model_path if trained else None, trained),
                           shared_prefix=opts.shared_prefix,
                           reference_options={"dtype": dtype, "trust_remote_code": opts.trust_remote_code},
                           attacks=attacks, attack_seed=int(identity.get("seed", 0)),
                           training={**task.training, **choice.training})
    if print_table and is_writer():
        top = [n for n, _ in task.metrics]
        print(metric_table(score_rows(scores, reg, top), title=f"{task.name} ({choice.label})"))
    return scores


def score_values(task, model, tokenizer, template, choice, opts: ModelOptions, metrics: list[str], *,
                 eval_batch_size: int, registry=None) -> dict[str, float | None]:
    """``metrics`` (a subset; each with the task's own arguments where it lists them) scored as ``score_model``
    scores them, without writing files: the values ``--eval-every`` logs during training. Metrics that
    report several numbers give one value per part (``lm_eval``: ``<task>/<metric>``)."""
    from harness.metrics import flat_scores

    args = dict(task.metrics)
    wanted = [(name, dict(args.get(name, {}))) for name in metrics]
    scores = evaluate_task(task, model, tokenizer, template, reference=choice.reference, metrics=wanted,
                           batch_size=eval_batch_size, limit=opts.limit, attention_mask=opts.attention_mask,
                           registry=registry, data_dir=opts.data_dir, max_length=opts.max_length, progress=False,
                           shared_prefix=opts.shared_prefix,
                           reference_options={"dtype": choice.dtype, "trust_remote_code": opts.trust_remote_code})
    return {name: s.value for name, s, parent in flat_scores({n: scores[n] for n in metrics})}


def lm_eval_run(model, choice, dtype: str, identity: dict, model_path: str | None, trained: bool) -> dict:
    """What the lm-eval results file says about the scored model (lm-eval's ``model_args`` string)."""
    prov = provenance()
    method = identity.get("method", "eval")
    if trained:  # an unlearned model: where it was saved, else its start checkpoint and method
        name = model_path or f"{choice.label}/{method}"
        args = f"pretrained={name},base_model={choice.start},method={method},dtype={dtype}"
    else:
        name = choice.start
        args = f"pretrained={choice.start},tokenizer={choice.tokenizer},dtype={dtype}"
    return {"model_args": args, "model_name": name, "git_hash": (prov["git_sha"] or "")[:7] or None,
            "versions": prov["versions"], "dtype": dtype, "seed": identity.get("seed", 0),
            "device": str(getattr(model, "device", "cpu")),
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "unlearn_harness": {"method": method, "model": choice.label, "start": choice.start,
                                "command": prov["command"]}}


def metric_table(rows: list[tuple[str, object, str]], *, title: str) -> str:
    """(metric, value, better) rows with better-direction arrows, as the console shows one scored task."""
    sheet = Sheet(["metric", "value", "better"], [[n, console_value(v), ARROWS.get(b, "")] for n, v, b in rows])
    return title + "\n" + to_plain(sheet, align="<><", rule=True)


def _print_existing(out: Path) -> None:
    doc = json.loads((out / "scores.json").read_text())
    rows = [(n, m["value"], m.get("better") or "") for n, m in doc["metrics"].items()]
    rows.sort(key=lambda r: not doc["metrics"][r[0]].get("top_level", False))
    print(metric_table(rows, title=f"{doc['task']} ({doc['model']})"))
