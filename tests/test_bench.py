"""CPU smoke test of bench/train_bench.py: tiny configs, 2 timed steps, the JSON, the Markdown log and the
table printed last; the batch search on (simulated) CUDA OOM; the compiled path without recompiles."""
import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO

_spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train_bench.py")
bench = sys.modules["train_bench"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(bench)

TINY = ["--device", "cpu", "--seq-len", "32", "--steps", "2", "--warmup", "1"]


def test_cpu_run_writes_json_and_markdown_and_prints_the_table_last(tmp_path, capsys):
    out, log = tmp_path / "r.json", tmp_path / "RESULTS.md"
    log.write_text("# earlier results\n")
    argv = [*TINY, "--configs", "tiny_gla", "tiny_hybrid", "--batch-sizes", "2", "1", "--no-compile",
            "--out", str(out), "--results-md", str(log), "--profile", str(tmp_path / "profile.txt")]
    assert bench.main(argv) == 0

    result = json.loads(out.read_text())
    env, rows = result["environment"], result["rows"]
    assert env["device"] == "cpu" and env["peak_tflops"] is None and env["seq_len"] == 32
    assert [(r["config"], r["impl"]) for r in rows] == [
        ("tiny_gla", "lmlab"), ("tiny_gla", "fla"), ("tiny_hybrid", "lmlab"), ("tiny_hybrid", "fla")]
    for r in rows[0::2]:  # lmlab: the largest size, numbers, no MFU on CPU, the kernels used
        assert (r["micro_batch"], r["accumulation"]) == (2, 1) and r["tokens_per_second"] > 0
        assert r["mfu"] is None and r["mfu_6n"] is None and r["peak_memory_gib"] is None and r["note"] == ""
    assert rows[0]["kernels"]["gla"] == "torch" and "delta_rule" not in rows[0]["kernels"]
    assert rows[2]["kernels"]["attention"] == "torch" and rows[2]["kernels"]["gated_delta_rule"] == "torch"
    for r in rows[1::2]:  # fla: a row saying why it did not run
        assert r["tokens_per_second"] is None and "no CPU path" in r["note"]
    profile = (tmp_path / "profile.txt").read_text()
    assert "== tiny_gla lmlab, micro-batch 2\n" in profile and "== tiny_hybrid lmlab, micro-batch 2\n" in profile

    text = log.read_text()
    assert text.startswith("# earlier results\n") and "| tiny_hybrid | lmlab | 2 × 1 |" in text
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-4].startswith("| tiny_gla | lmlab | 2 × 1 |") and lines[-1].startswith("| tiny_hybrid | fla | - |")
    assert lines[-1].endswith("fla has no CPU path (its kernels are Triton, CUDA only) |")


def test_fla_row_of_a_family_fla_lacks_says_so_without_building(tmp_path, monkeypatch):
    """HQLT is lmlab's alone: where fla could run, its row names the missing model instead of a KeyError."""
    monkeypatch.setattr(bench, "fla_unavailable", lambda device: None)
    monkeypatch.setattr(bench, "fla_builder", lambda *a: pytest.fail("fla's model must not be built"))
    out = tmp_path / "r.json"
    assert bench.main([*TINY, "--configs", "tiny_hqlt_sync", "--batch-sizes", "1", "--no-compile", "--out",
                       str(out), "--results-md", str(tmp_path / "RESULTS.md")]) == 0
    fla_row = json.loads(out.read_text())["rows"][1]
    assert fla_row["impl"] == "fla" and fla_row["note"] == "fla has no hybrid_qlt model"


def test_a_run_cut_short_leaves_its_finished_rows_in_both_logs(tmp_path, monkeypatch):
    """A device call's time limit kills the benchmark mid-run: what it measured must already be written."""
    out, log = tmp_path / "r.json", tmp_path / "RESULTS.md"
    log.write_text("# earlier results\n")
    measure_row = bench.run_row

    def killed_at_the_second_row(row, *args):
        if row.config == "tiny_hybrid":
            raise KeyboardInterrupt
        return measure_row(row, *args)

    monkeypatch.setattr(bench, "run_row", killed_at_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*TINY, "--configs", "tiny_gla", "tiny_hybrid", "--batch-sizes", "1", "--no-compile",
                    "--no-baseline", "--out", str(out), "--results-md", str(log)])
    assert [r["config"] for r in json.loads(out.read_text())["rows"]] == ["tiny_gla"]
    text = log.read_text()
    assert text.startswith("# earlier results\n") and "| tiny_gla | lmlab | 1 × 1 |" in text
    assert "| tiny_hybrid |" not in text

def test_batch_search_takes_the_largest_size_that_fits_and_keeps_the_sequences_per_step():
    args = bench.parse_args([*TINY, "--large", "--batch-sizes", "16", "8", "4"])
    assert args.seq_len == 32 and args.seqs_per_step == 64 and args.configs == bench.CONFIGS_1B
    tried = []

    def build(micro):
        tried.append(micro)
        if micro > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return (lambda: None), 1000

    row = bench.Row("x", "lmlab")
    bench.measure(row, build, args, flops=1.0, peak=None)
    assert tried == [16, 8, 4] and (row.micro_batch, row.accumulation) == (4, 16) and row.tokens_per_second > 0

    def never_fits(micro):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    row = bench.run_row(bench.Row("x", "fla"), never_fits, args, flops=1.0, peak=None)
    assert row.tokens_per_second is None
    assert row.note == "AllOutOfMemory: out of memory at every micro-batch size in [16, 8, 4]"


def test_compiled_path_records_kernels_without_recompiling(tmp_path):
    out = tmp_path / "r.json"
    argv = [*TINY, "--configs", "tiny_delta_net", "--batch-sizes", "2", "--no-baseline",
            "--out", str(out), "--results-md", str(tmp_path / "R.md")]
    with torch._dynamo.config.patch(error_on_recompile=True):  # monkeypatch would delete the option on undo
        assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["note"] == "" and row["tokens_per_second"] > 0
    assert row["kernels"]["delta_rule"] == "torch" and row["kernels"]["short_conv"] == "torch"


def test_one_lmlab_row_per_backend_and_large_runs_capped_to_an_80_gb_card(tmp_path):
    out = tmp_path / "r.json"
    argv = [*TINY, "--configs", "tiny_gla", "--batch-sizes", "2", "--no-baseline", "--no-compile",
            "--backends", "auto", "torch", "--out", str(out), "--results-md", str(tmp_path / "R.md")]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["lmlab", "lmlab (backend torch)"]
    assert all(r["tokens_per_second"] > 0 for r in rows)
    assert bench.parse_args([*TINY, "--large"]).memory_cap_gib == 79.0
    assert bench.parse_args(TINY).memory_cap_gib is None
