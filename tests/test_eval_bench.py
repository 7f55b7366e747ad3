"""CPU smoke test of bench/eval_bench.py and bench/gpu_session.sh's training stage (marker `slow`, ~1 min)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("eval_bench", REPO / "bench" / "eval_bench.py")
eval_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_bench)


@pytest.mark.slow
def test_eval_bench_times_the_suite_and_fda_at_each_batch_size(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["--config", str(REPO / "configs" / "tiny_gla.json"), "--limit", "1", "--batch-sizes", "1", "2",
            "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    assert eval_bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["run"], r["batch"]) for r in rows] == [
        ("9-task suite", 1), ("FDA (launch_hf.py)", 1), ("9-task suite", 2), ("FDA (launch_hf.py)", 2)]
    assert all(r["seconds"] > 0 and r["full_estimate_s"] >= r["seconds"] for r in rows)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| FDA (launch_hf.py) | 2 |")


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
