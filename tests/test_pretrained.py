"""facenet-pytorch's Inception-ResNet-v1 in Flax: the converted model computes what theirs does.

Needs torch and facenet-pytorch's module file (`pip install '.[pretrained]'` and
`pip install --no-deps facenet-pytorch==2.6.0`, as the README's test command does); no weights
are downloaded: both sides start from the same random initialisation.
"""

import importlib.util
import json
import pathlib
import re
import sys
import types

import jax
import numpy as np
import pytest

from facenet_jax import pretrained

# Every test that needs torch gets it through facenet_pytorch_module: collecting this file (and
# running the fast tier) does not import torch.
torch = None


@pytest.fixture(scope="module")
def facenet_pytorch_module():
    """facenet-pytorch's inception_resnet_v1 module, imported without the package __init__
    (which imports torchvision for MTCNN)."""
    global torch
    torch = pytest.importorskip(
        "torch", reason="torch is not installed: pip install '.[pretrained]' to run the "
        "weight-import tests")
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("facenet-pytorch is not installed: pip install --no-deps "
                    "facenet-pytorch==2.6.0 to run the weight-import tests")
    if "facenet_pytorch" not in sys.modules:
        package = types.ModuleType("facenet_pytorch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["facenet_pytorch"] = package
    return importlib.import_module("facenet_pytorch.models.inception_resnet_v1")


def sample_images() -> np.ndarray:
    """uint8 [4, 160, 160, 3]: noise, a diagonal ramp, a dark and a bright noisy image."""
    rng = np.random.default_rng(0)
    ramp = (np.indices((160, 160)).sum(0) * 0.8).astype(np.uint8)[..., None].repeat(3, -1)
    return np.stack([rng.integers(0, 256, (160, 160, 3)), ramp,
                     rng.integers(0, 60, (160, 160, 3)),
                     rng.integers(180, 256, (160, 160, 3))]).astype(np.uint8)


def to_torch_input(images: np.ndarray):
    """uint8 [N, H, W, 3] RGB -> their fixed_image_standardization, [N, 3, H, W]."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 128.0


def randomised_reference(module, images: np.ndarray, *, seed: int = 0,
                         logits: int | None = None):
    """Their InceptionResnetV1 in eval mode, random weights, BN statistics and affine
    parameters randomised too (the defaults 0/1 would hide a swapped mean/var or scale/bias).

    At random initialisation the 512-d bottleneck varies across images by ~1 % of its mean,
    so the last BN's random offset would make every embedding nearly the same and a wrong
    mapping inside the network would still pass a 1e-4 test. Its running statistics are
    therefore set from `images` (times random factors): the embeddings then differ at O(1).
    """
    torch.manual_seed(seed)
    net = module.InceptionResnetV1()
    if logits:
        net.logits = torch.nn.Linear(512, logits)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = layer.num_features
                layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                layer.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(n, generator=generator) * 0.2)
        net.eval()
        captured = []
        hook = net.last_linear.register_forward_hook(lambda m, i, out: captured.append(out))
        net(to_torch_input(images))
        hook.remove()
        features = captured[0]
        n = features.shape[1]
        net.last_bn.running_mean.copy_(
            features.mean(0) + torch.randn(n, generator=generator) * features.std(0) * 0.1)
        net.last_bn.running_var.copy_(
            features.var(0) * (torch.rand(n, generator=generator) + 0.5))
    return net


def reference_embeddings(net, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(to_torch_input(images)).numpy()


@pytest.fixture(scope="module")
def reference(facenet_pytorch_module):
    images = sample_images()
    net = randomised_reference(facenet_pytorch_module, images, logits=8631)
    return net, images, reference_embeddings(net, images)


@pytest.mark.slow
def test_converted_model_matches_facenet_pytorch(reference):
    net, images, expected = reference
    variables, ignored = pretrained.convert_facenet_pytorch(net.state_dict())
    assert ignored == ["logits.bias", "logits.weight"]
    model = pretrained.build_model()
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    got = np.asarray(apply(variables, images.astype(np.float32) / 255.0))
    assert got.shape == (4, 512)
    assert np.abs(got - expected).max() <= 1e-4
    # The test can fail: the images embed apart, and a plausible conversion slip deep inside
    # (one block17's BN mean and variance swapped) moves the embeddings far beyond 1e-4.
    distances = ((expected[:, None] - expected[None]) ** 2).sum(-1)
    assert distances[np.triu_indices(4, 1)].min() > 0.01
    stats = variables["batch_stats"]["InceptionResidual_9"]["ConvBN_2"]["BatchNorm_0"]
    stats["mean"], stats["var"] = stats["var"], stats["mean"] + 1.0
    slipped = np.asarray(apply(variables, images.astype(np.float32) / 255.0))
    assert np.abs(slipped - expected).max() > 1e-3


@pytest.mark.slow
def test_conversion_names_every_bad_key(reference):
    state = {k: v.numpy() for k, v in reference[0].state_dict().items()}
    broken = dict(state)
    del broken["repeat_2.3.branch1.1.conv.weight"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["last_bn.running_var"] = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError) as error:
        pretrained.convert_facenet_pytorch(broken)
    message = str(error.value)
    for key in ("missing repeat_2.3.branch1.1.conv.weight", "unexpected extra.weight",
                "last_bn.running_var has shape (2, 256)"):
        assert key in message
    wrong = dict(state)
    wrong["conv2d_2b.conv.weight"] = np.zeros((64, 32, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"ConvBN_2/Conv_0/kernel: shape \(5, 5, 32, 64\)"):
        pretrained.convert_facenet_pytorch(wrong)


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    """A run folder imported from the random-init reference's .pt file (with its logits)."""
    folder = tmp_path_factory.mktemp("imported")
    weights = folder / "random-vggface2.pt"
    torch.save(reference[0].state_dict(), weights)
    info = pretrained.import_weights(weights, folder / "run")
    return folder / "run", weights, info


@pytest.mark.slow
def test_import_cli_writes_a_run_that_embeds_like_facenet_pytorch(reference, imported,
                                                                  tmp_path):
    from facenet_jax import runfiles
    from facenet_jax.eval import embed, evaluate

    _, images, expected = reference
    workdir, weights, info = imported
    assert info["logits_classes"] == 8631
    record = json.loads((workdir / "config.json").read_text())
    assert record["provenance"]["imported"]["sha256"] == pretrained.sha256(weights)
    assert record["config"]["model"]["input_norm"] == "fixed_standardization"
    assert not (workdir / runfiles.SPLIT_FILE).exists()

    encoder = embed.load_encoder(workdir, flip=False)
    assert encoder.step == 0
    assert np.abs(encoder.embed(images) - expected).max() <= 1e-4

    with pytest.raises(ValueError, match="no split.json.*--data_root"):
        evaluate.evaluate_workdir(workdir, data_root=None, pairs_file=None,
                                  output=tmp_path / "eval.json")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        pretrained.import_weights(weights, workdir)


@pytest.mark.slow
def test_imported_run_evaluates_a_folder_and_warns_on_another_alignment(imported, tmp_path):
    from PIL import Image

    from facenet_jax.eval import evaluate

    rng = np.random.default_rng(3)
    for name in ("Ann_A", "Bob_B"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for number in (1, 2):
            Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(
                tmp_path / "faces" / name / f"{name}_{number:04d}.png")
    (tmp_path / "faces" / "alignment.json").write_text(json.dumps({"mode": "landmarks"}))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\n"
                     "Bob_B\t1\t2\nAnn_A\t2\tBob_B\t2\n")
    with pytest.warns(UserWarning, match="'landmarks'-aligned crops but the model expects 'box'"):
        result = evaluate.evaluate_workdir(imported[0], data_root=str(tmp_path / "faces"),
                                           pairs_file=str(pairs), output=tmp_path / "e.json")
    assert result["num_pairs"] == 4 and result["step"] == 0


def _file_digests(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): pretrained.sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


SHALLOW = {"block35_repeats": 1, "block17_repeats": 1, "block8_repeats": 1}  # the shallow import


@pytest.fixture(scope="module")
def imported_shallow(reference, tmp_path_factory):
    """A run folder written by the importer's own path (convert, then write_run) from the
    reference's state_dict cut to one block per stage: an imported model that a fine-tuning
    test compiles in seconds (the full depth is the other tests')."""
    shallow = {key: value for key, value in reference[0].state_dict().items()
               if not re.match(r"repeat_\d\.[1-9]", key)}
    variables, _ = pretrained.convert_facenet_pytorch(shallow, **SHALLOW)
    folder = tmp_path_factory.mktemp("imported_shallow") / "run"
    pretrained.write_run(folder, variables, source_info={"source": "facenet-pytorch"},
                         config=pretrained.imported_config(repeats=tuple(SHALLOW.values())))
    return folder


@pytest.mark.slow
def test_fine_tuning_the_imported_model_on_orl(imported_shallow, shared_data, tmp_path):
    """A step on ORL from an imported model with a frozen backbone: step-0 validation is
    the imported model's, the backbone (parameters and BN statistics) stays exactly the
    imported one, the head moves, and DIR is only read."""
    from facenet_jax import checkpoints, data, finetune, optim, train
    from facenet_jax.eval import embed, evaluate
    from facenet_jax.config import load_config
    from facenet_jax.logs import read_metrics

    workdir_in = imported_shallow
    before = _file_digests(workdir_in)
    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "orl.py", {
        "data.root": str(shared_data / "orl_faces"), "data.image_size": 80,
        "model.name": "inception_resnet_v1", "model.embedding_dim": 512,
        "model.bn_scale": True, "model.input_norm": "fixed_standardization",
        **{f"model.inception_resnet_v1.{key}": value for key, value in SHALLOW.items()},
        "model.init_from": str(workdir_in), "optimizer.backbone_lr_multiplier": 0.0,
        "optimizer.warmup_steps": 0, "num_steps": 1, "log_every": 1, "eval_every": 1000,
        "checkpoint_every": 1, "batch.identities": 8, "batch.images_per_identity": 2,
        "data.split.train": 0.8, "data.split.validation": 0.1, "data.split.test": 0.1,
        "eval.batch_size": 40})
    train.train_and_evaluate(config, tmp_path / "run")
    assert _file_digests(workdir_in) == before

    # Step 0's validation row is the imported encoder evaluated on the same images.
    encoder = embed.load_encoder(workdir_in, flip=False)
    validation = data.split_dataset(data.load_dataset(config.data), config.data)["validation"]
    expected = evaluate.evaluate_dataset(
        lambda variables, images: encoder.embedder(variables, images), encoder.variables,
        validation, evaluate.generated_pairs(config, validation),
        distance=config.eval.distance)
    step0 = next(row for row in read_metrics(tmp_path / "run") if row["step"] == 0)
    assert step0["eval/accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert step0["eval/auc"] == pytest.approx(expected["auc"], abs=1e-6)

    tuned = checkpoints.read_arrays(tmp_path / "run", 1)
    start, _ = finetune.read_variables(workdir_in)
    moved = []
    for collection in ("params", "batch_stats"):
        for scope, subtree in start[collection].items():
            for key, value in jax.tree_util.tree_leaves_with_path(subtree):
                where = "params/encoder" if collection == "params" else collection
                path = f"{where}/{scope}/" + jax.tree_util.keystr(key, simple=True,
                                                                 separator="/")
                if scope == optim.HEAD_SCOPE:
                    moved.append(not np.array_equal(tuned[path], value))
                else:
                    np.testing.assert_array_equal(tuned[path], value, err_msg=path)
    assert any(moved)


@pytest.mark.slow
def test_init_from_a_differently_shaped_encoder_names_the_parameters(imported):
    from facenet_jax import finetune
    from facenet_jax.config import load_config
    from facenet_jax.state import build_model, build_optimizer

    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py",
                         {"model.name": "inception_resnet_v1", "model.embedding_dim": 128,
                          "model.bn_scale": True, "model.input_norm": "fixed_standardization",
                          "data.image_size": 80, "model.init_from": str(imported[0])})
    model, (tx, _) = build_model(config, bn_axis_name=None), build_optimizer(config)
    with pytest.raises(ValueError, match=r"EmbeddingHead_0/embedding/kernel: shape \(1792, 512\)"):
        finetune.initial_state(config, model, tx, resuming=False)
    config.model.embedding_dim = 512
    config.model.input_norm = "symmetric"
    with pytest.raises(ValueError, match="trained with 'fixed_standardization'"):
        finetune.initial_state(config, model, tx, resuming=False)


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        pretrained.read_state_dict(tmp_path / "nope.pt")
