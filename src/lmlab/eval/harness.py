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
import logging
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

import lmlab.models
from lmlab.errors import UserError, command
from lmlab.eval.bootstrap import vectorised_bootstrap
from lmlab.eval.task_index import lm_eval_tasks_cached
from lmlab.modeling import check_model_folder, is_local_path
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
    folder: str = ""  # under --data_dir; default: the task's name


TASKS = {
    "wikitext": TaskData("EleutherAI/wikitext_document_level", LM_EVAL_TASKS / "wikitext/wikitext.yaml",
                         ("test", "train", "validation")),
    "lambada_openai": TaskData("EleutherAI/lambada_openai", LM_EVAL_TASKS / "lambada/lambada_openai.yaml",
                               ("test",)),
    "piqa": TaskData("baber/piqa", LM_EVAL_TASKS / "piqa/piqa.yaml", ("validation", "train")),
    "hellaswag": TaskData("Rowan/hellaswag", LM_EVAL_TASKS / "hellaswag/hellaswag.yaml", ("validation", "train")),
    "winogrande": TaskData("allenai/winogrande", LM_EVAL_TASKS / "winogrande/default.yaml",
                           ("validation", "train")),
    "arc_easy": TaskData("allenai/ai2_arc", LM_EVAL_TASKS / "arc/arc_easy.yaml", ("test", "train", "validation")),
    "arc_challenge": TaskData("allenai/ai2_arc", LM_EVAL_TASKS / "arc/arc_challenge.yaml",
                              ("test", "train", "validation")),
    "squad_completion": TaskData("hazyresearch/based-squad", TASKS_DIR / "squad_completion.yaml", ("validation",)),
    "squad_completion_stock": TaskData("hazyresearch/based-squad", TASKS_DIR / "squad_completion_stock.yaml",
                                       ("validation",), "squad_completion"),
    "swde": TaskData("hazyresearch/based-swde-v2", TASKS_DIR / "swde.yaml", ("validation",)),
    "fda": TaskData("hazyresearch/based-fda", TASKS_DIR / "fda.yaml", ("validation",)),
    "based_fda": TaskData("hazyresearch/based-fda", TASKS_DIR / "based_fda.yaml", ("validation",), "fda"),
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
        override = {"task": task, "dataset_path": "parquet" if found[data.splits[0]].endswith(".parquet") else "json",
                    "dataset_name": None, "dataset_kwargs": {"data_files": found}}
        override |= {SPLIT_KEYS[split]: None for split, path in files.items() if path is None}
        (out / f"{task}.yaml").write_text(yaml.safe_dump({"include": str(data.definition), **override}))
        print(f"lmlab: {task} reads {', '.join(found.values())}", file=sys.stderr)


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


def check_arguments(args: Any, data_dir: str | None) -> None:
    """What lm-eval would find out late or not at all, before a model or task loads: --limit and --batch_size
    in range, --data_dir a folder, an `hf` model's local folder loadable (lmlab.modeling.check_model_folder)
    and its lmlab model args (token_budget, state_memory_gib) valid."""
    if not getattr(args, "tasks", None):
        raise UserError("--tasks: no task named (e.g. --tasks piqa,arc_easy; `lm-eval ls tasks` lists them)")
    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit {args.limit:g}: expected a count >= 1 or a fraction in (0, 1) of each task's documents")
    batch_size = str(getattr(args, "batch_size", 1))
    if not (batch_size.isdigit() and int(batch_size) >= 1 or re.fullmatch(r"auto(:[1-9]\d*)?", batch_size)):
        raise UserError(f"--batch_size {batch_size}: expected an integer >= 1, 'auto' or 'auto:N'")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data_dir {data_dir}: no such folder")
    model_args = args.model_args or {}
    if (args.model or "hf") == "hf":
        pretrained, tokenizer = model_args.get("pretrained"), model_args.get("tokenizer")
        if isinstance(pretrained, str) and is_local_path(pretrained):
            check_model_folder(Path(pretrained).expanduser(), f"--model_args pretrained={pretrained}",
                               tokenizer=tokenizer is None)
        elif isinstance(pretrained, str) and huggingface_hub.constants.HF_HUB_OFFLINE \
                and huggingface_hub.try_to_load_from_cache(pretrained, "config.json") is None:
            raise UserError(f"--model_args pretrained={pretrained}: no such folder, and the hub is offline "
                            "(HF_HUB_OFFLINE) with no cached copy")
        if isinstance(tokenizer, str) and is_local_path(tokenizer) and not Path(tokenizer).expanduser().is_dir():
            raise UserError(f"--model_args tokenizer={tokenizer}: no such folder")
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
        check_arguments(args, data_dir)
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


@command("python -m evals.harness")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = pop_option(argv, "--data_dir") or os.environ.get(DATA_ENV)
    try:
        with bars_throttled_in_logs(), templates_compiled_once(), vectorised_bootstrap(), lm_eval_tasks_cached():
            run(argv, data_dir)
    except SystemExit as done:  # lm-eval's own --help: then say what lmlab adds
        if done.code == 0 and any(arg in ("-h", "--help") for arg in argv):
            print(LMLAB_HELP)
        raise
    return 0


if __name__ == "__main__":  # for torchrun (launch_hf.py -p): python -m torch.distributed.run -m lmlab.eval.harness
    sys.exit(main())
