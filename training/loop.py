"""The training loop: one ``Trainer`` for every layout (one process, DDP, latent-sharded).

A step is: forward (under DDP, so gradients are all-reduced as backward runs), backward, projection of
the decoder gradients onto the unit sphere, gradient clipping, AdamW, the learning-rate schedule (every
step), decoder renormalisation, dead-latent counters (all-reduced with MIN), EMA. Every rank holds the
same all-reduced gradients when it projects, clips and steps, so the replicas stay identical.

Where the parameters live is the layout's business (``training.layouts``): ``Replicated`` for one
process or DDP, ``LatentSharded`` (``training.sharded``) for --model-parallel > 1. The trainer calls the
layout for the forward, the gradient and decoder operations and whole-tensor state, and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from llama3_sae.config import identity_differences, save_config, to_jsonable
from llama3_sae.errors import RankZeroDecision
from llama3_sae.dist import DistContext
from llama3_sae.prefetch import Prefetcher
from llama3_sae.sites import transcoder_site
from sae import DeadLatentTracker, KSchedule, SAEConfig, SparseAutoencoder
from sae.io import load_state

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import StoreRows, TrainStream, val_batches
from .layouts import Replicated
from .schedule import lr_factor, schedule_warnings
from .sharded import LatentSharded
from .outputs import NonFiniteError, decide_out, save_outputs
from .logging import METRICS_FILE, MetricsLog, TrainDisplay, read_metrics

CONFIG_FILE = "train_config.json"
B_PRE_SAMPLE_ROWS = 65536
"""Training rows used to set b_pre when it cannot come from the store statistics (per-token normalisation)."""


def layout_for(cfg: TrainConfig, ctx: DistContext) -> Replicated:
    """Latent-sharded when --model-parallel > 1, else replicated (one process or DDP)."""
    return LatentSharded(cfg, ctx) if cfg.model_parallel > 1 else Replicated(cfg, ctx)


@dataclass
class TrainResult:
    out: Path
    steps: int
    summary: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains one SAE on an activation store with the layout of ``ctx`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, console: Console | None = None,
                 layout: Replicated | None = None):
        self.cfg, self.ctx = cfg, ctx
        # soft_wrap: long paths in redirected logs stay on one line.
        self.console = console or Console(stderr=True, quiet=not ctx.is_main, soft_wrap=True)
        self.device = ctx.device
        self.out = Path(cfg.out)
        self.rows = StoreRows(cfg.store, val_fraction=cfg.val_fraction, val_max_rows=cfg.val_max_rows, seed=cfg.seed,
                              target=cfg.target_store)
        site = self.rows.site if self.rows.target is None else _transcoder_of_stores(self.rows.site, self.rows.target.site)
        self.stream = TrainStream(self.rows, batch_size=cfg.batch_size, data_parallel=ctx.data_parallel,
                                  dp_rank=ctx.dp_rank, shuffle_window=cfg.shuffle_window, seed=cfg.seed)
        self.total_steps = cfg.total_steps(self.rows.num_train_rows, ctx.data_parallel)
        self.k_schedule = KSchedule(k=cfg.k, k_start=cfg.k_anneal_start or cfg.k, anneal_steps=cfg.k_anneal_steps,
                                    shape=cfg.k_anneal_shape)
        self.sae_cfg = SAEConfig(d_model=self.rows.d_model, n_latents=cfg.n_latents, architecture=cfg.architecture,
                                 k=cfg.k, normalization=cfg.normalization, site=site,
                                 # A transcoder's b_pre is the output's mean: it has no business on the input.
                                 apply_b_pre_to_input=self.rows.target is None,
                                 model_name=self.rows.model_name, prepend_bos=self.rows.bos,
                                 first_token_excluded=self.rows.first_token_excluded,
                                 source={"trained_by": "llama3-sae train", "store": str(self.rows.path)})
        self.use_aux = cfg.k_aux > 0 and cfg.aux_coeff > 0
        self.step = 0
        self.start_step = 0
        self.elapsed_before = 0.0
        sae = SparseAutoencoder(self.sae_cfg, seed=cfg.seed)
        self.init_from_data(sae)
        self.layout = layout or layout_for(cfg, ctx)
        self.layout.build(sae.to(self.device))
        self.tracker = DeadLatentTracker(self.layout.n_local, cfg.dead_after_tokens, device=self.device)
        self.optimizer = torch.optim.AdamW([p for _, p in self.layout.parameters()], lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                                           fused=self.layout.fused_optimizer())
        warmup = min(cfg.warmup_steps, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup=warmup, total=self.total_steps, final_ratio=cfg.lr_final_ratio))
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ema_decay is not None:
            self.ema = {n: t.detach().clone() for n, t in self.layout.local_tensors()}

    @property
    def sae(self) -> SparseAutoencoder | None:
        """The whole SAE being trained (None when its latents are sharded)."""
        return self.layout.sae

    # ================================================================== counters
    def update_dead(self, fired: torch.Tensor) -> None:
        self.tracker.update(fired, n_tokens=self.stream.global_batch)
        if self.ctx.data_parallel > 1:
            self.tracker.all_reduce_(group=self.ctx.dp_group)

    def dead_fraction(self) -> float:
        n = self.layout.sum_over_latent_shards(self.tracker.dead_mask.sum().reshape(1).to(torch.int64))
        return int(n) / self.cfg.n_latents

    def dead_over_training(self) -> tuple[int, float]:
        """(window, share of latents that did not fire in the last ``window`` training rows), the window being
        --dead-after-tokens or, for a shorter run, the whole run."""
        window = max(1, min(self.cfg.dead_after_tokens, self.step * self.stream.global_batch))
        return window, float((self.tracker.tokens_since_fired >= window).float().mean())

    def dead_mask(self) -> torch.Tensor | None:
        return self.tracker.dead_mask if self.use_aux else None

    # ================================================================== setup
    def init_from_data(self, sae: SparseAutoencoder) -> None:
        """b_pre and the input normalisation from the store's preprocess statistics (per-token
        normalisation: b_pre from a sample of training rows, since it is a mean in the normalised space)."""
        cfg = self.cfg
        stats = self.rows.stats
        if cfg.normalization == "per_token":
            n = min(B_PRE_SAMPLE_ROWS, self.rows.num_train_rows)
            sae.init_b_pre_(self.rows.gather(self.stream.stream_ids(0, n)).float())
            return
        if stats is None:
            raise ValueError(f"{self.rows.path} has no statistics; run "
                             f"`llama3-sae preprocess --store {self.rows.path}` "
                             "first (training takes b_pre and the input normalisation from them), or train with "
                             "--normalization per_token")
        mean = stats["mean"].double()
        out_stats = stats
        if self.rows.target is not None:  # a transcoder: b_pre and the output scale come from the MLP output
            out_stats = self.rows.target.stats
            if out_stats is None:
                raise ValueError(f"{self.rows.target.path} has no statistics; run `llama3-sae preprocess --store "
                                 f"{self.rows.target.path}` first")
            mean = out_stats["mean"].double()
        if cfg.normalization == "dataset":
            sae.set_dataset_norm(float(stats["mean_norm"][0]), float(out_stats["mean_norm"][0]))
            # b_pre lives in the normalised (output) space: the mean of y * scale (no shift) is mean * scale.
            mean = mean * float(sae.norm_out_scale)
        with torch.no_grad():
            sae.b_pre.copy_(mean.to(sae.b_pre.dtype))

    # ================================================================== one step
    def train_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``: rows, or (input, target) rows for a transcoder."""
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        k = self.k_schedule(self.step)
        lr = self.optimizer.param_groups[0]["lr"]
        layout = self.layout
        self.optimizer.zero_grad(set_to_none=True)
        out = layout.forward(x, k, self.dead_mask(), y)
        out.loss.backward()  # under DDP the gradients are averaged over ranks when this returns
        layout.reduce_gradients()
        layout.project_decoder_grad_()
        grad_norm = layout.clip_grad_norm_()
        self.optimizer.step()
        self.scheduler.step()
        layout.normalize_decoder_()
        layout.sync_after_step()
        self.update_dead(out.fired)
        if self.ema is not None:
            for name, t in layout.local_tensors():
                self.ema[name].lerp_(t, 1 - self.cfg.ema_decay)
        self.step += 1
        xf = (x if y is None else y).float()
        ev = 1 - (out.x_hat.float() - xf).pow(2).sum() / (xf - xf.mean(0)).pow(2).sum().clamp_min(1e-30)
        return {"loss": out.loss.detach().float(), "mse": out.mse.float(), "aux_loss": out.aux_loss.float(),
                "l0": out.l0.float(), "explained_variance": ev.float(), "grad_norm": grad_norm.detach().float(),
                "lr": torch.tensor(lr), "k": torch.tensor(float(k))}

    # ================================================================== validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Metrics on the held-out rows (all of them, split over data-parallel ranks): L0, MSE in the
        normalised space (the training loss) and in the input's space, explained variance (input space),
        dead (never fired on these rows) and dense (fired on > 10% of them) fractions."""
        d = self.rows.d_model
        # err^2, sum x^2, active latents, rows, normalised squared error
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        sum_x = torch.zeros(d, dtype=torch.float64, device=self.device)
        counts = None
        for batch in val_batches(self.rows, self.cfg.batch_size, self.ctx.dp_rank, self.ctx.data_parallel):
            x, y = batch if isinstance(batch, tuple) else (batch, None)
            x = x.to(self.device)
            y = None if y is None else y.to(self.device)
            x_hat, active, c, mse_n = self.layout.eval_batch(x, y)
            xd = (x if y is None else y).double()  # what was reconstructed: a transcoder's MLP output
            n_rows = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=self.device)
            sums += torch.stack([(x_hat.double() - xd).pow(2).sum(), xd.pow(2).sum(), active.double(), n_rows,
                                 mse_n.double() * x.numel()])
            sum_x += xd.sum(0)
            counts = c if counts is None else counts + c
        if counts is None:  # this rank's share of the held-out rows is empty
            counts = torch.zeros(self.layout.n_local, dtype=torch.int64, device=self.device)
        if self.ctx.data_parallel > 1:
            for t in (sums, sum_x, counts):
                dist.all_reduce(t, group=self.ctx.dp_group)
        err2, sum_x2, active, n, err2_n = sums.tolist()
        dead = self.layout.sum_over_latent_shards(
            torch.tensor([float((counts == 0).sum()), float((counts > 0.1 * n).sum())], device=self.device))
        total_var = sum_x2 - float(sum_x.pow(2).sum()) / n
        return {"l0": active / n, "mse": err2_n / (n * d), "mse_raw": err2 / (n * d),
                "explained_variance": 1 - err2 / total_var,
                "dead_fraction": float(dead[0]) / self.cfg.n_latents,
                "dense_fraction": float(dead[1]) / self.cfg.n_latents,
                "rows": int(n)}

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily put the EMA weights in place of the live ones (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        with torch.no_grad():
            backup = {n: t.clone() for n, t in self.layout.local_tensors()}
            for n, t in self.layout.local_tensors():
                t.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in self.layout.local_tensors():
                    t.copy_(backup[n])

    # ================================================================== checkpoints
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything a resumed run needs, as whole tensors (collective when sharded)."""
        layout = self.layout
        names = [n for n, _ in layout.parameters()]
        tensors = {f"model.{k}": v for k, v in layout.full_state().items()}
        optim_tensors, groups = ckpt.flatten_optimizer(layout.optimizer_state(self.optimizer), names)
        tensors.update(optim_tensors)
        tensors.update({f"tracker.{k}": v for k, v in layout.gather(
            {"tokens_since_fired": self.tracker.tokens_since_fired}).items()})
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in layout.gather(dict(self.ema)).items()})
        tensors.update(ckpt.rng_tensors())
        meta = {
            "rows_consumed": self.step * self.stream.global_batch,
            "global_batch": self.stream.global_batch,
            "epoch": self.stream.epoch_of(self.step),
            "total_steps": self.total_steps,
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self._t0),
            "scheduler": self.scheduler.state_dict(),
            "optimizer_param_groups": groups,
            "identity": self.cfg.identity(),
            "store_content": self.rows.fingerprint,
            "config": to_jsonable(self.cfg),
            "sae_config": self.sae_cfg.to_dict(),
            "world": self.ctx.world,
            "model_parallel": self.ctx.model_parallel,
        }
        return tensors, meta

    def _non_finite_message(self, step: int, what: str) -> str:
        return (f"the {what} became non-finite at step {step:,} (batch {step - 1:,} of the stream from "
                f"{self.rows.path}); stopping without saving. The shards' sha256 matched the manifest, so the activations "
                "were written this way: look for inf/NaN in the capture (e.g. fp16 overflow: capture with --dtype "
                "bf16 or fp32), or lower --lr")

    def _check_finite(self) -> None:
        bad = [n for n, p in self.layout.parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteError(f"refusing to save: {', '.join(bad)} hold non-finite values at step {self.step:,}")

    def save_checkpoint(self) -> None:
        self._check_finite()
        tensors, meta = self.checkpoint_state()
        if self.ctx.is_main:
            ckpt.save_checkpoint(ckpt.checkpoint_root(self.out), self.step, tensors, meta, self.cfg.keep_checkpoints)
        self.ctx.barrier()

    def restore(self, path: Path) -> None:
        tensors, meta = ckpt.load_checkpoint(path)
        diffs = identity_differences(meta.get("identity", {}), self.cfg.identity())
        refuse = RankZeroDecision  # every rank reads the same checkpoint: the job says it once
        if diffs:
            raise refuse(f"{path} was written by a run with different options ({diffs}). Re-run with the original "
                         "options to resume, or pass --overwrite (or another --out) to start over.")
        recorded = meta.get("store_content")
        if recorded is not None and recorded != self.rows.fingerprint:
            raise refuse(f"{path} was trained on other data: the store at {self.rows.path} was rewritten since (its "
                         "manifest lists other shards or hashes), and resuming would mix the two. Pass --overwrite "
                         "(or another --out) to train on the new store from the start.")
        if meta["total_steps"] != self.total_steps:
            raise refuse(f"{path}: the run was planned for {meta['total_steps']} steps, this one for "
                         f"{self.total_steps} (the store changed?); pass --overwrite to start over")
        if meta["global_batch"] != self.stream.global_batch:
            raise refuse(f"{path}: the run used a global batch of {meta['global_batch']} rows per step, this one "
                         f"{self.stream.global_batch} (--batch-size x data-parallel ranks); keep it to resume")
        layout = self.layout
        names = [n for n, _ in layout.parameters()]
        layout.load_full_state({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optim = ckpt.unflatten_optimizer(tensors, meta["optimizer_param_groups"], names)
        layout.load_optimizer_state(self.optimizer, optim)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.tracker.load_state_dict({"tokens_since_fired": layout.piece(
            "tokens_since_fired", tensors["tracker.tokens_since_fired"]).to(self.device),
            "dead_after_tokens": self.cfg.dead_after_tokens})
        if self.ema is not None:
            for n in self.ema:
                self.ema[n].copy_(layout.piece(n, tensors[f"ema.{n}"]))
        ckpt.restore_rng(tensors)
        self.step = self.start_step = int(meta["step"])
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))

    def prepare_out(self) -> Path | None:
        """Create OUT, apply --overwrite / --resume, and return the checkpoint to resume from (or None)."""
        root = ckpt.checkpoint_root(self.out)
        decision: tuple[str, str] = ("ok", "")
        if self.ctx.is_main:
            decision = decide_out(self.out, self.cfg, root)
        decision = self.ctx.broadcast_object(decision)
        if decision[0] == "error":
            raise RankZeroDecision(decision[1])
        latest = decision[1] or None
        self.ctx.barrier()
        return Path(latest) if latest else None

    # ================================================================== the run
    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        latest = self.prepare_out()
        if latest is not None:
            self.restore(latest)
        if ctx.is_main:
            save_config(cfg, self.out / CONFIG_FILE)
        self._t0 = time.perf_counter()
        log = None
        if ctx.is_main:
            log = MetricsLog(self.out, resume_step=self.step if latest is not None else None, wandb=cfg.wandb,
                             wandb_project=cfg.wandb_project, wandb_mode=cfg.wandb_mode, config=to_jsonable(cfg))
        try:
            self._describe(latest)
            self._train(log)
            summary = self._finish(log)
        finally:
            if log is not None:
                log.close()
        return TrainResult(self.out, self.step, summary)

    def _describe(self, latest: Path | None) -> None:
        cfg, ctx, rows = self.cfg, self.ctx, self.rows
        c = self.console
        c.print(f"[bold]llama3-sae train[/bold]: {rows.path} ({rows.num_rows:,} rows, d_model {rows.d_model}, site "
                f"{rows.site}); {rows.num_train_rows:,} training rows, {len(rows.val_ids):,} held out", highlight=False)
        if rows.target is not None:
            c.print(f"transcoder {self.sae_cfg.site}: predicts {rows.target.path} ({rows.target.site}) from it, row for "
                    "row", highlight=False)
        layout = f"{ctx.world} process(es)" + (f" = {ctx.data_parallel} data x {ctx.model_parallel} model parallel"
                                               if ctx.world > 1 else "")
        c.print(f"SAE {cfg.architecture} n_latents {cfg.n_latents:,} k {cfg.k}; {self.total_steps:,} steps of "
                f"{self.stream.global_batch:,} rows ({self.stream.epoch_of(self.total_steps):.2f} epochs); {layout} on "
                f"{self.device}", highlight=False)
        if not rows.shuffled:
            shuffled = rows.store.manifest.shuffled_store
            hint = (f"; its shuffled copy is {rows.path / shuffled}" if shuffled else
                    "; `llama3-sae preprocess` writes a globally shuffled copy")
            c.print(f"note: this store is not globally shuffled, so rows are mixed only within windows of "
                    f"--shuffle-window {cfg.shuffle_window} shards{hint}", highlight=False)
        for warning in schedule_warnings(cfg, self.total_steps, self.stream.global_batch):
            c.print(f"warning: {warning}", highlight=False)
        if latest is not None:
            c.print(f"resuming from {latest} (step {self.step:,})", highlight=False)

    def _train(self, log: MetricsLog | None) -> None:
        cfg, ctx = self.cfg, self.ctx
        display = TrainDisplay(self.console, self.total_steps, self.step, enabled=cfg.progress and ctx.is_main)
        # Batches depend only on (seed, step): reading them ahead cannot change what is trained on.
        prefetch = Prefetcher((self.stream.batch(s) for s in range(self.step, self.total_steps)), cfg.prefetch,
                              name="sae-data-prefetch")
        acc: dict[str, torch.Tensor] = {}
        n_acc = 0
        window_t0, window_step = time.perf_counter(), self.step
        try:
            with display:
                while self.step < self.total_steps:
                    batch = next(prefetch)
                    if isinstance(batch, tuple):
                        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                    else:
                        batch = batch.to(self.device, non_blocking=True)
                    metrics = self.train_step(batch)
                    if not self.ctx.distributed and not bool(torch.isfinite(metrics["loss"])):
                        raise NonFiniteError(self._non_finite_message(self.step, "loss"))
                    for key, v in metrics.items():
                        acc[key] = acc[key] + v if key in acc else v.clone()
                    n_acc += 1
                    display.advance(self.step)
                    last = self.step == self.total_steps
                    if self.step % cfg.log_every == 0 or last:
                        now = time.perf_counter()
                        record = self._train_record(acc, n_acc, now - window_t0, self.step - window_step)
                        acc, n_acc, window_t0, window_step = {}, 0, now, self.step
                        if not math.isfinite(record.get("loss", 0.0)):  # all-reduced: every rank stops here
                            raise NonFiniteError(self._non_finite_message(self.step, "mean loss since the last log"))
                        if log is not None:
                            log.log(record)
                        display.add(record)
                    if cfg.val_every and self.step % cfg.val_every == 0 and not last:
                        record = self._val_record()
                        if log is not None:
                            log.log(record)
                    if self.step % cfg.checkpoint_every == 0 or last:
                        self.save_checkpoint()
        finally:
            prefetch.close()

    def _train_record(self, acc: dict[str, torch.Tensor], n: int, seconds: float, steps: int) -> dict[str, Any]:
        keys = sorted(acc)
        vec = torch.stack([acc[k].to(self.device, torch.float64) for k in keys]) / max(n, 1)
        if self.ctx.distributed:
            dist.all_reduce(vec)
            vec /= self.ctx.world
        values = dict(zip(keys, vec.tolist()))
        tokens_per_s = steps * self.stream.global_batch / seconds if seconds > 0 else math.nan
        remaining = (self.total_steps - self.step) * self.stream.global_batch
        record = {"split": "train", "step": self.step, "tokens": self.step * self.stream.global_batch,
                  "epoch": self.stream.epoch_of(self.step), **values, "k": round(values["k"]),
                  "dead_fraction": self.dead_fraction(), "tokens_per_s": tokens_per_s,
                  "eta_s": remaining / tokens_per_s if tokens_per_s > 0 else math.nan,
                  "elapsed_s": self.elapsed_before + time.perf_counter() - self._t0}
        return record

    def _val_record(self) -> dict[str, Any]:
        with self.ema_weights():
            values = self.validate()
        return {"split": "val", "step": self.step, "tokens": self.step * self.stream.global_batch,
                "epoch": self.stream.epoch_of(self.step), **values}

    # ================================================================== the end
    def final_sae(self) -> SparseAutoencoder | None:
        """The trained SAE on rank 0 (None elsewhere): the live weights, or the EMA with its decoder
        norms folded into the encoder so that every decoder row has unit norm again."""
        state = self.layout.full_state(self.ema)
        if not self.ctx.is_main:
            return None
        sae = SparseAutoencoder(self.sae_cfg, seed=None)
        load_state(sae, {k: v.detach().cpu() for k, v in state.items()}, where="trained SAE")
        if self.ema is not None:
            sae.fold_decoder_norms_()  # an average of unit-norm rows is shorter than unit
        return sae

    def _finish(self, log: MetricsLog | None) -> dict[str, Any]:
        cfg = self.cfg
        val = self._val_record()
        sae = self.final_sae()
        summary: dict[str, Any] = {}
        if self.ctx.is_main:
            assert sae is not None and log is not None
            records = read_metrics(self.out / METRICS_FILE)
            # A run resumed after it had finished training repeats only this step: report it once.
            if not any(r.get("split") == "val" and r.get("step") == self.step for r in records):
                log.log(val)
                records.append(val)
            window, dead = self.dead_over_training()
            run = {"steps": self.step, "resumed_from_step": self.start_step,
                   "tokens": self.step * self.stream.global_batch,
                   "epochs": self.stream.epoch_of(self.step), "global_batch": self.stream.global_batch,
                   "world": self.ctx.world, "model_parallel": self.ctx.model_parallel,
                   "elapsed_s": self.elapsed_before + time.perf_counter() - self._t0,
                   "ema": cfg.ema_decay is not None}
            summary = save_outputs(sae, val, records, run, dead=(window, dead), rows=self.rows, stream=self.stream,
                                   cfg=cfg, console=self.console)
        self.ctx.barrier()
        return summary


def _transcoder_of_stores(input_site: str, target_site: str) -> str:
    """The site of a transcoder trained from a store at ``input_site`` to one at ``target_site``."""
    try:
        return transcoder_site(input_site, target_site)
    except ValueError as e:
        raise ValueError(f"{e}: --store must be an L{{L}}MI store and --target-store the L{{L}}M store of the same "
                         "layer (capture --sites L{L}TC writes both)") from None
