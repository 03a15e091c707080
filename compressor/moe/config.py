"""The ``model.moe`` config group: G-MoEfication (Lee, Hwang, Park, Ji; EMNLP 2024; algorithms.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import ConfigError

VARIANTS = ("mean", "zero", "random")


@dataclass
class MoEConfig:
    """Dense FFNs into mixtures of experts: balanced k-means experts, a trained router per block, top-k at inference."""

    enabled: bool = False
    """Convert every block's FFN after pruning (and reconstruction, quantization)."""
    experts: int = 64
    """Experts E per FFN; must divide the FFN width (its number of neurons)."""
    k: int = 48
    """Experts run per token (1 <= k <= experts); k / experts is the active fraction."""
    variant: str = "mean"
    """What an unselected neuron contributes: mean (its calibration mean mu, G-MoEfication), zero (MoEfication),
    random (mean replacement with experts chosen at random per token: the random-router ablation)."""
    train_router: bool = True
    """Fit each router (False: the centroid-initialised router is used as is, the no-training ablation)."""
    epochs: int = 30
    """Router training epochs per block; the epoch with the best held-out recall is kept."""
    lr: float = 0.01
    """Adam learning rate of the router."""
    batch_size: int = 512
    """Tokens per router training step."""
    holdout: float = 0.1
    """Fraction of the router tokens held out to choose the best epoch."""
    router_tokens: int = 65536
    """Tokens per block the router trains on (and is held out from), drawn with the seed from all calibration tokens;
    mu always uses every calibration token. 65,536 of the protocol's 262,144 keeps 30 epochs at ~3,500 steps per
    block; 0 uses every token."""
    target_norm: str = "batch"
    """Router targets scaled into [0, 1] by the batch maximum (batch, the reference) or per token by its own maximum
    (token)."""
    recall_top: float = 0.2
    """Router quality: share of the target mass (sum over tokens of s_e) in the router's top ceil(recall_top * E)."""
    kmeans_max_iter: int = 100
    """Iterations of the balanced k-means (k-means-constrained) per block."""
    kmeans_jobs: int = 1
    """Blocks clustered in parallel processes (the k-means runs on the CPU); -1: one per core."""
    assignment: str | None = None
    """A moe.safetensors (or assignment-only file) whose blocks.<i>.assignment is used instead of clustering: the
    k-means done on another machine."""
    seed: int = 0
    """Seeds the k-means, the router token draw and split, training order and the random router."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"moe.variant={self.variant!r} is unknown: choose one of {', '.join(VARIANTS)}")
        if self.target_norm not in ("batch", "token"):
            raise ConfigError(f"moe.target_norm={self.target_norm!r}: choose batch or token")
        if self.experts < 1 or not 1 <= self.k <= self.experts:
            raise ConfigError(f"moe.experts={self.experts} must be >= 1 and moe.k={self.k} in [1, experts]")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"moe: epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1, "
                              f"lr ({self.lr}) > 0")
        if not 0 < self.holdout < 1 or not 0 < self.recall_top <= 1:
            raise ConfigError(f"moe.holdout={self.holdout} must be in (0, 1) and recall_top={self.recall_top} "
                              "in (0, 1]")
        if self.router_tokens < 0 or 0 < self.router_tokens < 2 * self.batch_size:
            raise ConfigError(f"moe.router_tokens={self.router_tokens}: 0 (all) or at least two batches "
                              f"({2 * self.batch_size})")
        if self.kmeans_max_iter < 1:
            raise ConfigError(f"moe.kmeans_max_iter={self.kmeans_max_iter} must be >= 1")

    @property
    def active_fraction(self) -> float:
        return self.k / self.experts


def check_width(name: str, width: int, experts: int) -> None:
    """ConfigError unless ``experts`` divides the FFN ``width`` of layer ``name``."""
    if width % experts:
        divisors = [e for e in (8, 16, 32, 64, 128, 256) if width % e == 0]
        raise ConfigError(f"moe.experts={experts} does not divide the FFN width {width} of {name}: experts must be "
                          f"equal-sized; divisors of {width} include {divisors or 'none of 8..256'}")
