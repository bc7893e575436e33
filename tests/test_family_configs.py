"""Architecture configs of current LLMs and speech encoders, `speechllm plan` on them, and the ready
experiment config of the BLOOMZMMS recipe on Qwen2.5-7B-Instruct + Whisper-large-v3 (plan and offline dry
run)."""

from __future__ import annotations

import pytest
import test_workflow
import torch
from test_plan import MODELS_DIR, REPO, SUMMARIZATION, counted, parts_by_name
from test_workflow import STAGE_RULES, snakemake
from tiny_families import tiny_w2v_bert_config, tiny_whisper_config
from transformers import Wav2Vec2BertModel, WhisperModel

from speechllm.cli import main
from speechllm.models.frames import whisper_frame_count
from speechllm.plan.planner import (
    PlanError,
    load_arch_config,
    load_experiment,
    meta_model,
    num_params,
    plan_experiment,
    speech_encoder_flops,
    speech_encoder_from_config,
)

RECIPE = REPO / "config" / "experiments" / "bloomzmms_recipe_qwen2.5-7b_whisper-large-v3.yaml"
SUMMARIZATION_RECIPE = REPO / "config" / "experiments" / "speech_summarization_llama-3.1-8b_w2v-bert-2.0.yaml"
QWEN, LLAMA = "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"
WHISPER, W2V_BERT = "openai/whisper-large-v3", "facebook/w2v-bert-2.0"


# Published sizes (model cards: Qwen2.5-7B 7.61B / "7.62B", Llama 3.1 8B 8.03B, Whisper large-v3 1550M,
# w2v-BERT 2.0 "600M" / 580M), then the exact meta-device builds.
@pytest.mark.parametrize(
    ("name", "causal_lm", "published", "exact"),
    [
        (QWEN, True, 7.62e9, 7_615_616_512),
        (LLAMA, True, 8.03e9, 8_030_261_248),
        (WHISPER, False, 1.55e9, 1_543_490_560),
        (W2V_BERT, False, 580e6, 580_493_120),
    ],
)
def test_architecture_files_give_the_published_parameter_counts(name, causal_lm, published, exact) -> None:
    config, _ = load_arch_config(name, MODELS_DIR)
    count = num_params(meta_model(config, causal_lm))
    assert count == pytest.approx(published, rel=0.01)
    assert count == exact


def test_whisper_is_planned_as_its_encoder() -> None:
    config, facts = load_arch_config(WHISPER, MODELS_DIR)
    encoder = speech_encoder_from_config(config)
    assert type(encoder).__name__ == "WhisperEncoder"
    assert num_params(encoder) == pytest.approx(635e6, rel=0.01) and num_params(encoder) == 636_968_960
    assert facts["feature_extractor"]["feature_size"] == config.num_mel_bins == 128


@pytest.fixture(scope="module")
def recipe_plans():
    return {p.stage: p for p in plan_experiment(load_experiment(RECIPE), MODELS_DIR)}


def test_recipe_plan_counts_qwen_and_whisper(recipe_plans) -> None:
    ctc, ce = parts_by_name(recipe_plans["ctc"]), parts_by_name(recipe_plans["ce"])
    assert ce["llm"].frozen_params == 7_615_616_512
    assert ctc["speech_encoder"].frozen_params == 636_968_960
    assert ctc["ctc_head"].frozen_params == 151_665 * 3584  # Qwen's tokenizer, not its 152,064 embedding rows
    assert (
        ctc["featurizer+preencoder"].trainable_params == 33 + 1280 * 128 + 128
    )  # 32 layers + input, width 1280
    assert ctc["adaptor"].trainable_params < 536e6  # the same E-Branchformer, a narrower LLM (3584 < 4096)
    samples = recipe_plans["ctc"].workload.samples
    assert recipe_plans["ctc"].workload.encoder_frames == whisper_frame_count(samples) == 600  # 12 s at 50 Hz


def test_recipe_plan_cli_prints_counts_and_memory(capsys) -> None:
    main(["plan", "--config", str(RECIPE)])
    out = capsys.readouterr().out
    assert "7,615,616,512" in out and "636,968,960" in out and "memory per GPU" in out


def test_plan_llama_with_w2v_bert_in_both_systems() -> None:
    cfg = load_experiment(RECIPE)
    cfg["models"]["llm"]["name_or_path"] = LLAMA
    cfg["models"]["speech_encoder"]["name_or_path"] = W2V_BERT
    ctc = {p.stage: p for p in plan_experiment(cfg, MODELS_DIR)}["ctc"]
    assert parts_by_name(ctc)["speech_encoder"].frozen_params == 580_493_120
    assert parts_by_name(ctc)["ctc_head"].frozen_params == 128_256 * 4096
    assert (
        ctc.workload.encoder_frames == ((ctc.workload.samples - 400) // 160 + 1) // 2
    )  # 20 ms stacked fbanks
    summarization = load_experiment(SUMMARIZATION)
    summarization["models"]["llm"]["name_or_path"] = QWEN
    summarization["models"]["speech_encoder"]["name_or_path"] = W2V_BERT
    kd = parts_by_name(plan_experiment(summarization, MODELS_DIR)[0])
    assert kd["speech_encoder"].trainable_params == 580_493_120 and kd["speech_encoder"].activation_bytes > 0
    assert kd["pool+projection"].trainable_params == 1024 * 3584 + 3584
    assert kd["llm"].frozen_params == 7_615_616_512


def test_plan_refuses_waveform_normalisation_for_a_log_mel_encoder() -> None:
    cfg = load_experiment(RECIPE)
    cfg["models"]["speech_encoder"]["normalize_waveform"] = True
    with pytest.raises(PlanError, match="models.speech_encoder.*normalize_waveform must be false"):
        plan_experiment(cfg, MODELS_DIR)


@pytest.mark.parametrize("family", ["whisper", "w2v-bert"])
def test_log_mel_encoder_flops_match_the_counter(family) -> None:
    torch.manual_seed(0)
    batch, samples = 2, 16000
    if family == "whisper":
        encoder = WhisperModel(tiny_whisper_config(attn_implementation="eager")).get_encoder().eval()
        inputs = {"input_features": torch.randn(batch, 16, 200)}
    else:
        encoder = Wav2Vec2BertModel(tiny_w2v_bert_config(attn_implementation="eager")).eval()
        frames = ((samples - 400) // 160 + 1) // 2
        inputs = {"input_features": torch.randn(batch, frames, 32)}
    fwd, _, _ = counted(lambda: encoder(**inputs).last_hidden_state.sum())
    expected, frames, _ = speech_encoder_flops(encoder, batch, samples)
    assert frames == (100 if family == "whisper" else 49)
    assert expected == pytest.approx(fwd, rel=0.02)


@pytest.mark.parametrize(
    ("config", "stages"),
    [
        (RECIPE, STAGE_RULES),
        (SUMMARIZATION_RECIPE, {"generate_responses", "init_kang_roy", "train_kd", "evaluate"}),
    ],
)
def test_recipes_dry_run_offline_with_every_stage(tmp_path, config, stages) -> None:
    res = snakemake("-n", "-d", str(tmp_path), "--configfile", str(config))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    jobs = {
        line.split()[0]
        for line in out.split("Job stats:")[1].splitlines()[3:]
        if line.strip() and not line.startswith("total")
    }
    assert jobs >= stages, stages - jobs


def test_summarization_recipe_plan_counts_llama_and_w2v_bert(capsys) -> None:
    kd = plan_experiment(load_experiment(SUMMARIZATION_RECIPE), MODELS_DIR)[0]
    parts = parts_by_name(kd)
    assert parts["speech_encoder"].trainable_params == 580_493_120
    assert parts["llm"].frozen_params == 8_030_261_248
    assert kd.workload.encoder_frames == ((kd.workload.samples - 400) // 160 + 1) // 2 == 999
    main(["plan", "--config", str(SUMMARIZATION_RECIPE)])
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "580,493,120" in out and "memory per GPU" in out


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"models": {"prompt": {"format": "xml"}}}, "models.prompt.format"),
        ({"models": {"ctc_head": {"blank_id": ""}}}, "models.ctc_head.blank_id"),
        (
            {"models": {"llm": {"lora": {"r": 0, "alpha": 8, "target_modules": ["q_proj"]}}}},
            "models.llm.lora.r",
        ),
    ],
)
def test_family_config_errors_name_the_key(tmp_path, data, key) -> None:
    test_workflow.test_config_errors_name_the_key(tmp_path, data, key)


def test_whisper_window_bounds_the_longest_clip(tmp_path) -> None:
    res = snakemake(
        "-n",
        "-d",
        str(tmp_path),
        "--configfile",
        str(RECIPE),
        str(test_workflow.override(tmp_path, {"data": {"max_duration": 30.0}})),
    )
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "config error at key" in line]
    assert len(lines) == 1 and "'data.max_duration'" in lines[0] and "30 s window" in lines[0], res.stderr[
        -2000:
    ]


def test_training_refuses_clips_longer_than_the_whisper_window() -> None:
    from speechllm.train.commands import check_min_durations

    records = [
        {"id": "long", "num_samples": 30_000, "speed": 1.1, "_line": 3, "_path": "train.jsonl"},
        {"id": "slow", "num_samples": 30_000, "speed": 0.9, "_line": 4, "_path": "train.jsonl"},
    ]
    check_min_durations(records[:1], 100, 16000, max_samples=32_000)
    with pytest.raises(ValueError, match="utterance slow .* longer than the speech encoder's 2 s window"):
        check_min_durations(records, 100, 16000, max_samples=32_000)


def test_plan_counts_lora_adapters_as_trainable() -> None:
    pytest.importorskip("peft")
    cfg = load_experiment(RECIPE)
    cfg["models"]["llm"]["lora"] = {
        "r": 16,
        "alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    plans = {p.stage: p for p in plan_experiment(cfg, MODELS_DIR)}
    llm = parts_by_name(plans["ce"])["llm"]
    adapters = 28 * 16 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584))  # r x (in + out) per projection
    assert (llm.trainable_params, llm.frozen_params) == (adapters, 7_615_616_512)
    assert llm.role == "mixed" and llm.optimizer_bytes == 8 * adapters and llm.grad_bytes == 4 * adapters
    frozen = parts_by_name({p.stage: p for p in plan_experiment(load_experiment(RECIPE), MODELS_DIR)}["ce"])[
        "llm"
    ]
    assert llm.activation_bytes > frozen.activation_bytes
