"""`speechllm train` subcommands: train and export models"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speechllm.cliutils import EXAMPLES, parse_settings, pick_device, set_threads

log = logging.getLogger("speechllm")


def cmd_train(args: argparse.Namespace) -> None:
    from speechllm.data.batches import Collator, SpeechDataset
    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import build_model, load_trained_weights, model_spec, save_model_dir
    from speechllm.train.loop import StageConfig, train, write_json
    from speechllm.train.tracking import Tracker

    s = parse_settings(args.settings)
    set_threads(args.threads)
    lid = json.loads(Path(args.language_ids).read_text("utf-8"))
    adaptor = dict(s["adaptor"], num_lid_classes=len(lid) + 1)
    from transformers import AutoConfig

    llm_cfg = AutoConfig.from_pretrained(s["models"]["llm"]["name_or_path"])
    adaptor["llm_hidden_size"] = llm_cfg.hidden_size
    from speechllm.models.adaptor import AdaptorConfig

    objective = args.stage if args.stage != "init" else "ctc"
    spec = model_spec(s["models"], AdaptorConfig(**adaptor), lid, stage=objective)
    device = pick_device()
    model, tokenizer = build_model(spec, with_ctc=objective == "ctc", with_llm=objective == "ce", device=device,
                                   gradient_checkpointing=s["models"]["llm"].get("gradient_checkpointing", False))
    if args.init_from:
        load_trained_weights(model, Path(args.init_from) / "model.safetensors")
    out_dir = Path(args.out_dir)
    if args.stage == "init":
        save_model_dir(model, spec, out_dir, extra={"training": {"steps": 0}})
        return
    stage = StageConfig.from_config(objective, s["stage"])
    sr = s["sampling_rate"]
    train_set = SpeechDataset(read_manifest(args.train), sr, args.train)
    dev_set = SpeechDataset(read_manifest(args.dev), sr, args.dev)
    collator = Collator(tokenizer, lid, s["models"]["prompt"]["prefix"], s["models"]["prompt"]["postfix"])
    log_dir = Path(args.log_dir)
    tracker = Tracker(log_dir / "metrics.csv", s["wandb"], group=s["experiment"], job_type=f"train_{args.stage}",
                      name=args.run_name, config=s, wandb_dir=log_dir)
    summary = train(model, tokenizer, stage, train_set, dev_set, collator, tracker, s["seed"])
    tracker.close()
    write_json(log_dir / "summary.json", summary)
    save_model_dir(model, spec, out_dir, extra={"training": {k: summary[k] for k in
                                                             ("selected_steps", "final_step", "epochs")},
                                                "init_from": args.init_from})


def register(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train (or initialise) a model and export it", epilog=EXAMPLES["train"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("stage", choices=["init", "ctc", "ce"])
    tr.add_argument("--settings", required=True)
    tr.add_argument("--train")
    tr.add_argument("--dev")
    tr.add_argument("--language-ids", required=True)
    tr.add_argument("--init-from")
    tr.add_argument("--out-dir", required=True)
    tr.add_argument("--log-dir", default="logs/train")
    tr.add_argument("--run-name", default="run")
    tr.add_argument("--threads", type=int, default=1)
    tr.set_defaults(func=cmd_train)
