"""`kiln finetune asr`: transcribed utterances -> a Wav2Vec 2.0-shaped CTC recogniser; `kiln eval`, `kiln predict`.

    kiln finetune asr configs/asr-digits.yaml
    kiln finetune asr --data.train speech/train.csv --init hf-wav2vec2-folder/

The task on the shared driver (kiln.tasks.driver): read a manifest of path,text (kiln.data.audio; decoded,
resampled, normalised) and split it (seeded, where no val/test is given) -> the character vocabulary of the
training transcripts (kiln.eval.speech: `<pad>` = the CTC blank, `<unk>`, `|` for a space, then the characters;
written to vocab.json) -> the backbone (from scratch, a kiln run, or a Hugging Face wav2vec2 folder; a
Wav2Vec2ForCTC's head is kept when its vocabulary is this one) -> kiln.model.audio.CTCModel -> torch's CTC loss
(a SUM over the characters; the loop normalises by the step's characters), batches with seeded SpecAugment time
masks -> best checkpoint by val loss, with val CER and WER (jiwer) after every evaluation -> test WER/CER and the
test transcripts.

Run folder: asr.yaml, run.json (kind asr; vocab, sample rate), vocab.json, data.json, checkpoints/, eval/
(val.json, test.json, test_transcripts.csv, summary.json), metrics.csv, plots/ (loss.png), log.txt, base/.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch.nn.functional as F

from kiln.data.audio import AudioBatches
from kiln.data.audio_config import ASR_CONFIG_FILE, ASRConfig
from kiln.errors import KilnError
from kiln.eval import speech as sp
from kiln.tasks import speech
from kiln.tasks.base import Data, Prepared


class CTCObjective:
    """torch's CTC loss (blank 0; a SUM over the batch) of the frames' log-probabilities; targets: the characters."""

    def targets(self, batch) -> int:
        return int(batch["label_lengths"].sum())

    def loss(self, model, batch):
        logits, frames = model(batch["input_values"], batch["attention_mask"], batch.get("time_mask"),
                               batch.get("feature_mask"))
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        return F.ctc_loss(log_probs, batch["labels"], frames, batch["label_lengths"], blank=0, reduction="sum",
                          zero_infinity=True)


def collate(ids: list[list[int]]):
    """The batch's targets: concatenated ids and their lengths (torch's ctc_loss's 1-D form)."""
    def make(idx):
        import torch

        rows = [ids[i] for i in idx]
        return {"labels": torch.tensor([t for r in rows for t in r], dtype=torch.long),
                "label_lengths": torch.tensor([len(r) for r in rows], dtype=torch.long)}
    return make


def transcribe(model, waves, vocab: list[str], batch_size: int = 32, device: str = "cpu", ids=None) -> tuple[list[str], float]:
    """(greedy transcripts, CTC loss per character when `ids` are given, else nan) of normalised waveforms."""
    import torch

    out, loss = [""] * len(waves), [0.0, 0]

    def keep(result, idx):
        logits, frames = result
        for i, text in zip(idx, sp.decode_batch(logits, frames, vocab)):
            out[i] = text
        if ids is not None:
            rows = [ids[i] for i in idx]
            lp = logits.float().log_softmax(-1).transpose(0, 1)
            targets = torch.tensor([t for r in rows for t in r], device=lp.device)
            loss[0] += float(F.ctc_loss(lp, targets, frames, torch.tensor([len(r) for r in rows], device=lp.device),
                                        blank=0, reduction="sum", zero_infinity=True))
            loss[1] += sum(map(len, rows))

    speech.run_model(model, waves, batch_size, device, keep)
    return out, (loss[0] / max(loss[1], 1) if ids is not None else float("nan"))


class ASRTask(speech.SpeechTask):
    name, config_cls, config_file = "asr", ASRConfig, ASR_CONFIG_FILE
    usage = "kiln finetune asr [CONFIG.yaml] --data.train MANIFEST [--init RUN_OR_HF_DIR] [--section.key VALUE ...]"
    example = "configs/asr-digits.yaml"
    def read(self, cfg: ASRConfig, log) -> Data:
        model = self.model_config(cfg)
        sets, rep = speech.read_sets(cfg, "text", model, log, stratify=False)
        splits = {n: (w, [sp.clean(t, cfg.lowercase) for t in texts], s) for n, (w, texts, s) in sets.items()}
        vocab = sp.build_vocab(splits["train"][1])
        for name in ("val", "test"):
            unknown = sp.unknown_chars(splits[name][1], vocab)
            if unknown:
                log(f"note: the {name} transcripts hold characters the training ones lack ({''.join(unknown)!r}): "
                    "scored as errors, never predicted")
        log(f"vocabulary: {len(vocab)} tokens ({''.join(vocab[3:])!r} + blank, unknown, word delimiter)")
        rep["vocab"] = vocab
        return Data(splits, rep, {"vocab": vocab})

    def prepare(self, cfg: ASRConfig, run_dir: Path, data: Data, device: str, log) -> Prepared:
        from kiln.model.audio import CTCModel, frame_lengths

        vocab = data.extra["vocab"]
        index = {t: i for i, t in enumerate(vocab)}
        backbone, head, init_info, info = speech.backbone(cfg, run_dir, self.name, log)
        model = CTCModel(backbone, len(vocab), cfg.head_dropout)
        if head is not None and list(init_info["vocab"]) == vocab:
            model.load_state_dict({**model.state_dict(), **head})
            log("head: the init's CTC layer (the same vocabulary)")
        elif head is not None:
            log(f"head: new ({len(vocab)} tokens; the init's vocabulary differs)")
        m, a = cfg.model, cfg.augment
        frames = lambda n: frame_lengths(n, m.audio_conv_kernels, m.audio_conv_strides)  # noqa: E731
        ids = {n: [sp.encode(t, index) for t in s[1]] for n, s in data.splits.items()}
        (x_tr, _, _), (x_va, t_va, _) = data.splits["train"], data.splits["val"]
        short = sum(frames(len(x)) < len(t) for x, t in zip(x_tr, ids["train"]))
        if short:
            log(f"note: {short} training utterance(s) have fewer frames than characters (CTC cannot align them: no loss)")
        batches = AudioBatches(x_tr, collate(ids["train"]), cfg.train.batch_size, cfg.seed, frames, a, m.d_model)
        speech.log_augment(a, log)
        evaluate = None
        if len(x_va):
            def evaluate(mod):
                hyps, loss = transcribe(mod, x_va, vocab, cfg.eval_batch_size, device, ids["val"])
                r = sp.error_rates(t_va, hyps)
                return {"val_loss": loss, "val_cer": r["cer"], "val_wer": r["wer"]}
        data.report["init"] = info
        notes = [f"Wav2Vec 2.0-shaped encoder: {len(m.audio_conv_kernels)} convolutions x {m.audio_conv_dim} "
                 f"({m.audio_conv_norm} norm), {m.n_layer}x{m.d_model} blocks ({info['kind']}"
                 f"{': ' + cfg.init if cfg.init else ''})", f"CTC over {len(vocab)} tokens"]
        meta = {"vocab": vocab, "sample_rate": m.sample_rate, "lowercase": cfg.lowercase}
        return Prepared(model, CTCObjective(), batches.batch, len(x_tr), evaluate, cfg.metric, meta,
                        save=lambda d: write_vocab(d, vocab), notes=notes,
                        state={"splits": data.splits, "ids": ids, "device": device})

    def test(self, cfg, prep: Prepared, model, ckpt: Path, run_dir: Path, log) -> dict:
        results = {}
        for name in ("val", "test"):
            x, texts, sources = prep.state["splits"][name]
            if not len(x):
                continue
            hyps, loss = transcribe(model, x, prep.meta["vocab"], cfg.eval_batch_size, prep.state["device"],
                                    prep.state["ids"][name])
            r = {**sp.error_rates(texts, hyps), "loss": loss, "n": len(x), "checkpoint": str(ckpt)}
            _write(run_dir / "eval", name, r, sources, texts, hyps)
            results[name] = {k: r[k] for k in ("wer", "cer", "exact", "loss")}
            log(f"{name} set ({len(x)} utterances, checkpoint {ckpt.name}): WER {r['wer']:.2%}  CER {r['cer']:.2%}  "
                f"exact {r['exact']:.2%}")
        return results

    def load(self, run_dir, which: str = "best", device: str = "cpu"):
        """(CTCModel, ASRConfig, run.json) of an asr run (or an imported Wav2Vec2ForCTC)."""
        from kiln.model.audio import CTCModel

        return speech.load_checkpoint(run_dir, which, self.name, ASR_CONFIG_FILE, ASRConfig,
                                      lambda b, info, cfg: CTCModel(b, len(info["vocab"])), device)

    def evaluate_file(self, run_dir, file, out=None, which: str = "best", log=print, **kw) -> dict:
        model, cfg, info = self.load(run_dir, which)
        vocab = list(info["vocab"])
        waves, texts, sources = speech.read_for(file, cfg, "text", True, log)
        texts = [sp.clean(t, info.get("lowercase", cfg.lowercase)) for t in texts]
        _refuse_unknown(file, texts, vocab)
        index = {t: i for i, t in enumerate(vocab)}
        hyps, loss = transcribe(model, waves, vocab, cfg.eval_batch_size, ids=[sp.encode(t, index) for t in texts])
        out = Path(out) if out else Path(run_dir) / "eval" / f"{speech.stem(file)}.json"
        r = {**sp.error_rates(texts, hyps), "loss": loss, "n": len(waves), "file": str(file), "run": str(run_dir)}
        _write(out.parent, out.stem, r, sources, texts, hyps)
        log(f"{file}: {len(waves)} utterance(s): WER {r['wer']:.2%}  CER {r['cer']:.2%}  exact {r['exact']:.2%}")
        log(f"wrote {out} (+ {out.stem}_transcripts.csv)")
        return r

    def predict_file(self, run_dir, file, out=None, which: str = "best", log=print) -> Path:
        model, cfg, info = self.load(run_dir, which)
        vocab = list(info["vocab"])
        waves, texts, sources = speech.read_for(file, cfg, "text", False, log)
        if texts:
            texts = [sp.clean(t, info.get("lowercase", cfg.lowercase)) for t in texts]
            _refuse_unknown(file, texts, vocab)
        hyps, _ = transcribe(model, waves, vocab, cfg.eval_batch_size)
        out = Path(out) if out else Path(run_dir) / "predictions" / f"{speech.stem(file)}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path"] + (["text"] if texts else []) + ["transcript"])
            for i, h in enumerate(hyps):
                w.writerow([sources[i]] + ([texts[i]] if texts else []) + [h])
        log(f"wrote {len(hyps)} transcript(s) to {out}")
        return out


TASK = ASRTask()


def write_vocab(run_dir: Path, vocab: list[str]) -> None:
    (Path(run_dir) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=1) + "\n")


def _refuse_unknown(file, texts, vocab) -> None:
    unknown = sp.unknown_chars(texts, vocab)
    if unknown:
        raise KilnError(f"{file}: transcripts hold characters the run's vocabulary lacks ({''.join(unknown)!r}); "
                        f"it has {''.join(vocab[3:])!r} (and spaces)")


def _write(out_dir: Path, prefix: str, r: dict, sources, refs, hyps) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{prefix}.json").write_text(json.dumps(r, indent=2) + "\n")
    with open(out_dir / f"{prefix}_transcripts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "transcript"])
        w.writerows(zip(sources, refs, hyps))
