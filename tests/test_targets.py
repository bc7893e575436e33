"""Synthetic targets: template banks (and their download), reproducible draws, batched + cached + resumable
generation, backends, T/MI/TMI assembly."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from speechllm import stopping
from speechllm.cli import main
from speechllm.stopping import PREEMPTED_EXIT, Preempted
from speechllm.targets.assemble import assemble
from speechllm.targets.backends import load_generator
from speechllm.targets.download import DownloadError, fetch_verified
from speechllm.targets.generate import (
    GreedyDecoder,
    HFGenerator,
    cache_key,
    cached_generate,
    generate_batched,
    generate_shard,
    greedy_loop_supported,
    read_partial,
    row_tokens,
    target_settings,
)
from speechllm.targets.settings import GenerateSettings
from speechllm.targets.templates import TemplateError, bank_hash, draw_items, fetch_templates, load_templates
from speechllm.targets.vllm_backend import BackendUnavailable


def test_reference_template_bank(shared_data):
    bank = load_templates(str(shared_data / "bloomzmms" / "templates.json"))
    assert len(bank) == 4300
    assert ("Translate the following text from English to Swahili ", "") in bank or any(
        p.startswith("Translate the following text from") for p, _ in bank
    )


def test_builtin_bank_and_bad_bank(tmp_path):
    assert len(load_templates("builtin")) > 10
    bad = tmp_path / "t.json"
    bad.write_text('[["a", "b"], ["only one"]]')
    with pytest.raises(TemplateError, match="entry 1"):
        load_templates(str(bad))
    with pytest.raises(TemplateError, match="targets.templates"):
        load_templates(str(tmp_path / "missing.json"))


def test_draws_are_reproducible_and_per_occurrence():
    bank = [("A: ", ""), ("B: ", ""), ("", " C")]
    counts = {"hello": 3, "world": 1}
    a, b = draw_items(counts, bank, 2, seed=1), draw_items(counts, bank, 2, seed=1)
    assert a == b and len(a) == 8
    assert draw_items(counts, bank, 2, seed=2) != a
    assert sum(1 for t, _, _ in a if t == "hello") == 6
    assert bank_hash(bank) != bank_hash(bank[:2])


@pytest.fixture(scope="module")
def lm(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llm"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    return model, tok


def test_batched_generation_equals_one_at_a_time(lm):
    model, tok = lm
    prompts = [
        "Repeat the sentence: the cat",
        "hello",
        "Der Hund schläft im Garten. The same text in English:",
    ]
    batched = generate_batched(model, tok, prompts, batch_size=3, max_new_tokens=6, num_beams=1)
    single = [
        generate_batched(model, tok, [p], batch_size=1, max_new_tokens=6, num_beams=1)[0] for p in prompts
    ]
    assert batched == single


SHARD_ITEMS = [(f"text {i} the cat", "Repeat the sentence: ", ". ") for i in range(7)]
SHARD_SETTINGS = {"llm": "tiny", "max_new_tokens": 4, "num_beams": 1}


@pytest.fixture()
def full_shard(lm, tmp_path) -> Path:
    """SHARD_ITEMS generated in one uninterrupted go, 3 at a time."""
    model, tok = lm
    full = tmp_path / "full.jsonl"
    generate_shard(SHARD_ITEMS, 0, 1, HFGenerator(model, tok, 3), SHARD_SETTINGS, full)
    return full


def test_killed_shard_resumes_without_redoing_or_duplicating(lm, tmp_path, full_shard):
    model, tok = lm
    items, settings, full = SHARD_ITEMS, SHARD_SETTINGS, full_shard
    # Simulate a kill after the first batch: keep 3 finished items and a torn line in the partial file.
    out = tmp_path / "resumed.jsonl"
    partial = out.with_name(out.name + ".partial.jsonl")
    lines = [json.loads(x) for x in full.read_text().splitlines()]

    with partial.open("w") as fh:
        for item in lines[:3]:
            key = cache_key(settings, item["prefix"] + item["text"] + item["postfix"])
            fields = {k: item[k] for k in ("text", "prefix", "postfix", "output")}
            fh.write(json.dumps({"key": key, **fields}) + "\n")
        fh.write('{"key": "torn')
    generator = HFGenerator(model, tok, 3)
    calls = []
    original = generator.generate

    def counting_generate(prompts, max_new_tokens, on_batch=None):
        calls.append(len(prompts))
        return original(prompts, max_new_tokens, on_batch)

    generator.generate = counting_generate
    stats = generate_shard(items, 0, 1, generator, settings, out)
    assert stats == {"items": 7, "generated": 4, "reused": 3}
    assert sum(calls) == 4
    assert out.read_text() == full.read_text()
    assert not partial.exists()
    assert read_partial(partial) == {}


def test_stop_signal_keeps_the_finished_batch_and_the_rerun_completes_it(
    lm, tmp_path, full_shard, stop_signals
):
    """SIGTERM during a shard (Slurm's warning before the time limit): the batch being generated is finished
    and appended, the shard exits for a retry (status 75), and the retry generates only the rest."""
    model, tok = lm
    items, settings = SHARD_ITEMS, SHARD_SETTINGS
    out = tmp_path / "stopped.jsonl"
    generator = HFGenerator(model, tok, 3)
    original = generator.generate

    def signalled_generate(prompts, max_new_tokens, on_batch=None):
        stop_signals()  # arrives while the first batch is being generated
        return original(prompts, max_new_tokens, on_batch)

    generator.generate = signalled_generate
    with pytest.raises(Preempted) as stopped:
        generate_shard(items, 0, 1, generator, settings, out)
    assert stopped.value.code == PREEMPTED_EXIT and not out.exists()
    assert len(read_partial(out.with_name(out.name + ".partial.jsonl"))) == 3  # the first batch, complete
    stopping.reset()  # the retry is a new process
    stats = generate_shard(items, 0, 1, HFGenerator(model, tok, 3), settings, out)
    assert stats == {"items": 7, "generated": 4, "reused": 3} and out.read_text() == full_shard.read_text()


def test_shards_partition_the_items(lm, tmp_path):
    model, tok = lm
    items = [(f"t{i}", "", " C") for i in range(5)]
    settings = {"llm": "tiny", "max_new_tokens": 2, "num_beams": 1}
    got = []
    for shard in range(2):
        generate_shard(items, shard, 2, HFGenerator(model, tok, 2), settings, tmp_path / f"s{shard}.jsonl")
        got += [json.loads(x)["index"] for x in (tmp_path / f"s{shard}.jsonl").read_text().splitlines()]
    assert sorted(got) == list(range(5))


def test_t_mi_tmi_assembly():
    train = [
        {"id": f"u{i}", "raw_transcription": "Hello, World.", "transcription": "hello world"}
        for i in range(2)
    ]
    generated = [
        {"index": i, "text": "Hello, World.", "prefix": f"P{i}: ", "postfix": "", "output": f" out{i}"}
        for i in range(4)
    ]
    generated.append({"index": 9, "text": "Hello, World.", "prefix": "", "postfix": "", "output": "dropped"})
    sets = assemble(train, generated, "Repeat the sentence: ", ". ", "synthetic_only", 2, True)
    assert [r["target"] for r in sets["t"]] == ["hello world", "hello world"]
    assert [r["id"] for r in sets["tmi"]] == ["u0-1", "u0-2", "u0-3", "u1-1", "u1-2", "u1-3"]
    assert sets["tmi"][0]["target"] == "Hello, World." and sets["tmi"][0]["prefix"] == "Repeat the sentence: "
    assert [r["target"] for r in sets["mi"]] == [
        " out0",
        " out2",
        " out1",
        " out3",
    ]  # the LLM's leading space; one item per utterance per pass
    assert all(r["prefix"] != "Repeat the sentence: " for r in sets["mi"])
    pop = assemble(train, generated, "Repeat the sentence: ", ". ", "reference_pop", 2, True)
    assert [r["target"] for r in pop["mi"]] == ["Hello, World.", " out0", "Hello, World.", " out1"]
    with pytest.raises(ValueError, match="mi_reading"):
        assemble(train, generated, "", "", "other", 2, True)


@pytest.mark.parametrize(("drop_blank", "kept"), [(True, [" a", "b\n"]), (False, [" a", " \n", "b\n"])])
def test_only_empty_outputs_are_dropped_unless_blank_ones_are_too(drop_blank, kept):
    """The reference drops an output only when it tokenises to nothing (an empty string);
    targets.drop_blank_outputs also drops whitespace-only ones. Kept outputs are not stripped."""
    train = [{"id": "u0", "raw_transcription": "Hi.", "transcription": "hi"}]
    outputs = ["", " a", " \n", "b\n"]
    generated = [
        {"index": i, "text": "Hi.", "prefix": "P: ", "postfix": "", "output": o}
        for i, o in enumerate(outputs)
    ]
    sets = assemble(train, generated, "Repeat: ", ". ", "synthetic_only", len(kept), drop_blank)
    assert [r["target"] for r in sets["mi"]] == kept


def test_assemble_cli_names_the_bad_shard_line(tmp_path):
    """`speechllm targets assemble` on a broken shard or manifest: the error names file and line, nothing
    written."""
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"id": "u0", "raw_transcription": "Hi.", "transcription": "hi"}) + "\n")
    good = {"index": 0, "text": "Hi.", "prefix": "P: ", "postfix": "", "output": " out"}
    shard = tmp_path / "shard0.jsonl"
    settings = json.dumps(
        {
            "prompt": {"prefix": "Repeat: ", "postfix": ". "},
            "mi_reading": "synthetic_only",
            "templates_per_occurrence": 2,
            "drop_blank_outputs": True,
        }
    )

    def run(shard_text: str, manifest_text: str | None = None) -> subprocess.CompletedProcess:
        shard.write_text(shard_text)
        if manifest_text is not None:
            manifest.write_text(manifest_text)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "speechllm.cli",
                "targets",
                "assemble",
                "--settings",
                settings,
                "--manifest",
                str(manifest),
                "--shards",
                str(shard),
                "--out-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
        )

    again = run(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert again.returncode != 0 and f"{shard}:2: item index 0 also at {shard}:1" in again.stderr
    half = run(json.dumps({**good, "index": 0.5}) + "\n")
    assert half.returncode != 0 and f"{shard}:1: field index must be a whole number >= 0" in half.stderr
    gap = run(json.dumps(good) + "\n" + json.dumps({**good, "index": 2}) + "\n")
    assert gap.returncode != 0 and "miss item indices, e.g. [1]" in gap.stderr
    torn = run(json.dumps(good) + "\n" + '{"index": 1, "te\n')
    assert torn.returncode != 0 and f"{shard}:2: not valid JSON" in torn.stderr
    short = run(json.dumps({k: v for k, v in good.items() if k != "output"}) + "\n")
    assert short.returncode != 0 and f"{shard}:1: missing field(s) output" in short.stderr
    no_field = run(json.dumps(good) + "\n", json.dumps({"id": "u0", "raw_transcription": "Hi."}) + "\n")
    assert (
        no_field.returncode != 0 and str(manifest) in no_field.stderr and "transcription" in no_field.stderr
    )
    assert not (tmp_path / "out").exists()


def test_assemble_refuses_shards_drawn_for_another_manifest_or_setting(tmp_path):
    """Shards must hold templates_per_occurrence items per utterance of each transcript and none for a text
    the manifest lacks; stale shards would otherwise leave utterances silently without synthetic items."""
    manifest = tmp_path / "train.jsonl"
    records = [{"id": f"u{i}", "raw_transcription": "Hi.", "transcription": "hi"} for i in range(2)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {
        "prompt": {"prefix": "Repeat: ", "postfix": ". "},
        "mi_reading": "synthetic_only",
        "templates_per_occurrence": 2,
        "drop_blank_outputs": True,
    }
    shard = tmp_path / "shard0.jsonl"

    def run(texts: list[str], per_occurrence: int = 2) -> None:
        items = [
            {"index": i, "text": t, "prefix": "P: ", "postfix": "", "output": " o"}
            for i, t in enumerate(texts)
        ]
        shard.write_text("".join(json.dumps(x) + "\n" for x in items))
        args = ["--manifest", str(manifest), "--shards", str(shard), "--out-dir", str(tmp_path / "out")]
        s = json.dumps({**settings, "templates_per_occurrence": per_occurrence})
        main(["targets", "assemble", "--settings", s, *args])

    with pytest.raises(SystemExit, match=rf"{manifest}:1: the shards hold 2 items .* draws 4"):
        run(["Hi."] * 2)  # drawn with templates_per_occurrence 1
    with pytest.raises(SystemExit, match=rf"{shard}:5: transcript 'Bye.' is not in {manifest}"):
        run(["Hi."] * 4 + ["Bye."])
    assert not (tmp_path / "out").exists()
    run(["Hi."] * 2, per_occurrence=1)
    assert len((tmp_path / "out" / "train_tmi.jsonl").read_text().splitlines()) == 4


def test_generation_is_deterministic_under_torch_seed_changes(lm):
    model, tok = lm
    torch.manual_seed(123)
    a = generate_batched(model, tok, ["hello"], 1, 5, 1)
    torch.manual_seed(7)
    assert generate_batched(model, tok, ["hello"], 1, 5, 1) == a


# --- batched greedy decoding vs one-at-a-time HF generate ------------------------------------------------

MIXED_PROMPTS = [
    "hello",
    "the cat",
    "Repeat the sentence: the cat sits on the mat. ",
    "Der Hund schläft im Garten. The same text in English:",
    "Translate the following text from German to English\nDer Hund",
    "world hello world",
    "sits on the mat",
    "Garten",
    "Repeat the sentence: hello world. ",
    "the mat. the cat. the dog.",
    "English: German: English:",
    "cat",
]
MIXED_LIMITS = [12, 1, 7, 3, 12, 5, 9, 2, 12, 4, 6, 10]
EXTRA_STOPS = 2  # the most frequent generated tokens, made stop tokens so that rows finish early


@pytest.fixture(scope="module", params=["bloom", "llama"])
def varied_lm(request, tiny_models, tmp_path_factory):
    """A tiny random BLOOM (ALiBi from the attention mask) or LLaMA (rotary position ids, grouped KV heads)
    with large weights (small ones repeat a single token), saved and loaded like a checkpoint, so greedy
    continuations change token by token and depend on the whole context."""
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    torch.manual_seed(0)
    common = {
        "vocab_size": len(tok) + 8,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "initializer_range": 1.0,
    }
    if request.param == "bloom":
        model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **common,
            )
        )
    path = tmp_path_factory.mktemp(f"varied_{request.param}")
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok


def hf_alone(model, tok, prompt: str, limit: int, stop_ids: set[int]) -> list[int]:
    """Plain HF greedy `generate` on one prompt (no padding, its own cache), cut as `generate_batched`
    cuts."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=limit,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(stop_ids),
        pad_token_id=tok.pad_token_id,
    )
    return row_tokens(gen[0, ids.shape[1] :].tolist(), limit, stop_ids)


@pytest.fixture(scope="module")
def stopping_lm(varied_lm):
    """`varied_lm` with extra stop tokens, and the one-at-a-time HF reference continuations (ids) of
    MIXED_PROMPTS under MIXED_LIMITS: some rows stop early (one before its first token), others at their
    limit."""
    model, tok = varied_lm
    free_run = [hf_alone(model, tok, p, max(MIXED_LIMITS), {2}) for p in MIXED_PROMPTS]
    frequent = Counter(t for ids in free_run for t in ids[1:]).most_common(EXTRA_STOPS)
    stops = {2, *(t for t, _ in frequent)}
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = sorted(stops)
    expected = [
        hf_alone(stopping, tok, p, n, stops) for p, n in zip(MIXED_PROMPTS, MIXED_LIMITS, strict=True)
    ]
    assert any(not e for e in expected)
    assert any(len(e) < n for e, n in zip(expected, MIXED_LIMITS, strict=True))
    assert any(len(e) == n for e, n in zip(expected, MIXED_LIMITS, strict=True))
    assert (
        len({len(tok(p, add_special_tokens=False).input_ids) for p in MIXED_PROMPTS})
        > len(MIXED_PROMPTS) // 2
    )
    return stopping, tok, stops, expected


def texts(tok, rows: list[list[int]]) -> list[str]:
    return [tok.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=False) for r in rows]


@pytest.mark.parametrize("batch_size", [1, 3, 5, 16])
def test_batched_greedy_equals_hf_generate_alone(stopping_lm, batch_size):
    """Mixed prompt lengths and per-prompt limits, rows finishing early and slots refilled: every output
    equals HF `generate` on that prompt alone, and no forward pass exceeds the batch size."""
    model, tok, _, expected = stopping_lm
    assert greedy_loop_supported(model)
    sizes, reported = [], []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = generate_batched(
            model, tok, MIXED_PROMPTS, batch_size, MIXED_LIMITS, 1, on_batch=reported.extend
        )
    finally:
        hook.remove()
    assert got == texts(tok, expected)
    assert max(sizes) <= batch_size
    assert sorted(i for i, _ in reported) == list(range(len(MIXED_PROMPTS)))
    assert all(got[i] == text for i, text in reported)


@pytest.mark.parametrize("order", ["shortest first", "as given"])
def test_greedy_decoder_takes_prompts_in_any_order(stopping_lm, order):
    """Rows longer than the running cache widen it (left padding) before they take a slot."""
    model, tok, stops, expected = stopping_lm
    ids = [tok(p, add_special_tokens=False).input_ids for p in MIXED_PROMPTS]
    perm = (
        sorted(range(len(ids)), key=lambda i: len(ids[i]))
        if order == "shortest first"
        else list(range(len(ids)))
    )
    decoder = GreedyDecoder(model, tok.pad_token_id, stops, batch_size=4)
    with torch.inference_mode():
        got = dict(decoder.rows([ids[i] for i in perm], [MIXED_LIMITS[i] for i in perm]))
    assert [got[perm.index(i)] for i in range(len(ids))] == expected


def test_zero_new_tokens_and_no_prompts(stopping_lm):
    model, tok, _, expected = stopping_lm
    assert generate_batched(model, tok, MIXED_PROMPTS[:2], 2, [0, MIXED_LIMITS[1]], 1) == [
        "",
        *texts(tok, expected[1:2]),
    ]
    assert generate_batched(model, tok, [], 2, 3, 1) == []


def test_models_the_greedy_loop_does_not_cover_use_hf_generate(stopping_lm):
    """A logits processor in the generation config (here a repetition penalty) sends greedy decoding through
    HF `generate` per batch, rows still cut to their own limits and stop tokens."""
    model, tok, stops, _ = stopping_lm
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    assert not greedy_loop_supported(penalised)
    expected = [
        hf_alone(penalised, tok, p, n, stops) for p, n in zip(MIXED_PROMPTS, MIXED_LIMITS, strict=True)
    ]
    calls = []
    original = penalised.generate
    penalised.generate = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    assert generate_batched(penalised, tok, MIXED_PROMPTS, 4, MIXED_LIMITS, 1) == texts(tok, expected)
    assert len(calls) == -(-len(MIXED_PROMPTS) // 4)


# --- template bank download --------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_template_download_verifies_hash_and_parses(shared_data, tmp_path):
    pinned = CONFIG["targets"]["templates_download"]
    assert "/77dc192" in pinned["url"] and pinned["url"].endswith("/data/synthetic-targets/templates.json")
    src = shared_data / "bloomzmms" / "templates.json"
    out = tmp_path / "resources" / "bloomzmms" / "templates.json"
    timeout = CONFIG["resources"]["download_timeout_seconds"]
    assert fetch_templates(src.as_uri(), pinned["sha256"], out, timeout) == 4300  # file:// URL, read in place
    assert load_templates(str(out)) == load_templates(str(src))
    assert fetch_templates(str(src), pinned["sha256"], tmp_path / "from_path.json", timeout) == 4300
    bad = tmp_path / "bad" / "templates.json"
    with pytest.raises(DownloadError, match="does not match.*targets.templates_download.sha256"):
        fetch_templates(src.as_uri(), "0" * 64, bad, timeout)
    assert not bad.parent.exists() or list(bad.parent.iterdir()) == []  # nothing left behind, not even a temp
    with pytest.raises(DownloadError, match="(?i)no such file.*config key targets.templates_download.url"):
        fetch_templates(str(tmp_path / "missing.json"), pinned["sha256"], bad, timeout)


@pytest.mark.parametrize(("kind", "error"), [("cut", "cut short: 10 of 1000 bytes"), ("stall", "timed out")])
def test_released_download_refuses_a_cut_or_stalled_server(tmp_path, bad_server, kind, error):
    """Without a pinned sha256 (the released targets' tar has none) only the download itself can tell a
    partial body: a cut or stalled one fails naming the config key, and nothing is left at the target."""
    out = tmp_path / "resources" / "bloomzmms" / "tmi.tar.gz"
    with pytest.raises(DownloadError, match=f"{error}.*config key targets.released.url"):
        fetch_verified(bad_server(kind), None, out, "targets.released", timeout=0.5)
    assert list(out.parent.iterdir()) == []


def test_template_download_rejects_a_bank_that_does_not_parse(tmp_path):
    src = tmp_path / "templates.json"
    src.write_text('[["a", "b"], ["only one"]]')
    out = tmp_path / "out" / "templates.json"
    with pytest.raises(TemplateError, match="entry 1"):
        fetch_templates(src.as_uri(), hashlib.sha256(src.read_bytes()).hexdigest(), out, timeout=10)
    assert not out.exists()


def test_paper_scale_generation_depends_on_the_downloaded_bank(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"targets": {"source": "released"}}))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    targets = ["results/targets/shard0.jsonl", "results/data/train_tmi.jsonl"]
    configs = [str(REPO / "config/experiments/bloomzmms.yaml"), str(override)]
    res = subprocess.run(
        [
            snakemake,
            "-s",
            str(REPO / "Snakefile"),
            "-n",
            "-d",
            str(tmp_path),
            *targets,
            "--configfile",
            *configs,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = {block.split(":")[0]: block for block in res.stdout.split("\nrule ")[1:]}
    assert "output: resources/bloomzmms/templates.json" in jobs["fetch_templates"]
    assert "resources/bloomzmms/templates.json" in jobs["generate_targets"].split("output:")[0]
    assert "resources/bloomzmms/tmi_training_targets.tar.gz" in jobs["import_released_targets"]
    assert "fetch_released_targets" in jobs and "assemble_targets" not in jobs


# --- cache key ----------------------------------------------------------------------------------------


class EchoGenerator:
    """A stand-in backend that records what it is asked to generate."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def prompt_length(self, prompt: str) -> int:
        return len(prompt.split())

    def generate(self, prompts, max_new_tokens, on_batch=None):
        self.prompts += prompts
        outputs = [f"{p}|{n}" for p, n in zip(prompts, max_new_tokens, strict=True)]
        if on_batch is not None:
            on_batch(list(enumerate(outputs)))
        return outputs


TARGET_SETTINGS = {  # what rule generate_targets passes as --settings (the parts that reach the key)
    "llm": {
        "name_or_path": "bigscience/bloomz-7b1",
        "revision": "main",
        "dtype": "bfloat16",
        "load_in_8bit": False,
    },
    "backend": "hf",
    "num_beams": 1,
    "seed": 0,
    "max_new_tokens": 128,
    "clean_up_spaces": True,
    "templates": "builtin",
    "templates_per_occurrence": 2,
    "batch_size": 16,
}


def key_settings(raw: dict, bank: str) -> dict:
    return target_settings(GenerateSettings.from_settings(raw), bank)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("llm.name_or_path", "bigscience/bloomz-3b"),
        ("llm.revision", "a1b2c3d"),
        ("llm.dtype", "float16"),
        ("llm.load_in_8bit", True),
        ("seed", 1),
        ("max_new_tokens", 64),
        ("num_beams", 2),
        ("clean_up_spaces", False),
        ("backend", "vllm"),
        ("bank", "another bank"),
    ],
)
def test_any_setting_change_invalidates_the_cache(tmp_path, path, value):
    prompts = ["A text in German: Hallo.\nThe same text in English:", "Summarize: the cat sat."]
    partial = tmp_path / "shard0.jsonl.partial.jsonl"
    base = key_settings(TARGET_SETTINGS, bank_hash([("A: ", "")]))
    _, generated = cached_generate(prompts, [8, 8], EchoGenerator(), base, partial)
    assert generated == 2
    again = EchoGenerator()
    assert cached_generate(prompts, [8, 8], again, base, partial)[1] == 0 and again.prompts == []
    changed = copy.deepcopy(TARGET_SETTINGS)
    if path == "bank":
        key = key_settings(changed, bank_hash([("B: ", "")]))
    else:
        section, _, name = path.rpartition(".")
        (changed[section] if section else changed)[name] = value
        key = key_settings(changed, bank_hash([("A: ", "")]))
    fresh = EchoGenerator()
    assert cached_generate(prompts, [8, 8], fresh, key, partial)[1] == 2 and fresh.prompts == prompts


def test_the_generating_library_version_is_part_of_the_key(monkeypatch):
    bank = bank_hash([("A: ", "")])
    before = key_settings(TARGET_SETTINGS, bank)
    assert before["engine_version"] == importlib.metadata.version("transformers")
    monkeypatch.setattr("speechllm.targets.generate.engine_version", lambda backend: "0.0.1")
    assert cache_key(key_settings(TARGET_SETTINGS, bank), "p") != cache_key(before, "p")


def test_the_same_prompt_twice_is_generated_once(tmp_path):
    gen = EchoGenerator()
    outputs, generated = cached_generate(
        ["p", "q", "p"], [2, 2, 2], gen, {"k": 1}, tmp_path / "x.partial.jsonl"
    )
    assert outputs == ["p|2", "q|2", "p|2"] and generated == 2 and gen.prompts == ["p", "q"]


def test_a_torn_line_does_not_swallow_the_next_finished_item(tmp_path):
    """A kill mid-write leaves a torn last line; the items appended after it on resume must each stay
    readable, so a second resume redoes nothing."""
    partial = tmp_path / "x.partial.jsonl"
    settings = {"k": 1}
    partial.write_text(json.dumps({"key": cache_key(settings, "p"), "output": "p|2"}) + "\n" + '{"key": "to')
    assert cached_generate(["p", "q"], [2, 2], EchoGenerator(), settings, partial) == (["p|2", "q|2"], 1)
    again = EchoGenerator()
    assert cached_generate(["p", "q"], [2, 2], again, settings, partial) == (["p|2", "q|2"], 0)
    assert again.prompts == []


# --- vLLM backend -------------------------------------------------------------------------------------

VLLM_CFG = {"chunk_size": 2, "gpu_memory_utilization": 0.5}


def test_vllm_unavailable_is_reported_cleanly(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as on this machine
    with pytest.raises(BackendUnavailable, match="targets.backend is 'vllm'.*targets.backend: hf"):
        load_generator(TARGET_SETTINGS["llm"], "vllm", 4, 1, 0, VLLM_CFG)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"id": "u1", "raw_transcription": "Hello."}) + "\n")
    settings = {
        **TARGET_SETTINGS,
        "templates": "builtin",
        "templates_per_occurrence": 2,
        "batch_size": 4,
        "vllm": VLLM_CFG,
        "backend": "vllm",
    }
    with pytest.raises(
        SystemExit, match="^speechllm targets[a-z ]*: error: targets.backend is 'vllm' but vLLM cannot"
    ):
        main(
            [
                "targets",
                "generate",
                "--settings",
                json.dumps(settings),
                "--manifest",
                str(manifest),
                "--shard",
                "0",
                "--num-shards",
                "1",
                "--out",
                str(tmp_path / "shard0.jsonl"),
            ]
        )
    assert not (tmp_path / "shard0.jsonl").exists()


def fake_vllm(model) -> types.ModuleType:
    """A stand-in `vllm` module whose LLM decodes greedily with the HF model, one prompt at a time."""

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            results = []
            for prompt, p in zip(prompts, params, strict=True):
                assert p.temperature == 0.0 and p.n == 1
                ids = torch.tensor([prompt["prompt_token_ids"]])
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=p.max_tokens,
                    do_sample=False,
                )
                new = SimpleNamespace(token_ids=gen[0, ids.shape[1] :].tolist())
                results.append(SimpleNamespace(outputs=[new]))
            return results

    module = types.ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    return module


def test_vllm_backend_writes_what_the_hf_backend_writes(lm, monkeypatch, tmp_path):
    model, tok = lm
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(model))
    monkeypatch.setattr("speechllm.targets.backends.load_tokenizer", lambda cfg: tok)
    items = [
        ("the cat sits", "Repeat the sentence: ", ". "),
        ("Der Hund", "", " hello"),
        ("hello world", "A: ", ""),
    ]
    settings = {"max_new_tokens": 5}
    vllm_gen = load_generator(
        {"name_or_path": "tiny", "dtype": "float32"}, "vllm", 4, 1, 0, VLLM_CFG, clean_up_spaces=True
    )
    assert vllm_gen.llm.kwargs["dtype"] == "float32"
    generate_shard(items, 0, 1, vllm_gen, settings, tmp_path / "vllm.jsonl")
    hf_gen = HFGenerator(model, tok, 4, clean_up_spaces=True)
    generate_shard(items, 0, 1, hf_gen, settings, tmp_path / "hf.jsonl")
    assert (tmp_path / "vllm.jsonl").read_text() == (tmp_path / "hf.jsonl").read_text()


def test_demo_llm_sees_prompt_and_completion_tokenised_apart(tiny_models):
    """The demo LLM is trained on ids(prompt) + ids(completion), as it is used: a prompt ending in a space."""
    from speechllm.demo.build import prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    prompt, completion = "Repeat the sentence: the cat sits on the mat. ", "the cat sits on the mat."
    apart = prompt_ids(tok, prompt) + prompt_ids(tok, completion)
    assert apart[: len(prompt_ids(tok, prompt))] == prompt_ids(tok, prompt)
    assert tok.decode(apart) == prompt + completion


def test_a_short_pool_is_handed_out_once_in_passes_as_the_reference():
    """prepare_data.py pops every usable item once, one per utterance per pass: three usable items for
    three utterances of one text give each utterance one (the last pass runs dry), never a reused target."""
    train = [{"id": f"u{i}", "raw_transcription": "Hi.", "transcription": "hi"} for i in range(3)]
    generated = [
        {
            "index": i,
            "text": "Hi.",
            "prefix": f"P{i}: ",
            "postfix": "",
            "output": "" if i in (1, 4, 5) else f" o{i}",
        }
        for i in range(6)
    ]
    sets = assemble(train, generated, "R: ", ". ", "synthetic_only", 2, True)
    assert [(r["id"], r["target"]) for r in sets["tmi"]] == [
        ("u0-1", "Hi."),
        ("u0-2", " o0"),
        ("u1-1", "Hi."),
        ("u1-2", " o2"),
        ("u2-1", "Hi."),
        ("u2-2", " o3"),
    ]
    assert [(r["id"], r["target"]) for r in sets["mi"]] == [("u0-1", " o0"), ("u1-1", " o2"), ("u2-1", " o3")]
    four = [*generated, {"index": 6, "text": "Hi.", "prefix": "P6: ", "postfix": "", "output": " o6"}]
    second_pass = assemble(train, four, "R: ", ". ", "synthetic_only", 2, True)["tmi"]
    assert [r["id"] for r in second_pass if r["id"].endswith("-3")] == ["u0-3"]
