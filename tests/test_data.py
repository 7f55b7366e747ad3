"""The data pipeline (lmlab.data): local formats, mixing, sharding, packing, exact resume, epochs, errors.

Everything is built here: a small BPE tokenizer trained on generated text, and tiny datasets whose documents
carry their own id ("doc 17 ...") so that the packed output can be mapped back to the documents.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmlab.config import Training
from lmlab.data import (
    DataError,
    _DocStream,
    build_dataloader,
    data_epoch,
    load_sources,
    pack_documents,
    segment_boundaries,
)

WORDS = "the of and a to in is was for on that with as by at from his an were are which this be or".split()


def make_docs(n: int, prefix: str = "doc", seed: int = 0) -> list[str]:
    """n distinct documents of varied length (5..60 words), each starting with its id."""
    rng = random.Random(seed)
    return [f"{prefix} {i} " + " ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_docs(300) + make_docs(50, prefix="src"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def training(dataset: str | Path, **kw) -> Training:
    defaults = dict(batch_size=2, seq_len=64, context_len=64, num_workers=0, seed=1)
    return Training(dataset=str(dataset), **{**defaults, **kw})


def batches(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def complete_docs(batch_list, tok) -> list[str]:
    """Texts of the documents that lie whole (BOS ... EOS) inside one batch."""
    out = []
    for b in batch_list:
        flat = b["input_ids"].flatten().tolist()
        start = None
        for i, t in enumerate(flat):
            if t == tok.bos_token_id:
                start = i
            elif t == tok.eos_token_id and start is not None:
                out.append(tok.decode(flat[start + 1 : i]))
                start = None
    return out


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------
def _write_format(fmt: str, root: Path, docs: list[str]) -> Path:
    if fmt == "jsonl":
        return write_jsonl(root / "d.jsonl", docs)
    if fmt == "json":
        (root / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
        return root / "d.json"
    if fmt == "parquet-folder":
        folder = root / "pq"
        folder.mkdir()
        half = len(docs) // 2
        datasets.Dataset.from_dict({"text": docs[:half]}).to_parquet(folder / "a.parquet")
        datasets.Dataset.from_dict({"text": docs[half:]}).to_parquet(folder / "b.parquet")
        return folder
    if fmt == "txt-folder":  # documents separated by blank lines
        folder = root / "txt"
        folder.mkdir()
        (folder / "a.txt").write_text("\n\n".join(docs[:10]) + "\n")
        (folder / "b.txt").write_text("\n\n".join(docs[10:]) + "\n")
        return folder
    if fmt == "save_to_disk":
        datasets.Dataset.from_dict({"content": docs, "n": list(range(len(docs)))}).save_to_disk(root / "saved")
        return root / "saved"
    if fmt == "arrow":
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(root / "saved")
        arrow = next((root / "saved").glob("*.arrow"))
        return arrow.rename(root / "d.arrow")
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt,streaming", [
    ("jsonl", False), ("json", False), ("parquet-folder", False), ("txt-folder", False), ("save_to_disk", False),
    ("arrow", False), ("jsonl", True), ("parquet-folder", True), ("txt-folder", True), ("save_to_disk", True),
])
def test_local_formats(fmt, streaming, tmp_path, tokenizer):
    docs = make_docs(30)
    path = _write_format(fmt, tmp_path, docs)
    loader = build_dataloader(training(path, streaming=streaming), tokenizer, rank=0, world_size=1)
    got = complete_docs(batches(loader, 6), tokenizer)
    assert len(got) >= 5
    assert {t.strip() for t in got} <= set(docs)  # a txt file's last paragraph keeps its final newline


def test_empty_documents_are_skipped(tmp_path, tokenizer):
    docs = make_docs(10)
    path = write_jsonl(tmp_path / "d.jsonl", [d if i % 2 else " \n" for i, d in enumerate(docs)] + [""])
    loader = build_dataloader(training(path, seq_len=32), tokenizer, rank=0, world_size=1)
    flat = torch.cat([b["input_ids"].flatten() for b in batches(loader, 20)]).tolist()
    # No BOS directly followed by EOS: an empty document would show as that pair.
    assert not any(a == tokenizer.bos_token_id and b == tokenizer.eos_token_id for a, b in zip(flat, flat[1:]))
    assert set(complete_docs(batches(loader, 20), tokenizer)) <= set(docs[1::2])


def test_text_column_option(tmp_path, tokenizer):
    docs = make_docs(20)
    path = write_jsonl(tmp_path / "d.jsonl", docs, column="body")
    loader = build_dataloader(training(path, text_column="body"), tokenizer, rank=0, world_size=1)
    assert set(complete_docs(batches(loader, 4), tokenizer)) <= set(docs)


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------
def test_pack_documents_places_bos_and_eos():
    tokens, starts = pack_documents([[5, 6], [7], [8, 9, 10]], bos=1, eos=2)
    assert tokens.tolist() == [1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 2]
    assert starts.tolist() == [0, 4, 7]
    tokens, starts = pack_documents([[5, 6], [7]], bos=None, eos=2)
    assert tokens.tolist() == [5, 6, 2, 7, 2] and starts.tolist() == [0, 3]


def test_packed_stream_is_the_documents_in_order(tmp_path, tokenizer):
    """With one reader, the concatenated batches are exactly BOS + doc + EOS for the documents read."""
    docs = make_docs(50)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    loader = build_dataloader(training(path), tokenizer, rank=0, world_size=1)
    flat = torch.cat([b["input_ids"].flatten() for b in batches(loader, 10)]).tolist()
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in batches(loader, 2))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # Rebuild the expected stream from the document order the stream reports.
    pieces = []
    i = 0
    while i < len(flat) and flat[i] == bos and eos in flat[i:]:
        j = flat.index(eos, i)
        text = tokenizer.decode(flat[i + 1 : j])
        assert text in docs
        pieces += [bos] + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        i = j + 1
    assert i > 300  # many whole documents checked
    assert flat[: len(pieces)] == pieces


def test_segment_boundaries_unit():
    # Rows of 8, two rows; documents start at -3 (continued), 4 and 6; context_len 4.
    cu = segment_boundaries(np.array([-3, 4, 6]), n=16, row_len=8, context_len=4)
    # doc -3: cut at 1 (= -3 + 4); doc 4: none (length 2); doc 6 (to 16): cuts at 10, 14; rows at 0, 8, 16.
    assert cu.tolist() == [0, 1, 4, 6, 8, 10, 14, 16]
    assert cu.dtype == np.int32


@pytest.mark.parametrize("context_len", [64, 24])
def test_varlen_cu_seqlens_match_documents(tmp_path, tokenizer, context_len):
    docs = make_docs(60)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = training(path, varlen=True, batch_size=3, seq_len=64, context_len=context_len)
    got = batches(build_dataloader(cfg, tokenizer, rank=0, world_size=1), 8)
    stream = torch.cat([b["input_ids"].flatten() for b in got]).numpy()
    bos = tokenizer.bos_token_id
    n = cfg.batch_size * cfg.seq_len
    doc_starts = np.flatnonzero(stream == bos)
    assert doc_starts[0] == 0
    # Expected cuts over the whole stream: document starts, every context_len inside a document, row starts.
    cuts = set(range(0, len(stream) + 1, cfg.seq_len))
    for s, e in zip(doc_starts, list(doc_starts[1:]) + [len(stream)]):
        cuts |= set(range(int(s), int(e), context_len))
    for k, b in enumerate(got):
        cu = b["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == n
        expected = sorted(c - k * n for c in cuts if k * n <= c <= (k + 1) * n)
        assert cu.tolist() == expected
        assert (cu.diff() <= context_len).all()


# ---------------------------------------------------------------------------------------------------------
# Sharding and mixing
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
def test_readers_are_disjoint_and_cover_the_data(tmp_path, streaming):
    docs = make_docs(103)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):  # 4 files: with streaming, each of the 4 readers gets whole files
        write_jsonl(folder / f"{i}.jsonl", docs[i::4])
    sources = load_sources(training(folder, streaming=streaming))
    seen = []
    for reader in range(4):  # one epoch of each reader (a streaming reader's share changes per epoch)
        stream = _DocStream(sources, [1.0], reader, 4, seed=1)
        texts = []
        while stream.readers[0].epoch == 0:
            texts += stream.read(1)
        # A map-style reader rolls over after its last document, a streaming one when it reads past it.
        seen.append(set(texts[:-1] if streaming else texts))
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    assert sorted(set.union(*seen)) == sorted(docs)


def test_ranks_and_workers_read_disjoint_documents(tmp_path, tokenizer):
    """End to end: 2 ranks x 2 workers, batches in round-robin worker order, no document seen twice."""
    docs = make_docs(400)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    per_reader = []
    for rank in range(2):
        cfg = training(path, num_workers=2, batch_size=4)
        got = batches(build_dataloader(cfg, tokenizer, rank=rank, world_size=2), 6)
        per_reader += [complete_docs(got[w::2], tokenizer) for w in range(2)]
    assert all(len(r) >= 10 for r in per_reader)
    for a, b in itertools.combinations(per_reader, 2):
        assert not set(a) & set(b)
    assert sum(map(len, per_reader)) == len(set(itertools.chain(*per_reader)))


def test_mixing_follows_probabilities(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(200, prefix="doc"))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(200, prefix="src"))
    cfg = training(f"{a},{b}", data_probs="0.8,0.2")
    stream = _DocStream(load_sources(cfg), [0.8, 0.2], reader=0, readers=1, seed=1)
    texts = stream.read(3000)
    share = sum(t.startswith("doc") for t in texts) / len(texts)
    assert abs(share - 0.8) < 0.03
    # End to end, seeded: two loaders give the same batches.
    first = [b["input_ids"] for b in batches(build_dataloader(cfg, tokenizer, rank=0, world_size=1), 3)]
    again = [b["input_ids"] for b in batches(build_dataloader(cfg, tokenizer, rank=0, world_size=1), 3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


# ---------------------------------------------------------------------------------------------------------
# Resume and epochs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers,streaming,varlen", [(0, False, True), (2, False, False), (2, True, True)])
def test_exact_resume(tmp_path, tokenizer, workers, streaming, varlen):
    folder = tmp_path / "data"
    folder.mkdir()
    docs = make_docs(120)
    for i in range(2):
        write_jsonl(folder / f"{i}.jsonl", docs[i::2])
    mix = f"{folder},{write_jsonl(tmp_path / 'b.jsonl', make_docs(30, prefix='src'))}"
    cfg = training(mix, data_probs="0.7,0.3", num_workers=workers, streaming=streaming, varlen=varlen)
    # 25 batches of 128 tokens run past the end of the small source: the resume crosses an epoch.
    reference = batches(build_dataloader(cfg, tokenizer, rank=0, world_size=1), 25)
    loader = build_dataloader(cfg, tokenizer, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    del it
    resumed = build_dataloader(cfg, tokenizer, rank=0, world_size=1)
    resumed.load_state_dict(state)
    for want, got in zip(reference[7:], batches(resumed, 18), strict=True):
        assert set(want) == set(got)
        for key in want:
            assert torch.equal(want[key], got[key]), key


def test_epoch_rollover_reshuffles(tmp_path, tokenizer, caplog):
    docs = make_docs(12)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    sources = load_sources(training(path))
    stream = _DocStream(sources, [1.0], reader=0, readers=1, seed=1)
    with caplog.at_level(logging.INFO, logger="lmlab.data"):
        first, second = stream.read(100), stream.read(100)  # a read stops at the end of an epoch
    assert sorted(first) == sorted(second) == sorted(docs)
    assert first != second
    assert "starts epoch 2" in caplog.text
    for workers in (0, 2):
        loader = build_dataloader(training(path, num_workers=workers), tokenizer, rank=0, world_size=1)
        it = iter(loader)
        next(it)
        assert data_epoch(loader) == 0
        for _ in range(30):  # 30 x 128 tokens: several passes over 12 documents
            next(it)
        assert data_epoch(loader) >= 2


# ---------------------------------------------------------------------------------------------------------
# Errors: one line each
# ---------------------------------------------------------------------------------------------------------
def _error(cfg: Training, tokenizer) -> str:
    with pytest.raises(DataError) as info:
        build_dataloader(cfg, tokenizer, rank=0, world_size=1)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_path(tmp_path, tokenizer):
    assert "no such file" in _error(training(tmp_path / "nope.jsonl"), tokenizer)
    assert "no data files" in _error(training(tmp_path), tokenizer)


def test_error_empty_data(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text("")
    assert "empty" in _error(training(tmp_path / "e.jsonl"), tokenizer)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  ", "\n"])
    assert "no non-empty documents" in _error(training(blank), tokenizer)
    (tmp_path / "blank.txt").write_text("\n\n \n\n")  # whitespace only: no documents at all
    assert "the data is empty (zero-byte or blank files)" in _error(training(tmp_path / "blank.txt"), tokenizer)


def test_error_no_text_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(3), column="body")
    message = _error(training(path), tokenizer)
    assert "body" in message and "id" in message and "--training.text_column" in message
    assert "'nope'" in _error(training(path, text_column="nope"), tokenizer)


def test_error_binary_file_and_undecodable_bytes(tmp_path, tokenizer, caplog):
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    assert "binary" in _error(training(tmp_path / "bin.txt"), tokenizer)
    docs = make_docs(20)
    raw = "\n\n".join(docs).encode()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw[:100] + b"\xff\xfe" + raw[100:])
    with caplog.at_level(logging.WARNING, logger="lmlab.data"):
        got = batches(build_dataloader(training(bad), tokenizer, rank=0, world_size=1), 15)
    assert len(got) == 15
    assert caplog.text.count("undecodable bytes") >= 1


def test_error_too_few_documents_for_the_readers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(3))
    with pytest.raises(DataError, match="3 documents cannot feed 4 readers"):
        build_dataloader(training(path, num_workers=2), tokenizer, rank=0, world_size=2)
    # A share of blank documents only: found while reading.
    sparse = write_jsonl(tmp_path / "sparse.jsonl", [make_docs(1)[0], "", " ", ""])
    with pytest.raises(DataError, match="only empty documents"):
        batches(build_dataloader(training(sparse), tokenizer, rank=1, world_size=2), 1)
    # A streaming share that turns out empty fails inside a worker; the user still gets one line.
    one = write_jsonl(tmp_path / "one.jsonl", make_docs(1))
    loader = build_dataloader(training(one, num_workers=2, streaming=True), tokenizer, rank=1, world_size=2)
    with pytest.raises(DataError) as info:
        batches(loader, 1)
    assert "got no documents" in str(info.value) and "\n" not in str(info.value)


def test_error_offline_hub_id(tokenizer):
    # conftest sets HF_HUB_OFFLINE=1 before datasets is imported.
    message = _error(training("nobody-xyz/not-a-dataset-42"), tokenizer)
    assert "offline" in message and "local file or folder" in message


@pytest.mark.parametrize("workers", [0, 2])
def test_error_resume_with_other_layout(tmp_path, tokenizer, workers):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs(40))
    loader = build_dataloader(training(path, num_workers=workers), tokenizer, rank=0, world_size=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    for other in (training(path, num_workers=1), training(path, num_workers=workers)):
        with pytest.raises(DataError, match="ranks x"):
            build_dataloader(other, tokenizer, rank=0, world_size=1 if other.num_workers != workers else 2
                             ).load_state_dict(state)


@pytest.mark.slow
def test_loader_benchmark_runs(capsys):
    import sys

    from lmlab.bench_data import main

    assert main(["--workers", "0,1", "--seconds", "0.5", "--vocab-size", "1000", "--corpus-mb", "1"]) == 0
    assert "tokens per CPU-s" in capsys.readouterr().out
