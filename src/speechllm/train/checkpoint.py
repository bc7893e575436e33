"""Periodic training checkpoints for exact resumption.

A checkpoint is a directory `step_<8 digits>/` in the run's checkpoint dir:

    model.safetensors     trainable weights only (the frozen encoder / CTC head / LLM come from their sources)
    trainer.pt            optimizer and scheduler state (`torch.load(weights_only=True)`)
    rng_rank<r>.pt        python / numpy / torch CPU / CUDA RNG states of each process
    trainer_state.json    counters (step, batches, epoch, data pass), best / k-best and early-stopping
                          bookkeeping, dev history, the run fingerprint and the number of processes
    checksums.sha256      SHA-256 of each file above (`sha256sum -c checksums.sha256` checks it by hand)

The weights of the evaluations kept for the final selection (best, or k-best for averaging) are written once
to `kept/step_<8 digits>.safetensors` (with its digest beside it, `.safetensors.sha256`) and referenced by
name. Every directory and file appears complete or not at all: it is written under a temporary name and
renamed. A SIGKILL at any moment leaves the previous checkpoints intact; leftovers of an interrupted write are
removed on the next start.

A checkpoint damaged afterwards (a truncated or overwritten file, a full disk, bit rot) fails its digests: the
resuming run moves it aside to `damaged-step_<8 digits>/` with a warning and resumes from the newest intact
one, or starts from the beginning when none is left. A write that fails (e.g. no space left on the device)
names the checkpoint directory and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from speechllm.io import atomic_write_text, fsync_path, os_error_behind

log = logging.getLogger("speechllm")

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
CHECKSUMS = "checksums.sha256"
DIGEST_SUFFIX = ".sha256"  # a kept weights file's digest, beside it


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory or file."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. no space left on the device); the message names the directory."""


@dataclass
class KeptState:
    """One dev evaluation whose weights take part in the final selection."""

    value: float  # selection value, lower is better (accuracy is stored negated)
    step: int
    file: str  # name under `kept/`


@dataclass
class TrainerState:
    """Everything besides tensors that the loop needs to continue exactly where it stopped.

    Attributes:
        step: optimizer updates done.
        batches_seen: micro-batches consumed by this rank since the start (all passes).
        data_pass: index of the current pass over the training data (the sampler's epoch).
        pass_position: micro-batches consumed in the current pass (the sampler's resume position).
        epoch: completed "epochs" (`num_iters_per_epoch` micro-batches each).
        epoch_start_batch: `batches_seen` when the current epoch began.
        epoch_updates: updates of the current epoch that were made (a finite gradient norm).
        invalid_epoch: an epoch ended in which no update was made (ESPnet stops there).
        kept: evaluations whose weights are kept for the final selection, best first.
        best_early_stop: best value of the early-stopping metric so far (lower is better).
        evals_since_best: dev evaluations since it last improved.
        last_eval_step: step of the latest dev evaluation (-1: none yet).
        history: one dict per dev evaluation.
        stopped: why training ended ("" while running).
        data_digest: hash chain over the utterance ids of every consumed micro-batch (this rank).
        fingerprint: hash of everything that defines the run; a mismatch means the checkpoints are stale.
        num_processes: world size when written (the data plan depends on it).
    """

    step: int = 0
    batches_seen: int = 0
    data_pass: int = 0
    pass_position: int = 0
    epoch: int = 0
    epoch_start_batch: int = 0
    epoch_updates: int = 0
    invalid_epoch: bool = False
    kept: list[KeptState] = field(default_factory=list)
    best_early_stop: float | None = None
    evals_since_best: int = 0
    last_eval_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    data_digest: str = ""
    fingerprint: str = ""
    num_processes: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "trainer state") -> TrainerState:
        """Parse `to_json`'s output; `source` (the file) is named in the error for anything else."""
        try:
            data = json.loads(text)
            data["kept"] = [KeptState(**k) for k in data.get("kept", [])]
            return cls(**data)
        except (json.JSONDecodeError, TypeError, AttributeError, KeyError) as err:
            raise CheckpointError(f"{source}: not a valid trainer state ({err})") from err


# ---------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """RNG states of this process in a form `torch.load(weights_only=True)` accepts (no numpy objects)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- files


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written under a temporary name and renamed."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    _save_safetensors(tensors, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a Python file object: a failed write (a full disk) then leaves its OSError as the
    context of torch's RuntimeError. Given a path, torch reports only "unexpected pos N vs M"."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """`checksums.sha256` (sha256sum format) over every file of a checkpoint directory being written."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    atomic_write_text(folder / CHECKSUMS, "".join(f"{file_sha256(folder / n)}  {n}\n" for n in names))


def read_checksums(file: Path) -> dict[str, str]:
    """name -> digest of a `checksums.sha256`; a malformed line is an error naming the file."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from err
    digests = {}
    for number, line in enumerate(lines, start=1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise CheckpointError(f"{file}:{number}: not a `<sha256>  <file>` line")
        digests[name] = digest
    return digests


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the file if any file of checkpoint `path` is missing or not as written.

    A checkpoint written before checksums existed is accepted if every file parses (with a warning).
    """
    path = Path(path)
    listed = path / CHECKSUMS
    if not listed.is_file():
        log.warning(
            "%s has no %s (written by an older version): checking that its files load", path, CHECKSUMS
        )
        CheckpointManager.load(path, rank=0)
        return
    digests = read_checksums(listed)
    for required in ("trainer_state.json", "model.safetensors", "trainer.pt"):
        if required not in digests:
            raise CheckpointError(f"{listed}: {required} is not listed")
    for name, expected in digests.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file_sha256(file) != expected:
            raise CheckpointError(f"{file}: content differs from the SHA-256 recorded when it was written")


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class CheckpointManager:
    """Writes, lists, loads and prunes the checkpoints of one run directory.

    Args:
        root: the run's checkpoint directory.
        keep: number of most recent `step_*` checkpoints to keep.
        is_main: only the main process writes shared files; every process writes its own RNG file.
    """

    def __init__(self, root: Path, keep: int, is_main: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.is_main = is_main
        self.kept_dir = self.root / "kept"

    # ------------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.root.is_dir():
            return []
        found = (STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def clean_partial(self) -> None:
        """Remove leftovers of writes that a kill interrupted (main process, before training starts)."""
        if not self.is_main:
            return
        for folder in (self.root, self.kept_dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(TMP_PREFIX):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()

    def newest_intact(self) -> Path | None:
        """The newest checkpoint whose files match their digests (main process; others get `latest()`).

        Damaged ones are moved aside to `damaged-step_<8 digits>` with a warning naming them, so that every
        process then sees the intact one as the latest.
        """
        if not self.is_main:
            return self.latest()
        damaged = False
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                damaged = True
                aside = self.root / f"{DAMAGED_PREFIX}{path.name}"
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(path, aside)
                fsync_path(self.root)
                log.warning(
                    "skipping damaged checkpoint %s (moved to %s; delete it when no longer needed): %s",
                    path,
                    aside,
                    err,
                )
                continue
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        if damaged:
            log.warning("no intact checkpoint left in %s: training starts from the beginning", self.root)
        return None

    def discard_all(self, reason: str) -> None:
        """Delete every checkpoint of this directory (they belong to another configuration)."""
        if self.is_main and self.root.is_dir() and (self.steps() or self.kept_dir.is_dir()):
            log.warning("discarding checkpoints in %s: %s", self.root, reason)
            for step in self.steps():
                shutil.rmtree(self.path(step))
            shutil.rmtree(self.kept_dir, ignore_errors=True)

    # ------------------------------------------------------------------ kept weights

    def save_kept(self, step: int, weights: dict[str, torch.Tensor]) -> str:
        """Store the weights of an evaluation that enters the k-best set; returns the file name."""
        name = f"step_{step:08d}.safetensors"
        if self.is_main:
            path = self.kept_dir / name
            try:
                self.kept_dir.mkdir(parents=True, exist_ok=True)
                _save_tensors(weights, path)
                atomic_write_text(path.with_name(name + DIGEST_SUFFIX), f"{file_sha256(path)}  {name}\n")
            except Exception as err:  # safetensors and torch wrap the OS error in their own types
                cause = os_error_behind(err)
                if cause is None:
                    raise
                raise _write_error(cause, self.kept_dir) from err
        return name

    def load_kept(self, name: str) -> dict[str, torch.Tensor]:
        """Kept weights, checked against the digest recorded when they were written."""
        path = self.kept_dir / name
        if not path.is_file():
            raise CheckpointError(f"kept weights missing: {path}")
        digest_file = path.with_name(name + DIGEST_SUFFIX)
        if digest_file.is_file():
            expected = read_checksums(digest_file).get(name)
            if expected != file_sha256(path):
                raise CheckpointError(
                    f"{path}: content differs from the SHA-256 recorded when it was written"
                )
        return _load_tensors(path)

    # ------------------------------------------------------------------ save / load

    def save(
        self,
        state: TrainerState,
        weights: dict[str, torch.Tensor],
        trainer: dict[str, Any],
        rank: int,
        barrier: Any = None,
    ) -> Path:
        """Write checkpoint `state.step`; all processes call this (each writes its RNG file).

        Args:
            state: counters and bookkeeping (identical on all ranks except `batches_seen`-type counters).
            weights: trainable weights (identical on all ranks after DDP updates).
            trainer: `{"optimizer": ..., "scheduler": ...}` state dicts.
            rank: this process's index.
            barrier: callable that synchronises all processes (None with one process).
        """
        final = self.path(state.step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        sync = barrier or (lambda: None)
        try:
            if self.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            sync()
            _torch_save(capture_rng(), tmp / f"rng_rank{rank}.pt")
            fsync_path(tmp / f"rng_rank{rank}.pt")
            sync()
            if self.is_main:
                self._write_main_files(tmp, final, state, weights, trainer)
        except Exception as err:  # safetensors and torch wrap the OS error in their own types
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = os_error_behind(err)
            if cause is None:
                raise
            raise _write_error(cause, final) from err
        sync()
        return final

    def _write_main_files(
        self,
        tmp: Path,
        final: Path,
        state: TrainerState,
        weights: dict[str, torch.Tensor],
        trainer: dict[str, Any],
    ) -> None:
        """Weights, trainer state, counters and checksums into `tmp`, then publish it as `final` and prune."""
        _save_safetensors(weights, tmp / "model.safetensors")
        _torch_save(trainer, tmp / "trainer.pt")
        for name in ("model.safetensors", "trainer.pt"):  # on disk before the rename makes the step visible
            fsync_path(tmp / name)
        atomic_write_text(tmp / "trainer_state.json", state.to_json())
        write_checksums(tmp)  # after every rank's RNG file is in place (the caller's barrier)
        fsync_path(tmp)  # the step directory's own entries, before the rename publishes it
        if final.exists():  # the same step written again (e.g. an evaluation at a checkpoint step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(self.root)
        self._prune(state)

    def _prune(self, state: TrainerState) -> None:
        """Keep the newest `keep` checkpoints, and the kept weights that they or `state` still reference."""
        steps = self.steps()
        for step in steps[: -self.keep]:
            shutil.rmtree(self.path(step))
        referenced = {k.file for k in state.kept}
        for step in self.steps():
            try:
                referenced |= {k.file for k in self.load_state(self.path(step)).kept}
            except CheckpointError as err:  # damaged since written: the next start sets it aside
                log.warning("%s", err)
        if self.kept_dir.is_dir():
            for p in self.kept_dir.iterdir():
                weights_name = p.name.removesuffix(DIGEST_SUFFIX)
                if weights_name.endswith(".safetensors") and weights_name not in referenced:
                    p.unlink()

    @staticmethod
    def load_state(path: Path) -> TrainerState:
        file = Path(path) / "trainer_state.json"
        if not file.is_file():
            raise CheckpointError(f"not a checkpoint (no trainer_state.json): {path}")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file}: unreadable ({err})") from err
        return TrainerState.from_json(text, str(file))

    @staticmethod
    def load(
        path: Path, rank: int
    ) -> tuple[TrainerState, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """(state, trainable weights, trainer state dicts, this rank's RNG states) of one checkpoint."""
        path = Path(path)
        state = CheckpointManager.load_state(path)
        rng_file = path / f"rng_rank{rank}.pt"
        if not rng_file.is_file():
            raise CheckpointError(
                f"{path}: no RNG state for process {rank} (written by {state.num_processes} processes)"
            )
        weights = _load_tensors(path / "model.safetensors")
        trainer = _load_pickle(path / "trainer.pt")
        rng = _load_pickle(rng_file)
        return state, weights, trainer, rng


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for a truncated or garbled file
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err})") from err


def _load_pickle(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip archive or an unpickling error
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err})") from err


def _write_error(err: OSError, where: Path) -> CheckpointWriteError:
    """The OS error of a failed checkpoint write, restated with the directory it was writing."""
    hint = " (free space there, or lower keep_checkpoints)" if err.errno == errno.ENOSPC else ""
    detail = err.strerror or str(err)
    return CheckpointWriteError(err.errno, f"cannot write checkpoint {where}: {detail}{hint}")
