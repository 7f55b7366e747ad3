"""`python -m evals.harness` and `launch_hf.py` end to end on tiny lmlab models with local data (no network).

Fixtures: a byte-level BPE tokenizer that adds BOS, a tiny Gated DeltaNet (recurrent) and a tiny hybrid
(one softmax-attention layer), and 2-3 documents per task in the hub datasets' schemas.
"""
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from lm_eval.api import metrics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import lmlab  # noqa: F401  (registers the model families)
from conftest import CLEAN_ENV
from lmlab.eval import bootstrap, harness
from lmlab.eval.tasks import recall

ROOT = Path(__file__).resolve().parents[1]
PAPER_HARNESS = """--model hf --model_args pretrained=exp/mymodel,dtype=bfloat16 \
  --tasks wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge,squad_completion,swde \
  --batch_size 1 --num_fewshot 0 --device cuda --show_config"""
PAPER_FDA = """--batch-size 1 -m exp/mymodel -t based_fda --output_dir out --context_length 1000 \
  --answer_length 50 --cutting_context --limit -1 -p"""

ARC = [{"id": "a1", "question": "Which animal is quick?", "answerKey": "B",
        "choices": {"text": ["the dog", "the fox", "the jar", "the lid"], "label": ["A", "B", "C", "D"]}},
       {"id": "a2", "question": "What dries hair?", "answerKey": "1",
        "choices": {"text": ["a towel", "a fox", "water"], "label": ["1", "2", "3"]}}]
DATA = {
    "wikitext/test": [{"page": " = Foxes = \n The quick brown fox jumps over the lazy dog . \n"},
                      {"page": " = Dogs = \n A dog sleeps . The dog is lazy , and the fox is not @-@ lazy . \n"}],
    "lambada_openai/test": [{"text": "the quick brown fox jumps over the lazy dog"},
                            {"text": "a fox is quick and brown"},
                            {"text": "the lazy dog sleeps all day while the quick fox runs in the forest"}],
    "piqa/validation": [{"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
                        {"goal": "dry wet hair quickly", "sol1": "use a fox", "sol2": "use a towel", "label": 1}],
    "hellaswag/validation": [
        {"ind": 1, "activity_label": "Walking a dog", "ctx_a": "A man walks a dog.", "ctx_b": "the dog",
         "ctx": "A man walks a dog. the dog", "endings": ["runs.", "flies [title] away.", "sleeps.", "eats a jar."],
         "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
        {"ind": 2, "activity_label": "Opening a jar", "ctx_a": "A woman holds a jar.", "ctx_b": "she",
         "ctx": "A woman holds a jar. she", "endings": ["twists the lid.", "eats it.", "sings.", "runs away."],
         "source_id": "y", "split": "val", "split_type": "indomain", "label": "0"}],
    "winogrande/validation": [
        {"sentence": "The fox jumped over the dog because _ was quick.", "option1": "the fox",
         "option2": "the dog", "answer": "1"},
        {"sentence": "The jar was hard to open because _ was tight.", "option1": "the lid",
         "option2": "the hand", "answer": "1"}],
    "arc_easy/test": ARC,
    "arc_challenge/test": ARC[::-1],
    "squad_completion/validation": [
        {"text": "  The fox lives in the forest. Where does the fox live? The fox lives in the", "value": " forest "},
        {"text": "Acme makes dog food. Who makes dog food?", "value": "Acme"}],
    "swde/validation": [{"text": "Movie: The Quick Fox. Director: Ann Lee. Director:", "value": " Ann Lee"},
                        {"text": "University: Fox State. Phone: 555 0100. Phone:", "value": "555 0100"}],
    "fda/validation": [
        {"text": "Applicant: Acme Inc. Device name: fox meter. applicant:", "key": "applicant", "value": "Acme Inc."},
        {"text": "The device name is dog scope, made by Acme.", "key": "device name", "value": "dog scope"},
        {"text": "Product code: x", "key": "product code", "value": "x"}],  # dropped by based_fda (1 char)
}
TASKS = "wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge,squad_completion,swde"


def write_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(doc) for docs in DATA.values() for doc in docs]
    tok.train_from_iterator(texts * 5, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.save_pretrained(path)
    return hf


GATED_DELTANET = {"model_type": "gated_deltanet", "num_heads": 2, "head_dim": 16}
# the paper's model in its most stateful mode (Delayed-Chunk: a read state that moves at chunk starts)
HQLT = {"model_type": "hybrid_qlt", "attn_mode": "chunk", "num_heads": 2, "chunk_size": 4, "qk_activation": "identity",
        "use_short_conv": False, "use_gate": False, "use_local_pos_encoding": True, "use_memory_gate": True}


HGRN2 = {"model_type": "hgrn2", "num_heads": 2, "expand_ratio": None}
GSA = {"model_type": "gsa", "num_heads": 2, "num_slots": 4}


def write_model(path: Path, tokenizer: PreTrainedTokenizerFast, model_type: str, **spec) -> str:
    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2, vocab_size=len(tokenizer),
                                  bos_token_id=0, eos_token_id=1, pad_token_id=2, **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = write_tokenizer(root / "tokenizer")
    for name, docs in DATA.items():
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return {"root": root, "data": str(root / "data"),
            "recurrent": write_model(root / "gdn", tokenizer, **GATED_DELTANET),
            "hybrid": write_model(root / "hybrid", tokenizer, **GATED_DELTANET, attn={"layers": [1], "num_heads": 2}),
            "hqlt": write_model(root / "hqlt", tokenizer, **HQLT),
            "hgrn2": write_model(root / "hgrn2", tokenizer, **HGRN2),
            "gsa": write_model(root / "gsa", tokenizer, **GSA)}


def paper_args(command: str, model: str) -> list[str]:
    return shlex.split(command.replace("exp/mymodel", model).replace("--device cuda", "--device cpu"))


def results_and_samples(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    (results,) = out.rglob("results_*.json")
    samples = {f.name.split("_20")[0].removeprefix("samples_"): [json.loads(line) for line in f.open()]
               for f in out.rglob("samples_*.jsonl")}
    return json.loads(results.read_text()), samples


def test_paper_command_runs_every_task_on_local_data(work):
    """The paper's command verbatim (model path, --device cpu), plus fda."""
    out = work["root"] / "paper"
    args = paper_args(PAPER_HARNESS, work["recurrent"])
    args[args.index(TASKS)] = TASKS + ",fda"
    proc = subprocess.run([sys.executable, "-m", "evals.harness", *args, "--data_dir", work["data"],
                           "--output_path", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, _ = results_and_samples(out)
    r = results["results"]
    for task, metric in [("wikitext", "word_perplexity"), ("lambada_openai", "perplexity"),
                         ("lambada_openai", "acc"), ("piqa", "acc"), ("hellaswag", "acc_norm"), ("winogrande", "acc"),
                         ("arc_easy", "acc"), ("arc_challenge", "acc_norm"), ("squad_completion", "contains"),
                         ("swde", "contains"), ("fda", "contains")]:
        assert isinstance(r[task][f"{metric},none"], float), (task, metric)
    expected_docs = {"lambada_openai": 3, "fda": 3, "arc_challenge": 2, "hellaswag": 2, "wikitext": 2}
    assert all(results["n-samples"][t]["effective"] == n for t, n in expected_docs.items())
    configs = results["configs"]
    for task in ("squad_completion", "swde", "fda"):
        assert configs[task]["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 48}
    assert configs["piqa"]["dataset_kwargs"]["data_files"] == {"validation": f"{work['data']}/piqa/validation.jsonl"}
    assert results["config"]["model_args"]["dtype"] == "bfloat16"
    assert '"word_perplexity,none"' in proc.stdout  # --show_config prints the results JSON
    for every_run_warning in ("overrides existing task", "HF model type is neither"):  # lmlab's own choices
        assert every_run_warning not in proc.stderr
    # what was asked, how the requests ran, and the time per task (also the closing summary on stderr)
    scheduling = results["config"]["lmlab_scheduling"]
    assert results["config"]["batch_size"] in (1, "1") and scheduling["token_budget"] == 65536
    assert {"wikitext/loglikelihood_rolling", "hellaswag/loglikelihood", "fda/generate_until"} <= set(scheduling["seconds"])
    assert list(scheduling["decode"]) == ["eager: not on CUDA"]  # generation batches, by how they decoded
    assert "lmlab: time per task" in proc.stderr and "lmlab loglikelihood" in proc.stderr  # progress bar


@pytest.mark.parametrize("name, until, max_gen_toks", [
    ("SquadCompletion", ["\n"], 48), ("SquadCompletionStock", ["\n\n"], 256), ("SWDE", ["\n"], 48),
    ("FDA", ["\n"], 48)])
def test_recall_task_requests(work, name, until, max_gen_toks):
    """Stripped prompt and target; the paper's generation settings, 0.4.13's for the stock variant."""
    folder = {"SquadCompletion": "squad_completion", "SquadCompletionStock": "squad_completion", "SWDE": "swde",
              "FDA": "fda"}[name]
    data_files = {"validation": f"{work['data']}/{folder}/validation.jsonl"}
    task = getattr(recall, name)(config={"dataset_path": "json", "dataset_kwargs": {"data_files": data_files}})
    doc = task.validation_docs()[0]
    (request,) = task.construct_requests(doc, task.doc_to_text(doc), metadata=(name, 0, 1))
    assert request.args[0] == doc["text"].strip() and task.doc_to_target(doc) == doc["value"].strip()
    assert request.args[1]["until"] == until and request.args[1]["max_gen_toks"] == max_gen_toks


def as_number(value):
    """A float, or a number lm-eval's samples file wrote as a string; None for anything else."""
    if isinstance(value, float):
        return value
    if isinstance(value, str) and value.lstrip("-").replace(".", "", 1).isdigit():
        return float(value)
    return None


def compare(single, batched, path=""):
    """Equal structure; numbers within 1e-4; everything else (generations, flags) identical."""
    if as_number(single) is not None:
        assert as_number(batched) == pytest.approx(as_number(single), abs=1e-4), path
    elif isinstance(single, list):
        assert len(single) == len(batched), path
        for i, (a, b) in enumerate(zip(single, batched)):
            compare(a, b, f"{path}[{i}]")
    else:
        assert single == batched, path


@pytest.mark.parametrize("model", ["recurrent", "hybrid", "hqlt",
                                   *(pytest.param(name, marks=pytest.mark.slow) for name in ("hgrn2", "gsa"))])
def test_batch_4_equals_batch_1(work, model):
    """loglikelihood (lambada), multiple choice (piqa), rolling (wikitext), generation (squad, based_fda)."""
    runs = {}
    with mock.patch.object(bootstrap, "bootstrap_stderr", wraps=bootstrap.bootstrap_stderr) as vectorised:
        for batch_size in (1, 4):
            out = work["root"] / f"batch_{model}_{batch_size}"
            assert harness.main(["--model", "hf", "--model_args", f"pretrained={work[model]},dtype=float32",
                                 "--tasks", "wikitext,lambada_openai,piqa,squad_completion,based_fda",
                                 "--batch_size", str(batch_size), "--device", "cpu", "--data_dir", work["data"],
                                 "--output_path", str(out), "--log_samples"]) == 0
            runs[batch_size] = results_and_samples(out)
    (results_1, samples_1), (results_4, samples_4) = runs[1], runs[4]
    # lambada's perplexity stderr came from lmlab.eval.bootstrap, and is lm-eval's own from the same items
    assert [c.args[0] for c in vectorised.call_args_list] == [metrics.perplexity] * 2
    items = [s["perplexity"] for s in sorted(samples_1["lambada_openai"], key=lambda s: s["doc_id"])]
    with mock.patch.dict(os.environ, DISABLE_MULTIPROC="1"):
        expected = metrics.bootstrap_stderr(metrics.perplexity, items, 100000)
    assert results_1["results"]["lambada_openai"]["perplexity_stderr,none"] == expected
    for task, values in results_1["results"].items():
        for metric, value in values.items():
            if isinstance(value, float) and "stderr" not in metric:
                # perplexities of random models reach millions: log-likelihoods within 1e-4 = relative 1e-4
                assert results_4["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
    assert samples_1.keys() == samples_4.keys() and len(samples_1) == 5
    for task in samples_1:
        for a, b in zip(sorted(samples_1[task], key=lambda s: s["doc_id"]),
                        sorted(samples_4[task], key=lambda s: s["doc_id"])):
            compare(a["resps"], b["resps"], f"{task}[{a['doc_id']}]")


# lm-eval takes its data-parallel path (requests split by rank, results gathered on rank 0) only when it counts
# more than one GPU; two CPU ranks (gloo) take it when told there are two.
TWO_RANKS = """import sys
import torch
torch.cuda.device_count = lambda: 2
from lmlab.eval import harness
sys.exit(harness.main(sys.argv[1:]))
"""


def test_data_parallel_ranks_give_the_one_process_results(work, tmp_path):
    """The form `launch_hf.py -p` runs on N GPUs (torch.distributed.run over lmlab.eval.harness), with two CPU
    ranks: each rank schedules its share of the requests, and the gathered results equal one process's."""
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    args = ["--model", "hf", "--model_args", f"pretrained={work['hybrid']},dtype=float32", "--tasks",
            "wikitext,lambada_openai,piqa,hellaswag,squad_completion", "--batch_size", "1", "--device", "cpu",
            "--data_dir", work["data"], "--log_samples", "--output_path"]
    assert harness.main([*args, str(tmp_path / "one")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(tmp_path / "two_ranks.py"), *args, str(tmp_path / "two")], cwd=tmp_path,
                          env={**CLEAN_ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Building contexts for piqa on rank 1" in proc.stderr
    (one, one_samples), (two, two_samples) = (results_and_samples(tmp_path / run) for run in ("one", "two"))
    for task, values in one["results"].items():
        for metric, value in values.items():
            if isinstance(value, float) and "stderr" not in metric:  # stderrs are bootstrapped: not comparable
                assert two["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    for task, samples in one_samples.items():
        two_by_doc = {s["doc_id"]: s for s in two_samples[task]}
        assert len(two_by_doc) == len(samples), task
        for sample in samples:
            # a rank with fewer requests runs copies of its last one (lm-eval's padding): extra responses
            ours = [resps[:1] for resps in two_by_doc[sample["doc_id"]]["resps"]]
            compare(sample["resps"], ours, f"{task}[{sample['doc_id']}]")


def test_launch_hf_parallel_runs_one_rank_per_gpu(work, monkeypatch):
    """`-p` with two GPUs runs the form the test above runs on CPU ranks."""
    from lmlab.eval import fda

    launched = []
    monkeypatch.setattr(fda.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(fda.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fda.subprocess, "run", lambda command, env: launched.append((command, env))
                        or subprocess.CompletedProcess(command, 3))
    assert fda.main([*paper_args(PAPER_FDA, work["recurrent"]), "--device", "cuda"]) == 3  # the ranks' exit code
    [(command, env)] = launched
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"]
    assert command[5:7] == ["lmlab.eval.harness", "--model"]
    assert env["OMP_NUM_THREADS"] == "1"


def test_missing_data_is_one_line_naming_task_and_file_at_once_offline(work, capsys, monkeypatch, tmp_path):
    """Offline (the tests' HF_HUB_OFFLINE), a task with neither local nor cached data stops before lm-eval
    indexes its tasks (~20 s): one line naming the task and the local file to put."""
    from lm_eval._cli.harness import HarnessCLI
    monkeypatch.setattr(HarnessCLI, "execute", lambda *a: pytest.fail("lm-eval started"))
    (tmp_path / "missing").mkdir()  # a --data_dir without the tasks' files (a missing one is refused at once)
    code = harness.main(["--model", "hf", "--model_args", f"pretrained={work['recurrent']}", "--tasks",
                         "piqa,arc_easy", "--device", "cpu", "--data_dir", str(tmp_path / "missing")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: task piqa: baber/piqa is on the Hugging Face Hub, which cannot be reached (HF_HUB_OFFLINE / "
        f"HF_DATASETS_OFFLINE is set); for local data put {tmp_path}/missing/piqa/validation.jsonl (or "
        ".parquet) and pass --data_dir or set LMLAB_EVAL_DATA")


def test_a_hub_failure_while_loading_is_one_line_naming_task_and_file():
    error = harness.missing_data(ConnectionError("Couldn't reach 'baber/piqa' on the Hub"), ["arc_easy", "piqa"], None)
    assert str(error) == ("task piqa: cannot load baber/piqa (ConnectionError: Couldn't reach 'baber/piqa' on the "
                          "Hub); for local data put $LMLAB_EVAL_DATA/piqa/validation.jsonl (or .parquet) and pass "
                          "--data_dir or set LMLAB_EVAL_DATA")


def test_launch_hf_paper_command(work, tmp_path):
    """The paper's FDA command verbatim (model path), on CPU a single job; data from LMLAB_EVAL_DATA."""
    env = {**os.environ, "LMLAB_EVAL_DATA": work["data"]}
    proc = subprocess.run([sys.executable, str(ROOT / "launch_hf.py"), *paper_args(PAPER_FDA, work["recurrent"])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, samples = results_and_samples(tmp_path / "out")
    assert results["n-samples"]["based_fda"]["effective"] == 2  # the 1-character value is dropped
    assert results["config"]["model_args"]["add_bos_token"] is False
    assert results["configs"]["based_fda"]["metadata"]["context_length"] == 1000
    (records_file,) = (tmp_path / "out").rglob("records_based_fda_*.jsonl")
    records = [json.loads(line) for line in records_file.open()]
    assert [r["prompt"] for r in records] == ["Applicant: Acme Inc. Device name: fox meter. . Applicant:",
                                              "The device name is dog scope, made by Acme. Device name:"]
    assert [r["target"] for r in records] == ["Acme Inc.", "dog scope"]
    assert all("\n" not in r["generation"] and r["hit"] in (0, 1) for r in records)
    assert records[0]["generation"] == samples["based_fda"][0]["filtered_resps"][0]


def test_paper_commands_train_and_evaluate_hqlt(work, corpus, tmp_path):
    """The paper's model end to end: its training command on a tiny Synchronous HQLT (loss falls), then its
    two evaluation commands on the dump folder."""
    from test_train_e2e import read_metrics, tiny_args

    dump = tmp_path / "mymodel"
    train = subprocess.run(["bash", "train.sh", *tiny_args(corpus, dump, **{"model.config": "configs/tiny_hqlt_sync.json"})],
                           cwd=ROOT, capture_output=True, text=True,
                           env=CLEAN_ENV)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    records = read_metrics(dump)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    harness_run = subprocess.run([sys.executable, "-m", "evals.harness", *paper_args(PAPER_HARNESS, str(dump)),
                                  "--data_dir", work["data"], "--output_path", str(tmp_path / "eval")],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert harness_run.returncode == 0, harness_run.stderr[-3000:]
    results, _ = results_and_samples(tmp_path / "eval")
    assert isinstance(results["results"]["swde"]["contains,none"], float)
    assert isinstance(results["results"]["wikitext"]["word_perplexity,none"], float)
    fda = subprocess.run([sys.executable, str(ROOT / "launch_hf.py"), *paper_args(PAPER_FDA, str(dump))], cwd=tmp_path,
                         env={**os.environ, "LMLAB_EVAL_DATA": work["data"]}, capture_output=True, text=True, timeout=300)
    assert fda.returncode == 0, fda.stderr[-3000:]
    assert results_and_samples(tmp_path / "out")[0]["n-samples"]["based_fda"]["effective"] == 2



def test_templates_are_compiled_once_and_render_the_same(monkeypatch):
    """lm-eval compiles a document's Jinja template on every render (74k times for the paper's suite); the
    harness compiles each template once, for the command only, and renders the same text."""
    from lm_eval import utils

    template = "Question: {{question}}\nAnswer:{{ ' ' ~ choices[label] | regex_replace('x', 'y') }}"
    docs = [{"question": f"q{i}?", "choices": ["ax", "bx"], "label": i % 2} for i in range(5)]
    expected = [utils.apply_template(template, doc) for doc in docs]
    original, compiles = utils.apply_template, []
    from_string = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda source: compiles.append(source) or from_string(source))
    with harness.templates_compiled_once():
        assert [utils.apply_template(template, doc) for doc in docs] == expected
    assert compiles == [template]
    assert utils.apply_template is original


class Foreign:
    """Unpickled, it would touch a file: what lmlab's reader of the kept task index must refuse."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["LMLAB_CACHE"]).parent / "ran",))


def test_lm_eval_task_index_is_kept_between_commands(monkeypatch, tmp_path, caplog):
    """lm-eval indexes its ~14k task files on every command; the harness keeps that index in lmlab's cache
    folder: the same entries as lm-eval's own index (with a later folder overriding, and lm-eval's warning),
    read without parsing a file the second time, built anew from a damaged or foreign file (never run) and
    after a task file changes (replacing its earlier state's file, not another installation's), and only
    within the command."""
    from lm_eval.tasks import _index

    from lmlab.eval.task_index import lm_eval_tasks_cached

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    root, other = tmp_path / "tasks", tmp_path / "user_tasks"
    files = {root / "common.yaml": "output_type: loglikelihood\n",
             root / "a" / "alpha.yaml": "include: ../common.yaml\ntask: alpha\ntag: [letters]\n",
             root / "a" / "beta.yaml": "include: ../common.yaml\ntask: beta\ntag: [letters]\n",
             root / "b" / "greek.yaml": "group: greek\ntask: [alpha, beta]\n",
             other / "alpha.yaml": "task: alpha\noutput_type: generate_until\n"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def entries(paths):
        index = _index.TaskIndex.build(paths)
        return {name: (e.kind, e.yaml_path, e.cfg, sorted(e.tags)) for name, e in index.items()}

    expected = entries([root, other])
    original = _index.TaskIndex.__dict__["build"]
    with lm_eval_tasks_cached(root), caplog.at_level("WARNING", logger="lm_eval.tasks._index"):
        assert entries([root, other]) == expected
        entries([other])  # a list not led by `root`: lm-eval's own index, nothing kept
        (kept,) = (tmp_path / "cache" / "lm_eval_task_index").iterdir()
        with monkeypatch.context() as patch:
            patch.setattr(_index, "load_yaml", lambda *a, **k: pytest.fail("parsed a task file"))
            assert entries([root]) == entries([root])
        assert entries([root, other]) == expected
        kept.write_bytes(b"damaged")
        assert entries([root, other]) == expected
        kept.write_bytes(pickle.dumps(Foreign()))  # a file that would run code: refused, then written anew
        assert entries([root, other]) == expected and not (tmp_path / "ran").exists()
        assert pickle.loads(kept.read_bytes()).keys() == entries([root]).keys()  # written anew
        another_installation = kept.parent / "0123abcd_0.4.13_0123456789abcdef.pickle"
        another_installation.write_bytes(b"kept")
        (root / "a" / "beta.yaml").write_text("include: ../common.yaml\ntask: beta2\n")
        changed = entries([root])
        assert "beta2" in changed and "beta" not in changed
        assert not kept.exists() and len(list(kept.parent.iterdir())) == 2  # its earlier state replaced
        assert another_installation.read_bytes() == b"kept"
    assert any("overrides existing task" in r.getMessage() and "alpha" in r.getMessage() for r in caplog.records)
    assert _index.TaskIndex.__dict__["build"] is original


# --- bad input found before the model loads (tests/test_bad_inputs.py holds the table of impossible arguments) ---

def last_line(capsys) -> str:
    """The error line (lm-eval's log handlers, set up by an earlier in-process command, may write before it)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def no_evaluation(monkeypatch) -> list:
    """lm-eval's run replaced: the arguments it would have been given are recorded, nothing is evaluated."""
    from lm_eval._cli.harness import HarnessCLI

    given = []
    monkeypatch.setattr(HarnessCLI, "execute", lambda self, args: given.append(args))
    return given


@pytest.mark.parametrize("command", ["harness", "launch_hf"])
def test_cuda_on_a_machine_without_it_is_one_line_suggesting_cpu(work, command, monkeypatch, capsys):
    """The paper's `--device cuda`, verbatim, where PyTorch sees no CUDA (torch asserted deep in the model load)."""
    from lmlab.eval import fda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_evaluation(monkeypatch)
    if command == "harness":
        code = harness.main(["--model_args", f"pretrained={work['recurrent']}", "--tasks", "piqa", "--device", "cuda"])
    else:
        code = fda.main(["-m", work["recurrent"], "--device", "cuda"])
    assert code == 2
    line = last_line(capsys)
    assert line.startswith("error: --device cuda: CUDA is not available on this machine") and line.endswith(
        "; use --device cpu")


@pytest.mark.parametrize("command, label", [("harness", "--model_args pretrained="), ("launch_hf", "-m ")])
def test_a_hub_id_without_a_connection_is_one_line_naming_the_option(command, label, monkeypatch, capsys):
    """Without HF_HUB_OFFLINE and without a connection (the hub's host cannot be reached), an uncached hub id is
    the same line as offline, naming the option the user wrote, before lm-eval or transformers try the hub."""
    import datasets
    import huggingface_hub

    from lmlab.eval import fda

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(harness, "unreachable_reason", lambda url: "cannot connect to huggingface.co: [Errno -3] "
                                                                   "Temporary failure in name resolution")
    no_evaluation(monkeypatch)
    model = "fla-hub/transformer-1.3B-100B"
    argv = ["--model_args", f"pretrained={model}", "--tasks", "piqa"] if command == "harness" else ["-m", model]
    assert (harness.main if command == "harness" else fda.main)(argv) == 2
    assert last_line(capsys) == (f"error: {label}{model}: no such folder, and the Hugging Face Hub cannot be reached "
                                 "(cannot connect to huggingface.co: [Errno -3] Temporary failure in name resolution) "
                                 "with no cached copy; pass a local model folder")


def test_a_missing_data_folder_from_the_environment_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_EVAL_DATA", "/no/such/data")
    assert harness.main(["--tasks", "piqa"]) == 2
    assert last_line(capsys) == "error: LMLAB_EVAL_DATA=/no/such/data: no such folder"


def test_paths_with_a_tilde_are_expanded_for_lm_eval_too(work, tmp_path, monkeypatch, capsys):
    """`pretrained=~/m`, `--data_dir=~/data` and `--output_path=~/out` (no shell expands `~` after `=`) name the
    home folder's, for lmlab's checks and lm-eval alike; task names are taken without the spaces around them."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(work["recurrent"], tmp_path / "m")
    shutil.copytree(work["data"], tmp_path / "data")
    given = no_evaluation(monkeypatch)
    assert harness.main(["--model_args", "pretrained=~/m,tokenizer=~/m", "--tasks", "piqa, arc_easy",
                         "--data_dir=~/data", "--output_path=~/out"]) == 0
    [args] = given
    assert args.model_args["pretrained"] == args.model_args["tokenizer"] == str(tmp_path / "m")
    assert args.output_path == str(tmp_path / "out") and args.tasks == ["piqa", "arc_easy"]
    assert f"lmlab: piqa reads {tmp_path}/data/piqa/validation.jsonl" in capsys.readouterr().err
    from lmlab.eval import fda

    monkeypatch.setattr(harness, "evaluate", lambda argv: given.append(argv) or 1)
    assert fda.main(["-m", "~/m", "--output_dir", "~/out", "--data_dir", "~/data"]) == 1
    argv = given[-1]
    assert f"pretrained={tmp_path}/m," in argv[argv.index("--model_args") + 1]
    assert argv[argv.index("--output_path") + 1] == str(tmp_path / "out")
    assert argv[argv.index("--data_dir") + 1] == str(tmp_path / "data")


@pytest.mark.parametrize("content, problem", [
    (b'{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "a", "sol1\n', "validation.jsonl:2: not a JSON line"),
    (b'{"goal": "a", "sol1": "b", "label": 0}\n', "validation.jsonl:1: no field 'sol2' (the task reads goal, sol1, "
                                                  "sol2, label)"),
    (b'["open a jar"]\n', "validation.jsonl:1: not a JSON object (a row of goal, sol1, sol2, label)"),
], ids=["malformed-line", "missing-field", "not-an-object"])
def test_broken_local_task_data_is_one_line_naming_the_file(work, content, problem, tmp_path, monkeypatch, capsys):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_bytes(content)
    no_evaluation(monkeypatch)
    assert harness.main(["--model_args", f"pretrained={work['recurrent']}", "--tasks", "piqa",
                         "--data_dir", str(tmp_path)]) == 2
    assert last_line(capsys) == f"error: {tmp_path}/piqa/{problem}"


def test_few_shot_examples_never_come_from_the_evaluated_split(work, tmp_path, monkeypatch, capsys):
    """Local data without piqa's train split: lm-eval would draw the examples from validation, the hub never."""
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n')
    no_evaluation(monkeypatch)
    assert harness.main(["--model_args", f"pretrained={work['recurrent']}", "--tasks", "piqa", "--num_fewshot", "1",
                         "--data_dir", str(tmp_path)]) == 2
    assert last_line(capsys) == (f"error: --num_fewshot 1: piqa takes its examples from its train split, and "
                                 f"{tmp_path}/piqa has no train.jsonl or train.parquet; add it, or use --num_fewshot 0")


def test_an_unknown_model_argument_is_one_line(work, capsys):
    """Known only when the model is built (from_pretrained passes on what it does not know)."""
    code = harness.main(["--model_args", f"pretrained={work['recurrent']},foo=1", "--tasks", "piqa", "--limit", "1",
                         "--device", "cpu", "--data_dir", work["data"]])
    assert code == 2
    assert last_line(capsys) == ("error: --model_args foo=1: not an argument of the model (neither lm-eval's model "
                                 "class nor its from_pretrained takes 'foo')")


def test_based_fda_checks_its_window_where_it_computes_it(work):
    from lmlab.errors import UserError

    with pytest.raises(UserError, match="--metadata context_length 50 leaves no room"):
        recall.BasedFDA(config={"metadata": {"context_length": 50, "answer_length": 50,
                                             "pretrained": work["recurrent"]}})


@pytest.mark.parametrize("fault, line", [(RuntimeError("boom"), "error: launch_hf.py failed unexpectedly (RuntimeError: "
                                                                "boom); this is a bug in lmlab"),
                                         (KeyboardInterrupt(), "error: launch_hf.py: interrupted (Ctrl-C)")])
def test_launch_hf_names_itself_in_its_bug_and_ctrl_c_lines(work, fault, line, tmp_path, monkeypatch, capsys):
    import tempfile

    from lmlab.eval import fda

    def fail(*args):
        raise fault

    monkeypatch.setattr(harness, "run", fail)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert fda.main(["-m", work["recurrent"], "--output_dir", str(tmp_path / "out")]) in (1, 130)
    assert last_line(capsys).startswith(line)
