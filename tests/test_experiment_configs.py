"""Every config in experiments/ and every sweep in experiments/sweeps/: loads from any working
directory, validates for 1 and 8 devices (where P allows), says what it reproduces and how to run
it, and the real-folder configs split their data as their docstrings claim."""

import ast
import pathlib
import runpy

import pytest

from facenet_jax import data, losses, models, sweep
from facenet_jax.config import flatten, load_config, to_plain
from facenet_jax.train.validate import validate_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments").glob("*.py"))
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*_margin_strategy*.py"))
RECIPE_SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*batch_hard_recipe.py"))
FOLDER_DATA = {"orl.py": "orl_faces", "yaleb.py": "extended_yaleb"}
ACCELERATOR_CONFIGS = ("casia_webface.py", "vggface2.py")


def _docstring(path):
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_the_expected_configs_and_sweeps_exist():
    names = {p.name for p in CONFIGS}
    assert {"default.py", "orl.py", "yaleb.py", "lfw.py", "casia_webface.py",
            "vggface2.py"} <= names
    assert {"default_margin_strategy.py", "yaleb_margin_strategy.py"} <= {p.name for p in SWEEPS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_from_any_cwd_and_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    if config.model.name not in models.MODEL_NAMES:  # an encoder registered by another change
        pytest.skip(f"model.name {config.model.name!r} is not registered (yet)")
    validate_run_config(config, num_devices=1)
    if config.batch.identities % 8 == 0:
        validate_run_config(config, num_devices=8)
    else:
        with pytest.raises(ValueError, match="not divisible by the 8 devices"):
            validate_run_config(config, num_devices=8)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "default.py"],
                         ids=lambda p: p.name)
def test_config_extends_the_default_schema(path):
    """Same keys as default.py (every key lives there), so CLI overrides mean the same."""
    default = flatten(to_plain(load_config(REPO / "experiments" / "default.py")))
    config = flatten(to_plain(load_config(path)))
    assert set(config) == set(default)
    assert "default.py" in path.read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_docstring_says_what_where_how_long_and_how(path):
    doc = _docstring(path)
    assert "Reproduces" in doc and "Hardware" in doc
    assert f"python -m facenet_jax.train --config experiments/{path.name}" in doc
    if path.name in ACCELERATOR_CONFIGS:
        assert "benchmarks/train_step.py" in doc  # how to measure its time


def test_lfw_config_crops_the_centre_and_documents_the_official_pairs():
    config = load_config(REPO / "experiments" / "lfw.py")
    assert config.data.source == "folder" and 0 < config.data.center_crop < 1
    doc = _docstring(REPO / "experiments" / "lfw.py")
    assert "--config.data.split.exclude_pairs_file=" in doc
    assert "python -m facenet_jax.evaluate --workdir runs/lfw --data_root" in doc
    assert "--pairs /data/lfw/pairs.txt" in doc


@pytest.mark.parametrize("name", ACCELERATOR_CONFIGS)
def test_accelerator_configs_use_facenets_batch_and_margin(name):
    config = load_config(REPO / "experiments" / name)
    assert (config.batch.identities, config.batch.images_per_identity) == (45, 40)
    assert (config.loss.margin, config.loss.distance) == (0.2, "squared")
    assert config.model.name in ("inception_resnet_v1", "resnet50")
    assert config.data.source == "folder" and config.data.root is None
    assert config.optimizer.name in ("adagrad", "adam")


@pytest.mark.parametrize("name", sorted(FOLDER_DATA))
def test_folder_configs_default_to_the_shared_data_when_present(name):
    config = load_config(REPO / "experiments" / name)
    assert config.data.source == "folder"
    shared = REPO.parent / "shared" / "data" / FOLDER_DATA[name]
    assert config.data.root == (str(shared.resolve()) if shared.is_dir() else None)


@pytest.mark.parametrize("name, expected", [("orl.py", (24, 4, 12)), ("yaleb.py", (23, 4, 11))])
def test_folder_configs_split_as_documented(shared_data, name, expected):
    config = load_config(REPO / "experiments" / name)
    splits = data.split_dataset(data.load_dataset(config.data), config.data)
    counts = tuple(splits[s].num_identities for s in ("train", "validation", "test"))
    assert counts == expected
    assert f"{expected[0]} train / {expected[1]} validation / {expected[2]} test" in " ".join(
        _docstring(REPO / "experiments" / name).split())
    assert config.batch.identities <= expected[0]
    # The test pairs are what the config asks for, not silently capped by the split's size.
    pairs = data.generate_pairs(splits["test"], num_folds=config.data.pairs.num_folds,
                                pairs_per_fold=config.data.pairs.pairs_per_fold,
                                seed=config.seed)
    assert len(pairs.first) == 2 * config.data.pairs.num_folds * config.data.pairs.pairs_per_fold


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_cells_all_load_validate_and_cover_their_grid(path, tmp_path):
    """Every cell is a valid config; the cells are exactly MARGINS × STRATEGIES × DISTANCES of
    the file, with every strategy of facenet_jax.losses and α always set with its distance."""
    spec = sweep.load_sweep(path)
    axes = runpy.run_path(str(path))
    planned = sweep.plan(spec, tmp_path)
    assert len(planned) == len(spec["cells"])
    grid = set()
    for cell in spec["cells"]:
        assert {"loss.margin", "loss.distance"} <= set(cell)
        config = sweep.cell_config(spec["base"], spec["common"], cell)
        validate_run_config(config, num_devices=1)
        grid.add((config.loss.margin, config.loss.strategy, config.loss.distance))
    assert set(axes["STRATEGIES"]) == set(losses.STRATEGIES)
    assert grid == {(m, s, d) for m in axes["MARGINS"] for s in axes["STRATEGIES"]
                    for d in axes["DISTANCES"]}
    seeds = {cell.get("seed") for cell in spec["cells"]}  # a sweep's seeds repeat each cell
    assert len(grid) * len(seeds) == len(spec["cells"])
    doc = _docstring(path)
    assert f"python -m facenet_jax.sweep --sweep experiments/sweeps/{path.name}" in doc


@pytest.mark.parametrize("path", RECIPE_SWEEPS, ids=lambda p: p.name)
def test_batch_hard_recipe_sweeps_are_three_seeds_of_three_valid_variants(path, tmp_path):
    spec = sweep.load_sweep(path)
    assert len(sweep.plan(spec, tmp_path)) == 9
    assert {"loss.margin", "loss.distance"} <= set(spec["common"])
    variants = {}
    for cell in spec["cells"]:
        config = sweep.cell_config(spec["base"], spec["common"], cell)
        validate_run_config(config, num_devices=1)
        variant = (config.loss.strategy, config.loss.warmup_strategy, config.loss.warmup_steps)
        variants.setdefault(variant, []).append(config.seed)
    warmup = config.num_steps // 4
    assert variants == {("semihard", None, 0): [0, 1, 2],
                        ("hardest", "semihard", warmup): [0, 1, 2],
                        ("hardest", None, 0): [0, 1, 2]}
    assert f"python -m facenet_jax.sweep --sweep experiments/sweeps/{path.name}" in _docstring(
        path)


def test_runlocal_preset_is_the_default_with_its_keys_changed(tmp_path, monkeypatch):
    """`default.py:runlocal` differs from the default exactly in RUNLOCAL's keys, validates for
    1, 2 and 8 devices, and an unknown argument is refused naming the valid one."""
    monkeypatch.chdir(tmp_path)
    default = flatten(to_plain(load_config(REPO / "experiments" / "default.py")))
    runlocal = flatten(to_plain(load_config(f"{REPO / 'experiments' / 'default.py'}:runlocal")))
    preset = runpy.run_path(str(REPO / "experiments" / "default.py"))["RUNLOCAL"]
    assert runlocal.keys() == default.keys()
    assert {k for k in default if default[k] != runlocal[k]} == set(preset)
    assert {k: runlocal[k] for k in preset} == preset
    assert runlocal["num_steps"] == 8 and default["num_steps"] == 1200
    for devices in (1, 2, 8):
        validate_run_config(load_config(f"{REPO / 'experiments' / 'default.py'}:runlocal"),
                        num_devices=devices)
    with pytest.raises(ValueError, match=r"unknown config argument 'tiny'.*default\.py:runlocal"):
        load_config(f"{REPO / 'experiments' / 'default.py'}:tiny")
    with pytest.raises(FileNotFoundError, match="nothing.py does not exist"):
        load_config(tmp_path / "nothing.py:runlocal")
