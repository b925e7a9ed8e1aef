"""Image classification with a Vision Transformer (`kiln finetune image`): the readers (image folders, IDX as
Fashion-MNIST ships it, CSV) and their one-line errors through the CLI, seeded augmentation, the patch embedding
on kiln's one encoder, the pipeline end to end (a tiny ViT learns; eval/predict; the misclassified grid), HF
ViT import/export parity (ViTForImageClassification and ViTModel, logits within 1e-4 both ways) and --init from
an HF folder.

Images are generated in the test or come from tests/assets (200 + 100 Fashion-MNIST images, MIT): no network.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ASSETS, ROOT, assert_user_error as user_error
from kiln.cli import main
from kiln.data import images as imdata
from kiln.errors import KilnError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

FM_TRAIN = ASSETS / "fashion_mnist_train-images-idx3-ubyte.gz"
FM_TEST = ASSETS / "fashion_mnist_test-images-idx3-ubyte.gz"
FAST = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false", "--train.log_every", "5",
        "--seed", "0"]
TINY = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--model.d_ff", "64"]
TOL = 1e-4


def pattern(label: str, size: int, rng, rgb: bool = False):
    """A PIL image of class 'top' (bright upper half) or 'bottom' (bright lower half), with noise."""
    from PIL import Image

    a = rng.integers(0, 60, (size, size)).astype(np.uint8)
    half = slice(0, size // 2) if label == "top" else slice(size // 2, size)
    a[half] = rng.integers(180, 255, a[half].shape)
    if rgb:
        return Image.fromarray(np.stack([a, a // 2, 255 - a], -1), "RGB")
    return Image.fromarray(a, "L")


def image_folder(root: Path, n: int = 24, size: int = 12, seed: int = 0, odd: bool = False) -> Path:
    """root/{top,bottom}/*.png; odd=True adds an RGB image and one of another size (converted and resized)."""
    rng = np.random.default_rng(seed)
    for label in ("top", "bottom"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            pattern(label, size, rng).save(root / label / f"{i}.png")
        if odd:
            pattern(label, size, rng, rgb=True).save(root / label / "rgb.png")
            pattern(label, 2 * size, rng).save(root / label / "big.jpg")
    (root / "top" / "notes.txt").write_text("not an image\n")
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def finetune(*args) -> int:
    return main(["finetune", "image", *map(str, args), *FAST])


# ----------------------------------------------------------------------------------------------- readers


def test_idx_files_gzipped_or_not_and_the_fashion_mnist_subset(tmp_path):
    items = imdata.scan(FM_TRAIN)
    assert len(items) == 200 and items.kind == "idx" and items.idx.shape == (200, 28, 28)
    assert sorted(set(items.labels), key=int) == [str(i) for i in range(10)]
    raw = np.arange(3 * 4 * 4).reshape(3, 4, 4) % 256
    write_idx(tmp_path / "x-images-idx3-ubyte", raw, gz=False)
    write_idx(tmp_path / "x-labels-idx1-ubyte", np.array([0, 1, 1]), gz=False)
    it = imdata.scan(tmp_path)  # a folder holding one IDX pair
    assert it.labels == ["0", "1", "1"] and np.array_equal(imdata.load_pixels(it, 4, 1)[..., 0], raw)
    named = imdata.scan(tmp_path / "x-images-idx3-ubyte", label_names=["shirt", "shoe"])
    assert named.labels == ["shirt", "shoe", "shoe"]
    rgb = imdata.load_pixels(it, 8, 3)  # converted to RGB and resized
    assert rgb.shape == (3, 8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_folder_and_csv_mixed_sizes_and_modes_are_converted_and_resized(tmp_path):
    root = image_folder(tmp_path / "imgs", n=3, odd=True)
    items = imdata.scan(root)
    assert len(items) == 10 and items.skipped == 1 and set(items.labels) == {"top", "bottom"}
    lines = []
    size, channels = imdata.target_shape(items, 0, 0, 4, lines.append)
    assert (size, channels) == (12, 3)  # most images are 12x12; one is RGB
    x = imdata.load_pixels(items, 12, 1, lines.append)
    assert x.shape == (10, 12, 12, 1)
    assert any("2 resized to 12x12" in line and "2 converted to grayscale" in line for line in lines), lines
    csv_file = tmp_path / "imgs" / "list.csv"
    csv_file.write_text("path,label\ntop/0.png,top\nbottom/1.png,bottom\n")
    c = imdata.scan(csv_file)
    assert c.labels == ["top", "bottom"] and imdata.load_pixels(c, 12, 1).shape == (2, 12, 12, 1)


def test_split_is_stratified_and_seeded():
    labels = ["a"] * 50 + ["b"] * 30
    tr, va, te = imdata.stratified_split(labels, 0.1, 0.2, seed=3)
    assert sorted(tr + va + te) == list(range(80)) and not set(tr) & set(va) | set(va) & set(te)
    assert [labels[i] for i in va].count("a") == 5 and [labels[i] for i in te].count("b") == 6
    assert imdata.stratified_split(labels, 0.1, 0.2, seed=3) == [tr, va, te]


def test_batches_are_a_pure_function_of_seed_and_index_augmentation_included():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (50, 8, 8, 1)).astype(np.uint8)
    y = np.arange(50) % 3
    a = imdata.ImageBatches(x, y, 8, seed=1, mean=[0.5], std=[0.25], crop_padding=2, flip=True)
    b = imdata.ImageBatches(x, y, 8, seed=1, mean=[0.5], std=[0.25], crop_padding=2, flip=True)
    for i in (9, 0, 9, 17):  # any order, as a resume would ask for them
        assert torch.equal(a.batch(i)["pixel_values"], b.batch(i)["pixel_values"])
    assert a.batch(0)["pixel_values"].shape == (8, 1, 8, 8)
    assert not torch.equal(a.batch(0)["pixel_values"], a.batch(7)["pixel_values"])  # epoch 1: new order, new crops
    plain = imdata.ImageBatches(x, y, 8, seed=1, mean=[0.5], std=[0.25])
    assert not torch.equal(a.batch(3)["pixel_values"], plain.batch(3)["pixel_values"])
    img = np.zeros((1, 4, 4, 1), np.uint8)
    img[0, :, 0] = 255  # a bright left column
    flips = [imdata.augment(img, np.random.default_rng(s), 0, True)[0, :, :, 0] for s in range(8)]
    assert any(f[:, 3].all() and not f[:, 0].any() for f in flips) and any(f[:, 0].all() for f in flips)


def test_bad_inputs_are_one_line_errors_through_the_cli_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("x")
    user_error(capsys, ["finetune", "image", "--data.train", empty, "--out", out], str(empty / "cat"), "no images")
    (tmp_path / "none").mkdir()
    user_error(capsys, ["finetune", "image", "--data.train", tmp_path / "none", "--out", out], "no images")
    root = image_folder(tmp_path / "imgs", n=2)
    (root / "top" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    user_error(capsys, ["finetune", "image", "--data.train", root, "--out", out], "broken.png", "cannot read the image")
    write_idx(tmp_path / "d-images-idx3-ubyte.gz", np.zeros((5, 4, 4)))
    write_idx(tmp_path / "d-labels-idx1-ubyte.gz", np.zeros(4))
    user_error(capsys, ["finetune", "image", "--data.train", tmp_path / "d-images-idx3-ubyte.gz", "--out", out],
               "d-labels-idx1-ubyte.gz", "4 labels", "5 images")
    (tmp_path / "t-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not gzip")
    user_error(capsys, ["finetune", "image", "--data.train", tmp_path / "t-images-idx3-ubyte.gz", "--out", out],
               "t-images-idx3-ubyte.gz", "cannot read")
    write_idx(tmp_path / "w-images-idx3-ubyte", np.zeros(7), gz=False)  # a labels file named as images
    user_error(capsys, ["finetune", "image", "--data.train", tmp_path / "w-images-idx3-ubyte", "--out", out],
               "not an IDX images (idx3) file")
    bad_csv = tmp_path / "l.csv"
    bad_csv.write_text("path,label\nnope.png,cat\n")
    user_error(capsys, ["finetune", "image", "--data.train", bad_csv, "--out", out], "l.csv:2", "nope.png", "not found")
    (root / "top" / "broken.png").unlink()
    user_error(capsys, ["finetune", "image", "--data.train", root, "--data.test", FM_TEST, "--out", out],
               "label '9'", "not one of the 2 classes")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- model


def test_patch_embedding_is_a_strided_convolution_on_the_one_encoder():
    import torch.nn.functional as F

    from kiln.model.config import ModelConfig
    from kiln.model.heads import ImageClassifier
    from kiln.model.transformer import Transformer

    cfg = ModelConfig(arch="encoder", channels=3, image_size=8, patch_size=4, d_model=16, n_head=2, n_layer=1)
    model = Transformer(cfg)
    assert model.lm_head is None and cfg.context_length == 5 and not cfg.tie_embeddings
    x = torch.randn(2, 3, 8, 8)
    emb = model.decoder.embed
    conv = F.conv2d(x, emb.proj.weight.view(16, 3, 4, 4), emb.proj.bias, stride=4).flatten(2).transpose(1, 2)
    with torch.no_grad():
        want = torch.cat([emb.cls_token.expand(2, 1, 16), conv], 1) + emb.positions.weight
        assert torch.allclose(emb(x), want, atol=1e-6)
        assert model.encode(x).shape == (2, 5, 16) and torch.equal(model(x), model.encode(x))
    sincos = Transformer(cfg.with_(position="sinusoidal", class_token=False))
    assert sincos.encode(x).shape == (2, 4, 16) and "decoder.embed.positions.weight" not in sincos.state_dict()
    head = ImageClassifier(sincos, 5)
    assert head.pooling == "mean" and head(x).shape == (2, 5)
    with pytest.raises(KilnError, match="class token"):
        ImageClassifier(sincos, 5, "cls")
    with pytest.raises(KilnError, match="multiple of model.patch_size"):
        Transformer(cfg.with_(image_size=10))
    with torch.device("meta"):  # the recipe's model, built without memory, on a Fashion-MNIST-sized batch
        from kiln.config import load_config
        from kiln.data.images import ImageConfig

        recipe = load_config(ROOT / "configs" / "vit-fashion-mnist.yaml", cls=ImageConfig)
        size = recipe.model.image_size or 28  # the recipe may resize Fashion-MNIST's 28x28 for its stem
        m = recipe.model.with_(channels=1, image_size=size)
        logits = ImageClassifier(Transformer(m), len(recipe.data.label_names))(torch.zeros(4, 1, size, size))
    assert logits.shape == (4, 10) and m.context_length == (size // m.patch_size) ** 2  # no class token


def test_a_convolutional_stem_feeds_the_patchify_and_its_statistics_are_the_checkpointed_ones():
    """model.stem_channels: 3x3 stride-2 conv -> BatchNorm -> GELU per width, then the linear patchify on the feature
    map, written out here with torch.nn.functional; BatchNorm runs in fp32 under bf16 autocast and in a bf16
    weight copy (train.bf16_weights), whose running statistics are the master model's tensors; kernels go to
    AdamW, not Muon; export to HF's ViT refuses it."""
    import torch.nn.functional as F

    from kiln.interop.vit import config_to_hf
    from kiln.model.config import ModelConfig
    from kiln.model.transformer import Transformer
    from kiln.train.bf16 import bf16_copy
    from kiln.train.optim import _hidden_matrices

    cfg = ModelConfig(arch="encoder", channels=1, image_size=8, patch_size=4, d_model=16, n_head=2, n_layer=1,
                      position="sinusoidal", class_token=False, stem_channels=[4, 6])
    torch.manual_seed(0)
    model = Transformer(cfg)
    emb = model.decoder.embed
    c1, bn1, c2, bn2 = emb.stem[0], emb.stem[1], emb.stem[3], emb.stem[4]
    assert c1.weight.shape == (4, 1, 3, 3) and c2.weight.shape == (6, 4, 3, 3) and emb.proj.in_features == 6
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        bn1.running_mean.normal_(), bn1.running_var.uniform_(0.5, 2)  # eval: the running statistics are used
        h = F.gelu(F.batch_norm(F.conv2d(x, c1.weight, stride=2, padding=1), bn1.running_mean, bn1.running_var,
                                bn1.weight, bn1.bias, eps=bn1.eps))
        h = F.gelu(F.batch_norm(F.conv2d(h, c2.weight, stride=2, padding=1), bn2.running_mean, bn2.running_var,
                                bn2.weight, bn2.bias, eps=bn2.eps))  # [5, 6, 2, 2]: 1x1 patches of 6 channels
        want = emb.proj(h.flatten(2).transpose(1, 2)) + emb._sincos(x.device, x.dtype)
        assert torch.allclose(emb(x), want, atol=1e-5)
    model.train()
    before = bn2.running_mean.clone()
    twin = bf16_copy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encode(x).shape == (5, 4, 16)  # fp32 weights, bf16 autocast
    assert twin.encode(x.bfloat16()).dtype == torch.bfloat16  # bf16 weights
    assert twin.decoder.embed.stem[4].running_mean is bn2.running_mean and not bn2.running_mean.equal(before)
    assert int(bn2.num_batches_tracked) == 2 and "decoder.embed.stem.4.running_var" in model.state_dict()
    hidden, adamw, _ = _hidden_matrices(model, list(model.named_parameters()))
    assert {id(c1.weight), id(c2.weight)} <= {id(p) for p in adamw} and all(p.dim() == 2 for p in hidden)
    with pytest.raises(KilnError, match="stem_channels"):
        config_to_hf(cfg.with_(position="learned", class_token=True))
    for bad, match in (([4, 6, 8], "patch_size divisible by 8"), ([0], "positive whole numbers")):
        with pytest.raises(KilnError, match=match):
            Transformer(cfg.with_(stem_channels=bad))


# ----------------------------------------------------------------------------------------------- end to end


def test_finetune_eval_predict_end_to_end(tmp_path, capsys):
    root = image_folder(tmp_path / "train", n=24, odd=True)
    held = image_folder(tmp_path / "held", n=6, seed=5)
    run = tmp_path / "run"
    assert finetune("--data.train", root, "--out", run, *TINY, "--train.batch_size", "8", "--epochs", "6",
                    "--train.lr", "3e-3", "--augment.crop_padding", "1", "--data.val_fraction", "0.2",
                    "--data.test_fraction", "0.2") == 0
    log = (run / "log.txt").read_text()
    assert "model.channels 3 (RGB training images)" in log and "augmentation: random crop" in log  # one is RGB
    assert "(train split): 2 resized to 12x12 (bilinear) and 31 converted to RGB of 32 images" in log, log
    assert log.count("skipped 1 file(s) that are not images") == 1
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "image" and info["labels"] == ["bottom", "top"] and info["channels"] == 3
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.9, summary
    for f in ("test_confusion.png", "test_misclassified.png", "val.json"):
        assert (run / "eval" / f).is_file() or f == "test_misclassified.png"  # nothing wrong: no grid
    capsys.readouterr()
    assert main(["eval", str(run), str(held)]) == 0
    m = json.loads((run / "eval" / "held.json").read_text())
    assert m["n"] == 12 and m["accuracy"] >= 0.9 and len(m["confusion_matrix"]) == 2
    assert main(["predict", str(run), str(held / "top")]) == 0  # a folder of images without classes
    rows = (run / "predictions" / "top.csv").read_text().splitlines()
    assert rows[0] == "image,prediction,p_bottom,p_top" and len(rows) == 7
    assert sum(r.split(",")[1] == "top" for r in rows[1:]) >= 5
    user_error(capsys, ["eval", run, held / "top"], "no labels")


def test_fashion_mnist_subset_learns_and_the_misclassified_grid(tmp_path, capsys):
    run = tmp_path / "fm"
    simple_vit = ["--model.patch_size", "7", "--model.class_token", "false", "--model.position", "sinusoidal"]
    assert finetune("--data.train", FM_TRAIN, "--data.test", FM_TEST, "--out", run, *simple_vit, "--model.n_layer", "2",
                    "--model.d_model", "64", "--model.n_head", "2", "--model.d_ff", "128", "--train.batch_size", "20",
                    "--epochs", "8", "--train.lr", "3e-3", "--data.val_fraction", "0.1", "--augment.crop_padding", "2",
                    "--augment.flip", "true") == 0
    test = json.loads((run / "eval" / "test.json").read_text())
    assert test["n"] == 100 and test["accuracy"] >= 0.3, test["accuracy"]  # chance 0.1; 0.39 measured (180 images)
    grid = test["misclassified_png"]
    assert grid and Path(grid).is_file()
    from PIL import Image

    assert Image.open(grid).size[0] > 500
    capsys.readouterr()
    assert main(["eval", str(run), str(FM_TEST)]) == 0
    assert (run / "eval" / "fashion_mnist_test-images-idx3-ubyte_misclassified.png").is_file()


def test_a_stem_run_exports_to_onnx_and_onnxruntime_predicts_what_kiln_predicts(tmp_path, capsys):
    """`kiln export onnx` of an image run with a convolutional stem (its one export route: HF's ViT has no stem):
    onnxruntime's logits equal kiln's on random images (report.json), and fed the held-out PNGs normalised as
    kiln-onnx.json says, onnxruntime picks the classes `kiln predict` wrote."""
    import onnxruntime as ort
    from PIL import Image

    root, held = image_folder(tmp_path / "train", n=16), image_folder(tmp_path / "held", n=4, seed=3)
    run, out = tmp_path / "run", tmp_path / "onnx"
    assert finetune("--data.train", root, "--out", run, "--model.patch_size", "4", "--model.stem_channels", "[4, 8]",
                    "--model.n_layer", "1", "--model.d_model", "16", "--model.n_head", "2", "--model.d_ff", "32",
                    "--train.batch_size", "8", "--epochs", "3", "--train.lr", "3e-3", "--data.val_fraction", "0.25",
                    "--data.test_fraction", "0") == 0
    user_error(capsys, ["export", "hf", run, tmp_path / "hf"], "stem_channels")  # HF's ViT cannot hold it
    assert main(["export", "onnx", str(run), str(out), "--int8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["fp32"]["max_abs_diff"] < TOL and report["parity"]["fp32"]["argmax_agreement"] == 1.0
    meta = json.loads((out / "kiln-onnx.json").read_text())
    assert meta["inputs"] == ["pixel_values"] and meta["labels"] == ["bottom", "top"] and meta["image_size"] == 12
    assert main(["predict", str(run), str(held / "top")]) == 0
    rows = [r.split(",") for r in (run / "predictions" / "top.csv").read_text().splitlines()[1:]]
    mean, std = np.array(meta["mean"], np.float32), np.array(meta["std"], np.float32)
    x = np.stack([(np.asarray(Image.open(held / "top" / Path(r[0]).name), np.float32)[None] / 255 - mean[:, None, None])
                  / std[:, None, None] for r in rows])
    logits = ort.InferenceSession(str(out / "model.onnx")).run(None, {"pixel_values": x.astype(np.float32)})[0]
    assert [meta["labels"][i] for i in logits.argmax(-1)] == [r[1] for r in rows]
    int8 = ort.InferenceSession(str(out / "model.int8.onnx")).run(None, {"pixel_values": x.astype(np.float32)})[0]
    assert int8.shape == logits.shape and "int8" in report["parity"]  # int8 weights: close, not equal


# ----------------------------------------------------------------------------------------------- HF interop


def _hf_vit(path: Path, cls: str, labels=None, seed: int = 0, channels: int = 3, size: int = 8):
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kw = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}) if labels else {}
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=size, patch_size=4, num_channels=channels, hidden_act="gelu", **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF inits biases at 0 and norms at 1, which would hide a swapped name
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return model


def test_vit_classifier_import_export_parity(tmp_path, capsys):
    import transformers
    from kiln.interop.hf import export_hf
    from kiln.tasks.images import load_image_run

    ref = _hf_vit(tmp_path / "hf", "ViTForImageClassification", labels=["cat", "dog", "eel"])
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, cfg, labels, info = load_image_run(tmp_path / "run")
    assert labels == ["cat", "dog", "eel"] and info["kind"] == "image" and cfg.model.channels == 3
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x)
        assert (got - ref(x).logits).abs().max().item() <= TOL
        out = export_hf(tmp_path / "run", tmp_path / "export")
        back = transformers.ViTForImageClassification.from_pretrained(out).eval()
        assert (back(x).logits - got).abs().max().item() <= TOL
        assert back.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    capsys.readouterr()
    user_error(capsys, ["import", "hf", tmp_path / "hf", tmp_path / "run"], "already holds a kiln run")


def test_vit_backbone_import_export_parity(tmp_path):
    import transformers
    from kiln.api import load
    from kiln.interop.hf import export_hf, import_hf

    ref = _hf_vit(tmp_path / "hf", "ViTModel")
    model, tok, cfg = load(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert tok is None and cfg.model.pooler and cfg.model.channels == 3 and cfg.model.image_size == 8
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x)
        h = model.encode(x)
        assert (h - want.last_hidden_state).abs().max().item() <= TOL
        assert (model.pooler(h) - want.pooler_output).abs().max().item() <= TOL
        back = transformers.ViTModel.from_pretrained(export_hf(tmp_path / "run", tmp_path / "export")).eval()(x)
        assert (back.last_hidden_state - h).abs().max().item() <= TOL
        assert (back.pooler_output - want.pooler_output).abs().max().item() <= TOL


def test_init_from_an_hf_vit_keeps_its_head_and_a_trained_run_exports(tmp_path, capsys):
    import transformers
    from kiln.interop.hf import export_hf
    from kiln.tasks.images import load_image_run

    _hf_vit(tmp_path / "hf", "ViTForImageClassification", labels=["bottom", "top"], channels=1, size=12)
    root = image_folder(tmp_path / "imgs", n=10)
    run = tmp_path / "run"
    assert finetune("--data.train", root, "--init", tmp_path / "hf", "--out", run, "--train.batch_size", "8",
                    "--epochs", "2", "--data.test_fraction", "0") == 0
    log = (run / "log.txt").read_text()
    assert "head: the init's classifier" in log and "(the init's)" in log  # preprocessor mean/std: 0.5 (HF default)
    assert (run / "base" / "image.yaml").is_file()
    model, cfg, labels, info = load_image_run(run)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        back = transformers.ViTForImageClassification.from_pretrained(export_hf(run, tmp_path / "exp")).eval()
        assert (back(x).logits - model(x)).abs().max().item() <= TOL
    capsys.readouterr()
    mean_run = tmp_path / "mean"
    assert finetune("--data.train", root, "--out", mean_run, *TINY, "--pooling", "mean", "--train.max_steps", "2") == 0
    user_error(capsys, ["export", "hf", mean_run, tmp_path / "e2"], "pools by 'mean'", "pooling cls")
    user_error(capsys, ["finetune", "image", "--data.train", root, "--init", tmp_path / "nope", "--out", tmp_path / "x"],
               "init not found")
    assert not (tmp_path / "x").exists()
