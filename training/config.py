"""``TrainConfig``: every option of ``llama3-sae train`` / ``torchrun -m training``, one docstring per field.

``llama3_sae.config.add_dataclass_args`` turns the fields into command-line options (the help text is the
docstring), and the same object is saved as ``train_config.json`` beside the trained SAE and inside
every checkpoint, so ``--help``, config files and saved run configs never disagree.

Defaults are the original project's (AdamW lr 5e-5, betas (0.85, 0.9999), eps 6.25e-10, cosine to
lr / 5, batch 1024 per rank, k 64, k_aux 2048, aux coefficient 1/32) with its bugs fixed: the schedule
steps every optimizer step, dead latents are counted in tokens, validation rows are a random held-out
split.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Architecture = Literal["topk", "batchtopk"]
Normalization = Literal["none", "per_token", "dataset"]
KShape = Literal["linear", "exponential"]
WandbMode = Literal["offline", "online"]


@dataclass
class TrainConfig:
    """``llama3-sae train``: train a TopK sparse autoencoder on an activation store."""

    store: Path
    """Activation store to train on (a directory with manifest.json), ideally the shuffled copy that
    ``llama3-sae preprocess`` writes (STORE/shuffled). d_model, site and model name come from its
    manifest; b_pre and the input normalisation from its statistics."""
    out: Path
    """Output directory: the trained SAE (config.json + sae.safetensors), train_config.json,
    metrics.jsonl, metrics_summary.json, plots and checkpoints/. Re-running the same command resumes."""
    target_store: Path | None = None
    """Train a transcoder: --store holds block L's MLP input (L{L}MI) and this store its MLP output (L{L}M),
    captured in the same run (capture --sites L{L}TC) and, if shuffled, preprocessed with the same --seed.
    The SAE then predicts the MLP output (site L{L}TC); its metrics are of that prediction."""

    # ------------------------------------------------------------------ the SAE
    n_latents: int = 65536
    """Number of latents (dictionary size). With --model-parallel M it must be divisible by M."""
    k: int = 64
    """Active latents per token (TopK), or per token on average over a batch (BatchTopK)."""
    architecture: Architecture = "topk"
    """topk: k latents per token. batchtopk: the k x batch largest activations of the whole (per-rank)
    batch, with a learned threshold for inference."""
    normalization: Normalization = "dataset"
    """Input normalisation: dataset (x * sqrt(d_model) / mean ||x|| from the store statistics, Llama
    Scope's), per_token ((x - mean) / (std + 1e-6) per token) or none."""
    k_aux: int = 2048
    """Dead latents each token uses in the aux-k loss (OpenAI's auxiliary loss that revives dead latents)."""
    aux_coeff: float = 1 / 32
    """Weight of the aux-k loss."""
    dead_after_tokens: int = 10_000_000
    """A latent is dead (and trained by the aux-k loss) after this many training tokens without firing,
    counted over all ranks (OpenAI's TopK SAEs use 10M tokens)."""
    k_anneal_start: int | None = None
    """k-annealing (Llama Scope): k at step 0, falling to --k over --k-anneal-steps. None: no annealing."""
    k_anneal_steps: int = 0
    """Steps over which k falls from --k-anneal-start to --k."""
    k_anneal_shape: KShape = "linear"
    """How k falls: linear in k, or exponential (linear in log k)."""
    seed: int = 0
    """Seed of the weight initialisation, the held-out split and the data order."""

    # ------------------------------------------------------------------ optimisation
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.85, 0.9999)
    """AdamW betas."""
    eps: float = 6.25e-10
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay. 0, as OpenAI and sparsify train: any decay shrinks the encoder rows against a
    unit-norm decoder."""
    warmup_steps: int = 1000
    """Linear warm-up from 0 to --lr over this many steps (capped at the run's length)."""
    lr_final_ratio: float = 0.2
    """The cosine schedule ends at lr x this ratio. Stepped every step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    batch_size: int = 1024
    """Rows (tokens) per optimizer step on each data-parallel rank; the global batch is this x the number
    of data-parallel ranks."""
    steps: int | None = None
    """Optimizer steps in total. Default: --epochs over the training rows, rounded up."""
    epochs: float = 1.0
    """Passes over the training rows when --steps is not given."""
    bf16: bool = False
    """Compute the encoder matmul that picks each token's latents (the step's floor) in bfloat16: several times
    faster on CPUs with AMX or AVX-512-BF16 and on GPUs, slower on CPUs without (measured in
    benchmarks/RESULTS.md). The kept latents' values, the decoder, the losses, all gradients and the optimizer
    stay float32; near-ties may pick other latents than a float32 selection. Validation stays float32."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); the saved SAE
    and the validation then use the average."""

    # ------------------------------------------------------------------ data
    val_fraction: float = 0.01
    """Fraction of the store's rows held out for validation, drawn at random over all rows (seeded)."""
    val_max_rows: int = 65536
    """At most this many held-out rows."""
    shuffle_window: int = 4
    """Shards whose rows are shuffled together each epoch (the shard order is shuffled too)."""
    prefetch: int = 2
    """Batches read ahead by a background thread (0: read in the training thread)."""

    # ------------------------------------------------------------------ parallelism and device
    model_parallel: int = 1
    """Split the latents over this many ranks (DeviceMesh "model" dimension, DTensor shards, global TopK);
    the remaining world size is data parallel."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    dist_timeout_min: float = 30.0
    """torch.distributed timeout in minutes."""

    # ------------------------------------------------------------------ checkpoints
    checkpoint_every: int = 1000
    """Write a full training checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in OUT/checkpoints; older ones are deleted after a newer one is complete."""
    resume: bool = True
    """Continue from the newest checkpoint in OUT/checkpoints when there is one."""
    overwrite: bool = False
    """Delete OUT's checkpoints and metrics and start over."""

    # ------------------------------------------------------------------ logging and outputs
    log_every: int = 50
    """Log training metrics (table, metrics.jsonl, W&B) every this many steps."""
    val_every: int = 1000
    """Evaluate on the held-out rows every this many steps (0: only at the end)."""
    progress: bool = True
    """Show the progress bar and the metrics table."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; offline unless --wandb-mode online)."""
    wandb_project: str = "llama3-sae"
    """W&B project name."""
    wandb_mode: WandbMode = "offline"
    """W&B mode: offline writes the run under OUT/wandb for a later ``wandb sync``."""
    plots: bool = True
    """Write PNG plots of the training curves at the end (needs matplotlib; skipped with a note without it)."""
    jumprelu: bool = False
    """Also write a JumpReLU version of the SAE with the same L0 to OUT/jumprelu (Llama Scope's
    post-processing), fitted on training rows."""
    jumprelu_rows: int = 65536
    """Training rows used to fit the JumpReLU thresholds."""

    def __post_init__(self) -> None:
        self.store, self.out = Path(self.store), Path(self.out)
        if self.target_store is not None:
            self.target_store = Path(self.target_store)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        problems: list[str] = []

        def positive(name: str) -> None:
            if not getattr(self, name) > 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

        for name in ("n_latents", "k", "batch_size", "lr", "eps", "dead_after_tokens", "checkpoint_every",
                     "keep_checkpoints", "log_every", "shuffle_window", "model_parallel", "dist_timeout_min",
                     "jumprelu_rows", "val_max_rows", "epochs"):
            positive(name)
        if self.k > self.n_latents:
            problems.append(f"--k {self.k} exceeds --n-latents {self.n_latents}")
        if self.k_aux < 0:
            problems.append(f"--k-aux must be >= 0 (0 disables the aux-k loss), got {self.k_aux}")
        if self.aux_coeff < 0:
            problems.append(f"--aux-coeff must be >= 0, got {self.aux_coeff}")
        if self.k_anneal_start is not None:
            if not self.k <= self.k_anneal_start <= self.n_latents:
                problems.append(f"--k-anneal-start {self.k_anneal_start} must be between --k {self.k} and "
                                f"--n-latents {self.n_latents}")
            if self.k_anneal_steps <= 0:
                problems.append("--k-anneal-start needs --k-anneal-steps > 0")
        elif self.k_anneal_steps:
            problems.append("--k-anneal-steps needs --k-anneal-start (the k to start from)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"--betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            problems.append(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.lr_final_ratio <= 1:
            problems.append(f"--lr-final-ratio must be in [0, 1], got {self.lr_final_ratio}")
        if self.grad_clip < 0:
            problems.append(f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.steps is not None and self.steps <= 0:
            problems.append(f"--steps must be > 0, got {self.steps}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if not 0 < self.val_fraction < 0.5:
            problems.append(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.prefetch < 0:
            problems.append(f"--prefetch must be >= 0, got {self.prefetch}")
        if self.val_every < 0:
            problems.append(f"--val-every must be >= 0, got {self.val_every}")
        if self.model_parallel > 1:
            if self.n_latents % self.model_parallel:
                problems.append(f"--n-latents {self.n_latents} must be divisible by --model-parallel "
                                f"{self.model_parallel} (each rank holds an equal slice of the latents)")
            if self.architecture != "topk":
                problems.append("--model-parallel > 1 supports --architecture topk only")
            if self.bf16:
                problems.append("--bf16 trains with data parallelism only; drop --model-parallel or --bf16")
        if self.target_store is not None:
            if self.model_parallel > 1:
                problems.append("--target-store (a transcoder) trains with data parallelism only; drop --model-parallel")
            if self.normalization == "per_token":
                problems.append("--target-store (a transcoder) needs --normalization dataset or none: per-token "
                                "statistics of the MLP input say nothing about the scale of its output")
        if self.resume and self.overwrite:
            problems.append("--overwrite starts over; it cannot be combined with --resume (pass --no-resume)")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))

    # Options that may change between a run and its resumption: they do not change the trained weights.
    # batch_size may change with the number of ranks as long as the global batch stays (checked on resume).
    FREE_ON_RESUME = frozenset({
        "out", "batch_size", "prefetch", "model_parallel", "device", "dist_timeout_min", "checkpoint_every",
        "keep_checkpoints",
        "resume", "overwrite", "log_every", "val_every", "progress", "wandb", "wandb_project", "wandb_mode", "plots",
        "jumprelu", "jumprelu_rows",
    })

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the run that wrote the checkpoint."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in self.FREE_ON_RESUME:
                continue
            v = getattr(self, f.name)
            if isinstance(v, Path):
                v = str(v.resolve())
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def total_steps(self, train_rows: int, data_parallel: int) -> int:
        """Optimizer steps of the run: --steps, or --epochs over ``train_rows`` at the global batch."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * train_rows / (self.batch_size * data_parallel)))
