"""Training metrics: a console line, JSONL (`<dump>/metrics.jsonl`), tensorboard events, Weights & Biases,
a progress bar.

Only the main rank writes. The JSONL file is the source of truth for `lmlab plot` and `lmlab report`;
one JSON object per logged step.
"""
from __future__ import annotations

import json
import netrc
import os
import sys
import time
import urllib.parse
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from lmlab.config import Metrics
from lmlab.errors import UserError
from lmlab.network import unreachable_reason

METRICS_FILE = "metrics.jsonl"
WANDB_FOLDER = "wandb"  # wandb's own folder in the dir it is given (the dump)
WANDB_ID_FILE = "lmlab_run_id"  # in it: the W&B run id that a resume continues
# train.sh's launcher shows the progress bar (it owns the terminal; torchrun turns the trainer's output into
# lines): the trainer writes "step total" into this file after every step.
PROGRESS_FILE_ENV = "LMLAB_PROGRESS_FILE"


class RecentSteps:
    """The ETA from this process's last `window` steps: their mean duration times the steps left. Not the
    run's average (a slow start, compilation, would weigh on it for good), and not counting the steps of
    the earlier processes of a resumed run."""

    def __init__(self, window: int = 20) -> None:
        self.ends: deque[float] = deque(maxlen=window + 1)

    def step_done(self) -> None:
        self.ends.append(time.perf_counter())

    def eta(self, steps_left: int) -> float | None:
        """Seconds, or None before two steps of this process have ended."""
        if len(self.ends) < 2:
            return None
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1) * steps_left


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def wandb_offline_reason() -> str | None:
    """Why a W&B run cannot go online now (no login, no connection); None if it can."""
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not os.environ.get("WANDB_API_KEY"):
        try:  # `wandb login` stores the key in ~/.netrc
            logged_in = netrc.netrc().authenticators(urllib.parse.urlparse(base_url).hostname) is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        if not logged_in:
            return "not logged in: run `wandb login`"
    return unreachable_reason(base_url)


def start_wandb(dump_folder: Path, config: dict[str, Any], default_name: str, fresh: bool) -> Any:
    """The W&B run of --metrics.enable_wandb, named as flame names it: project $WANDB_PROJECT (default
    "fla"), run name $WANDB_NAME (default `default_name`), entity $WANDB_ENTITY (else the login's). Its id
    is kept in the dump, so that a resumed run (not `fresh`) continues the same W&B run. Without a login or
    a connection it runs offline, as with WANDB_MODE=offline: into a folder under <dump>/wandb that
    `wandb sync` uploads later (one line says which)."""
    import wandb

    id_file = dump_folder / WANDB_FOLDER / WANDB_ID_FILE
    run_id = os.environ.get("WANDB_RUN_ID") or (
        id_file.read_text().strip() if id_file.is_file() and not fresh else uuid.uuid4().hex[:8])
    mode = os.environ.get("WANDB_MODE")
    offline = None if mode else wandb_offline_reason()
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fla"), name=os.environ.get("WANDB_NAME", default_name),
                     id=run_id, resume="allow", dir=dump_folder, config=config,
                     mode=mode or ("offline" if offline else "online"),
                     settings=wandb.Settings(silent=True))  # wandb's banner lines: the line below says what matters
    id_file.parent.mkdir(exist_ok=True)
    id_file.write_text(run_id)
    if run.settings.mode == "offline":
        print(f"lmlab: W&B run {run_id} is offline ({offline or 'WANDB_MODE=offline'}); upload it later with: "
              f"wandb sync {Path(run.dir).parent}", flush=True)
    return run


class MetricLogger:
    def __init__(self, dump_folder: Path, cfg: Metrics, total_steps: int, enabled: bool, first_step: int = 0,
                 wandb_run: Any = None) -> None:
        """`first_step`: the step a resumed run starts after; `wandb_run`: a W&B run (`start_wandb`) that gets
        the same values, or None."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.tb = None
        self.bar = None
        self.wandb_run = wandb_run
        self.recent = RecentSteps()
        self.progress_file = os.environ.get(PROGRESS_FILE_ENV)
        if not enabled:
            return
        self.file = open(dump_folder / METRICS_FILE, "a")
        if cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(dump_folder / cfg.save_tb_folder))
        if sys.stderr.isatty():  # a bar in a log file would be one line per refresh
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, leave=False)
        self.color = not cfg.disable_color_printing and sys.stdout.isatty()

    def step_done(self, step: int) -> None:
        """After every optimizer step: the progress bar (here, or train.sh's) and the ETA's clock."""
        if not self.enabled:
            return
        self.recent.step_done()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if self.progress_file:
            Path(self.progress_file).write_text(f"{step} {self.total_steps}\n")

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Log `values` of `step`, adding `eta_seconds` (from the recent steps) once known."""
        if not self.enabled:
            return
        eta = self.recent.eta(self.total_steps - step)
        values = values if eta is None else {**values, "eta_seconds": eta}
        record = {"step": step, "time": time.time(), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)
        self._print(step, values)

    def _print(self, step: int, v: dict[str, Any]) -> None:
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}", f"loss {v['loss']:.4f}"]
        parts.append(f"lr {v['lr']:.3g}")
        parts.append(f"gnorm {v['grad_norm']:.3f}")
        parts.append(f"tok/s/dev {v['tokens_per_second_per_device']:,.0f}")
        if "mfu" in v:
            parts.append(f"mfu {v['mfu']:.1%}")
        if "memory_gib" in v:
            parts.append(f"mem {v['memory_gib']:.1f}GiB")
        if v.get("skipped_steps"):
            parts.append(f"skipped {v['skipped_steps']}")
        eta = format_duration(v["eta_seconds"]) if "eta_seconds" in v else "?"
        parts.append(f"elapsed {format_duration(v['elapsed_seconds'])} eta {eta}")
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {v['loss']:.4f}", refresh=True)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.bar is not None:
            self.bar.close()


def read_metrics(dump_folder: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in step order. A record whose step is not after the previous
    record's starts a new timeline (a resume from a checkpoint before the last logged step, a restart from
    scratch), whose records replace the old ones from that step on. UserError for a folder without one, or
    a line that is not a record of a step (naming the line)."""
    path = Path(dump_folder) / METRICS_FILE
    if not path.is_file():
        what = "no such folder" if not Path(dump_folder).exists() else f"no {METRICS_FILE}, so not an lmlab dump folder"
        raise UserError(f"{dump_folder}: {what}")
    by_step: dict[int, dict[str, Any]] = {}
    last_step = 0
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:  # invalid JSON or UTF-8
                raise UserError(f"{path}:{number}: not a JSON record (a truncated or foreign line?)") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise UserError(f"{path}:{number}: not a record of a step (expected an object with an integer 'step')")
            step = record["step"]
            if by_step and step <= last_step:
                by_step = {earlier: kept for earlier, kept in by_step.items() if earlier < step}
            by_step[step], last_step = record, step
    return [by_step[s] for s in sorted(by_step)]
