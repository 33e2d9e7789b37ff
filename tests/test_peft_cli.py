"""``harness run --peft lora`` end to end on the test-size tiny model: scored with the adapter applied,
the adapter and the merged checkpoint saved, ``harness eval`` of either giving the run's numbers, and
the PEFT settings in config.yaml and the run hash."""

import json

import pytest
from conftest import cheap_task_yaml, run_cli

from harness.io import read_yaml

TASK = cheap_task_yaml("t15_peft", "forget01 with one cheap metric, for the LoRA tests")


def _prob(d):
    return json.loads((d / "scores.json").read_text())["metrics"]["forget_Q_A_Prob"]["value"]


@pytest.mark.slow
def test_lora_run_saves_adapter_and_merged_model_that_eval_scores_alike(tmp_path, tiny_full_dir):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(TASK)
    common = ["-t", "t15_peft", "--include-tasks", tasks, "--model", tiny_full_dir, "--limit", "8"]
    train = ["-m", "npo", "--epochs", "2", "--lr", "1e-2", "--train-batch-size", "4", "--per-device-batch", "4",
             "--optimizer", "adamw_torch"]
    out = tmp_path / "res"
    _, dry_full, _ = run_cli("run", *common, *train, "--dry-run", "-o", out)
    run_cli("run", *common, *train, "--peft", "lora", "--lora-r", "8", "--save-model", "--merge", "-o", out)
    (cell,) = (out / "full" / "t15_peft" / "npo").iterdir()
    assert cell.name.split("-")[0] not in dry_full  # the adapter settings are part of the run hash
    cfg = read_yaml(cell / "config.yaml")
    assert cfg["training"]["peft"]["config"]["r"] == 8
    assert cfg["plan"]["reference_source"] == "disabled adapter"
    assert cfg["plan"]["trainable_parameters"] > 0
    baseline = _prob(out / "full" / "t15_peft" / "finetuned" / next(iter(
        p.name for p in (out / "full" / "t15_peft" / "finetuned").iterdir())))
    unlearned = _prob(cell)
    assert unlearned < 0.9 * baseline  # scored with the adapter applied: NPO lowered the forget probability
    model = cell / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()  # merged, plain
    assert (model / "adapter" / "adapter_config.json").is_file()
    for name, directory in (("adapter", model / "adapter"), ("merged", model)):
        run_cli("eval", "-t", "t15_peft", "--include-tasks", tasks, "--model", directory, "--limit", "8",
                "--name", name, "-o", tmp_path / "ev")
    (ev_adapter,) = (tmp_path / "ev" / "adapter" / "t15_peft" / "adapter").iterdir()
    (ev_merged,) = (tmp_path / "ev" / "model" / "t15_peft" / "merged").iterdir()
    assert _prob(ev_adapter) == unlearned  # base + adapter through the same scoring path: the same number
    assert _prob(ev_merged) == pytest.approx(unlearned, rel=1e-4)  # merged weights: up to rounding
    assert read_yaml(ev_adapter / "config.yaml")["model"]["adapter"] == str(model / "adapter")


@pytest.mark.slow
def test_finetune_with_lora_writes_the_adapter_or_the_merged_checkpoint(tmp_path):
    argv = ["finetune", "--model", "tiny:base", "--split", "forget01", "--epochs", "1", "--lr", "1e-2",
            "--train-batch-size", "8", "--per-device-batch", "8", "--optimizer", "adamw_torch", "--peft", "lora"]
    run_cli(*argv, "-o", tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and not (tmp_path / "a" / "config.json").exists()
    assert read_yaml(tmp_path / "a" / "finetune.yaml")["training"]["peft"]["config"]["peft_type"] == "LORA"
    rc, _, err = run_cli(*argv, "-o", tmp_path / "a", check=False)  # an adapter is a checkpoint to protect
    assert rc == 2 and "already holds a checkpoint" in err
    run_cli(*argv, "--merge", "-o", tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "adapter" / "adapter_config.json").is_file()


def test_the_tiny_profile_gives_adapter_runs_their_own_learning_rate(tmp_path):
    """registry.yaml models.tiny.peft_training: a LoRA update starts at zero and moved the default tiny
    model little at the full-finetuning lr; it applies to --peft runs only, and --lr still wins."""
    from harness.cli import parse_options
    from harness.commands.run import expand
    from harness.models.profiles import get_profiles
    from harness.plugins import get_registry

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(TASK)
    prof = get_profiles()["tiny"]

    def lr(*extra):
        opts = parse_options(["run", "-t", "t15_peft", "--include-tasks", tasks, "-m", "npo", "--model", "tiny:full",
                              "-o", tmp_path / "res", *extra])
        (cell,) = expand(opts, get_registry(include_tasks=opts.include_tasks))
        return cell.train["lr"]

    assert prof.peft_training["lr"] > prof.training["lr"]
    assert lr() == prof.training["lr"]
    assert lr("--peft", "lora") == prof.peft_training["lr"]
    assert lr("--peft", "lora", "--lr", "1e-4") == 1e-4
