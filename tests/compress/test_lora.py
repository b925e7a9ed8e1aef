"""LoRA (train.lora.*): adapters on a frozen base for finetune classify and continued pretraining, int8 base
weights, checkpoints that hold only what trains (exact resume), `kiln merge`, and `kiln export peft` loaded by
the real Hugging Face PEFT onto the exported base with the same outputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, assert_user_error, run_until_crash
from kiln.cli import main
from kiln.config import ClassifyConfig, TrainConfig, load_config
from kiln.model.config import ModelConfig
from kiln.model.heads import SequenceClassifier
from kiln.model.lora import LoraLinear, LoraInt8Linear, LoraSpec, apply_lora, merge_state
from kiln.model.transformer import Transformer
from kiln.run.checkpoint import checkpoint_lora, find_checkpoint, load_weights
from kiln.run.load import build_model
from kiln.tasks.lm import run_pretrain
from task_data import save_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["good", "great", "superb", "lovely", "fine", "bad", "awful", "poor", "dull", "boring", "the", "movie",
         "was", "plot", "actors", "really", "quite", "and", "a", "story", "film", "long"]
LORA = ["--train.lora.rank", "4", "--train.lora.alpha", "8", "--train.lora.dropout", "0.1"]
FAST = ["--train.threads", "1", "--train.precision", "fp32", "--train.tensorboard", "false", "--train.log_every", "5",
        "--seed", "0"]


def write_reviews(path: Path, n: int) -> Path:
    """A bag-of-words sentiment task: a positive or negative word among filler words."""
    import csv
    import random

    rng = random.Random(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("label", "text"))
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            words = rng.sample(WORDS[10:], rng.randint(2, 4)) + [rng.choice(WORDS[:5] if i % 2 else WORDS[5:10])]
            rng.shuffle(words)
            w.writerow((label, " ".join(words)))
    return path


def encoder_backbone(path: Path, pooler: bool = False) -> Path:
    """A tiny BERT-shaped kiln run (exportable as `bert`): word-level tokenizer, 2 post-LN blocks."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    cfg = ModelConfig(arch="encoder", vocab_size=len(vocab), n_layer=2, n_head=2, d_model=16, context_length=32,
                      pre_norm=False, final_norm=False, embedding_norm=True, type_vocab_size=2, pad_token_id=0,
                      pooler=pooler)
    return save_backbone(path, tok, cfg)


def classify(tmp: Path, backbone: Path, name: str, *extra) -> Path:
    data = tmp / "reviews.csv"
    if not data.is_file():
        write_reviews(data, 120)
    code = main(["finetune", "classify", "--data.train", str(data), "--init", str(backbone), "--out", str(tmp / name),
                 "--data.max_length", "8", "--epochs", "3", "--train.batch_size", "8", "--train.lr", "2e-2",
                 *map(str, extra), *FAST])
    assert code == 0
    return tmp / name


def lora_classifier(run: Path) -> torch.nn.Module:
    """The run's classifier as it trained: the base with adapters (not merged), its checkpoint loaded exactly."""
    cfg = load_config(run / "classify.yaml", cls=ClassifyConfig)
    meta = json.loads((run / "labels.json").read_text())
    ckpt = find_checkpoint(run, "best")
    spec = checkpoint_lora(ckpt)
    model = SequenceClassifier(build_model(cfg.model), len(meta["labels"]), meta["pooling"], cfg.head_dropout)
    apply_lora(model, spec)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval()


def batch(vocab: int, n: int = 3, t: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (n, t), generator=g)
    return ids, torch.ones(n, t, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("int8", [False, True])
def test_adapter_starts_at_the_base_trains_alone_and_merges_exactly(int8):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=16, context_length=16)
    model = Transformer(cfg)
    ids = torch.randint(0, 40, (2, 9))
    plain = model(ids).detach()
    apply_lora(model, LoraSpec(rank=4, alpha=8.0, targets=("qkv_proj", "mlp.up_proj"), int8_base=int8))
    kinds = {type(model.get_submodule(f"decoder.blocks.{i}.{m}")) for i in (0, 1) for m in ("attn.qkv_proj", "mlp.up_proj")}
    assert kinds == {LoraInt8Linear if int8 else LoraLinear}
    model.eval()
    # B starts at zero: the adapted model is the base model (int8: up to its quantization)
    assert torch.allclose(model(ids), plain, atol=2e-2 if int8 else 1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"decoder.blocks.{i}.{m}.lora_{x}" for i in (0, 1) for m in ("attn.qkv_proj", "mlp.up_proj")
                         for x in "AB"}
    loss = model(ids, labels=ids)
    loss.backward()  # through the frozen (int8) layers to the adapters below them
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    lora_out = model(ids).detach()
    merged = build_model(cfg)
    merged.load_state_dict(merge_state(model.state_dict(), model.lora_spec), strict=False)
    from kiln.model.int8 import _native_bf16

    tol = 3e-2 if int8 and _native_bf16() else 1e-5  # the int8 kernel rounds its input to bf16 on such CPUs
    assert (merged.eval()(ids) - lora_out).abs().max() < tol


def test_muon_leaves_the_low_rank_matrices_to_adamw():
    from kiln.train.optim import build_optimizer

    model = Transformer(ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, context_length=16))
    apply_lora(model, LoraSpec(rank=2, alpha=4.0, trainable=("decoder.norm",)))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert [type(o).__name__ for o in opt.optimizers] == ["AdamW"]  # Muon got nothing: no empty optimizer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad} and len(in_opt) == 6


# ----------------------------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-clf")
    backbone = encoder_backbone(tmp / "backbone")
    run = classify(tmp, backbone, "run", *LORA)
    return tmp, backbone, run


def test_classifier_trains_only_adapters_and_head_and_stores_only_them(clf):
    tmp, backbone, run = clf
    log = (run / "log.txt").read_text()
    assert "LoRA: rank 4, alpha 8" in log and "+ head" in log
    ckpt = find_checkpoint(run, "best")
    names = set(load_file(str(ckpt / "model.safetensors")))
    adapted = {f"backbone.decoder.blocks.{i}.attn.{m}" for i in (0, 1) for m in ("qkv_proj", "out_proj")}
    assert names == {f"{m}.lora_{x}" for m in adapted for x in "AB"} | {"head.weight", "head.bias"}
    # the optimizer held those tensors only (Adam moments for each), and they moved
    state = torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"]["state"]
    assert set(state) == names
    trained = load_file(str(ckpt / "model.safetensors"))
    assert all(trained[f"{m}.lora_B"].abs().max() > 0 for m in adapted)
    # the base is stored once, beside the checkpoints: the init backbone untouched, the head as it started
    base = load_file(str(run / "lora/base.safetensors"))
    init = load_file(str(find_checkpoint(backbone) / "model.safetensors"))
    assert set(base) == {"backbone." + k for k in init} | {"head.weight", "head.bias"}
    assert all(torch.equal(base["backbone." + k], v) for k, v in init.items())
    assert not torch.equal(base["head.weight"], trained["head.weight"])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["trainable"] == ["head"]


def test_merge_gives_a_full_run_with_the_adapter_runs_outputs(clf, capsys):
    tmp, _, run = clf
    merged = tmp / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    capsys.readouterr()
    names = set(load_file(str(find_checkpoint(merged, "best") / "model.safetensors")))
    assert not any("lora" in n for n in names) and "backbone.decoder.blocks.0.attn.qkv_proj.weight" in names
    assert not (merged / "lora").exists()
    assert load_config(merged / "classify.yaml", cls=ClassifyConfig).train.lora.rank == 0
    # the merged weights compute what the adapters computed
    from kiln.tasks.classify_files import load_classifier

    m_model = load_classifier(merged)[0]
    ids, mask = batch(27)
    with torch.no_grad():
        a, b = lora_classifier(run)(ids, mask), m_model(ids, mask)
    assert (a - b).abs().max() < 1e-5, (a - b).abs().max()
    # both folders load and evaluate like any run: the same predictions, the run's own test accuracy
    outs = {}
    for name, folder in (("lora", run), ("merged", merged)):
        assert main(["eval", str(folder), str(tmp / "reviews.csv"), "--out", str(tmp / f"{name}.json")]) == 0
        outs[name] = json.loads((tmp / f"{name}.json").read_text())
    capsys.readouterr()
    assert outs["lora"]["accuracy"] == outs["merged"]["accuracy"]
    assert outs["lora"]["log_loss"] == pytest.approx(outs["merged"]["log_loss"], abs=1e-6)


@pytest.mark.parametrize("pooling", ["pooler", "mean"])
def test_peft_loads_the_exported_bert_classifier_adapters(tmp_path, capsys, pooling):
    import peft
    import transformers
    backbone = encoder_backbone(tmp_path / "backbone", pooler=pooling == "pooler")
    run = classify(tmp_path, backbone, "run", *LORA, "--pooling", pooling)
    out = tmp_path / "peft"
    assert main(["export", "peft", str(run), str(out)]) == 0
    capsys.readouterr()
    cfg = json.loads((out / "adapter_config.json").read_text())
    # kiln's fused qkv_proj is BERT's query, key and value: three adapters with the same A
    assert set(cfg["target_modules"]) == {f"encoder.layer.{i}.attention.{m}" for i in (0, 1)
                                          for m in ("self.query", "self.key", "self.value", "output.dense")}
    ids, mask = batch(27)
    with torch.no_grad():
        want = lora_classifier(run)(ids, mask)
        if pooling == "pooler":  # exactly BertForSequenceClassification; the head is PEFT's modules_to_save
            assert cfg["modules_to_save"] == ["classifier"]
            base = transformers.BertForSequenceClassification.from_pretrained(out / "base")
            got = peft.PeftModel.from_pretrained(base, out).eval()(input_ids=ids, attention_mask=mask).logits
        else:  # mean pooling has no transformers class: the head is written beside
            base = transformers.BertModel.from_pretrained(out / "base")
            h = peft.PeftModel.from_pretrained(base, out).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
            head = load_file(str(out / "head.safetensors"))
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            got = pooled @ head["weight"].T + head["bias"]
            assert json.loads((out / "head.json").read_text())["pooling"] == "mean"
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()


def test_classifier_with_adapters_and_head_resumes_bit_for_bit(tmp_path):
    """The trainer's checkpoint of a LoRA classifier (adapters + head, their Adam moments, the RNG of both
    dropouts) continues exactly: a run stopped at step 5 and resumed equals the uninterrupted one."""
    import csv

    from kiln.model.lora import lora_from_config
    from kiln.train.objectives import ClassificationObjective
    from kiln.train.trainer import Trainer

    cfg = ModelConfig(arch="encoder", vocab_size=30, n_layer=2, n_head=2, d_model=16, context_length=16,
                      pre_norm=False, final_norm=False, embedding_norm=True, type_vocab_size=2)
    tc = TrainConfig(max_steps=12, batch_size=4, save_every=5, warmup_steps=2, lr=1e-2, log_every=1,
                     tensorboard=False, precision="fp32", optimizer="adamw")
    tc.lora.rank, tc.lora.dropout = 2, 0.1

    def batch(i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 30, (4, 6), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}

    def trainer(run):
        torch.manual_seed(0)
        model = SequenceClassifier(Transformer(cfg), 2, "mean", 0.1)
        lora_from_config(model, tc.lora, log=lambda line: None)
        return Trainer(model, ClassificationObjective(), tc, run, batch, log=lambda *a: None)

    trainer(tmp_path / "full").fit()
    run_until_crash(lambda: trainer(tmp_path / "part").fit(), 5)
    trainer(tmp_path / "part").fit(resume_from=tmp_path / "part")

    def losses(run):
        with open(run / "metrics.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]

    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == len(b) == 12 and a == b, (a, b)
    assert set(load_file(str(find_checkpoint(tmp_path / "part") / "model.safetensors"))) == {
        f"backbone.decoder.blocks.{i}.attn.{m}.lora_{x}" for i in (0, 1) for m in ("qkv_proj", "out_proj")
        for x in "AB"} | {"head.weight", "head.bias"}


# ----------------------------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny GPT-2-shaped decoder trained for a few steps: the base continued pretraining starts from."""
    from conftest import SHAKESPEARE

    tmp = tmp_path_factory.mktemp("lora-pre")
    corpus = tmp / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:30_000])
    base = run_pretrain(load_config(None, ["--data.source", str(corpus), "--out", str(tmp / "base"), *TINY,
                                           "--train.max_steps", "8"]), quiet=True)
    return tmp, corpus, base


def pre_cfg(corpus, base, out, *extra):
    return load_config(None, ["--data.source", str(corpus), "--out", str(out), *TINY, "--init", str(base),
                              "--train.max_steps", "24", *LORA, *extra])


@pytest.mark.parametrize("int8", [False, True])
def test_continued_pretraining_with_lora_resumes_bit_for_bit(pretrained, int8):
    import csv

    tmp, corpus, base = pretrained
    extra = ["--train.lora.int8_base", "true"] if int8 else []
    full = run_pretrain(pre_cfg(corpus, base, tmp / f"full{int8}", *extra), quiet=True)
    part = pre_cfg(corpus, base, tmp / f"part{int8}", "--train.save_every", "5", *extra)
    run_until_crash(lambda: run_pretrain(part, quiet=True), 15)
    assert (tmp / f"part{int8}/checkpoints/latest").read_text().strip() == "step_000015"
    run_pretrain(load_config(tmp / f"part{int8}/config.yaml"), resume=tmp / f"part{int8}", quiet=True)

    def losses(run, key="loss"):
        with open(run / "metrics.csv") as f:
            return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}

    a, b = losses(full), losses(tmp / f"part{int8}")
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert losses(full, "val_loss")[24] < losses(base, "val_loss")[8]  # the adapters learn: below the base
    names = set(load_file(str(find_checkpoint(full) / "model.safetensors")))
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    frozen = load_file(str(full / "lora/base.safetensors"))
    assert any(k.endswith(".weight_int8") for k in frozen) == int8


def test_peft_loads_the_exported_gpt2_adapters(pretrained, capsys):
    import peft
    import transformers
    tmp, corpus, base = pretrained
    run = run_pretrain(pre_cfg(corpus, base, tmp / "gpt2", "--train.max_steps", "12", "--train.lora.targets",
                               "qkv_proj,out_proj,mlp.up_proj", "--train.lora.modules_to_save", "decoder.norm"),
                       quiet=True)
    out = tmp / "gpt2-peft"
    assert main(["export", "peft", str(run), str(out)]) == 0
    capsys.readouterr()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and cfg["modules_to_save"] == ["ln_f"]
    assert set(cfg["target_modules"]) == {f"h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")}
    from kiln.run.load import load

    kiln_model = load(run)[0]  # a LoRA run loaded as any run: merged
    ids = torch.randint(0, kiln_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hf = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(out / "base"), out).eval()
    with torch.no_grad():
        got, want = hf(ids).logits, kiln_model(ids)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    # `kiln export hf` of the run writes the merged model, equal to the base + adapters
    assert main(["export", "hf", str(run), str(tmp / "gpt2-merged")]) == 0
    capsys.readouterr()
    with torch.no_grad():
        merged = transformers.GPT2LMHeadModel.from_pretrained(tmp / "gpt2-merged").eval()(ids).logits
    assert (merged - got).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- errors


def test_lora_user_errors_are_one_line_and_leave_no_run_folder(clf, pretrained, capsys, tmp_path):
    tmp, backbone, run = clf
    _, corpus, base = pretrained
    data = tmp / "reviews.csv"
    args = ["finetune", "classify", "--data.train", data, "--init", backbone, "--out", tmp_path / "bad", *FAST]
    assert_user_error(capsys, [*args, "--train.lora.rank", "4", "--train.lora.targets", "q_lin"],
                      "names no linear layer", "qkv_proj")
    assert not (tmp_path / "bad").exists()
    assert_user_error(capsys, [*args, "--train.lora.rank", "-1"], "train.lora.rank")
    assert_user_error(capsys, ["pretrain", "--data.source", corpus, "--out", tmp_path / "p", *TINY,
                               "--train.lora.rank", "4"], "LoRA", "init")
    assert_user_error(capsys, ["merge", backbone, "--out", tmp_path / "m"], "full weights")
    assert_user_error(capsys, ["export", "peft", backbone, tmp_path / "e"], "full weights")
    assert_user_error(capsys, ["merge", run, "--out", run], "not empty")
