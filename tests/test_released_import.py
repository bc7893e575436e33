"""`speechllm import espnet` / `import kang-roy`: tiny checkpoints in the released layouts, built with the
reference's libraries (tests/released_layout.py), import into model directories that reproduce the oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from released_layout import (
    build_reference,
    hf_speech_encoder_config,
    int8_decoder_entries,
    training_config,
    write_repo,
)
from test_kang_roy import tiny_hubert_config

from speechllm.cli import main as cli_main
from speechllm.models.espnet_import import (
    CheckpointImportError,
    ImportOptions,
    import_espnet,
    import_kang_roy,
)
from speechllm.models.export import load_model_dir, read_raw_spec

REPO = Path(__file__).resolve().parents[1]
SAMPLES = 12_037  # not a multiple of the 320-sample hop: s3prl repeats the last frame


def token_list(llm_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    return tok.convert_ids_to_tokens(list(range(len(tok))))


@pytest.fixture(scope="module")
def released(tiny_models, tmp_path_factory):
    """A tiny CTC-stage reference model, its released-layout repository and the HF config of its upstream."""
    root = tmp_path_factory.mktemp("released")
    tokens = token_list(tiny_models["llm"])
    reference = build_reference(root, llm_hidden=32, vocab=len(tokens))
    state = dict(reference.state_dict())
    config = training_config("ctc", str(tiny_models["llm"]), tokens)
    repo = write_repo(root / "bloomzmms-ctc", "ctc", state, config)
    return {
        "reference": reference,
        "repo": repo,
        "state": state,
        "config": config,
        "root": root,
        "speech_encoder": hf_speech_encoder_config(root / "mms_config"),
        "llm": tiny_models["llm"],
    }


def options(released, **kw) -> ImportOptions:
    return ImportOptions(speech_encoder=str(released["speech_encoder"]), llm_dtype="float32", **kw)


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "released_ctc"
    import_espnet(released["repo"], out, options(released))
    return out


def test_import_writes_a_model_directory(imported, released):
    spec = read_raw_spec(imported)
    assert spec["kind"] == "bloomzmms" and spec["stage"] == "ctc"
    assert spec["speech_encoder"]["bundled"] == "speech_encoder"
    assert (
        spec["speech_encoder"]["frame_count"] == "s3prl"
        and spec["speech_encoder"]["language_adapters"] is False
    )
    assert spec["ctc_head"] == {"blank_id": 0, "weights": "ctc_head.safetensors"}
    assert spec["adaptor"]["num_lid_classes"] == 140 and spec["adaptor"]["interctc_layer"] == 1
    assert spec["imported_from"]["dropped"]["wav2vec2 pretraining heads"] == 7
    assert (imported / "speech_encoder" / "config.json").is_file()
    assert json.loads((imported / "speech_encoder" / "config.json").read_text())["adapter_attn_dim"] is None


def test_imported_model_reproduces_the_reference_forward(imported, released):
    model, _, _ = load_model_dir(imported, with_ctc=True, with_llm=False)
    model.eval()
    wav = torch.randn(1, SAMPLES, generator=torch.Generator().manual_seed(3)) * 0.1
    expected = released["reference"](wav)
    lengths = torch.tensor([SAMPLES])
    with torch.no_grad():
        hidden = model.frontend.encode_hidden_states(wav, lengths)  # the conv frames, before s3prl's repeat
        torch.testing.assert_close(
            hidden, expected["hidden_states"][:, :, : hidden.shape[2]], atol=1e-5, rtol=1e-5
        )
        feats, feat_lengths = model.frontend(wav, lengths)
        assert feats.shape[1] == expected["preencoder"].shape[1] > hidden.shape[2]
        torch.testing.assert_close(feats, expected["preencoder"], atol=1e-5, rtol=1e-5)
        out = model.encode(wav, lengths)
        torch.testing.assert_close(out.speech, expected["speech"], atol=1e-5, rtol=1e-5)
        log_probs = model.ctc_head(out.speech).log_softmax(-1)
        torch.testing.assert_close(log_probs, expected["ctc_log_probs"], atol=1e-5, rtol=1e-5)


def test_ctc_head_comes_from_the_checkpoint(imported, released):
    model, _, _ = load_model_dir(imported, with_ctc=True, with_llm=False)
    assert torch.equal(model.ctc_head.ctc_lo.weight, released["state"]["ctc.ctc_lo.weight"])
    upstream = "frontend.upstream.upstream.model.encoder.layers.1.fc1.weight"
    assert torch.equal(
        model.frontend.encoder.encoder.layers[1].feed_forward.intermediate_dense.weight,
        released["state"][upstream],
    )
    # without the CTC head (LLM decoding) the directory loads as well
    load_model_dir(imported, with_ctc=False, with_llm=False)


def reimport(released, tmp_path, state=None, config=None, name="repo"):
    repo = write_repo(
        tmp_path / name,
        "ctc",
        state if state is not None else released["state"],
        config if config is not None else released["config"],
    )
    return import_espnet(repo, tmp_path / f"{name}_out", options(released))


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("encoder.after_norm.weight"), "encoder.after_norm.weight"),
        (
            lambda s: s.pop("frontend.upstream.upstream.model.encoder.layers.0.fc2.bias"),
            "encoder.layers.0.feed_forward.output_dense.bias",
        ),
        (
            lambda s: s.update({"encoder.encoders.0.extra.weight": torch.zeros(2)}),
            "encoder.encoders.0.extra.weight",
        ),
        (
            lambda s: s.update({"preencoder.linear.weight": s.pop("preencoder.linear_out.weight")}),
            "preencoder.linear.weight",
        ),
        (
            lambda s: s.update(
                {
                    "frontend.upstream.upstream.model.encoder.layers.0.self_attn.qq_proj.weight": s.pop(
                        "frontend.upstream.upstream.model.encoder.layers.0.self_attn.q_proj.weight"
                    )
                }
            ),
            "self_attn.qq_proj.weight",
        ),
        (lambda s: s.update({"encoder.after_norm.weight": torch.zeros(7)}), "encoder.after_norm.weight"),
        (lambda s: s.pop("ctc.ctc_lo.weight"), "ctc.ctc_lo.weight"),
    ],
)
def test_a_missing_extra_or_misnamed_key_is_named(released, tmp_path, change, named):
    state = dict(released["state"])
    change(state)
    with pytest.raises(CheckpointImportError, match=named.replace(".", r"\.")):
        reimport(released, tmp_path, state=state)
    assert not (tmp_path / "repo_out").exists()


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("encoder_conf", "rel_pos_type", "legacy"),
        ("encoder_conf", "qk_norm", True),
        ("encoder_conf", "interctc_layer_idx", [1, 2]),
        ("postencoder_conf", "length_adaptor_n_layers", 2),
        ("frontend_conf", "multilayer_feature", False),
        ("ctc_conf", "bias", True),
        ("model_conf", "ctc_weight", 0.3),
        ("model_conf", "lang_token_id", 5),
        ("model_conf", "aux_ctc", {"1": "text"}),
        ("postencoder_conf", "output_size", 0),
    ],
)
def test_an_unsupported_config_key_or_value_is_named(released, tmp_path, section, key, value):
    config = json.loads(json.dumps(released["config"]))
    config[section][key] = value
    with pytest.raises(CheckpointImportError, match=f"{section}.{key}|{section} key.*{key}"):
        reimport(released, tmp_path, config=config)


def test_ce_file_with_int8_decoder_and_str_values_imports(released, tmp_path):
    state = {k: v for k, v in released["state"].items() if not k.startswith("ctc.")}
    state.update(int8_decoder_entries())
    config = training_config("ce", str(released["llm"]), released["config"]["token_list"])
    repo = write_repo(tmp_path / "bloomzmms-ce-t", "ce", state, config)
    spec = import_espnet(repo, tmp_path / "released_t", options(released))
    assert spec["stage"] == "ce" and spec["prompt"] == {"prefix": "Repeat the sentence: ", "postfix": ". "}
    assert spec["imported_from"]["dropped"]["decoder (int8 BLOOMZ)"] == 7
    assert (
        "weights" not in spec["ctc_head"] and not (tmp_path / "released_t" / "ctc_head.safetensors").exists()
    )
    model, _, _ = load_model_dir(tmp_path / "released_t", with_ctc=False, with_llm=True)
    model.eval()
    wav = torch.randn(1, SAMPLES, generator=torch.Generator().manual_seed(4)) * 0.1
    with torch.no_grad():
        speech = model.encode(wav, torch.tensor([SAMPLES])).speech
    torch.testing.assert_close(speech, released["reference"](wav)["speech"], atol=1e-5, rtol=1e-5)


def test_cli_import_then_transcribe_a_real_clip(released, tmp_path, shared_data):
    clips = sorted((shared_data / "speech").rglob("*.wav")) + sorted((shared_data / "speech").rglob("*.flac"))
    if not clips:
        pytest.skip(f"no speech clips under {shared_data / 'speech'}")
    out = tmp_path / "released_ctc"
    cli_main(
        [
            "import",
            "espnet",
            "--repo",
            str(released["repo"]),
            "--out-dir",
            str(out),
            "--speech-encoder",
            str(released["speech_encoder"]),
            "--llm-dtype",
            "float32",
        ]
    )
    res = subprocess.run(
        [sys.executable, "-m", "speechllm.cli", "transcribe", "--model", str(out), str(clips[0])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\t")[0] == str(clips[0])


def test_cli_names_a_config_error_in_one_line(released, tmp_path):
    config = json.loads(json.dumps(released["config"]))
    config["encoder"] = "conformer"
    repo = write_repo(tmp_path / "repo", "ctc", released["state"], config)
    with pytest.raises(
        SystemExit, match="speechllm import espnet: error: .*config.yaml: unsupported encoder"
    ):
        cli_main(
            [
                "import",
                "espnet",
                "--repo",
                str(repo),
                "--out-dir",
                str(tmp_path / "out"),
                "--speech-encoder",
                str(released["speech_encoder"]),
            ]
        )


def test_meta_yaml_naming_a_missing_file_is_named(released, tmp_path):
    repo = write_repo(tmp_path / "repo", "ctc", released["state"], released["config"])
    meta = yaml.safe_load((repo / "meta.yaml").read_text())
    meta["files"]["asr_model_file"] = "exp/none.pth"
    (repo / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointImportError, match=r"meta\.yaml: files\.asr_model_file names exp/none\.pth"):
        import_espnet(repo, tmp_path / "out", options(released))


# ------------------------------------------------------------------------------------------------ Kang & Roy


@pytest.fixture(scope="module")
def hubert_encoder(tiny_models, tmp_path_factory):
    """A tiny HuBERT (HF, layer-norm extractor as hubert-large) + pooling + projection with random weights."""
    from transformers import HubertModel

    from speechllm.models.hubert_pool import HubertPoolEncoder

    root = tmp_path_factory.mktemp("hubert")
    torch.manual_seed(0)
    config = tiny_hubert_config()
    HubertModel(config).save_pretrained(root / "hubert")
    encoder = HubertPoolEncoder(HubertModel(config), 32).eval()  # other weights than the saved model's
    models_cfg = {
        "speech_encoder": {
            "name_or_path": str(root / "hubert"),
            "revision": "main",
            "normalize_waveform": False,
        },
        "llm": {
            "name_or_path": str(tiny_models["llm"]),
            "revision": "main",
            "dtype": "float32",
            "load_in_8bit": False,
        },
        "pooling": {"kernel_size": 8, "stride": 4},
        "chat": {"prefix": "[|User|]", "suffix": "</s>[|Assistant|]"},
        "prompt": {"prefix": "", "postfix": ""},
    }
    return encoder, models_cfg


def old_weight_norm_names(state: dict) -> dict:
    return {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }


@pytest.mark.parametrize("layout", ["flat", "wrapped", "old_weight_norm"])
def test_kang_roy_import_reproduces_the_encoder(hubert_encoder, tmp_path, layout):
    encoder, models_cfg = hubert_encoder
    state = dict(encoder.state_dict())
    if layout == "wrapped":
        state = {"audio_encoder": state, "epoch": 3, "step": 100}
    elif layout == "old_weight_norm":
        state = old_weight_norm_names(state)
        assert any(k.endswith("weight_g") for k in state)
    torch.save(state, tmp_path / "audio_encoder.pt")
    import_kang_roy(tmp_path / "audio_encoder.pt", tmp_path / "released_kang_roy", models_cfg)
    model, _, spec = load_model_dir(tmp_path / "released_kang_roy", with_ctc=False, with_llm=False)
    assert spec["kind"] == "kang_roy"
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(5)) * 0.1
    lengths = torch.tensor([8000, 6000])
    model.eval()
    with torch.no_grad():
        expected, expected_lengths = encoder(wav, lengths)
        got = model.encode(wav, lengths)
    for i, n in enumerate(expected_lengths.tolist()):
        torch.testing.assert_close(got[i], expected[i, :n], atol=1e-5, rtol=1e-5)


def test_kang_roy_names_a_missing_key(hubert_encoder, tmp_path):
    encoder, models_cfg = hubert_encoder
    state = dict(encoder.state_dict())
    state.pop("embed_projection.bias")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointImportError, match=r"embed_projection\.bias"):
        import_kang_roy(tmp_path / "bad.pt", tmp_path / "out", models_cfg)


def test_compare_with_sources_reports_equality(released, imported, tmp_path):
    from transformers import AutoModelForCausalLM

    state = dict(released["state"])
    embeddings = AutoModelForCausalLM.from_pretrained(released["llm"]).get_input_embeddings().weight.detach()
    state["ctc.ctc_lo.weight"] = embeddings[: state["ctc.ctc_lo.weight"].shape[0]].clone()
    repo = write_repo(tmp_path / "repo", "ctc", state, released["config"])
    # the upstream as a hub model would hold it: the bundled copy of an earlier import
    same = ImportOptions(speech_encoder=str(imported / "speech_encoder"), compare_with_sources=True)
    checks = import_espnet(repo, tmp_path / "same", same)["imported_from"]["equal_to_sources"]
    assert checks == {
        f"speech_encoder == {imported / 'speech_encoder'}": True,
        "speech_encoder tensors differing": 0,
        f"ctc_head == {released['llm']} input embeddings[:{embeddings.shape[0] - 8}]": True,
    }
    other = ImportOptions(speech_encoder=str(imported / "speech_encoder"), compare_with_sources=True)
    state["ctc.ctc_lo.weight"] = state["ctc.ctc_lo.weight"] + 1.0
    state["frontend.upstream.upstream.model.encoder.layer_norm.bias"] += 1.0
    repo = write_repo(tmp_path / "repo2", "ctc", state, released["config"])
    checks = import_espnet(repo, tmp_path / "other", other)["imported_from"]["equal_to_sources"]
    assert list(checks.values()) == [False, 1, False]


def test_packaged_imported_model_keeps_its_parts(imported, tmp_path):
    from speechllm.publish import CardFacts, package_model

    spec = read_raw_spec(imported)
    facts = CardFacts(
        "someone/released-ctc", "released_ctc", spec, bundled={"speech_encoder": "facebook/mms-1b-all"}
    )
    out = package_model(imported, tmp_path / "hub", facts)
    assert (out / "ctc_head.safetensors").is_file() and (out / "speech_encoder" / "config.json").is_file()
    model, _, _ = load_model_dir(out, with_ctc=True, with_llm=False)
    original, _, _ = load_model_dir(imported, with_ctc=True, with_llm=False)
    assert torch.equal(model.ctc_head.ctc_lo.weight, original.ctc_head.ctc_lo.weight)


def test_ctc_decoding_of_an_imported_model_does_not_load_the_llm(imported, monkeypatch):
    import speechllm.models.export as export

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded")

    monkeypatch.setattr(export, "load_llm", no_llm)
    model, _, _ = load_model_dir(imported, with_ctc=True, with_llm=False)
    assert model.llm is None and model.ctc_head is not None


@pytest.fixture(scope="module")
def imported_ce(released, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported_ce")
    state = {k: v for k, v in released["state"].items() if not k.startswith("ctc.")}
    state.update(int8_decoder_entries())
    config = training_config("ce", str(released["llm"]), released["config"]["token_list"])
    repo = write_repo(root / "bloomzmms-ce-t", "ce", state, config)
    import_espnet(repo, root / "released_t", options(released))
    return root / "released_t"


@pytest.mark.parametrize("which, decoder", [("ctc", "ctc"), ("t", "llm"), ("ctc", "cascade")])
def test_cli_evaluate_scores_imported_models(imported, imported_ce, tmp_path, which, decoder):
    """What the workflow's evaluate jobs run on released_ctc / released_t (and the cascade baseline)."""
    import soundfile as sf
    from test_evaluate_benchmarks import SETTINGS, SR, _wav

    records = []
    for i, text in enumerate(["the cat sits on the mat", "hello world"]):
        path = _wav(tmp_path / f"{i}.wav", 0.6 + 0.2 * i, seed=i)
        records.append(
            {
                "id": f"en_us-{i}",
                "sentence_id": i,
                "language": "en_us",
                "audio": str(path),
                "num_samples": sf.info(str(path)).frames,
                "sampling_rate": SR,
                "raw_transcription": text,
                "translation": text,
            }
        )
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    model = imported if which == "ctc" else imported_ce
    scores = tmp_path / "scores.json"
    cli_main(
        [
            "evaluate",
            "fleurs_asr",
            "--settings",
            json.dumps({"evaluate": SETTINGS, "sampling_rate": SR, "experiment": "test"}),
            "--model",
            str(model),
            "--name",
            f"released_{which}",
            "--decoder",
            decoder,
            "--manifests",
            str(manifest),
            "--hyps",
            str(tmp_path / "hyps.parquet"),
            "--scores",
            str(scores),
        ]
    )
    written = json.loads(scores.read_text())
    assert written["model"] == f"released_{which}" and written["decoder"] == decoder


def test_ask_an_imported_ce_model(imported_ce, tmp_path):
    import numpy as np

    import speechllm

    model = speechllm.load(str(imported_ce), device="cpu")
    samples = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    answers = model.ask([["Repeat the sentence: ", (samples, 16000), ". "]], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


# ------------------------------------------------------------------------------------------------ paper scale


def paper_scale_released_state(token_count: int) -> dict[str, torch.Tensor]:
    """The key layout of `bloomzmms-ctc/exp/.../10epoch.pth` on the meta device: s3prl's MMS-1B (a pretraining
    config, as the strict load of the converted file needs), ESPnet's paper E-Branchformer, the overlay's
    heads."""
    from released_layout import OverlayCtc, OverlayPostencoder, oracle_modules

    o = oracle_modules()
    with torch.device("meta"):
        upstream = o.Wav2Vec2Model(
            o.Wav2Vec2Config(
                extractor_mode="layer_norm",
                layer_norm_first=True,
                conv_bias=True,
                encoder_layers=48,
                encoder_embed_dim=1280,
                encoder_ffn_embed_dim=5120,
                encoder_attention_heads=16,
                conv_pos=128,
                conv_pos_groups=16,
                quantize_targets=True,
                latent_vars=320,
                latent_groups=2,
                final_dim=1024,
            )
        )
        conf = yaml.safe_load(PAPER_ENCODER_CONF)
        encoder = o.EBranchformerEncoder(input_size=128, **conf)
        encoder.conditioning_layer = torch.nn.Linear(140, 1024)
        heads = torch.nn.ModuleDict(
            {
                "lid_ctc": OverlayCtc(140, 1024, bias=True, length_adaptor_layers=1),
                "postencoder": OverlayPostencoder(1024, 4096),
                "ctc": OverlayCtc(token_count, 4096, bias=False, length_adaptor_layers=0),
            }
        )
        state = {f"frontend.upstream.upstream.model.{k}": v for k, v in upstream.state_dict().items()}
        state["frontend.featurizer.weights"] = torch.zeros(49)
        state.update(
            {f"preencoder.linear_out.{k}": v for k, v in torch.nn.Linear(1280, 128).state_dict().items()}
        )
        state.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
        state.update(heads.state_dict())
    return state


# encoder_conf of DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/egs2/fleurs/asr1/conf/tuning/
# train_asr_e_branchformer_mms1b-asr_bloomz7b_ctc.yaml
PAPER_ENCODER_CONF = """
output_size: 1024
attention_heads: 8
attention_layer_type: rel_selfattn
pos_enc_layer_type: rel_pos
rel_pos_type: latest
cgmlp_linear_units: 8192
cgmlp_conv_kernel: 31
use_linear_after_conv: false
gate_activation: identity
num_blocks: 17
dropout_rate: 0.1
positional_dropout_rate: 0.1
attention_dropout_rate: 0.1
input_layer: conv2d
layer_drop_rate: 0.1
linear_units: 2048
positionwise_layer_type: linear
macaron_ffn: true
use_ffn: true
merge_conv_kernel: 31
interctc_layer_idx: [3]
interctc_use_conditioning: true
"""


def test_paper_scale_layout_maps_onto_the_project_model(tmp_path):
    """Every tensor of the released CTC file's layout (1532, rebuilt on meta) is placed or dropped on purpose,
    and the project's paper-scale model (config/models/mms-1b-all.json without adapters, the paper adaptor)
    has exactly the mapped keys and shapes."""
    from transformers import AutoModel, Wav2Vec2Config

    from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor
    from speechllm.models.espnet_import import (
        check_ctc_head,
        check_exact_keys,
        espnet_architecture,
        map_espnet_state,
    )
    from speechllm.models.frontend import without_language_adapters

    tokens = [f"t{i}" for i in range(250_680)]
    state = paper_scale_released_state(len(tokens))
    assert len(state) == 1532
    config = training_config("ctc", "bigscience/bloomz-7b1", tokens)
    config["encoder_conf"] = yaml.safe_load(PAPER_ENCODER_CONF)
    config["model_conf"]["aux_ctc"] = {"3": "utt2lid_token"}
    config["preencoder_conf"] = {"input_size": 1280, "output_size": 128}
    config["postencoder_conf"]["output_size"] = 4096
    arch = espnet_architecture(config, tmp_path / "config.yaml")
    mapped = map_espnet_state(state, tmp_path / "10epoch.pth")
    assert mapped.dropped == {"decoder (int8 BLOOMZ)": 0, "wav2vec2 pretraining heads": 7}
    assert len(mapped.upstream) + len(mapped.speech) + len(mapped.ctc_head) == 1525
    adaptor_cfg = AdaptorConfig(**arch.adaptor, num_lid_classes=140)
    assert adaptor_cfg == AdaptorConfig()  # the paper's sizes are the project's defaults
    mms = without_language_adapters(
        Wav2Vec2Config.from_json_file(REPO / "config" / "models" / "mms-1b-all.json")
    )
    with torch.device("meta"):
        encoder = AutoModel.from_config(mms)
        adaptor = SpeechAdaptor(adaptor_cfg)
        proj = torch.nn.Linear(1280, 128)
    check_exact_keys(encoder.state_dict(), mapped.upstream, tmp_path, "speech encoder")
    speech = {
        "frontend.layer_weights": torch.zeros(49, device="meta"),
        **{f"frontend.proj.{k}": v for k, v in proj.state_dict().items()},
        **{f"adaptor.{k}": v for k, v in adaptor.state_dict().items()},
    }
    check_exact_keys(speech, mapped.speech, tmp_path, "speech adaptor")
    assert check_ctc_head(mapped.ctc_head, arch, adaptor_cfg, tmp_path)["ctc_lo.weight"].shape == (
        250_680,
        4096,
    )


def test_two_checkpoint_keys_for_one_parameter_are_an_error(tmp_path):
    """The old and the parametrized name of the weight-normed positional convolution both map to one
    parameter: a file holding both is refused, not imported with whichever came last."""
    from speechllm.models.espnet_import import CheckpointImportError, map_espnet_state

    prefix = "frontend.upstream.upstream.model.encoder.pos_conv.0."
    state = {
        prefix + "weight_g": torch.zeros(1),
        prefix + "parametrizations.weight.original0": torch.ones(1),
    }
    with pytest.raises(CheckpointImportError, match=r"weight_g and .*original0 both map to"):
        map_espnet_state(state, tmp_path / "10epoch.pth")


@pytest.mark.parametrize(
    "meta, config",
    [
        ("files: [\n", None),  # malformed meta.yaml
        ("- a list\n", None),
        ("yaml_files: [exp/config.yaml]\n", None),  # a section that is not a mapping
        (None, "encoder: [\n"),  # malformed training config
    ],
)
def test_malformed_meta_or_config_yaml_is_named(tmp_path, meta, config):
    from speechllm.models.espnet_import import read_espnet_repo

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "model.pth").write_bytes(b"")
    (tmp_path / "exp" / "config.yaml").write_text(config or "encoder: e_branchformer\n")
    (tmp_path / "meta.yaml").write_text(
        meta or "files: {asr_model_file: exp/model.pth}\nyaml_files: {asr_train_config: exp/config.yaml}\n"
    )
    bad = "meta.yaml" if meta else "config.yaml"
    with pytest.raises(CheckpointImportError, match=rf"{bad}: .*(YAML|mapping)"):
        read_espnet_repo(tmp_path)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("preencoder_conf", "input_size", None),
        ("preencoder_conf", "output_size", None),
        ("preencoder_conf", "output_size", "128"),
        ("postencoder_conf", "output_size", True),
    ],
)
def test_a_missing_or_non_integer_layer_width_is_named(tmp_path, section, key, value):
    from speechllm.models.espnet_import import espnet_architecture

    config = training_config("ctc", "bigscience/bloomz-7b1", ["a", "b"])
    if value is None:
        del config[section][key]
    else:
        config[section][key] = value
    with pytest.raises(CheckpointImportError, match=rf"config\.yaml: unsupported {section}\.{key}"):
        espnet_architecture(config, tmp_path / "config.yaml")
