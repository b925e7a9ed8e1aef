"""The configs of `kiln finetune audio` (utterance classification) and `kiln finetune asr` (CTC speech recognition).

No torch here: the CLI reads a recipe and its overrides through these classes before anything imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.config import EpochTrainConfig, _f
from kiln.model.config import ModelConfig

AUDIO_CONFIG_FILE, ASR_CONFIG_FILE = "audio.yaml", "asr.yaml"
TOO_LONG = ("cut", "skip", "error")


@dataclass
class AudioDataConfig:
    train: str = _f("", "training audio: a folder with one subfolder per class (WAV/FLAC/OGG) or a CSV/TSV/JSONL/"
                    "Parquet manifest with columns path (relative to it) and label (asr: text)")
    val: str = _f("", "validation audio (same forms); empty = split off train (seeded)")
    test: str = _f("", "test audio (same forms); empty = split off train")
    val_fraction: float = _f(0.1, "share of train held out for validation when data.val is empty", range="[0, 1)")
    test_fraction: float = _f(0.1, "share of train held out for test when data.test is empty", range="[0, 1)")
    split_seed: int = _f(-1, "seed of that split; -1 = the run's seed", range=">= -1")
    max_seconds: float = _f(10.0, "longest utterance; longer ones are handled by data.too_long; 0 = no limit", range=">= 0")
    too_long: str = _f("cut", "an utterance over data.max_seconds: cut (to its first max_seconds) | skip (left out, "
                       "counted) | error", choices=TOO_LONG)
    limit: int = _f(0, "use only the first N utterances of data.train (quick runs); 0 = all", range=">= 0")


@dataclass
class SpecAugmentConfig:
    mask_time_prob: float = _f(0.0, "SpecAugment time masking: share of each utterance's frames covered by masked "
                               "spans (Wav2Vec 2.0 fine-tuning: 0.05), drawn anew every step; 0 = off", range="[0, 1)")
    mask_time_length: int = _f(10, "frames in a masked span (20 ms each at Wav2Vec 2.0's strides)", range=">= 1")
    mask_feature_prob: float = _f(0.0, "SpecAugment feature masking: share of the projected features (channels) "
                                  "zeroed in spans for a whole utterance, drawn anew every step; 0 = off", range="[0, 1)")
    mask_feature_length: int = _f(10, "channels in a masked feature span", range=">= 1")
    noise_prob: float = _f(0.0, "share of the training utterances that get white noise, drawn anew every step "
                           "(no gain augmentation: every utterance is normalised to unit variance)", range="[0, 1]")
    noise_snr: list = _f([10.0, 30.0], "the added noise's signal-to-noise ratio, drawn in [low, high] dB")


def audio_model() -> ModelConfig:
    """A small Wav2Vec 2.0-shaped encoder for training from scratch on a CPU (Wav2Vec 2.0 base: conv 512, d 768)."""
    return ModelConfig(arch="encoder", vocab_size=0, n_layer=4, n_head=4, d_model=128, d_ff=256, pre_norm=True,
                       final_norm=True, norm_eps=1e-5, tie_embeddings=False, audio_conv_dim=128, audio_conv_norm="layer",
                       audio_pos_kernel=32, audio_pos_groups=8)


def _audio_train() -> EpochTrainConfig:
    return EpochTrainConfig(max_steps=0, batch_size=32, lr=1e-3, min_lr=1e-5, warmup_steps=0, decay="cosine", weight_decay=0.01,
                  beta2=0.98, eval_every=0, save_every=0, keep_last=1, log_every=10)


@dataclass
class _SpeechConfig:
    name: str = _f("audio", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the split, the init, data order, masking and dropout", range=">= 0")
    init: str = _f("", "start from: a kiln run of the same task, a kiln Wav2Vec 2.0 backbone (kiln import hf of a "
                   "Wav2Vec2Model) or a Hugging Face wav2vec2 folder (imported into <run>/base); empty = from scratch "
                   "(the model section)")
    init_checkpoint: str = _f("best", "checkpoint of a kiln run used as init: best | latest | a folder")
    head_dropout: float = _f(0.0, "dropout before the head", range="[0, 1)")
    epochs: float = _f(10.0, "passes over the training split (sets train.max_steps when that is 0)", range="> 0")
    warmup_fraction: float = _f(0.1, "share of the steps for linear warmup when train.warmup_steps is 0", range="[0, 1)")
    patience: int = _f(0, "stop after this many evaluations without improvement of `metric`; 0 = never", range=">= 0")
    time_budget: float = _f(0.0, "stop training after this many minutes (evaluations included; the lr schedule ends "
                            "in time); 0 = off", range=">= 0")
    eval_batch_size: int = _f(32, "utterances per batch when evaluating and predicting", range=">= 1")
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    train: EpochTrainConfig = field(default_factory=_audio_train)
    model: ModelConfig = field(default_factory=audio_model, metadata={
        "help": "the Wav2Vec 2.0-shaped encoder from scratch; with init: the init's shape"})


@dataclass
class AudioConfig(_SpeechConfig):
    """`kiln finetune audio`: utterance classification (keyword spotting, speaker, emotion) over raw waveforms."""

    proj_dim: int = _f(256, "width of the projection before mean pooling (HF's classifier_proj_size)", range=">= 1")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", range="[0, 1)")
    metric: str = _f("val_accuracy", "validation metric that picks the best checkpoint and drives early stopping",
                     choices=("val_loss", "val_accuracy", "val_macro_f1"))


@dataclass
class ASRConfig(_SpeechConfig):
    """`kiln finetune asr`: speech recognition with CTC over characters, greedy decoding, WER/CER (jiwer)."""

    name: str = _f("asr", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    lowercase: bool = _f(True, "lowercase the transcripts before building the character vocabulary and scoring")
    metric: str = _f("val_loss", "validation metric that picks the best checkpoint and drives early stopping "
                     "(val_cer and val_wer are reported beside it)", choices=("val_loss",))
