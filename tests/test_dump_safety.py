"""Issue 21: no data loss and no silent wrong runs around the dump folder and its checkpoints.

--job.overwrite checks before it deletes and deletes only the old run's outputs; incomplete step
directories never resume; a resume from an earlier step replaces the later steps of the old timeline;
non-finite weights are never written; a resume takes the new optimizer and schedule flags.
Trainer cases run `lmlab.train.main` in this process on a copy of one 3-step run (checkpoints at 2 and 3),
training one step each.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lmlab.train
from conftest import REPO
from lmlab.checkpoint import complete_steps, export_hf
from lmlab.config import JobConfig, parse_args
from lmlab.distributed import init_distributed
from lmlab.dump import check_dump_contents
from lmlab.errors import UserError
from lmlab.optim import lr_multiplier
from test_checkpoint import checkpointer, make_states, tiny_llama, train_steps
from tiny_run import metrics_lines, small_args, small_config


def args(corpus: dict, dump: Path, **extra: str | None) -> list[str]:
    """The command of the earlier run: 3 steps, a checkpoint every step, the latest 2 kept."""
    return small_args(corpus, dump, **{"training.steps": "3", "checkpoint.interval": "1", **extra})


@pytest.fixture(scope="module")
def earlier(corpus, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("earlier") / "dump"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert lmlab.train.main(args(corpus, dump)) == 0
    assert complete_steps(dump / "checkpoint") == [2, 3]
    return dump


@pytest.fixture
def dump(earlier, tmp_path, monkeypatch) -> Path:
    """A copy of the earlier run's dump, with a file of the user's next to it."""
    copy = tmp_path / "parent" / "dump"
    shutil.copytree(earlier, copy)
    (tmp_path / "parent" / "precious.txt").write_text("not lmlab's")
    monkeypatch.chdir(REPO)
    return copy


def everything(dump: Path) -> dict[str, bytes]:
    """The dump's parent folder, file by file (the dump's logs and lock file aside: each start writes them)."""
    return {str(p.relative_to(dump.parent)): p.read_bytes() for p in sorted(dump.parent.rglob("*"))
            if p.is_file() and "logs" not in p.parts and p.name != ".lmlab.lock"}


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


# --- 1. --job.overwrite checks first, deletes last and only the old run's outputs ---------------------

def link(dump: Path, name: str, target: str) -> str:
    (dump / name).symlink_to(target)
    return name


REFUSED = {  # name: (flags, what the error line must name); each also passes --job.overwrite
    "tb-folder-empty": ({"metrics.save_tb_folder": ""}, "--metrics.save_tb_folder"),
    "checkpoint-folder-parent": ({"checkpoint.folder": ".."}, "--checkpoint.folder"),
    "checkpoint-folder-absolute": ({"checkpoint.folder": "/tmp"}, "--checkpoint.folder"),
    "checkpoint-folder-symlink-out": ({"checkpoint.folder": lambda d: link(d, "ckpt", "..")},
                                      "--checkpoint.folder: 'ckpt' resolves to"),
    "tb-folder-symlink-to-dump": ({"metrics.save_tb_folder": lambda d: link(d, "tb2", ".")},
                                  "--metrics.save_tb_folder: 'tb2' is the dump folder"),
    "initial-load-path-missing": ({"checkpoint.initial_load_path": "/nonexistent/step-9"}, "/nonexistent/step-9"),
    "load-step-with-overwrite": ({"checkpoint.load_step": "7"}, "--checkpoint.load_step 7"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_overwrite_refuses_bad_paths_and_loads_before_touching_anything(case, corpus, dump, capsys):
    flags, expected = REFUSED[case]
    flags = {k: v(dump) if callable(v) else v for k, v in flags.items()}
    before = everything(dump)
    assert lmlab.train.main(args(corpus, dump, **{"job.overwrite": "true", **flags})) == 2
    assert expected in last_error(capsys)
    assert everything(dump) == before  # the checkpoints, metrics, export and the parent's files


def test_overwrite_deletes_only_the_old_runs_outputs_once_the_new_run_has_loaded(corpus, dump, capsys):
    (dump / "notes.txt").write_text("mine")
    (dump / "tb").mkdir()
    (dump / "tb" / "events.out.tfevents.1.host").write_bytes(b"old events")
    (dump / "tb" / "notes.txt").write_text("mine too")
    (dump / "checkpoint" / "step-3.tmp").mkdir()
    old_export = (dump / "model.safetensors").read_bytes()
    # warm-start from the old run's own step 3: read before the old checkpoints go
    extra = {"job.overwrite": "true", "training.steps": "1", "training.seq_len": "16",
             "checkpoint.initial_load_path": str(dump / "checkpoint" / "step-3")}
    assert lmlab.train.main(args(corpus, dump, **extra)) == 0
    assert f"warm start: model weights from {dump / 'checkpoint' / 'step-3'}" in capsys.readouterr().out
    assert complete_steps(dump / "checkpoint") == [1]
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-1"]
    assert [r["step"] for r in metrics_lines(dump)] == [1]
    assert (dump / "model.safetensors").read_bytes() != old_export
    assert sorted(p.name for p in (dump / "tb").iterdir()) == ["notes.txt"]
    assert (dump / "notes.txt").read_text() == "mine"
    assert (dump.parent / "precious.txt").read_text() == "not lmlab's"


# --- 2. a step directory without lmlab's record never resumes ----------------------------------------

def test_a_step_without_its_lmlab_json_is_ignored_removed_and_not_resumed_as_step_0(corpus, dump, capsys):
    (dump / "checkpoint" / "step-3" / "lmlab.json").unlink()  # DCP's files are all there
    logged = len(metrics_lines(dump))
    assert lmlab.train.main(args(corpus, dump)) == 0
    out = capsys.readouterr().out
    assert "removing the incomplete checkpoint" in out and "resumed from step 2" in out
    assert [r["step"] for r in metrics_lines(dump)[logged:]] == [3]  # not steps 1 to 3 again
    assert complete_steps(dump / "checkpoint") == [2, 3]


def test_a_corrupt_lmlab_json_named_by_load_step_is_one_line_and_kept(corpus, dump, capsys):
    record = dump / "checkpoint" / "step-3" / "lmlab.json"
    record.write_text("{not json")
    before = everything(dump)
    assert lmlab.train.main(args(corpus, dump, **{"checkpoint.load_step": "3"})) == 2
    assert "--checkpoint.load_step 3: " in (line := last_error(capsys))
    assert "is incomplete or corrupt (unreadable lmlab.json" in line and "available: 2" in line
    assert everything(dump) == before


def test_incomplete_steps_are_not_counted_and_foreign_checkpoints_are_refused_not_deleted(tmp_path):
    import torch.distributed.checkpoint as dcp

    states = make_states()
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, states)
    ckpt.save(2, states)
    folder = tmp_path / "checkpoint"
    (folder / "step-2" / "lmlab.json").write_text(json.dumps({"step": 7}))  # not this step's record
    shutil.copytree(folder / "step-1", folder / "step-5")
    (folder / "step-5" / "lmlab.json").unlink()
    assert ckpt.steps() == [1]
    assert checkpointer(tmp_path).load(make_states()) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["step-1"]  # the incomplete ones were removed
    dcp.save(tiny_llama().state_dict(), checkpoint_id=folder / "step-3")  # flame's layout, no lmlab.json
    with pytest.raises(UserError, match=r"step-3 is a checkpoint that lmlab did not write"):
        checkpointer(tmp_path).load(make_states())
    assert (folder / "step-3" / ".metadata").is_file()


# --- 3. a resume from an earlier step replaces the later steps of the old timeline -------------------

def test_resuming_from_an_earlier_step_replaces_the_old_timelines_later_step(corpus, dump, capsys):
    old = (dump / "checkpoint" / "step-3" / "__0_0.distcp").read_bytes()
    extra = {"checkpoint.load_step": "2", "checkpoint.exclude_from_loading": "dataloader"}  # other batches
    assert lmlab.train.main(args(corpus, dump, **extra)) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "step-3 in " in out and "another timeline" in out
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-2", "step-3"]
    assert complete_steps(dump / "checkpoint") == [2, 3]
    assert (dump / "checkpoint" / "step-3" / "__0_0.distcp").read_bytes() != old


def test_keep_latest_k_never_counts_the_later_steps_of_another_timeline(tmp_path):
    states = make_states()
    for step in (2, 4, 6):
        checkpointer(tmp_path).save(step, states)
    resumed = checkpointer(tmp_path, load_step=2, keep_latest_k=2)
    assert resumed.load(make_states()) == 2
    resumed.save(3, states)  # counted with 2 only: step 3 is kept, 4 and 6 wait to be replaced
    assert complete_steps(tmp_path / "checkpoint") == [2, 3, 4, 6]
    resumed.save(4, states)
    assert complete_steps(tmp_path / "checkpoint") == [3, 4, 6]


# --- 4. non-finite weights are never written ------------------------------------------------------------

def test_non_finite_weights_are_not_saved_and_earlier_checkpoints_stay(corpus, dump, monkeypatch, capsys):
    real = lmlab.train.clip_grad_norm

    def poison(model, max_norm):  # the optimizer step then writes NaN weights, as --optimizer.lr inf did
        norm = real(model, max_norm)
        next(model.parameters()).data.fill_(float("nan"))
        return norm

    monkeypatch.setattr(lmlab.train, "clip_grad_norm", poison)
    def written(dump: Path) -> dict[str, bytes]:  # the checkpoints and the HF export
        return {k: v for k, v in everything(dump).items() if k.startswith("dump/checkpoint/")
                or k in ("dump/model.safetensors", "dump/config.json")}

    before = written(dump)
    assert lmlab.train.main(args(corpus, dump, **{"training.steps": "4"})) == 2
    assert last_error(capsys) == (
        "error: step 4: the model weights are not finite (NaN or inf); not saving step-4; earlier checkpoints are "
        "intact (resume from one with a lower --optimizer.lr)")
    assert written(dump) == before


def test_hf_export_refuses_non_finite_weights(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("inf")
    with pytest.raises(UserError, match=r"^step 7: the model weights are not finite .* previous export") as err:
        export_hf(model, None, tmp_path, "float32", init_distributed(JobConfig()), step=7)
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


# --- 5. a resume takes the new optimizer and schedule flags -----------------------------------------

def test_new_lr_and_schedule_flags_take_effect_on_resume(corpus, dump):
    extra = {"training.steps": "4", "optimizer.lr": "0.02", "lr_scheduler.warmup_steps": "1",
             "lr_scheduler.lr_min": "0.5"}
    argv = args(corpus, dump, **extra)
    assert lmlab.train.main(argv) == 0
    resumed = metrics_lines(dump)[-1]
    cfg = parse_args(argv)
    assert resumed["step"] == 4
    # the LR logged after step 4 is the new schedule's (the saved base lr would give 0.001 * ...)
    assert resumed["lr"] == 0.02 * lr_multiplier(4, cfg.lr_scheduler, 4) == 0.01


def test_new_optimizer_hyperparameters_take_effect_and_the_state_is_kept(tmp_path):
    states = make_states()
    train_steps(states, iter(states["dataloader"]), 3)
    checkpointer(tmp_path).save(3, states)
    fresh = make_states(seed=1)
    opt = fresh["optimizer"] = torch.optim.AdamW(fresh["model"].parameters(), lr=5e-3, betas=(0.8, 0.9),
                                                 eps=1e-6, weight_decay=0.3)
    fresh["lr_scheduler"] = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    assert checkpointer(tmp_path).load(fresh) == 3
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, 0.3)
    assert group["lr"] == 5e-3 * (1.0 / 4) == fresh["lr_scheduler"].get_last_lr()[0]
    saved = states["optimizer"].state_dict()["state"]
    for key, value in opt.state_dict()["state"].items():
        torch.testing.assert_close(value["exp_avg"], saved[key]["exp_avg"], rtol=0, atol=0)


def test_a_resume_with_another_optimizer_is_refused_naming_the_saved_one(corpus, dump, capsys):
    before = everything(dump)
    assert lmlab.train.main(args(corpus, dump, **{"optimizer.name": "Adam"})) == 2
    line = last_error(capsys)
    assert line.startswith("error: --optimizer.name Adam: ") and "step-3 was saved with AdamW" in line
    assert "--checkpoint.exclude_from_loading optimizer" in line
    assert everything(dump) == before


# --- 7. what a dump folder may hold when a run starts ----------------------------------------------------

def without_run_record(dump: Path) -> Path:
    """The earlier run's HF export and metrics in a folder of their own, as a user might copy them."""
    folder = dump.parent / "copied"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        shutil.copy(dump / name, folder / name)
    return folder


def nested(dump: Path) -> Path:
    return dump / "checkpoint" / "step-9"


def edit_saved_config(dump: Path) -> None:
    saved = dump / "checkpoint" / "step-3" / "config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "num_hidden_layers": 7}))


REFUSED_AT_START = {  # name: (the dump to use, flags, what to do first, what the error line must name)
    "foreign-export": (without_run_record, {}, None, "holds metrics.jsonl, model.safetensors, config.json"),
    "foreign-export-overwrite": (without_run_record, {"job.overwrite": "true"}, None, "which no lmlab run wrote"),
    "inside-another-run": (nested, {}, None, "another run's dump folder"),
    "tokenizer-in-dump": (None, {"model.tokenizer_path": "{dump}", "job.overwrite": "true"}, None,
                          "--model.tokenizer_path"),
    "model-config-edited": (None, {}, edit_saved_config, "num_hidden_layers is 7 there and 2 now"),
    "checkpointing-off": (None, {"checkpoint.enable_checkpoint": "false"}, None, "checkpointing is off"),
    "export-without-checkpoints": (None, {}, lambda d: shutil.rmtree(d / "checkpoint"),
                                   "the HF export of a finished run"),
    "different-run-metrics-only": (None, {"training.seq_len": "16"},
                                   lambda d: [shutil.rmtree(d / "checkpoint"), (d / "model.safetensors").unlink()],
                                   "--training.seq_len 32 there, 16 now"),
    "steps-past": (None, {"training.steps": "2"}, None, "resumes from step 3"),
    "load-step-without-checkpointing": (None, {"checkpoint.load_step": "2", "checkpoint.enable_checkpoint": "false"},
                                        None, "checkpointing is off"),
}


@pytest.mark.parametrize("case", list(REFUSED_AT_START))
def test_a_dump_that_holds_what_the_run_would_replace_is_refused_before_anything_is_written(case, corpus, dump,
                                                                                            capsys):
    where, flags, before_run, expected = REFUSED_AT_START[case]
    target = where(dump) if where else dump
    flags = {k: v.format(dump=dump, parent=dump.parent) for k, v in flags.items()}
    if before_run:
        before_run(dump)
    before = everything(dump)
    assert lmlab.train.main(args(corpus, target, **flags)) == 2
    assert expected in last_error(capsys)
    assert everything(dump) == before


def test_the_launchers_checks_refuse_a_bad_dump_before_it_exists(corpus, dump):
    """train.sh's checks before the lock creates the folder (the trainer checks again under the lock)."""
    new = dump.parent / "new"
    for target, extra, expected in (
            (new, {"checkpoint.initial_load_path": str(dump)}, "is not a DCP checkpoint"),
            (new, {"checkpoint.load_step": "4"}, "no complete checkpoint step-4"),
            (nested(dump), {}, "another run's dump folder")):
        with pytest.raises(UserError, match=expected):
            lmlab.train.check_inputs(parse_args(args(corpus, target, **extra)))
        assert not target.exists()


def test_a_dump_folder_inside_the_data_folder_is_refused(corpus, tmp_path):
    cfg = parse_args(args(corpus, tmp_path / "data" / "run", **{"training.dataset": str(tmp_path / "data")}))
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="inside the data folder"):
        check_dump_contents(cfg)


def test_the_same_inputs_written_another_way_resume_the_run(corpus, dump, capsys):
    config = str(small_config(corpus))
    assert config == str(Path(config).resolve())  # the earlier run recorded it absolute; now relative to the cwd
    relative = os.path.relpath(config, Path.cwd())
    assert lmlab.train.main(args(corpus, dump, **{"model.config": relative, "training.steps": "4"})) == 0
    assert "resumed from step 3" in capsys.readouterr().out


def test_cleaning_up_never_removes_another_runs_dump_below_the_checkpoints(corpus, dump):
    other = nested(dump)
    other.mkdir()
    (other / "job_config.toml").write_text((dump / "job_config.toml").read_text())
    assert lmlab.train.main(args(corpus, dump, **{"training.steps": "4"})) == 0
    assert (other / "job_config.toml").is_file()
