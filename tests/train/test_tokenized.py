"""Pre-tokenized corpora: `seqmix data tokenize` writes sharded ArrayRecord files and a manifest;
the pipeline reads them into the same batches as their text, resumes exactly, and mixes several
by weight; runs train from them through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import yaml
from cli_env import cli_env
from test_data import assert_batches_equal, take

from seqmix.cli import main
from seqmix.configuration import ConfigError, build
from seqmix.train.config import DataConfig, SourceConfig
from seqmix.train.data import ByteTokenizer, DataError, Mixture, TokenizedDocuments, make_dataset, tokenize_corpus
from seqmix.train.data import unigram_entropy
from seqmix.train.inputs import load_corpus, train_iterator

BYTES = ByteTokenizer()


def random_documents(seed: int, n: int, min_len: int, max_len: int, letters: bytes = b"abcdefghijklmnopqrstuvwxyz"):
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(letters, np.uint8)
    return [rng.choice(alphabet, rng.integers(min_len, max_len + 1)).tobytes().decode() for _ in range(n)]


def write_jsonl(path: Path, documents: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    return path



def test_tokenized_corpus_gives_the_batches_of_its_text(tmp_path):
    documents = random_documents(0, 60, 1, 90)
    write_jsonl(tmp_path / "a.jsonl", documents[:25])
    (tmp_path / "b.txt").write_text(documents[25])  # a whole file is one document
    write_jsonl(tmp_path / "c.jsonl", documents[26:])
    files = [str(tmp_path / name) for name in ("a.jsonl", "b.txt", "c.jsonl")]
    manifest = tokenize_corpus(files, "byte", tmp_path / "corpus", shard_tokens=500)
    tokens = sum(len(doc) for doc in documents)
    assert (manifest["documents"], manifest["tokens"], manifest["dtype"]) == (60, tokens, "uint16")
    assert len(manifest["shards"]) > 2 and sum(s["tokens"] for s in manifest["shards"]) == tokens
    assert sum(s["documents"] for s in manifest["shards"]) == 60
    tokenized = TokenizedDocuments([str(tmp_path / "corpus")], "byte")
    assert len(tokenized) == 60 and tokenized[25].tolist() == list(documents[25].encode())
    assert unigram_entropy(tokenized, BYTES) == pytest.approx(unigram_entropy(documents, BYTES))
    for settings in (dict(seed=3), dict(seed=3, pack=False, process_index=1, process_count=2)):
        text = make_dataset(documents, BYTES, seq_len=32, batch_size=4, **settings)
        pre = make_dataset(tokenized, BYTES, seq_len=32, batch_size=4, **settings)
        assert_batches_equal(take(iter(text), 12), take(iter(pre), 12))  # more than an epoch (~9 batches)
    held_out = make_dataset(tokenized, BYTES, seq_len=32, batch_size=4, seed=0, shuffle=False, repeat=False)
    assert_batches_equal(list(held_out), list(make_dataset(documents, BYTES, seq_len=32, batch_size=4, seed=0,
                                                           shuffle=False, repeat=False)))


def test_a_mixture_draws_by_weight_and_resumes_exactly(tmp_path):
    """Two corpora, one of 'a's and one of 'b's of unequal sizes, mixed 3:1 (as `data.sources`):
    3/4 of the trained tokens are 'a's; an iterator restored mid-epoch continues identically."""
    paths = []
    for letter, n in ((b"a", 40), (b"b", 200)):
        source = write_jsonl(tmp_path / f"{letter.decode()}.jsonl", random_documents(1, n, 20, 120, letter))
        tokenize_corpus([str(source)], "byte", tmp_path / letter.decode())
        paths.append(str(tmp_path / letter.decode()))
    config = DataConfig(corpus="tokenized", seq_len=32, batch_size=8,
                        sources=[SourceConfig(paths[0], 3.0), SourceConfig(paths[1], 1.0)])
    corpus = load_corpus(config)
    assert isinstance(corpus.train_documents, Mixture)
    assert unigram_entropy(corpus.train_documents, BYTES) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    for mapping, message in (({"sources": [{"path": paths[0]}]}, r"data.sources: mixes pre-tokenized directories"),
                             ({"corpus": "tokenized"}, r"data.train_files: must list at least one pre-tokenized"),
                             ({"corpus": "tokenized", "sources": [{"path": paths[0], "weight": 0}]},
                              r"data.sources\[0\].weight: must be a positive number")):
        with pytest.raises(ConfigError, match=message):
            build(DataConfig, mapping, "data")
    batches = take(train_iterator(config, corpus, seed=5), 40)
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    share = np.mean(targets == ord("a"))
    assert set(np.unique(targets)) == {ord("a"), ord("b")}
    # Proportions are of pieces; full pieces (32 tokens) dominate: a binomial over ~300 pieces.
    assert abs(share - 0.75) < 3 * np.sqrt(0.75 * 0.25 / (len(targets) / 32)), share

    iterator = train_iterator(config, corpus, seed=5)
    take(iterator, 7)  # mid-epoch of the 'a' corpus (~150 pieces of 'a' in all)
    state = iterator.get_state()
    expected = take(iterator, 5)
    restored = train_iterator(config, load_corpus(config), seed=5)
    restored.set_state(state)
    assert_batches_equal(expected, take(restored, 5))


def test_another_tokenizer_is_refused_naming_both(tmp_path):
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "docs.jsonl", ["a b a", "b b"])
    manifest = tokenize_corpus([str(tmp_path / "docs.jsonl")], str(tmp_path / "tokenizer.json"), tmp_path / "corpus")
    assert (manifest["tokens"], manifest["tokenizer"]["vocab_size"]) == (5, 3)
    assert TokenizedDocuments([str(tmp_path / "corpus")], str(tmp_path / "tokenizer.json"))[0].tolist() == [1, 2, 1]
    with pytest.raises(DataError, match=r"corpus: tokenized with '.*tokenizer.json' \(sha256 \w+\), but the run's "
                                        r"tokenizer is 'byte' \(sha256 \w+\)"):
        load_corpus(DataConfig(corpus="tokenized", train_files=[str(tmp_path / "corpus")]))
    with pytest.raises(DataError, match="not a pre-tokenized corpus"):
        TokenizedDocuments([str(tmp_path)], "byte")


def seqmix(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "seqmix.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300, cwd=cwd)


def test_tokenize_command_and_a_run_on_its_corpus(tmp_path, capsys):
    documents = random_documents(2, 300, 50, 400)
    write_jsonl(tmp_path / "train.jsonl", documents[:280])
    write_jsonl(tmp_path / "valid.jsonl", documents[280:])
    corpus, held_out = tmp_path / "corpus", tmp_path / "held_out"
    done = seqmix("data", "tokenize", str(tmp_path / "train.jsonl"), "--tokenizer", "byte", "--out", str(corpus),
                  "--shard-tokens", "20000", "--workers", "2")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((corpus / "manifest.json").read_text())
    tokens = sum(len(doc) for doc in documents[:280])
    assert (manifest["documents"], manifest["tokens"]) == (280, tokens)
    assert [s["tokens"] >= 20000 for s in manifest["shards"]] == [True] * (len(manifest["shards"]) - 1) + [False]
    assert f"tokenized 280 documents, {tokens:,} tokens" in done.stdout
    # Two worker processes write what this one does.
    tokenize_corpus([str(tmp_path / "train.jsonl")], "byte", tmp_path / "serial", shard_tokens=20000)
    assert json.loads((tmp_path / "serial" / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert all((corpus / s["file"]).read_bytes() == (tmp_path / "serial" / s["file"]).read_bytes()
               for s in manifest["shards"])
    tokenize_corpus([str(tmp_path / "valid.jsonl")], "byte", held_out)

    for args, message in (([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "new")],
                           "missing.txt: matches no file"),
                          ([str(tmp_path / "train.jsonl"), "--out", str(corpus)],
                           "exists and is not an empty directory")):
        assert main(["data", "tokenize", *args, "--tokenizer", "byte"]) == 2  # in this process: a start saved
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and stderr.startswith("seqmix: error: ") and message in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "held_out", "serial", "train.jsonl", "valid.jsonl"]

    run = seqmix("train", "configs/runs/smoke.yaml", f"out_dir={tmp_path / 'run'}", "data.corpus=tokenized",
                 f"data.train_files=[{corpus}]", f"data.eval_files=[{held_out}]", "steps=2", "eval_every=2",
                 "eval_batches=1", "sample_tokens=0", "optim.warmup_steps=1", cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    assert "held-out loss" in run.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["corpus"] == "tokenized" and saved["train_files"] == [str(corpus)]
