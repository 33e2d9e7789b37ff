"""The one resolver: model profiles (registry.yaml ``models:``) and ``--model`` / ``--template`` /
``--reference`` turned into what one task needs (start checkpoint, tokenizer, template, dtype, device,
reference). ``harness run``, ``harness eval``, ``harness finetune`` and the reference scorer all go
through here; it is also the only place that turns ``tiny:<kind>`` names into (built) directories."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from harness import HarnessError
from harness.data.encode import Template
from harness.io import read_yaml
from harness.models.load import CHECKPOINT_TEMPLATE, load_tokenizer
from harness.paths import bundled_dir
from harness.tasks import Task, suggest
from harness.training.adapters import adapter_base

log = logging.getLogger("harness")

PROFILE_KEYS = ("description", "tokenizer", "dtype", "template", "training", "peft_training", "methods", "tasks")


@dataclass
class Profile:
    name: str
    description: str = ""
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    template: Template = field(default_factory=Template)
    training: dict = field(default_factory=dict)
    peft_training: dict = field(default_factory=dict)  # over ``training`` when the run trains an adapter (--peft)
    # method -> hyper-parameters this architecture needs (RMU's layer on a 2-layer tiny model); over the task's
    methods: dict[str, dict] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)


@cache
def get_profiles() -> dict[str, Profile]:
    from harness.plugins import read_registry_file

    out = {}
    for name, d in (read_registry_file().get("models") or {}).items():
        for k in d:
            if k not in PROFILE_KEYS:
                raise HarnessError(f"registry.yaml: models.{name}: unknown key '{k}'{suggest(k, PROFILE_KEYS)}")
        out[name] = Profile(name=name, description=d.get("description", ""), tokenizer=d.get("tokenizer"),
                            dtype=d.get("dtype", "bfloat16"),
                            template=Template.from_dict(d.get("template"), source=f"registry.yaml models.{name}.template"),
                            training=dict(d.get("training") or {}),
                            peft_training=_mapping(name, "peft_training", d.get("peft_training")),
                            methods=_methods(name, d.get("methods")),
                            tasks=dict(d.get("tasks") or {}))
    return out


def _mapping(profile: str, key: str, raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HarnessError(f"registry.yaml: models.{profile}.{key}: expected a mapping of training keys, e.g. {{lr: 5.0e-3}}")
    return dict(raw)


def _methods(profile: str, raw) -> dict[str, dict]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise HarnessError(f"registry.yaml: models.{profile}.methods: expected method name -> {{hyper-parameter: value}}")
    return {str(k): dict(v) for k, v in raw.items()}


@dataclass
class ModelChoice:
    """What a task runs on: resolved from a profile, or from a hub id / directory plus flags."""

    label: str                  # directory name under results/
    start: str                  # checkpoint: hub id, directory or tiny:<kind>
    tokenizer: str              # tokenizer source
    template: Template | None   # None: decide from the tokenizer (chat template or error)
    dtype: str
    reference: str | None       # *_EVAL.json / *_SUMMARY.json log, or a retain model id/dir
    training: dict = field(default_factory=dict)
    peft_training: dict = field(default_factory=dict)  # the profile's training values for adapter runs
    methods: dict = field(default_factory=dict)  # method -> hyper-parameters from the profile
    profile: str | None = None
    # set when the reference was taken from the task's default profile for a checkpoint without one:
    # the tokenizer source of that reference family, compared with the checkpoint's (finalize_template)
    family: str | None = None
    data: dict = field(default_factory=dict)  # unlearning data the profile substitutes (role -> DataSpec)
    note: str | None = None                   # why it does so, said once per run
    template_file: str | None = None          # --template, fingerprinted with the run
    adapter: str | None = None                # a peft adapter directory applied on top of ``start``

    def fingerprints(self, benchmark: str) -> dict:
        """Content fingerprints of the local inputs this choice names (part of every run identity):
        a checkpoint rewritten in place at the same path, or another reference log, is another run."""
        fp = {"start": input_fingerprint(self.start),
              "tokenizer": input_fingerprint(self.tokenizer),
              "reference": input_fingerprint(self.reference, benchmark=benchmark) if self.reference else None}
        if self.template_file:
            fp["template_file"] = input_fingerprint(self.template_file)
        if self.adapter:
            fp["adapter"] = input_fingerprint(self.adapter)
        return fp

    def to_config(self) -> dict:
        return {"label": self.label, "start": self.start, "tokenizer": self.tokenizer, "dtype": self.dtype,
                "template": self.template.to_dict() if self.template else None,
                "reference": self.reference, "profile": self.profile,
                "data": {k: vars(v) for k, v in self.data.items()},
                # only when set, so the identity of every run without an adapter stays as it was
                **({"adapter": self.adapter} if self.adapter else {})}

    def start_path(self) -> str:
        """The start checkpoint as a loadable path or hub id (a tiny model is built here if missing)."""
        return checkpoint_path(self.start)

    def tokenizer_path(self) -> str:
        return checkpoint_path(self.tokenizer)

    def load_dtype(self) -> str:
        """``auto``: a local checkpoint keeps the dtype it was saved in."""
        return self.dtype if self.dtype != "auto" else saved_dtype(self.start_path())

    def apply(self, task: Task) -> Task:
        """The task as this model trains on it: the profile's data substitutions applied."""
        if not self.data:
            return task
        return dataclasses.replace(task, data={**task.data, **self.data})


def task_split(task: Task) -> str:
    """``{split}`` placeholder value: tofu_forget01 -> forget01, muse_news -> news."""
    return task.name.split("_", 1)[1] if "_" in task.name else task.name


def format_reference(ref: str, task: Task) -> str:
    return ref.replace("{task}", task.name).replace("{split}", task_split(task))


def check_reference_placeholder(reference: str | None, n_tasks: int) -> None:
    if reference and n_tasks > 1 and "{task}" not in reference and "{split}" not in reference:
        raise HarnessError(f"--reference {reference!r} is used for {n_tasks} tasks: include {{task}} or {{split}} "
                           "(e.g. logs/{split}/TOFU_EVAL.json) so each task gets its own reference")


def load_template_file(path: str) -> Template:
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"--template {path}: file not found")
    doc = read_yaml(p)
    if not isinstance(doc, dict) and doc is not None:
        raise HarnessError(f"--template {path}: must be a mapping of template_args keys")
    doc = doc or {}
    if "template_args" in doc:
        doc = doc["template_args"] or {}
    return Template.from_dict(doc, source=f"--template {path}")


def _label_for(model: str) -> str:
    """A results-directory name: safe characters only, and no leading dot (never '..' or hidden)."""
    p = Path(model)
    if p.exists():
        return re.sub(r"[^A-Za-z0-9._-]+", "_", p.resolve().name).lstrip(".") or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "__", model).lstrip(".") or "model"


def resolve_model(model: str | None, task: Task, *, template_file: str | None = None,
                  reference: str | None = None, retain: bool = False) -> ModelChoice:
    """``retain``: the profile's retain (reference) checkpoint is the model to score (the Retain row)."""
    profiles = get_profiles()
    model = model or task.model or "tiny"
    if retain and model not in profiles:
        raise HarnessError(f"--retain-model needs a model profile ({', '.join(profiles)}); for a checkpoint "
                           "of your own pass the retain model itself as --model")
    template = load_template_file(template_file) if template_file else None
    if model in profiles:
        prof = profiles[model]
        entry = prof.tasks.get(task.name)
        if entry is None:
            raise HarnessError(f"model profile '{model}' has no entry for task '{task.name}' "
                               f"(it covers {', '.join(sorted(prof.tasks)) or 'no tasks'}); "
                               "pass a checkpoint with --model DIR|HUB_ID and --reference")
        ref = reference or task.reference or _profile_reference(entry)
        start = entry["start"]
        if retain:
            start = entry.get("reference_model")
            if not start:
                raise HarnessError(f"model profile '{model}' names no reference_model for task '{task.name}'")
        return ModelChoice(label=model, start=start, tokenizer=prof.tokenizer or start,
                           template=template or prof.template, dtype=prof.dtype,
                           reference=format_reference(ref, task) if ref else None,
                           training={**prof.training, **(entry.get("training") or {})}, profile=model,
                           peft_training=dict(prof.peft_training),
                           methods=prof.methods,
                           data=_entry_data(model, task, entry), note=entry.get("note"), template_file=template_file)
    if model.startswith("tiny:"):
        return ModelChoice(label=model.replace(":", "_"), start=model, tokenizer=model,
                           template=template or get_profiles()["tiny"].template, dtype="float32",
                           reference=format_reference(reference, task) if reference else task.reference,
                           training=dict(profiles["tiny"].training), methods=profiles["tiny"].methods,
                           peft_training=dict(profiles["tiny"].peft_training),
                           template_file=template_file)
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_local and not Path(model).expanduser().exists():
        raise HarnessError(f"--model {model}: no such directory")
    if looks_local and adapter_base(Path(model).expanduser()):
        return _adapter_choice(Path(model).expanduser(), task, template, template_file, reference)
    if not looks_local and model.count("/") != 1:
        raise HarnessError(f"unknown model '{model}'{suggest(model, profiles)}: not a profile "
                           f"({', '.join(profiles)}), a directory, or a hub id of the form org/name")
    ref, family = (format_reference(reference, task) if reference else task.reference), None
    if ref is None:
        # an outside checkpoint of a task is compared with the task's own reference by default; a warning
        # says so when its tokenizer shows it is of another family (finalize_template)
        default = profiles.get(task.model or "tiny")
        entry = default.tasks.get(task.name) if default else None
        if entry is not None:
            ref = _profile_reference(entry)
            ref = format_reference(ref, task) if ref else None
            is_model = ref is not None and not ref.endswith(".json") and not _has_log(ref)
            family = ref if is_model else (default.tokenizer or entry["start"])
    if template is None and looks_local:
        template = checkpoint_template(Path(model).expanduser())
    return ModelChoice(label=_label_for(model), start=str(Path(model).expanduser()) if looks_local else model,
                       tokenizer=str(Path(model).expanduser()) if looks_local else model,
                       template=template, dtype="bfloat16" if not looks_local else "auto",
                       reference=ref, family=family, template_file=template_file)


def _adapter_choice(directory: Path, task: Task, template, template_file, reference) -> ModelChoice:
    """A peft adapter directory: its base model (``base_model_name_or_path``) resolved as ``--model`` would
    resolve it, with the adapter applied on top and the adapter's own tokenizer and template if it has them."""
    base = adapter_base(directory)
    if Path(base).expanduser().is_dir() and adapter_base(Path(base).expanduser()):
        raise HarnessError(f"{directory}: its base model {base} is itself an adapter; merge that one first")
    choice = resolve_model(base, task, template_file=template_file, reference=reference)
    if template is None:
        template = checkpoint_template(directory)
    has_tok = (directory / "tokenizer_config.json").is_file()
    return dataclasses.replace(choice, label=_label_for(str(directory)), adapter=str(directory),
                               tokenizer=str(directory) if has_tok else choice.tokenizer,
                               template=template or choice.template)


def checkpoint_template(directory: Path) -> Template | None:
    """A checkpoint directory may carry its prompt template (``harness_template.yaml``, template_args
    keys); the embedded tiny models do, so their directories score like any other checkpoint."""
    f = Path(directory) / CHECKPOINT_TEMPLATE
    return load_template_file(str(f)) if f.is_file() else None


def _has_log(ref: str) -> bool:
    p = Path(ref)
    return p.is_dir() and (any(p.glob("*_EVAL.json")) or any(p.glob("*_SUMMARY.json")))


ENTRY_KEYS = ("start", "reference_model", "reference_log", "data", "training", "note")


def _entry_data(profile: str, task: Task, entry: dict) -> dict:
    from harness.tasks import DATA_KEYS, DataSpec

    for k in entry:
        if k not in ENTRY_KEYS:
            raise HarnessError(f"registry.yaml: models.{profile}.tasks.{task.name}: unknown key '{k}'{suggest(k, ENTRY_KEYS)}")
    out = {}
    for role, spec in (entry.get("data") or {}).items():
        if not isinstance(spec, dict) or "path" not in spec or set(spec) - set(DATA_KEYS):
            raise HarnessError(f"registry.yaml: models.{profile}.tasks.{task.name}.data.{role}: expected {{path, name, split}}")
        out[role] = DataSpec(str(spec["path"]), spec.get("name"), spec.get("split", "train"))
    return out


def _profile_reference(entry: dict) -> str | None:
    log = entry.get("reference_log")
    if log:
        p = bundled_dir() / log
        if p.is_file():
            return str(p)
    return entry.get("reference_model")


def finalize_template(choice: ModelChoice, tokenizer) -> Template:
    """A checkpoint without a profile uses its tokenizer's chat template unless --template is given.

    This is where a checkpoint's tokenizer first meets the task, so it also warns when the checkpoint
    is measured against a default reference of another model family.
    """
    check_reference_family(choice, tokenizer)
    if choice.template is not None:
        return choice.template
    if getattr(tokenizer, "chat_template", None):
        return Template(apply_chat_template=True)
    raise HarnessError(f"model '{choice.start}' has no chat template and no profile: pass --template FILE "
                       "(YAML with user_start_tag, user_end_tag, asst_start_tag, asst_end_tag, ...)")


_FAMILY_CHECKED: dict[tuple[str, str], bool] = {}


def check_reference_family(choice: ModelChoice, tokenizer) -> bool:
    """Warn (once per checkpoint and family) when the checkpoint's tokenizer differs from that of the
    default reference: forget quality would compare two model families. A default reference *model* of
    another family is dropped (it is scored with the checkpoint's tokenizer, which it cannot read), so
    metrics that need a reference ask for ``--reference``. Returns True when the families differ."""
    if not choice.family:
        return False
    key = (choice.start, choice.family)
    if key in _FAMILY_CHECKED:
        differs = _FAMILY_CHECKED[key]
    else:
        try:
            ref_tok = load_tokenizer(checkpoint_path(choice.family))
        except HarnessError as exc:  # offline hub: nothing to compare with; the reference loader reports it
            log.debug("cannot compare tokenizers with %s: %s", choice.family, exc)
            _FAMILY_CHECKED[key] = False
            return False
        differs = _FAMILY_CHECKED[key] = ref_tok.get_vocab() != tokenizer.get_vocab()
        if differs and choice.family == choice.reference:
            log.warning("warning: the tokenizer of %s differs from that of the task's reference model %s (another "
                        "model family), which therefore cannot be used: pass --reference with a retain model or "
                        "*_EVAL.json of your checkpoint's family for forget quality and privleak", choice.start,
                        choice.reference)
        elif differs:
            log.warning("warning: the tokenizer of %s differs from that of the task's reference family (%s, "
                        "reference %s): forget quality and privleak compare against a different model family; "
                        "pass --reference with a retain model or *_EVAL.json of your checkpoint's family",
                        choice.start, choice.family, choice.reference)
    if differs and choice.family == choice.reference:
        choice.reference = None
    return differs


def input_fingerprint(name: str, *, benchmark: str | None = None) -> str:
    """What identifies a model, tokenizer, template or reference by content: a local file or directory
    hashes its bytes (a directory reference holding logs hashes the log it is read from); ``tiny:<kind>``
    its deterministic build (size, recipe and kind, so ``--dry-run`` builds nothing); a hub id its name."""
    name = str(name)
    if name.startswith("tiny:"):
        from harness.models.tiny import KINDS, root

        kind = name.split(":", 1)[1]
        recipe = getattr(KINDS.get(kind), "recipe_version", None)
        return f"tiny:{root().name}/{kind}" + (f"@{recipe}" if recipe is not None else "")
    from harness.fingerprint import fingerprint

    p = Path(name).expanduser()
    if p.is_dir() and benchmark and not (p / "config.json").is_file():
        for log_name in (f"{benchmark}_EVAL.json", f"{benchmark}_SUMMARY.json"):
            if (p / log_name).is_file():
                return fingerprint(p / log_name)
    if p.exists():
        return fingerprint(p)
    return f"id:{name}"


def checkpoint_path(name: str) -> str:
    """``tiny:<kind>`` -> the embedded model directory (built on first use); anything else unchanged."""
    name = str(name)
    if name.startswith("tiny:"):
        from harness.models.tiny import tiny_model_dir

        return str(tiny_model_dir(name.split(":", 1)[1]))
    return name


def device() -> str | None:
    """Where scoring runs: the GPU when there is one (training places models through accelerate); in a
    multi-process job each process's own GPU (``LOCAL_RANK``), as every rank scores a shard."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return "cuda"


def saved_dtype(path: str) -> str:
    """The dtype a local checkpoint was saved in (config.json ``dtype``/``torch_dtype``), else float32."""
    import json

    try:
        d = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dt = d.get("dtype") or d.get("torch_dtype") or "float32"
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


def resolve_base_model(model: str, template_file: str | None = None) -> ModelChoice:
    """``harness finetune --model``: a profile's base model, ``tiny:<kind>``, a hub id or a directory."""
    import torch

    template = load_template_file(template_file) if template_file else None
    profiles = get_profiles()
    if model.startswith("tiny:"):
        return ModelChoice(label=model.replace(":", "_"), start=model, tokenizer=model,
                           template=template or profiles["tiny"].template, dtype="float32", reference=None)
    if model in profiles:
        prof = profiles[model]
        if not prof.tokenizer:
            raise HarnessError(f"--model {model}: the profile names no base model; pass a hub id or directory")
        return ModelChoice(label=model, start=prof.tokenizer, tokenizer=prof.tokenizer,
                           template=template or prof.template, dtype=prof.dtype, reference=None, profile=model)
    if Path(model).exists():
        return ModelChoice(label=_label_for(model), start=model, tokenizer=model, template=template, dtype="auto",
                           reference=None)
    return ModelChoice(label=_label_for(model), start=model, tokenizer=model, template=template,
                       dtype="bfloat16" if torch.cuda.is_available() else "float32", reference=None)
