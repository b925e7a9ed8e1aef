"""Typed configs: dataclasses with defaults that run, loaded from YAML, overridden by dotted CLI flags.

`kiln pretrain configs/shakespeare-char.yaml --train.max_steps 500 --model.n_layer 6`
Unknown keys are errors with a "did you mean"; values are checked against the field types and ranges. The
loading machinery is kiln.configlib (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln import configlib
from kiln.configlib import (RANGE_OVERRIDES, _f, _hints, check_ranges, dump_yaml, in_range,  # noqa: F401
                            parse_overrides, range_text, read_yaml, to_dict, update_dataclass)
from kiln.model.config import ModelConfig


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


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA: rank of the low-rank adapters on the frozen model's linear layers; only the adapters "
                   "and the task's head train (checkpoints hold those, the frozen base is stored once in the run "
                   "folder); 0 = off (all weights train)", range=">= 0")
    alpha: float = _f(16.0, "LoRA scale: the adapters' output is multiplied by alpha / rank", range="> 0")
    dropout: float = _f(0.05, "dropout on the adapters' input", range="[0, 1)")
    targets: str = _f("qkv_proj,out_proj", "comma-separated linear layers that get adapters: a module name's last "
                      "parts (qkv_proj, out_proj, mlp.up_proj, mlp.down_proj, q_proj, kv_proj) or a glob over the "
                      "full name (decoder.blocks.[0-3].attn.*); default the self-attention projections")
    int8_base: bool = _f(False, "QLoRA-style: the frozen linear layers as int8 weights (per-channel, kiln.model.int8); "
                         "the adapters and the head stay fp32")
    modules_to_save: str = _f("", "comma-separated modules trained in full besides the adapters (PEFT's "
                              "modules_to_save; a task's head always is), e.g. decoder.norm")


@dataclass
class TrainConfig:
    max_steps: int = _f(2000, "optimizer steps", range=">= 0")
    batch_size: int = _f(12, "sequences per micro-batch", range=">= 1")
    grad_accum: int = _f(1, "micro-batches per optimizer step", range=">= 1")
    batch_tokens: int = _f(0, "global batch in tokens per optimizer step; when set, grad_accum is derived as "
                           "batch_tokens / (batch_size * context_length * world_size); 0 = batch_size * "
                           "grad_accum * world_size * context_length", range=">= 0")
    lr_scaling: str = _f("none", "none | linear | sqrt: scale lr (and min_lr, muon_lr) by (global batch tokens / "
                         "reference_batch_tokens)^(1 | 0.5)", choices=("none", "linear", "sqrt"))
    reference_batch_tokens: int = _f(0, "global batch in tokens that train.lr was tuned for (train.lr_scaling)", range=">= 0")
    batch_ramp_tokens: int = _f(0, "grow the global batch from one micro-batch per rank to the target over this "
                                "many tokens, lr following train.lr_scaling; 0 = off", range=">= 0")
    optimizer: str = _f("adamw", "adamw | muon | lamb | auto (Muon where its Newton-Schulz step costs at most the "
                        "forward+backward FLOPs of a step, else AdamW; the run log says which)",
                        choices=("adamw", "muon", "lamb", "auto"))
    lr: float = _f(1e-3, "peak learning rate (AdamW part)", range=">= 0")  # 0: a frozen run (tests, a fixed baseline)
    muon_lr: float = _f(0.02, "learning rate of Muon for 2-D hidden weights (optimizer: muon)", range="> 0")
    min_lr: float = _f(1e-4, "final learning rate of the decay", range=">= 0")
    layer_lr_decay: float = _f(1.0, "layer-wise lr decay (fine-tuning, AdamW/LAMB): block i of n gets lr * decay^(n - i), "
                               "the embeddings decay^(n + 1), heads and final norms the full lr; 1 = off", range="(0, 1]")
    warmup_steps: int = _f(100, "linear warmup steps", range=">= 0")
    decay: str = _f("cosine", "cosine | linear | constant", choices=("cosine", "linear", "constant"))
    weight_decay: float = _f(0.1, "decoupled weight decay, on 2-D weights only", range=">= 0")
    beta1: float = _f(0.9, "Adam beta1", range="[0, 1)")
    beta2: float = _f(0.99, "Adam beta2", range="[0, 1)")
    grad_clip: float = _f(1.0, "clip the global grad norm to this value; 0 = off", range=">= 0")
    precision: str = _f("auto", "auto | fp32 | bf16 (auto: bf16 only where the device computes it fast)",
                        choices=("auto", "fp32", "bf16"))
    bf16_weights: bool = _f(True, "with bf16: compute in a bf16 copy of the weights (fp32 master weights in the "
                            "optimizer and checkpoints) instead of autocast's per-op casts")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto | cpu | cuda[:N] | mps (auto: a CUDA GPU when there is one)")
    threads: int = _f(0, "torch CPU threads; 0 = all cores", range=">= 0")
    eval_every: int = _f(250, "evaluate every N steps", range=">= 0")
    eval_batches: int = _f(20, "validation batches per eval", range=">= 1")
    save_every: int = _f(500, "checkpoint every N steps (and at evals and the end)", range=">= 0")
    keep_last: int = _f(2, "checkpoints to keep besides the best", range=">= 0")
    log_every: int = _f(10, "write metrics every N steps", range=">= 1")
    target_loss: float = _f(0.0, "stop when val loss reaches this value; 0 = never", range=">= 0")
    sample_tokens: int = _f(200, "tokens of a generated sample printed at the end (decoders); 0 = none", range=">= 0")
    sample_prompt: str = _f("\n", "prompt of that sample")
    tensorboard: bool = _f(True, "write TensorBoard events (if tensorboard is installed) when train.trackers names "
                           "tensorboard; false turns them off (the key of older configs)")
    trackers: str = _f("tensorboard", "where metrics go besides metrics.csv: a comma list of tensorboard | mlflow | "
                       "wandb, or none (rank 0 logs; --resume continues the same tracked run)",
                       choices=("tensorboard", "mlflow", "wandb", "none"), several=True)
    mlflow_uri: str = _f("", "MLflow tracking URI (sqlite:///..., http://...); empty = $MLFLOW_TRACKING_URI, else "
                         "sqlite:///<run folder>/mlruns/mlflow.db")
    mlflow_experiment: str = _f("kiln", "MLflow experiment the run is logged under")
    wandb_project: str = _f("kiln", "Weights & Biases project")
    wandb_mode: str = _f("offline", "W&B mode: offline (files in <run folder>/wandb, no account; upload later with "
                         "`wandb sync`) | online", choices=("offline", "online"))
    backend: str = _f("auto", "distributed backend under torchrun: auto (nccl on cuda, gloo on cpu) | nccl | gloo",
                      choices=("auto", "nccl", "gloo"))
    parallel: str = _f("ddp", "data parallelism under torchrun: ddp | fsdp (FSDP2, each block then the root "
                       "sharded)", choices=("ddp", "fsdp"))
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass")
    lora: LoraConfig = field(default_factory=LoraConfig)


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
    train: TrainConfig = field(default_factory=lambda: default_recipe_train())
    mlm: MLMConfig = field(default_factory=MLMConfig)
    electra: ElectraConfig = field(default_factory=ElectraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def default_recipe_model() -> ModelConfig:
    """kiln's default recipe (configs/shakespeare-char.yaml): nanoGPT's "baby" GPT shape."""
    return ModelConfig(n_layer=4, n_head=4, d_model=128, context_length=64)


def default_recipe_train() -> TrainConfig:
    """The default recipe's training: Muon for hidden matrices, AdamW for the rest, a short cosine schedule.
    Chosen by measurement (docs/benchmarks.md): val loss 1.88 in ~500 steps vs ~2000 for nanoGPT's recipe.
    optimizer auto keeps Muon here and picks AdamW where Muon's per-step cost is not amortised (GPT-2 124M at
    batch 4 x 256: 3.3x slower a step; kiln.train.optim.choose_optimizer)."""
    return TrainConfig(max_steps=600, batch_size=12, optimizer="auto", lr=3e-3, muon_lr=0.01, min_lr=1e-4,
                       warmup_steps=100, beta2=0.99, eval_every=100, save_every=200)


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


def _classify_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=0, batch_size=32, lr=5e-5, min_lr=0.0, warmup_steps=0, decay="linear",
                       weight_decay=0.01, beta2=0.999, eval_every=0, save_every=0, keep_last=1, log_every=10,
                       sample_tokens=0)


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
    train: TrainConfig = field(default_factory=_classify_train_defaults)
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


def _seq2seq_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=2000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=200, weight_decay=0.01,
                       beta2=0.98, eval_every=250, save_every=0, keep_last=1, sample_tokens=0)


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
    train: TrainConfig = field(default_factory=_seq2seq_train_defaults)


# Ranges that depend on the verb (the field's own "range" holds elsewhere): pretraining counts steps, evaluates
# and saves every N steps, so 0 means nothing there; finetune classify reads 0 as "from epochs" / "once per
# epoch", seq2seq's save_every 0 as "at evaluations".
RANGE_OVERRIDES.update({
    RunConfig: {"train.max_steps": ">= 1", "train.eval_every": ">= 1", "train.save_every": ">= 1"},
    Seq2SeqConfig: {"train.max_steps": ">= 1", "train.eval_every": ">= 1"},
})


def load_config(path=None, overrides: list[str] | dict | None = None, cls=None, base: dict | None = None):
    """Defaults <- YAML file <- overrides, as `cls` (default RunConfig), checked (kiln.configlib.load_config)."""
    return configlib.load_config(path, overrides, cls or RunConfig, base)


def config_help(cls=None, prefix: str = "", instance=None) -> list[tuple[str, str, str]]:
    """(flag, default, help) of every key of `cls` (default RunConfig): the single source of --help."""
    return configlib.config_help(cls or RunConfig, prefix, instance)
