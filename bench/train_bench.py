"""Train-step throughput, MFU and memory of lmlab's training path against fla 0.6.0's own models.

    python bench/train_bench.py                  # 340M configs, seq 2048, with the fla baseline
    python bench/train_bench.py --large          # 1.3B configs, seq 2240, 64 sequences per step
    python bench/train_bench.py --device cpu --configs tiny_gla --seq-len 64 --batch-sizes 2 1

For each config: the largest micro-batch of --batch-sizes that fits (CUDA OOM -> the next), then
--warmup steps and --steps timed steps (CUDA events). lmlab rows run the trainer's own step
(build_model -> parallelize -> bf16 autocast over fp32 weights -> forward_backward -> clip_grad_norm ->
AdamW); fla rows run fla's *ForCausalLM in a plain bf16 loop (bf16 weights, no compile, torch AdamW).
Results go to --out (JSON) and are appended to --results-md; the table is printed last. See bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

import lmlab.models
from lmlab.config import JobConfig
from lmlab.distributed import Dist, parallelize
from lmlab.flops import dense_flops_per_token, flops_per_token, peak_flops
from lmlab.kernels import dispatch
from lmlab.modeling import build_model, load_model_config
from lmlab.optim import build_optimizer
from lmlab.train import clip_grad_norm, forward_backward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import profile_to  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS_340M = ["transformer_340M", "delta_net_340M", "gated_deltanet_340M", "gla_340M", "gated_deltanet_340M_hybrid"]
CONFIGS_1B = ["transformer_1B", "delta_net_1B", "gated_deltanet_1B", "gla_1B"]
# fla 0.6.0's classes for lmlab's model types (the Auto classes map these types to lmlab's own).
FLA_CLASSES = {
    "transformer": ("TransformerConfig", "TransformerForCausalLM"),
    "delta_net": ("DeltaNetConfig", "DeltaNetForCausalLM"),
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM"),
    "gla": ("GLAConfig", "GLAForCausalLM"),
    "hgrn2": ("HGRN2Config", "HGRN2ForCausalLM"),
    "gsa": ("GSAConfig", "GSAForCausalLM"),
    "mamba": ("MambaConfig", "MambaForCausalLM"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM"),
    "samba": ("SambaConfig", "SambaForCausalLM"),
}
# A step function and the model's parameter count, built for one micro-batch size.
Builder = Callable[[int], tuple[Callable[[], None], int]]


@dataclasses.dataclass
class Row:
    config: str
    impl: str  # "lmlab", "lmlab (backend X)" or "fla"
    micro_batch: int | None = None
    accumulation: int | None = None
    tokens_per_second: float | None = None  # per GPU
    mfu: float | None = None  # lmlab.flops (architecture-aware) / measured peak
    mfu_6n: float | None = None  # plain 6·N·tokens / measured peak
    peak_memory_gib: float | None = None
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)  # op -> backend (lmlab rows)
    vs_baseline: float | None = None  # lmlab tokens/s / fla tokens/s
    note: str = ""  # why the row has no numbers


class AllOutOfMemory(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", help="names in configs/ or JSON paths (default: the 340M set, "
                   "or the 1.3B set with --large)")
    p.add_argument("--large", action="store_true", help="1.3B configs at seq 2240, 64 sequences per step")
    p.add_argument("--seq-len", type=int, help="default 2048, 2240 with --large")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 8, 4, 2, 1],
                   help="micro-batch sizes to try, largest first (default 16 8 4 2 1)")
    p.add_argument("--seqs-per-step", type=int, help="sequences per optimizer step, reached by gradient "
                   "accumulation (default: one micro-batch; 64 with --large)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first compiles (default 3)")
    p.add_argument("--no-compile", action="store_true", help="lmlab rows without per-block torch.compile")
    p.add_argument("--no-baseline", action="store_true", help="skip the fla rows")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=dispatch.BACKENDS,
                   help="one lmlab row per kernel backend request (--model.backend), e.g. 'auto fla' to "
                   "compare lmlab's choice with fla's kernels everywhere they exist (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (bf16 autocast, MFU, fla baseline) or cpu (fp32, no MFU, no baseline)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="JSON results")
    p.add_argument("--results-md", type=Path, default=REPO / "bench" / "RESULTS.md", help="Markdown log to append to")
    p.add_argument("--memory-cap-gib", type=float, help="allow the process at most this much GPU memory, as on a "
                   "smaller card (e.g. 79 for an 80 GB H100 on an H200): micro-batches that need more count as "
                   "out of memory (default: --large sets 79, the memory an 80 GB H100 reports, less the context)")
    p.add_argument("--profile", type=Path, help="also profile one step per row (torch profiler) and append its "
                   "table of the most expensive ops/kernels to this file")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "bench/train_bench.py", *(sys.argv[1:] if argv is None else argv)])
    args.configs = args.configs or (CONFIGS_1B if args.large else CONFIGS_340M)
    args.seq_len = args.seq_len or (2240 if args.large else 2048)
    args.seqs_per_step = args.seqs_per_step or (64 if args.large else None)
    if args.memory_cap_gib is None and args.large:
        args.memory_cap_gib = 79.0
    if args.steps < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--steps must be >= 1, --warmup >= 0 and every batch size >= 1")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:  # some torch.cuda calls need the index
        args.device = torch.device("cuda", torch.cuda.current_device())
    return args


def config_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix == ".json" else REPO / "configs" / f"{name}.json"


def accumulation_for(micro: int, seqs_per_step: int | None) -> int:
    """Micro-batches per optimizer step keeping `seqs_per_step` sequences (one without a target)."""
    return 1 if seqs_per_step is None else max(1, seqs_per_step // micro)


def random_batch(vocab_size: int, micro: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    # Throughput does not depend on the token values; labels are unshifted (HF convention).
    input_ids = torch.randint(0, vocab_size, (micro, seq_len), device=device)
    return {"input_ids": input_ids, "labels": input_ids}


def lmlab_builder(path: Path, args: argparse.Namespace, backend: str) -> Builder:
    """The trainer's step (lmlab.train) for one micro-batch size, single process, as train.py sets it up
    with `--model.backend backend`."""

    def build(micro: int) -> tuple[Callable[[], None], int]:
        torch._dynamo.reset()  # fresh static-shape graphs: a recompile after an OOM would go dynamic
        dispatch.clear_choices()
        cfg = JobConfig()
        cfg.model.config = str(path)
        cfg.model.backend = backend
        cfg.training.seq_len, cfg.training.batch_size = args.seq_len, micro
        cfg.training.gradient_accumulation_steps = accumulation_for(micro, args.seqs_per_step)
        cfg.training.compile = not args.no_compile
        torch.set_float32_matmul_precision("high")  # as train.py
        vocab_size = load_model_config(str(path)).vocab_size
        model = build_model(cfg.model, vocab_size=vocab_size, device=args.device)
        n_params = sum(p.numel() for p in model.parameters())
        model = parallelize(model, cfg, Dist(0, 1, 0, args.device, None))
        optimizer = build_optimizer(model, cfg.optimizer)
        model.train()
        batch = random_batch(vocab_size, micro, args.seq_len, args.device)
        micro_batches = [batch] * cfg.training.gradient_accumulation_steps
        # forward_backward divides the token-sum loss by the step's label tokens, counted as train.py does.
        denominator = float(len(micro_batches) * micro * (args.seq_len - 1))
        # train.py: bf16 autocast over fp32 weights on one CUDA device, plain fp32 elsewhere.
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.type == "cuda")

        def step() -> None:
            forward_backward(model, micro_batches, args.device, denominator, autocast)
            clip_grad_norm(model, cfg.training.max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, n_params

    return build


def fla_unavailable(device: torch.device) -> str | None:
    """Why fla's models cannot run on `device`, or None (then fla is imported)."""
    if device.type != "cuda":
        return "fla has no CPU path (its kernels are Triton, CUDA only)"
    try:
        import fla.models  # noqa: F401
    except ImportError as exc:
        return f"fla not importable ({exc})"
    lmlab.models.register()  # importing fla re-registered its classes for lmlab's model types
    return None


def fla_builder(path: Path, args: argparse.Namespace) -> Builder:
    """fla's own model class from the same config JSON, in a plain bf16 loop (no compile)."""
    import fla.models

    def build(micro: int) -> tuple[Callable[[], None], int]:
        values = json.loads(path.read_text())
        config_name, model_name = FLA_CLASSES[values.pop("model_type")]
        config = getattr(fla.models, config_name)(**values)
        with torch.device(args.device):
            model = getattr(fla.models, model_name)(config).to(torch.bfloat16).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=8e-4, weight_decay=0.1)
        accumulation = accumulation_for(micro, args.seqs_per_step)
        batch = random_batch(config.vocab_size, micro, args.seq_len, args.device)

        def step() -> None:
            for _ in range(accumulation):
                (model(**batch, use_cache=False).loss / accumulation).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, sum(p.numel() for p in model.parameters())

    return build


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_seconds(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(row: Row, build: Builder, args: argparse.Namespace, flops: float, peak: float | None) -> None:
    """Fill `row` for the largest micro-batch that fits; AllOutOfMemory when none does."""
    for micro in args.batch_sizes:
        free_memory(args.device)
        try:
            seconds, n_params = attempt(row, build, micro, args)
        except torch.OutOfMemoryError:
            continue  # the failed attempt's tensors are freed with its frame, once this handler ends
        row.micro_batch, row.accumulation = micro, accumulation_for(micro, args.seqs_per_step)
        row.tokens_per_second = row.micro_batch * row.accumulation * args.seq_len * args.steps / seconds
        if peak:
            row.mfu = row.tokens_per_second * flops / peak
            row.mfu_6n = row.tokens_per_second * dense_flops_per_token(n_params) / peak
        if args.device.type == "cuda":
            row.peak_memory_gib = torch.cuda.max_memory_allocated(args.device) / 2**30
        return
    raise AllOutOfMemory(f"out of memory at every micro-batch size in {args.batch_sizes}")


def attempt(row: Row, build: Builder, micro: int, args: argparse.Namespace) -> tuple[float, int]:
    """Build for `micro`, warm up, time: (seconds of the timed steps, parameter count)."""
    step, n_params = build(micro)
    for _ in range(args.warmup):
        step()
    seconds = timed_seconds(step, args.steps, args.device)
    if args.profile:
        with profile_to(args.profile, f"{row.config} {row.impl}, micro-batch {micro}", args.device):
            step()
    return seconds, n_params


def run_row(row: Row, build: Builder, args: argparse.Namespace, flops: float, peak: float | None) -> Row:
    """Measure one row; any failure becomes the row's note (one line) so the other rows still run."""
    try:
        measure(row, build, args, flops, peak)
    except Exception as exc:  # noqa: BLE001  (a benchmark reports failures, it does not stop at them)
        if not isinstance(exc, AllOutOfMemory):
            traceback.print_exc()
        lines = str(exc).strip().splitlines()
        row.note = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    free_memory(args.device)
    return row


def run(args: argparse.Namespace) -> tuple[dict, list[Row]]:
    """All rows; the JSON and this run's section of the Markdown log are rewritten after each, so a run cut
    short (a device call's time limit) still leaves what it measured."""
    torch.manual_seed(0)
    if args.memory_cap_gib and args.device.type == "cuda":
        total = torch.cuda.get_device_properties(args.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), args.device)
    peak = peak_flops(args.device)
    env = environment(args, peak)
    baseline_reason = None if args.no_baseline else fla_unavailable(args.device)
    rows: list[Row] = []
    earlier_log = (args.results_md.read_text() + "\n" if args.results_md.exists()
                   else "# Training benchmark results (appended by bench/train_bench.py)\n\n")

    def add(row: Row) -> None:
        rows.append(row)
        write_json(args.out, env, rows)
        args.results_md.parent.mkdir(parents=True, exist_ok=True)
        args.results_md.write_text(earlier_log + markdown(env, rows))
        print(f"bench: {row.config} {row.impl}: {_num(row.tokens_per_second, ',.0f')} tokens/s {row.note}", flush=True)

    for name in args.configs:
        path = config_path(name)
        model_config = load_model_config(str(path))
        flops = flops_per_token(model_config, args.seq_len)
        ours = []
        for backend in args.backends:
            impl = "lmlab" if backend == "auto" else f"lmlab (backend {backend})"
            row = run_row(Row(path.stem, impl), lmlab_builder(path, args, backend), args, flops, peak)
            row.kernels = dispatch.last_choices() if row.tokens_per_second else {}
            ours.append(row)
            add(row)
        if args.no_baseline:
            continue
        if baseline_reason is not None or model_config.model_type not in FLA_CLASSES:
            add(Row(path.stem, "fla", note=baseline_reason or f"fla has no {model_config.model_type} model"))
            continue
        base = run_row(Row(path.stem, "fla"), fla_builder(path, args), args, flops, peak)
        for row in ours:
            if row.tokens_per_second and base.tokens_per_second:
                row.vs_baseline = row.tokens_per_second / base.tokens_per_second
        add(base)
    return env, rows


def write_json(path: Path, env: dict, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")


def version(package: str, module: str | None = None) -> str:
    """An installed package's version; for a module carried as files (no metadata), its __version__."""
    if module in sys.modules:
        return getattr(sys.modules[module], "__version__", "?")
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(args: argparse.Namespace, peak: float | None) -> dict:
    cuda = args.device.type == "cuda"
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "fla": version("flash-linear-attention", "fla"),
        "seq_len": args.seq_len,
        "seqs_per_step": args.seqs_per_step,
        "compile": not args.no_compile,
        "memory_cap_gib": args.memory_cap_gib,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": "bf16 autocast (lmlab), bf16 weights (fla)" if cuda else "fp32",
        "peak_tflops": peak / 1e12 if peak else None,
        "command": args.command,
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _kernels(choices: dict[str, str]) -> str:
    """{op: backend} as 'fla: op1, op2; torch: op3'."""
    by_backend: dict[str, list[str]] = {}
    for op, backend in sorted(choices.items()):
        by_backend.setdefault(backend, []).append(op)
    return "; ".join(f"{backend}: {', '.join(ops)}" for backend, ops in sorted(by_backend.items()))


def markdown(env: dict, rows: list[Row]) -> str:
    peak = f"{env['peak_tflops']:.0f} TFLOP/s" if env["peak_tflops"] else "none (no MFU)"
    per_step = f"{env['seqs_per_step']} sequences per step" if env["seqs_per_step"] else "one micro-batch per step"
    cap = f"; GPU memory capped at {env['memory_cap_gib']:g} GiB" if env.get("memory_cap_gib") else ""
    lines = [
        f"## {env['date']} — {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, fla {env['fla']}; "
        f"seq {env['seq_len']}, {per_step}; {env['dtype']}; lmlab compile {'on' if env['compile'] else 'off'}; "
        f"{env['steps']} timed steps after {env['warmup']} warm-up; measured bf16 matmul peak {peak}{cap}. "
        f"`{env['command']}`",
        "",
        "| config | impl | micro × accum | tokens/s/GPU | MFU | MFU (6N) | peak mem GiB | lmlab/fla "
        "| kernels / note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        batch = "-" if r.micro_batch is None else f"{r.micro_batch} × {r.accumulation}"
        detail = "; ".join(part for part in (_kernels(r.kernels), r.note) if part)
        lines.append(
            f"| {r.config} | {r.impl} | {batch} | {_num(r.tokens_per_second, ',.0f')} | {_num(r.mfu, '.1%')} "
            f"| {_num(r.mfu_6n, '.1%')} | {_num(r.peak_memory_gib, '.1f')} | {_num(r.vs_baseline, '.2f')} "
            f"| {detail.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env, rows = run(args)
    print(f"\nwrote {args.out} and appended to {args.results_md}\n\n{markdown(env, rows)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
