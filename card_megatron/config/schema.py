"""The schema of the one typed configuration tree: its sections as dataclasses, with defaults.

Every field below (and of ``objectives/config.ObjectiveConfig``, the objective's section, which the
objectives package owns) has a one-line docstring under it: ``python -m card_megatron.train
--help-config`` and docs/config.md show them (``help.field_docs``). Enumerated values are Literal
types, or come from a registry (objective.name: the registered objectives): ``validation.validate``
checks them. Names follow Megatron-LM where it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from card_megatron.objectives.config import ObjectiveConfig


@dataclass
class ModelConfig:
    """The transformer (a Megatron-core GPT-style decoder)."""

    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads (must divide hidden_size and be divisible by the tensor-parallel size)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; none = one per head (multi-head attention)."""
    ffn_hidden_size: Optional[int] = None
    """Width of the gated SiLU MLP; none = 4 x hidden_size."""
    seq_length: int = 128
    """L: tokens the model reads per sample (samples hold L+1 tokens)."""
    vocab_size: Optional[int] = None
    """Vocabulary size; none = the tokenizer's (with <mask>), padded for tensor parallelism."""
    make_vocab_size_divisible_by: int = 128
    """Each tensor-parallel shard of the vocabulary is padded to a multiple of this."""
    rotary_base: int = 10000
    """RoPE base."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer (must be true with pipeline parallelism)."""
    recompute_activations: bool = False
    """Activation checkpointing of each layer (recompute in backward)."""
    fused_kernels: Optional[bool] = None
    """Megatron-core's fused SwiGLU and bias-dropout-add (torch.compile'd); none = on with CUDA."""
    compile_layers: Optional[bool] = None
    """Training: torch.compile each transformer layer (model/compile.py); none = on with CUDA, off on CPU."""


@dataclass
class DataConfig:
    """Token shards and the sample index built over them."""

    data_path: str = ""
    """Token shard prefix, or "w1 prefix1 w2 prefix2 ..." for a weighted blend (Megatron style)."""
    tokenizer_model: str = ""
    """SentencePiece model the shards were written with (tools/preprocess_data.py)."""
    split: str = "969,30,1"
    """Train, valid and test weights, by document (three non-negative numbers)."""
    cache_dir: Optional[str] = None
    """Sample-index cache directory; none = "{first data prefix}_index_cache"."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = read in the training process)."""
    valid_seed: Optional[int] = None
    """Seed of the valid/test samples (which sequences, noise seeds); none = train.seed; shared = same validation."""
    allow_missing_sidecar: bool = False
    """Train on a shard without its tokenizer sidecar ({output prefix}.tokenizer.json); nothing then checks
    that data.tokenizer_model made it."""


@dataclass
class ParallelConfig:
    """How the processes are laid out (world = tensor x pipeline x data parallel)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (Megatron-core layers; divides the heads and query groups)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (DeepSpeed's pipeline engine; divides num_layers)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 or 1 with pipeline parallelism)."""
    distributed_backend: Optional[Literal["nccl", "gloo"]] = None
    """torch.distributed backend; none = nccl with CUDA, gloo without."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule, gradient clipping and the weight EMA."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (<= lr)."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms and biases get none)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 = no clipping."""
    lr_warmup_iters: int = 100
    """Linear warmup steps."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""
    lr_decay_iters: Optional[int] = None
    """Steps of warmup + decay; none = train.train_iters."""
    freeze_layers: int = 0
    """The first N transformer layers keep their weights (no gradient, no optimizer state); the
    embedding (with the mask row), the later layers and the output train; 0 = everything trains."""
    ema_decay: float = 0.0
    """Weight EMA after every applied step: ema = decay * ema + (1 - decay) * weights; 0 = off (MDLM, BD3LM: 0.9999)."""
    ema_warmup: bool = True
    """EMA warm-up (MDLM's): the n-th update uses min(ema_decay, (1 + n) / (10 + n)) instead of ema_decay."""


@dataclass
class TrainConfig:
    """Steps, batches, precision, intervals and the run directory."""

    train_iters: int = 1000
    """Optimizer steps of the whole run."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    global_batch_size: int = 32
    """Samples per optimizer step = micro_batch_size x data parallel x gradient accumulation."""
    seed: int = 1234
    """Seed of the initial weights, the data order and every noise seed."""
    run_dir: str = "runs/default"
    """Run directory: config, metrics, checkpoints; a restart with the same one resumes."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision; auto = bf16 on GPU, fp32 on CPU."""
    save_interval: int = 0
    """Save a checkpoint every this many steps; 0 = only at the end or on a signal."""
    export_interval: int = 1
    """Write the export (export/: safetensors shards per TP/PP rank and their index) at every this many
    saves: 1 = every save, N = the saves at multiples of N x save_interval, 0 = only the final save;
    always at the end of the run (large models: 0 or N)."""
    keep_last_checkpoints: int = 3
    """Checkpoints kept in the run directory (older ones are deleted)."""
    exit_interval: int = 0
    """Save and exit after this many steps of this run; 0 = off."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    eval_interval: int = 0
    """Validate every this many steps; 0 = only at the start and at the end."""
    eval_iters: int = 10
    """Validation batches (of global_batch_size samples) per evaluation."""
    eval_ema: bool = False
    """Also validate the EMA weights (needs optim.ema_decay > 0): ema_val_nll, ema_val_ppl."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a non-finite loss (each skipped) that stop the run; 0 = no check (no sync)."""
    trust_checkpoint: bool = False
    """Resume with torch.load(weights_only=False): only for run directories you trust."""
    drop_ema: bool = False
    """Resume a checkpoint that holds an EMA with optim.ema_decay=0, dropping the EMA (refused without it)."""
    init_from: Optional[str] = None
    """Start a new run from these weights (tools/import_hf.py output, an export, checkpoint or run
    directory) at step 0 with a fresh optimizer and schedule; the model architecture keys and
    data.tokenizer_model default to the checkpoint's; ignored once train.run_dir has a checkpoint."""


@dataclass
class LoggingConfig:
    """wandb and CARD's diagnostics."""

    wandb: bool = False
    """Log to Weights & Biases (into the run directory)."""
    wandb_project: str = "card_megatron"
    """wandb project."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: offline unless you ask for online."""
    wandb_name: Optional[str] = None
    """wandb run name; none = wandb's."""
    corruption_metrics: bool = True
    """CARD, pipeline size 1: NLL and top-1 accuracy by the number of masks before the target."""
    probe_window: int = 8
    """CARD, pipeline size 1: K of the validation mask probe (clean prefix + k masks, k < K); 0 = off."""
    probe_min_prefix: int = 1
    """CARD: the probe's shortest clean prefix (cuts in [this, seq_length - probe_window + 1]), e.g. a prompt."""
    probe_cuts: int = 1
    """CARD: probe cuts per validation sample (a pass each); predictions per k = validation samples x this."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
