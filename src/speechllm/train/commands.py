"""`speechllm train` subcommands: initialise, train (CTC / CE / KD) and export models.

A training job resumes by itself: when its checkpoint directory holds checkpoints written with the same
settings and inputs (the run fingerprint), it continues from the latest one; checkpoints of other settings are
discarded. Launch several processes with `accelerate launch --num_processes N speechllm train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speechllm import stopping
from speechllm.cliutils import EXAMPLES, add_command, parse_settings, set_threads
from speechllm.io import read_json

if TYPE_CHECKING:
    from speechllm.train.settings import InitSettings

log = logging.getLogger("speechllm")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Stage keys that do not change the trajectory of updates: a run extended (more epochs, more patience) or
# checkpointed / logged differently still resumes. (linear_decay's length depends on max_steps / max_epochs.)
TRAJECTORY_FREE = (
    "max_epochs",
    "max_steps",
    "patience",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "num_workers",
)


def run_fingerprint(settings: dict[str, Any], args: argparse.Namespace) -> str:
    """Hash of what defines a run: settings (tracking aside), objective, manifests, initial weights."""
    relevant = {k: v for k, v in settings.items() if k not in ("wandb",)}
    stage = dict(relevant.get("stage", {}))
    free = (
        TRAJECTORY_FREE
        if stage.get("schedule", "warmup_inverse_sqrt") == "warmup_inverse_sqrt"
        else tuple(k for k in TRAJECTORY_FREE if k not in ("max_epochs", "max_steps"))
    )
    relevant["stage"] = {k: v for k, v in stage.items() if k not in free}
    parts: dict[str, Any] = {
        "settings": relevant,
        "stage": args.stage,
        "train": _file_digest(args.train),
        "dev": _file_digest(args.dev),
    }
    if args.init_from:
        weights = Path(args.init_from) / "model.safetensors"
        stat = weights.stat()
        parts["init_from"] = [str(weights), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def process_device() -> Any:
    """This process's device: its own GPU under `accelerate launch` (not cuda:0 for every rank), else CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).device


class SelectedWeights:
    """Trained weights in the shape `save_model_dir` reads them (used when FSDP shards the live model)."""

    def __init__(self, weights: dict[str, Any]) -> None:
        self.weights = weights

    def trainable_state_dict(self) -> dict[str, Any]:
        return self.weights


def build_for_stage(
    s: InitSettings, models_cfg: dict[str, Any], stage: str, language_ids: Path | None, device: Any
) -> tuple[Any, Any, Any, dict]:
    """(model, tokenizer, spec, language ids): BLOOMZMMS for init / ctc / ce, Kang & Roy for kd (and for init
    when the settings say `system: kang_roy`: the pretrained HuBERT with a freshly initialised projection).
    `models_cfg` is the settings' `models` section as given: the models layer builds the model from it."""
    from speechllm.models.export import build_model, kang_roy_spec, model_spec

    gradient_checkpointing = s.models.llm.gradient_checkpointing
    if stage == "kd" or (stage == "init" and s.system == "kang_roy"):
        spec = kang_roy_spec(models_cfg, stage=stage)
        model, tokenizer = build_model(
            spec,
            with_ctc=False,
            with_llm=stage == "kd",
            device=device,
            gradient_checkpointing=gradient_checkpointing,
        )
        return model, tokenizer, spec, {}
    from transformers import AutoConfig

    from speechllm.models.adaptor import adaptor_config

    if language_ids is None:
        raise ValueError(f"--language-ids is required for the {stage} stage")
    lid = read_json(language_ids)
    llm_cfg = AutoConfig.from_pretrained(s.models.llm.name_or_path)
    adaptor = adaptor_config(dataclasses.asdict(s.adaptor), len(lid), llm_hidden_size=llm_cfg.hidden_size)
    objective = "ctc" if stage == "init" else stage
    spec = model_spec(models_cfg, adaptor, lid, stage=objective)
    model, tokenizer = build_model(
        spec,
        with_ctc=objective == "ctc",
        with_llm=objective == "ce",
        device=device,
        gradient_checkpointing=gradient_checkpointing,
    )
    return model, tokenizer, spec, lid


def manifest_fields(s: InitSettings) -> tuple[str, ...]:
    """Fields every training and dev record of a stage needs, checked when its manifest is read (a missing
    transcription would otherwise train on an empty target)."""
    from speechllm.train.settings import KdSettings

    if isinstance(s, KdSettings):
        return ("audio", s.responses.text_field, "llm_response")
    return ("audio", "language", "transcription")  # the CE batches carry LID labels too


def check_min_durations(
    records: list[dict[str, Any]], min_samples: int, sampling_rate: int, max_samples: int | None = None
) -> None:
    """Every record (after its speed perturbation) at least as long as the model's shortest input and, for an
    encoder with a fixed window (Whisper), no longer than it: such a clip would stop training at its first
    batch, possibly hours in. The error names the first such record."""
    from speechllm.audio import perturbed_length
    from speechllm.data.manifest import location

    for record in records:
        samples = round(record["num_samples"] * sampling_rate / record.get("sampling_rate", sampling_rate))
        samples = perturbed_length(samples, record.get("speed", 1.0), sampling_rate)
        heard = (
            f"{location(record)}: utterance {record.get('id')} has {samples / sampling_rate:.4f} s of audio"
            f"{' after speed perturbation' if record.get('speed', 1.0) != 1.0 else ''}"
        )
        if samples < min_samples:
            raise ValueError(
                f"{heard}, shorter than the model's shortest input {min_samples / sampling_rate:.4f} s "
                f"({min_samples} samples); data preparation drops such clips (config key data.min_duration)"
            )
        if max_samples is not None and samples > max_samples:
            raise ValueError(
                f"{heard}, longer than the speech encoder's {max_samples / sampling_rate:g} s window; "
                "lower data.max_duration"
            )


def cmd_train(args: argparse.Namespace) -> None:
    from accelerate.utils import set_seed

    from speechllm.data.batches import Collator, SpeechDataset
    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import load_trained_weights, save_model_dir
    from speechllm.train.loop import Trainer, write_json
    from speechllm.train.objectives import DistillationCollator
    from speechllm.train.settings import STAGE_SETTINGS, KdSettings, TrainSettings
    from speechllm.train.tracking import Tracker

    if args.stage != "init":
        stopping.install()  # from here SIGTERM / SIGUSR1 mean: checkpoint after the current update, then exit
    raw = parse_settings(args.settings)  # hashed (run_fingerprint) and recorded (Tracker) as given
    s = STAGE_SETTINGS[args.stage].from_settings(raw)
    set_threads(args.threads)
    set_seed(s.seed)  # the untrained adaptor's initialisation is part of the run
    model, tokenizer, spec, lid = build_for_stage(
        s, raw["models"], args.stage, args.language_ids, process_device()
    )
    if args.init_from:  # the LLM's LoRA adapters (models.llm.lora) start fresh: the CTC stage has none
        load_trained_weights(model, Path(args.init_from) / "model.safetensors", fresh_lora=True)
    out_dir = Path(args.out_dir)
    if args.stage == "init":
        save_model_dir(model, spec, out_dir, extra={"training": {"steps": 0}})
        return
    if not (args.train and args.dev):
        raise ValueError(f"--train and --dev are required for the {args.stage} stage")
    assert isinstance(s, TrainSettings)
    stage = s.stage
    if stage.fsdp and s.models.llm.lora:
        raise ValueError(
            "train.<stage>.fsdp with models.llm.lora is not supported: FSDP2 shards the LLM's "
            "decoder blocks as frozen; set fsdp: false or lora: null"
        )
    sr = s.sampling_rate
    fields = (*manifest_fields(s), "num_samples")
    train_set = SpeechDataset(read_manifest(args.train, required=fields), sr, str(args.train))
    dev_set = SpeechDataset(read_manifest(args.dev, required=fields), sr, str(args.dev))
    for dataset in (train_set, dev_set):
        check_min_durations(dataset.records, model.min_input_samples(), sr, model.max_input_samples())
    if isinstance(s, KdSettings):
        responses = s.responses
        collator = DistillationCollator(tokenizer, responses.text_field, responses.lowercase)
    else:
        from speechllm.data.languages import check_lid_labels

        for dataset in (train_set, dev_set):  # before the first step; the collator checks again
            check_lid_labels(dataset.records, lid, dataset.manifest)
        collator = Collator(tokenizer, lid, s.models.prompt.prefix, s.models.prompt.postfix)
    log_dir = Path(args.log_dir)
    job_type = args.job_type or f"train_{args.stage}"

    def make_tracker(resume_step: int | None, enabled: bool) -> Tracker:
        return Tracker(
            log_dir,
            dataclasses.asdict(s.wandb),
            group=s.experiment,
            job_type=job_type,
            name=args.run_name,
            config=raw,
            enabled=enabled,
            resume_step=resume_step,
        )

    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else log_dir / "checkpoints"
    stopping.check("nothing trained in this job yet")  # a signal while the models were loading
    result = Trainer(
        model,
        tokenizer,
        stage,
        train_set,
        dev_set,
        collator,
        make_tracker,
        s.seed,
        checkpoint_dir,
        run_fingerprint(raw, args),
    ).run()
    summary = result.summary
    if result.weights is None:  # not the main process: rank 0 writes the outputs
        return
    write_json(log_dir / "summary.json", summary)
    exported = SelectedWeights(result.weights) if stage.fsdp else model
    save_model_dir(
        exported,
        spec,
        out_dir,
        extra={
            "training": {k: summary[k] for k in ("selected_steps", "final_step", "epochs", "stopped")},
            "init_from": args.init_from,
        },
    )


def register(sub: argparse._SubParsersAction) -> None:
    tr = add_command(
        sub, "train", "train (or initialise) a model and export it", cmd_train, epilog=EXAMPLES["train"]
    )
    tr.add_argument(
        "stage",
        choices=["init", "ctc", "ce", "kd"],
        help="init: export the untrained model; ctc / ce: BLOOMZMMS stages; kd: Kang & Roy",
    )
    tr.add_argument("--settings", required=True, help="JSON settings built by the rule (rules/common.smk)")
    tr.add_argument("--train", help="training manifest (JSON Lines)")
    tr.add_argument("--dev", help="dev manifest (JSON Lines)")
    tr.add_argument("--language-ids", help="language-name -> LID label JSON (BLOOMZMMS stages)")
    tr.add_argument("--init-from", help="model directory whose trained weights initialise this run")
    tr.add_argument("--out-dir", required=True, help="model directory to export to")
    tr.add_argument("--log-dir", default="logs/train", help="metrics, summary, resolved config, W&B files")
    tr.add_argument(
        "--checkpoint-dir",
        help="periodic checkpoints (default: <log-dir>/checkpoints); a rerun resumes from the latest one",
    )
    tr.add_argument("--run-name", default="run", help="W&B run name")
    tr.add_argument("--job-type", help="W&B job type (the Snakemake rule; default train_<stage>)")
    tr.add_argument("--threads", type=int, default=1)
