"""examples/: the new-mixer example, a mixer in a file of its own and a run YAML that imports it
(`model.imports`), run by the stock command line in subprocesses (train, generate, eval), beside a
mixer imported as a module (PYTHONPATH) and one that an installed package registers through a
`seqmix.mixers` entry point; and what a config's bad `imports` entry is told."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seqmix.configuration import ConfigError
from seqmix.train.config import load_train_config

sys.path.insert(0, str(Path(__file__).parent / "train"))  # the CLI tests' environment lives there
from cli_env import cli_env  # noqa: E402

EXAMPLE = Path("examples/new_mixer.yaml")
# A mixer of the user's: seqmix's gated convolution under another name, which the layer pattern
# can only name once its module has registered it.
PLUGIN = """from seqmix.mixers.gated_conv import GatedConv, GatedConvConfig
from seqmix.mixers.registry import register_mixer

register_mixer({name!r}, GatedConvConfig)(type({name!r}, (GatedConv,), {{}}))
"""


def installed_plugins(directory: Path) -> Path:
    """A directory that, on PYTHONPATH, holds the module `module_mixers` (mixer `module_conv`) and
    an installed distribution whose `seqmix.mixers` entry point's module registers `entry_conv`
    (importlib.metadata finds its .dist-info there as it finds pip's)."""
    directory.mkdir()
    (directory / "module_mixers.py").write_text(PLUGIN.format(name="module_conv"))
    (directory / "entry_mixers.py").write_text(PLUGIN.format(name="entry_conv"))
    dist_info = directory / "seqmix_entry_mixers-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: seqmix-entry-mixers\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[seqmix.mixers]\nentry_conv = entry_mixers\n")
    return directory


def seqmix(*args, env):
    done = subprocess.run([sys.executable, "-m", "seqmix.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_example_mixer_trains_generates_and_evaluates_through_the_cli_beside_module_and_entry_point_mixers(
        tmp_path):
    """The example YAML, its imports extended by an override (`new_mixer.py` is found beside the
    YAML, not in the working directory) to a module, and its layer pattern to the module's mixer
    and an entry point's: the run records the file absolute, and generate and eval, fresh
    processes, import them again from the run's config.yaml."""
    env = {**cli_env(), "PYTHONPATH": str(installed_plugins(tmp_path / "plugins"))}
    run = tmp_path / "run"
    trained = seqmix("train", str(EXAMPLE), f"out_dir={run}", "steps=4", "optim.warmup_steps=2", "eval_every=4",
                     "log_every=2", "checkpoint.every_steps=4", "sample_tokens=8", "model.n_layers=3",
                     "model.imports=[new_mixer.py,module_mixers]",
                     "model.layer_pattern=[decaying_attention,module_conv,entry_conv]", env=env)
    assert "trained 4 steps" in trained and "held-out loss" in trained
    recorded = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert recorded["imports"] == [str(EXAMPLE.with_suffix(".py").resolve()), "module_mixers"]
    assert recorded["layer_pattern"] == ["decaying_attention", "module_conv", "entry_conv"]
    generated = seqmix("generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "0", env=env)
    assert generated.startswith("ROMEO:")  # the prompt, then its continuation
    evaluated = seqmix("eval", str(run), "--batches", "1", env=env)
    assert "step 4: held-out loss" in evaluated


def test_the_example_yaml_finds_its_file_beside_it_and_bad_imports_name_their_key():
    config = load_train_config(EXAMPLE)  # from the repository root: new_mixer.py is not in the working directory
    assert config.model.imports == [str(EXAMPLE.with_suffix(".py").resolve())]
    assert config.model.layer_pattern == ["decaying_attention"]
    with pytest.raises(ConfigError, match=r"^model\.imports\[1\]: cannot import module 'no_such_mixers'"):
        load_train_config(EXAMPLE, ["model.imports=[new_mixer.py,no_such_mixers]"])
    with pytest.raises(ConfigError, match=r"^model\.imports\[0\]: file 'missing/mixer\.py' not found"):
        load_train_config(EXAMPLE, ["model.imports=[missing/mixer.py]"])
    with pytest.raises(ConfigError, match=r"^model\.layer_pattern: unknown mixer 'nope' .*model\.imports"):
        load_train_config(EXAMPLE, ["model.layer_pattern=[nope]", "model.mixers={}"])
