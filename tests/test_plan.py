"""`speechllm plan`: meta-device parameter counts of the paper-scale models, memory arithmetic, FLOP
formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from speechllm.cli import main
from speechllm.data.bucketing import DurationBucketSampler
from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor
from speechllm.plan.planner import (
    PlanError,
    Workload,
    adaptor_flops,
    format_estimate,
    gpu_for_device,
    llm_part,
    load_arch_config,
    load_experiment,
    meta_model,
    num_params,
    plan_experiment,
    speech_encoder_flops,
    workload_for,
)

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "config" / "models"
BLOOMZMMS = REPO / "config" / "experiments" / "bloomzmms.yaml"
SUMMARIZATION = REPO / "config" / "experiments" / "speech_summarization.yaml"


def parts_by_name(plan) -> dict:
    return {p.name: p for p in plan.parts}


@pytest.fixture(scope="module")
def bloomzmms_plans():
    return {p.stage: p for p in plan_experiment(load_experiment(BLOOMZMMS), MODELS_DIR)}


@pytest.fixture(scope="module")
def summarization_plans():
    return {p.stage: p for p in plan_experiment(load_experiment(SUMMARIZATION), MODELS_DIR)}


# --------------------------------------------------------------------------- parameters (meta device)


def test_bloomzmms_parameter_counts(bloomzmms_plans) -> None:
    ctc, ce = parts_by_name(bloomzmms_plans["ctc"]), parts_by_name(bloomzmms_plans["ce"])
    # Reference figures (spec bloomzmms.md §2.1 and model-configs.md), within 1 %.
    assert ctc["adaptor"].trainable_params == pytest.approx(536e6, rel=0.01)
    assert ctc["speech_encoder"].frozen_params == pytest.approx(965e6, rel=0.01)
    assert ce["llm"].frozen_params == pytest.approx(7.07e9, rel=0.01)
    # Exact meta-device builds.
    assert ctc["adaptor"].trainable_params == 535_975_052
    assert ctc["speech_encoder"].frozen_params == 962_497_408  # MMS-1B-all without its language adapters
    assert ce["llm"].frozen_params == 7_069_016_064
    assert ctc["ctc_head"].frozen_params == 250_680 * 4096 == 1_026_785_280
    assert ctc["featurizer+preencoder"].trainable_params == 49 + 1280 * 128 + 128
    for part in ctc.values():
        assert part.role == ("trainable" if part.name in ("adaptor", "featurizer+preencoder") else "frozen")


def test_mms_language_adapters_and_frame_count_follow_the_config() -> None:
    """models.speech_encoder.language_adapters adds HF's 48 English adapters (the hub config's
    adapter_attn_dim 16); frame_count s3prl feeds the adaptor ceil(L / 320) frames."""
    cfg = load_experiment(BLOOMZMMS)
    assert cfg["models"]["speech_encoder"]["language_adapters"] is False
    cfg["models"]["speech_encoder"].update(language_adapters=True, frame_count="s3prl")
    ctc = {p.stage: p for p in plan_experiment(cfg, MODELS_DIR)}["ctc"]
    adapter = 2 * 1280 + (1280 * 16 + 16) + (16 * 1280 + 1280)  # LayerNorm, linear_1, linear_2
    assert parts_by_name(ctc)["speech_encoder"].frozen_params == 962_497_408 + 48 * adapter == 964_648_576
    samples = ctc.workload.samples
    conv_frames = (samples - 400) // 320 + 1
    assert ctc.workload.encoder_frames == (samples - 1) // 320 + 1 == conv_frames + 1


def test_summarization_parameter_counts(summarization_plans) -> None:
    parts = parts_by_name(summarization_plans["kd"])
    assert (
        parts["speech_encoder"].trainable_params == 315_438_720 and parts["speech_encoder"].frozen_params == 0
    )
    assert parts["pool+projection"].trainable_params == 1024 * 3072 + 3072
    assert parts["llm"].frozen_params == 3_020_442_624 and parts["llm"].trainable_params == 0


def test_architecture_files_are_the_spec_configs() -> None:
    config, facts = load_arch_config("bigscience/bloomz-7b1", MODELS_DIR)
    assert facts == {"name_or_path": "bigscience/bloomz-7b1", "tokenizer_vocab_size": 250680}
    assert (config.hidden_size, config.n_layer, config.vocab_size) == (4096, 30, 250880)
    config, _ = load_arch_config("GeneZC/MiniChat-2-3B", MODELS_DIR)
    assert (config.hidden_size, config.intermediate_size, config.tie_word_embeddings) == (3072, 8192, False)
    hubert = meta_model(load_arch_config("facebook/hubert-large-ls960-ft", MODELS_DIR)[0], causal_lm=False)
    assert all(p.is_meta for p in hubert.encoder.parameters())
    assert num_params(hubert.feature_extractor) == 4_210_176
    with pytest.raises(PlanError, match="no architecture config for 'org/unknown'"):
        load_arch_config("org/unknown", MODELS_DIR)


# --------------------------------------------------------------------------- memory


def test_memory_arithmetic(bloomzmms_plans, summarization_plans) -> None:
    ce = parts_by_name(bloomzmms_plans["ce"])
    adaptor = ce["adaptor"]
    assert adaptor.weight_bytes == 4 * adaptor.trainable_params  # fp32 master weights
    assert adaptor.grad_bytes == 4 * adaptor.trainable_params
    assert adaptor.optimizer_bytes == 8 * adaptor.trainable_params  # Adam: two fp32 moments
    assert ce["llm"].weight_bytes == 2 * ce["llm"].frozen_params  # bf16, the paper-scale default
    assert ce["llm"].grad_bytes == ce["llm"].optimizer_bytes == 0
    assert ce["speech_encoder"].activation_bytes == 0  # frozen and before every trainable parameter
    totals = bloomzmms_plans["ce"].totals()
    assert totals["memory_bytes"] == pytest.approx(sum(p.memory_bytes for p in bloomzmms_plans["ce"].parts))
    kd = parts_by_name(summarization_plans["kd"])
    assert kd["llm"].weight_bytes == 2 * 3_020_442_624


def test_paper_scale_llm_defaults_are_bf16_without_8bit() -> None:
    for path in (BLOOMZMMS, SUMMARIZATION):
        llm = yaml.safe_load(path.read_text())["models"]["llm"]
        assert llm["dtype"] == "bfloat16" and llm["load_in_8bit"] is False, path


def test_8bit_and_checkpointing_change_the_llm_plan() -> None:
    cfg = load_experiment(BLOOMZMMS)
    lm = meta_model(load_arch_config("bigscience/bloomz-7b1", MODELS_DIR)[0], causal_lm=True)
    workload = Workload(
        utterances=2,
        utterance_seconds=10,
        samples=160000,
        encoder_frames=499,
        speech_embeddings=62,
        llm_tokens=120,
        label_positions=50,
    )
    llm_cfg = dict(cfg["models"]["llm"])
    base = llm_part(lm, workload, dict(llm_cfg, gradient_checkpointing=False), 2, losses=1)
    ckpt = llm_part(lm, workload, dict(llm_cfg, gradient_checkpointing=True), 2, losses=1)
    int8 = llm_part(lm, workload, dict(llm_cfg, load_in_8bit=True), 2, losses=1)
    assert ckpt.activation_bytes < base.activation_bytes
    assert ckpt.backward_flops > base.backward_flops  # one more forward of the decoder layers
    assert int8.weight_bytes == base.weight_bytes / 2 == lm.num_parameters()


def sampler_shares(cfg: dict, stage: str) -> list[int]:
    """Each GPU's largest batch from the training sampler when every utterance lasts
    plan.utterance_seconds."""
    stage_cfg, plan_cfg = cfg["train"][stage], cfg["plan"]
    gpus = plan_cfg["gpus"].get(stage, 1)
    durations = [plan_cfg["utterance_seconds"]] * (
        100 * stage_cfg["num_buckets"]
    )  # buckets of several batches
    samplers = [
        DurationBucketSampler(
            durations,
            stage_cfg["batch_seconds"],
            stage_cfg["num_buckets"],
            seed=0,
            num_replicas=gpus,
            rank=rank,
            max_batch_size=stage_cfg.get("max_batch_size"),
            batch_budget=stage_cfg.get("batch_budget", "global"),
        )
        for rank in range(gpus)
    ]
    return [max(len(batch) for batch in sampler) for sampler in samplers]


def test_plan_per_gpu_batch_is_the_samplers(bloomzmms_plans, summarization_plans) -> None:
    """The memory plan sizes the batch the training loop really gets: the paper's budgets over 2 / 4 GPUs."""
    for cfg, plans in (
        (load_experiment(BLOOMZMMS), bloomzmms_plans),
        (load_experiment(SUMMARIZATION), summarization_plans),
    ):
        for stage, plan in plans.items():
            shares = sampler_shares(cfg, stage)
            assert plan.workload.utterances == max(shares), stage
            assert plan.workload.step_utterances == sum(shares), stage
    ctc, ce = bloomzmms_plans["ctc"], bloomzmms_plans["ce"]
    # 437.5 s for both GPUs: 36 utterances of 12 s, 18 each (ESPnet's batch_bins is the whole mini-batch's).
    assert (ctc.gpus, ctc.workload.utterances, ctc.workload.step_utterances) == (2, 18, 36)
    # 37.5 s holds 3, but each of the 4 GPUs needs one.
    assert (ce.gpus, ce.workload.utterances, ce.workload.step_utterances) == (4, 1, 4)
    totals = ctc.totals()
    assert totals["flops_per_optimizer_step"] == pytest.approx(totals["flops_per_micro_batch"] * 2 * 1)


@pytest.mark.parametrize(
    ("train", "gpus", "expected"),
    [
        ({"batch_seconds": 450.0}, 2, 19),  # 37 utterances: 19 + 18
        ({"batch_budget": "per_rank"}, 2, 36),  # every GPU the full 437.5 s
        ({"max_batch_size": 8}, 3, 3),  # the cap holds for the whole micro-batch: 3 + 3 + 2
    ],
)
def test_plan_batch_geometry_follows_the_sampler(train: dict, gpus: int, expected: int) -> None:
    cfg = load_experiment(BLOOMZMMS)
    cfg["train"]["ctc"].update(train)
    cfg["plan"]["gpus"]["ctc"] = gpus
    workload, _ = workload_for(cfg, "ctc", lambda n: (0, 0), 0, teacher=False)
    assert workload.utterances == max(sampler_shares(cfg, "ctc")) == expected


def test_plan_refuses_a_cap_below_the_gpus() -> None:
    cfg = load_experiment(SUMMARIZATION)
    cfg["plan"]["gpus"]["kd"] = 2
    with pytest.raises(PlanError, match=r"'train.kd'.*max_batch_size \(1\) is smaller than the 2 processes"):
        workload_for(cfg, "kd", lambda n: (0, 0), 0, teacher=False)


def test_config_errors_name_the_key(tmp_path) -> None:
    cfg = load_experiment(BLOOMZMMS)
    with pytest.raises(PlanError, match="'system'"):
        plan_experiment(dict(cfg, system="whisper"), MODELS_DIR)
    with pytest.raises(PlanError, match="'plan'"):
        plan_experiment({k: v for k, v in cfg.items() if k != "plan"}, MODELS_DIR)
    with pytest.raises(PlanError, match="'models.pooling' is missing"):
        plan_experiment(dict(cfg, system="kang_roy"), MODELS_DIR)
    broken = tmp_path / "broken.yaml"
    broken.write_text("plan: [\n", encoding="utf-8")
    with pytest.raises(PlanError, match=f"{broken}:2: not valid YAML"):
        load_experiment([BLOOMZMMS, broken])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("plan:\n  utterance_seconds: abc\n", "plan.utterance_seconds"),
        ("train:\n  ctc: {accum_grad: null}\n", "train.ctc.accum_grad"),
    ],
)
def test_plan_cli_names_the_key_of_a_wrong_value(tmp_path, override: str, key: str) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(override, encoding="utf-8")
    with pytest.raises(SystemExit, match=f"config key '{key}': "):
        main(["plan", "--config", str(BLOOMZMMS), str(wrong)])


def test_plan_cli_json_and_table(capsys) -> None:
    main(["plan", "--config", str(SUMMARIZATION), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert [d["stage"] for d in data] == ["kd"]
    assert {p["name"] for p in data[0]["parts"]} == {"speech_encoder", "pool+projection", "llm"}
    assert data[0]["totals"]["trainable_params"] == 315_438_720 + 3_148_800
    main(["plan", "--config", str(BLOOMZMMS)])
    out = capsys.readouterr().out
    assert (
        "## bloomzmms / ctc" in out
        and "## bloomzmms / ce" in out
        and "| adaptor | trainable | 535,975,052 |" in out
    )
    with pytest.raises(SystemExit, match="config file not found"):
        main(["plan", "--config", "missing.yaml"])


# --------------------------------------------------------------------------- FLOP formulas vs torch's counter


def counted(fn) -> tuple[float, float, float]:
    """FLOPs counted by torch.utils.flop_counter: (forward, backward matmuls, forward convolutions).

    Backward convolutions are left out: the counter counts a strided convolution's input gradient at the input
    resolution, the plan at its multiply-adds (2x the forward convolutions in all).
    """
    with FlopCounterMode(display=False) as forward:
        loss = fn()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    conv_forward = float(forward.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0))
    backward_counts = backward.get_flop_counts()["Global"]
    matmuls = float(sum(v for op, v in backward_counts.items() if op != torch.ops.aten.convolution_backward))
    return float(forward.get_total_flops()), matmuls, conv_forward


def test_adaptor_flops_match_the_counter() -> None:
    torch.manual_seed(0)
    config = AdaptorConfig(
        input_dim=20,
        d_model=32,
        heads=2,
        linear_units=64,
        cgmlp_units=64,
        cgmlp_kernel=5,
        merge_kernel=3,
        num_blocks=3,
        interctc_layer=2,
        num_lid_classes=7,
        llm_hidden_size=48,
    )
    adaptor = SpeechAdaptor(config).eval()
    batch, frames = 3, 101
    feats = torch.randn(batch, frames, config.input_dim, requires_grad=True)
    fwd, bwd_matmuls, conv = counted(lambda: adaptor(feats, torch.full((batch,), frames)).speech.sum())
    assert adaptor_flops(adaptor, batch, frames) == pytest.approx(fwd, rel=0.01)
    # Trainable: 2x forward. The relative positions need no input gradient, hence the slack.
    assert 2 * (adaptor_flops(adaptor, batch, frames) - conv) == pytest.approx(bwd_matmuls, rel=0.03)


@pytest.mark.parametrize("model_class", [Wav2Vec2Model, HubertModel])
def test_speech_encoder_flops_match_the_counter(model_class) -> None:
    config_class = Wav2Vec2Config if model_class is Wav2Vec2Model else HubertConfig
    config = config_class(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        apply_spec_augment=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    encoder = model_class(config).eval()
    batch, samples = 2, 8000
    wav = torch.randn(batch, samples)
    fwd, bwd_matmuls, conv = counted(lambda: encoder(wav).last_hidden_state.sum())
    expected, frames, _ = speech_encoder_flops(encoder, batch, samples)
    assert frames == encoder._get_feat_extract_output_lengths(samples)
    assert expected == pytest.approx(fwd, rel=0.01)
    assert 2 * (expected - conv) == pytest.approx(bwd_matmuls, rel=0.01)  # trainable: 2x forward


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_llm_flops_match_the_counter(family: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    if family == "llama":
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=80,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                tie_word_embeddings=False,
                attn_implementation="eager",
            )
        )
    else:
        lm = BloomForCausalLM(
            BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4, attn_implementation="eager")
        )
    lm.requires_grad_(False)
    if checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        lm.train()  # HF checkpoints only in training mode (dropout is 0 in these configs)
    else:
        lm.eval()
    batch, tokens, labels = 2, 40, 9
    embeds = torch.randn(batch, tokens, 32, requires_grad=True)
    fwd, bwd, _ = counted(
        lambda: lm(inputs_embeds=embeds, logits_to_keep=labels, use_cache=False).logits.sum()
    )
    workload = Workload(
        utterances=batch,
        utterance_seconds=1.0,
        samples=0,
        encoder_frames=0,
        speech_embeddings=0,
        llm_tokens=tokens,
        label_positions=labels,
    )
    plan = llm_part(lm, workload, {"dtype": "float32", "gradient_checkpointing": checkpointing}, 4, losses=1)
    assert plan.forward_flops == pytest.approx(fwd, rel=0.01)
    assert plan.backward_flops == pytest.approx(bwd, rel=0.01)
    assert embeds.grad is not None


# --------------------------------------------------------------------------- time at a stated MFU


def test_predicted_times_follow_flops_mfu_and_peaks(bloomzmms_plans) -> None:
    cfg = load_experiment(BLOOMZMMS)
    peaks, mfu = cfg["plan"]["gpu_peak_tflops"]["A6000"], cfg["plan"]["mfu"]
    ctc, ce = bloomzmms_plans["ctc"], bloomzmms_plans["ce"]
    # CTC: every part at the stage's TF32 matmuls.
    step = ctc.totals()["flops_per_micro_batch"] / (mfu * peaks["tf32"] * 1e12)
    e = ctc.estimate
    assert (e.gpu, e.mfu) == ("A6000", mfu) and e.micro_batch_seconds == pytest.approx(step)
    assert e.epoch_micro_batches == 23364 and e.epoch_hours == pytest.approx(23364 * step / 3600)
    assert e.epoch_gpu_hours == pytest.approx(2 * e.epoch_hours)
    assert e.run_micro_batches == 70 * 23364 and e.run_gpu_hours == pytest.approx(70 * e.epoch_gpu_hours)
    # The reference's own statement, and the MFU these FLOPs would have had in 13 h per epoch.
    assert e.reference["gpu_hours_per_epoch"] == 26 and "train_asr_e_branchformer" in e.reference["source"]
    assert e.reference["implied_mfu"] == pytest.approx(step * mfu / (13 * 3600 / 23364))
    # CE: BLOOMZ in bfloat16 runs bf16 matmuls, the rest TF32; two micro-batches per optimizer step.
    llm = parts_by_name(ce)["llm"]
    rest = ce.totals()["flops_per_micro_batch"] - llm.forward_flops - llm.backward_flops
    step = (llm.forward_flops + llm.backward_flops) / (mfu * peaks["bf16"] * 1e12) + rest / (
        mfu * peaks["tf32"] * 1e12
    )
    assert ce.estimate.micro_batch_seconds == pytest.approx(step)
    assert ce.estimate.optimizer_step_seconds == pytest.approx(2 * step)
    assert ce.estimate.epoch_gpu_hours == pytest.approx(4 * 54381 * step / 3600)
    assert ce.estimate.reference["gpu_hours_per_epoch"] == 48


def test_predicted_times_config_switches(bloomzmms_plans, summarization_plans) -> None:
    kd = summarization_plans["kd"].estimate  # max_steps sets the run; an epoch is one data pass (not fixed)
    assert kd.epoch_micro_batches is None and kd.epoch_gpu_hours is None and kd.reference is None
    assert kd.run_micro_batches == 175776 * 16
    cfg = load_experiment(BLOOMZMMS)
    peaks, mfu = cfg["plan"]["gpu_peak_tflops"], cfg["plan"]["mfu"]
    cfg["plan"].update(gpu="H100", mfu=0.5)
    faster = {p.stage: p.estimate for p in plan_experiment(cfg, MODELS_DIR)}["ctc"]
    assert "implied_mfu" not in faster.reference  # another GPU type: the statement is shown, not compared
    fewer = load_experiment(BLOOMZMMS)
    fewer["plan"]["gpus"]["ctc"] = 1  # the reference's 13 h were on 2 GPUs: one GPU's step time is not theirs
    alone = {p.stage: p.estimate for p in plan_experiment(fewer, MODELS_DIR)}["ctc"]
    assert alone.reference["gpus"] == 2 and "implied_mfu" not in alone.reference
    assert "(not 1 x A6000: not comparable)" in "\n".join(format_estimate(alone, 1))
    speedup = (0.5 * peaks["H100"]["tf32"]) / (mfu * peaks["A6000"]["tf32"])
    assert bloomzmms_plans["ctc"].estimate.micro_batch_seconds / faster.micro_batch_seconds == pytest.approx(
        speedup
    )
    cfg["plan"]["gpu"] = "B200"
    with pytest.raises(PlanError, match=r"'plan.gpu_peak_tflops': no entry for GPU 'B200'"):
        plan_experiment(cfg, MODELS_DIR)
    cfg["plan"].pop("gpu")
    assert all(p.estimate is None for p in plan_experiment(cfg, MODELS_DIR))


def test_plan_cli_prints_estimates_beside_the_reference(capsys) -> None:
    main(["plan", "--config", str(BLOOMZMMS)])
    out = capsys.readouterr().out
    assert out.count("predicted at MFU 0.35 on A6000") == 2
    assert "reference: 13 h per epoch on 2 x A6000 = 26 GPU-h" in out
    assert "reference: 12 h per epoch on 4 x A6000 = 48 GPU-h" in out
    main(["plan", "--config", str(BLOOMZMMS), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert [d["estimate"]["reference"]["hours_per_epoch"] for d in data] == [13, 12]
    assert all(d["estimate"]["epoch_gpu_hours"] > 0 for d in data)


@pytest.mark.parametrize("path", [BLOOMZMMS, SUMMARIZATION, REPO / "config" / "config.yaml"])
def test_plan_section_validates_against_the_schema(path: Path) -> None:
    import jsonschema

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    cfg = load_experiment(path)
    jsonschema.Draft202012Validator(schema).validate(cfg)
    bad = dict(cfg, plan=dict(cfg["plan"], gpu_peak_tflops={"A6000": {"bf16": 1.0}}))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(bad)


@pytest.mark.parametrize(
    ("device_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA RTX A6000", "A6000"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("Tesla T4", None),
    ],
)
def test_gpu_peaks_are_found_by_cuda_device_name(device_name: str, key: str | None) -> None:
    assert gpu_for_device(load_experiment(BLOOMZMMS)["plan"], device_name) == key
