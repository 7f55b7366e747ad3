"""`python -m evals.harness ...`: lm-eval 0.4.13's own CLI (same flags, same output files) with lmlab's
model families registered (fla's other types too, on CUDA), lmlab's task definitions, and local data.

Tasks. lmlab's task folder (`lmlab/eval/tasks`) is put first on lm-eval's `--include_path` (a user's
`--include_path` still comes last and wins). Under the paper's task names:
- `squad_completion`: stripped text and target (as 0.4.13, lm-eval issue #2690) AND the generation settings
  of the paper's era: until "\\n", at most 48 new tokens. Stock 0.4.13 generates until "\\n\\n", at most
  256 new tokens (its task falls back to lm-eval's default generation_kwargs since PR #3795); that variant
  is `squad_completion_stock`.
- `swde`, `fda`: the same requests as 0.4.13 (stripped; until "\\n", 48 tokens); lmlab's subclasses accept
  local data and record those settings as the task's generation_kwargs (0.4.13 records lm-eval's unused
  defaults, "\\n\\n" / 256, in the results JSON).
- `based_fda`: FDA by the JRT/Based protocol (lmlab.eval.fda), the task behind `launch_hf.py`.
- the other tasks (wikitext, lambada_openai, piqa, hellaswag, winogrande, arc_easy, arc_challenge, ...)
  are lm-eval's own yaml tasks, unchanged.
Every metric is computed by lm-eval's own code; a perplexity's bootstrap standard error (lambada_openai's)
by lmlab.eval.bootstrap, lm-eval's draws and arithmetic vectorised (the same value; 106 s -> 4 s on 2
cores). BOS: 0.4.13 leaves it to the tokenizer (fla-hub's Llama tokenizers add one) unless `add_bos_token=`
is in --model_args; the results JSON records the model args.

Local data. `--data_dir DIR` (removed before lm-eval parses the flags) or the environment variable
`LMLAB_EVAL_DATA=DIR` points tasks at `DIR/<task>/<split>.jsonl` (or `.parquet`), rows in the hub
dataset's schema (`squad_completion_stock` reads `squad_completion/`, `based_fda` reads `fda/`). A task
whose evaluated split is there is redirected by a generated yaml (`include:` of its definition, then
`dataset_path: json|parquet` and `dataset_kwargs.data_files`); its other splits (few-shot sources) are used
when their files exist and disabled otherwise. A task without local files loads from the hub as usual;
when that fails (offline), the command exits with code 2 and one line naming the task and the file it
would have read. A --data_dir that is not a folder is refused before anything loads (with a network, its
tasks would quietly come from the hub).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn

import datasets
import huggingface_hub
import lm_eval
import torch
import yaml
from lm_eval.utils import sanitize_model_name

import lmlab.models
from lmlab.errors import UserError, command
from lmlab.eval.bootstrap import vectorised_bootstrap
from lmlab.eval.task_index import lm_eval_tasks_cached
from lmlab.modeling import check_model_folder, check_vocab, is_local_path
from lmlab.network import unreachable_reason

DATA_ENV = "LMLAB_EVAL_DATA"
TASKS_DIR = Path(__file__).parent / "tasks"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
# lm-eval's yaml keys for the standard split names
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


@dataclass(frozen=True)
class TaskData:
    hub: str  # the dataset the task loads from the hub
    definition: Path  # the yaml that defines the task
    splits: tuple[str, ...]  # the task's splits, the evaluated one first
    fields: tuple[str, ...]  # what the task reads from each row (README's "Offline data" table)
    folder: str = ""  # under --data_dir; default: the task's name


ARC = ("question", "choices", "answerKey")
RECALL = ("text", "value")
TASKS = {
    "wikitext": TaskData("EleutherAI/wikitext_document_level", LM_EVAL_TASKS / "wikitext/wikitext.yaml",
                         ("test", "train", "validation"), ("page",)),
    "lambada_openai": TaskData("EleutherAI/lambada_openai", LM_EVAL_TASKS / "lambada/lambada_openai.yaml",
                               ("test",), ("text",)),
    "piqa": TaskData("baber/piqa", LM_EVAL_TASKS / "piqa/piqa.yaml", ("validation", "train"),
                     ("goal", "sol1", "sol2", "label")),
    "hellaswag": TaskData("Rowan/hellaswag", LM_EVAL_TASKS / "hellaswag/hellaswag.yaml", ("validation", "train"),
                          ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "winogrande": TaskData("allenai/winogrande", LM_EVAL_TASKS / "winogrande/default.yaml",
                           ("validation", "train"), ("sentence", "option1", "option2", "answer")),
    "arc_easy": TaskData("allenai/ai2_arc", LM_EVAL_TASKS / "arc/arc_easy.yaml", ("test", "train", "validation"), ARC),
    "arc_challenge": TaskData("allenai/ai2_arc", LM_EVAL_TASKS / "arc/arc_challenge.yaml",
                              ("test", "train", "validation"), ARC),
    "squad_completion": TaskData("hazyresearch/based-squad", TASKS_DIR / "squad_completion.yaml", ("validation",),
                                 RECALL),
    "squad_completion_stock": TaskData("hazyresearch/based-squad", TASKS_DIR / "squad_completion_stock.yaml",
                                       ("validation",), RECALL, "squad_completion"),
    "swde": TaskData("hazyresearch/based-swde-v2", TASKS_DIR / "swde.yaml", ("validation",), RECALL),
    "fda": TaskData("hazyresearch/based-fda", TASKS_DIR / "fda.yaml", ("validation",), ("text", "key", "value")),
    "based_fda": TaskData("hazyresearch/based-fda", TASKS_DIR / "based_fda.yaml", ("validation",),
                          ("text", "key", "value"), "fda"),
}


def local_file(data_dir: str, task: str, split: str) -> Path | None:
    """The local file of a task's split, if there is one."""
    folder = Path(data_dir) / (TASKS[task].folder or task)
    return next((p for p in (folder / f"{split}.jsonl", folder / f"{split}.parquet") if p.is_file()), None)


def write_local_tasks(data_dir: str, out: Path) -> None:
    """One yaml per task with local data: its definition, read from the local files."""
    for task, data in TASKS.items():
        files = {split: local_file(data_dir, task, split) for split in data.splits}
        if files[data.splits[0]] is None:
            continue
        found = {split: str(path) for split, path in files.items() if path is not None}
        for path in found.values():
            check_rows(Path(path), data.fields)
        override = {"task": task, "dataset_path": "parquet" if found[data.splits[0]].endswith(".parquet") else "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": found}}
        override |= {SPLIT_KEYS[split]: None for split, path in files.items() if path is None}
        (out / f"{task}.yaml").write_text(yaml.safe_dump({"include": str(data.definition), **override}))
        print(f"lmlab: {task} reads {', '.join(found.values())}", file=sys.stderr)


def check_fewshot_data(tasks: list[str], data_dir: str, num_fewshot: int) -> None:
    """UserError for a task read from `data_dir` whose few-shot examples come from a train split it lacks: lm-eval
    would draw them from the evaluated split instead, which a run on the hub's data never does."""
    for task in tasks:
        data = TASKS.get(task)
        if data and "train" in data.splits and local_file(data_dir, task, data.splits[0]) \
                and not local_file(data_dir, task, "train"):
            folder = Path(data_dir) / (data.folder or task)
            raise UserError(f"--num_fewshot {num_fewshot}: {task} takes its examples from its train split, and "
                            f"{folder} has no train.jsonl or train.parquet; add it, or use --num_fewshot 0")


def check_rows(path: Path, fields: tuple[str, ...]) -> None:
    """UserError naming `path` (and the line or field) unless every row is a JSON object with the task's fields:
    lm-eval would fail later without naming the file (datasets' DatasetGenerationError, a Jinja UndefinedError)."""
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            columns = pyarrow.parquet.read_schema(path).names
        except (pyarrow.ArrowException, OSError) as exc:
            raise UserError(f"{path}: not a parquet file ({exc})") from None
        missing = [name for name in fields if name not in columns]
        if missing:
            raise UserError(f"{path}: no column {missing[0]!r} (the task reads {', '.join(fields)})")
        return
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:  # invalid JSON or UTF-8
                raise UserError(f"{path}:{number}: not a JSON line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: not a JSON object (a row of {', '.join(fields)})")
            missing = [name for name in fields if name not in row]
            if missing:
                raise UserError(f"{path}:{number}: no field {missing[0]!r} (the task reads {', '.join(fields)})")


def missing_data(exc: OSError, tasks: list[str], data_dir: str | None) -> UserError | None:
    """A one-line error for a task whose dataset could not be loaded, or None if `exc` is another error."""
    message = str(exc)
    for task in tasks:
        data = TASKS.get(task)
        served_locally = data_dir is not None and data is not None and local_file(data_dir, task, data.splits[0])
        if data is not None and data.hub in message and not served_locally:
            return UserError(f"task {task}: cannot load {data.hub} ({type(exc).__name__}: {message}); "
                             f"{local_alternative(task, data_dir)}")
    return None


def local_alternative(task: str, data_dir: str | None) -> str:
    data = TASKS[task]
    where = Path(data_dir or f"${DATA_ENV}") / (data.folder or task) / f"{data.splits[0]}.jsonl"
    return f"for local data put {where} (or .parquet) and pass --data_dir or set {DATA_ENV}"


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (offline mode, or no connection within 3 s); None if it can."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    return unreachable_reason(huggingface_hub.constants.ENDPOINT)


def unreachable_data(tasks: list[str], data_dir: str | None) -> UserError | None:
    """At once, before lm-eval indexes its tasks (~20 s on 2 cores): the first of lmlab's tasks that would
    load from the hub, neither local nor in the datasets cache, while the hub cannot be reached."""
    def cached(hub: str) -> bool:
        return ((Path(datasets.config.HF_DATASETS_CACHE) / hub.replace("/", "___")).is_dir()
                or (Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{hub.replace('/', '--')}").is_dir())

    from_hub = [task for task in tasks if task in TASKS and not cached(TASKS[task].hub)
                and not (data_dir and local_file(data_dir, task, TASKS[task].splits[0]))]
    reason = hub_unreachable_reason() if from_hub else None
    if reason is None:
        return None
    task = from_hub[0]
    return UserError(f"task {task}: {TASKS[task].hub} is on the Hugging Face Hub, which cannot be reached ({reason}); "
                     f"{local_alternative(task, data_dir)}")


class QuietOwnChoices(logging.Filter):
    """Drops two lm-eval warnings that every lmlab evaluation would print: a task of `own_task_dirs` (lmlab's
    definitions, the generated local-data ones) or a tag overriding lm-eval's of the same name, their purpose,
    and "HF model type is neither marked as CausalLM or Seq2SeqLM", which lm-eval says of every model type
    registered at run time (transformers' static tables list none), lmlab's causal LMs included."""

    LOGGERS = ("lm_eval.tasks._index", "lm_eval.models.huggingface")

    def __init__(self, own_task_dirs: list[str]):
        super().__init__()
        self.own_task_dirs = tuple(own_task_dirs)

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Task '%s' from %s overrides"):
            # a tag has no file (None): lmlab's task files re-declare the tags of the definitions they include
            return not (record.args[1] is None or str(record.args[1]).startswith(self.own_task_dirs))
        return not message.startswith("HF model type is neither marked as CausalLM")


def register_models() -> None:
    """`import lmlab` registers lmlab's families (after importing fla where fla's kernels are healthy). On
    CUDA the harness also imports fla wherever it imports, so that fla's other model types load, and then
    makes lmlab's classes the choice again for the types both provide. `--model hf` builds
    lmlab.eval.lm.LmlabLM: HFLM, with lmlab's request scheduling for lmlab's models."""
    if torch.cuda.is_available():
        with contextlib.suppress(ImportError):
            import fla  # noqa: F401
        lmlab.models.register()
    from lmlab.eval.lm import use_for_hf

    use_for_hf()


def pop_option(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` / `flag=VALUE` from argv and return VALUE."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg[len(flag) + 1 :]
    return None


# lm-eval's HF model class under lmlab's names (LmlabLM) and its own (`hf-stock`): the model args checked here
HF_MODELS = ("hf", "hf-auto", "huggingface", "hf-stock")
DTYPE_ARGS = ("dtype", "softmax_dtype", "mixed_precision_dtype")  # HFLM turns each into getattr(torch, value)
MAX_LIMIT = 2**63 - 1  # lm-eval slices each task's documents with the count: a C integer


def local_data_dir(flag: str | None) -> str | None:
    """The local task data folder: `--data_dir` (`flag`), else $LMLAB_EVAL_DATA, `~` expanded; UserError naming
    where it came from unless it is a folder (with a network, its tasks would quietly come from the hub)."""
    label = f"--data_dir {flag}" if flag is not None else f"{DATA_ENV}={os.environ.get(DATA_ENV)}"
    value = flag if flag is not None else os.environ.get(DATA_ENV)
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UserError(f"{label}: {'not a folder' if folder.exists() else 'no such folder'}")
    return str(folder)


def check_device(device: str | None) -> None:
    """UserError unless `device` is one HFLM places the model on here: it falls back to another device silently
    (`gpu`, `cpu:0`) and fails deep in torch for CUDA on a machine without it."""
    if device is None:
        return
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (PyTorch {torch.__version__} "
                        "sees no CUDA device); use --device cpu")
    valid = ["cpu"]  # HFLM's own list of devices, less those this machine lacks
    if torch.cuda.is_available():
        valid += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        valid += ["mps", "mps:0"]
    for kind in ("npu", "xpu", "hpu"):
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            valid += [f"{kind}:{i}" for i in range(module.device_count())]
    if device not in valid:
        raise UserError(f"--device {device}: not a device of this machine (expected one of {', '.join(valid)})")


def check_dtype(value: object, label: str) -> None:
    """UserError unless `value` is "auto" or the name of a torch dtype (HFLM takes getattr(torch, value))."""
    if value != "auto" and not isinstance(getattr(torch, str(value), None), torch.dtype):
        raise UserError(f"{label}: not a torch dtype (expected e.g. float32, bfloat16, float16 or auto)")


def check_model_source(model: str, label: str, *, tokenizer: bool) -> None:
    """A model folder loadable (lmlab.modeling.check_model_folder), or a hub id that is cached or can be
    downloaded now (`label`: the option as the user wrote it)."""
    if is_local_path(model):
        check_model_folder(Path(model).expanduser(), label, tokenizer=tokenizer)
        return
    if huggingface_hub.try_to_load_from_cache(model, "config.json") is None:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise UserError(f"{label}: no such folder, and the Hugging Face Hub cannot be reached ({reason}) with no "
                            "cached copy; pass a local model folder")


def check_output_path(output_path: str, model_name: str | None, label: str) -> None:
    """UserError unless lm-eval can write its results where `output_path` says (EvaluationTracker: a path ending
    in .json names files beside it, in its folder; any other path is a folder that gets a subfolder per model,
    the model's name sanitized): lm-eval would evaluate everything, then only log that it could not save."""
    path = Path(output_path)
    folder = path.parent if path.suffix == ".json" else path / sanitize_model_name(model_name) if model_name else path
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise UserError(f"{label} {output_path}: {existing} is a file, and the results go into the folder "
                                f"{folder}; name another path")
            return


def expanded(path: Any) -> Any:
    """`~` expanded in a path given as text (lm-eval and transformers take it literally)."""
    return os.path.expanduser(path) if isinstance(path, str) else path


def check_arguments(args: Any) -> None:
    """What lm-eval would find out late, or not at all, before a model or task loads: task names, --limit,
    --num_fewshot, --batch_size and --device in range, the results' folder writable, a known --model, and an HF
    model's arguments: pretrained= a loadable folder (lmlab.modeling.check_model_folder) or a reachable hub id,
    a tokenizer= whose ids fit the model, dtypes, lmlab's own (token_budget, state_memory_gib), based_fda's
    window. Paths are taken with `~` expanded, for lm-eval too."""
    # lm-eval splits --tasks at commas only: "piqa, arc_easy" would look for " arc_easy"
    args.tasks = [task.strip() for task in getattr(args, "tasks", None) or []]
    if not any(args.tasks):
        raise UserError("--tasks: no task named (e.g. --tasks piqa,arc_easy; `lm-eval ls tasks` lists them)")
    if not all(args.tasks):
        raise UserError(f"--tasks {','.join(args.tasks)}: an empty task name (a stray comma?)")
    if args.limit is not None:
        limit = args.limit
        if not (0 < limit < 1 or math.isfinite(limit) and limit >= 1 and limit.is_integer()):
            raise UserError(f"--limit {limit:g}: expected a count >= 1 or a fraction in (0, 1) of each task's "
                            "documents")
        if limit > MAX_LIMIT:
            raise UserError(f"--limit {limit:g}: more documents than any task has; leave --limit out for all of them")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num_fewshot {args.num_fewshot}: expected a count >= 0 of examples")
    batch_size = str(getattr(args, "batch_size", 1))
    if not (batch_size.isdigit() and int(batch_size) >= 1 or re.fullmatch(r"auto(:[1-9]\d*)?", batch_size)):
        raise UserError(f"--batch_size {batch_size}: expected an integer >= 1, 'auto' or 'auto:N'")
    check_device(args.device)
    import lm_eval.models  # noqa: F401  (registers lm-eval's model names)
    from lm_eval.api.registry import model_registry

    model, model_args = args.model or "hf", args.model_args or {}
    if model not in model_registry:
        raise UserError(f"--model {model}: no such model type (lm-eval's and lmlab's: "
                        f"{', '.join(sorted(model_registry.keys()))})")
    if model in HF_MODELS:
        for key in ("pretrained", "tokenizer"):
            if key in model_args:
                model_args[key] = expanded(model_args[key])
        check_hf_model_args(model_args)
    if args.output_path:
        from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

        args.output_path = expanded(args.output_path)
        check_output_path(args.output_path, GeneralConfigTracker._get_model_name(model_args), "--output_path")
    if "based_fda" in args.tasks:  # its window, before the model loads (the task checks it again when built)
        from lmlab.eval.fda import metadata_window

        metadata_window(args.metadata or {})


def check_hf_model_args(model_args: dict[str, Any]) -> None:
    """--model_args of lm-eval's HF model class (see check_arguments)."""
    pretrained, tokenizer = model_args.get("pretrained"), model_args.get("tokenizer")
    if not isinstance(pretrained, str):
        raise UserError("--model_args: no pretrained=MODEL (a model folder or a hub id; e.g. "
                        "--model_args pretrained=exp/mymodel,dtype=bfloat16)")
    for key in DTYPE_ARGS:
        if key in model_args:
            check_dtype(model_args[key], f"--model_args {key}={model_args[key]}")
    check_model_source(pretrained, f"--model_args pretrained={pretrained}", tokenizer=tokenizer is None)
    if isinstance(tokenizer, str) and is_local_path(tokenizer):
        if not Path(tokenizer).is_dir():
            raise UserError(f"--model_args tokenizer={tokenizer}: no such folder")
        if is_local_path(pretrained):  # its ids must fit the model's embedding, as train.sh checks
            from transformers import AutoConfig, AutoTokenizer

            check_vocab(AutoTokenizer.from_pretrained(tokenizer), AutoConfig.from_pretrained(pretrained),
                        f"--model_args pretrained={pretrained}",
                        f"--model_args tokenizer={tokenizer} is not the model's; name the tokenizer it was trained with")
    from lmlab.eval.lm import positive_gib, positive_tokens  # lmlab's own model args, checked as LmlabLM does

    for name, check in (("token_budget", positive_tokens), ("state_memory_gib", positive_gib)):
        if name in model_args:
            check(model_args[name])


def _raise_user_error(message: str) -> NoReturn:
    raise UserError(f"lm-eval: {message}")


def lm_eval_user_error(exc: ValueError) -> UserError | None:
    """lm-eval's own argument checks (unknown task, no task, conflicting flags) raise ValueError from its config
    module before any model loads: those are the user's to fix."""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and "lm_eval/config/" in Path(frames[-1].filename).as_posix():
        return UserError(f"lm-eval: {exc}")
    return None


def unknown_model_arg(exc: TypeError, model_args: dict[str, Any]) -> UserError | None:
    """A --model_args key that neither lm-eval's model class nor the model's from_pretrained takes: the model
    class's constructor refuses it ("got an unexpected keyword argument 'foo'"). Known only there, since
    from_pretrained passes on what it does not know (config overrides, loading options)."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if match is None or match[1] not in model_args:
        return None
    key = match[1]
    return UserError(f"--model_args {key}={model_args[key]}: not an argument of the model (neither lm-eval's model "
                     f"class nor its from_pretrained takes {key!r})")


def run(argv: list[str], data_dir: str | None) -> None:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    register_models()
    setup_logging()
    cli = HarnessCLI()
    # lm-eval's parsers print usage and exit; here a bad argument is one `error:` line like everywhere in lmlab
    for parser in (cli._parser, *cli._subparsers.choices.values()):
        parser.error = _raise_user_error
    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if args.command == "run":
        check_arguments(args)
        if data_dir and args.num_fewshot:
            check_fewshot_data(args.tasks, data_dir, args.num_fewshot)
    error = unreachable_data(getattr(args, "tasks", None) or [], data_dir)
    if error is not None:
        raise error
    with tempfile.TemporaryDirectory() as local_tasks:
        paths = [str(TASKS_DIR)]
        if data_dir:
            write_local_tasks(data_dir, Path(local_tasks))
            paths.append(local_tasks)
        quiet = QuietOwnChoices(paths)
        if getattr(args, "include_path", None):
            paths.append(args.include_path)
        args.include_path = paths
        for name in quiet.LOGGERS:
            logging.getLogger(name).addFilter(quiet)
        try:
            cli.execute(args)
        except OSError as exc:
            error = missing_data(exc, getattr(args, "tasks", None) or [], data_dir)
            if error is None:
                raise
            raise error from None
        except ValueError as exc:
            error = lm_eval_user_error(exc)
            if error is None:
                raise
            raise error from None
        except TypeError as exc:
            error = unknown_model_arg(exc, getattr(args, "model_args", None) or {})
            if error is None:
                raise
            raise error from None
        finally:
            for name in quiet.LOGGERS:
                logging.getLogger(name).removeFilter(quiet)


LMLAB_HELP = f"""
lmlab's additions (python -m evals.harness):
  --data_dir DIR   read every task from DIR/<task>/<split>.jsonl or .parquet (the hub dataset's fields; README
                   "Offline data" lists them); the environment variable {DATA_ENV}=DIR does the same
  tasks            lmlab's squad_completion, squad_completion_stock, swde, fda and based_fda come first on
                   --include_path; lmlab's model families are registered
"""


@contextlib.contextmanager
def bars_throttled_in_logs() -> Iterator[None]:
    """lm-eval's and datasets' progress bars (tqdm: the ETA is a moving average of the recent requests)
    refresh at most once a minute when stderr is a file, not a terminal: each refresh is a line there."""
    if sys.stderr.isatty() or "TQDM_MININTERVAL" in os.environ:
        yield
        return
    os.environ["TQDM_MININTERVAL"] = "60"
    try:
        yield
    finally:
        del os.environ["TQDM_MININTERVAL"]


@contextlib.contextmanager
def templates_compiled_once() -> Iterator[None]:
    """lm-eval renders each document's prompt, target and choices with `env.from_string(template)`, which
    compiles the Jinja template anew on every call: 74k compilations for the paper's 9-task suite, 81 s of
    the 99 s lm-eval itself spends on it (a model answering instantly, 2-core CPU, cProfile). The suite has
    a few dozen distinct templates, so each is compiled once here; the rendered text is the same."""
    from lm_eval import utils

    original = utils.apply_template
    compiled = functools.lru_cache(maxsize=None)(utils.env.from_string)
    utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        utils.apply_template = original


def evaluate(argv: list[str]) -> int:
    """The command's work, for `main` and for launch_hf.py, which runs it under its own name (its errors are
    launch_hf.py's)."""
    argv = list(argv)
    data_dir = local_data_dir(pop_option(argv, "--data_dir"))
    try:
        with bars_throttled_in_logs(), templates_compiled_once(), vectorised_bootstrap(), lm_eval_tasks_cached():
            run(argv, data_dir)
    except SystemExit as done:  # lm-eval's own --help: then say what lmlab adds
        if done.code == 0 and any(arg in ("-h", "--help") for arg in argv):
            print(LMLAB_HELP)
        raise
    return 0


@command("python -m evals.harness")
def main(argv: list[str] | None = None) -> int:
    return evaluate(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # for torchrun (launch_hf.py -p): python -m torch.distributed.run -m lmlab.eval.harness
    sys.exit(main())
