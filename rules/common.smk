# Config validation, wildcard constraints and input functions shared by all rule files.

import json
import os
import re
import sys

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from speechllm import workflow as workflow_logic  # `workflow` is Snakemake's


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
COVOST2_MANIFEST = "resources/covost2/test.jsonl"
# Kang & Roy (`system: kang_roy`): the summarization experiment is its own DAG (responses → KD training →
# summarization / perplexity); KANG_ROY_MODEL_DIR is where the KD training exports the model, KANG_ROY_INIT_DIR
# its untrained start (pretrained HuBERT, fresh projection), as ce_init for BLOOMZMMS.
KANG_ROY_MODEL_DIR = "results/models/kang_roy"
KANG_ROY_INIT_DIR = "results/models/kang_roy_init"
ARTICLES_MANIFEST = "resources/articles/test.jsonl"
KANG_ROY = config.get("system", "bloomzmms") == "kang_roy"
RELEASED = config["released"]
# system -> (model directory, decoder) and benchmark -> systems: config evaluate.design.<system> with the
# published checkpoints of config `released` (rules/models.smk imports them into results/models/released_<name>).
try:
    SYSTEMS, BENCHMARK_SYSTEMS = workflow_logic.evaluation_design(config)
except workflow_logic.ConfigError as error:
    config_error(error.key, error.message)
DEMO_LLM_DIR = "resources/models/demo-llm"
DEMO_ENCODER_DIR = "resources/models/demo-mms"
TARGET_SHARDS = list(range(config["targets"]["shards"]))
EVAL_SHARDS = config["evaluate"]["shards"]  # jobs per (benchmark, system) evaluation (rules/evaluate.smk)
RESPONSE_SETS = config["targets"]["responses"]["manifests"]
RESPONSE_SHARDS = list(range(config["targets"]["responses"]["shards"]))
RELEASED_TARGETS_ARCHIVE = "resources/bloomzmms/tmi_training_targets.tar.gz"
# A template bank under resources/ is downloaded (targets.templates_download); `builtin` or another path is
# used as it is.
FETCHED_TEMPLATES = (config["targets"]["templates"] if config["targets"]["templates"].startswith("resources/")
                     else None)

if config["data"]["source"] == "demo":
    for key, path in (("models.llm.name_or_path", DEMO_LLM_DIR),
                      ("models.speech_encoder.name_or_path", DEMO_ENCODER_DIR)):
        section, part, _ = key.split(".")
        if config[section][part]["name_or_path"] != path:
            config_error(key, f"the demo world builds its model at {path}")


def encoder_architecture():
    """The speech encoder's config.json content as far as its frame arithmetic needs it: the demo encoder's build
    settings, else config/models/<name>.json or <name_or_path>/config.json; None if neither."""
    if config["data"]["source"] == "demo":
        return dict(config["models"]["demo_build"]["speech_encoder"])
    name = config["models"]["speech_encoder"]["name_or_path"]
    for path in (os.path.join(workflow.basedir, "config", "models", f"{os.path.basename(name)}.json"),
                 os.path.join(name, "config.json")):
        if os.path.isfile(path):
            with open(path) as fh:
                return json.load(fh)
    return None


def model_min_samples():
    """The shortest clip (samples) the configured model turns into at least one speech vector: the encoder's frame
    arithmetic (wav2vec2-family convolutions, Whisper or w2v-BERT features), then the BLOOMZMMS adaptor's (or Kang
    & Roy's pooling); None when the encoder is unknown."""
    from speechllm.models.frames import adaptor_frames_from_config, conv_output_length, encoder_frame_count, \
        min_input_samples

    if KANG_ROY and "pooling" not in config["models"]:  # the model is built from it: no default number here
        config_error("models.pooling", "system kang_roy needs {kernel_size, stride} of its AvgPool1d")
    architecture = encoder_architecture()
    frame_count = encoder_frame_count(architecture) if architecture is not None else None
    if frame_count is None:
        return None
    if KANG_ROY:
        pooling = config["models"]["pooling"]
        downstream = lambda frames: conv_output_length(frames, pooling["kernel_size"], pooling["stride"])
    else:
        downstream = adaptor_frames_from_config(config["models"]["adaptor"])
    return min_input_samples(frame_count, downstream)


def resolve_min_duration():
    """data.min_duration in seconds: `auto` is the model's shortest input; a number below it is refused here,
    before any job runs (such clips would stop training or evaluation when their batch comes)."""
    from speechllm.models.frames import describe_min

    value, rate = config["data"]["min_duration"], config["data"]["sampling_rate"]
    shortest = model_min_samples()
    if shortest is None:
        if value == "auto":
            config_error("data.min_duration", "auto needs the speech encoder's architecture (config/models/"
                                              "<name>.json or <name_or_path>/config.json, neither found): give a "
                                              "number of seconds")
        return value
    if value == "auto":
        return shortest / rate
    if value * rate < shortest:
        config_error("data.min_duration", f"{value} s is shorter than the model's shortest input, "
                                          f"{describe_min(shortest, rate)}: use auto or at least that")
    return value


DATA_MIN_DURATION = resolve_min_duration()
if DATA_MIN_DURATION >= config["data"]["max_duration"]:  # the duration filter would drop every clip
    config_error("data.max_duration", f"{config['data']['max_duration']} s is not above data.min_duration "
                                      f"({DATA_MIN_DURATION:.4g} s): data preparation would drop every clip")


def check_encoder_window():
    """A Whisper encoder reads at most its window (`_feature_extractor.chunk_length` of config/models/<name>.json,
    else 30 s): data.max_duration, stretched by the slowest speed perturbation, must fit in it."""
    architecture = encoder_architecture() or {}
    if architecture.get("model_type") != "whisper":
        return
    window = architecture.get("_feature_extractor", {}).get("chunk_length", 30)
    longest = config["data"]["max_duration"] / min(config["data"]["speed_perturb"])
    if longest > window:
        config_error("data.max_duration", f"{config['data']['max_duration']} s clips become {longest:.2f} s at "
                                          f"speed {min(config['data']['speed_perturb'])}, longer than the Whisper "
                                          f"encoder's {window} s window")


check_encoder_window()


def looks_local(name_or_path):
    """A model named by a filesystem path rather than a hub id (`org/name`)."""
    return bool(name_or_path) and (os.path.isabs(name_or_path) or str(name_or_path).startswith(("./", "../", "~")))


def config_paths():
    """(config key, path, "file" | "directory") of every path the config names that no job makes (the jobs that
    read them would otherwise find them missing only when they run, possibly hours in)."""
    data, paths = config["data"], []
    if config["targets"]["source"] == "generate" and not KANG_ROY and config["targets"]["templates"] != "builtin" \
            and not FETCHED_TEMPLATES:
        paths.append(("targets.templates", config["targets"]["templates"], "file"))
    for key in ("release_dir", "tsv_dir"):
        if config["evaluate"]["covost2"].get(key):
            paths.append((f"evaluate.covost2.{key}", config["evaluate"]["covost2"][key], "directory"))
    if common_voice_enabled():
        paths.append(("data.common_voice.release_dir", data["common_voice"]["release_dir"], "directory"))
    if data["source"] == "hub":
        for source in ("speechglue", "speechxnli"):
            if data.get(source, {}).get("source") == "released" and data[source].get("release_dir"):
                paths.append((f"data.{source}.release_dir", data[source]["release_dir"], "directory"))
    for part in ("llm", "speech_encoder"):
        if looks_local(config["models"][part]["name_or_path"]):
            paths.append((f"models.{part}.name_or_path", config["models"][part]["name_or_path"], "directory"))
    if config["released"]["kang_roy"]["checkpoint"]:
        paths.append(("released.kang_roy.checkpoint", config["released"]["kang_roy"]["checkpoint"], "file"))
    for name, entry in config["released"]["bloomzmms"].items():
        if looks_local(entry["repo"]):
            paths.append((f"released.bloomzmms.{name}.repo", entry["repo"], "directory"))
    if looks_local(config["evaluate"].get("cascade_asr", {}).get("name_or_path")):
        paths.append(("evaluate.cascade_asr.name_or_path", config["evaluate"]["cascade_asr"]["name_or_path"],
                      "directory"))
    return paths


def check_config_paths():
    """Stop with one line naming the key of the first configured path that does not exist."""
    for key, path, kind in config_paths():
        found = os.path.isfile if kind == "file" else os.path.isdir
        if not found(os.path.expanduser(path)):
            config_error(key, f"no such {kind}: {path} (relative paths are read from the working directory "
                              f"{os.getcwd()})")



wildcard_constraints:
    split="train|dev|test",
    system="|".join(SYSTEMS),
    benchmark="|".join(BENCHMARK_SYSTEMS),
    variant="|".join(CE_VARIANTS),
    shard=r"\d+",
    name="|".join(BENCHMARK_SYSTEMS),
    response_set="|".join(re.escape(n) for n in RESPONSE_SETS) or r"[A-Za-z0-9_.-]+",
    released="|".join(re.escape(n) for n in RELEASED["bloomzmms"]) or "$^",


def released_entry(wildcards):
    return config["released"]["bloomzmms"][wildcards.released]


def released_repo_inputs(wildcards):
    """The fetched flag of a hub repository (a local directory is read in place), and the cached speech encoder
    whose architecture the upstream is built with when it is the one models.speech_encoder fetches."""
    repo = released_entry(wildcards)["repo"]
    inputs = {} if looks_local(repo) else {"fetched": f"resources/released/{wildcards.released}.fetched"}
    if config["released"]["speech_encoder"]["name_or_path"] == config["models"]["speech_encoder"]["name_or_path"]:
        inputs["encoder"] = model_inputs()["encoder"]
    return inputs


def parent_dir(path, levels):
    """The directory `levels` above a file: where a step that writes several files is told to write."""
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def optional_arg(flag, value):
    """`flag 'value'` for the shell, or nothing when the value is unset."""
    import shlex

    return f"{flag} {shlex.quote(str(value))}" if value else ""


def as_json(value):
    """Settings passed to `speechllm` as one JSON argument (quoted with :q in shell)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def data_settings():
    keys = ("languages", "sampling_rate", "min_duration", "max_duration", "speed_perturb", "on_bad_audio",
            "tts", "speechglue", "speechxnli", "demo", "fleurs", "common_voice")
    return as_json({k: config["data"][k] for k in keys if k in config["data"]})


def prepare_settings(split):
    """`speechllm data prepare` of one split: `auto` min duration resolved to the model's shortest input, speed
    perturbation on the training split only, durations filtered on train and dev only (as ESPnet's stage 4)."""
    return as_json({
        **json.loads(data_settings()),
        "min_duration": DATA_MIN_DURATION,
        "speed_perturb": config["data"]["speed_perturb"] if split == "train" else [1.0],
        "filter_durations": split != "test" or config["data"]["filter_test_durations"],
    })


def source_settings(*keys):
    """Settings of one source's rule: only the data keys it reads, so other edits do not rerun it."""
    keys = ("sampling_rate", "on_bad_audio", "tts", *keys)
    return as_json({k: config["data"][k] for k in keys if k in config["data"]})


def common_voice_enabled():
    return config["data"]["source"] == "hub" and bool(config["data"].get("common_voice", {}).get("release_dir"))


def common_voice_inputs(wildcards=None):
    """The published utterance list / durations file, when configured (rule zenodo_file fetches them)."""
    cv = config["data"].get("common_voice", {})
    return {key: cv[key] for key in ("utterance_list", "durations") if cv.get(key)}


def zenodo_url(name):
    return f"https://zenodo.org/records/{config['data']['zenodo']['record']}/files/{name}?download=1"


def speechxnli_inputs(wildcards=None):
    """The zenodo SpeechXNLI archive, when the released audio is used and no extracted copy is configured."""
    xnli = config["data"]["speechxnli"]
    if config["data"]["source"] == "hub" and xnli.get("source") == "released" and not xnli.get("release_dir"):
        return {"archive": "resources/zenodo/speech_xnli.tar.gz"}
    return {}


def speechxnli_archive_arg(wildcards=None):
    archive = speechxnli_inputs().get("archive")
    return f"--archive {archive}" if archive else ""


def raw_manifest(wildcards):
    if config["data"]["source"] == "demo":
        return f"resources/demo/fleurs/{wildcards.split}.jsonl"
    if wildcards.split == "train" and common_voice_enabled():
        return "resources/hub/train.jsonl"  # FLEURS train + the Common Voice subsample
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


def template_inputs(wildcards=None):
    """The template bank a generation job reads, when a rule downloads it."""
    return {"templates": FETCHED_TEMPLATES} if FETCHED_TEMPLATES else {}


def llm_input(wildcards=None):
    """What must exist before a step loads the LLM's tokenizer."""
    return model_inputs()["llm"]


def response_manifest(wildcards):
    if wildcards.response_set not in RESPONSE_SETS:
        raise WorkflowError(f"config key targets.responses.manifests has no entry '{wildcards.response_set}'")
    return RESPONSE_SETS[wildcards.response_set]


def response_shards(wildcards):
    return [f"results/responses/{wildcards.response_set}/shard{s}.jsonl" for s in RESPONSE_SHARDS]


def demo_build_settings(*keys):
    build = config["models"].get("demo_build", {})
    return {k: build[k] for k in keys if k in build}


def demo_llm_settings():
    """`speechllm models demo-llm`: the demo LLM's build, the prompts and task sets it is pretrained on."""
    demo = config["data"].get("demo", {})
    return as_json({
        "demo_build": demo_build_settings(
            "tokenizer_vocab_size", "llm_vocab_pad_to", "llm_embedding_norm", "llm", "llm_pretrain"
        ),
        "prompt": config["models"]["prompt"],
        "st_prompt": config["evaluate"]["st_prompt"],
        "llm_fraction": demo.get("llm_train_fraction"),
        "composed": demo.get("composed"),
        "composed_glue": demo.get("composed_glue"),
        "option_prefix": config["evaluate"]["option_prefix"],
        "seed": config["seed"],
    })


def demo_speech_encoder_settings():
    """`speechllm models demo-speech-encoder`: its architecture and character-CTC fine-tuning."""
    return as_json({
        "demo_build": demo_build_settings("speech_encoder"),
        "sampling_rate": config["data"]["sampling_rate"],
        "seed": config["seed"],
    })


def model_settings():
    """What every training or init step reads: the models (without the demo-build knobs), seed, W&B."""
    settings = {k: config[k] for k in ("models", "seed", "wandb", "experiment")}
    settings["models"] = {k: v for k, v in config["models"].items() if k != "demo_build"}
    settings["adaptor"] = config["models"]["adaptor"]
    settings["sampling_rate"] = config["data"]["sampling_rate"]
    return settings


def train_settings(stage):
    settings = model_settings()
    if stage in config["train"]:
        settings["stage"] = config["train"][stage]
    if stage == "kd":  # the teacher's prompt is the transcript the responses were generated from
        settings["responses"] = {k: config["targets"]["responses"][k] for k in ("text_field", "lowercase")}
    return as_json(settings)


def init_settings(system):
    """`speechllm train init` settings of an untrained model: the models without any stage's training knobs, so
    editing train.<stage> does not rebuild (and re-score) the untrained start."""
    settings = model_settings()
    return as_json({**settings, "system": system} if system == "kang_roy" else settings)


def kd_manifest(which):
    """The response manifest (results/responses/<set>.jsonl) the KD stage trains or evaluates on."""
    key = f"{which}_set"
    name = config["train"].get("kd", {}).get(key)
    if name not in RESPONSE_SETS:
        raise WorkflowError(f"config key train.kd.{key} must name a targets.responses.manifests entry, "
                            f"got {name!r}")
    return f"results/responses/{name}.jsonl"


def eval_settings():
    # `shards` says which job decodes which batches and `design` which systems run, not how one is decoded: the
    # score files do not record them.
    evaluate = {k: v for k, v in config["evaluate"].items() if k not in ("shards", "design")}
    return as_json({"evaluate": evaluate, "sampling_rate": config["data"]["sampling_rate"],
                    "experiment": config["experiment"]})


def system_model(wildcards):
    return SYSTEMS[wildcards.system][0]


def eval_shard_rows(wildcards):
    """The outputs of every evaluation shard of one system on one benchmark (evaluate.shards > 1)."""
    return [f"results/eval/{wildcards.benchmark}/{wildcards.system}.shards/shard{k}.json" for k in range(EVAL_SHARDS)]


def system_decoder(wildcards):
    return SYSTEMS[wildcards.system][1]


def benchmark_manifests(wildcards):
    if wildcards.benchmark in ("fleurs_asr", "fleurs_st"):
        return [f"results/data/{EVAL_SPLIT}.jsonl"]
    if wildcards.benchmark == "covost2_st":
        return [COVOST2_MANIFEST]
    if wildcards.benchmark == "summarization":
        return [ARTICLES_MANIFEST]
    if wildcards.benchmark == "response_ppl":
        return [f"results/responses/{config['evaluate']['response_ppl']['response_set']}.jsonl"]
    if wildcards.benchmark == "speechglue":
        return speechglue_manifests()
    return [speechxnli_manifest()]


# Tables that read several benchmarks' score files: the summarization table adds the response perplexity.
TABLE_BENCHMARKS = {"summarization": ["summarization", "response_ppl"]}
# Trained models (results/train/<model>/) -> (job type, name) of their W&B training run, as train.smk names it:
# the learning curves are drawn for these, and a system's W&B results run links to its model's training run.
TRAINED_MODELS = {"ctc": ("train_ctc", f"{config['experiment']}-ctc"),
                  **{v: ("train_ce", f"{config['experiment']}-ce-{v}") for v in CE_VARIANTS}}
if KANG_ROY:
    TRAINED_MODELS = {"kang_roy": ("train_kd", f"{config['experiment']}-kd")}
if RELEASED["only"]:  # nothing is trained
    TRAINED_MODELS = {}
# A model no configured table evaluates (its systems dropped from evaluate.design) is not trained either.
_TABLED_MODELS = {os.path.basename(SYSTEMS[s][0]) for t in config["report"]["tables"]
                  for b in TABLE_BENCHMARKS.get(t, [t]) for s in BENCHMARK_SYSTEMS.get(b, [])}
TRAINED_MODELS = {m: run for m, run in TRAINED_MODELS.items() if m in _TABLED_MODELS}
for _table in config["report"]["tables"]:
    if _table not in BENCHMARK_SYSTEMS:
        config_error("report.tables", f"table '{_table}' has no evaluation in this configuration "
                                      f"(evaluated: {', '.join(BENCHMARK_SYSTEMS)})")


def table_scores(wildcards):
    benchmarks = TABLE_BENCHMARKS.get(wildcards.name, [wildcards.name])
    return [f"results/eval/{b}/{s}.scores.json" for b in benchmarks if b in BENCHMARK_SYSTEMS
            for s in BENCHMARK_SYSTEMS[b]]


def all_tables():
    return [f"results/tables/{name}.{ext}" for name in config["report"]["tables"] for ext in ("md", "csv", "tex")]


def report_plots():
    """Figures of the Snakemake report: learning curves per trained model, bars per configured table."""
    return ([f"results/plots/train/{m}.png" for m in TRAINED_MODELS]
            + [f"results/plots/{name}.png" for name in config["report"]["tables"]])


def result_systems():
    """Systems shown in at least one configured table."""
    return [s for s in SYSTEMS if any(s in BENCHMARK_SYSTEMS[t] for t in config["report"]["tables"])]


def system_scores(wildcards):
    """A system's score files of every configured table it appears in."""
    return [f"results/eval/{b}/{wildcards.system}.scores.json" for t in config["report"]["tables"]
            for b in TABLE_BENCHMARKS.get(t, [t]) if wildcards.system in BENCHMARK_SYSTEMS.get(b, [])]


def system_train_summary(wildcards):
    """The scored model's training summary.json (it may record the W&B run id), for trained models."""
    model = os.path.basename(SYSTEMS[wildcards.system][0])
    return {"train_summary": f"results/train/{model}/summary.json"} if model in TRAINED_MODELS else {}


def wandb_results_settings(system):
    model_dir, decoder = SYSTEMS[system]
    job_type, name = TRAINED_MODELS.get(os.path.basename(model_dir), (None, None))
    return as_json({"experiment": config["experiment"], "wandb": config["wandb"], "model_dir": model_dir,
                    "decoder": decoder, "model_run": {"job_type": job_type, "name": name} if name else None})


def wandb_results():
    """One W&B results run per system (nothing when wandb.mode is disabled)."""
    if config["wandb"]["mode"] == "disabled":
        return []
    return [f"results/wandb/{s}.json" for s in result_systems()]


def wandb_sync_inputs(wildcards):
    """Everything that writes W&B runs; only offered when the runs are written offline."""
    if config["wandb"]["mode"] != "offline":
        raise WorkflowError(f"wandb_sync uploads offline runs, but config key wandb.mode is "
                            f"'{config['wandb']['mode']}' (online runs are uploaded as they run)")
    return wandb_results() + [f"results/train/{m}/summary.json" for m in TRAINED_MODELS]


# Compute of the model steps, locally or on Slurm (profiles/slurm): config `resources`, with
# `resources.rules.<rule>` merged over it (speechllm/workflow.py sizes them).
# Compute nodes without internet: the rules that download run on the submit host instead (the conditional
# ones only where they exist, as in rules/targets.smk).
if config["resources"]["offline_compute_nodes"]:

    localrules:
        fetch_model,
        fetch_released,
        fleurs_data,
        speechglue_data,
        speechxnli_data,
        librispeech_data,
        articles_data,
        zenodo_file,

    if FETCHED_TEMPLATES:

        localrules:
            fetch_templates,

    if config["targets"]["source"] == "released":

        localrules:
            fetch_released_targets,


def rule_resources(rule_name):
    """config `resources` with `resources.rules.<rule_name>` merged over it."""
    return workflow_logic.rule_resources(config["resources"], rule_name)


def job_resources(rule_name):
    """A model step's resources, as `resources: **job_resources("<rule>")` (speechllm/workflow.py)."""
    try:
        return workflow_logic.job_resources(config["resources"], rule_name)
    except workflow_logic.ConfigError as error:
        config_error(error.key, error.message)


def launcher(wildcards, resources):
    """What starts a model step's `speechllm` call (params.launcher): exec, accelerate launch or srun."""
    return workflow_logic.launch_command(resources, config["resources"]["main_process_port"])


def rule_requests():
    """Each rule's first-attempt request, for the resource view: mem_mb, runtime (minutes) and threads, where the
    rule states them as numbers or as functions of (wildcards, attempt) that ignore the wildcards (job_resources)."""

    def first_attempt(resource):
        if resource is None:
            return None
        if not resource.is_evaluable():
            return resource.value if isinstance(resource.value, int) else None
        try:
            value = resource.evaluate(None, attempt=1).value
        except Exception:  # depends on the wildcards: no single number for the rule
            return None
        return value if isinstance(value, int) else None

    return {rule.name: {"mem_mb": first_attempt(rule.resources.get("mem_mb")),
                        "runtime": first_attempt(rule.resources.get("runtime")),
                        "threads": first_attempt(rule.resources.get("_cores"))}
            for rule in workflow.rules if rule.name != "all"}
