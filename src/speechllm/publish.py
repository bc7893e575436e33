"""`speechllm push`: a model directory packaged for the Hugging Face Hub, with a generated model card.

The packaged folder is a model directory that loads anywhere: `speechllm.json` + `model.safetensors`, the
frozen parts that the spec names by a local path copied into it (`speech_encoder/`, `llm/`; the spec's
`"bundled"` key points there, `name_or_path` keeps where they came from), hub-id parts referenced by id and
revision, and `README.md`: the model card. Its YAML metadata holds the languages (the model's language-ID
labels and the experiment's `data.languages`), the base models (hub-id parts), the training datasets (the
experiment's hub datasets) and the metrics of its results; its text says how to use the model and gives the
model's column of each result table (`results/tables/<table>.csv`).

`--dry-run` only writes the folder; otherwise it is uploaded with `huggingface_hub.HfApi.upload_folder`
(authentication as huggingface_hub's: `HF_TOKEN` or `hf auth login`).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechllm.cliutils import add_command

log = logging.getLogger("speechllm")

PUSH_EPILOG = """examples:
  speechllm push --model results/models/tmi --repo me/bloomzmms-demo-tmi --dry-run
  speechllm push --model results/models/tmi --repo me/bloomzmms-tmi --config config/experiments/bloomzmms.yaml

--dry-run writes the folder (default results/hub/<repo name>) and uploads nothing; without it the folder is
uploaded to the hub repository (created if needed) with huggingface_hub (HF_TOKEN or `hf auth login`)."""
# The result tables' metric labels as Hugging Face metric ids (card metadata); others are left out.
HUB_METRICS = {
    "cer": "cer",
    "wer": "wer",
    "bleu": "bleu",
    "chrf": "chrf",
    "accuracy": "accuracy",
    "matthews_correlation": "matthews_correlation",
    "pearson": "pearsonr",
    "perplexity": "perplexity",
    "ROUGE-1": "rouge",
    "ROUGE-2": "rouge",
    "ROUGE-L": "rouge",
    "METEOR": "meteor",
    "BERTScore-P": "bertscore",
    "BERTScore-R": "bertscore",
    "BERTScore-F1": "bertscore",
}
SYSTEM_NAMES = {
    "bloomzmms": "BLOOMZMMS (Denisov & Vu, NAACL 2024 Findings): a frozen speech encoder, a trainable "
    "E-Branchformer adaptor and a frozen multilingual LLM",
    "kang_roy": "a speech-prompted chat LLM after Kang & Roy (Interspeech 2024): a trainable HuBERT-type "
    "encoder with average pooling into a frozen chat LLM",
}
STAGE_NAMES = {
    "ctc": "CTC stage (the adaptor trained with CTC onto the LLM's token embeddings; it transcribes with its "
    "CTC head)",
    "ce": "CE stage (the adaptor trained through the frozen LLM on instruction targets)",
    "kd": "KD stage (the encoder trained by distillation from the LLM's responses to the transcripts)",
    "init": "untrained starting point",
}
CITATIONS = {
    "bloomzmms": "Pavel Denisov and Ngoc Thang Vu. 2024. Teaching a Multilingual Large Language Model to "
    "Understand Multilingual Speech via Multi-Instructional Training. Findings of NAACL 2024.",
    "kang_roy": "Wonjune Kang and Deb Roy. 2024. Prompting Large Language Models with Audio for "
    "General-Purpose Speech Summarization. Interspeech 2024.",
}


@dataclass
class TableResult:
    """One result table's rows for one model: (row label, metric, value)."""

    table: str
    note: str
    rows: list[tuple[str, str, float]]


@dataclass
class CardFacts:
    """Everything the model card says, gathered from the model directory, the config and the tables."""

    repo_id: str
    model_name: str
    spec: dict[str, Any]
    languages: list[str] = field(default_factory=list)
    base_models: list[str] = field(default_factory=list)
    bundled: dict[str, str] = field(default_factory=dict)  # part -> where it was built / loaded from
    datasets: list[str] = field(default_factory=list)
    data_notes: list[str] = field(default_factory=list)
    results: list[TableResult] = field(default_factory=list)
    tables_dir: Path | None = None
    license: str | None = None

    @property
    def metrics(self) -> list[str]:
        labels = [metric for result in self.results for _, metric, _ in result.rows]
        return list(dict.fromkeys(HUB_METRICS[m] for m in labels if m in HUB_METRICS))


# ---------------------------------------------------------------------- facts


def hub_language(code: str) -> str:
    """A FLEURS code (`en_us`, `cmn_hans_cn`), Common Voice locale (`fy-NL`) or short code as the ISO 639 code
    the hub's `language` metadata takes (`en`, `cmn`, `fy`)."""
    return code.replace("-", "_").split("_")[0].lower()


def languages_of(spec: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """ISO codes of the model's language-ID labels (names) and of the experiment's `data.languages`."""
    from speechllm.data.languages import CV_LOCALE_NAMES, CV_TO_FLEURS_NAME, FLEURS_NAMES

    by_name = {name: code for code, name in {**CV_LOCALE_NAMES, **CV_TO_FLEURS_NAME}.items()}
    by_name.update({name: code for code, name in FLEURS_NAMES.items()})
    codes = [by_name[name] for name in spec.get("language_ids", {}) if name in by_name]
    codes += list(config.get("data", {}).get("languages", []))
    return sorted(dict.fromkeys(hub_language(code) for code in codes))


def is_local_part(name_or_path: str) -> bool:
    """A part loaded from a local path (as `models.export` decides: the path exists) rather than a hub id."""
    return Path(name_or_path).exists()


def training_data(spec: dict[str, Any], config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(hub dataset ids, notes) of what the experiment trained on, from its config."""
    data = config.get("data", {})
    kind = spec.get("kind", "bloomzmms")
    if not config:
        return [], ["not recorded (no experiment config was given to `speechllm push`)"]
    if data.get("source", "demo") == "demo":
        return [], [
            "the project's offline demo corpus: sentences in its languages spoken with espeak-ng "
            "(`make demo` builds it; no hub dataset)"
        ]
    if kind == "kang_roy":
        librispeech = data.get("librispeech", {})
        return [librispeech["dataset"]] if "dataset" in librispeech else [], [
            "LibriSpeech 960 h with the frozen LLM's responses to the transcripts"
        ]
    datasets, notes = [], []
    fleurs = data.get("fleurs", {})
    if "dataset" in fleurs:
        datasets.append(fleurs["dataset"])
        notes.append(f"FLEURS ({fleurs['dataset']}), {len(data.get('languages', []))} languages")
    common_voice = data.get("common_voice") or {}
    if common_voice.get("release_dir"):
        notes.append(
            f"a Common Voice 12.0 subsample ({Path(common_voice['release_dir']).name}, from Mozilla)"
        )
    return datasets, notes


def model_results(tables_dir: Path, model_name: str) -> list[TableResult]:
    """The model's column of each result table in `tables_dir` (`<table>.csv`), without empty cells."""
    import pandas as pd

    from speechllm.report.tables import ROW_LEVEL, TABLE_NAMES, VALUE_NOTES

    results = []
    for table in TABLE_NAMES:
        path = tables_dir / f"{table}.csv"
        if not path.is_file():
            continue
        try:
            frame = pd.read_csv(path)
        except ValueError as err:  # pandas' EmptyDataError / ParserError
            raise ValueError(f"{path}: not a result table ({err})") from err
        label = ROW_LEVEL[table]
        if model_name not in frame.columns:
            continue
        if label not in frame.columns or "metric" not in frame.columns:
            raise ValueError(f"{path}: not a result table (no {label!r} and 'metric' columns)")
        try:
            values = [float(value) for value in frame[model_name]]
        except ValueError as err:
            raise ValueError(f"{path}: column {model_name!r} is not numbers ({err})") from err
        rows = [
            (str(row[label]), str(row["metric"]), value)
            for (_, row), value in zip(frame.iterrows(), values, strict=True)
            if not math.isnan(value)
        ]
        if rows:
            results.append(TableResult(table, VALUE_NOTES[table], rows))
    return results


def gather_facts(
    model_dir: Path,
    repo_id: str,
    model_name: str,
    tables_dir: Path | None,
    config: dict[str, Any],
    license: str | None = None,
) -> CardFacts:
    from speechllm.models.export import MODEL_PARTS, read_raw_spec, read_spec

    raw, resolved = read_raw_spec(model_dir), read_spec(model_dir)
    facts = CardFacts(repo_id, model_name, raw, tables_dir=tables_dir, license=license)
    facts.languages = languages_of(raw, config)
    for part in MODEL_PARTS:
        name = resolved[part]["name_or_path"]
        if is_local_part(name):
            facts.bundled[part] = raw[part]["name_or_path"]
        else:
            facts.base_models.append(name)
    facts.datasets, facts.data_notes = training_data(raw, config)
    if tables_dir is not None and tables_dir.is_dir():
        facts.results = model_results(tables_dir, model_name)
    return facts


# ---------------------------------------------------------------------- card


def card_metadata(facts: CardFacts) -> str:
    """The card's YAML front matter (huggingface_hub's ModelCardData field names)."""
    from huggingface_hub import ModelCardData

    kind, stage = facts.spec.get("kind", "bloomzmms"), facts.spec.get("stage")
    data = ModelCardData(
        language=facts.languages or None,
        base_model=facts.base_models or None,
        datasets=facts.datasets or None,
        metrics=facts.metrics or None,
        library_name="speechllm",
        license=facts.license,
        model_name=facts.repo_id.split("/")[-1],
        pipeline_tag="automatic-speech-recognition" if stage == "ctc" else "audio-text-to-text",
        tags=["speech", "speechllm", kind.replace("_", "-"), f"stage-{stage}"],
    )
    return data.to_yaml()


def usage_section(facts: CardFacts) -> list[str]:
    kind, stage = facts.spec.get("kind", "bloomzmms"), facts.spec.get("stage")
    repo = facts.repo_id
    lines = [
        "## How to use",
        "",
        "With the `speechllm` package installed:",
        "",
        "```python",
        "import speechllm",
        "",
        f'model = speechllm.load("{repo}")  # device="cuda", dtype="bfloat16" where there is a GPU',
    ]
    if kind == "kang_roy":
        lines += [
            'print(model.ask("Summarize the following article in 3 sentences or less: {audio:article.wav}"))',
            'print(model.generate_audio_response(samples_16k, "Summarize the following article: "))',
        ]
    elif stage == "ctc":
        lines += [
            'print(model.transcribe(["clip.wav", "other.flac"], batch_size=8))  # any rate and channels'
        ]
    else:
        prefix, postfix = facts.spec["prompt"]["prefix"], facts.spec["prompt"]["postfix"]
        lines += [
            'print(model.transcribe(["clip.wav", "other.flac"], batch_size=8))',
            f'print(model.ask("{prefix}{{audio:clip.wav}}{postfix}"))',
            'print(model.ask("Translate the following text from German to English\\n{audio:de.wav}\\n"))',
        ]
    lines += ["```", "", "or from the command line:", "", "```bash"]
    if kind == "kang_roy" or stage != "ctc":
        lines.append(f'speechllm ask --model {repo} --prompt "... {{audio:clip.wav}} ..."')
    if kind != "kang_roy":
        lines.append(f"speechllm transcribe --model {repo} --batch-size 8 clip.wav other.flac")
    lines += ["```", ""]
    return lines


def model_section(facts: CardFacts) -> list[str]:
    spec = facts.spec
    kind, stage = spec.get("kind", "bloomzmms"), spec.get("stage", "?")
    lines = ["## Model", "", f"- System: {SYSTEM_NAMES[kind]}.", f"- Stage: {STAGE_NAMES.get(stage, stage)}."]
    if facts.languages:
        lines.append(f"- Languages: {', '.join(facts.languages)}.")
    for part, title in (("speech_encoder", "Speech encoder"), ("llm", "LLM")):
        cfg = spec[part]
        if part in facts.bundled:
            lines.append(
                f"- {title}: bundled in this repository (`{part}/`; built from `{facts.bundled[part]}`)."
            )
        else:
            lines.append(
                f"- {title}: [`{cfg['name_or_path']}`](https://huggingface.co/{cfg['name_or_path']}) "
                f"(revision `{cfg.get('revision', 'main')}`), frozen, loaded with `from_pretrained`."
            )
    if "prompt" in spec:
        lines.append(
            f"- Training prompt: prefix {spec['prompt']['prefix']!r}, postfix {spec['prompt']['postfix']!r}."
        )
    training = spec.get("training", {})
    if training:
        lines.append("- Training: " + ", ".join(f"{k} {v}" for k, v in training.items()) + ".")
    lines += [
        f"- Weights: `model.safetensors` holds the trained parameters only (speechllm "
        f"{spec.get('speechllm_version', '?')}, format `{spec.get('format')}`).",
        "",
    ]
    return lines


def results_section(facts: CardFacts) -> list[str]:
    lines = ["## Results", ""]
    if not facts.results:
        where = facts.tables_dir if facts.tables_dir is not None else "(none given)"
        return lines + [
            f"No result table has a `{facts.model_name}` column (tables looked for in {where}).",
            "",
        ]
    lines += [f"The `{facts.model_name}` column of the project's result tables.", ""]
    for result in facts.results:
        lines += [f"### {result.table}", "", "| | metric | value |", "|:--|:--|--:|"]
        lines += [f"| {row} | {metric} | {value:.2f} |" for row, metric, value in result.rows]
        lines += ["", result.note, ""]
    return lines


def model_card(facts: CardFacts) -> str:
    """README.md of the packaged model: YAML metadata, what it is, how to use it, its results."""
    kind = facts.spec.get("kind", "bloomzmms")
    lines = [
        f"---\n{card_metadata(facts).rstrip()}\n---",
        "",
        f"# {facts.repo_id.split('/')[-1]}",
        "",
        f"A `{facts.model_name}` model of the speechllm project: {SYSTEM_NAMES[kind]}.",
        "",
    ]
    lines += usage_section(facts) + model_section(facts) + results_section(facts)
    lines += ["## Training data", ""] + [f"- {note}" for note in facts.data_notes] + [""]
    lines += ["## Citation", "", CITATIONS[kind], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- folder and upload


def package_model(model_dir: Path, out_dir: Path, facts: CardFacts) -> Path:
    """Write the hub folder atomically (weights, spec with local parts bundled, README.md); returns it."""
    import json

    from speechllm.io import atomic_dir
    from speechllm.models.export import BUNDLED_KEY, CTC_HEAD_FILE, read_spec

    spec = dict(facts.spec)
    resolved = read_spec(model_dir)
    with atomic_dir(out_dir) as tmp:
        shutil.copy2(model_dir / "model.safetensors", tmp / "model.safetensors")
        if (model_dir / CTC_HEAD_FILE).is_file():  # an imported model's frozen CTC head
            shutil.copy2(model_dir / CTC_HEAD_FILE, tmp / CTC_HEAD_FILE)
        for part in facts.bundled:
            shutil.copytree(resolved[part]["name_or_path"], tmp / part, ignore=shutil.ignore_patterns(".*"))
            spec[part] = {**spec[part], BUNDLED_KEY: part}
        (tmp / "speechllm.json").write_text(
            json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / "README.md").write_text(model_card(facts), encoding="utf-8")
    return out_dir


def check_out_folder(out: Path, model_dir: Path) -> None:
    """`--out` names the packaged folder itself, which replaces whatever is there: refuse the model directory,
    a directory holding it, and an existing path that is not a folder `speechllm push` wrote (say, a
    `results/hub` meant to hold it), so that no other file is lost."""
    from speechllm.models.export import CTC_HEAD_FILE, MODEL_PARTS

    target, model = out.resolve(), model_dir.resolve()
    if target == model or target in model.parents:
        raise ValueError(
            f"--out {out}: is the model directory or holds it; name a new folder for the package"
        )
    if not target.exists():
        return
    packaged = {"README.md", "speechllm.json", "model.safetensors", CTC_HEAD_FILE, *MODEL_PARTS}
    names = {p.name for p in target.iterdir()} if target.is_dir() else None
    if names is None or (names and not ({"README.md", "speechllm.json"} <= names <= packaged)):
        raise ValueError(
            f"--out {out}: exists and is not a folder written by `speechllm push` (it would be replaced "
            "whole); name the package's own folder, e.g. <dir>/<repo name>"
        )


def upload(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str) -> str:
    """Create the hub repository if needed and upload the folder as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )
    return str(getattr(info, "commit_url", info))


def load_config(paths: list[str] | None) -> dict[str, Any]:
    """The run's config as `snakemake --configfile A B` builds it: A merged over the config/config.yaml beside
    it, then B over that; without files, config/config.yaml of the working directory if there is one."""
    from speechllm.plan.planner import PlanError, load_experiment

    if not paths:
        default = Path("config/config.yaml")
        return load_experiment(default) if default.is_file() else {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
    try:
        return load_experiment([Path(p) for p in paths])
    except PlanError as err:
        raise ValueError(f"--config: {err}") from err


def cmd_push(args: argparse.Namespace) -> None:
    from speechllm.api import HUB_ID
    from speechllm.models.export import read_spec

    if not HUB_ID.fullmatch(args.repo):
        raise ValueError(f"--repo {args.repo!r} is not a hub repository id (owner/name)")
    model_dir = Path(args.model)
    read_spec(model_dir)  # a model directory, with its parts where the spec says
    repo_name = args.repo.split("/")[-1]
    default_out = model_dir.resolve().parent.parent / "hub" / repo_name if args.dry_run else None
    out = Path(args.out) if args.out else default_out
    if out is not None:
        check_out_folder(out, model_dir)
    tables = Path(args.tables) if args.tables else model_dir.resolve().parent.parent / "tables"
    facts = gather_facts(
        model_dir,
        args.repo,
        args.name or model_dir.resolve().name,
        tables,
        load_config(args.config),
        args.license,
    )
    if out is not None and args.dry_run:
        package_model(model_dir, out, facts)
        print(out, flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="speechllm-push-") as scratch:
        folder = package_model(model_dir, out or Path(scratch) / repo_name, facts)
        url = upload(
            folder,
            args.repo,
            args.private,
            args.revision,
            args.commit_message or f"Upload {facts.model_name} with speechllm push",
        )
    print(url, flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    push = add_command(
        sub,
        "push",
        "package a model directory with a model card and upload it to the hub",
        cmd_push,
        description=__doc__,
        epilog=PUSH_EPILOG,
    )
    push.add_argument(
        "--model", required=True, help="the model directory (speechllm.json + model.safetensors)"
    )
    push.add_argument("--repo", required=True, help="hub repository id, owner/name")
    push.add_argument("--dry-run", action="store_true", help="only write the folder; upload nothing")
    push.add_argument(
        "--out",
        help="the folder to write, replaced whole: new, or one push wrote before (default with --dry-run: "
        "results/hub/<name>)",
    )
    push.add_argument(
        "--tables", help="result tables directory (default: results/tables beside results/models)"
    )
    push.add_argument(
        "--config",
        nargs="+",
        metavar="FILE",
        help="the run's config files, merged as snakemake --configfile (default: config/config.yaml)",
    )
    push.add_argument(
        "--name", help="the model's column in the result tables (default: the directory's name)"
    )
    push.add_argument("--license", help="license id for the card metadata (the base models' licenses apply)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to upload to (created if needed; default: main)")
    push.add_argument("--commit-message")
