"""`kiln finetune image`: labelled images -> a Vision Transformer classifier, evaluated; `kiln eval`, `kiln predict`.

    kiln finetune image configs/vit-fashion-mnist.yaml
    kiln finetune image --data.train photos/ --init google-vit-folder/

The task on the shared driver (kiln.tasks.driver): read the images (kiln.data.images: a class-per-folder tree,
IDX files, a CSV; converted and resized to the model's size) and split them (stratified, seeded) -> the backbone:
kiln's Transformer with a patch embedding (model.channels > 0), from scratch (the model section), from a kiln
run, or from a Hugging Face ViT folder imported into <run>/base (a ViTForImageClassification's head is kept when
its labels are these) -> kiln.model.heads.ImageClassifier -> cross-entropy (label smoothing), batches with
seeded crop/flip augmentation -> best checkpoint by a val metric -> test metrics, confusion matrix and a grid
of misclassified images (kiln.eval.images).

Run folder: image.yaml, run.json (kind image; labels, pooling, normalisation, image size, channels), data.json,
checkpoints/, eval/ (val.json, test.json, summary.json + PNGs), metrics.csv, plots/, log.txt, base/.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from kiln.config import load_config
from kiln.data import images as imdata
from kiln.data.images import CONFIG_FILE, ImageBatches, ImageConfig
from kiln.errors import KilnError
from kiln.eval.classification import val_metrics
from kiln.eval.images import predict_probs, report
from kiln.model.heads import ImageClassifier
from kiln.tasks.base import Data, EpochTask, Prepared, eval_batch_size
from kiln.tasks.backbone import is_hf_folder, resolve_init

TEXT_ONLY = ("vocab_size", "n_decoder_layer", "context_length", "rope_theta", "embedding_norm", "mlm_head",
             "tie_embeddings", "type_vocab_size", "pad_token_id", "embed_scale", "sinusoid_layout", "head_bias")


class ImageObjective:
    """Cross-entropy (a SUM over the batch's images; optional label smoothing) of the classifier's logits."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def targets(self, batch) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch):
        logits = model(batch["pixel_values"]).float()
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing, reduction="sum")


class ImageTask(EpochTask):
    name, config_cls, config_file = "image", ImageConfig, CONFIG_FILE
    usage = ("kiln finetune image [CONFIG.yaml] --data.train FOLDER|IDX|CSV [--init RUN_OR_HF_DIR] "
             "[--section.key VALUE ...]")
    example = "configs/vit-fashion-mnist.yaml"
    batch_unit = "images"
    time_budget_minutes = staticmethod(lambda cfg: cfg.time_budget)

    def shows(self, flag: str) -> bool:  # a ViT from scratch: the model keys show, less the text-only ones
        return not (flag.startswith("--model.") and flag[8:] in TEXT_ONLY)

    def check(self, cfg: ImageConfig) -> None:
        d = cfg.data
        if bool(d.mean) != bool(d.std) or (d.mean and len(d.mean) != len(d.std)):
            raise KilnError(f"data.mean {d.mean} and data.std {d.std}: give both, one value per channel")
        if any(float(s) <= 0 for s in d.std):
            raise KilnError(f"data.std must be > 0, got {d.std}")

    def read(self, cfg: ImageConfig, log) -> Data:
        d = cfg.data
        if not d.train:
            raise KilnError("data.train is empty: name the training images (--data.train FOLDER, IDX file or CSV)")
        init_model = _init_model(cfg) if cfg.init else None
        m = init_model or cfg.model
        given = {name: imdata.scan(getattr(d, name), d.label_names) for name in ("train", "val", "test")
                 if getattr(d, name)}
        for name, items in given.items():
            if items.skipped:
                log(f"{items.path}: skipped {items.skipped} file(s) that are not images by their extension")
        train = given["train"]
        if d.limit and d.limit < len(train):
            train = given["train"] = train.subset(range(d.limit))
        if init_model is not None:
            size, channels = init_model.image_size, init_model.channels
        else:
            size, channels = imdata.target_shape(train, m.image_size, m.channels, m.patch_size, log)
        labels = [str(x) for x in d.label_names] if d.label_names else _sorted_labels(train.labels)
        if len(set(train.labels)) < 2:
            raise KilnError(f"{d.train}: a classifier needs at least 2 labels; found {len(set(train.labels))}")
        for name, items in given.items():
            _label_ids(items, labels, f"data.{name}")
        split_seed = cfg.seed if d.split_seed < 0 else d.split_seed
        tr, va, te = imdata.stratified_split(train.labels, 0.0 if "val" in given else d.val_fraction,
                                             0.0 if "test" in given else d.test_fraction, split_seed)
        sets = {"train": train.subset(tr), "val": given.get("val", train.subset(va)),
                "test": given.get("test", train.subset(te))}
        splits, cut = {}, len(va) + len(te) > 0
        for name, items in sets.items():
            what = f"{items.path}" + (f" ({name} split)" if name not in given or (name == "train" and cut) else "")
            pixels = imdata.load_pixels(items, size, channels, log, what) if len(items) else \
                np.zeros((0, size, size, channels), np.uint8)
            splits[name] = (pixels, _label_ids(items, labels, name), items.sources)
        counts = {n: {"n": len(s[1]), "labels": {lab: int((s[1] == i).sum()) for i, lab in enumerate(labels)}}
                  for n, s in splits.items()}
        log("splits: " + ", ".join(f"{n} {c['n']}" for n, c in counts.items()) + f"; {len(labels)} classes; images "
            f"{size}x{size}x{channels}")
        rep = {"files": {n: getattr(d, n) for n in given}, "splits": counts, "image_size": size, "channels": channels}
        return Data(splits, rep, {"labels": labels, "init_model": init_model, "size": size, "channels": channels})

    def prepare(self, cfg: ImageConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        labels, size, channels = data.extra["labels"], data.extra["size"], data.extra["channels"]
        backbone, head, norm, info = _backbone(cfg, run_dir, size, channels, log)
        cfg.model = copy.deepcopy(backbone.config)
        model = ImageClassifier(backbone, len(labels), cfg.pooling, cfg.head_dropout)
        if head is not None:
            if list(head["labels"]) == labels:
                model.head.load_state_dict(head["state"])
                log(f"head: the init's classifier (the same {len(labels)} labels)")
            else:
                log(f"head: new ({len(labels)} labels; the init's head has {len(head['labels'])} other labels)")
        (x_tr, y_tr, _), (x_va, y_va, _) = data.splits["train"], data.splits["val"]
        if cfg.data.mean:
            mean, std, how = [float(v) for v in cfg.data.mean], [float(v) for v in cfg.data.std], "data.mean/std"
        elif norm is not None:
            (mean, std), how = norm, "the init's"
        else:
            (mean, std), how = imdata.channel_stats(x_tr), "the training split's"
        if len(mean) == 1 < channels:
            mean, std = mean * channels, std * channels
        if len(mean) != channels:
            raise KilnError(f"normalisation ({how}) has {len(mean)} channel(s), the model takes {channels}")
        log(f"pixels: (x / 255 - {mean}) / {std} ({how})")
        a = cfg.augment
        if a.crop_padding or a.flip:
            log("augmentation: " + ", ".join(([f"random crop (padding {a.crop_padding})"] if a.crop_padding else [])
                                             + (["horizontal flip"] if a.flip else [])) + ", anew every step")
        batches = ImageBatches(x_tr, y_tr, cfg.train.batch_size, cfg.seed, mean, std, a.crop_padding, a.flip)
        eval_bs = eval_batch_size(cfg, least=64)
        evaluate = None
        if len(y_va):
            def evaluate(m):
                return val_metrics(predict_probs(m, x_va, mean, std, eval_bs, device), y_va, len(labels))
        meta = {"labels": labels, "pooling": model.pooling, "mean": mean, "std": std, "image_size": size,
                "channels": channels}
        data.report["init"] = info
        mc = cfg.model
        stem = model.backbone.config.stem_channels
        notes = [f"ViT {mc.n_layer}x{mc.d_model}, "
                 + (f"convolutional stem {list(stem)} (3x3, stride 2), " if stem else "")
                 + f"patch {mc.patch_size} on {size}x{size}x{channels} "
                 f"({(size // mc.patch_size) ** 2} patches) ({info['kind']}{': ' + cfg.init if cfg.init else ''})",
                 f"pooling {model.pooling}", f"{len(labels)} classes"]
        return Prepared(model, ImageObjective(cfg.label_smoothing), batches.batch, len(y_tr), evaluate, cfg.metric,
                        meta, notes=notes, state={"splits": data.splits, "eval_bs": eval_bs, "device": device})

    def summary(self, result: dict, trainer) -> dict:
        return {"examples_seen": result["tokens"], "examples_per_second": result["tokens"] / max(trainer.train_seconds, 1e-9)}

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        from kiln.eval.classification import metrics_table

        st, meta = prep.state, prep.meta
        results = {}
        for name in ("val", "test"):
            x, y, _ = st["splits"][name]
            if not len(y):
                continue
            probs = predict_probs(model, x, meta["mean"], meta["std"], st["eval_bs"], st["device"])
            m = report(x, y, probs, meta["labels"], run_dir / "eval", name, {"checkpoint": str(ckpt)})
            results[name] = {k: m[k] for k in ("accuracy", "macro_f1", "micro_f1", "weighted_f1") if k in m}
            if name == "test":
                log(f"test set ({len(y)} images, checkpoint {ckpt.name}):\n" + metrics_table(m))
        return results

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        """(ImageClassifier, ImageConfig, labels, run.json) of an image run."""
        return load_image_run(run_dir, which, device)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        from kiln.eval.classification import metrics_table

        model, cfg, labels, info = load_image_run(run_dir, which)
        x, y, items = _read_for(file, cfg, info, labels, True, log)
        probs = predict_probs(model, x, info["mean"], info["std"])
        out = Path(out) if out else Path(run_dir) / "eval" / f"{_stem(file)}.json"
        m = report(x, y, probs, labels, out.parent, out.stem, {"file": str(file), "run": str(run_dir)})
        log(f"{file}: {len(y)} image(s)\n" + metrics_table(m))
        log(f"wrote {out} (+ {out.stem}_confusion.png, {out.stem}_misclassified.png)")
        return m

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        model, cfg, labels, info = load_image_run(run_dir, which)
        x, y, items = _read_for(file, cfg, info, labels, False, log)
        probs = predict_probs(model, x, info["mean"], info["std"])
        out = Path(out) if out else Path(run_dir) / "predictions" / f"{_stem(file)}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        has_label = y is not None
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image"] + (["label"] if has_label else []) + ["prediction"] + [f"p_{n}" for n in labels])
            for i, p in enumerate(probs):
                w.writerow([items.sources[i]] + ([labels[y[i]]] if has_label else []) + [labels[int(p.argmax())]]
                           + [f"{v:.6f}" for v in p])
        log(f"wrote {len(probs)} prediction(s) to {out}")
        return out


TASK = ImageTask()


def _sorted_labels(found) -> list[str]:
    names = {x for x in found if x is not None}
    return sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)


def _label_ids(items, labels: list[str], what: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(labels)}
    for lab, src in zip(items.labels, items.sources):
        if lab is not None and lab not in index:
            raise KilnError(f"{items.path}: label {lab!r} ({src}) is not one of the {len(labels)} classes of "
                            f"{'the training data' if what != 'data.train' else 'data.label_names'} ({', '.join(labels)})")
    return np.array([index[lab] if lab is not None else -1 for lab in items.labels], dtype=np.int64)


def _stem(file) -> str:
    return Path(str(file).rstrip("/")).name.removesuffix(".gz").rsplit(".", 1)[0] if Path(file).is_file() \
        else Path(str(file).rstrip("/")).name


def _read_for(file, cfg: ImageConfig, info: dict, labels: list[str], require_label: bool, log):
    """(uint8 images, label ids or None, items) of a file, as the run's model takes them."""
    items = imdata.scan(file, cfg.data.label_names, require_label=require_label)
    x = imdata.load_pixels(items, info["image_size"], info["channels"], log)
    has = all(lab is not None for lab in items.labels)
    return x, (_label_ids(items, labels, str(file)) if has else None), items


def _init_model(cfg: ImageConfig):
    """The ModelConfig of `init` (read without its weights: every input error before the run folder exists)."""
    from kiln.interop.hf import _read_json, family_of
    from kiln.interop import vit
    from kiln.run.folder import read_run_json

    path = Path(cfg.init).expanduser()
    if not path.exists():
        raise KilnError(f"init not found: {path}")
    if is_hf_folder(path):
        h = _read_json(path / "config.json")
        if family_of(h, str(path / "config.json")) is not vit:
            raise KilnError(f"init {path} is a {h.get('model_type')} model; kiln finetune image starts from a ViT")
        return vit.config_from_hf(h)
    kind = read_run_json(path).get("kind")
    if kind == "image":
        return load_config(path / CONFIG_FILE, cls=ImageConfig).model
    from kiln.run.load import load_run_config

    model = load_run_config(path).model if kind == "pretrain" else None
    if model is None or not model.channels:
        raise KilnError(f"init {path} is a {'text model' if model is not None else kind + ' run'}; kiln finetune image "
                        "starts from an image model (a kiln image run, a ViT backbone or a Hugging Face ViT folder)")
    return model


def _backbone(cfg: ImageConfig, run_dir: Path, size: int, channels: int, log):
    """(backbone, the init's head {labels, state} or None, the init's (mean, std) or None, info)."""
    from kiln.interop import vit
    from kiln.model.transformer import Transformer
    from kiln.run.folder import read_run_json
    from kiln.run.load import load

    if not cfg.init:
        m = cfg.model.with_(image_size=size, channels=channels)
        return Transformer(m), None, None, {"kind": "scratch"}
    source = Path(cfg.init).expanduser()
    norm = vit._normalization(source) if is_hf_folder(source) else None
    path, which, info = resolve_init(cfg.init, cfg.init_checkpoint, run_dir, log)
    if read_run_json(path).get("kind") == "image":
        model, _, labels, run_info = load_image_run(path, which)
        head = {"labels": labels, "state": model.head.state_dict()}
        return model.backbone.train(), head, norm or (run_info["mean"], run_info["std"]), info
    backbone, _, _ = load(path, which, quantized_ok=False)
    return backbone.train(), None, norm or vit._normalization(path), info


def load_image_run(run_dir, which: str = "best", device: str = "cpu"):
    """(ImageClassifier, ImageConfig, labels, run.json) of a `kiln finetune image` run (or an imported
    ViTForImageClassification)."""
    from kiln.run.checkpoint import find_checkpoint, load_weights
    from kiln.run.folder import read_run_json
    from kiln.run.load import build_model

    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    if info.get("kind") != "image" or not (run_dir / CONFIG_FILE).is_file():
        raise KilnError(f"{run_dir} is not an image classifier run (kind {info.get('kind')!r}, no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE, cls=ImageConfig)
    ckpt = find_checkpoint(which) if which not in ("best", "latest") else find_checkpoint(run_dir, which)
    model = ImageClassifier(build_model(cfg.model, device), len(info["labels"]), info["pooling"], cfg.head_dropout)
    load_weights(model.to(device), ckpt / "model.safetensors")
    return model.eval(), cfg, list(info["labels"]), info
