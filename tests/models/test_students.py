"""Students (`seqmix linearize --student <mixer>`): every recurrent mixer of
`seqmix.mixers.students.RECIPES`, converted from a grouped-query teacher with q/k/v biases, starts
as the linear attention over the teacher's own q/k/v/o that the reference below computes (exactly,
or for the delta rules within a bound that shrinks with beta); decodes as its forward; exports in
seqmix's format and reloads with its logits; and `seqmix linearize --student` trains and
generates from the command line."""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import logits_of

import seqmix
from seqmix.cli import build_parser
from seqmix.configuration import ConfigError, build
from seqmix.layers.rotary import apply_rotary
from seqmix.layers.transfer import TransferParam
from seqmix.mixers.students import INITIAL_BETA, INITIAL_DECAY_RATE, RECIPES, Student
from seqmix.models.config import ModelConfig
from seqmix.models.hf import CHECKPOINT_PARAMS, export_pretrained, save_pretrained
from seqmix.models.linearize import STUDENTS, linearize, linearized_config, read_initial_weights
from seqmix.models.lm import LanguageModel
from seqmix.train.layer_selection import linearization_kl

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # the CLI tests' environment lives there
from cli_env import cli_env  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, NORM_EPS = 4, 2, 8, 1e-6
TEACHER = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
           "init_std": 0.1, "norm_eps": NORM_EPS, "mixers": {"attention": {"type": "attention", "qkv_bias": True}}}
DELTA = [name for name, recipe in RECIPES.items() if recipe.inexact]  # removal terms: exact only as beta -> 0


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@functools.cache
def teacher():
    config = build(ModelConfig, TEACHER, "model")
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    biases = nnx.state(model, lambda path, _: path[-1] == "bias")  # zeros at init: make them count
    nnx.update(model, jax.tree.map(lambda b: 0.3 * jax.random.normal(jax.random.key(3), b.shape), biases))
    return model, config


# Jitted, as `logits_of`: a model compiled whole costs less than one run op by op.
extend = nnx.jit(lambda model, tokens, cache: model.extend(tokens, cache))
mix = nnx.jit(lambda layer, x: layer(x)[0])


@functools.cache
def converted(name):
    """(student, config): layer 0 the student, layer 1 kept as attention."""
    model, config = teacher()
    return linearize(model, config, name, keep=[1])


def silu(x):
    return x / (1 + np.exp(-x))


def l2(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def rms(o, eps):
    return o / np.sqrt(np.mean(o * o, -1, keepdims=True) + eps)


def reference(name, attention, x, beta=INITIAL_BETA):
    """Linear attention of the teacher layer `attention` over x [B, T, D], float64, in the
    student's feature maps, decays, scale and output norm (the student's neutral start):
    o_t = scale sum_{s<=t} (q_t . exp(G_t - G_s) k_s) c v_s, y = norm(o) W_o, where c is the delta
    rules' beta (seen by the norm's eps only), else 1."""
    weight = lambda proj: (np.asarray(proj.kernel[...], np.float64), np.asarray(proj.bias[...], np.float64))
    (wq, bq), (wk, bk), (wv, bv) = (weight(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    x64 = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    heads = lambda a: a.reshape(batch, length, -1, HEAD_DIM)
    group = lambda a: np.repeat(a, HEADS // KV_HEADS, axis=2)  # query head h reads kv head h // group
    q, k, v = heads(x64 @ wq + bq), group(heads(x64 @ wk + bk)), group(heads(x64 @ wv + bv))
    log_decay = np.full(q.shape, -INITIAL_DECAY_RATE)  # per head and key
    scale, write, norm = HEAD_DIM ** -0.5, 1.0, "rms"
    if name in ("deltanet", "gated_deltanet", "kda"):  # identity convolutions, silu, L2-normalised q and k
        q, k, v, write = l2(silu(q)), l2(silu(k)), silu(v), beta
        log_decay *= name != "deltanet"
    elif name == "mamba2":  # C = q, B = k, x = v through an identity convolution and silu; dt = 1
        q, k, v, scale = silu(q), silu(k), silu(v), 1.0
    elif name == "hgrn2":  # Liger-HGRN2: forget gate sigmoid(k), key 1 - gate
        log_decay, k, scale = -np.log1p(np.exp(-k)), 1 / (1 + np.exp(k)), 1.0
    elif name == "retnet":  # RoPE as the teacher's, fixed decays 1 - 2^(-5-h)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        rope = lambda a: np.asarray(apply_rotary(jnp.asarray(a, jnp.float32), positions, 10000.0, None), np.float64)
        q, k = rope(q), rope(k)
        log_decay = np.broadcast_to(np.log1p(-2.0 ** (-5.0 - np.arange(HEADS)))[:, None], q.shape)
    elif name in ("rwkv6", "rwkv7"):
        scale, norm = 1.0, "rms" if name == "rwkv6" else "group"
    cumulative = np.cumsum(log_decay, axis=1)
    query_side = cumulative - log_decay if name == "rwkv6" else cumulative  # RWKV-6 reads the state before t
    before = np.arange(length)[:, None] >= np.arange(length)[None, :]
    exponent = query_side[:, :, None] - cumulative[:, None, :]  # [B, t, s, H, K]
    decay = np.exp(np.where(before[None, :, :, None, None], exponent, -np.inf))
    if name == "rwkv6":  # ... plus the current token through the bonus u = 1
        decay[:, np.arange(length), np.arange(length)] = 1.0
    scores = np.einsum("bthk,btshk,bshk->bhts", q, decay, k)
    o = scale * write * np.einsum("bhts,bshv->bthv", scores, v)
    if norm == "rms":
        o = rms(o, NORM_EPS)
    else:  # RWKV-7's GroupNorm per head: mean removed, eps head_dim * norm_eps
        o = rms(o - o.mean(-1, keepdims=True), HEAD_DIM * NORM_EPS)
    return o.reshape(batch, length, -1) @ np.asarray(attention.o_proj.kernel[...], np.float64)


def test_the_delta_rules_alone_start_inexactly():
    assert sorted(DELTA) == ["deltanet", "gated_deltanet", "kda", "rwkv7"]


@pytest.mark.parametrize("name", STUDENTS)
def test_a_student_starts_as_linear_attention_over_the_teachers_projections(name):
    model, config = teacher()
    student, _ = converted(name)
    layer = student.layers[0].self_attn
    assert isinstance(layer, Student)
    x = jax.random.normal(jax.random.key(4), (2, 12, config.d_model))
    expected = reference(name, model.layers[0].self_attn, x)
    error = rel_err(mix(layer, x), expected)
    if name not in DELTA:
        assert error < 2e-5, error  # float32 against float64
        return
    # The delta rules remove beta (k . S) per write: close at beta = INITIAL_BETA over 12 tokens,
    # and exact as beta -> 0 (RWKV-7: as its learning rate a -> 0).
    assert error < 0.1, error
    small = 1e-4
    bias = layer.mixer.a_lora.up.bias if name == "rwkv7" else layer.mixer.b_proj.bias
    start = bias.get_value()
    bias.set_value(jnp.full(bias.shape, np.log(small / (1 - small)), jnp.float32))
    try:
        assert rel_err(mix(layer, x), reference(name, model.layers[0].self_attn, x, beta=small)) < error / 100
    finally:
        bias.set_value(start)


@pytest.mark.parametrize("name", STUDENTS)
def test_a_students_new_parameters_are_transfer_params_and_the_rest_the_teachers(name):
    model, _ = teacher()
    student, _ = converted(name)
    new = nnx.to_flat_state(nnx.state(student, TransferParam))
    assert new and all(path[:3] == ("layers", 0, "self_attn") for path, _ in new)
    mapped = {".".join(map(str, path[1:])): v for path, v in nnx.to_flat_state(
        nnx.state(student.layers[0].self_attn, CHECKPOINT_PARAMS))}
    # The teacher's parameters are the recipe's projections (biased, as the teacher's q/k/v are): nothing else.
    out_proj = "out_proj" if name == "mamba2" else "o_proj"
    projections = RECIPES[name].projections
    assert set(mapped) == {f"{p}.{leaf}" for p in projections for leaf in ("kernel", "bias")} - {f"{out_proj}.bias"}
    source = model.layers[0].self_attn
    np.testing.assert_array_equal(mapped[f"{out_proj}.kernel"][...], source.o_proj.kernel[...])
    if name != "mamba2":  # the key projection, its kv heads repeated in place: head h reads kv head h // 2
        key = mapped[{"hgrn2": "f_proj"}.get(name, "k_proj") + ".kernel"][...].reshape(-1, HEADS, HEAD_DIM)
        teacher_key = source.k_proj.kernel[...].reshape(-1, KV_HEADS, HEAD_DIM)
        np.testing.assert_array_equal(key, teacher_key[:, [0, 0, 1, 1]])
    kept, teacher_layer = student.layers[1].self_attn, model.layers[1].self_attn
    np.testing.assert_array_equal(kept.q_proj.kernel[...], teacher_layer.q_proj.kernel[...])


@pytest.mark.parametrize("name", STUDENTS)
def test_a_student_decodes_as_its_forward(name):
    student, _ = converted(name)
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 256)
    logits = logits_of(student, tokens)
    cache = student.init_cache(2, 9)
    prefill, cache = extend(student, tokens[:, :5], cache)
    steps = [prefill]
    for t in range(5, 9):
        step, cache = extend(student, tokens[:, t:t + 1], cache)
        steps.append(step)
    assert rel_err(jnp.concatenate(steps, axis=1), np.asarray(logits, np.float64)) < 1e-5


@pytest.mark.parametrize("name", STUDENTS)
def test_a_student_exports_and_reloads_with_its_logits(name, tmp_path):
    student, config = converted(name)
    assert export_pretrained(student, config, tmp_path, form="seqmix") == "seqmix"
    tokens = jax.random.randint(jax.random.key(6), (2, 10), 0, 256)
    logits = logits_of(student, tokens)
    reloaded = logits_of(seqmix.from_pretrained(tmp_path), tokens)
    assert float(jnp.abs(reloaded - logits).max() / jnp.abs(logits).max()) < 1e-6


def test_the_trainer_reads_a_student_from_the_teachers_checkpoint(tmp_path):
    """`create_train_state`'s init_from path (`read_initial_weights`) gives the in-memory conversion."""
    model, config = teacher()
    save_pretrained(model, config, tmp_path)
    student, student_config = converted("mamba2")
    abstract = nnx.state(nnx.eval_shape(lambda: LanguageModel(student_config, rngs=nnx.Rngs(0))), CHECKPOINT_PARAMS)
    read = read_initial_weights(tmp_path, abstract, student_config)
    in_memory = nnx.to_flat_state(nnx.state(student, CHECKPOINT_PARAMS))
    assert [path for path, _ in nnx.to_flat_state(read)] == [path for path, _ in in_memory]
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(read), in_memory):
        np.testing.assert_allclose(ours[...], theirs[...], rtol=0, atol=1e-7, err_msg=str(path))


def test_linearize_student_cli_trains_and_generates(tmp_path):
    """One run through the command line: gated DeltaNet in layer 0, layer 1 kept, then generate."""
    model, config = teacher()
    save_pretrained(model, config, tmp_path / "teacher")
    run = tmp_path / "run"
    seqmix_cli = [sys.executable, "-m", "seqmix.cli"]
    done = subprocess.run([*seqmix_cli, "linearize", str(tmp_path / "teacher"), "--student", "gated_deltanet",
                           "--keep", "1", "steps=2", f"out_dir={run}", "eval_every=2", "eval_batches=1",
                           "sample_tokens=0", "data.seq_len=32", "data.batch_size=8", "optim.warmup_steps=1",
                           "checkpoint.every_steps=2"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "linearized (gated_deltanet) and trained 2 steps" in done.stdout  # generate samples below
    done = subprocess.run([*seqmix_cli, "generate", str(run), "--prompt", "To be", "--max-new-tokens", "5"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("To be") and len(done.stdout.strip()) >= len("To be")


def test_layer_selection_scores_each_layer_converted_to_a_student():
    model, config = teacher()
    tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 256)
    batch = {"inputs": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
    scores = linearization_kl(model, config, "gated_deltanet", [batch])
    assert sorted(scores) == [0, 1] and all(np.isfinite(kl) and kl > 0 for kl in scores.values()), scores


def test_the_command_line_offers_every_student_instead_of_a_method():
    for name in STUDENTS:
        assert build_parser().parse_args(["linearize", "CKPT", "--student", name]).student == name
    for wrong in (["--student", "lolcats"], ["--student", "gla", "--method", "lolcats"], []):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["linearize", "CKPT", *wrong])


def test_what_no_student_carries_over_is_refused():
    qwen3 = build(ModelConfig, {**TEACHER, "mixers": {"attention": {"type": "attention", "qk_norm": "head"}}}, "model")
    for method in ("gla", "liger_gla"):  # a Qwen3 teacher: neither a student nor a Liger layer has q/k norms
        with pytest.raises(ConfigError, match="has qk_norm 'head', which no conversion carries over"):
            linearized_config(qwen3, method)
