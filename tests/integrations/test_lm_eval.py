"""The lm-evaluation-harness adapter (`seqmix.integrations.lm_eval`), offline: a local multiple-choice
task over a JSON-lines file, run by lm-eval's own evaluator on a tiny exported seqmix model, scores
each choice as `seqmix eval --choices` does (same log-likelihoods, same acc and acc_norm);
loglikelihood_rolling is the model's summed token log-likelihood; generate_until is seqmix's greedy
generation cut at its `until` string, batched rows of different lengths as when alone."""

import json
import os
from pathlib import Path

# lm-eval reads local files through `datasets`: no hub look-ups, and its cache beside the tests' own.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).parents[2] / ".cache" / "huggingface"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[lm_eval]'")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import seqmix  # noqa: E402
from seqmix.configuration import ConfigError, build  # noqa: E402
from seqmix.integrations.lm_eval import SeqmixLM  # noqa: E402
from seqmix.models.config import ModelConfig  # noqa: E402
from seqmix.models.hf import export_pretrained  # noqa: E402
from seqmix.models.lm import LanguageModel  # noqa: E402
from seqmix.train.agreement import greedy_continuations  # noqa: E402
from seqmix.train.data.tokenizer import ByteTokenizer  # noqa: E402
from seqmix.train.multiple_choice import choice_log_likelihoods, evaluate_choices, load_choice_tasks  # noqa: E402

TOKENIZER = ByteTokenizer()
forward = nnx.jit(lambda model, ids: model(ids))
EXAMPLES = [
    {"context": "The cat sat on the", "choices": [" mat.", " moon, far away.", " x"], "gold": 0},
    {"context": "To be or not", "choices": [" to be", "!"], "gold": 1},
    {"context": "Q: 2+2? A:", "choices": [" 4", " four", " 5"], "gold": 0},
    {"context": "Now is the winter of our", "choices": [" discontent", " summer", " York"], "gold": 0},
    {"context": "All the world's a", "choices": [" stage", " play"], "gold": 1},
    {"context": "A horse! a horse! my kingdom", "choices": [" for a horse", " of cats"], "gold": 0},
]
TASK = """task: seqmix_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny GLA + attention model written by `export_pretrained` (seqmix's format) and its task dir."""
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.3,
                                 "layer_pattern": ["gla", "attention"]}, "model")
    root = tmp_path_factory.mktemp("lm_eval")
    export_pretrained(LanguageModel(config, rngs=nnx.Rngs(0)), config, root / "model", form="seqmix")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES))
    (tasks / "seqmix_tiny_mc.yaml").write_text(TASK.replace("{data}", str(tasks / "data.jsonl")))
    return root / "model", tasks


def test_the_evaluator_scores_choices_as_seqmix_eval_does(exported):
    model_dir, tasks = exported
    out = lm_eval.simple_evaluate(model="seqmix", model_args=f"pretrained={model_dir},batch_size=4",
                                  tasks=["seqmix_tiny_mc"], bootstrap_iters=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    model = seqmix.from_pretrained(model_dir)
    samples = sorted(out["samples"]["seqmix_tiny_mc"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(EXAMPLES)
    for sample, example in zip(samples, EXAMPLES):
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        ours = choice_log_likelihoods(model, TOKENIZER, example["context"], tuple(example["choices"]))
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    ours = evaluate_choices(model, TOKENIZER, load_choice_tasks(tasks / "data.jsonl"))
    result = out["results"]["seqmix_tiny_mc"]
    assert result["acc,none"] == pytest.approx(ours["acc"])
    assert result["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert 0 < ours["acc"] < 1  # the golds are not all the model's picks, nor none of them


def test_loglikelihood_rolling_is_the_models_summed_token_log_likelihood(exported):
    model_dir, _ = exported
    adapter = SeqmixLM(pretrained=str(model_dir), batch_size=2)
    text = "Now is the winter of our discontent made glorious summer by this sun of York."
    texts = [text, text[:2], text[:1]]  # prefixes: one forward of the whole text gives every expected value
    got = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (piece,), i)
                                         for i, piece in enumerate(texts)])
    ids = TOKENIZER.encode(text)
    log_probs = np.asarray(jax.nn.log_softmax(forward(adapter.model, ids[None])[0], axis=-1), np.float64)
    token_log_likelihoods = [log_probs[t - 1, ids[t]] for t in range(1, len(ids))]  # no BOS: the first is unscored
    expected = [sum(token_log_likelihoods), token_log_likelihoods[0], 0.0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # With max_length, windows of at most that much context score each token exactly once.
    adapter.max_length = 16
    windows = adapter.rolling_windows(text)
    assert len(windows) > 2 and all(len(context) + len(continuation) <= 17 for context, continuation in windows)
    assert np.array_equal(np.concatenate([continuation for _, continuation in windows]), ids[1:])


def test_generate_until_is_greedy_generation_cut_at_until(exported):
    model_dir, _ = exported
    adapter = SeqmixLM(pretrained=str(model_dir), batch_size=4)
    contexts = ["To be, or not to be, that is", "Friends, Romans"]
    ours = [TOKENIZER.decode(row) for row in
            greedy_continuations(adapter.model, [TOKENIZER.encode(context) for context in contexts], 24)]
    stop = ours[0][5:7]
    until = {"until": [stop, "never occurs"], "max_gen_toks": 24}
    got = adapter.generate_until([Instance("generate_until", {}, (context, until), i)  # one batch of two lengths
                                  for i, context in enumerate(contexts)])
    assert got == [text[:text.index(stop)] if stop in text else text for text in ours]
    assert len(got[0]) <= 5


def test_a_run_directory_loads_as_seqmix_eval_loads_it(tmp_path):
    """pretrained=RUN_DIR: the run's latest checkpoint and tokenizer (a one-step run of the smoke
    config on a local text file)."""
    from seqmix.train.config import load_train_config
    from seqmix.train.sharding import make_mesh
    from seqmix.train.trainer import Trainer

    (tmp_path / "train.txt").write_text("Now is the winter of our discontent made glorious summer. " * 20)
    config = load_train_config(Path(__file__).parents[2] / "configs" / "runs" / "smoke.yaml", [
        f"out_dir={tmp_path / 'run'}", "mesh.data=1", "data.corpus=files", f"data.train_files=[{tmp_path / 'train.txt'}]",
        "steps=1", "optim.warmup_steps=0", "sample_tokens=0"])
    trainer = Trainer(config, mesh=make_mesh(config.mesh, devices=jax.devices()[:1]))
    trainer.run()
    (tmp_path / "train.txt").unlink()  # loading a run reads its config and checkpoint, not its training data
    adapter = SeqmixLM(pretrained=str(tmp_path / "run" / "checkpoints"))
    assert isinstance(adapter.tokenizer, ByteTokenizer)
    example = EXAMPLES[0]
    got = adapter.loglikelihood([Instance("loglikelihood", {}, (example["context"], choice), i)
                                 for i, choice in enumerate(example["choices"])])
    ours = choice_log_likelihoods(trainer.train_state.model(), TOKENIZER, example["context"], tuple(example["choices"]))
    np.testing.assert_allclose([value for value, _ in got], ours, rtol=1e-5, atol=1e-5)


def test_a_directory_that_holds_no_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a seqmix run directory"):
        SeqmixLM(pretrained=str(tmp_path))
