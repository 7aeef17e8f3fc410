"""Staged distillation (`distill:` and `stages:` of a run): `seqmix linearize ... --run
configs/runs/distill.yaml` runs attention transfer, hidden-state alignment and KL distillation (here
of LoRA adapters) as three runs of the stock trainer, each one's loss falls, each starts from the
weights the one before left, `train: converted` moves only the converted layers' mixers, the run samples at its end and a
`--resume` of the finished run trains nothing more; the step's distillation objective in blocks of
tokens equals the plain one, with its gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix import load_run
from seqmix.cli import main
from seqmix.configuration import build
from seqmix.models.config import ModelConfig
from seqmix.models.hf import save_pretrained
from seqmix.models.linearize import linearized_config
from seqmix.models.lm import LanguageModel, positions_from_segments
from seqmix.train.distillation import Teacher, distillation_sums, transfer_loss

STAGES = ("stages=[{name: attention, distill: {loss: attention_output, train: converted}}, "
          "{name: hidden, distill: {loss: hidden_states, train: converted}}, "
          "{name: kl, optim: {lr: 1.0e-2}, lora: {rank: 4, targets: [q_proj, k_proj, v_proj, o_proj]}, "
          "distill: {loss: kl}}]")


def train_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["kind"] == "train"]


def teacher_model():
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.1},
                   "model")
    return LanguageModel(config, rngs=nnx.Rngs(0)), config


def test_three_stages_each_lower_their_loss_and_hand_on_their_weights(tmp_path, capsys):
    teacher, config = teacher_model()
    save_pretrained(teacher, config, tmp_path / "teacher")
    run = tmp_path / "run"
    verse = tmp_path / "verse.txt"  # one text repeated: the loss falls within a few steps, not with the batches
    verse.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 100)
    command = ["linearize", str(tmp_path / "teacher"), "--method", "liger_gla", "--keep", "1", "--run",
               "configs/runs/distill.yaml", STAGES, "steps=12", f"out_dir={run}", "optim.lr=3e-3",
               "optim.warmup_steps=1", "log_every=1", "eval_every=12", "eval_batches=1", "checkpoint.every_steps=12",
               "data.corpus=files", f"data.train_files=[{verse}]", f"data.eval_files=[{verse}]", "data.seq_len=32",
               "data.batch_size=8", "sample_tokens=8"]
    assert main(command) == 0
    assert "--- sample ---\nROMEO:" in capsys.readouterr().out  # generated at the end, from the last stage
    directories = {"attention": run / "stages" / "attention", "hidden": run / "stages" / "hidden", "kl": run}
    for name, directory in directories.items():
        losses = train_losses(directory)
        # Batches differ (packing offsets), so the loss falls unevenly: the last four against the first four.
        assert len(losses) == 12 and np.mean(losses[-4:]) < 0.95 * np.mean(losses[:4]), (name, losses)
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        assert {record.get("objective") for record in records if record["kind"] == "train"} == {
            {"attention": "attention_output", "hidden": "hidden_states", "kl": "kl"}[name]}

    # train: converted moved layer 0's mixer alone; the next stage started where it ended.
    first = load_run(str(directories["attention"]))[0]
    changed = lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b))
    assert changed(first.layers[0].self_attn.q_proj.kernel[...], teacher.layers[0].self_attn.q_proj.kernel[...])
    for frozen, original in ((first.layers[1].self_attn.q_proj.kernel, teacher.layers[1].self_attn.q_proj.kernel),
                             (first.layers[0].mlp.up_proj.kernel, teacher.layers[0].mlp.up_proj.kernel),
                             (first.embed_tokens.embedding, teacher.embed_tokens.embedding)):
        np.testing.assert_array_equal(frozen[...], original[...])
    hidden = load_run(str(directories["hidden"]))[0]
    assert changed(hidden.layers[0].self_attn.q_proj.kernel[...], first.layers[0].self_attn.q_proj.kernel[...])
    final = load_run(str(run))[0]  # LoRA on the hidden stage's weights, frozen
    for name in ("q_proj", "o_proj"):
        np.testing.assert_array_equal(getattr(final.layers[0].self_attn, name).base.kernel[...],
                                      getattr(hidden.layers[0].self_attn, name).kernel[...])
        assert np.abs(getattr(final.layers[0].self_attn, name).adapter.lora_b[...]).max() > 0

    # Resumed when finished: every stage restores its last step and trains nothing more.
    assert main([*command, "--resume"]) == 0
    assert all(len(train_losses(directory)) == 12 for directory in directories.values())


def test_the_distillation_objective_in_blocks_equals_the_plain_one_with_its_gradients():
    teacher, config = teacher_model()
    student = LanguageModel(config, rngs=nnx.Rngs(1))  # another initialisation
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 17), dtype=np.int32)
    segments = np.ones((2, 17), np.int32)
    segments[1, 12:] = 0  # padding
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "segment_ids": jnp.asarray(segments[:, 1:]), "positions": jnp.tile(jnp.arange(16), (2, 1))}
    graphdef, teacher_state = nnx.split(teacher)
    settings = Teacher(graphdef, "kl", 0.5, ())
    graph, params = nnx.split(student, nnx.Param)

    def objective(params, chunk):
        total, count = distillation_sums(nnx.merge(graph, params), settings, teacher_state, batch,
                                         batch["segment_ids"] != 0, chunk)
        return total / count

    plain, plain_grads = jax.value_and_grad(objective)(params, 0)
    blocked, blocked_grads = jax.jit(jax.value_and_grad(objective), static_argnums=1)(params, 7)
    assert abs(float(blocked) - float(plain)) < 1e-5 * float(plain)
    for expected, actual in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(blocked_grads)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6 * (1 + np.abs(expected).max()))


def test_a_distilling_run_without_a_teacher_is_refused_before_it_starts(tmp_path, capsys):
    assert main(["train", "configs/runs/smoke.yaml", "distill.loss=kl", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "distill.teacher: needs a teacher: give distill.teacher or init_from" in capsys.readouterr().err
    assert main(["train", "configs/runs/smoke.yaml", f"out_dir={tmp_path / 'run'}",
                 "stages=[{name: first}, {name: second, data: {seq_len: 64}}]"]) == 2
    assert "stages[1].data: is the run's, the same in every stage" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stage_that_would_train_nothing_is_refused(tmp_path, capsys):
    """Liger's conversions add no parameter, so LoLCATs' transfer stage (train: new) has nothing to fit."""
    teacher, config = teacher_model()
    save_pretrained(teacher, config, tmp_path / "teacher")
    assert main(["linearize", str(tmp_path / "teacher"), "--method", "liger_gla", "--run", "configs/runs/lolcats.yaml",
                 f"out_dir={tmp_path / 'run'}", "data.seq_len=32"]) == 2
    assert "distill.train: 'new' selects no parameter of the model" in capsys.readouterr().err


def test_the_attention_output_loss_feeds_each_converted_layer_the_teachers_own_input():
    """LoLCATs with a window W >= T has no older tokens and is softmax attention exactly, so the
    loss is zero only if every layer gets the teacher's own input (layers 1 and 2 included)."""
    config = build(ModelConfig, {"vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2,
                                 "init_std": 0.3}, "model")
    teacher = LanguageModel(config, rngs=nnx.Rngs(0))
    segment_ids = jnp.array([[1] * 48, [1] * 30 + [2] * 18, [1] * 43 + [0] * 5])
    where = {"segment_ids": segment_ids, "positions": positions_from_segments(segment_ids)}
    pairs = teacher.mixer_inputs_and_outputs(jax.random.randint(jax.random.key(0), (3, 48), 0, 64), **where)

    def loss(window):
        converted = linearized_config(config, "lolcats")
        converted.mixers = {kind: {**options, "window": window} for kind, options in converted.mixers.items()}
        student = LanguageModel(converted, rngs=nnx.Rngs(1))
        nnx.update(student, nnx.state(teacher))
        return float(transfer_loss(student, pairs, [0, 1, 2], segment_ids != 0, **where))

    assert loss(48) < 1e-10 and loss(8) > 1e-3
