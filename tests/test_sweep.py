"""Sweeps: comma lists and --sweep files expand the grid; each point is its own content-addressed cell; every
value is typed before anything runs."""

from pathlib import Path

import pytest
from conftest import cheap_task_yaml, run_cli

from harness import HarnessError
from harness.cli import parse_options
from harness.commands import run as runner
from harness.commands import sweep
from harness.options import RunOptions, slurm_minutes, to_argv
from harness.plugins import get_registry

TASK = cheap_task_yaml("t16_sweep", "forget01 with one cheap metric, for the sweep tests")


@pytest.fixture
def tasks(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "t16_sweep.yaml").write_text(TASK)
    return d


def grid(tasks, out, *extra):
    opts = parse_options(["run", "-t", "t16_sweep", "--model", "tiny:full", "--include-tasks", tasks, "-o", out,
                          "--limit", "2", *extra])
    return runner.expand(opts, get_registry(include_tasks=opts.include_tasks))


def test_comma_lists_expand_to_the_cartesian_product_in_stable_order(tasks, tmp_path):
    cells = grid(tasks, tmp_path, "-m", "npo,grad_diff", "--lr", "5e-4,1e-3", "--set", "npo.beta=0.1,0.5",
                 "--epochs", "1,2", "--seeds", "0,1")
    # npo: 2 lr x 2 epochs x 2 beta; grad_diff: 2 lr x 2 epochs (npo.beta is not its axis); x 2 seeds
    assert len(cells) == (8 + 4) * 2
    npo = [(c.point, c.seed) for c in cells if c.method_name == "npo"]
    assert npo[:4] == [({"lr": 5e-4, "epochs": 1, "npo.beta": 0.1}, 0), ({"lr": 5e-4, "epochs": 1, "npo.beta": 0.1}, 1),
                       ({"lr": 5e-4, "epochs": 1, "npo.beta": 0.5}, 0), ({"lr": 5e-4, "epochs": 1, "npo.beta": 0.5}, 1)]
    assert [c.point for c in cells if c.method_name == "grad_diff"][::2] == [
        {"lr": 5e-4, "epochs": 1}, {"lr": 5e-4, "epochs": 2}, {"lr": 1e-3, "epochs": 1}, {"lr": 1e-3, "epochs": 2}]
    for c in cells:  # the point reaches what trains
        assert (c.train["lr"], c.train["epochs"]) == (c.point["lr"], c.point["epochs"])
        if c.method_name == "npo":
            assert c.method.beta == c.point["npo.beta"] and c.config["method"]["params"]["beta"] == c.method.beta
    # seeds of one point share the hash; different points never do
    by_point = {}
    for c in cells:
        by_point.setdefault((c.method_name, tuple(c.point.items())), set()).add(c.dir.name.rpartition("-s")[0])
    assert all(len(h) == 1 for h in by_point.values())
    assert len({h for hs in by_point.values() for h in hs}) == len(by_point) == 12
    assert cells == grid(tasks, tmp_path, "-m", "npo,grad_diff", "--lr", "5e-4,1e-3", "--set", "npo.beta=0.1,0.5",
                         "--epochs", "1,2", "--seeds", "0,1")  # stable


def test_printed_rows_of_a_sweep_name_their_point(tasks, tmp_path):
    cells = grid(tasks, tmp_path, "-m", "npo,grad_diff", "--lr", "5e-4,1e-3", "--set", "npo.beta=0.1,0.5",
                 "--epochs", "2")
    names = sweep.row_names(cells)
    assert [names[id(c)] for c in cells] == [
        "npo {lr=0.0005, npo.beta=0.1}", "npo {lr=0.0005, npo.beta=0.5}", "npo {lr=0.001, npo.beta=0.1}",
        "npo {lr=0.001, npo.beta=0.5}", "grad_diff {lr=0.0005}", "grad_diff {lr=0.001}"]  # epochs=2 is not swept
    rows = [("t", names[id(c)], 0, {"metrics": {"forget_quality": {"value": 0.5}}}) for c in cells]
    assert "npo {lr=0.001, npo.beta=0.5}" in runner.summary_table(rows)
    plain = grid(tasks, tmp_path, "-m", "npo")
    assert sweep.row_names(plain) == {id(plain[0]): "npo"}


def test_a_sweep_point_is_the_same_cell_as_the_single_run(tasks, tmp_path):
    swept = grid(tasks, tmp_path, "-m", "npo", "--lr", "5e-4,1e-3", "--set", "npo.beta=0.1,0.5")
    (single,) = grid(tasks, tmp_path, "-m", "npo", "--lr", "1e-3", "--set", "npo.beta=0.5")
    assert swept[3].dir == single.dir and single.point == {}  # one value is no sweep axis to show
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("lr: [5e-4, 1e-3]\nnpo: {beta: [0.1, 0.5]}\ngrad_diff.alpha: [1, 2]\n")
    from_file = grid(tasks, tmp_path, "-m", "npo", "--sweep", sweep_file)  # grad_diff: not selected, waits
    assert [c.dir for c in from_file] == [c.dir for c in swept]


def test_dry_run_prints_each_point_and_its_hash(tasks, tmp_path):
    _, out, _ = run_cli("run", "-t", "t16_sweep", "-m", "grad_ascent", "--model", "tiny:full", "--include-tasks",
                        tasks, "-o", tmp_path / "o", "--lr", "1e-3,2e-3", "--limit", "2", "--dry-run")
    cells = grid(tasks, tmp_path / "o", "-m", "grad_ascent", "--lr", "1e-3,2e-3")
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and "{lr=0.001}" in lines[0] and "{lr=0.002}" in lines[1]
    for ln, c in zip(lines, cells):
        assert f"hash={c.dir.name.rpartition('-s')[0]}" in ln and str(c.dir) in ln
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, words", [
    (["--set", "npo.beta=0.1,abc"], ["--set npo.beta=abc", "cannot parse beta='abc' as float"]),
    (["--set", "npo.beta=0.1,0.10"], ["npo.beta", "given more than once"]),
    (["--set", "npo.bta=0.1,0.2"], ["npo.bta", "no hyper-parameter 'bta'"]),
    (["--lr", "1e-3,fast"], ["--lr", "'fast' is not a number"]),
    (["--lr", "1e-3,0.001"], ["--lr", "given more than once"]),
    (["--epochs", "1,2.5"], ["--epochs must be a whole number, got 2.5"]),
    (["--sweep", "SWEEP", "--lr", "1e-3"], ["lr is given twice", "--lr"]),
    (["--sweep", "SWEEP:npo.beta: [0.1, big]"], ["npo.beta=big", "cannot parse beta='big' as float"]),
    (["--sweep", "SWEEP:lrr: [1e-3]"], ["lrr: unknown key", "did you mean 'lr'"]),
    (["--sweep", "SWEEP:npoo.beta: [1]"], ["unknown method 'npoo'", "did you mean 'npo'"]),
])
def test_a_bad_sweep_value_is_one_line_naming_the_key_before_any_work(tasks, tmp_path, extra, words):
    sweep_file = tmp_path / "sweep.yaml"
    extra = list(extra)
    for i, a in enumerate(extra):
        if a.startswith("SWEEP"):
            sweep_file.write_text(a.partition(":")[2] or "lr: [1e-3, 2e-3]\n")
            extra[i] = str(sweep_file)
    out = tmp_path / "out"
    rc, stdout, err = run_cli("run", "-t", "t16_sweep", "-m", "npo", "--model", "tiny:full", "--include-tasks", tasks,
                              "-o", out, *extra, check=False)
    assert rc == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0]
    assert not out.exists()  # nothing trained, not even a run directory


def test_options_round_trip_through_the_flags_a_job_gets():
    opts = parse_options(["run", "-t", "tofu_*", "-m", "npo,grad_diff", "--lr", "1e-5,2e-5", "--set", "npo.beta=0.1,0.2",
                          "--set", "grad_diff.alpha=2", "--seeds", "0,1", "--accelerate", "zero3", "--save-model",
                          "--launcher", "slurm", "--slurm-setup", "module load cuda", "--slurm-mem", "64G",
                          "--no-shared-prefix", "--attacks", "relearn", "--attack-set", "relearn.epochs=3",
                          "-o", "res dir"])
    argv = opts.launch_argv()
    assert not any(a.startswith(("--launcher", "--slurm")) for a in argv)
    assert "--no-shared-prefix" in argv  # a store_false flag parses back (it was "--shared-prefix": every job failed)
    again = parse_options(["run", *argv])
    assert again == RunOptions(**{**vars(opts), "launcher": None, "slurm_setup": [], "slurm_mem": None})
    assert to_argv(RunOptions(tasks="a", methods="b")) == ["--tasks=a", "--methods=b"]


@pytest.mark.parametrize("text, minutes", [("90", 90), ("4:00:00", 240), ("1-12:00:00", 2160), ("1-2", 1560),
                                           ("30:30", 31)])
def test_slurm_time_syntax(text, minutes):
    assert slurm_minutes(text) == minutes


def test_bad_slurm_time_is_an_error():
    with pytest.raises(HarnessError, match="--slurm-time '4h'"):
        slurm_minutes("4h")


def test_hash_ignores_where_the_grid_runs(tasks, tmp_path):
    """Launcher flags choose where a cell runs, not what it is: the same directories either way."""
    here = grid(tasks, tmp_path, "-m", "grad_ascent", "--lr", "1e-3,2e-3")
    there = grid(tasks, tmp_path, "-m", "grad_ascent", "--lr", "1e-3,2e-3", "--launcher", "slurm",
                 "--slurm-partition", "gpu", "--slurm-time", "90")
    assert [c.dir for c in here] == [c.dir for c in there]
    assert all(Path(c.dir).parent == tmp_path / "tiny_full" / "t16_sweep" / "grad_ascent" for c in here)
