"""`seqmix train | data prepare | data tokenize | generate | linearize | export | eval`: the command line.

Configuration, data and checkpoint errors are reported as one line naming the key or file, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seqmix.configuration import ConfigError
from seqmix.library_noise import keep_library_noise_out


def _open_run(path: str, overrides: list[str] = ()):
    """The run's model with its newest checkpoint's parameters (`seqmix.train.run_loader`), the step
    it was loaded from told on stderr."""
    from seqmix.train.run_loader import open_run

    run = open_run(path, overrides)
    print(f"loaded step {run.step} of {run.config.out_dir}", file=sys.stderr)
    return run


def cmd_train(args) -> int:
    from seqmix.train import distributed
    from seqmix.train.config import load_train_config
    from seqmix.train.trainer import train

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           startup_timeout=args.startup_timeout, heartbeat_timeout=args.heartbeat_timeout)
    config = load_train_config(args.config, args.overrides)
    if args.compile_only:
        return _compile_only(config)
    result = train(config, resume=args.resume)
    return _reported(result, f"trained {result.step} steps")


def _reported(result, what: str) -> int:
    """Prints what a finished `TrainResult` did (`what`, then its output directory), its held-out
    loss and its end-of-run sample, if the run took them; returns the command's exit status: 0, or
    128 + the signal that stopped the run."""
    print(f"\n{what} -> {result.out_dir}")
    if result.eval_loss is not None:
        print(f"held-out loss {result.eval_loss:.4f} nats/token (unigram baseline {result.unigram_loss:.4f})")
    if result.sample is not None:
        print(f"\n--- sample ---\n{result.sample}\n--------------")
    return 0 if result.stop_signal is None else 128 + result.stop_signal


def _compile_only(config) -> int:
    from seqmix.train.compile_check import compile_train_step
    from seqmix.train.sharding import describe, make_mesh

    mesh = make_mesh(config.mesh)
    report = compile_train_step(config, mesh)
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    print(f"parameters: {report.parameters:,}, {report.active_parameters:,} of them per token")
    print(f"compiled the train step for mesh {describe(mesh)} ({mesh.size} devices); per device: "
          f"arguments {mib(report.arguments)} (parameters, optimizer state, batch), "
          f"temporaries {mib(report.temporaries)}, outputs {mib(report.outputs)} "
          f"({mib(report.aliased)} of them in donated buffers), peak {mib(report.peak)}")
    return 0


def cmd_data_prepare(args) -> int:
    from seqmix.train.data import prepare_shakespeare

    directory = prepare_shakespeare(args.cache_dir)
    print(f"prepared {args.corpus} in {directory}")
    return 0


def cmd_data_tokenize(args) -> int:
    import time

    from seqmix.train.data import tokenize_corpus

    if (args.shard_tokens is not None and args.shard_tokens < 1) or args.workers < 1:
        raise ConfigError(f"--shard-tokens and --workers must be positive, got {args.shard_tokens}, {args.workers}")
    start = time.perf_counter()
    sharding = {} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}
    manifest = tokenize_corpus(args.files, args.tokenizer, args.out, text_field=args.text_field,
                               workers=args.workers, **sharding)
    seconds = time.perf_counter() - start
    print(f"tokenized {manifest['documents']:,} documents, {manifest['tokens']:,} tokens ({manifest['dtype']}) "
          f"into {len(manifest['shards'])} shard(s) in {args.out} ({seconds:.1f} s, "
          f"{manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)")
    return 0


def cmd_generate(args) -> int:
    import math

    import jax

    if not (math.isfinite(args.temperature) and args.temperature >= 0) or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature must be a finite number >= 0 and --top-p in (0, 1], got {args.temperature}, "
                          f"{args.top_p}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not all(args.prompt):
        raise ConfigError("--prompt: an empty prompt gives generation nothing to continue")
    from seqmix.train.config import load_train_config
    from seqmix.train.run_loader import run_directory

    if load_train_config(run_directory(args.checkpoint) / "config.yaml").objective == "mlm":
        raise ConfigError(f"{args.checkpoint}: trained with objective mlm, an encoder that fills in masked tokens; "
                          "it cannot generate text left to right")
    run = _open_run(args.checkpoint)
    from seqmix.models.generate import CacheTooLarge
    from seqmix.train.data import load_tokenizer
    from seqmix.train.sampling import sample_text

    rng = run.rng if args.seed is None else jax.random.key(args.seed)
    try:  # the key folded with the step, as the run's own end-of-training sample
        samples = sample_text(run.model, load_tokenizer(run.config.data.tokenizer), args.prompt, args.max_new_tokens,
                              rng=jax.random.fold_in(rng, run.step), context_len=run.config.data.seq_len,
                              temperature=args.temperature, top_p=args.top_p)
    except CacheTooLarge as err:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: {err}") from None
    print("\n\n".join(samples))
    return 0


def _reference_model(source: str, run, option: str, model):
    """(source, model) of a run directory or a model directory (`from_pretrained`) to compare the
    run's `model` with (default: the run's init_from); `option` names the flag in errors."""
    from seqmix.models.hf import from_pretrained

    source = source or run.config.init_from
    if not source:
        raise ConfigError(f"{option}: name the reference model (the run has no init_from to default to)")
    reference = _open_run(source).model if (Path(source) / "config.yaml").is_file() else from_pretrained(source)
    if reference.embed_tokens.embedding.shape != model.embed_tokens.embedding.shape:
        raise ConfigError(f"{option}: {source} has another vocabulary or width of embeddings than the run")
    return source, reference


def _held_out(run):
    """The run's held-out documents (its training documents left unread) as a `Corpus`."""
    from seqmix.train.inputs import load_corpus

    return load_corpus(run.config.data, training=False)


def cmd_eval(args) -> int:
    if args.batches is not None and args.batches < 1:
        raise ConfigError(f"--batches must be at least 1, got {args.batches}")
    if args.prompts < 1 or args.trials < 1 or any(length < 1 for length in args.needle or []):
        raise ConfigError(f"--prompts, --trials and --needle lengths must be positive, got {args.prompts}, "
                          f"{args.trials}, {args.needle}")
    from seqmix.train.data import load_tokenizer
    from seqmix.train.inputs import held_out_tokens

    run = _open_run(args.checkpoint, [f"eval_batches={args.batches}"] if args.batches else [])
    model, tokenizer = run.model, load_tokenizer(run.config.data.tokenizer)
    if args.agreement is not None or args.needle:  # the held-out text, encoded, only where it is read
        text = held_out_tokens(_held_out(run))
    if args.agreement is not None:
        from seqmix.train.agreement import agreement, greedy_continuations, held_out_prompts

        source, reference = _reference_model(args.agreement, run, "--agreement", model)
        prompts = held_out_prompts(text, args.prompts, 64)
        result = agreement(greedy_continuations(model, prompts, 32), greedy_continuations(reference, prompts, 32))
        print(f"agreement with {source} over {result.prompts} held-out prompts of 64 tokens: the first "
              f"{result.tokens} generated tokens identical in {100 * result.exact:.1f}% of them; common prefix "
              f"{result.common_prefix:.1f} tokens on average")
        return 0
    if args.needle:
        from seqmix.train.agreement import greedy_continuations
        from seqmix.train.needle import needle_accuracy

        accuracy = needle_accuracy(lambda prompts, n: greedy_continuations(model, prompts, n), tokenizer,
                                   text, args.needle, trials=args.trials)
        print(f"needle (pass key) retrieval, {args.trials} trials per length: "
              + ", ".join(f"{length} tokens {100 * share:.1f}%" for length, share in accuracy.items()))
        return 0
    if args.choices:
        from seqmix.train.multiple_choice import evaluate_choices, load_choice_tasks

        for path in args.choices:
            result = evaluate_choices(model, tokenizer, load_choice_tasks(path))
            print(f"{path}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
                  f"over {result['examples']} examples")
        return 0
    corpus = _held_out(run)
    if not corpus.eval_documents:
        raise ConfigError("data.eval_files: the run has no held-out documents to evaluate on")
    if args.kl is not None:
        from seqmix.train.evaluate import held_out_kl
        from seqmix.train.inputs import eval_iterator

        source, reference = _reference_model(args.kl, run, "--kl", model)
        result = held_out_kl(model, reference, eval_iterator(run.config.data, corpus), run.config.eval_batches)
        print(f"KL({source} || the run's model) over {int(result['tokens'])} held-out tokens: "
              f"{result['kl']:.4g} nats/token")
        return 0
    from seqmix.train.evaluate import run_held_out_loss

    result = run_held_out_loss(run, corpus)
    print(f"step {run.step}: held-out loss {result['eval_loss']:.4f} nats/token, "
          f"perplexity {result['eval_ppl']:.3f} over {int(result['eval_tokens'])} tokens")
    return 0


def _selected_layers(args, config, teacher_config) -> list[int]:
    """The --select-layers attention layers of the teacher to keep, by the KL that linearizing each
    alone costs on the run's first --calibration-batches training batches (printed)."""
    import itertools

    from seqmix.models.hf import from_pretrained
    from seqmix.train.inputs import load_corpus, train_iterator
    from seqmix.train.layer_selection import linearization_kl, select_layers

    if args.calibration_batches < 1:
        raise ConfigError(f"--calibration-batches must be positive, got {args.calibration_batches}")
    batches = itertools.islice(train_iterator(config.data, load_corpus(config.data), config.seed),
                               args.calibration_batches)
    scores = linearization_kl(from_pretrained(args.checkpoint), teacher_config, args.method or args.student, batches)
    keep = select_layers(scores, args.select_layers)
    print(f"layer selection, KL(teacher || teacher with the layer alone linearized) in nats/token over "
          f"{args.calibration_batches} batches: " + ", ".join(f"{layer}: {kl:.4g}" for layer, kl in scores.items())
          + f"; kept as attention: {', '.join(map(str, keep))}")
    return keep


def cmd_linearize(args) -> int:
    import dataclasses
    import json

    from seqmix.models.hf import CheckpointError, config_from_hf
    from seqmix.models.linearize import linearized_config, student_lora_targets
    from seqmix.train.config import LoRAConfig, load_train_config
    from seqmix.train.trainer import train

    config_file = Path(args.checkpoint) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{args.checkpoint}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        teacher = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    except CheckpointError as err:
        raise ConfigError(str(err)) from err
    method = args.method or args.student
    run = args.run or f"configs/runs/{'lolcats' if args.method == 'lolcats' else 'linearize'}.yaml"
    # A student's projections have its own names: LoRA adapts those that hold the teacher's q/k/v/o
    # (and attention's, when layers stay attention), unless the run file or an override says otherwise.
    targets = []
    if args.student and not args.run:
        kept = bool(args.keep) or args.select_layers is not None
        targets = [f"lora.targets={json.dumps(student_lora_targets(args.student, keeps_attention=kept))}"]
    # A JSON string is a YAML scalar that stays the path, whatever characters it holds.
    config = load_train_config(run, [*targets, *args.overrides, f"init_from={json.dumps(str(args.checkpoint))}"])
    keep = args.keep
    if args.select_layers is not None:
        if keep:
            raise ConfigError("--select-layers chooses the layers that stay attention; do not also give --keep")
        keep = _selected_layers(args, config, teacher)
    # LoRA adapters unless the run says otherwise; a staged run's stages say what trains.
    config = dataclasses.replace(config, model=linearized_config(teacher, method, keep=keep),
                                 lora=config.lora or (None if config.stages else LoRAConfig()))
    config.validate("")
    result = train(config, resume=args.resume)
    last = f" (the last of {len(config.stages)} stages)" if config.stages else ""
    return _reported(result, f"linearized ({method}) and trained {result.step} steps{last}")


def cmd_export(args) -> int:
    import shutil

    import jax.numpy as jnp

    from seqmix.models.hf import export_pretrained
    from seqmix.models.lora import merge_lora

    directory = Path(args.directory)
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir())
                                                          and not (directory / "config.json").is_file())):
        raise ConfigError(f"{directory}: exists and is not a model directory; export writes into a new or empty "
                          "directory, or over an earlier export")
    run = _open_run(args.run)
    merged = merge_lora(run.model)
    written = export_pretrained(run.model, run.config.model, directory, form=args.format, dtype=jnp.dtype(args.dtype))
    if run.config.data.tokenizer != "byte":
        shutil.copyfile(run.config.data.tokenizer, directory / "tokenizer.json")
    print(f"exported {args.run} at step {run.step} ({merged} LoRA projections merged) to {directory}: {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqmix", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own logs and tracebacks (orbax, asyncio, absl); anywhere on the line")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a run config")
    train.add_argument("config", help="run YAML, e.g. configs/runs/shakespeare.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 model.n_layers=4")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    train.add_argument("--compile-only", action="store_true",
                       help="lower and compile the train step for the mesh, print memory per device, and stop")
    train.add_argument("--coordinator", help="multi-process run: host:port of process 0 (or SEQMIX_COORDINATOR)")
    train.add_argument("--num-processes", type=int, help="multi-process run: processes in all (or SEQMIX_NUM_PROCESSES)")
    train.add_argument("--process-id", type=int, help="multi-process run: this process, 0.. (or SEQMIX_PROCESS_ID)")
    train.add_argument("--startup-timeout", type=float, metavar="SECONDS",
                       help="multi-process run: how long the processes wait for each other to start (or "
                            "SEQMIX_STARTUP_TIMEOUT; default 300)")
    train.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                       help="multi-process run: silence after which a process counts as dead and the run stops "
                            "(or SEQMIX_HEARTBEAT_TIMEOUT; default 100)")
    train.set_defaults(func=cmd_train)

    data = commands.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="download and prepare an embedded corpus")
    prepare.add_argument("corpus", choices=["shakespeare"])
    prepare.add_argument("--cache-dir", default=".cache/seqmix")
    prepare.set_defaults(func=cmd_data_prepare)
    tokenize = data.add_parser("tokenize", help="tokenize text once into sharded ArrayRecord files that "
                                                 "`data.corpus: tokenized` trains from")
    tokenize.add_argument("files", nargs="+", help="text, .jsonl or .parquet files or glob patterns, as data.train_files")
    tokenize.add_argument("--tokenizer", required=True, help='"byte" or the path of a tokenizer.json (the run\'s '
                                                             "data.tokenizer must be the same file)")
    tokenize.add_argument("--out", required=True, help="the corpus directory to write (new or empty)")
    tokenize.add_argument("--text-field", default="text", help="field (.jsonl) or column (.parquet) of the text")
    tokenize.add_argument("--shard-tokens", type=int, metavar="N",
                          help="close a shard once it holds N tokens (default 2**27)")
    tokenize.add_argument("--workers", type=int, default=1, metavar="K", help="tokenizing processes (default 1)")
    tokenize.set_defaults(func=cmd_data_tokenize)

    gen = commands.add_parser("generate", help="continue a prompt with a trained model")
    gen.add_argument("checkpoint", help="run directory (out_dir) or its checkpoints/ folder")
    gen.add_argument("--prompt", required=True, action="append",
                     help="repeat for several prompts (of any lengths), generated as one batch")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    lin = commands.add_parser("linearize", help="convert a Hugging Face attention model (Liger, LoLCATs, or any "
                                                "recurrent student) and LoRA-train it")
    lin.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json + safetensors)")
    conversion = lin.add_mutually_exclusive_group(required=True)
    conversion.add_argument("--method", choices=["liger_gla", "liger_hgrn2", "liger_attention", "lolcats"])
    conversion.add_argument("--student", choices=["gla", "deltanet", "gated_deltanet", "hgrn2", "retnet", "mamba2",
                                                     "rwkv6", "kda", "rwkv7"],
                            help="the recurrent mixer each converted layer becomes, initialised from its q/k/v/o "
                                 "(its new gates start it as linear attention; LoRA targets its q/k/v/o projections)")
    lin.add_argument("--keep", type=int, action="append", default=[], metavar="LAYER",
                     help="a layer index that stays softmax attention; repeatable")
    lin.add_argument("--select-layers", type=int, metavar="N",
                     help="keep as attention the N layers whose linearization alone moves the teacher's "
                          "next-token distribution most (KL on calibration batches), instead of --keep")
    lin.add_argument("--calibration-batches", type=int, default=4,
                     help="--select-layers: training batches of the run to score the layers on")
    lin.add_argument("--run", default=None, help="run YAML for data, optimizer, steps, lora, attention transfer "
                                                  "(default: configs/runs/lolcats.yaml for lolcats, else "
                                                  "configs/runs/linearize.yaml)")
    lin.add_argument("overrides", nargs="*", help="dotted overrides of the run, e.g. steps=500 lora.rank=16")
    lin.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir (of a "
                                                           "staged run: of each stage)")
    lin.set_defaults(func=cmd_linearize)

    export = commands.add_parser("export", help="write a trained run as a model directory that seqmix.from_pretrained "
                                                "(and, in the Hugging Face format, transformers) loads, LoRA merged")
    export.add_argument("run", help="run directory (the out_dir of seqmix train or linearize)")
    export.add_argument("directory", help="where to write config.json and model.safetensors (new, empty, or an "
                                          "earlier export)")
    export.add_argument("--format", choices=["auto", "hf", "seqmix"], default="auto",
                        help="hf: the Hugging Face layout; seqmix: seqmix's own (any model); auto (default): hf "
                             "when a Hugging Face model_type holds the model, else seqmix")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the tensors")
    export.set_defaults(func=cmd_export)

    ev = commands.add_parser("eval", help="held-out loss and perplexity, KL from a reference, multiple-choice "
                                          "accuracy, generation agreement or pass-key retrieval of a trained model")
    ev.add_argument("checkpoint", help="run directory (out_dir) or its checkpoints/ folder")
    ev.add_argument("--batches", type=int, default=None, help="held-out batches (default: the run's eval_batches)")
    ev.add_argument("--choices", action="append", metavar="TASK.jsonl",
                    help="score a multiple-choice task (JSON lines: context, choices, gold) instead; repeatable")
    ev.add_argument("--agreement", nargs="?", const="", metavar="REFERENCE",
                    help="greedy continuations of held-out prompts compared with those of REFERENCE (a model "
                         "directory or run; default: the run's init_from, a linearized run's teacher) instead")
    ev.add_argument("--kl", nargs="?", const="", metavar="REFERENCE",
                    help="KL(REFERENCE || the run's model) of the next-token distributions per held-out token, "
                         "over --batches (REFERENCE as for --agreement) instead")
    ev.add_argument("--prompts", type=int, default=32, help="--agreement: held-out prompts (64 tokens, continued 32)")
    ev.add_argument("--needle", nargs="+", type=int, metavar="LENGTH",
                    help="pass-key retrieval accuracy at these context lengths (tokens) instead")
    ev.add_argument("--trials", type=int, default=20, help="--needle: trials per length")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--verbose" in argv:  # a top-level option, accepted after the sub-command too
        argv = ["--verbose", *(token for token in argv if token != "--verbose")]
    # Dotted overrides may come after the options too (`linearize CKPT --method lolcats steps=8`):
    # argparse leaves those it meets after an option unparsed.
    args, extra = parser.parse_known_args(argv)
    if not args.verbose:
        keep_library_noise_out()
    late_overrides = [token for token in extra if "=" in token and not token.startswith("-")]
    if len(late_overrides) < len(extra) or (late_overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late_overrides:
        args.overrides = [*args.overrides, *late_overrides]
    from seqmix.models.hf import CheckpointError
    from seqmix.train.data import DataError
    from seqmix.train.checkpoint import CheckpointWriteFailed
    from seqmix.train.trainer import TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"seqmix: error: {err}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointWriteFailed) as err:  # the run itself went wrong, not its inputs
        print(f"seqmix: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
