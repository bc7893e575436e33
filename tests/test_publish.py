"""`speechllm push` and loading by hub id: the packaged folder, its model card, the upload call, and loading
it back through huggingface_hub's cache layout offline (no network: HF_HUB_OFFLINE=1 and a local cache)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_api import bloomzmms_dirs, lively_bloom, write_clips

import speechllm
from speechllm.api import resolve_model_dir
from speechllm.cli import main
from speechllm.models.export import ModelDirError, read_spec
from speechllm.publish import (
    HUB_METRICS,
    CardFacts,
    TableResult,
    languages_of,
    load_config,
    model_results,
)
from speechllm.report.tables import build_table, table_footer, write_table

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_result_tables(tables_dir: Path, scores_dir: Path) -> None:
    """A fleurs_asr table with two models, written as the report step writes it."""
    scores_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for model, (de, en) in {"ctc": (0.612, 0.503), "tmi": (0.417, 0.388)}.items():
        path = scores_dir / f"{model}.scores.json"
        metrics = {
            "per_language": {"de_de": {"wer": de, "cer": de / 2}, "en_us": {"wer": en, "cer": en / 2}},
            "all": {"wer": (de + en) / 2, "cer": (de + en) / 4},
        }
        path.write_text(json.dumps({"benchmark": "fleurs_asr", "model": model, "metrics": metrics}))
        files.append(path)
    write_table(
        build_table("fleurs_asr", files), tables_dir / "fleurs_asr", table_footer("fleurs_asr", files)
    )


@pytest.fixture()
def demo_run(tiny_models, tmp_path) -> Path:
    """A demo-like run directory: results/models/{ctc,tmi} over their own local LLM and encoder copies, and
    results/tables/fleurs_asr.*."""
    parts = tmp_path / "resources"
    lively = lively_bloom(tiny_models["llm"], parts / "llm")
    shutil.copytree(tiny_models["encoder"], parts / "encoder")
    models = tmp_path / "results" / "models"
    bloomzmms_dirs(lively, parts / "encoder", models, ("ce",), names={"ce": "tmi"})
    write_result_tables(tmp_path / "results" / "tables", tmp_path / "results" / "eval")
    return tmp_path


def hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """The folder laid out as huggingface_hub caches a downloaded repo (refs/main, snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def test_push_dry_run_writes_a_loadable_folder_with_its_card(demo_run, tmp_path, capsys) -> None:
    model_dir = demo_run / "results" / "models" / "tmi"
    main(
        [
            "push",
            "--model",
            str(model_dir),
            "--repo",
            "me/tmi-demo",
            "--dry-run",
            "--config",
            str(REPO / "config" / "config.yaml"),
        ]
    )
    folder = demo_run / "results" / "hub" / "tmi-demo"
    assert capsys.readouterr().out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "llm",
        "model.safetensors",
        "speech_encoder",
        "speechllm.json",
    ]
    spec = json.loads((folder / "speechllm.json").read_text())
    assert spec["llm"]["bundled"] == "llm" and spec["speech_encoder"]["bundled"] == "speech_encoder"
    assert spec["llm"]["name_or_path"] == str(demo_run / "resources" / "llm")  # where it came from

    card = ModelCard.load(folder / "README.md")
    assert card.data.language == [
        "de",
        "en",
        "es",
        "fr",
        "it",
        "pt",
    ]  # LID labels + the demo's data.languages
    assert card.data.metrics == ["wer", "cer"]
    assert card.data.library_name == "speechllm" and card.data.pipeline_tag == "audio-text-to-text"
    assert (
        card.data.base_model is None and card.data.datasets is None
    )  # bundled parts, the offline demo corpus
    text = card.text
    assert 'speechllm.load("me/tmi-demo")' in text and "model.ask(" in text and "speechllm transcribe" in text
    assert "| de_de | wer | 41.70 |" in text and "| all | cer | 20.12 |" in text  # the tmi column
    assert "61.20" not in text  # not the ctc column
    assert "offline demo corpus" in text

    # Loaded back by hub id from a populated cache, offline, with the original parts gone.
    (demo_run / "resources").rename(demo_run / "moved")
    cache = tmp_path / "hf_cache"
    hub_cache(cache, "me/tmi-demo", folder)
    clips = write_clips(tmp_path)
    code = (
        "import json, sys, speechllm; m = speechllm.load('me/tmi-demo', device='cpu'); "
        "print(json.dumps([m.ask(f'Repeat the sentence: {{audio:{c}}}. ', num_beams=1, max_new_tokens=6) "
        "for c in sys.argv[1:]]))"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, *clips[:2]], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from_hub = json.loads(done.stdout.strip().splitlines()[-1])
    local = speechllm.load(folder, device="cpu").ask(
        [f"Repeat the sentence: {{audio:{c}}}. " for c in clips[:2]], num_beams=1, max_new_tokens=6
    )
    assert from_hub == local and all(from_hub)


def test_push_uploads_the_folder_with_hfapi(demo_run, monkeypatch, capsys) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            files = sorted(p.name for p in folder.iterdir())
            calls.append(
                ("upload_folder", {**kwargs, "files": files, "card": (folder / "README.md").read_text()})
            )
            return huggingface_hub.CommitInfo(
                commit_url="https://huggingface.co/me/tmi/commit/abc",
                commit_message="m",
                commit_description="",
                oid="abc",
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    main(
        [
            "push",
            "--model",
            str(demo_run / "results" / "models" / "tmi"),
            "--repo",
            "me/tmi",
            "--private",
            "--revision",
            "v1",
            "--config",
            str(REPO / "config" / "config.yaml"),
        ]
    )
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/tmi/commit/abc"
    assert [name for name, _ in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/tmi", "private": True, "exist_ok": True}
    assert calls[1][1] == {"repo_id": "me/tmi", "branch": "v1", "exist_ok": True}
    upload = calls[2][1]
    assert upload["repo_id"] == "me/tmi" and upload["revision"] == "v1"
    assert upload["files"] == ["README.md", "llm", "model.safetensors", "speech_encoder", "speechllm.json"]
    assert "| de_de | wer | 41.70 |" in upload["card"]
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is gone after the upload


def test_card_of_a_paper_scale_model_names_hub_parts_and_datasets(tmp_path) -> None:
    """Parts named by hub id stay references (base_model); a paper config's datasets go in the metadata."""
    model_dir = tmp_path / "results" / "models" / "tmi"
    model_dir.mkdir(parents=True)
    spec = {
        "format": "speechllm-model/1",
        "kind": "bloomzmms",
        "stage": "ce",
        "speechllm_version": "0.1.0",
        "speech_encoder": {
            "name_or_path": "facebook/mms-1b-all",
            "revision": "main",
            "normalize_waveform": True,
        },
        "llm": {
            "name_or_path": "bigscience/bloomz-7b1",
            "revision": "main",
            "dtype": "bfloat16",
            "load_in_8bit": False,
        },
        "language_ids": {"English": 1, "Frisian": 2, "Mandarin Chinese": 3},
        "prompt": {"prefix": "P: ", "postfix": ". "},
    }
    (model_dir / "speechllm.json").write_text(json.dumps(spec))
    (model_dir / "model.safetensors").write_bytes(b"weights")
    out = tmp_path / "out"
    main(
        [
            "push",
            "--model",
            str(model_dir),
            "--repo",
            "me/bloomzmms-tmi",
            "--dry-run",
            "--out",
            str(out),
            "--config",
            str(REPO / "config" / "experiments" / "bloomzmms.yaml"),
            "--license",
            "bigscience-bloom-rail-1.0",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors", "speechllm.json"]
    assert json.loads((out / "speechllm.json").read_text()) == spec
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["facebook/mms-1b-all", "bigscience/bloomz-7b1"]
    assert card.data.datasets == ["google/fleurs"]
    assert card.data.license == "bigscience-bloom-rail-1.0"
    # FLEURS' 102 languages (data.languages) and Frisian, a language-ID label of the model only
    assert len(card.data.language) == 103 and {"cmn", "fy", "yue"} <= set(card.data.language)
    assert "No result table has a `tmi` column" in card.text
    assert "Common Voice 12.0" in card.text


def test_from_pretrained_fetches_hub_ids_with_snapshot_download(demo_run, monkeypatch) -> None:
    import huggingface_hub

    model_dir = demo_run / "results" / "models" / "tmi"
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = speechllm.load("me/tmi", device="cpu", revision="v1", cache_dir="/somewhere")
    assert model.model_dir == model_dir and model.decoder == "llm"
    assert seen == {
        "repo_id": "me/tmi",
        "revision": "v1",
        "cache_dir": "/somewhere",
        "local_files_only": False,
        "token": None,
    }

    def missing(repo_id, **kwargs):  # huggingface_hub's offline message spans lines
        raise huggingface_hub.errors.LocalEntryNotFoundError("no cached copy.\nPlease check your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(
        ModelDirError, match=r"me/absent: no such local model directory.*no cached copy"
    ) as err:
        resolve_model_dir("me/absent")
    assert "\n" not in str(err.value)  # the CLI's error stays one line
    with pytest.raises(ModelDirError, match="not a hub id"):
        resolve_model_dir(str(demo_run / "no" / "such" / "dir"))


def test_a_bundled_part_must_stay_inside_the_model_directory(demo_run) -> None:
    model_dir = demo_run / "results" / "models" / "tmi"
    spec = json.loads((model_dir / "speechllm.json").read_text())
    spec["llm"]["bundled"] = "../../.."
    (model_dir / "speechllm.json").write_text(json.dumps(spec))
    with pytest.raises(ModelDirError, match=r"llm\.bundled must name a folder inside the model directory"):
        read_spec(model_dir)


def test_config_files_merge_as_snakemake_configfile(tmp_path) -> None:
    override = tmp_path / "reduced.yaml"
    override.write_text("data:\n  languages: [fr_fr, cmn_hans_cn]\n")
    config = load_config([str(REPO / "config" / "config.yaml"), str(override)])
    assert config["data"]["languages"] == ["fr_fr", "cmn_hans_cn"]
    assert config["data"]["sampling_rate"] == 16000 and config["experiment"] == "demo"  # the rest kept
    assert languages_of({"language_ids": {"English": 1, "French": 2}}, config) == ["cmn", "en", "fr"]
    with pytest.raises(FileNotFoundError, match="no-such.yaml"):
        load_config([str(REPO / "config" / "config.yaml"), str(tmp_path / "no-such.yaml")])


def test_push_out_never_replaces_a_directory_that_is_not_a_packaged_folder(demo_run) -> None:
    """`--out` names the folder itself: an existing directory of other files (e.g. a results/hub parent meant
    to hold it), the model directory or one of its parents is refused, and nothing in it is touched."""
    model_dir = demo_run / "results" / "models" / "tmi"
    hub = demo_run / "results" / "hub"
    (hub / "other-model").mkdir(parents=True)
    (hub / "other-model" / "README.md").write_text("another packaged model")
    config = str(REPO / "config" / "config.yaml")
    push = ["push", "--model", str(model_dir), "--repo", "me/tmi", "--dry-run", "--config", config, "--out"]
    for out in (hub, model_dir, demo_run / "results" / "models"):
        with pytest.raises(SystemExit, match=re.escape(f"--out {out}: ")):
            main([*push, str(out)])
    assert (hub / "other-model" / "README.md").read_text() == "another packaged model"
    assert (model_dir / "model.safetensors").is_file() and not (model_dir / "README.md").exists()
    # A folder packaged before is replaced as a whole.
    folder = hub / "tmi"
    for _ in range(2):
        main([*push, str(folder)])
    assert (folder / "README.md").is_file() and (folder / "speechllm.json").is_file()


def test_card_metrics_name_every_measure_of_the_result_tables() -> None:
    """Each metric label a result table can hold (but the GLUE averages' `primary`) has its hub metric id."""
    from speechllm.evaluate.metrics import GLUE_PRIMARY_METRIC
    from speechllm.report.tables import METRIC_ORDER, SUMMARY_LABELS

    labels = {*METRIC_ORDER, *SUMMARY_LABELS, *GLUE_PRIMARY_METRIC.values(), "perplexity"}
    assert labels <= HUB_METRICS.keys()
    rows = [("articles", "ROUGE-1", 40.0), ("articles", "BERTScore-F1", 88.0), ("all", "perplexity", 3.0)]
    facts = CardFacts("me/kr", "kang_roy", {}, results=[TableResult("summarization", "", rows)])
    assert facts.metrics == ["rouge", "bertscore", "perplexity"]


def test_a_malformed_result_table_is_named(tmp_path) -> None:
    table = tmp_path / "fleurs_asr.csv"
    table.write_text("language,metric,tmi\nde_de,wer,n/a?\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{table}: column 'tmi' is not numbers"):
        model_results(tmp_path, "tmi")
    table.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{table}: not a result table"):
        model_results(tmp_path, "tmi")
