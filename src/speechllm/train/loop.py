"""One accelerate training loop for BLOOMZMMS (CTC pretraining, CE training) and Kang & Roy (KD), resumable.

Recipe (spec bloomzmms.md §3, ESPnet semantics):
- Adam (not AdamW), warm-up then inverse-sqrt decay, gradient clipping, gradient accumulation (loss / accum);
  an update whose gradient norm is not finite is skipped (ESPnet). Whether the schedule still advances
  follows each reference (`SCHEDULE_SKIPPED_UPDATES`), and so does stopping after an epoch of only skipped
  updates (`STOP_AFTER_AN_INVALID_EPOCH`).
- Batches by padded seconds (`DurationBucketSampler`); an "epoch" is `num_iters_per_epoch` micro-batches drawn
  from a stream of passes over the data (null: the number of batches of the first pass). It ends at the first
  optimizer update at or after that count. With several processes a micro-batch is a global one (below), so
  these counts are global iterations as in ESPnet.
- Dev evaluation at each epoch end (and every `eval_every` updates when set); early stopping when the
  early-stopping metric (ESPnet: dev loss) has not improved for more than `patience` evaluations.
- Selection: the best evaluation by `best_metric` (CTC: dev CER), or the parameter average of the `keep_best`
  best (CE: dev accuracy, 3); `last` keeps the final weights.

Exact resume: every `checkpoint_every` updates, at each epoch end and at the end, a checkpoint holds the
trainable weights, optimizer, scheduler, the counters that position the sampler (the loop's own count of
consumed batches, not the sampler's, which runs ahead with DataLoader workers), best / k-best / early-stopping
bookkeeping and the RNG states of every process (see `checkpoint.py`). A new run in the same checkpoint
directory with the same fingerprint continues from the latest one; RNG states are restored right before the
first resumed batch, and the DataLoaders draw from their own generators, so dropout masks after the resume
equal those of an uninterrupted run.

Several processes (DDP, or FSDP with `fsdp: true`, see `parallel.py`): with `batch_budget: global` (ESPnet)
`batch_seconds` is the budget of the whole micro-batch, which every rank builds alike and splits (each rank
takes its share, see `bucketing.py`); with `per_rank` every rank packs whole batches of the full budget.
Gradients are all-reduced (FSDP: reduce-scattered), all ranks evaluate the whole dev set and follow rank 0's
metrics, rank 0 writes checkpoints (each rank its RNG file). Under FSDP the checkpoints hold the gathered
(full) trainable weights and optimizer state, so they do not depend on the sharding.

Loss normalisation over ranks, as the ESPnet trainer (v.202304 `espnet2/train/trainer.py` `train_one_epoch`,
also DigitalPhonetics/bloomzmms@77dc192 `espnet-bloomzmms-files/espnet2/train/trainer.py`): every objective is
a mean over the B_r utterances of this rank's sub-batch (ESPnet: sum / batch size, `weight` = batch size);
the loss is scaled by B_r * W / B (B: the utterances of all W ranks, all-reduced) before DDP / FSDP average
the gradients over the W ranks. The gradient is then the mean over all B utterances of the micro-batch, the
same as one process taking the whole batch, also when the shares are uneven (5 utterances: 3 + 2); the
logged statistics carry the same weights. One process: the factor is exactly 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from speechllm import stopping
from speechllm.data.batches import Collator, SpeechDataset
from speechllm.data.bucketing import BATCH_BUDGETS, DurationBucketSampler
from speechllm.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    KeptState,
    TrainerState,
    restore_rng,
    weights_digest,
)
from speechllm.train.distillation import ENCODER_MODES, DistillationConfig, set_reference_encoder_mode
from speechllm.train.objectives import ObjectiveModule, batch_tokens, evaluate_dev
from speechllm.train.parallel import (
    full_optimizer_state,
    full_trainable_weights,
    llm_decoder_blocks,
    load_full_optimizer_state,
    local_value,
    make_accelerator,
    shard_module,
    without_gradient_sync,
)
from speechllm.train.schedule import make_schedule
from speechllm.train.tracking import Tracker

log = logging.getLogger("speechllm")

SELECTION_METRICS = ("dev_cer", "dev_acc", "dev_loss", "last")

# Whether an update skipped for a non-finite gradient norm still advances the learning-rate schedule, per
# objective. ESPnet (v.202304 espnet2/train/trainer.py `train_one_epoch`, also
# DigitalPhonetics/bloomzmms@77dc192 espnet-bloomzmms-files/espnet2/train/trainer.py) steps its scheduler
# only after `optimizer.step()`, so WarmupLR counts the updates made. Kang & Roy
# (wonjune-kang/llm-speech-summarization@0a3d8e6:trainer.py) call `lr_scheduler.step()` after every
# `scaler.step()`, which skips the optimizer step on inf / nan gradients.
SCHEDULE_SKIPPED_UPDATES = {"ctc": False, "ce": False, "kd": True}

# Whether training stops after an epoch in which every update was skipped. ESPnet's `train_one_epoch` returns
# `all_steps_are_invalid` and its `run` then stops ("The gradients at all steps are invalid in this epoch"),
# after the epoch's validation and checkpoint, before the early-stopping check (same files as above). Kang &
# Roy's trainer has no such check.
STOP_AFTER_AN_INVALID_EPOCH = {"ctc": True, "ce": True, "kd": False}


@dataclass
class StageConfig:
    """Knobs of one training stage (config `train.<stage>`; reference values in config/experiments/*.yaml)."""

    objective: str  # "ctc" | "ce" | "kd"
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None  # None: no clipping (the norm is still logged)
    accum_grad: int
    batch_seconds: float  # padded seconds per micro-batch (ESPnet batch_bins analogue)
    num_buckets: int
    max_epochs: int | None = None  # at least one of max_epochs / max_steps
    num_iters_per_epoch: int | None = None  # micro-batches per epoch; None = one pass over the data
    max_steps: int | None = None  # cap on optimizer updates
    eval_every: int | None = None  # extra dev evaluations every N updates
    patience: int | None = None  # None: no early stopping
    early_stopping_metric: str = "dev_loss"
    best_metric: str = "last"
    keep_best: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    precision: str = "fp32"  # fp32 | tf32 | bf16
    optimizer: str = "adam"  # adam (ESPnet) | adamw (Kang & Roy)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "warmup_inverse_sqrt"  # | linear_decay
    max_batch_size: int | None = None  # cap on utterances per micro-batch besides the seconds budget
    batch_budget: str = "global"  # global: batch_seconds / max_batch_size per micro-batch over all processes
    find_unused_parameters: bool = True
    fsdp: bool = False  # shard the frozen LLM's decoder blocks over the processes (FSDP2; several processes)
    num_workers: int = 0
    ctc_weight: float = 1.0
    interctc_weight: float = 0.0
    lid_ctc_lengths: str = "frames"  # LID frames the LID inter-CTC reads: frames | halved (the reference's)
    ntp_weight: float = 0.5
    ld_weight: float = 0.5
    fd_weight: float = 1.0
    fd_layers: list[int] = field(default_factory=lambda: [0, 5, 11, 17, 23])
    # kd: "train" keeps the speech encoder in train mode throughout; "reference" switches it as Kang & Roy's
    # trainer does (eval mode from the epoch's first validation, every `reference_validation_interval`
    # batches).
    encoder_mode: str = "train"
    reference_validation_interval: int | None = None

    # Keys of `train.<stage>` that choose data (read by the rules), not the loop.
    DATA_KEYS = ("train_set", "dev_set")

    def __post_init__(self) -> None:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("a stage needs max_epochs or max_steps")
        if self.batch_budget not in BATCH_BUDGETS:
            raise ValueError(f"batch_budget must be one of {BATCH_BUDGETS}, got {self.batch_budget!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        for name in ("early_stopping_metric", "best_metric"):
            if getattr(self, name) not in SELECTION_METRICS:
                raise ValueError(f"{name} must be one of {SELECTION_METRICS}, got {getattr(self, name)!r}")
        if self.early_stopping_metric == "last":
            raise ValueError("early_stopping_metric cannot be 'last'")
        if self.objective != "ctc" and "dev_cer" in (self.best_metric, self.early_stopping_metric):
            raise ValueError(f"dev_cer is only measured by the ctc objective, not {self.objective!r}")
        if self.objective == "ctc" and "dev_acc" in (self.best_metric, self.early_stopping_metric):
            raise ValueError("dev_acc is not measured by the ctc objective")
        if self.encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode must be one of {ENCODER_MODES}, got {self.encoder_mode!r}")
        if self.encoder_mode == "reference" and (
            self.objective != "kd" or not self.reference_validation_interval
        ):
            raise ValueError(
                "encoder_mode 'reference' is for the kd objective and needs reference_validation_interval "
                f"(objective {self.objective!r}, interval {self.reference_validation_interval!r})"
            )

    @property
    def distillation(self) -> DistillationConfig:
        return DistillationConfig(self.ntp_weight, self.ld_weight, self.fd_weight, list(self.fd_layers))

    @classmethod
    def from_config(cls, objective: str, cfg: dict[str, Any]) -> StageConfig:
        values = {k: v for k, v in cfg.items() if k not in cls.DATA_KEYS}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(objective=objective, **values)


@dataclass
class TrainResult:
    """What `train` hands back: the summary (all ranks) and the selected trainable weights (main process)."""

    summary: dict[str, Any]
    weights: dict[str, torch.Tensor] | None


def selection_value(metrics: dict[str, Any], name: str) -> float:
    """The value of a dev metric where lower is better (accuracy negated); missing / undefined -> +inf."""
    value = metrics.get(name)
    if value is None or not math.isfinite(float(value)):
        return math.inf
    return -float(value) if name == "dev_acc" else float(value)


def rank_kept(kept: list[KeptState], value: float, step: int, keep_best: int) -> list[KeptState]:
    """The `keep_best` best evaluations once (value, step) joins them; ties keep the earlier (ESPnet).

    The new entry, if it stays, has no file yet ("").
    """
    return sorted([*kept, KeptState(value, step, "")], key=lambda k: (k.value, k.step))[:keep_best]


def early_stopping_update(best: float | None, evals_since_best: int, value: float) -> tuple[float, int]:
    """(best value, evaluations since it) after one more evaluation; training stops once the count exceeds
    `patience` (ESPnet: `epoch - best_epoch > patience`)."""
    if best is None or value < best:
        return value, 0
    return best, evals_since_best + 1


def chain_digest(previous: str, ids: list[str]) -> str:
    """Next link of a hash chain over consumed batches (order-sensitive): equal digests, equal data."""
    return hashlib.sha256(f"{previous}|{','.join(ids)}".encode()).hexdigest()


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Parameter average of checkpoints (ESPnet `average_nbest_models`), in each tensor's own dtype."""
    return {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load trainable weights into `model`; every tensor must name one of its entries."""
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise CheckpointError(f"{where}: tensors not in the model: {unknown[:5]}")
    model.load_state_dict(weights, strict=False)


class Trainer:
    """The loop; see the module docstring. Construct, then call `run()` once."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        stage: StageConfig,
        train_set: SpeechDataset,
        dev_set: SpeechDataset,
        collator: Collator,
        make_tracker: Callable[[int | None, bool], Tracker],
        seed: int,
        checkpoint_dir: Path,
        fingerprint: str = "",
    ) -> None:
        if len(train_set) == 0:
            raise ValueError(f"empty training set: {train_set.manifest}")
        self.core = model
        self.tokenizer = tokenizer
        self.stage = stage
        self.train_set = train_set
        self.dev_set = dev_set
        self.collator = collator
        self.make_tracker = make_tracker
        self.seed = seed
        self.fingerprint = fingerprint
        self.accelerator: Accelerator = make_accelerator(stage.precision, stage.find_unused_parameters)
        acc = self.accelerator
        if stage.fsdp and not llm_decoder_blocks(model):
            raise ValueError(
                f"fsdp: true needs a model with an LLM; the {stage.objective} stage's model has none"
            )
        if stage.fsdp and acc.num_processes == 1:
            log.warning("fsdp: true with one process: nothing to shard, training unsharded")
        self.sharded = stage.fsdp and acc.num_processes > 1
        self.checkpoints = CheckpointManager(
            Path(checkpoint_dir), stage.keep_checkpoints, acc.is_main_process
        )
        self.state = TrainerState(fingerprint=fingerprint, num_processes=acc.num_processes)
        self.saved_step: int | None = None  # the step of the latest checkpoint this run wrote

    # ------------------------------------------------------------------ helpers

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (under FSDP gathered from the shards: a collective)."""
        if not self.sharded:
            return self.core.trainable_state_dict()
        return full_trainable_weights(self.core)

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict (under FSDP unsharded and keyed by parameter name: a collective)."""
        if not self.sharded:
            return self.optimizer.state_dict()
        return full_optimizer_state(self.wrapped, self.optimizer.optimizer)

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        if not self.sharded:
            self.optimizer.load_state_dict(saved)
            return
        load_full_optimizer_state(self.wrapped, self.optimizer.optimizer, saved)

    def accumulating(self) -> contextlib.AbstractContextManager:
        """Context of a backward that only accumulates (no gradient reduction across processes)."""
        if self.sharded:
            return without_gradient_sync(self.wrapped)
        return self.accelerator.no_sync(self.wrapped)

    def _loader(self, sampler: DurationBucketSampler, dataset: SpeechDataset, num_workers: int) -> DataLoader:
        # Own generator: creating an iterator must not draw from the global RNG (resume would shift dropout).
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=num_workers,
            generator=generator,
        )

    # ------------------------------------------------------------------ set-up

    def _shard(self, objective: ObjectiveModule) -> nn.Module:
        """FSDP2 over the LLM's decoder blocks (accelerate refuses FSDP on the CPU, see parallel.py)."""
        blocks = llm_decoder_blocks(self.core)
        names = ", ".join(sorted({type(b).__name__ for b in blocks}))  # sharding renames the classes
        sharded = shard_module(objective, blocks, self.accelerator.device)
        log.info(
            "FSDP: %d LLM decoder blocks (%s) and the root unit sharded over %d processes",
            len(blocks),
            names,
            self.accelerator.num_processes,
        )
        return sharded

    def _find_resume(self) -> Path | None:
        """Latest checkpoint of this run, after removing partial writes and setting aside damaged and stale
        (other settings) ones."""
        self.checkpoints.clean_partial()
        latest = self.checkpoints.newest_intact()
        if latest is not None and self.accelerator.is_main_process:
            saved = CheckpointManager.load_state(latest)
            if saved.fingerprint != self.fingerprint:
                self.checkpoints.discard_all("written by a run with other settings or inputs")
        self.barrier()
        latest = self.checkpoints.latest()
        if latest is not None:
            saved = CheckpointManager.load_state(latest)
            if saved.num_processes != self.accelerator.num_processes:
                raise CheckpointError(
                    f"{latest} was written by {saved.num_processes} processes, this run has "
                    f"{self.accelerator.num_processes}; resume with the same number or delete "
                    f"{self.checkpoints.root}"
                )
        return latest

    def _setup(self) -> dict[str, Any] | None:
        """Build optimizer, schedule, loaders; load the checkpoint to resume from. Returns its RNG states."""
        acc, stage = self.accelerator, self.stage
        set_seed(self.seed)
        resume = self._find_resume()
        rng = trainer_state = None
        if resume is not None:
            self.state, weights, trainer_state, rng = CheckpointManager.load(resume, acc.process_index)
            load_weights(self.core, weights, str(resume))
            log.info("resuming from %s (step %d, epoch %d)", resume, self.state.step, self.state.epoch)
        objective = ObjectiveModule(
            self.core,
            stage.objective,
            stage.ctc_weight,
            stage.interctc_weight,
            stage.distillation,
            stage.lid_ctc_lengths,
        )
        self.wrapped = self._shard(objective) if self.sharded else acc.prepare(objective)  # prepare: DDP
        try:  # e.g. a global batch cannot give each process an utterance (max_batch_size below the processes)
            self.sampler = DurationBucketSampler(
                self.train_set.durations(),
                stage.batch_seconds,
                stage.num_buckets,
                seed=self.seed,
                num_replicas=acc.num_processes,
                rank=acc.process_index,
                max_batch_size=stage.max_batch_size,
                batch_budget=stage.batch_budget,
            )
        except ValueError as error:
            raise ValueError(f"train.{stage.objective} on {self.train_set.manifest}: {error}") from None
        self.loader = self._loader(self.sampler, self.train_set, stage.num_workers)
        dev_sampler = DurationBucketSampler(
            self.dev_set.durations(),
            stage.batch_seconds,
            stage.num_buckets,
            seed=self.seed,
            shuffle=False,
            max_batch_size=stage.max_batch_size,
        )
        self.dev_loader = self._loader(dev_sampler, self.dev_set, 0)
        # Without num_iters_per_epoch an epoch is the first pass's number of batches (global: of global
        # batches).
        self.iters_per_epoch = stage.num_iters_per_epoch or len(self.sampler)
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        optimizer_cls = torch.optim.AdamW if stage.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_cls(params, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
        self.scheduler = make_schedule(optimizer, stage.schedule, stage.warmup_steps, self.total_steps())
        self.optimizer = acc.prepare(optimizer)
        if trainer_state is not None:
            self.load_optimizer_state(trainer_state["optimizer"])
            self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.tracker = self.make_tracker(self.state.step if resume is not None else None, acc.is_main_process)
        return rng

    # ------------------------------------------------------------------ evaluation and bookkeeping

    def evaluate(self) -> dict[str, float]:
        """Dev metrics of rank 0, shared with every rank so all take the same decisions."""
        metrics = evaluate_dev(
            self.wrapped,
            self.dev_loader,
            self.stage.objective,
            self.tokenizer,
            self.accelerator.device,
            self.accelerator.autocast,
        )
        if self.sharded:  # FSDP2 keeps the root unit's parameters gathered after a forward without backward
            self.wrapped.reshard()
        shared = [metrics]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(shared, from_process=0)
        return shared[0]

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        """Record an evaluation: history, k-best set (weights saved once), early-stopping counter."""
        stage, state = self.stage, self.state
        state.history.append({"step": state.step, "epoch": state.epoch, **metrics})
        state.last_eval_step = state.step
        if stage.best_metric != "last":
            kept = rank_kept(
                state.kept, selection_value(metrics, stage.best_metric), state.step, stage.keep_best
            )
            if any(k.step == state.step for k in kept):
                name = self.checkpoints.save_kept(state.step, self.trainable_weights())
                kept = [KeptState(k.value, k.step, name) if k.step == state.step else k for k in kept]
            state.kept = kept
        # Counted with or without patience: patience may be set or changed when a run is resumed
        # (commands.TRAJECTORY_FREE), and the count must then be the uninterrupted run's.
        value = selection_value(metrics, stage.early_stopping_metric)
        state.best_early_stop, state.evals_since_best = early_stopping_update(
            state.best_early_stop, state.evals_since_best, value
        )

    def save_checkpoint(self) -> None:
        trainer = {"optimizer": self.optimizer_state(), "scheduler": self.scheduler.state_dict()}
        self.checkpoints.save(
            self.state,
            self.trainable_weights(),
            trainer,
            self.accelerator.process_index,
            self.barrier if self.accelerator.num_processes > 1 else None,
        )
        self.saved_step = self.state.step

    def stop_reason(self) -> str:
        stage, state = self.stage, self.state
        if state.invalid_epoch:
            return "all_updates_invalid"
        if stage.max_steps is not None and state.step >= stage.max_steps:
            return "max_steps"
        if stage.max_epochs is not None and state.epoch >= stage.max_epochs:
            return "max_epochs"
        if stage.patience is not None and state.evals_since_best > stage.patience:
            return "patience"
        return ""

    # ------------------------------------------------------------------ training

    def _reduce_window(self, window: dict[str, float], elapsed: float) -> dict[str, float]:
        """Means of the per-micro-batch statistics over ranks, and throughput summed over ranks."""
        keys = sorted(window)
        values = torch.tensor([window[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        totals = dict(zip(keys, values.tolist(), strict=True))
        micro = max(totals.pop("micro_batches"), 1.0)
        audio, tokens = totals.pop("audio_seconds"), totals.pop("tokens")
        row = {k: v / micro for k, v in totals.items()}
        row["audio_seconds_per_second"] = audio / max(elapsed, 1e-9)
        row["tokens_per_second"] = tokens / max(elapsed, 1e-9)
        return row

    def total_steps(self) -> int:
        """Optimizer updates of a run that is not stopped early (what linear_decay decays over)."""
        stage = self.stage
        by_epochs = (
            math.inf
            if stage.max_epochs is None
            else math.ceil(stage.max_epochs * self.iters_per_epoch / stage.accum_grad)
        )
        return int(min(by_epochs, stage.max_steps or math.inf))

    def rank_weight(self, utterances: int) -> float:
        """ESPnet's factor B_r * W / B for this rank's mean loss (see the module docstring); 1 on one
        process."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return 1.0
        local = torch.tensor(float(utterances), dtype=torch.float64, device=acc.device)
        total = float(acc.reduce(local, reduction="sum"))
        return utterances * acc.num_processes / total

    def _step_due(self, every: int | None) -> bool:
        return every is not None and self.state.step % every == 0

    def run(self) -> TrainResult:
        acc, stage = self.accelerator, self.stage
        rng = self._setup()
        state = self.state  # the resumed state replaces the fresh one
        if rng is None:
            initial = self.evaluate()
            state.history.append({"step": 0, "epoch": 0, "initial": True, **initial})
            self.tracker.log(initial, step=0)
        state.stopped = self.stop_reason()  # a finished run whose limits were raised goes on
        if state.stopped:
            return self.finish()
        progress = tqdm(
            total=self.total_steps(),
            initial=state.step,
            desc=f"{stage.objective} training",
            mininterval=10,
            disable=not acc.is_main_process,
        )
        window: dict[str, float] = {}
        window_start = time.perf_counter()
        self.wrapped.train()
        if rng is not None:
            restore_rng(rng)  # last thing before the first resumed batch
        while not state.stopped:
            self.sampler.set_epoch(state.data_pass)
            if state.pass_position:
                self.sampler.load_state_dict(
                    {"epoch": state.data_pass, "position": state.pass_position, "seed": self.seed}
                )
            for batch in self.loader:
                state.pass_position += 1
                state.batches_seen += 1
                state.data_digest = chain_digest(state.data_digest, [str(r.get("id")) for r in batch.records])
                sync = state.batches_seen % stage.accum_grad == 0
                batch = batch.to(acc.device)
                weight = self.rank_weight(len(batch.records))
                # Kang & Roy: the encoder in eval mode from the epoch's first validation on (see
                # distillation.py)
                if stage.encoder_mode == "reference":
                    first, interval = state.epoch_start_batch, stage.reference_validation_interval
                    set_reference_encoder_mode(self.core, state.batches_seen - 1, first, interval)
                context = contextlib.nullcontext() if sync else self.accumulating()
                with context, acc.autocast():  # the prepared (DDP) forward autocasts too; FSDP's does not
                    loss, stats = self.wrapped(batch)
                    acc.backward(loss * weight / stage.accum_grad)
                for key, value in {"loss": loss.detach(), **stats}.items():
                    window[key] = window.get(key, 0.0) + float(value) * weight
                window["micro_batches"] = window.get("micro_batches", 0.0) + 1
                window["audio_seconds"] = (
                    window.get("audio_seconds", 0.0)
                    + float(batch.wav_lengths.sum()) / self.train_set.sampling_rate
                )
                window["tokens"] = window.get("tokens", 0.0) + batch_tokens(batch, stage.objective)
                if not sync:
                    continue
                norm = acc.clip_grad_norm_(self.wrapped.parameters(), stage.grad_clip or math.inf)
                grad_norm = float(local_value(norm))  # FSDP: a DTensor
                finite = math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                    state.epoch_updates += 1
                else:
                    log.warning("step %d: gradient norm is %s, update skipped", state.step + 1, grad_norm)
                lr = self.scheduler.get_last_lr()[0]  # the rate this update used
                if finite or SCHEDULE_SKIPPED_UPDATES[stage.objective]:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                progress.update(1)
                if self._after_step(window, window_start, grad_norm, lr):
                    window, window_start = {}, time.perf_counter()
                if state.stopped:
                    break
                if self._stop_signalled():
                    self._save_and_stop()
            else:
                state.data_pass += 1
                state.pass_position = 0
        progress.close()
        return self.finish()

    def _after_step(self, window: dict[str, float], window_start: float, grad_norm: float, lr: float) -> bool:
        """Logging, evaluation, epoch end, checkpoint and stop decision after an optimizer update.

        Returns whether the statistics window was logged (and should restart).
        """
        stage, state = self.stage, self.state
        epoch_end = state.batches_seen >= (state.epoch + 1) * self.iters_per_epoch
        at_cap = stage.max_steps is not None and state.step >= stage.max_steps
        evaluate = epoch_end or at_cap or self._step_due(stage.eval_every)
        row: dict[str, Any] = {}
        if self._step_due(stage.log_every) or evaluate:
            row = self._reduce_window(window, time.perf_counter() - window_start)
            row.update(lr=lr, grad_norm=grad_norm, epoch=state.epoch)
        if evaluate:
            metrics = self.evaluate()
            self.after_evaluation(metrics)
            row.update(metrics)
        if epoch_end:
            if state.epoch_updates == 0 and STOP_AFTER_AN_INVALID_EPOCH[stage.objective]:
                state.invalid_epoch = True
                log.warning(
                    "every update of epoch %d had a non-finite gradient norm: training stops (ESPnet)",
                    state.epoch + 1,
                )
            state.epoch += 1
            state.epoch_start_batch = state.batches_seen
            state.epoch_updates = 0
        state.stopped = self.stop_reason()
        if row:
            self.tracker.log(row, step=state.step)
        if epoch_end or state.stopped or self._step_due(stage.checkpoint_every):
            self.save_checkpoint()
        return bool(row)

    def _stop_signalled(self) -> bool:
        """Whether a process got a stop signal (speechllm.stopping); every rank gets the same answer, so all
        stop after the same update."""
        signalled = stopping.requested() is not None
        if self.accelerator.num_processes == 1:
            return signalled
        flag = torch.tensor([float(signalled)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _save_and_stop(self) -> None:
        """After a stop signal: checkpoint this update (unless just written) and exit for a resuming retry."""
        if self.saved_step != self.state.step:
            self.save_checkpoint()
        if self.accelerator.is_main_process:
            log.warning(
                "stop signal (%s): stopping after update %d, checkpoint in %s",
                stopping.requested() or "on another process",
                self.state.step,
                self.checkpoints.root,
            )
        self.tracker.close()
        self.barrier()
        raise stopping.Preempted(f"checkpoint of update {self.state.step} in {self.checkpoints.root}")

    # ------------------------------------------------------------------ end

    def finish(self) -> TrainResult:
        """Select the final weights (best / k-best average / last) and summarise, on every rank."""
        acc, stage, state = self.accelerator, self.stage, self.state
        last = self.trainable_weights()
        digests = gather_object([weights_digest(last)])
        batches = gather_object([state.batches_seen])
        data = gather_object([state.data_digest])
        self.barrier()
        if stage.best_metric == "last" or not state.kept:
            selected = last
        else:
            states = [self.checkpoints.load_kept(k.file) for k in state.kept]
            selected = states[0] if len(states) == 1 else average_states(states)
        if not self.sharded:
            load_weights(self.core, selected, "selected weights")
        initial = next((h for h in state.history if h.get("initial")), {})
        summary = {
            "objective": stage.objective,
            "final_step": state.step,
            "epochs": state.epoch,
            "stopped": state.stopped,
            "selected_steps": [k.step for k in state.kept]
            if stage.best_metric != "last" and state.kept
            else [state.step],
            "initial_dev": {k: v for k, v in initial.items() if k.startswith("dev_")},
            "history": [h for h in state.history if not h.get("initial")],
            "batches_per_process": batches,
            "data_sha256_per_process": data,
            "final_weights_sha256_per_process": digests,
            "num_processes": acc.num_processes,
            "wandb_run_id": self.tracker.wandb_id,
        }
        self.tracker.summary(
            {
                "selected_steps": json.dumps(summary["selected_steps"]),
                "stopped": summary["stopped"],
                "final_step": state.step,
            }
        )
        self.tracker.close()
        return TrainResult(summary, selected if acc.is_main_process else None)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from speechllm.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
