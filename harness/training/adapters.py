"""Parameter-efficient training through the real ``peft`` library.

- ``peft_settings``: ``--peft lora`` with ``--lora-*`` flags (defaults for Llama-family models), or a PEFT
  config file (JSON/YAML with ``peft_type``, or a directory holding ``adapter_config.json``), as the plain
  dict that goes into config.yaml and the run hash.
- ``attach``: the adapter on a model; only its weights train. Under gradient checkpointing the inputs
  of the frozen embedding are made to require grad so the checkpointed blocks pass gradients on to the
  adapters (with reentrant checkpointing they would otherwise stay untrained).
- ``disabled``: the frozen start model for free: the same model with the adapter switched off (eval
  mode), so NPO / IdkDPO / KL-retain references need no second copy of the weights.
- ``save_merged``: a plain checkpoint with the adapter merged into the base weights.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

from harness import HarnessError

# Every linear layer of a Llama block (attention and MLP), as the QLoRA paper found works best.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}
ADAPTER_CONFIG = "adapter_config.json"


def _need_peft():
    try:
        import peft
    except ImportError:
        raise HarnessError("--peft needs the 'peft' package: pip install peft") from None
    return peft


def peft_settings(peft: str | None, *, r=None, alpha=None, dropout=None, target_modules: str | None = None,
                  load_in_4bit: bool = False) -> dict | None:
    """The adapter settings recorded with a run (None: full finetuning)."""
    flags = {"--lora-r": r, "--lora-alpha": alpha, "--lora-dropout": dropout, "--lora-target-modules": target_modules}
    given = [k for k, v in flags.items() if v is not None]
    if not peft:
        if given or load_in_4bit:
            raise HarnessError(f"{(given or ['--load-in-4bit'])[0]} needs --peft lora (or --peft CONFIG_FILE)")
        return None
    if peft == "lora":
        targets = [t.strip() for t in (target_modules or ",".join(LLAMA_TARGETS)).split(",") if t.strip()]
        if not targets:
            raise HarnessError("--lora-target-modules: give at least one module name, e.g. q_proj,v_proj")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
                  "r": int(r if r is not None else LORA_DEFAULTS["r"]),
                  "lora_alpha": float(alpha if alpha is not None else LORA_DEFAULTS["lora_alpha"]),
                  "lora_dropout": float(dropout if dropout is not None else LORA_DEFAULTS["lora_dropout"]),
                  "target_modules": targets}
        source = "flags"
    else:
        if given:
            raise HarnessError(f"{given[0]} cannot be combined with --peft {peft}: set it in that config file")
        config, source = read_peft_file(peft), str(peft)
    out = {"config": config, "source": source, "load_in_4bit": bool(load_in_4bit)}
    peft_config(out)  # a bad config file fails here, before any model work
    return out


def read_peft_file(path: str) -> dict:
    from harness.io import read_yaml

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ADAPTER_CONFIG
    if not p.is_file():
        raise HarnessError(f"--peft {path}: not 'lora' and not a PEFT config file (JSON/YAML, or a directory "
                           f"with {ADAPTER_CONFIG})")
    try:
        doc = json.loads(p.read_text()) if p.suffix == ".json" else read_yaml(p)
    except ValueError as exc:
        raise HarnessError(f"--peft {p}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "peft_type" not in doc:
        raise HarnessError(f"--peft {p}: expected a mapping with 'peft_type' (e.g. LORA), as peft's "
                           f"{ADAPTER_CONFIG} has")
    # where an adapter was trained and which version wrote it say nothing about the adapter's shape
    return {k: v for k, v in doc.items() if k not in ("base_model_name_or_path", "revision", "peft_version",
                                                      "auto_mapping")}


def peft_config(settings: dict):
    """The ``peft`` config object of ``settings``."""
    peft = _need_peft()
    try:
        return peft.get_peft_config(dict(settings["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise HarnessError(f"--peft {settings.get('source')}: bad PEFT config: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def module_names(model) -> list[str]:
    """The distinct leaf names of the model's linear-like layers (what target_modules may name)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and not list(module.children()) and hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2:
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def check_targets(model, config) -> None:
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, (list, set, tuple)):
        return  # a regex or "all-linear": peft resolves it and reports its own mismatch
    names = module_names(model)
    missing = [t for t in sorted(targets) if t not in names and not any(n.endswith(t) for n in names)]
    if missing:
        raise HarnessError(f"--lora-target-modules: {', '.join(missing)} match no module of the model; "
                           f"its layers include {', '.join(names[:8])}")


def base_name(name: str) -> str:
    """The base-model name of a parameter of an adapted model: ``base_model.model.x.q_proj.lora_A.default.weight``
    and ``...q_proj.base_layer.weight`` are both ``x.q_proj.weight``."""
    name = name.removeprefix("base_model.model.")
    return re.sub(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+|\.base_layer", "", name)


def is_adapted(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def attach(model, settings: dict, *, gradient_checkpointing: bool = False):
    """``model`` with a fresh adapter from ``settings`` (a ``peft.PeftModel``); only adapter weights train."""
    peft = _need_peft()
    config = peft_config(settings)
    check_targets(model, config)
    if settings.get("load_in_4bit"):
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    try:
        with warnings.catch_warnings():  # peft asks transformers 5 the deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise HarnessError(f"--peft {settings.get('source')}: {_first(exc)}; the model's layers include "
                           f"{', '.join(module_names(model)[:8])}") from None


@contextlib.contextmanager
def disabled(model):
    """The adapted ``model`` as its frozen start model: adapter off and eval mode (no adapter dropout)."""
    was = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was)


def like(model, base):
    """``base`` (a plain model, e.g. on the meta device) given an adapter shaped like ``model``'s."""
    peft = _need_peft()
    return peft.get_peft_model(base, model.peft_config[model.active_adapter])


def save_merged(model, tokenizer, out: Path) -> None:
    """Merge the adapter into the base weights (in place: call it last) and save a plain checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def adapter_base(directory) -> str | None:
    """The base model an adapter directory was trained on (``base_model_name_or_path``), else None."""
    f = Path(directory) / ADAPTER_CONFIG
    if not f.is_file():
        return None
    try:
        base = json.loads(f.read_text()).get("base_model_name_or_path")
    except ValueError as exc:
        raise HarnessError(f"{f}: not valid JSON: {exc}") from None
    if not base:
        raise HarnessError(f"{f}: names no base_model_name_or_path, so the base model to load is unknown")
    return str(base)
