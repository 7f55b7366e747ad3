"""CPU smoke test of bench/eval_bench.py and bench/gpu_session.sh's training stage (marker `slow`, ~1 min)."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from transformers import AutoTokenizer

from conftest import REPO

_spec = importlib.util.spec_from_file_location("eval_bench", REPO / "bench" / "eval_bench.py")
eval_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_bench)


@pytest.mark.slow
def test_eval_bench_times_lmlab_at_full_size_and_the_stock_model(tmp_path, capsys, monkeypatch):
    """Sizes cut to 3 documents per task (the real ones take minutes on CPU); the stock model on 1; batch 1
    twice (a size given twice runs twice)."""
    monkeypatch.setattr(eval_bench, "SIZES", {t: (split, 3, min(words, 60))
                                              for t, (split, _, words) in eval_bench.SIZES.items()})
    out = tmp_path / "eval.json"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the work folder goes
    argv = ["--config", str(REPO / "configs" / "tiny_gla.json"), "--batch-sizes", "1", "1", "--stock-limit", "1",
            "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    assert eval_bench.main(argv) == 0
    assert not list(tmp_path.glob("eval_bench_*"))  # removed at the end
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["run"], r["batch"]) for r in rows] == [
        ("lmlab", "9-task suite", 1), ("lmlab", "FDA (launch_hf.py)", 1), ("lmlab", "9-task suite", 1),
        ("lmlab", "FDA (launch_hf.py)", 1), ("stock", "9-task suite", 1), ("stock", "FDA (launch_hf.py)", 1)]
    assert all(r["seconds"] > 0 for r in rows)
    assert {"hellaswag/loglikelihood", "wikitext/loglikelihood_rolling", "swde/generate_until"} <= set(rows[0]["seconds_per_task"])
    assert rows[-1]["full_estimate_s"] == pytest.approx(rows[-1]["seconds"] * 3)
    suite_diff = rows[-2]["lmlab_vs_stock"]  # fp32: the same numbers and generations
    assert suite_diff["requests"] > 9 and suite_diff["max_abs_loglikelihood_diff"] < 1e-4
    assert suite_diff["max_rel_rolling_diff"] < 1e-6
    assert suite_diff["is_greedy_differ"] == suite_diff["generations_differ"] == 0
    assert rows[-1]["lmlab_vs_stock"]["generations_differ"] == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("FDA (launch_hf.py), lmlab against stock")


@pytest.mark.slow
def test_eval_bench_compare_runs_both_paths_on_the_same_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_bench, "SIZES", {t: (split, 4, min(words, 60))
                                              for t, (split, _, words) in eval_bench.SIZES.items()})
    out = tmp_path / "eval.json"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["--config", str(REPO / "configs" / "tiny_hybrid.json"), "--compare", "2", "--device", "cpu",
            "--dtype", "float32", "--out", str(out), "--keep"]
    assert eval_bench.main(argv) == 0
    (work,) = tmp_path.glob("eval_bench_*")
    assert (work / "model" / "config.json").is_file() and (work / "stock_fda").is_dir()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["full_size"]) for r in rows] == [("lmlab", False)] * 2 + [("stock", False)] * 2
    suite_diff, fda_diff = rows[2]["lmlab_vs_stock"], rows[3]["lmlab_vs_stock"]
    assert suite_diff["requests"] > 9 and suite_diff["max_abs_loglikelihood_diff"] < 1e-4
    assert suite_diff["is_greedy_differ"] == suite_diff["generations_differ"] == 0
    assert fda_diff["requests"] == 2 and fda_diff["generations_differ"] == 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny_gla model and its tokenizer, written once for this module's tests."""
    return eval_bench.write_model(REPO / "configs" / "tiny_gla.json", tmp_path_factory.mktemp("tiny") / "model")


def test_divergence_finds_where_two_generations_part_and_the_margin_there(tiny_model):
    divergence = eval_bench.Divergence(tiny_model, "cpu", "bfloat16")
    prompt, gen_kwargs = "def add(a, b):\n    return", {"until": ["\n"], "max_gen_toks": 6}
    context = divergence.tokenizer.encode(prompt, add_special_tokens=False)

    def greedy(prefix: list[int]) -> tuple[list[int], list[float], list[int]]:
        """float32's greedy tokens after `prefix` up to 6 in all, their top-2 margins and the second bests."""
        tokens, margins, runner_up = list(prefix), [], []
        with torch.no_grad():
            while len(tokens) < 6:
                top = divergence.models[0](torch.tensor([context + tokens])).logits[0, -1].topk(2)
                margins.append(float(top.values[0] - top.values[1]))
                runner_up.append(int(top.indices[1]))
                tokens.append(int(top.indices[0]))
        return tokens, margins, runner_up

    reference, margins, runner_up = greedy([])
    assert "\n" not in divergence.tokenizer.decode(reference)  # the test's premise: no stop within 6 tokens
    follows = divergence.text(reference, ["\n"])
    leaves = divergence.text(reference[:3] + [runner_up[3]], ["\n"])  # the second best at step 3
    part = divergence(prompt, follows, leaves, bos=False, gen_kwargs=gen_kwargs)
    assert part["leaves"] == "theirs" and part["step"] == 3 and part["ranks"] == {"ours": 0, "theirs": 1}
    assert part["both_left_at"] is None
    assert part["margin_fp32"] == pytest.approx(margins[3], abs=1e-5)
    assert abs(part["margin"] - part["margin_fp32"]) < 0.1  # bfloat16's own margin, near float32's
    swapped = divergence(prompt, leaves, follows, bos=False, gen_kwargs=gen_kwargs)
    assert swapped == {**part, "leaves": "ours", "ranks": {"ours": 1, "theirs": 0}}
    # both take the second best at step 1 (the same token): they part later, where float32 is followed from there
    left, left_margins, left_runner_up = greedy(reference[:1] + runner_up[1:2])
    assert "\n" not in divergence.tokenizer.decode(left)
    both = [divergence.text(left, ["\n"]), divergence.text(left[:4] + left_runner_up[2:3], ["\n"])]
    part = divergence(prompt, *both, bos=False, gen_kwargs=gen_kwargs)
    assert part["leaves"] == "theirs" and part["step"] == 4 and part["both_left_at"] == 1
    assert part["margin_fp32"] == pytest.approx(left_margins[2], abs=1e-5)
    # one stops at step 3 (its token there is made a stop string); the other runs on and parts from it there
    stop = divergence.tokenizer.decode(reference[3:4])
    assert stop not in divergence.tokenizer.decode(reference[:3])  # the premise: no earlier stop
    until = {"until": [stop], "max_gen_toks": 6}
    stops = divergence.text(reference[:4], [stop])
    runs_on = divergence.text(reference[:3] + runner_up[3:4] + reference[4:], [stop])
    part = divergence(prompt, stops, runs_on, bos=False, gen_kwargs=until)
    assert part["leaves"] == "theirs" and part["step"] == 3 and part["ranks"] == {"ours": 0, "theirs": 1}


def test_eval_bench_runs_fda_in_the_asked_dtype(tiny_model, tmp_path, monkeypatch):
    """launch_hf.py defaults to bfloat16 on a GPU: a float32 comparison must ask for float32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # launch_hf.py checks --device cuda
    for dtype in ("float32", "bfloat16"):
        argv = eval_bench.fda_command(tiny_model, tmp_path / "out", 1, 5, "cuda", dtype)
        assert eval_bench.fda.parse_args(argv).dtype == dtype


def test_eval_bench_tokenizer_shows_every_id_of_the_model(tmp_path):
    """Ids past the 4096-token BPE (most of a random 32000-id model's generations) decode to visible text, so
    generations that differ there are seen to differ; the BPE's own tokens encode as before."""
    config = json.loads((REPO / "configs" / "tiny_gla.json").read_text()) | {"vocab_size": 4200}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(eval_bench.write_model(tmp_path / "config.json", tmp_path / "model"))
    assert len(tokenizer) == 4200
    assert tokenizer.decode([4100]) != tokenizer.decode([4101]) and tokenizer.decode([4100, 4101]) != ""
    assert max(tokenizer.encode("def add(a, b):\n    return a + b\n")) < 4096


def test_loglikelihood_differences_in_units_of_the_dtype_spacing():
    assert eval_bench.ulps(-300.0, -302.0, torch.bfloat16) == 1.0  # bf16 steps by 2 between 256 and 512
    assert eval_bench.ulps(1.0, 1.0 + 2 ** -23, torch.float32) == 1.0
    assert eval_bench.ulps(0.0, 0.0, torch.bfloat16) == 0.0


def test_eval_bench_compare_needs_documents(capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_bench.main(["--compare", "0"])
    assert exit_.value.code == 2 and "--compare takes a number of documents >= 1" in capsys.readouterr().err


def test_eval_bench_config_by_name_or_path(capsys):
    assert eval_bench.config_file("gla_340M") == REPO / "configs" / "gla_340M.json"
    assert eval_bench.config_file(str(REPO / "configs" / "gla_340M.json")) == REPO / "configs" / "gla_340M.json"
    with pytest.raises(SystemExit) as exit_:
        eval_bench.main(["--config", "no_such_model"])
    assert exit_.value.code == 2 and "no such file" in capsys.readouterr().err


def test_eval_bench_tasks_are_a_part_of_the_suite(capsys):
    assert eval_bench.suite_tasks("hellaswag,wikitext") == "wikitext,hellaswag"  # the suite's order
    for bad in ("hellaswag,mmlu", ""):
        with pytest.raises(SystemExit) as exit_:
            eval_bench.main(["--tasks", bad])
        assert exit_.value.code == 2 and "not in the paper's suite" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_bench_profiles_a_part_of_the_suite(tmp_path, capsys, monkeypatch):
    """`--tasks hellaswag --profile` (the way to find where a task's time goes): one suite row of that task
    and one FDA row, each profiled, their tables in <out>.profile.txt; the stock row on the same task (without
    `--lmlab-model-args`, which lm-eval's own class would refuse)."""
    monkeypatch.setattr(eval_bench, "SIZES", {t: (split, 3, min(words, 60))
                                              for t, (split, _, words) in eval_bench.SIZES.items()})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "eval.json"
    argv = ["--config", "tiny_gated_deltanet", "--tasks", "hellaswag", "--profile", "--stock-limit", "1",
            "--device", "cpu", "--dtype", "float32", "--out", str(out), "--lmlab-model-args", "state_memory_gib=0.5",
            "--keep"]
    assert eval_bench.main(argv) == 0
    (results,) = next(tmp_path.glob("eval_bench_*")).glob("suite_0/**/results_*.json")
    assert json.loads(results.read_text())["config"]["lmlab_scheduling"]["decoding_state_bytes"]["budget"] == 1 << 29
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["run"], r.get("profiled")) for r in rows] == [
        ("lmlab", "suite: hellaswag", True), ("lmlab", "FDA (launch_hf.py)", True),
        ("stock", "suite: hellaswag", None), ("stock", "FDA (launch_hf.py)", None)]
    assert set(rows[0]["seconds_per_task"]) == {"hellaswag/loglikelihood"}
    assert rows[2]["full_estimate_s"] == pytest.approx(rows[2]["seconds"] * 3)  # hellaswag's 3 docs, not the suite's
    profile = (tmp_path / "eval.profile.txt").read_text()
    for title in ("tiny_gated_deltanet suite: hellaswag, batch 1", "tiny_gated_deltanet FDA, batch 1"):
        assert f"== {title}\n" in profile
    assert "aten::" in profile
    assert "| lmlab | suite: hellaswag (profiled) | 1 |" in capsys.readouterr().out


def test_synthetic_docs_follow_each_task_schema():
    import random

    rng = random.Random(0)
    for task, (_, _, words) in eval_bench.SIZES.items():
        (doc,) = eval_bench.synthetic_docs(task, 1, words, rng, ["fox", "dog"])
        expected = {"wikitext": {"page"}, "lambada_openai": {"text"}, "piqa": {"goal", "sol1", "sol2", "label"},
                    "winogrande": {"sentence", "option1", "option2", "answer"},
                    "arc_easy": {"id", "question", "answerKey", "choices"},
                    "arc_challenge": {"id", "question", "answerKey", "choices"}}.get(task)
        if expected:
            assert set(doc) == expected, task
        elif task == "hellaswag":
            assert len(doc["endings"]) == 4 and doc["label"] in "0123"
        else:
            assert doc["text"].endswith(f"{doc['key']}:") and doc["value"] in doc["text"]


@pytest.mark.slow
def test_gpu_session_scaling_stage_on_cpu(tmp_path):
    env = {**os.environ, "CONFIG": "configs/tiny_gla.json", "BATCH": "2", "SEQ": "64", "ACCUM": "1", "STEPS": "4",
           "NO_COMPILE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "scaling"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 GPU(s):" in (tmp_path / "scaling.md").read_text() and "tokens/s per GPU" in proc.stdout
