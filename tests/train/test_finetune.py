"""Fine-tuning a Hugging Face checkpoint as a user does: `seqmix train configs/runs/finetune.yaml
init_from=CHECKPOINT data.tokenizer=...` (the model comes from the checkpoint's config.json, LoRA
adapters on q/k/v/o, or on the projections a family has instead, train, the rest stays frozen),
on the hybrid families' transformers-made fixtures; the loss falls and the run samples at its end."""

import json
import string
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models

from cli_env import cli_env
from seqmix.cli import main
from seqmix.layers.lora import LoRALinear
from seqmix.models.hf import from_pretrained
from seqmix.models.lora import add_lora

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"
FINETUNE = "configs/runs/finetune.yaml"


def char_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A character tokenizer.json of `vocab_size` ids (the fixtures' vocabularies are tiny):
    printable characters, then <unk>."""
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))[:vocab_size - 1]
    tokenizer = Tokenizer(models.BPE(vocab={**{c: i for i, c in enumerate(chars)}, "<unk>": len(chars)}, merges=[],
                                     unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def finetune_overrides(tmp_path, name):
    """The run: 8 LoRA steps on a verse repeated (so that the loss must fall within them, not
    wander with the batches of a varied corpus), then a sample."""
    checkpoint = FIXTURES / name
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    verse = tmp_path / "verse.txt"
    verse.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 200)
    return [f"init_from={checkpoint}", f"data.tokenizer={char_tokenizer(tmp_path, vocab)}", f"out_dir={tmp_path / 'run'}",
            "data.corpus=files", f"data.train_files=[{verse}]", f"data.eval_files=[{verse}]",
            "data.seq_len=32", "data.batch_size=8", "steps=8", "optim.lr=1e-2", "optim.warmup_steps=1",
            "log_every=1", "eval_every=100", "eval_batches=1", "checkpoint.every_steps=8", "sample_tokens=6"]


def assert_the_loss_falls(run: Path) -> None:
    losses = train_losses(run)
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["kind"] == "train"]


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Each family's LoRA targets: the README's table. Qwen3.5 and OLMo-hybrid build their layers from the
# same parts as Qwen3-Next (gated DeltaNet, attention with q/k/v/o): their import and generation are
# the parity tests', and their targets Qwen3-Next's; a training run each would only compile the
# same kinds again (about 90 s each).
PROJECTIONS = {"qwen3_next": ATTENTION, "mamba2": ["in_proj", "out_proj"],
               "falcon_h1": ["in_proj", "out_proj", *ATTENTION],
               "lfm2": ["b_proj", "g_proj", *ATTENTION], "minimax": ["g_proj", *ATTENTION],
               "recurrent_gemma": ["linear_x", "linear_y", "linear_out", *ATTENTION]}


def test_mamba2_fine_tunes_with_pissa_adapters_on_its_projections(tmp_path):
    """In process, as `seqmix train`: LoRA on Mamba-2's in/out projections, started from each
    projection's principal part (PiSSA). Nemotron-H's targets (these and attention's) are
    Falcon-H1's, whose CLI run is below."""
    targets = f"lora.targets=[{', '.join(PROJECTIONS['mamba2'])}]"
    overrides = [*finetune_overrides(tmp_path, "mamba2"), "sample_tokens=0", targets, "lora.init=pissa"]
    assert main(["train", FINETUNE, *overrides]) == 0
    assert_the_loss_falls(tmp_path / "run")


@nnx.jit
def forward(model, tokens):
    """The logits, jitted: compiling the fixtures' models whole costs less than running them op by
    op, which compiles every operation of each shape on its own."""
    return model(tokens)


@pytest.mark.parametrize("name", ["qwen3_next", "lfm2", "minimax", "recurrent_gemma"])
def test_the_families_own_projections_take_lora_adapters_that_train(name):
    """The LoRA targets of the README's table exist in each family's model: every one is wrapped,
    the model computes what it did (B = 0), and the loss's gradient reaches every adapter. (A
    training run per family would compile the same trainer again: the Mamba-2, Falcon-H1 and Kimi
    Linear runs here cover it, Falcon-H1's end-of-run sample decoding through attention caches whose
    k_proj is LoRA-wrapped.)"""
    model = from_pretrained(FIXTURES / name)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.embed_tokens.embedding.shape[0], (2, 16)))
    before = forward(model, tokens)
    wrapped = add_lora(model, targets=PROJECTIONS[name], rank=4, alpha=8.0, rngs=nnx.Rngs(0))
    named = [path for path, module in nnx.iter_modules(model) if isinstance(module, LoRALinear)]
    assert wrapped == len(named) > 0 and {str(path[-1]) for path in named} == set(PROJECTIONS[name])
    np.testing.assert_array_equal(forward(model, tokens), before)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # B = 0 would stop A's gradient
        variable.set_value(0.01 * np.random.default_rng(len(path)).standard_normal(variable.shape, np.float32))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    loss = lambda adapters: jnp.mean(nnx.merge(graphdef, adapters, rest)(tokens)[:, :-1].max(-1))
    gradients = jax.jit(jax.grad(loss))(adapters)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(gradients))


def test_falcon_h1_fine_tunes_and_samples_through_the_cli(tmp_path):
    """As a process: `seqmix train` on Falcon-H1 (attention and Mamba-2 side by side in every
    layer, muP multipliers), whose end-of-run sample decodes through both caches."""
    env = cli_env()
    train = subprocess.run([sys.executable, "-m", "seqmix.cli", "train", FINETUNE,
                            *finetune_overrides(tmp_path, "falcon_h1"),
                            f"lora.targets=[{', '.join(PROJECTIONS['falcon_h1'])}]"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    assert_the_loss_falls(tmp_path / "run")
    assert "--- sample ---\nROMEO:" in train.stdout


def test_kimi_linear_fine_tunes_and_samples_through_the_cli(tmp_path):
    """As a process: `seqmix train` on Kimi Linear (KDA, MLA without positions, experts with
    sigmoid routing, expert groups and shared experts), its blocks rematerialised (`remat=true`,
    as a fine-tune of the full-size model would need), whose end-of-run sample decodes through
    the caches."""
    env = cli_env()
    train = subprocess.run([sys.executable, "-m", "seqmix.cli", "train", FINETUNE,
                            *finetune_overrides(tmp_path, "kimi_linear"), "remat=true"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    assert_the_loss_falls(tmp_path / "run")
    assert "--- sample ---\nROMEO:" in train.stdout


def test_a_run_from_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["train", FINETUNE, f"init_from={tmp_path}", f"out_dir={tmp_path / 'run'}"]) == 2
    assert f"init_from: {tmp_path} is not a Hugging Face checkpoint directory (no config.json)" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["train", FINETUNE, f"init_from={tmp_path}", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
