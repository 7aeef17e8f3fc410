"""`seqmix linearize`: a Hugging Face checkpoint becomes a Liger or LoLCATs model (the layers that
stay attention chosen by layer selection, or named) whose LoRA adapters train while every weight
it read from the checkpoint stays frozen (LoLCATs first runs attention transfer); the run samples at its end, restores like any other, generates, and exports
(LoRA merged, in seqmix's format) to a directory `seqmix.from_pretrained` loads with its logits."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
from cli_env import cli_env
from flax import nnx

from seqmix import load_run
from seqmix.cli import main
from seqmix.configuration import build
from seqmix.layers.lora import LoRALinear
from seqmix.mixers.liger_attention import LigerAttention
from seqmix.mixers.lolcats import LolcatsAttention
from seqmix.models.config import ModelConfig
from seqmix.models.hf import from_pretrained, save_pretrained
from seqmix.models.lm import LanguageModel


def test_linearize_trains_the_adapters_of_the_converted_model_only(tmp_path, capsys):
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.1},
                   "model")
    teacher = LanguageModel(config, rngs=nnx.Rngs(0))
    quiet = teacher.layers[0].self_attn.o_proj.kernel  # layer 0 barely attends: layer selection keeps layer 1
    quiet.set_value(quiet[...] * 1e-3)
    save_pretrained(teacher, config, tmp_path / "teacher")
    run = tmp_path / "run"
    assert main(["linearize", str(tmp_path / "teacher"), "steps=4", f"out_dir={run}", "eval_every=4",
                 "eval_batches=1", "sample_tokens=8", "data.seq_len=32", "data.batch_size=8", "optim.warmup_steps=1",
                 "checkpoint.every_steps=4", "--method", "liger_attention", "--select-layers", "1",
                 "--calibration-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "linearized (liger_attention) and trained 4 steps" in out and "--- sample ---" in out
    assert "over 1 batches: 0: " in out and "; kept as attention: 1\n" in out  # the scores, then the choice

    student = load_run(str(run))[0]
    converted, kept = student.layers[0].self_attn, student.layers[1].self_attn
    assert isinstance(converted, LigerAttention) and not isinstance(kept, LigerAttention)
    for layer, source in ((converted, teacher.layers[0].self_attn), (kept, teacher.layers[1].self_attn)):
        assert isinstance(layer.q_proj, LoRALinear)
        np.testing.assert_array_equal(layer.q_proj.base.kernel[...], source.q_proj.kernel[...])
        np.testing.assert_array_equal(layer.o_proj.kernel[...], source.o_proj.kernel[...])
        assert np.abs(layer.q_proj.adapter.lora_b[...]).max() > 0  # trained from zero
    np.testing.assert_array_equal(student.embed_tokens.embedding[...], teacher.embed_tokens.embedding[...])
    generates_and_exports(run, student, tmp_path, capsys)

    # Judged by generation: against its teacher (the run's init_from), and at retrieving a pass key.
    assert main(["eval", str(run), "--agreement", "--prompts", "4"]) == 0
    assert re.fullmatch(rf"agreement with {tmp_path / 'teacher'} over 4 held-out prompts of 64 tokens: the first 32 "
                        r"generated tokens identical in \d+\.\d% of them; common prefix \d+\.\d tokens on average\n",
                        capsys.readouterr().out)
    # And by how closely it predicts as its teacher does, as a user runs it: KL from the teacher, and 0 from itself.
    kl = subprocess.run([sys.executable, "-m", "seqmix.cli", "eval", str(run), "--kl"], env=cli_env(),
                        capture_output=True, text=True, timeout=300)
    assert kl.returncode == 0, kl.stderr[-3000:]
    from_teacher = re.fullmatch(rf"KL\({tmp_path / 'teacher'} \|\| the run's model\) over (\d+) held-out tokens: "
                                r"(\S+) nats/token\n", kl.stdout)
    assert from_teacher and int(from_teacher[1]) > 0 and float(from_teacher[2]) > 0, kl.stdout
    assert main(["eval", str(run), "--kl", str(run)]) == 0
    assert capsys.readouterr().out.endswith(" held-out tokens: 0 nats/token\n")
    assert main(["eval", str(run), "--needle", "100", "--trials", "3"]) == 0
    assert re.fullmatch(r"needle \(pass key\) retrieval, 3 trials per length: 100 tokens \d+\.\d%\n",
                        capsys.readouterr().out)

    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "no Hugging Face format seqmix exports" in capsys.readouterr().err
    assert main(["export", str(run), str(run)]) == 2  # over the run itself
    assert "exists and is not a model directory" in capsys.readouterr().err

    assert main(["linearize", str(tmp_path), "--method", "liger_gla"]) == 2
    assert "not a Hugging Face checkpoint directory" in capsys.readouterr().err
    assert main(["linearize", str(tmp_path / "teacher"), "--method", "liger_gla", "--select-layers", "1",
                 "--keep", "0"]) == 2
    assert "do not also give --keep" in capsys.readouterr().err


def test_lolcats_runs_attention_transfer_then_lora_on_q_k_v_o(tmp_path, capsys):
    config = build(ModelConfig, {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "init_std": 0.1},
                   "model")
    teacher = LanguageModel(config, rngs=nnx.Rngs(0))
    save_pretrained(teacher, config, tmp_path / "teacher")
    run = tmp_path / "run"  # rows of 80 tokens: older ones than the 64-token window exist
    assert main(["linearize", str(tmp_path / "teacher"), "steps=2", f"out_dir={run}", "eval_every=2",
                 "eval_batches=1", "sample_tokens=8", "data.seq_len=80", "data.batch_size=8", "optim.warmup_steps=1",
                 "checkpoint.every_steps=2", "log_every=1", "stages.transfer.steps=3", "--method", "lolcats"]) == 0
    out = capsys.readouterr().out
    assert "linearized (lolcats) and trained 2 steps" in out and "--- sample ---" in out
    records = [json.loads(line) for line in (run / "stages" / "transfer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["objective"] for r in records if r["kind"] == "train"] == ["attention_output"] * 3

    transferred = load_run(str(run / "stages" / "transfer"))[0]
    student = load_run(str(run))[0]
    for layer, source, after_transfer in zip(student.layers, teacher.layers, transferred.layers):
        mixer = layer.self_attn
        assert isinstance(mixer, LolcatsAttention)
        # Stage 1 moved the feature maps alone; stage 2 started from them and froze them.
        assert not np.array_equal(mixer.q_map.weight[...], np.broadcast_to(np.eye(16), (2, 16, 16)))
        np.testing.assert_array_equal(mixer.q_map.weight[...], after_transfer.self_attn.q_map.weight[...])
        np.testing.assert_array_equal(after_transfer.self_attn.q_proj.kernel[...], source.self_attn.q_proj.kernel[...])
        np.testing.assert_array_equal(mixer.o_proj.base.kernel[...], source.self_attn.o_proj.kernel[...])
        assert np.abs(mixer.o_proj.adapter.lora_b[...]).max() > 0
        assert mixer.o_proj.scale == 2.0  # alpha 16 / rank 8
    generates_and_exports(run, student, tmp_path, capsys)


def generates_and_exports(run, student, tmp_path, capsys):
    """`seqmix generate` continues a prompt from the run; `seqmix export` writes the student, LoRA
    merged, in seqmix's format, and it reloads with the run's logits."""
    assert main(["generate", str(run), "--prompt", "To be", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    exported = tmp_path / "exported"
    assert main(["export", str(run), str(exported)]) == 0
    assert "seqmix (no Hugging Face model_type holds this model" in capsys.readouterr().out
    tokens = jax.random.randint(jax.random.key(0), (2, 70), 0, 256)
    logits = student(tokens)
    assert float(np.abs(from_pretrained(exported)(tokens) - logits).max() / np.abs(logits).max()) < 1e-5
