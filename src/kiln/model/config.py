"""The one model config. Every architecture kiln builds is a set of values here, with a name."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass
class ModelConfig:
    """Shape of a Transformer. Defaults are a small GPT-style decoder."""

    arch: str = field(default="decoder", metadata={"help": "decoder | encoder | encoder-decoder",
                                                   "choices": ("decoder", "encoder", "encoder-decoder")})
    vocab_size: int = field(default=0, metadata={"help": "vocabulary size; 0 = take it from the tokenizer", "range": ">= 0"})
    n_layer: int = field(default=4, metadata={"help": "number of Transformer blocks (encoder side for encoder-decoder)", "range": ">= 1"})
    n_decoder_layer: int = field(default=0, metadata={"help": "decoder blocks of an encoder-decoder; 0 = n_layer", "range": ">= 0"})
    n_head: int = field(default=4, metadata={"help": "attention heads", "range": ">= 1"})
    n_kv_head: int = field(default=0, metadata={"help": "key/value heads for grouped-query attention; 0 = n_head", "range": ">= 0"})
    d_model: int = field(default=128, metadata={"help": "width of the residual stream", "range": ">= 1"})
    d_ff: int = field(default=0, metadata={"help": "hidden width of the feed-forward block; 0 = 4*d_model", "range": ">= 0"})
    context_length: int = field(default=256, metadata={"help": "maximum sequence length (positions)", "range": ">= 1"})
    position: str = field(default="learned", metadata={"help": "learned | rope | sinusoidal",
                                                       "choices": ("learned", "rope", "sinusoidal")})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency", "range": "> 0"})
    rope_scaling: str = field(default="none", metadata={
        "help": "RoPE frequency scaling for a longer context: none | linear (every frequency / factor) | llama3 "
                "(Llama 3.1's: low frequencies / factor, high ones kept, a smooth ramp between)",
        "choices": ("none", "linear", "llama3")})
    rope_scaling_factor: float = field(default=1.0, metadata={"help": "rope_scaling: the factor", "range": ">= 1"})
    rope_low_freq_factor: float = field(default=1.0, metadata={"help": "rope_scaling llama3: low_freq_factor",
                                                               "range": "> 0"})
    rope_high_freq_factor: float = field(default=4.0, metadata={"help": "rope_scaling llama3: high_freq_factor",
                                                                "range": "> 0"})
    rope_original_context: int = field(default=8192, metadata={
        "help": "rope_scaling llama3: the context length the model was pretrained with", "range": ">= 1"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm", "choices": ("layernorm", "rmsnorm")})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the norm layers", "range": "> 0"})
    pre_norm: bool = field(default=True, metadata={"help": "pre-LN (GPT-2, Llama) or post-LN (BERT, original Transformer)"})
    final_norm: bool = field(default=True, metadata={"help": "norm after the last block (pre-LN models)"})
    embedding_norm: bool = field(default=False, metadata={"help": "norm right after the embeddings (BERT)"})
    activation: str = field(default="gelu", metadata={"help": "gelu | gelu_tanh | relu | silu | swiglu",
                                                      "choices": ("gelu", "gelu_tanh", "relu", "silu", "swiglu")})
    bias: bool = field(default=True, metadata={"help": "biases in linear layers and norms"})
    qkv_bias: bool = field(default=False, metadata={"help": "biases on the q/k/v projections even when bias is off (Qwen2)"})
    mlm_head: bool = field(default=False, metadata={"help": "dense + activation + norm before a biased LM head (BERT's MLM head)"})
    pooler: bool = field(default=False, metadata={"help": "BERT pooler: dense + tanh on the first token (model.pooler)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, attention output and MLP", "range": "[0, 1)"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share input embedding and output head weights"})
    type_vocab_size: int = field(default=0, metadata={"help": "token-type (segment) embeddings, BERT; 0 = none", "range": ">= 0"})
    pad_token_id: int = field(default=-1, metadata={"help": "padding token id; -1 = none", "range": ">= -1"})
    embed_scale: bool = field(default=False, metadata={"help": "multiply embeddings by sqrt(d_model) (original Transformer)"})
    sinusoid_layout: str = field(default="interleaved", metadata={
        "help": "sinusoidal positions: interleaved (sin and cos alternate, the original Transformer) | halves (sin "
                "in the first half of each vector, cos in the second: Marian)", "choices": ("interleaved", "halves")})
    head_bias: bool = field(default=False, metadata={"help": "a bias on the LM head (Marian's final_logits_bias)"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init", "range": ">= 0"})
    channels: int = field(default=0, metadata={"help": "image channels (1 grayscale, 3 RGB): a Vision Transformer, pixels cut "
                                               "into patches (kiln.model.vision); 0 = a text model (token ids)", "range": ">= 0"})
    image_size: int = field(default=0, metadata={"help": "image models: side of the square input image in pixels (0 in "
                                                 "`kiln finetune image`: the training images' size)", "range": ">= 0"})
    patch_size: int = field(default=16, metadata={"help": "image models: side of a square patch; image_size must be a multiple",
                                                  "range": ">= 1"})
    class_token: bool = field(default=True, metadata={"help": "image models: a learned class token before the patches (ViT); "
                                                      "false = patches only"})
    stem_channels: list = field(default_factory=list, metadata={
        "help": "image models: a convolutional stem (Xiao et al. 2021): channels of each 3x3 stride-2 convolution "
                "(+ BatchNorm + GELU) before the patch projection; k of them leave patches of patch_size / 2^k on "
                "the feature map. [] = the linear patchify (ViT)"})
    audio_conv_dim: int = field(default=0, metadata={"help": "audio models: channels of the convolutional feature encoder over "
                                                     "the raw waveform (kiln.model.audio; Wav2Vec 2.0: 512); 0 = not an "
                                                     "audio model", "range": ">= 0"})
    audio_conv_kernels: list = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2], metadata={
        "help": "audio models: kernel width of each feature-encoder convolution (Wav2Vec 2.0's seven)"})
    audio_conv_strides: list = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2], metadata={
        "help": "audio models: stride of each feature-encoder convolution (product 320: 50 frames a second at 16 kHz)"})
    audio_conv_norm: str = field(default="layer", metadata={
        "help": "audio models: group (GroupNorm on the first convolution only, wav2vec2-base) | layer (LayerNorm after "
                "every convolution, wav2vec2-large-lv60: frames do not depend on the batch's padding)",
        "choices": ("group", "layer")})
    audio_conv_bias: bool = field(default=False, metadata={"help": "audio models: biases on the feature-encoder convolutions"})
    audio_pos_kernel: int = field(default=128, metadata={"help": "audio models: width of the convolutional relative "
                                                         "position embedding", "range": ">= 1"})
    audio_pos_groups: int = field(default=16, metadata={"help": "audio models: groups of that convolution (d_model must "
                                                         "be a multiple)", "range": ">= 1"})
    sample_rate: int = field(default=16000, metadata={"help": "audio models: samples a second the model takes (inputs are "
                                                      "resampled to it)", "range": ">= 1"})

    def resolve(self) -> "ModelConfig":
        """Fill the derived values left at 0 ("auto"). Called once the config is final."""
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if self.n_decoder_layer == 0:
            self.n_decoder_layer = self.n_layer
        if self.audio_conv_dim:  # an audio model: no token embedding to tie; its length is the waveform's
            self.tie_embeddings = False
        if self.channels:  # an image model: no token embedding to tie; its sequence is the patches (+ class token)
            self.tie_embeddings = False
            if self.image_size and self.image_size % self.patch_size == 0:
                self.context_length = (self.image_size // self.patch_size) ** 2 + int(self.class_token)
        return self

    @property
    def pad_id(self) -> int:
        """The id batches are padded with: pad_token_id, or 0 for a model without one (its padded positions are
        masked, so any id serves)."""
        return self.pad_token_id if self.pad_token_id >= 0 else 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        from kiln.errors import KilnError

        self.resolve()
        if self.channels:
            self._validate_image()
        elif self.audio_conv_dim:
            self._validate_audio()
        elif self.vocab_size <= 0:
            raise KilnError(f"model.vocab_size must be positive, got {self.vocab_size}")
        if self.d_model % self.n_head:
            raise KilnError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise KilnError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.position == "rope" and self.head_dim % 2:
            raise KilnError(f"rotary positions need an even head dimension, got {self.head_dim}")

    def _validate_image(self) -> None:
        from kiln.errors import KilnError

        if self.arch != "encoder":
            raise KilnError(f"an image model (model.channels {self.channels}) is an encoder: model.arch must be encoder, "
                            f"got {self.arch}")
        if self.image_size < 1 or self.image_size % self.patch_size:
            raise KilnError(f"model.image_size ({self.image_size}) must be a positive multiple of model.patch_size "
                            f"({self.patch_size})")
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.stem_channels):
            raise KilnError(f"model.stem_channels must be positive whole numbers, got {self.stem_channels}")
        if self.patch_size % (2 ** len(self.stem_channels)):
            raise KilnError(f"model.stem_channels: {len(self.stem_channels)} stride-2 convolutions need model.patch_size "
                            f"divisible by {2 ** len(self.stem_channels)}, got {self.patch_size}")
        if self.position not in ("learned", "sinusoidal"):
            raise KilnError(f"image models take model.position learned or sinusoidal (2-D sin-cos), got {self.position}")
        for key in ("mlm_head", "embedding_norm", "type_vocab_size", "embed_scale"):
            if getattr(self, key):
                raise KilnError(f"model.{key} is for text models; an image model (model.channels > 0) has no tokens")

    def _validate_audio(self) -> None:
        from kiln.errors import KilnError

        if self.arch != "encoder":
            raise KilnError(f"an audio model (model.audio_conv_dim {self.audio_conv_dim}) is an encoder: model.arch must "
                            f"be encoder, got {self.arch}")
        k, s = list(self.audio_conv_kernels), list(self.audio_conv_strides)
        if not k or len(k) != len(s) or not all(isinstance(v, int) and v >= 1 for v in k + s):
            raise KilnError(f"model.audio_conv_kernels {k} and model.audio_conv_strides {s}: one positive integer each "
                            "per convolution, as many of both")
        if self.d_model % self.audio_pos_groups:
            raise KilnError(f"model.d_model ({self.d_model}) must be a multiple of model.audio_pos_groups "
                            f"({self.audio_pos_groups})")
        if self.position != "learned":
            raise KilnError(f"audio models take their positions from a convolution (model.audio_pos_kernel): leave "
                            f"model.position at learned, got {self.position}")
        for key in ("mlm_head", "type_vocab_size", "embed_scale", "channels"):
            if getattr(self, key):
                raise KilnError(f"model.{key} is not for audio models (model.audio_conv_dim > 0)")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


# Named presets: a preset is only a ModelConfig with a name (litgpt's `Config.from_name`).
PRESETS: dict[str, dict] = {
    "gpt-baby": dict(arch="decoder", n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=65),
    "gpt2": dict(arch="decoder", vocab_size=50257, n_layer=12, n_head=12, d_model=768, context_length=1024,
                 activation="gelu_tanh"),
    "gpt2-medium": dict(arch="decoder", vocab_size=50257, n_layer=24, n_head=16, d_model=1024, context_length=1024,
                        activation="gelu_tanh"),
    "llama-tiny": dict(arch="decoder", vocab_size=32000, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1376,
                       context_length=2048, position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                       tie_embeddings=False, norm_eps=1e-6),
    "bert-mini": dict(arch="encoder", vocab_size=30522, n_layer=4, n_head=4, d_model=256, context_length=512,
                      pre_norm=False, final_norm=False, embedding_norm=True, type_vocab_size=2, norm_eps=1e-12,
                      pad_token_id=0),
    "bert-base": dict(arch="encoder", vocab_size=30522, n_layer=12, n_head=12, d_model=768, context_length=512,
                      pre_norm=False, final_norm=False, embedding_norm=True, type_vocab_size=2, norm_eps=1e-12,
                      pad_token_id=0),
    "transformer-base": dict(arch="encoder-decoder", vocab_size=37000, n_layer=6, n_head=8, d_model=512, d_ff=2048,
                             context_length=512, position="sinusoidal", pre_norm=False, final_norm=False,
                             activation="relu", dropout=0.1, embed_scale=True),
    "bart-base": dict(arch="encoder-decoder", vocab_size=50265, n_layer=6, n_head=12, d_model=768, d_ff=3072,
                      context_length=1024, position="learned", pre_norm=False, final_norm=False, embedding_norm=True,
                      activation="gelu", dropout=0.1, pad_token_id=1),
}


def preset(name: str, **overrides) -> ModelConfig:
    from kiln.errors import KilnError, did_you_mean

    if name not in PRESETS:
        raise KilnError(f"unknown model preset {name!r}{did_you_mean(name, PRESETS)}; see `kiln models`")
    return ModelConfig(**{**PRESETS[name], **overrides})
