"""``CushionConfig``: the ``model.cushion`` group (CushionCache, Son et al., EMNLP 2024; algorithms.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import ConfigError

METHODS = ("none", "greedy", "tuned", "outlier_tokens")
ROUND_GRADIENTS = ("zero", "ste")
PRECISIONS = ("auto", "fp32", "bf16")
OBJECTIVES = ("error", "max")
SEARCH_GRANULARITIES = ("per_tensor_dynamic", "per_tensor_static", "per_token_dynamic")


@dataclass
class CushionConfig:
    """A prefix key/value cache in front of every input that tames the activation outliers of the text after it."""

    method: str = "none"
    """none; greedy (token-by-token search over the whole vocabulary); tuned (greedy, then the prefix's keys and
    values trained: CE + lambda_q x quantization error); outlier_tokens (training-free: BOS plus the tokens that
    carry the largest activations in calibration text, as PrefixQuant)."""
    max_prefix_len: int = 8
    """Longest prefix in tokens, the start token (BOS, or a newline where the tokenizer has no BOS) included. The
    paper does not report its limit; 8 bounds the search at 7 vocabulary sweeps."""
    tau: float = 0.5
    """Greedy: a token is appended only if it brings the error below tau x the error without it."""
    text_len: int = 512
    """Tokens of the calibration text scored at each greedy step (the paper: 512); also the tuning texts' length."""
    candidate_batch: int = 256
    """Candidate tokens evaluated per forward in the greedy search (each a [1 + text_len]-token sequence)."""
    candidates: int | None = None
    """Score only the first this many token ids (None: the whole vocabulary, as the paper; smaller for smoke runs)."""
    granularity: str = "per_tensor_dynamic"
    """Ranges of the search and tuning error: per_tensor_dynamic (= per_tensor_static within one text) or
    per_token_dynamic."""
    bits: int = 8
    """Activation bits of the error (asymmetric, scale (max - min) / (2^bits - 1))."""
    objective: str = "error"
    """error (L_q, the method section) or max (sum over linear inputs of max |x|, the abstract's wording)."""
    precision: str = "auto"
    """Search forwards: bf16 autocast (auto on GPUs) or fp32 (auto on the CPU). The error is summed in fp32."""
    compile: bool = True
    """Greedy search on a GPU: torch.compile the error (fused reductions; the search is bound by the passes
    over the activations). Ignored on the CPU; falls back to eager if compiling fails."""
    epochs: int = 2
    """Prefix tuning epochs (the paper: 2)."""
    lambda_q: float = 0.01
    """Weight of the quantization error in the tuning loss (the paper: 0.01); the error term is the mean squared
    error per element, summed over the linear inputs (the paper's sum would outweigh CE by ~1e6 at this lambda)."""
    lr: float = 1e-3
    """Adam learning rate of the prefix keys and values (not stated in the paper)."""
    tuning_texts: int = 256
    """Texts of text_len tokens cut from the calibration windows for tuning (the paper does not state its data)."""
    tuning_batch: int = 8
    """Texts per prefix-tuning step."""
    round_gradient: str = "zero"
    """Gradient of round() in the tuning error: zero (torch.round's own: d/dx ||x - q(x)||^2 = 2(x - q(x)) pulls
    each activation to its grid point) or ste (straight-through: with scales detached and taken from the same
    tensor almost nothing is clamped, so the error passes next to no gradient; kept to show it)."""
    outlier_ratio: float = 64.0
    """outlier_tokens: a token is an outlier where its max |x| at a block's last linear input exceeds this times
    the median over tokens (PrefixQuant's threshold)."""
    seed: int = 0
    """Which calibration windows the greedy steps and the tuning draw."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"cushion.method={self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        if self.granularity not in SEARCH_GRANULARITIES:
            raise ConfigError(f"cushion.granularity={self.granularity!r}: choose one of "
                              f"{', '.join(SEARCH_GRANULARITIES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"cushion.objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.round_gradient not in ROUND_GRADIENTS:
            raise ConfigError(f"cushion.round_gradient={self.round_gradient!r}: choose zero or ste")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"cushion.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.max_prefix_len < 1 or self.text_len < 2 or self.candidate_batch < 1 or self.epochs < 1:
            raise ConfigError(f"cushion: max_prefix_len ({self.max_prefix_len}), candidate_batch "
                              f"({self.candidate_batch}), epochs ({self.epochs}) must be >= 1 and text_len "
                              f"({self.text_len}) >= 2")
        if self.candidates is not None and self.candidates < 1:
            raise ConfigError(f"cushion.candidates={self.candidates} must be >= 1 or None (the whole vocabulary)")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"cushion.tau={self.tau} must be in (0, 1]")
        if not 2 <= self.bits <= 16:
            raise ConfigError(f"cushion.bits={self.bits} must be in [2, 16]")
        if self.lambda_q < 0 or not self.lr > 0 or self.tuning_texts < 1 or self.tuning_batch < 1:
            raise ConfigError(f"cushion: lambda_q ({self.lambda_q}) must be >= 0, lr ({self.lr}) > 0, tuning_texts "
                              f"({self.tuning_texts}) and tuning_batch ({self.tuning_batch}) >= 1")
        if not self.outlier_ratio > 1:
            raise ConfigError(f"cushion.outlier_ratio={self.outlier_ratio} must be > 1")

    @property
    def enabled(self) -> bool:
        return self.method != "none"
