# Config validation, wildcard constraints and input functions shared by all rule files.

import json
import os
import sys

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def config_error(key, message):
    """Stop with one line that names the key, no traceback: the user's config is wrong, not the workflow."""
    print(f"config error at key '{key}': {message}", file=sys.stderr)
    sys.exit(1)


def validate_config(cfg, schema_path):
    """snakemake.utils.validate, with a one-line error that names the offending config key."""
    try:
        validate(cfg, schema_path)
    except WorkflowError:
        import yaml

        with open(schema_path) as fh:
            schema = yaml.safe_load(fh)
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(cfg))
        key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
        config_error(key, error.message)


validate_config(config, workflow.source_path("../workflow/schemas/config.schema.yaml"))

EVAL_SPLIT = config["data"].get("splits", {}).get("test", "test")
CE_VARIANTS = ["t", "mi", "tmi"]
# system -> (model directory, decoder): the untrained and trained CTC model decoded by CTC, the CTC model put
# in front of the LLM before CE training (the CE starting point), and the three CE models.
SYSTEMS = {
    "ctc_init": ("results/models/ctc_init", "ctc"),
    "ctc": ("results/models/ctc", "ctc"),
    "ce_init": ("results/models/ctc", "llm"),
    **{v: (f"results/models/{v}", "llm") for v in CE_VARIANTS},
}
BENCHMARK_SYSTEMS = {
    "fleurs_asr": ["ctc_init", "ctc", "ce_init", *CE_VARIANTS],
    "fleurs_st": ["ce_init", *CE_VARIANTS],
    "speechglue": ["ce_init", *CE_VARIANTS],
    "speechxnli": ["ce_init", *CE_VARIANTS],
}
DEMO_LLM_DIR = "resources/models/demo-llm"
DEMO_ENCODER_DIR = "resources/models/demo-mms"
TARGET_SHARDS = list(range(config["targets"]["shards"]))

if config["data"]["source"] == "demo":
    for key, path in (("models.llm.name_or_path", DEMO_LLM_DIR),
                      ("models.speech_encoder.name_or_path", DEMO_ENCODER_DIR)):
        section, part, _ = key.split(".")
        if config[section][part]["name_or_path"] != path:
            config_error(key, f"the demo world builds its model at {path}")


wildcard_constraints:
    split="train|dev|test",
    system="|".join(SYSTEMS),
    benchmark="|".join(BENCHMARK_SYSTEMS),
    variant="|".join(CE_VARIANTS),
    shard=r"\d+",
    name="|".join(BENCHMARK_SYSTEMS),


def parent_dir(path, levels):
    """The directory `levels` above a file: where a step that writes several files is told to write."""
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def as_json(value):
    """Settings passed to `speechllm` as one JSON argument (quoted with :q in shell)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def data_settings():
    keys = ("languages", "sampling_rate", "min_duration", "max_duration", "speed_perturb", "on_bad_audio",
            "tts", "speechglue", "speechxnli", "demo", "fleurs", "common_voice")
    return as_json({k: config["data"][k] for k in keys if k in config["data"]})


def raw_manifest(wildcards):
    if config["data"]["source"] == "demo":
        return f"resources/demo/fleurs/{wildcards.split}.jsonl"
    return f"resources/fleurs/{wildcards.split}.jsonl"


def speechglue_manifests(wildcards=None):
    root = "resources/demo" if config["data"]["source"] == "demo" else "resources"
    return [f"{root}/speechglue/{task}.jsonl" for task in config["data"]["speechglue"]["tasks"]]


def speechxnli_manifest(wildcards=None):
    root = "resources/demo" if config["data"]["source"] == "demo" else "resources"
    return f"{root}/speechxnli/test.jsonl"


def model_inputs(wildcards=None):
    """What must exist before a step loads the LLM and speech encoder."""
    if config["data"]["source"] == "demo":
        return {"llm": DEMO_LLM_DIR, "encoder": DEMO_ENCODER_DIR}
    return {"llm": "resources/models/llm.fetched", "encoder": "resources/models/speech_encoder.fetched"}


def demo_build_settings(*keys):
    build = config["models"].get("demo_build", {})
    return {k: build[k] for k in keys if k in build}


def train_settings(stage):
    settings = {k: config[k] for k in ("models", "seed", "wandb", "experiment")}
    settings["models"] = {k: v for k, v in config["models"].items() if k != "demo_build"}
    settings["adaptor"] = config["models"]["adaptor"]
    settings["sampling_rate"] = config["data"]["sampling_rate"]
    if stage in config["train"]:
        settings["stage"] = config["train"][stage]
    return as_json(settings)


def eval_settings():
    return as_json({"evaluate": config["evaluate"], "sampling_rate": config["data"]["sampling_rate"],
                    "experiment": config["experiment"]})


def system_model(wildcards):
    return SYSTEMS[wildcards.system][0]


def system_decoder(wildcards):
    return SYSTEMS[wildcards.system][1]


def benchmark_manifests(wildcards):
    if wildcards.benchmark in ("fleurs_asr", "fleurs_st"):
        return [f"results/data/{EVAL_SPLIT}.jsonl"]
    if wildcards.benchmark == "speechglue":
        return speechglue_manifests()
    return [speechxnli_manifest()]


def table_scores(wildcards):
    return [f"results/eval/{wildcards.name}/{s}.scores.json" for s in BENCHMARK_SYSTEMS[wildcards.name]]


def all_tables():
    return [f"results/tables/{name}.{ext}" for name in config["report"]["tables"] for ext in ("md", "csv", "tex")]
