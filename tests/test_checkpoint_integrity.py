"""Damaged checkpoints: each file's digest is recorded when written and checked before resuming; a damaged
newest checkpoint is set aside with a warning naming it and the newest intact one is used (or none, saying
so).

The end-to-end version (a killed training run whose newest checkpoint is damaged resumes from the one before
and still ends with an uninterrupted run's weights) is in test_train_resume.py.
"""

from __future__ import annotations

import errno
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechllm.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    KeptState,
    TrainerState,
    verify_checkpoint,
)

WEIGHTS = 64 * 1024  # float32 values: 256 KiB of tensor data, room for 64 KiB of damage inside it


def save(manager: CheckpointManager, step: int, kept: list[KeptState] | None = None) -> Path:
    generator = torch.Generator().manual_seed(step)
    weights = {"w": torch.randn(WEIGHTS, generator=generator)}
    state = TrainerState(step=step, kept=kept or [], fingerprint="f")
    return manager.save(
        state, weights, {"optimizer": {"state": {}}, "scheduler": {"last_epoch": step}}, rank=0
    )


@pytest.fixture()
def manager(tmp_path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path / "checkpoints", keep=3)
    for step in (2, 4, 6):
        save(manager, step)
    return manager


def tensor_data_offset(file: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte header length and the JSON header)."""
    return 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


def assert_skipped(manager: CheckpointManager, caplog, damaged_step: int, resumed_step: int) -> None:
    with caplog.at_level(logging.WARNING, logger="speechllm"):
        assert manager.newest_intact() == manager.path(resumed_step)
    damaged = manager.path(damaged_step)
    assert f"skipping damaged checkpoint {damaged}" in caplog.text, caplog.text
    assert not damaged.exists() and (manager.root / f"damaged-{damaged.name}").is_dir()
    assert manager.latest() == manager.path(resumed_step)  # every process now sees the intact one as latest


def test_intact_checkpoints_verify_and_list_every_file(manager):
    verify_checkpoint(manager.path(6))
    listed = (manager.path(6) / "checksums.sha256").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in listed) == [
        "model.safetensors",
        "rng_rank0.pt",
        "trainer.pt",
        "trainer_state.json",
    ]
    assert manager.newest_intact() == manager.path(6)


def test_truncated_weights_fall_back_to_the_previous_checkpoint(manager, caplog):
    file = manager.path(6) / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{file}: content differs"):
        verify_checkpoint(manager.path(6))
    assert_skipped(manager, caplog, damaged_step=6, resumed_step=4)


def test_corrupted_trainer_state_names_its_file_and_falls_back(manager, caplog):
    file = manager.path(6) / "trainer_state.json"
    file.write_text(file.read_text()[:13])  # what a truncated write leaves: an unterminated string
    with pytest.raises(CheckpointError, match=f"{file}: not a valid trainer state"):
        CheckpointManager.load_state(manager.path(6))
    assert_skipped(manager, caplog, damaged_step=6, resumed_step=4)


def test_silent_byte_damage_inside_the_tensor_data_is_caught(manager, caplog):
    """64 KiB of zeros inside the tensor data still load as a valid safetensors file: only the digest sees
    it."""
    file = manager.path(6) / "model.safetensors"
    data = bytearray(file.read_bytes())
    start = tensor_data_offset(file) + 4096
    data[start : start + 65536] = bytes(65536)
    file.write_bytes(bytes(data))
    assert load_file(str(file))["w"].numel() == WEIGHTS  # loads without complaint
    assert_skipped(manager, caplog, damaged_step=6, resumed_step=4)


def test_a_missing_file_and_several_damaged_checkpoints(manager, caplog):
    (manager.path(6) / "rng_rank0.pt").unlink()
    (manager.path(4) / "trainer.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="speechllm"):
        assert manager.newest_intact() == manager.path(2)
    assert "rng_rank0.pt: missing" in caplog.text and "trainer.pt: content differs" in caplog.text
    assert f"resuming from {manager.path(2)}, the newest intact checkpoint" in caplog.text


def test_no_intact_checkpoint_starts_from_the_beginning_and_says_so(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    save(manager, 3)
    (manager.path(3) / "checksums.sha256").write_text("not a checksum line\n")
    with caplog.at_level(logging.WARNING, logger="speechllm"):
        assert manager.newest_intact() is None
    assert f"no intact checkpoint left in {manager.root}: training starts from the beginning" in caplog.text
    assert "checksums.sha256:1: not a `<sha256>  <file>` line" in caplog.text


def test_a_checkpoint_without_checksums_is_accepted_only_if_its_files_load(manager, caplog):
    """Checkpoints written before checksums existed: still resumable, unless a file does not parse."""
    (manager.path(6) / "checksums.sha256").unlink()
    (manager.path(4) / "checksums.sha256").unlink()
    file = manager.path(6) / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    assert_skipped(manager, caplog, damaged_step=6, resumed_step=4)
    assert "has no checksums.sha256" in caplog.text


def test_damaged_kept_weights_are_refused_naming_the_file(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    name = manager.save_kept(5, {"w": torch.arange(WEIGHTS, dtype=torch.float32)})
    save(manager, 5, [KeptState(0.1, 5, name)])
    assert torch.equal(manager.load_kept(name)["w"], torch.arange(WEIGHTS, dtype=torch.float32))
    file = manager.kept_dir / name
    data = bytearray(file.read_bytes())
    data[-1000:] = bytes(1000)
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{file}: content differs"):
        manager.load_kept(name)
    # Pruning removes a kept file and its digest together once nothing references them.
    save(manager, 6)
    save(manager, 7)
    assert list(manager.kept_dir.iterdir()) == []


def test_no_space_left_while_checkpointing_names_the_directory(manager, monkeypatch):
    import speechllm.train.checkpoint as checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=f"cannot write checkpoint {manager.path(8)}: No space left"
    ) as err:
        save(manager, 8)
    assert err.value.errno == errno.ENOSPC and "free space there" in str(err.value)
    assert manager.steps() == [2, 4, 6] and not any(
        p.name.startswith(".tmp-") for p in manager.root.iterdir()
    )
    verify_checkpoint(manager.path(6))
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint {manager.kept_dir}"):
        manager.save_kept(8, {"w": torch.zeros(2)})


def test_trainer_state_round_trips(tmp_path):
    state = TrainerState(step=3, kept=[KeptState(0.5, 2, "step_00000002.safetensors")], history=[{"step": 2}])
    assert TrainerState.from_json(state.to_json()) == state
    with pytest.raises(CheckpointError, match="x.json: not a valid trainer state"):
        TrainerState.from_json(json.dumps({"step": 1, "unknown": 2}), "x.json")


FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from speechllm.train.checkpoint import CheckpointManager, CheckpointWriteError, TrainerState

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
manager = CheckpointManager(Path(sys.argv[1]), keep=2)
small, large = {"w": torch.zeros(16)}, {"w": torch.zeros(64 * 1024)}
attempts = {
    "weights": lambda: manager.save(TrainerState(step=1), large, {"s": small["w"]}, rank=0),
    "trainer": lambda: manager.save(TrainerState(step=2), small, {"s": large["w"]}, rank=0),
    "kept": lambda: manager.save_kept(3, large),
}
for name, attempt in attempts.items():
    try:
        attempt()
    except CheckpointWriteError as err:
        print(name, err)
print("steps", manager.steps(), sorted(p.name for p in manager.root.iterdir() if p.name != "kept"))
"""


def test_a_real_failed_write_names_the_checkpoint_directory(tmp_path):
    """safetensors and torch.save do not raise OSError when the disk fills: they raise their own errors
    ("unexpected pos N vs M" from torch). A write that the OS refuses (here past RLIMIT_FSIZE, EFBIG, as a
    full disk refuses with ENOSPC) still ends in the one-line error naming the directory, and leaves no
    partial directory behind."""
    import subprocess
    import sys

    root = tmp_path / "checkpoints"
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(root)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        f"weights [Errno {errno.EFBIG}] cannot write checkpoint {root / 'step_00000001'}: File too large",
        f"trainer [Errno {errno.EFBIG}] cannot write checkpoint {root / 'step_00000002'}: File too large",
        f"kept [Errno {errno.EFBIG}] cannot write checkpoint {root / 'kept'}: File too large",
        "steps [] []",
    ]
