"""Typed step settings (speechllm/settings.py): each step's dataclass parses the `--settings` its rule builds.

The settings are built by the rules' own code: the `settings=` param of each rule and the rules/common.smk
functions it calls are read out of the .smk files and evaluated on the shipped configs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from speechllm.cli import main
from speechllm.data import settings as data_settings
from speechllm.demo import settings as demo_settings
from speechllm.evaluate import settings as eval_settings
from speechllm.plan import settings as plan_settings
from speechllm.plan.planner import deep_merge
from speechllm.report import settings as report_settings
from speechllm.settings import StepSettings
from speechllm.targets import settings as target_settings
from speechllm.train import settings as train_settings
from speechllm.train.loop import StageConfig
from speechllm.workflow import evaluation_design

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> config files merged over config/config.yaml, as `--configfile`
    "demo": [],
    "demo_summarization": ["config/demo_summarization.yaml"],
    "bloomzmms": ["config/experiments/bloomzmms.yaml"],
    "bloomzmms_released": ["config/experiments/bloomzmms_released.yaml"],
    "speech_summarization": ["config/experiments/speech_summarization.yaml"],
    "speech_summarization_released": ["config/experiments/speech_summarization_released.yaml"],
}
# (rules file, rule name) -> the dataclass its step parses, and the configs that run the rule
STEPS: dict[tuple[str, str], tuple[type[StepSettings], tuple[str, ...]]] = {
    ("data", "demo_data"): (data_settings.DemoSettings, ("demo", "demo_summarization")),
    ("data", "fleurs_data"): (data_settings.FleursSettings, ("bloomzmms",)),
    ("data", "common_voice_data"): (data_settings.CommonVoiceSettings, ("bloomzmms",)),
    ("data", "librispeech_data"): (data_settings.LibriSpeechSettings, ("speech_summarization",)),
    ("data", "articles_data"): (
        data_settings.ArticlesSettings,
        ("demo", "demo_summarization", "speech_summarization"),
    ),
    ("data", "speechglue_data"): (data_settings.SpeechGlueSettings, ("bloomzmms",)),
    ("data", "speechxnli_data"): (data_settings.SpeechXnliSettings, ("bloomzmms",)),
    ("data", "prepare_split"): (data_settings.PrepareSettings, ("demo", "bloomzmms")),
    ("targets", "generate_targets"): (target_settings.GenerateSettings, ("demo", "bloomzmms")),
    ("targets", "assemble_targets"): (target_settings.AssembleSettings, ("demo", "bloomzmms")),
    ("targets", "import_released_targets"): (target_settings.ImportReleasedSettings, ("bloomzmms_released",)),
    ("targets", "generate_responses"): (
        target_settings.ResponsesSettings,
        ("demo_summarization", "speech_summarization"),
    ),
    ("train", "init_model"): (train_settings.InitSettings, ("demo", "bloomzmms")),
    ("train", "init_kang_roy"): (train_settings.InitSettings, ("speech_summarization",)),
    ("train", "train_ctc"): (train_settings.CtcSettings, ("demo", "bloomzmms")),
    ("train", "train_ce"): (train_settings.CeSettings, ("demo", "bloomzmms")),
    ("train", "train_kd"): (train_settings.KdSettings, ("demo_summarization", "speech_summarization")),
    ("models", "demo_llm"): (demo_settings.DemoLlmSettings, ("demo", "demo_summarization")),
    ("models", "demo_speech_encoder"): (demo_settings.DemoSpeechEncoderSettings, ("demo",)),
    ("models", "import_released_kang_roy"): (
        plan_settings.ImportKangRoySettings,
        ("speech_summarization_released",),
    ),
}
COMMON_FUNCTIONS = (
    "as_json",
    "data_settings",
    "source_settings",
    "eval_settings",
    "wandb_results_settings",
    "demo_build_settings",
    "prepare_settings",
    "demo_llm_settings",
    "demo_speech_encoder_settings",
    "model_settings",
    "train_settings",
    "init_settings",
)


def load_config(name: str) -> dict[str, Any]:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for path in CONFIGS[name]:
        config = deep_merge(config, yaml.safe_load((REPO / path).read_text()))
    return config


def balanced(text: str, start: int) -> str:
    """The expression starting at `start`, up to the first comma outside brackets."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] in "([{") - (text[i] in ")]}")
        if text[i] == "," and depth == 0:
            return text[start:i]
    raise AssertionError("unbalanced settings expression")


def common_function(name: str) -> str:
    text = (REPO / "rules/common.smk").read_text()
    match = re.search(rf"^def {name}\(.*?(?=^\S)", text, re.S | re.M)
    assert match, f"rules/common.smk has no function {name}"
    return match.group(0)


def rule_settings(
    rules_file: str, rule: str, config: dict[str, Any], split: str = "train", system: str = "ctc"
) -> dict[str, Any]:
    """The `--settings` object the rule passes, built by the rule's own `params: settings=` expression."""
    text = (REPO / f"rules/{rules_file}.smk").read_text()
    block = re.search(rf"^\s*rule {rule}:\n(.*?)(?=^\s*rule |\Z)", text, re.S | re.M)
    assert block, f"rules/{rules_file}.smk has no rule {rule}"
    body = block.group(1)
    expression = balanced(body, body.index("settings=") + len("settings="))
    scope: dict[str, Any] = {
        "config": config,
        "json": json,
        "os": os,
        "DATA_MIN_DURATION": 0.225,
        "SYSTEMS": evaluation_design(config)[0],
        # the models rules/common.smk finds trained (here: the CTC model), with their training runs
        "TRAINED_MODELS": {"ctc": ("train_ctc", f"{config['experiment']}-ctc")},
    }
    for name in COMMON_FUNCTIONS:
        exec(common_function(name), scope)
    value = eval(expression, scope)
    if callable(value):
        value = value(SimpleNamespace(split=split, system=system))
    return json.loads(value)


def config_keys(schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> set[str]:
    """Every dotted key the config schema names (objects' properties, recursively; `$ref`s resolved)."""
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        keys.add(key)
        for option in [sub, *sub.get("oneOf", []), *sub.get("anyOf", [])]:
            if "$ref" in option:
                option = defs[option["$ref"].removeprefix("#/$defs/")]
            keys |= config_keys(option, defs, f"{key}.")
    return keys


def field_keys(cls: type, prefix: str) -> list[str]:
    """The config keys of a settings dataclass's fields, nested objects included (not train/loop.py's
    StageConfig, which holds every objective's knobs: the schema names each stage's own)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = field.metadata.get("config") or f"{prefix}.{field.name}".lstrip(".")
        keys.append(key)
        if dataclasses.is_dataclass(hints[field.name]) and hints[field.name] is not StageConfig:
            keys += field_keys(hints[field.name], key)
    return keys


CASES = [
    (rules_file, rule, config) for (rules_file, rule), (_, configs) in STEPS.items() for config in configs
]


@pytest.mark.parametrize(("rules_file", "rule", "config"), CASES)
def test_each_step_parses_the_settings_its_rule_builds(rules_file, rule, config):
    cls = STEPS[(rules_file, rule)][0]
    raw = rule_settings(rules_file, rule, load_config(config))
    settings = cls.from_settings(raw)
    for field in dataclasses.fields(settings):  # the step reads what the rule passed
        value = getattr(settings, field.name)
        if field.name in raw and not dataclasses.is_dataclass(value):
            assert value == raw[field.name]


def test_settings_of_one_split_differ_as_the_rule_says():
    config = load_config("demo")
    train = data_settings.PrepareSettings.from_settings(
        rule_settings("data", "prepare_split", config, "train")
    )
    test = data_settings.PrepareSettings.from_settings(rule_settings("data", "prepare_split", config, "test"))
    assert train.speed_perturb == config["data"]["speed_perturb"] and test.speed_perturb == [1.0]
    assert train.min_duration == test.min_duration == 0.225  # the rule's resolved data.min_duration


EVAL_CLASSES = {
    report_settings.WandbResultsSettings,
    *eval_settings.BENCHMARK_SETTINGS.values(),
    eval_settings.DecodeSettings,
    eval_settings.Covost2Settings,
}


@pytest.mark.parametrize(
    "cls", sorted({cls for cls, _ in STEPS.values()} | EVAL_CLASSES, key=lambda c: c.__name__)
)
def test_every_field_is_a_config_key(cls):
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    known = config_keys(schema, schema["$defs"])
    # prepare_split's own: from the split and data.filter_test_durations
    rule_made = {
        "data.filter_durations",
        "model_run",
        "model_run.job_type",
        "model_run.name",
        "model_dir",
        "decoder",
    }
    unknown = [k for k in field_keys(cls, cls.SECTION) if k not in known | rule_made]
    assert unknown == []


def test_a_missing_key_names_it():
    raw = rule_settings("data", "demo_data", load_config("demo"))
    del raw["tts"]["words_per_minute"]
    with pytest.raises(ValueError, match=r"^settings key data\.tts\.words_per_minute: missing$"):
        data_settings.DemoSettings.from_settings(raw)
    raw = rule_settings("targets", "generate_targets", load_config("demo"))
    del raw["llm"]
    with pytest.raises(ValueError, match=r"^settings key models\.llm: missing$"):
        target_settings.GenerateSettings.from_settings(raw)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("sampling_rate",), "16000", "data.sampling_rate: expected int, got str"),
        (("sampling_rate",), True, "data.sampling_rate: expected int, got bool"),
        (("max_duration",), "30", "data.max_duration: expected float, got str"),
        (("speed_perturb",), 1.0, "data.speed_perturb: expected list, got float"),
        (("speed_perturb",), [1.0, "fast"], r"data.speed_perturb\[1\]: expected float, got str"),
        (("filter_durations",), 1, "data.filter_durations: expected bool, got int"),
    ],
)
def test_a_wrongly_typed_key_names_it(path, value, message):
    raw = rule_settings("data", "prepare_split", load_config("demo"))
    raw[path[0]] = value
    with pytest.raises(ValueError, match=f"^settings key {message}$"):
        data_settings.PrepareSettings.from_settings(raw)


def test_nested_and_optional_keys():
    raw = rule_settings("data", "demo_data", load_config("demo"))
    raw["tts"]["voices"]["en_us"] = 3
    with pytest.raises(ValueError, match=r"^settings key data\.tts\.voices\.en_us: expected str, got int$"):
        data_settings.DemoSettings.from_settings(raw)
    raw = rule_settings("data", "demo_data", load_config("demo"))
    raw["demo"]["composed"] = {"train": "many"}
    with pytest.raises(
        ValueError, match=r"^settings key data\.demo\.composed\.train: expected int, got str$"
    ):
        data_settings.DemoSettings.from_settings(raw)
    del raw["demo"]["composed"]  # read with a fallback: absent = None, as before
    assert data_settings.DemoSettings.from_settings(raw).demo.composed is None
    raw = rule_settings("data", "speechxnli_data", load_config("bloomzmms"))
    raw["speechxnli"].pop("revision")
    assert data_settings.SpeechXnliSettings.from_settings(raw).speechxnli.revision == "main"
    raw["speechxnli"]["release_dir"] = 5
    with pytest.raises(ValueError, match=r"data\.speechxnli\.release_dir: expected str or null, got int$"):
        data_settings.SpeechXnliSettings.from_settings(raw)


def test_unknown_keys_are_ignored_and_settings_are_frozen():
    raw = rule_settings("targets", "assemble_targets", load_config("demo"))
    settings = target_settings.AssembleSettings.from_settings({**raw, "not_read": 1})
    assert settings == target_settings.AssembleSettings.from_settings(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mi_reading = "reference_pop"  # type: ignore[misc]


def test_the_cli_reports_a_bad_setting_in_one_line(tmp_path, capsys):
    raw = copy.deepcopy(rule_settings("data", "prepare_split", load_config("demo")))
    raw["on_bad_audio"] = None
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "data",
                "prepare",
                "--settings",
                json.dumps(raw),
                "--manifest",
                str(tmp_path / "m.jsonl"),
                "--out",
                str(tmp_path / "out.jsonl"),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
    assert str(stop.value).endswith("settings key data.on_bad_audio: expected str, got null")
    assert "\n" not in str(stop.value)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("benchmark", sorted(eval_settings.BENCHMARK_SETTINGS))
def test_each_benchmark_parses_the_evaluate_rules_settings(benchmark, config):
    raw = rule_settings("evaluate", "evaluate", load_config(config))
    assert raw == rule_settings("evaluate", "evaluate_gather", load_config(config))
    settings = eval_settings.benchmark_settings(benchmark, raw)
    assert isinstance(settings, eval_settings.BENCHMARK_SETTINGS[benchmark])
    assert settings.batch_size == raw["evaluate"]["batch_size"]
    assert eval_settings.DecodeSettings.from_settings(raw).sampling_rate == raw["sampling_rate"]
    if benchmark == "summarization":
        assert settings.summarization.bertscore == raw["evaluate"]["summarization"]["bertscore"]
    covost2 = eval_settings.Covost2Settings.from_section(
        rule_settings("evaluate", "covost2_data", load_config(config))
    )
    assert covost2.covost2.languages == raw["evaluate"]["covost2"]["languages"]


def test_evaluate_settings_errors_name_the_key():
    raw = rule_settings("evaluate", "evaluate", load_config("demo"))
    bad = copy.deepcopy(raw)
    bad["evaluate"]["num_beams"] = "5"
    with pytest.raises(ValueError, match=r"^settings key evaluate\.num_beams: expected int, got str$"):
        eval_settings.benchmark_settings("fleurs_asr", bad)
    # summarization does not read evaluate.num_beams (its own summarization.num_beams)
    assert eval_settings.benchmark_settings("summarization", bad).summarization.num_beams == 1
    bad = copy.deepcopy(raw)
    del bad["evaluate"]["summarization"]["bertscore"]
    with pytest.raises(ValueError, match=r"^settings key evaluate\.summarization\.bertscore: missing$"):
        eval_settings.benchmark_settings("summarization", bad)
    with pytest.raises(ValueError, match=r"^settings key evaluate: missing$"):
        eval_settings.benchmark_settings("speechglue", {"sampling_rate": 16000})
    with pytest.raises(ValueError, match=r"^settings key data\.sampling_rate: expected int, got float$"):
        eval_settings.DecodeSettings.from_settings({**raw, "sampling_rate": 16000.5})
    bad = copy.deepcopy(raw)
    bad["evaluate"]["cascade_asr"]["lowercase"] = "yes"
    with pytest.raises(
        ValueError, match=r"^settings key evaluate\.cascade_asr\.lowercase: expected bool, got str$"
    ):
        eval_settings.benchmark_settings("fleurs_st", bad)
    with pytest.raises(ValueError, match="unknown benchmark 'asr'"):
        eval_settings.benchmark_settings("asr", raw)


def test_fallbacks_of_keys_read_with_a_default():
    raw = rule_settings("evaluate", "evaluate", load_config("demo"))
    for key in ("ctc", "cascade_asr", "ctc_branch", "st_normalize"):
        del raw["evaluate"][key]
    settings = eval_settings.benchmark_settings("fleurs_st", raw)
    assert (settings.ctc, settings.cascade_asr, settings.ctc_branch, settings.st_normalize) == (
        None,
        None,
        True,
        "both",
    )


@pytest.mark.parametrize("system", ["ctc", "t"])
def test_the_wandb_results_step_parses_its_rules_settings(system):
    config = load_config("demo")
    raw = rule_settings("report", "wandb_results", config, system=system)
    settings = report_settings.WandbResultsSettings.from_settings(raw)
    assert settings.wandb.project == config["wandb"]["project"] and settings.model_dir == raw["model_dir"]
    # only the CTC model is trained here: the t system links no training run
    assert settings.model_run == (
        report_settings.ModelRun("train_ctc", "demo-ctc") if system == "ctc" else None
    )
    raw["model_run"] = {"name": "demo-ctc"}
    with pytest.raises(ValueError, match=r"^settings key model_run\.job_type: missing$"):
        report_settings.WandbResultsSettings.from_settings(raw)


@pytest.mark.parametrize(
    ("rule", "config", "objective"),
    [
        ("init_model", "demo", "init"),
        ("init_kang_roy", "speech_summarization", "init"),
        ("train_ctc", "bloomzmms", "ctc"),
        ("train_ce", "demo", "ce"),
        ("train_kd", "speech_summarization", "kd"),
    ],
)
def test_train_settings_read_what_the_rule_passes(rule, config, objective):
    raw = rule_settings("train", rule, load_config(config))
    settings = train_settings.STAGE_SETTINGS[objective].from_settings(raw)
    # the model is built from these: the adaptor's keys round-trip exactly (AdaptorConfig(**...))
    assert dataclasses.asdict(settings.adaptor) == raw["adaptor"] == raw["models"]["adaptor"]
    assert settings.models.llm.name_or_path == raw["models"]["llm"]["name_or_path"]
    assert settings.models.llm.lora == raw["models"]["llm"]["lora"]
    assert dataclasses.asdict(settings.wandb) == raw["wandb"]
    assert settings.system == ("kang_roy" if rule == "init_kang_roy" else "bloomzmms")
    if objective == "init":
        assert not hasattr(settings, "stage") and "stage" not in raw
        return
    assert settings.stage == StageConfig.from_config(objective, raw["stage"])
    assert settings.stage.objective == objective
    if objective == "kd":
        assert dataclasses.asdict(settings.responses) == raw["responses"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.pop("stage"), "train.ce: missing"),
        (lambda raw: raw.update(stage=[1]), "train.ce: expected object, got list"),
        (lambda raw: raw["stage"].update(batch_budget="all"), "train.ce: batch_budget must be one of"),
        (lambda raw: raw["stage"].update(lr_typo=1.0), "train.ce: .*unexpected keyword argument 'lr_typo'"),
        (lambda raw: raw["models"]["llm"].update(lora="yes"), r"models\.llm\.lora: expected object or null"),
        (lambda raw: raw["models"]["llm"].pop("name_or_path"), r"models\.llm\.name_or_path: missing"),
        (lambda raw: raw["models"]["prompt"].update(prefix=None), r"models\.prompt\.prefix: expected str"),
        (lambda raw: raw["adaptor"].update(dropout="0.1"), r"models\.adaptor\.dropout: expected float"),
        (lambda raw: raw.update(sampling_rate=16000.0), r"data\.sampling_rate: expected int, got float"),
        (lambda raw: raw["wandb"].pop("project"), r"wandb\.project: missing"),
        (lambda raw: raw.update(seed="0"), "seed: expected int, got str"),
    ],
)
def test_train_settings_errors_name_the_key(edit, message):
    raw = copy.deepcopy(rule_settings("train", "train_ce", load_config("demo")))
    edit(raw)
    with pytest.raises(ValueError, match=f"^settings key {message}"):
        train_settings.CeSettings.from_settings(raw)


def test_kd_settings_fall_back_as_the_step_always_did():
    raw = rule_settings("train", "train_kd", load_config("speech_summarization"))
    del raw["responses"]
    del raw["models"]["llm"]["gradient_checkpointing"]
    settings = train_settings.KdSettings.from_settings(raw)
    assert settings.responses == train_settings.Responses("raw_transcription", True)
    assert settings.models.llm.gradient_checkpointing is False
    raw["responses"] = {"text_field": 3}
    with pytest.raises(ValueError, match=r"^settings key targets\.responses\.text_field: expected str"):
        train_settings.KdSettings.from_settings(raw)


def test_train_cli_reports_a_bad_stage_before_loading_a_model(tmp_path):
    raw = rule_settings("train", "train_ctc", load_config("demo"))
    del raw["stage"]
    with pytest.raises(SystemExit) as stop:
        main(["train", "ctc", "--settings", json.dumps(raw), "--out-dir", str(tmp_path / "out")])
    assert str(stop.value) == "speechllm train ctc: error: settings key train.ctc: missing"


@pytest.mark.parametrize("config", ["demo", "demo_summarization"])
def test_demo_builders_get_the_keys_the_rules_pass(config):
    """The demo builders read dicts: the parsed settings give back exactly what the rules pass."""
    raw = rule_settings("models", "demo_llm", load_config(config))
    llm = demo_settings.DemoLlmSettings.from_settings(raw)
    assert dataclasses.asdict(llm.demo_build) == raw["demo_build"]
    assert dataclasses.asdict(llm.prompt) == {k: raw["prompt"][k] for k in ("prefix", "postfix")}
    assert dataclasses.asdict(llm.st_prompt) == raw["st_prompt"]
    raw = rule_settings("models", "demo_speech_encoder", load_config(config))
    encoder = demo_settings.DemoSpeechEncoderSettings.from_settings(raw)
    assert dataclasses.asdict(encoder.demo_build) == raw["demo_build"]
    assert encoder.demo_build.speech_encoder.ctc_finetune.updates > 0


@pytest.mark.parametrize(
    ("rule", "edit", "message"),
    [
        (
            "demo_llm",
            lambda raw: raw["demo_build"]["llm_pretrain"].update(steps="many"),
            r"models\.demo_build\.llm_pretrain\.steps: expected int, got str",
        ),
        (
            "demo_llm",
            lambda raw: raw.update(llm_fraction=None),
            r"data\.demo\.llm_train_fraction: expected float",
        ),
        (
            "demo_llm",
            lambda raw: raw.update(composed={"train": "1"}),
            r"data\.demo\.composed\.train: expected int",
        ),
        ("demo_llm", lambda raw: raw["st_prompt"].pop("postfix"), r"evaluate\.st_prompt\.postfix: missing"),
        (
            "demo_speech_encoder",
            lambda raw: raw["demo_build"]["speech_encoder"]["ctc_finetune"].pop("lr"),
            r"models\.demo_build\.speech_encoder\.ctc_finetune\.lr: missing",
        ),
        (
            "demo_speech_encoder",
            lambda raw: raw["demo_build"]["speech_encoder"].update(conv_dim=[32, "32"]),
            r"models\.demo_build\.speech_encoder\.conv_dim\[1\]: expected int, got str",
        ),
    ],
)
def test_demo_model_settings_errors_name_the_key(rule, edit, message):
    raw = copy.deepcopy(rule_settings("models", rule, load_config("demo")))
    edit(raw)
    cls = demo_settings.DemoLlmSettings if rule == "demo_llm" else demo_settings.DemoSpeechEncoderSettings
    with pytest.raises(ValueError, match=f"^settings key {message}"):
        cls.from_settings(raw)


def test_kang_roy_import_reads_the_models_the_rule_passes(tmp_path):
    raw = rule_settings("models", "import_released_kang_roy", load_config("speech_summarization_released"))
    settings = plan_settings.ImportKangRoySettings.from_settings(raw)
    assert dataclasses.asdict(settings.models) == raw["models"]
    # `--config`: the experiment's whole `models` section, its other parts left out
    config = load_config("speech_summarization")
    from_config = plan_settings.ImportKangRoySettings.from_settings(config, where="speech_summarization.yaml")
    assert from_config == plan_settings.ImportKangRoySettings.from_settings(
        {"models": {k: config["models"][k] for k in raw["models"]}}
    )
    del raw["models"]["pooling"]
    with pytest.raises(ValueError, match=r"^settings key models\.pooling: missing$"):
        plan_settings.ImportKangRoySettings.from_settings(raw)
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "import",
                "kang-roy",
                "--checkpoint",
                str(tmp_path / "absent.pt"),
                "--out-dir",
                str(tmp_path / "out"),
                "--config",
                str(REPO / "config/config.yaml"),
            ]
        )
    assert str(stop.value).endswith("config/config.yaml key models.pooling: missing")
