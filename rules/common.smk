# Config validation, wildcard constraints and input functions shared by all rule files.

import json
import os
import re
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
# in front of the LLM before CE training (the CE starting point), and the three CE models; baselines: `cascade`
# (the CTC model's transcript put into the LLM prompt as text) and `text` (the gold text; only the LLM is loaded).
SYSTEMS = {
    "ctc_init": ("results/models/ctc_init", "ctc"),
    "ctc": ("results/models/ctc", "ctc"),
    "ce_init": ("results/models/ctc", "llm"),
    **{v: (f"results/models/{v}", "llm") for v in CE_VARIANTS},
    "cascade": ("results/models/ctc", "cascade"),
    "text": ("results/models/ctc_init", "text"),
}
BASELINES = ["cascade", "text"]
BENCHMARK_SYSTEMS = {
    "fleurs_asr": ["ctc_init", "ctc", "ce_init", *CE_VARIANTS, *BASELINES],
    "fleurs_st": ["ce_init", *CE_VARIANTS, *BASELINES],
    "speechglue": ["ce_init", *CE_VARIANTS, *BASELINES],
    "speechxnli": ["ce_init", *CE_VARIANTS, *BASELINES],
}
COVOST2_MANIFEST = "resources/covost2/test.jsonl"
if config["evaluate"]["covost2"]["release_dir"]:
    BENCHMARK_SYSTEMS["covost2_st"] = ["ce_init", *CE_VARIANTS, *BASELINES]
# Kang & Roy (`system: kang_roy`): the speech-prompted model, its cascade (the HF CTC checkpoint named by
# evaluate.cascade_asr, lower-cased as theirs) and the text topline, on the spoken articles and the LibriSpeech
# response perplexity. KANG_ROY_MODEL_DIR is where the KD training exports the model.
KANG_ROY_MODEL_DIR = "results/models/kang_roy"
KANG_ROY_INIT_DIR = "results/models/kang_roy_init"
ARTICLES_MANIFEST = "resources/articles/test.jsonl"
KANG_ROY = config.get("system", "bloomzmms") == "kang_roy"
if KANG_ROY:
    # The summarization experiment is its own DAG: responses → KD training → summarization / perplexity.
    # kang_roy_init: the untrained start (pretrained HuBERT, fresh projection), as ce_init for BLOOMZMMS.
    SYSTEMS = {"kang_roy_init": (KANG_ROY_INIT_DIR, "llm"), "kang_roy": (KANG_ROY_MODEL_DIR, "llm"),
               "kang_roy_cascade": (KANG_ROY_MODEL_DIR, "cascade"), "kang_roy_text": (KANG_ROY_MODEL_DIR, "text")}
    BENCHMARK_SYSTEMS = {b: ["kang_roy_init", "kang_roy", "kang_roy_cascade", "kang_roy_text"]
                         for b in ("summarization", "response_ppl")}
# Published checkpoints (config `released`, rules/models.smk): system released_<name> = the model imported into
# results/models/released_<name>, decoded as configured (ctc: the CTC head on FLEURS ASR only; llm: every
# benchmark). With released.only the trained systems give way to them, and the baselines use released_ctc.
RELEASED = config["released"]
RELEASED_BLOOMZMMS = {f"released_{name}": entry for name, entry in RELEASED["bloomzmms"].items()}
RELEASED_KANG_ROY = "released_kang_roy" if RELEASED["kang_roy"]["checkpoint"] else None
if KANG_ROY and RELEASED_KANG_ROY:
    SYSTEMS[RELEASED_KANG_ROY] = (f"results/models/{RELEASED_KANG_ROY}", "llm")
    if RELEASED["only"]:
        for _system in ("kang_roy_cascade", "kang_roy_text"):
            SYSTEMS[_system] = (SYSTEMS[RELEASED_KANG_ROY][0], SYSTEMS[_system][1])
        del SYSTEMS["kang_roy_init"], SYSTEMS["kang_roy"]
    for _systems in BENCHMARK_SYSTEMS.values():
        _own = [s for s in _systems if s in SYSTEMS and s not in ("kang_roy_cascade", "kang_roy_text")]
        _systems[:] = _own + [RELEASED_KANG_ROY, "kang_roy_cascade", "kang_roy_text"]
elif not KANG_ROY and RELEASED_BLOOMZMMS:
    for _system, _entry in RELEASED_BLOOMZMMS.items():
        SYSTEMS[_system] = (f"results/models/{_system}", _entry["decoder"])
    if RELEASED["only"]:
        if "released_ctc" not in RELEASED_BLOOMZMMS:
            config_error("released.only", "the cascade and text baselines need released.bloomzmms.ctc")
        SYSTEMS["cascade"] = (SYSTEMS["released_ctc"][0], "cascade")
        SYSTEMS["text"] = (SYSTEMS["released_ctc"][0], "text")
        for _system in [s for s in SYSTEMS if s not in RELEASED_BLOOMZMMS and s not in BASELINES]:
            del SYSTEMS[_system]
    for _benchmark, _systems in BENCHMARK_SYSTEMS.items():
        _own = [] if RELEASED["only"] else [s for s in _systems if s not in BASELINES]
        _released = [s for s, e in RELEASED_BLOOMZMMS.items() if e["decoder"] == "llm" or _benchmark == "fleurs_asr"]
        _systems[:] = _own + _released + BASELINES
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

    architecture = encoder_architecture()
    frame_count = encoder_frame_count(architecture) if architecture is not None else None
    if frame_count is None:
        return None
    if KANG_ROY:
        pooling = {"kernel_size": 8, "stride": 4, **config["models"].get("pooling", {})}
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
    # `shards` says which job decodes which batches, not what is decoded: the score files do not record it.
    evaluate = {k: v for k, v in config["evaluate"].items() if k != "shards"}
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
# `resources.rules.<rule>` merged over it.
# accelerate training: may span nodes (resources.rules.<rule>.nodes)
MULTI_NODE_RULES = ("train_ctc", "train_ce", "train_kd")

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
    base = {k: v for k, v in config["resources"].items() if k != "rules"}
    return {**base, **config["resources"].get("rules", {}).get(rule_name, {})}


# Steps that save their progress as they go and resume from it (training checkpoints, the partial files of the
# generation and evaluation shards). On SIGTERM they save and exit with status 75 (speechllm/stopping.py), so
# a job stopped by its time limit or preempted is retried (the Slurm profile lists them as preemptible) and
# goes on where it stopped: a retry needs no more time than the first attempt.
RESUMABLE_RULES = ("train_ctc", "train_ce", "train_kd", "generate_targets", "generate_responses", "evaluate")


def retry_scaled(value, scale, attempts):
    """A resource that grows with each retry, value × scale^(retry), for the first `attempts` retries: a job
    killed for memory (or, if it cannot resume, for time) asks for more when it is retried."""
    return lambda wildcards, attempt: round(value * scale ** min(attempt - 1, attempts))


def stop_signal(rule_name, res, key):
    """sbatch --signal for a resumable step: SIGTERM `stop_signal_seconds` before the time limit (to every
    process of the job's steps, not the batch shell; Slurm may send it up to a minute earlier)."""
    seconds = res.get("stop_signal_seconds")
    if rule_name not in RESUMABLE_RULES or not seconds:
        return {}
    if seconds >= res["runtime"] * 60:
        config_error(f"{key}.stop_signal_seconds", f"{seconds} s is not shorter than {rule_name}'s runtime of "
                                                   f"{res['runtime']} min")
    return {"slurm_extra": f"--signal=TERM@{seconds}"}


def job_resources(rule_name):
    """A model step's resources, as `resources: **job_resources("<rule>")`.

    mem_mb grows on retries (`retry_scale`, for `retry_scale_attempts` retries); runtime too, except for the
    resumable steps, which also ask Slurm for SIGTERM ahead of their time limit (`stop_signal`).
    gpu > 0: `gpu` and `cpus_per_gpu` (sbatch --gpus, --cpus-per-gpu). nodes > 1: GPUs per node as `gres`
    (sbatch --gres counts per node) and the `mpi` resource, so the Slurm plugin runs the shell command as the
    batch step itself and the command's own srun (see `launcher`) starts one task per node.
    """
    res = rule_resources(rule_name)
    key = f"resources.rules.{rule_name}" if rule_name in config["resources"].get("rules", {}) else "resources"
    scale, attempts = res["retry_scale"], res["retry_scale_attempts"]
    out = {"mem_mb": retry_scaled(res["mem_mb"], scale, attempts),
           "runtime": res["runtime"] if rule_name in RESUMABLE_RULES
           else retry_scaled(res["runtime"], scale, attempts),
           **stop_signal(rule_name, res, key)}
    for name in ("slurm_partition", "slurm_account"):  # unset: the profile's default (environment or cluster)
        if res.get(name):
            out[name] = res[name]
    nodes = res.get("nodes", 1)
    if rule_name not in MULTI_NODE_RULES and res["gpu"] > 1:
        config_error(f"{key}.gpu", f"{rule_name} runs one process on one GPU: use gpu 0 or 1")
    if rule_name not in MULTI_NODE_RULES and nodes > 1:
        config_error(f"{key}.nodes", f"{rule_name} runs on one node")
    if nodes > 1:
        if res["gpu"] < 1:
            config_error(f"{key}.nodes", "several nodes need gpu >= 1 (GPUs per node)")
        # tasks_per_gpu=0: without it the plugin turns `tasks` into --ntasks-per-gpu.
        out.update(gres=f"gpu:{res['gpu']}", cpus_per_gpu=res["cpus_per_gpu"], nodes=nodes, mpi="srun",
                   tasks=nodes, tasks_per_gpu=0)
    else:
        out["gpu"] = res["gpu"]
        if res["gpu"] > 0:
            out["cpus_per_gpu"] = res["cpus_per_gpu"]
    return out


def gpus_per_node(resources):
    """GPUs per node of a job: the `gpu` resource, or the count at the end of a `gres` like gpu:4."""
    if resources.get("gpu"):
        return int(resources.get("gpu"))
    gres = str(resources.get("gres") or "")
    return int(gres.rsplit(":", 1)[1]) if gres.startswith("gpu:") else 0


# Slurm signals every process of a job step, and a stop signal must reach `speechllm` while its launchers still
# wait for it (once they exit, the step ends and what is left is killed). So the launcher replaces the rule's
# shell (`exec`) and ignores SIGTERM / SIGUSR1 (inherited; `speechllm` installs its own handlers), and torch's
# elastic agent (several processes) is told not to handle SIGTERM (torchrun --signals_to_handle, read from
# PET_SIGNALS_TO_HANDLE): it would pass it on and kill the processes 30 s later, checkpoint written or not.
SIGNAL_TRANSPARENT = 'trap "" TERM USR1; exec env PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT'


def launcher(wildcards, resources):
    """What starts a model step's `speechllm` call (params.launcher, in front of it in the shell line).

    No GPU: `exec` (the plain call replaces the shell). GPUs on one node: `accelerate launch` with one process
    per GPU, behind `SIGNAL_TRANSPARENT`. Several nodes: `srun` starts one task per node, and each runs
    `accelerate launch` with its machine rank ($SLURM_NODEID) and the main node's address (the first host of
    $SLURM_JOB_NODELIST); the port is offset by the job id so jobs sharing a node do not collide. The
    `speechllm ...` words that follow reach the per-node shell as its arguments ("$@"), so their quoting is kept.
    """
    gpus, nodes = gpus_per_node(resources), int(resources.get("nodes") or 1)
    if gpus == 0:
        return "exec"
    defaults = "--mixed_precision no --dynamo_backend no --no_python"  # precision comes from config (stage)
    if nodes == 1:
        multi = " --multi_gpu" if gpus > 1 else ""
        return f"{SIGNAL_TRANSPARENT} accelerate launch --num_processes {gpus} --num_machines 1{multi} {defaults}"
    port = config["resources"]["main_process_port"]
    per_node = (f"{SIGNAL_TRANSPARENT} accelerate launch --multi_gpu --num_processes {gpus * nodes} "
                f"--num_machines {nodes} "
                '--machine_rank "$SLURM_NODEID" '
                '--main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" '
                f"--main_process_port $(({port} + SLURM_JOB_ID % 1000)) {defaults}")
    return (f"exec {resources.get('mpi') or 'srun'} --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 "
            f"--cpus-per-task={gpus * int(resources.get('cpus_per_gpu'))} --mem=0 --kill-on-bad-exit=1 "
            f"bash -c '{per_node} \"$@\"' accelerate-node")


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
