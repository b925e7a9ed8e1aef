"""Typed configs: dataclasses with defaults that run, loaded from YAML, overridden by dotted CLI flags.

`kiln pretrain configs/shakespeare-char.yaml --train.max_steps 500 --model.n_layer 6`
Unknown keys are errors with a "did you mean"; values are checked against the field types and ranges. The
loading machinery is kiln.config_loader (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln import config_loader
from kiln.config_loader import (_f, _hints, check_ranges, dump_yaml, in_range,  # noqa: F401
                            parse_overrides, range_text, read_yaml, to_dict, update_dataclass)
from kiln.model.config import ModelConfig
from kiln.model.lora_config import LoraConfig
from kiln.report.config import TrackingConfig
from kiln.run.config import CheckpointConfig, DeviceConfig
from kiln.train.config import (BatchScalingConfig, LoopConfig, OptimizerConfig, ParallelConfig,
                               ScheduleConfig)


_HEADER_HELP = ("CSV/TSV: the first row names the columns; false = no header row, columns named by position "
                "(0, 1, ...) or by data.columns")
_COLUMNS_HELP = ("CSV/TSV: column names in order (e.g. [text, label] or text,label) for a file without a header "
                 "row; with one, they replace its names")
_ENCODING_HELP = ("text encoding of the input files: utf-8 | latin-1 | cp1252 | utf-16 | any Python codec name; a "
                  "UTF-8/UTF-16 byte-order mark is read, and a wrong choice is an error, not garbled text")
_DELIMITER_HELP = ("CSV/TSV field separator: one character, or tab | comma | semicolon | pipe | space; empty = "
                   "from the extension (.tsv/.txt tab, else comma)")


@dataclass
class DataConfig:
    source: str = _f("kiln:tinyshakespeare", "text file, folder of .txt (or .parquet) files, .jsonl, .csv or .parquet; "
                     "'kiln:tinyshakespeare' is the embedded corpus")
    text_field: str = _f("text", "field holding the text in JSONL/CSV/Parquet input")
    tokenizer: str = _f("char", "char | bpe | wordpiece | path to an existing tokenizer.json")
    vocab_size: int = _f(8192, "vocabulary size when training a bpe/wordpiece tokenizer", range=">= 1")
    lowercase: bool = _f(False, "a bpe/wordpiece tokenizer that lowercases (like BERT uncased): the normalizer is "
                         "saved in tokenizer.json, so fine-tuning and generation lowercase too")
    val_fraction: float = _f(0.1, "share of the data held out for validation", range="[0, 1)")
    dedup: bool = _f(False, "drop exact duplicate documents")
    prepared: str = _f("", "folder of already prepared shards (manifest.json); skips preparation")
    mixture: dict = _f({}, "dataset mixture: {prepared_dir: weight, ...} (overrides `prepared`)")
    encoding: str = _f("utf-8", _ENCODING_HELP)
    header: bool = _f(True, _HEADER_HELP)
    columns: list = _f([], _COLUMNS_HELP)
    delimiter: str = _f("", _DELIMITER_HELP)


# A verb's train.* keys: the components it uses, composed (fields in the order of --help: the loop first; a
# dataclass takes its bases' fields from the last base to the first). The keys users type stay train.*.
@dataclass
class TrainConfig(TrackingConfig, CheckpointConfig, ParallelConfig, DeviceConfig, ScheduleConfig, OptimizerConfig,
                  LoopConfig):
    """The train keys every run reads: a run counted in optimizer steps."""

    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PretrainTrainConfig(TrainConfig, BatchScalingConfig):
    """`kiln pretrain` / `kiln distill`: a batch counted in tokens (and scaled), evaluation on sampled windows, a
    generated sample at the end."""

    eval_every: int = _f(250, "evaluate every N steps; 0 = once, at the end", range=">= 0")
    eval_batches: int = _f(20, "validation batches per eval", range=">= 1")
    sample_tokens: int = _f(200, "tokens of a generated sample printed at the end (decoders); 0 = none", range=">= 0")
    sample_prompt: str = _f("\n", "prompt of that sample")


@dataclass
class EpochTrainConfig(TrainConfig):
    """A fine-tuning task that counts epochs of its examples (task.epochs, task.warmup_fraction)."""

    max_steps: int = _f(0, "optimizer steps; 0 = from epochs", range=">= 0")
    warmup_steps: int = _f(0, "linear warmup steps; 0 = warmup_fraction of the steps", range=">= 0")
    eval_every: int = _f(0, "evaluate every N steps; 0 = once per epoch", range=">= 0")
    # pretraining's keys, written into every fine-tuning run's config.yaml by older kiln (where a fine-tuning
    # task refused any value but the default): dropped when read from a file, unknown as flags
    RETIRED = ("batch_tokens", "lr_scaling", "reference_batch_tokens", "batch_ramp_tokens", "eval_batches",
               "sample_tokens", "sample_prompt")


@dataclass
class Seq2SeqTrainConfig(TrainConfig):
    """`kiln finetune seq2seq`: steps (and seq2seq.time_budget); val loss over eval_batches batches."""

    eval_batches: int = _f(20, "validation batches of the teacher-forced val loss per eval (at least the decoded "
                           "subset)", range=">= 1")
    RETIRED = ("batch_tokens", "lr_scaling", "reference_batch_tokens", "batch_ramp_tokens", "sample_tokens",
               "sample_prompt")


@dataclass
class MLMConfig:
    mask_prob: float = _f(0.15, "share of tokens (or words) selected as targets: 80% [MASK], 10% random, 10% kept", range="(0, 1)")
    whole_word: bool = _f(False, "select whole words (WordPiece ##, BPE without leading space, or chars between spaces)")


@dataclass
class ElectraConfig:
    generator_fraction: float = _f(0.25, "the generator's width and heads as a fraction of the encoder's "
                                   "(ELECTRA: 1/4 to 1/3); masking follows mlm.*", range="(0, 1]")
    weight: float = _f(50.0, "weight of the replaced-token detection loss against the generator's MLM loss", range=">= 0")


@dataclass
class DistillConfig:
    teacher: str = _f("", "teacher run folder: train this model (the student) to match its output distributions "
                      "(next tokens in pretraining, class probabilities in finetune classify; there several "
                      "comma-separated runs are an ensemble, their distributions averaged); empty = no distillation")
    checkpoint: str = _f("best", "teacher checkpoint: best | latest | a folder")
    alpha: float = _f(0.5, "weight of the distillation term (KL to the teacher at `temperature`, times T^2); "
                      "1 - alpha weighs the usual cross-entropy on the data", range="[0, 1]")
    temperature: float = _f(2.0, "softmax temperature of both distributions in the distillation term", range="> 0")
    augment: int = _f(0, "finetune classify: add this many augmented copies of each training text (words masked, "
                      "swapped, cut to an n-gram; Tang et al. 2019) that the teachers label; the student learns "
                      "them from the teachers alone. 0 = none", range=">= 0")


@dataclass
class RunConfig:
    name: str = _f("run", "run name; the run folder is <out>/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for init, data order and dropout", range=">= 0")
    objective: str = _f("clm", "clm (causal LM) | mlm (masked LM) | electra (replaced-token detection)",
                        choices=("clm", "mlm", "electra"))
    model_preset: str = _f("", "start from a named model preset (see `kiln models`); model.* keys override it")
    init: str = _f("", "start from the weights of this kiln run (e.g. made by `kiln import hf`): its model shape "
                   "and tokenizer are used, train.* and data.* apply as usual; empty = random init")
    init_checkpoint: str = _f("latest", "checkpoint of `init`: latest | best | a folder")
    model: ModelConfig = field(default_factory=lambda: default_recipe_model())
    data: DataConfig = field(default_factory=DataConfig)
    train: PretrainTrainConfig = field(default_factory=lambda: default_recipe_train())
    mlm: MLMConfig = field(default_factory=MLMConfig)
    electra: ElectraConfig = field(default_factory=ElectraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def default_recipe_model() -> ModelConfig:
    """kiln's default recipe (configs/shakespeare-char.yaml): nanoGPT's "baby" GPT shape, rotary positions."""
    return ModelConfig(n_layer=4, n_head=4, d_model=128, context_length=64, position="rope")


def default_recipe_train() -> PretrainTrainConfig:
    """The default recipe's training: Muon for hidden matrices, AdamW for the rest, a short cosine schedule.
    Chosen by measurement (docs/benchmarks.md): val loss 1.88 in ~375 steps vs ~2000 for nanoGPT's recipe.
    optimizer auto keeps Muon here and picks AdamW where Muon's per-step cost is not amortised (GPT-2 124M at
    batch 4 x 256: 3.3x slower a step; kiln.train.optim.choose_optimizer)."""
    return PretrainTrainConfig(max_steps=450, batch_size=12, optimizer="auto", lr=3e-3, muon_lr=0.01, min_lr=1e-4,
                               warmup_steps=50, beta2=0.99, eval_every=75, save_every=225)


@dataclass
class ClassifyDataConfig:
    train: str = _f("", "training file: .csv, .tsv, .jsonl or .parquet with a text column and a label column")
    val: str = _f("", "validation file; empty = split off from train (deduplicated, stratified, seeded)")
    test: str = _f("", "test file; empty = split off from train")
    text_field: str = _f("text", "column holding the text")
    text_pair_field: str = _f("", "optional second text column (sentence pairs); empty = none")
    label_field: str = _f("label", "column holding the class label (problem multi_label: the labels of the text, "
                          "joined by data.label_sep, or a JSONL list; regression: a number)")
    label_sep: str = _f("|", "problem multi_label: separator of the labels in one cell of the label column")
    max_length: int = _f(128, "tokens per example (special tokens included); longer ones are cut and counted", range=">= 2")
    val_fraction: float = _f(0.1, "share of the unique texts held out for validation when data.val is empty", range="[0, 1)")
    test_fraction: float = _f(0.1, "share of the unique texts held out for test when data.test is empty", range="[0, 1)")
    dedup: bool = _f(True, "drop exact duplicate (text, label) rows; identical texts always share one split")
    split: str = _f("stratified", "how val/test are split off train: stratified (per label) | shuffle (one seeded "
                    "shuffle of the unique texts, cut in order train | val | test; what multi_label and regression "
                    "always use)", choices=("stratified", "shuffle"))
    split_seed: int = _f(-1, "seed of that split; -1 = the run's seed (a fixed split_seed keeps the split while "
                         "the seed varies)", range=">= -1")
    encoding: str = _f("utf-8", _ENCODING_HELP)
    header: bool = _f(True, _HEADER_HELP)
    columns: list = _f([], _COLUMNS_HELP)
    delimiter: str = _f("", _DELIMITER_HELP)


def _classify_train_defaults() -> EpochTrainConfig:
    return EpochTrainConfig(max_steps=0, batch_size=32, lr=5e-5, min_lr=0.0, warmup_steps=0, decay="linear",
                       weight_decay=0.01, beta2=0.999, eval_every=0, save_every=0, keep_last=1, log_every=10)


# finetune classify's validation metrics, by problem (the first: metric auto)
PROBLEM_METRICS = {"single_label": ("val_accuracy", "val_loss", "val_macro_f1"),
                   "multi_label": ("val_micro_f1", "val_loss", "val_accuracy", "val_macro_f1"),
                   "regression": ("val_loss", "val_pearson", "val_spearman")}
METRICS = ("auto", *dict.fromkeys(m for ms in PROBLEM_METRICS.values() for m in ms))


@dataclass
class ClassifyConfig:
    """`kiln finetune classify`: a pretrained backbone + a classification head, fine-tuned end to end."""

    name: str = _f("classify", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the splits, the head's init, data order and dropout", range=">= 0")
    init: str = _f("", "backbone: a kiln run folder, or a Hugging Face model folder (imported into <run>/base)")
    init_checkpoint: str = _f("latest", "checkpoint of a kiln run used as init: latest | best | a folder")
    pooling: str = _f("auto", "auto | mean | cls | pooler | last (auto: mean for encoders, last token for "
                      "decoders)", choices=("auto", "mean", "cls", "pooler", "last"))
    head_dropout: float = _f(0.1, "dropout before the classification layer", range="[0, 1)")
    length_buckets: int = _f(0, "training batches of similar length (less padding): each chunk of N batches of the "
                             "seeded shuffle is sorted by length and its batches shuffled again; 0 = plain shuffle",
                             range=">= 0")
    token_mask: float = _f(0.0, "augmentation: share of each training example's tokens (special tokens excepted) "
                           "replaced by the tokenizer's mask token, drawn anew every step; 0 = off", range="[0, 1)")
    epochs: float = _f(3.0, "passes over the training split (sets train.max_steps when that is 0)", range="> 0")
    warmup_fraction: float = _f(0.06, "share of the steps for linear warmup when train.warmup_steps is 0", range="[0, 1)")
    problem: str = _f("single_label", "single_label (one class per text: softmax, cross-entropy) | multi_label "
                      "(any labels per text: a sigmoid per label, binary cross-entropy, a decision threshold per "
                      "label) | regression (a number per text: one output, mean squared error)",
                      choices=("single_label", "multi_label", "regression"))
    threshold: float = _f(0.5, "multi_label: a label is predicted when its probability is >= this", range="(0, 1)")
    tune_thresholds: bool = _f(False, "multi_label: after training, set each label's threshold to the one that "
                               "maximises its F1 on the validation split (written to labels.json; test, kiln eval "
                               "and kiln predict use it)")
    class_weights: str = _f("none", "none | balanced | label=weight,label=weight (weighted cross-entropy)")
    metric: str = _f("auto", "validation metric that picks the best checkpoint and drives early stopping; auto = "
                     "val_accuracy (single_label), val_micro_f1 (multi_label: accuracy is exact-set match), "
                     "val_loss (regression: the MSE)", choices=METRICS)
    patience: int = _f(0, "stop after this many evaluations without improvement of `metric`; 0 = never", range=">= 0")
    positive_label: str = _f("", "positive class of a binary task for ROC/PR (default: the second label)")
    keep_layers: str = _f("", "backbone blocks to keep, e.g. 0,2,4: a shallower student initialised from those "
                          "layers of init (DistilBERT-style; pair it with distill.teacher); empty = all")
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: EpochTrainConfig = field(default_factory=_classify_train_defaults)
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "written by kiln: the backbone's shape (read from init)"})
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class Seq2SeqDataConfig:
    train: str = _f("", "pair file: .tsv, .csv, .jsonl or .parquet with a source and a target column")
    val: str = _f("", "validation pair file; empty = split off from train (seeded; identical sources stay together)")
    test: str = _f("", "test pair file; empty = split off from train")
    val_fraction: float = _f(0.05, "share of the unique sources held out for validation when data.val is empty", range="[0, 1)")
    test_fraction: float = _f(0.05, "share of the unique sources held out for test when data.test is empty", range="[0, 1)")
    val_size: int = _f(0, "number of unique sources held out for validation (overrides val_fraction); 0 = fraction", range=">= 0")
    test_size: int = _f(0, "number of unique sources held out for test (overrides test_fraction); 0 = fraction", range=">= 0")
    max_source_length: int = _f(128, "source tokens per example; longer ones are cut and counted", range=">= 1")
    max_target_length: int = _f(128, "target tokens per example (eos included); longer ones are cut and counted", range=">= 2")
    dedup: bool = _f(True, "drop exact duplicate (source, target) pairs")
    limit: int = _f(0, "use only the first N pairs of data.train (quick runs); 0 = all", range=">= 0")
    encoding: str = _f("utf-8", _ENCODING_HELP)
    header: bool = _f(True, _HEADER_HELP)
    columns: list = _f([], _COLUMNS_HELP)
    delimiter: str = _f("", _DELIMITER_HELP)


@dataclass
class Seq2SeqTaskConfig:
    task: str = _f("translate", "translate (BLEU, chrF) | summarize (ROUGE-1/2/L): the metrics of evaluation",
                   choices=("translate", "summarize"))
    source_field: str = _f("source", "column holding the source text")
    target_field: str = _f("target", "column holding the target text")
    tokenizer: str = _f("shared", "shared (one BPE for both sides) | separate (one BPE per side) | path to a "
                        "tokenizer.json", )
    vocab_size: int = _f(8000, "BPE vocabulary size (per side when separate)", range=">= 1")
    label_smoothing: float = _f(0.1, "label smoothing of the teacher-forced cross-entropy", range="[0, 1)")
    num_beams: int = _f(4, "beams for evaluation and translate; 1 = greedy", range=">= 1")
    length_penalty: float = _f(1.0, "beam score = sum log-probs / length ** length_penalty (Hugging Face's)", range="any")
    early_stopping: str = _f("true", "true | false | never: when beam search stops (Hugging Face's semantics)",
                             choices=("true", "false", "never"))
    max_new_tokens: int = _f(0, "longest output; 0 = data.max_target_length (translate also caps a batch at "
                             "2 x its longest source + 10 tokens)", range=">= 0")
    eval_examples: int = _f(200, "fixed validation subset decoded at each evaluation (BLEU/chrF or ROUGE)", range=">= 0")
    eval_num_beams: int = _f(0, "beams while training (each evaluation); 0 = num_beams", range=">= 0")
    test_examples: int = _f(0, "test pairs decoded at the end; 0 = the whole test split", range=">= 0")
    samples: int = _f(3, "sample outputs logged at each evaluation", range=">= 0")
    metric: str = _f("auto", "validation metric choosing the best checkpoint: auto (bleu / rougeL) | val_loss | "
                     "a metric name")
    time_budget: float = _f(0.0, "stop training after this many minutes (evaluations included; the lr schedule "
                            "is stretched to fit); 0 = train.max_steps", range=">= 0")


def _seq2seq_model_defaults() -> ModelConfig:
    return ModelConfig(arch="encoder-decoder", n_layer=3, n_head=4, d_model=256, d_ff=1024, context_length=256,
                       position="sinusoidal", activation="relu", dropout=0.1, embed_scale=True)


def _seq2seq_train_defaults() -> Seq2SeqTrainConfig:
    return Seq2SeqTrainConfig(max_steps=2000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=200, weight_decay=0.01,
                       beta2=0.98, eval_every=250, save_every=0, keep_last=1)


@dataclass
class Seq2SeqConfig:
    """`kiln finetune seq2seq`: source/target pairs -> an encoder-decoder trained with teacher forcing."""

    name: str = _f("seq2seq", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the splits, init, data order and dropout", range=">= 0")
    model_preset: str = _f("", "start from a named encoder-decoder preset (see `kiln models`); model.* keys "
                           "override it")
    init: str = _f("", "start from a pretrained encoder-decoder: a Hugging Face Marian/BART folder (imported into "
                   "<run>/base), a kiln run made from one by `kiln import hf`, or a seq2seq run; its model shape and "
                   "tokenizer (tokenizer.json, shared by both sides) replace model.* and seq2seq.tokenizer; empty = "
                   "train from scratch")
    init_checkpoint: str = _f("latest", "checkpoint of a kiln run used as init: latest | best | a folder")
    data: Seq2SeqDataConfig = field(default_factory=Seq2SeqDataConfig)
    seq2seq: Seq2SeqTaskConfig = field(default_factory=Seq2SeqTaskConfig)
    model: ModelConfig = field(default_factory=_seq2seq_model_defaults)
    train: Seq2SeqTrainConfig = field(default_factory=_seq2seq_train_defaults)


def load_config(path=None, overrides: list[str] | dict | None = None, cls=None, base: dict | None = None):
    """Defaults <- YAML file <- overrides, as `cls` (default RunConfig), checked (kiln.config_loader.load_config)."""
    return config_loader.load_config(path, overrides, cls or RunConfig, base)


def config_help(cls=None, prefix: str = "", instance=None) -> list[tuple[str, str, str]]:
    """(flag, default, help) of every key of `cls` (default RunConfig): the single source of --help."""
    return config_loader.config_help(cls or RunConfig, prefix, instance)
