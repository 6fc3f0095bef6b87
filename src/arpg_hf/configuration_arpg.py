"""Configuration of the ARPG two-pass decoder."""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.utils import logging

from .saved_folders import SavedWithImportShims
from .validation import is_int

logger = logging.get_logger(__name__)

# Published model sizes (arXiv 2503.10568, Table 1): Pass-1 and Pass-2 each get half of the upstream `n_layer`.
ARPG_PRESETS = {
    "ARPG-L": dict(
        hidden_size=1024, num_attention_heads=16, num_self_attention_layers=12, num_cross_attention_layers=12
    ),
    "ARPG-XL": dict(
        hidden_size=1280, num_attention_heads=20, num_self_attention_layers=18, num_cross_attention_layers=18
    ),
    "ARPG-XXL": dict(
        hidden_size=1536, num_attention_heads=24, num_self_attention_layers=24, num_cross_attention_layers=24
    ),
}


# Where transformers' Auto classes find the ARPG classes in a saved folder with `trust_remote_code=True`: the import
# shims written beside config.json (see arpg_hf.saved_folders). `import arpg_hf` registers the same classes locally.
AUTO_MAP = {
    "AutoConfig": "configuration_arpg.ARPGConfig",
    "AutoModel": "modeling_arpg.ARPGForImageGeneration",
    "AutoModelForCausalLM": "modeling_arpg.ARPGForImageGeneration",
}


def swiglu_intermediate_size(hidden_size: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The LlamaGen SwiGLU width: ``int(2 * 4 * D / 3)``, times the multiplier if set, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class ARPGConfig(SavedWithImportShims, PretrainedConfig):
    r"""
    Configuration of [`ARPGForImageGeneration`]. The defaults describe ARPG-L on 256x256 ImageNet (16x16 tokens of
    the LlamaGen VQ-16 tokenizer).

    Token ids are derived from the sizes, never hard-coded: image tokens are ``0 .. vocab_size - 1``, the [MASK] token
    is ``vocab_size``, class ``c`` is ``vocab_size + 1 + c``, the null class of classifier-free guidance is
    ``vocab_size + num_classes + 1``, and one more (unused) embedding row follows, as in the published checkpoints.

    Args:
        vocab_size (`int`, *optional*, defaults to 16384):
            Size of the image-token vocabulary (the VQ codebook size).
        num_classes (`int`, *optional*, defaults to 1000):
            Number of class labels.
        grid_height (`int`, *optional*, defaults to 16):
            Height of the trained token grid.
        grid_width (`int`, *optional*, defaults to 16):
            Width of the trained token grid.
        hidden_size (`int`, *optional*, defaults to 1024):
            Width of the residual stream.
        num_attention_heads (`int`, *optional*, defaults to 16):
            Attention heads; `hidden_size / num_attention_heads` must be divisible by 4 (2-D RoPE splits each head's
            rotation pairs between rows and columns).
        num_self_attention_layers (`int`, *optional*, defaults to 12):
            Pass-1 layers: causal self-attention over the class token and the known image tokens.
        num_cross_attention_layers (`int`, *optional*, defaults to 12):
            Pass-2 layers: [MASK] queries cross-attending to the shared key/value cache.
        intermediate_size (`int`, *optional*):
            SwiGLU width. Defaults to `int(2 * 4 * hidden_size / 3)` (times `ffn_dim_multiplier` when set) rounded up to
            a multiple of `multiple_of`.
        multiple_of (`int`, *optional*, defaults to 256):
            Rounding of the default `intermediate_size`.
        ffn_dim_multiplier (`float`, *optional*):
            Multiplier of the default `intermediate_size`.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every RMSNorm.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the 2-D rotary embedding.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        token_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the input token embeddings.
        residual_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on each attention block's output projection.
        ffn_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on each feed-forward block's output.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        class_dropout_prob (`float`, *optional*, defaults to 0.1):
            Probability, in training mode, of replacing a class label by the null class (for classifier-free guidance).
        absolute_position_embeddings (`bool`, *optional*, defaults to `False`):
            Not part of the published models (which keep it off). Adds a learned embedding per trained grid cell to
            every image-token input of Pass 1 and to every [MASK] query of Pass 2. Without it, position reaches the
            model only through RoPE, which is relative: the first query sees nothing but the class token, so its
            prediction cannot depend on where it lands, and no token knows where the canvas edges are until enough
            tokens are known. That costs little on 16x16 ImageNet grids and a great deal on tiny grids whose content
            is anchored to the canvas (the bundled 8x8 digits model uses it). On other canvases the table is sampled
            as `position_mode` says (see [`ARPGModel.absolute_position_embedding`]).
    """

    model_type = "arpg"

    def __init__(
        self,
        vocab_size: int = 16384,
        num_classes: int = 1000,
        grid_height: int = 16,
        grid_width: int = 16,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        num_self_attention_layers: int = 12,
        num_cross_attention_layers: int = 12,
        intermediate_size: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        token_dropout: float = 0.1,
        residual_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        attention_dropout: float = 0.0,
        class_dropout_prob: float = 0.1,
        absolute_position_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.grid_height = grid_height
        self.grid_width = grid_width
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_self_attention_layers = num_self_attention_layers
        self.num_cross_attention_layers = num_cross_attention_layers
        self.multiple_of = multiple_of
        self.ffn_dim_multiplier = ffn_dim_multiplier
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.token_dropout = token_dropout
        self.residual_dropout = residual_dropout
        self.ffn_dropout = ffn_dropout
        self.attention_dropout = attention_dropout
        self.class_dropout_prob = class_dropout_prob
        self.absolute_position_embeddings = absolute_position_embeddings
        self._validate_arpg_fields()
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_intermediate_size(hidden_size, multiple_of, ffn_dim_multiplier)
        kwargs["auto_map"] = dict(AUTO_MAP)  # today's shims, also for folders saved before they existed
        super().__init__(**kwargs)

    _save_options = ()  # PretrainedConfig.save_pretrained takes the folder (and push_to_hub) only

    def _validate_arpg_fields(self) -> None:
        positive = (
            "vocab_size",
            "num_classes",
            "grid_height",
            "grid_width",
            "hidden_size",
            "num_attention_heads",
            "num_self_attention_layers",
            "num_cross_attention_layers",
            "multiple_of",
        )
        for name in positive:
            value = getattr(self, name)
            if not is_int(value, exact=True) or value < 1:
                raise ValueError(f"ARPGConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides the width."
            )
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"The head dimension hidden_size / num_attention_heads = {self.hidden_size} / "
                f"{self.num_attention_heads} = {self.head_dim} must be divisible by 4: 2-D RoPE gives half of each "
                "head's rotation pairs to rows and half to columns."
            )
        if self.intermediate_size is not None and (
            not isinstance(self.intermediate_size, int) or self.intermediate_size < 1
        ):
            raise ValueError(f"intermediate_size must be a positive integer or None, got {self.intermediate_size!r}.")
        for name in ("token_dropout", "residual_dropout", "ffn_dropout", "attention_dropout", "class_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ARPGConfig.{name} must lie in [0, 1), got {value!r}.")
        if not isinstance(self.absolute_position_embeddings, bool):
            raise ValueError(
                f"ARPGConfig.absolute_position_embeddings must be True or False, got {self.absolute_position_embeddings!r}."
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps!r} and {self.rope_theta!r}."
            )

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "ARPGConfig":
        """Builds the configuration of a published size: "ARPG-L", "ARPG-XL" or "ARPG-XXL"; `kwargs` override fields."""
        if name not in ARPG_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(ARPG_PRESETS)}.")
        return cls(**{**ARPG_PRESETS[name], **kwargs})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image on the trained grid, `grid_height * grid_width`."""
        return self.grid_height * self.grid_width

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size

    @property
    def class_token_offset(self) -> int:
        """Class `c` is embedded as token id `class_token_offset + c`."""
        return self.vocab_size + 1

    @property
    def null_class_token_id(self) -> int:
        """The unconditional (null) class of classifier-free guidance."""
        return self.vocab_size + self.num_classes + 1

    @property
    def num_embeddings(self) -> int:
        """Rows of the token embedding: image tokens, [MASK], classes, null class and one unused row."""
        return self.vocab_size + self.num_classes + 3
