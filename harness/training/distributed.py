"""Accelerate / DeepSpeed glue for the training loop: building the Accelerator, the ZeRO-3 reference
model, consolidating a ZeRO-3 model back into a plain one, and re-launching the CLI under
``accelerate launch`` for ``--accelerate single|ddp|zero3|FILE``.

CPU facts this relies on (checked with torch 2.13, accelerate 1.15, deepspeed 0.19):
- accelerate decides its backend before it knows about DeepSpeed, so on a CUDA-less machine it must be
  told ``gloo`` explicitly, otherwise ranks disagree about the world size.
- while a ZeRO-3 config is registered with transformers, ``from_pretrained`` builds partitioned models;
  ``release()`` unregisters it so evaluation after training loads plain models.
- two-process ZeRO-3 on CPU can abort at interpreter exit; ``clean_exit()`` is the workaround.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch

from harness import HarnessError
from harness.training import adapters

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODES = ("single", "ddp", "zero3")
# Set in the environment of a re-launched child so it does not re-launch again.
LAUNCHED_ENV = "HARNESS_LAUNCHED"


def config_file(mode: str) -> Path:
    """The bundled accelerate config for a mode, or ``mode`` itself when it is a path to a YAML file."""
    if mode in ("ddp", "zero3"):
        return CONFIG_DIR / f"{mode}.yaml"
    path = Path(mode)
    if not path.is_file():
        raise HarnessError(
            f"--accelerate {mode!r}: not one of {', '.join(MODES)} and not an existing accelerate config file"
        )
    return path


def zero3_ds_config() -> dict:
    """The bundled DeepSpeed ZeRO-3 config (spec 4.2) as a dict."""
    with open(CONFIG_DIR / "zero3.json", encoding="utf-8") as fh:
        return json.load(fh)


# The launcher variables an in-process one-process ZeRO-3 run added to os.environ (comma separated). They
# must stay while its process group lives, but they are not a launcher's: ``under_launcher`` ignores
# them and a re-launched child (``launch_command``) does not get them; a child process inherits the list.
OWN_ENV = "HARNESS_SINGLE_PROCESS_ENV"
_SINGLE_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED")


def own_env_keys() -> set[str]:
    """The variables of ``_SINGLE_ENV`` that this harness (not a launcher) put into the environment."""
    return {k for k in os.environ.get(OWN_ENV, "").split(",") if k}


def _drop_inherited_env() -> None:
    """Variables of an in-process ZeRO-3 run that this process inherited (its group is not up here):
    stale, e.g. a port that another process may hold by now, so they go."""
    import torch.distributed as dist

    own = own_env_keys()
    if own and not (dist.is_available() and dist.is_initialized()):
        for key in (*own, OWN_ENV):
            os.environ.pop(key, None)


def under_launcher() -> bool:
    """True when this process was started by accelerate launch / torchrun / deepspeed (or re-launched by us)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or ("LOCAL_RANK" in os.environ and "LOCAL_RANK" not in own_env_keys())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    # DeepSpeed always initialises torch.distributed, even for one process; accelerate then sets
    # ACCELERATE_USE_DEEPSPEED. What was not set before is recorded as ours (OWN_ENV).
    added = {k for k in _SINGLE_ENV if k not in os.environ}
    if added:
        os.environ[OWN_ENV] = ",".join(sorted(added | own_env_keys()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def make_accelerator(mode: str = "single", *, ds_config: dict | None = None, mixed_precision: str | None = None):
    """Build an ``accelerate.Accelerator`` for ``mode``.

    - Under a launcher (``accelerate launch``, torchrun) the launcher's environment decides; ``mode`` only
      matters for ``zero3`` outside a launcher.
    - ``zero3`` outside a launcher runs DeepSpeed ZeRO-3 in this one process (tests, debugging), with
      ``ds_config`` (default: the bundled config) and ``mixed_precision`` (default "no" on CPU, "bf16" on CUDA).
    Any previous accelerate state of this process is reset first, so one process can train several runs.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    AcceleratorState._reset_state()
    GradientState._reset_state()
    _drop_inherited_env()
    # after an in-process ZeRO-3 run its one-process group is still up: accelerate then needs the backend too
    if mode != "zero3" and not under_launcher() and not own_env_keys():
        # "ddp" without a launcher is one plain process (nothing to parallelise over)
        return Accelerator()
    # Only for distributed runs: passing a backend to a plain single process makes accelerate expect one.
    # The long timeout covers rank 0 scoring a model while the other ranks already wait for the next run.
    timeout = timedelta(seconds=int(os.environ.get("HARNESS_DIST_TIMEOUT", "10800")))
    handlers = [InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)]
    if mode == "zero3" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        _single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(ds_config or zero3_ds_config()))
        if mixed_precision is None:
            mixed_precision = "bf16" if torch.cuda.is_available() else "no"
        return Accelerator(deepspeed_plugin=plugin, mixed_precision=mixed_precision, kwargs_handlers=handlers)
    return Accelerator(kwargs_handlers=handlers, mixed_precision=mixed_precision)


def rank() -> int:
    """This process's global rank: from torch.distributed once initialised, else the launcher's ``RANK``.

    (Before the first Accelerator exists the process group is not up yet, but the launcher has set RANK.)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return -1
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(accelerator, *, per_device_batch: int, grad_accum: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed batch/clipping fields with concrete values (we pass no DataLoader to prepare)."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = per_device_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = per_device_batch * grad_accum * accelerator.num_processes
    cfg["gradient_clipping"] = max_grad_norm if max_grad_norm and max_grad_norm > 0 else 0.0
    # A torch or bitsandbytes optimizer is passed as client optimizer (no 35 s DeepSpeed op compile).
    cfg["zero_allow_untested_optimizer"] = True


def prepare_reference(accelerator, ref_model):
    """Place a frozen reference model like the policy: sharded under ZeRO-3 (the TRL recipe), else on device.

    ZeRO-3: a copy of the policy's DeepSpeed config, bucket sizes from the hidden size, no optimizer,
    ``deepspeed.initialize`` and eval mode. Other DeepSpeed stages: stage 0 (a plain replicated copy).
    """
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    if not is_deepspeed(accelerator):
        return ref_model.to(accelerator.device)
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    zero = cfg.setdefault("zero_optimization", {})
    hidden = getattr(getattr(ref_model, "config", None), "hidden_size", None)
    if zero.get("stage") == 3:
        if hidden:
            zero["reduce_bucket_size"] = hidden * hidden
            zero["stage3_param_persistence_threshold"] = 10 * hidden
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=ref_model, config=cfg)
    engine.eval()
    return engine


def is_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def consolidate(accelerator, prepared_model):
    """Return a plain (unsharded, unwrapped) copy of the trained model on every rank.

    Under ZeRO-3 each parameter is gathered in turn into a model built on the meta device, so peak memory
    is one full model plus one gathered tensor. Elsewhere the unwrapped model itself is returned.
    """
    model = accelerator.unwrap_model(prepared_model)
    if zero_stage(accelerator) != 3:
        return model
    import deepspeed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    # The engine's parameter dtype (bf16 when DeepSpeed trains in bf16) is what a ZeRO-3 save would write.
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        if adapters.is_adapted(model):  # the same adapter shape on a plain base; names then match one to one
            base = model.get_base_model()
            plain = adapters.like(model, type(base)(copy.deepcopy(base.config)).to(dtype))
        else:
            plain = type(model)(copy.deepcopy(model.config)).to(dtype)
    plain.to_empty(device=accelerator.device)
    params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            params[name].data.copy_(p.data.to(params[name].dtype))
    # ZeRO-3 does not partition buffers (rotary frequencies etc.), copy them as they are.
    buffers = dict(plain.named_buffers())
    for name, b in model.named_buffers():
        buffers[name].data.copy_(b.data)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    plain.train(model.training)
    return plain


@contextlib.contextmanager
def plain_view(accelerator, prepared_model):
    """A plain model to score in the middle of training: the unwrapped model itself, or under ZeRO-3 a
    consolidated copy on every rank (all ranks gather together), dropped afterwards; the DeepSpeed config
    registered with transformers is put back for the rest of training."""
    if zero_stage(accelerator) != 3:
        yield accelerator.unwrap_model(prepared_model)
        return
    plain = consolidate(accelerator, prepared_model)
    try:
        yield plain
    finally:
        del plain
        dschf = getattr(accelerator.state.deepspeed_plugin, "dschf", None)
        if dschf is not None:
            from transformers.integrations.deepspeed import set_hf_deepspeed_config

            set_hf_deepspeed_config(dschf)


def release(accelerator) -> None:
    """Forget the DeepSpeed config registered with transformers (so later loads are plain) and free memory."""
    if is_deepspeed(accelerator):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    accelerator.free_memory()


def clean_exit(code: int = 0) -> None:
    """End a multi-process DeepSpeed run: barrier, flush, ``os._exit`` (avoids the exit-time abort seen with gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - exiting anyway; the barrier is best effort
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch_command(argv: list[str], mode: str, *, num_processes: int | None = None,
                   module: str = "harness") -> tuple[list[str], dict]:
    """The command and environment that re-run ``python -m <module> <argv>`` under the launcher for ``mode``.

    ``argv`` is the CLI argument list without the program name; it may keep ``--accelerate``: the child
    sees that it runs under a launcher and does not re-launch. Processes: ``num_processes``, else
    ``$HARNESS_NUM_PROCESSES``, else the visible GPUs (1 on CPU); for a user's config FILE its own
    ``num_processes`` unless one of the first two is given. On CPU, mixed precision is switched off.
    """
    own = own_env_keys() | {OWN_ENV}
    env = {k: v for k, v in os.environ.items() if k not in own}  # the launcher sets its own
    env[LAUNCHED_ENV] = "1"
    explicit = num_processes or (int(os.environ["HARNESS_NUM_PROCESSES"]) if os.environ.get("HARNESS_NUM_PROCESSES") else None)
    n = explicit or max(1, torch.cuda.device_count())
    cuda = torch.cuda.is_available()
    if mode == "ddp" and not cuda:
        # accelerate's multi-CPU launch needs mpirun; torchrun with ACCELERATE_USE_CPU gives gloo DDP.
        env["ACCELERATE_USE_CPU"] = "1"
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                f"--master_port={_free_port()}", "-m", module, *argv], env
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file(mode)),
           "--main_process_port", str(_free_port())]
    if mode in MODES or explicit:
        cmd += ["--num_processes", str(n)]
    if mode == "zero3":
        # accelerate resolves deepspeed_config_file against the working directory, not the YAML's folder.
        cmd += ["--deepspeed_config_file", str(CONFIG_DIR / "zero3.json")]
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        cmd += ["--mixed_precision", "no"]
    return [*cmd, "-m", module, *argv], env


def relaunch(argv: list[str], mode: str, *, num_processes: int | None = None) -> int:
    """Re-run ``harness <argv>`` under the launcher for ``mode``; returns its exit code.

    Returns -1, and launches nothing, when ``mode`` is "single" or this process already runs under a
    launcher: the caller then simply continues in-process. Typical CLI use::

        rc = distributed.relaunch(argv, args.accelerate)
        if rc != -1:
            return rc
    """
    import subprocess

    if not mode or mode == "single" or under_launcher():
        return -1
    config_file(mode)  # a clear error for an unknown mode before anything starts
    cmd, env = launch_command(argv, mode, num_processes=num_processes)
    return subprocess.call(cmd, env=env)
