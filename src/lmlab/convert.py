"""`lmlab convert`: DCP checkpoints <-> Hugging Face models (the flags of flame's convert scripts).

    lmlab convert dcp-to-hf --path DUMP [--step N] [--output DIR] [--config CFG] [--tokenizer TOK] [--dtype D]
        Writes config.json + model.safetensors (+ tokenizer files) of `DUMP/checkpoint/step-N` (default: the
        newest complete step) into DIR, replacing only those files there. Without --output, DIR is DUMP if it
        holds no HF export yet (a run that stopped before its end); the run's own export is never replaced
        by default: then --output is required. The model config comes from the checkpoint (lmlab stores it
        in every step) unless --config names one.
    lmlab convert hf-to-dcp --model HF --checkpoint PATH
        Writes the HF model's weights as a weights-only DCP checkpoint at PATH, with the same keys the trainer
        saves and loads, so `--checkpoint.initial_load_path PATH` (or PATH = `DUMP/checkpoint/step-0`) starts
        a run from it.

`main(argv) -> int`: 0 on success, else one `error:` line (lmlab.errors.run_command): 2 for problems the user
can fix, found before anything is written.
Conversion runs in one process on the CPU; nothing is executed from the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

import lmlab  # noqa: F401  (registers lmlab's model types with the Auto classes)
from lmlab.checkpoint import (
    META_FILE,
    complete_steps,
    load_state,
    read_metadata,
    save_model_weights,
    write_hf,
)
from lmlab.config import Checkpoint
from lmlab.distributed import Dist
from lmlab.errors import ArgumentParser, UserError, command
from lmlab.modeling import check_model_folder, is_local_path


def _single_process() -> Dist:
    return Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


def _stages(total: int, what: str) -> tqdm:
    """A progress bar over a conversion's stages (read, load, write), on a terminal only."""
    return tqdm(total=total, desc=what, unit="stage", leave=False, disable=not sys.stderr.isatty(),
                bar_format="{desc}: {n}/{total} stages [{elapsed}] {postfix}")


def dcp_to_hf(
    path: Path, step: int, output: Path | None, config: str | None, tokenizer: str | None, dtype: str
) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    if not path.is_dir():
        raise UserError(f"--path {path}: no such folder")
    folder = path / Checkpoint().folder
    steps = complete_steps(folder)
    if not steps:
        raise UserError(f"no complete checkpoint in {folder}")
    if step == -1:
        step = steps[-1]
    if step not in steps:
        raise UserError(f"--step {step}: no complete checkpoint step-{step} in {folder} (available: {', '.join(map(str, steps))})")
    out = output or path
    if output is None and (path / "model.safetensors").exists():
        raise UserError(f"--path {path} already holds the run's HF export (model.safetensors); pass --output DIR to write "
                        f"step {step} elsewhere (never over the run's own export by default)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a folder")
    step_dir = folder / f"step-{step}"
    if not (step_dir / META_FILE).is_file():
        raise UserError(f"{step_dir} was not written by lmlab (no {META_FILE}); its key layout is unknown")
    bar = _stages(3, f"dcp-to-hf {step_dir}")
    bar.set_postfix_str("loading the weights")
    metadata = read_metadata(step_dir)
    templates = {
        key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)
    }
    load_state({"model": templates}, step_dir)
    bar.update()
    bar.set_postfix_str("reading the config and tokenizer")
    config_source = config or str(step_dir)
    try:
        model_config = AutoConfig.from_pretrained(config_source)
        model_tokenizer = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config or tokenizer ({str(exc).splitlines()[0]})") from None
    bar.update()
    bar.set_postfix_str(f"writing {out}")
    write_hf(templates, model_config, model_tokenizer, out, dtype)
    bar.update()
    bar.close()
    return out


def hf_to_dcp(model_name: str, checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    if checkpoint.exists():
        raise UserError(f"--checkpoint {checkpoint} already exists; choose a new path")
    if is_local_path(model_name):
        check_model_folder(Path(model_name).expanduser(), f"--model {model_name}", tokenizer=False)
    bar = _stages(2, f"hf-to-dcp {model_name}")
    bar.set_postfix_str("loading the model")
    try:
        # safetensors only: a pickled pytorch_model.bin is never unpickled, so it cannot run code
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load HF model {model_name!r} ({str(exc).splitlines()[0]})") from None
    bar.update()
    bar.set_postfix_str(f"writing {checkpoint}")
    save_model_weights(model, checkpoint, _single_process())
    bar.update()
    bar.close()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lmlab convert", description="Convert between DCP checkpoints and HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("dcp-to-hf", help="DCP checkpoint -> HF model (config.json + model.safetensors)")
    to_hf.add_argument("--path", type=Path, required=True, help="the run's dump folder")
    to_hf.add_argument("--step", type=int, default=-1, help="checkpoint step (default: the newest complete one)")
    to_hf.add_argument("--output", type=Path, help="where to write the HF files (default: the dump folder)")
    to_hf.add_argument("--config", help="model config (JSON path or dir); default: the one saved with the step")
    to_hf.add_argument("--tokenizer", help="tokenizer to save alongside (path or hub id)")
    to_hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to_dcp = sub.add_parser("hf-to-dcp", help="HF model -> weights-only DCP checkpoint")
    to_dcp.add_argument("--model", required=True, help="HF model directory or hub id")
    to_dcp.add_argument("--checkpoint", type=Path, required=True, help="output DCP directory (must not exist)")
    return parser


@command("lmlab convert")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dcp-to-hf":
        out = dcp_to_hf(args.path, args.step, args.output, args.config, args.tokenizer, args.dtype)
        print(f"lmlab: wrote the HF model to {out}")
    else:
        hf_to_dcp(args.model, args.checkpoint)
        print(f"lmlab: wrote a weights-only DCP checkpoint to {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
