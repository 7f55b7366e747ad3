"""The recall tasks (squad_completion, swde, fda, based_fda) as subclasses of lm-eval 0.4.13's classes.

lm-eval's classes hard-code their hub dataset and ignore their yaml; these subclasses accept a yaml's
`dataset_path` / `dataset_name` / `dataset_kwargs` (how `--data_dir` points them at local files) and
otherwise keep lm-eval's prompt, requests and `contains` metric. Protocol differences: lmlab.eval.harness.
"""
from __future__ import annotations

from typing import Any

import datasets
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks.fda.task import FDA as StockFDA
from lm_eval.tasks.squad_completion.task import SQUADCompletion
from lm_eval.tasks.swde.task import SWDE as StockSWDE
from transformers import AutoTokenizer

from lmlab.errors import UserError
from lmlab.eval import fda

KEPT_KEYS = ("task", "dataset_path", "dataset_name", "dataset_kwargs")
# The generation settings of swde/fda in 0.4.13, and of squad_completion until lm-eval PR #3795.
PAPER_GENERATION = {"until": ["\n"], "max_gen_toks": 48}


class _LocalData:
    """Mixin: build the lm-eval task from the yaml's dataset keys and metadata only."""

    GENERATION: dict[str, Any] | None = None

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        task_config = {key: config[key] for key in KEPT_KEYS if key in config}
        if "dataset_path" in task_config:
            self.DATASET_NAME = task_config.pop("dataset_name", None)  # not the hub dataset's "default"
        if self.GENERATION is not None:
            task_config["generation_kwargs"] = dict(self.GENERATION)
        task_config["metadata"] = {**config.get("metadata", {}), "version": self.VERSION}
        ConfigurableTask.__init__(self, config=task_config)


class SquadCompletion(_LocalData, SQUADCompletion):
    """The paper's squad_completion: stripped (as 0.4.13) and generating until "\\n", 48 tokens."""

    GENERATION = PAPER_GENERATION


class SquadCompletionStock(_LocalData, SQUADCompletion):
    """0.4.13's squad_completion: stripped, generating until "\\n\\n", 256 tokens (lm-eval's defaults)."""


class SWDE(_LocalData, StockSWDE):
    """0.4.13's swde (stripped, until "\\n", 48 tokens) with local data."""

    GENERATION = PAPER_GENERATION  # what its requests use (0.4.13 records unused defaults)


class FDA(_LocalData, StockFDA):
    """0.4.13's fda (stripped, until "\\n", 48 tokens) with local data."""

    GENERATION = PAPER_GENERATION  # what its requests use (0.4.13 records unused defaults)


class BasedFDA(FDA):
    """FDA by the JRT/Based protocol (launch_hf.py -t based_fda); see lmlab.eval.fda.

    Options come from lm-eval's `--metadata` (context_length, answer_length, cutting_context; defaults:
    the paper's 1000, 50, true); the window is measured with the model's tokenizer (model_args'
    `tokenizer`, else `pretrained`). The request, greedy generation and `contains` are lm-eval's fda ones,
    scored against the unstripped value.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        # set before lm-eval's constructor, which already reads the documents
        meta = (config or {}).get("metadata", {})
        self.cutting_context = bool(meta.get("cutting_context", True))
        self.window = fda.metadata_window(meta)
        source = meta.get("tokenizer") or meta.get("pretrained")
        if self.cutting_context and not isinstance(source, str):
            raise UserError("based_fda measures its window with the model's tokenizer: pass "
                            "pretrained=<path> (or tokenizer=<path>) in --model_args")
        self.tokenizer = AutoTokenizer.from_pretrained(source) if self.cutting_context else None
        self._docs: datasets.Dataset | None = None
        super().__init__(config)

    def validation_docs(self) -> datasets.Dataset:
        if self._docs is None:
            docs = list(super().validation_docs())
            if self.cutting_context:
                docs = [doc for doc in docs if fda.keep_doc(doc)]
                texts = fda.window_texts(self.tokenizer, [doc["text"] for doc in docs],
                                         [[doc["key"], doc["value"]] for doc in docs], self.window)
                docs = [{**doc, "text": text} for doc, text in zip(docs, texts)]
            self._docs = datasets.Dataset.from_list(docs)
        return self._docs

    def doc_to_text(self, doc: dict[str, Any]) -> str:
        return fda.prompt(doc["text"], doc["key"])

    def doc_to_target(self, doc: dict[str, Any]) -> str:
        return doc["value"]
