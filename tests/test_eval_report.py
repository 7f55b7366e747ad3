"""`lmlab report`: the paper's columns from lm-eval result files written here."""
import csv
import json

import torch
from safetensors.torch import save_file

from lmlab.eval.report import HEADER, main


def write_result(path, model, results, date, params=None):
    config = {"model": "hf", "model_args": {"pretrained": model, "dtype": "bfloat16"}}
    if params:
        config["model_num_parameters"] = params
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "config": config, "date": date}))


def test_report_table_and_csv(tmp_path, capsys):
    a, b = str(tmp_path / "dump_a"), "hub/model-b"
    (tmp_path / "dump_a").mkdir()
    save_file({"w": torch.zeros(1000, 300, dtype=torch.float16), "b": torch.zeros(500)},
              tmp_path / "dump_a" / "model.safetensors")
    steps = [{"step": 1, "tokens_seen": 1000}, {"step": 2, "tokens_seen": 2_500_000_000}]
    (tmp_path / "dump_a" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    # lm-eval writes "N/A" for the standard errors it cannot compute: no stderr, not a malformed file
    harness = {"wikitext": {"word_perplexity,none": 28.391, "word_perplexity_stderr,none": "N/A"},
               "lambada_openai": {"perplexity,none": 42.69, "acc,none": 0.31}, "piqa": {"acc,none": 0.633},
               "hellaswag": {"acc_norm,none": 0.34, "acc,none": 0.3},
               "winogrande": {"acc,none": 0.504}, "arc_easy": {"acc,none": 0.445},
               "arc_challenge": {"acc_norm,none": 0.242},
               "swde": {"contains,none": 0.422, "contains_stderr,none": "N/A"},
               "squad_completion": {"contains,none": 0.221}}
    write_result(tmp_path / "evals" / "old" / "results_1.json", a, {"piqa": {"acc,none": 0.1}}, date=1.0)
    write_result(tmp_path / "evals" / "new" / "results_2.json", a, harness, date=2.0)
    # the same model written another way: one row
    write_result(tmp_path / "fda_out" / "results_3.json", a + "/", {"based_fda": {"contains,none": 0.214}}, date=3.0)
    write_result(tmp_path / "b.json", b, {"piqa": {"acc,none": 0.5}, "fda": {"contains,none": 0.1}}, date=4.0,
                 params=373_900_000)

    out_csv = tmp_path / "table.csv"
    paths = [tmp_path / "evals", tmp_path / "fda_out", tmp_path / "b.json"]
    assert main([*map(str, paths), "--csv", str(out_csv)]) == 0
    table, notes = capsys.readouterr()
    assert table.splitlines()[0] == "| " + " | ".join(HEADER) + " |"
    assert notes.strip() == (f"lmlab report: {a}: piqa was evaluated in 2 files; using the newest, "
                             f"{tmp_path / 'evals/new/results_2.json'} (not {tmp_path / 'evals/old/results_1.json'})")
    assert "are percentages (lm-eval's fractions x 100)" in table
    assert HEADER[3:] == ["Wiki ppl", "LMB ppl", "LMB acc", "PIQA acc", "Hella acc_n", "Wino acc", "ARC-e acc",
                          "ARC-c acc_n", "Avg", "SWDE", "SQuAD", "FDA"]
    rows = {r[0]: r for r in csv.reader(out_csv.open())}
    # avg = (31 + 63.3 + 34 + 50.4 + 44.5 + 24.2) / 6 = 41.2333
    assert rows[a] == [a, "300.5K", "2.5B", "28.39", "42.69", "31.00", "63.30", "34.00", "50.40", "44.50", "24.20",
                       "41.23", "42.20", "22.10", "21.40"]
    assert rows[b] == [b, "373.9M", "-", "-", "-", "-", "50.00", "-", "-", "-", "-", "-", "-", "-", "10.00*"]
    assert "FDA from lm-eval's `fda` task" in table
    assert f"| {a} | 300.5K | 2.5B | 28.39 |" in table
