"""Local models for the offline world, saved with `save_pretrained` so the pipeline loads them through the
same `from_pretrained` calls as hub models: a byte-level BPE tokenizer with BLOOM's special tokens, a tiny
BLOOM pretrained on the demo text in instruction form, and a tiny Wav2Vec2 in the MMS architecture."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    PreTrainedTokenizerFast,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

from speechllm.data.languages import language_name
from speechllm.demo.corpus import (
    demo_sentences,
    glue_split,
    xnli_split,
)
from speechllm.evaluate.prompts import TASK_PROMPTS, render_text
from speechllm.targets.templates import builtin_templates
from speechllm.text.normalize import basic_normalize

# BLOOM's special tokens and ids: <unk>=0 (the CTC blank, models.ctc_head.blank_id), <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
DEMO_COLUMNS = ("en", "de", "fr", "es", "it", "pt")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def instruction_examples(
    llm_fraction: float,
    repeat_prefix: str,
    repeat_postfix: str,
    st_prefix: str,
    st_postfix: str,
    templates_per_sentence: int,
    task_repeats: int,
    option_prefix: str,
    seed: int,
    composed: dict[str, int] | None = None,
    composed_glue: dict[str, int] | None = None,
) -> list[Example]:
    """The demo LLM's instruction-form training text: repeat, translate, template-bank translation, tasks."""
    rng = random.Random(seed)
    examples: list[Example] = []
    names = {col: language_name(col) for col in DEMO_COLUMNS}
    translation_templates = [
        (p, q, t) for p, q in builtin_templates() if (t := _template_target(p, q, names)) is not None
    ]
    if templates_per_sentence > len(translation_templates):
        raise ValueError(
            f"models.demo_build.llm_pretrain.templates_per_sentence={templates_per_sentence} exceeds the "
            f"{len(translation_templates)} translation templates of the built-in bank"
        )
    for row in demo_sentences(composed):
        for col in DEMO_COLUMNS:
            examples.append(Example(repeat_prefix + row[col] + repeat_postfix, row[col]))
            # Repeating copies the input's form, as a large LLM does: normalised text (the CTC and T targets,
            # lower-case and unpunctuated) is repeated as normalised text.
            plain = basic_normalize(row[col])
            examples.append(Example(repeat_prefix + plain + repeat_postfix, plain))
            if col != "en":
                st = st_prefix.format(language=names[col])
                examples.append(Example(st + row[col] + st_postfix, row["en"]))
        for col in DEMO_COLUMNS:
            for prefix, postfix, target in rng.sample(translation_templates, templates_per_sentence):
                examples.append(Example(prefix + row[col] + postfix, " " + row[target]))
    for task in ("sst2", "cola", "rte"):
        seen, _ = glue_split(task, llm_fraction, composed_glue)
        prompt = TASK_PROMPTS[task]
        examples += [
            Example(render_text(prompt, row), option_prefix + prompt.options[int(row["label"])])
            for row in seen
        ] * task_repeats
    prompt = TASK_PROMPTS["xnli"]
    examples += [
        Example(render_text(prompt, row), option_prefix + prompt.options[int(row["label"])])
        for row in xnli_split(llm_fraction)[0]
    ] * task_repeats
    return examples


def _template_target(prefix: str, postfix: str, names: dict[str, str]) -> str | None:
    """The demo column a translation template asks for, else None: of the languages it names ("in Y:",
    "to Y"), the one named last, since every form names the source first ("A text in X: ... The same text
    in Y:", "from X to Y", "... is in X. Here is a translation to Y:")."""
    found = []
    for part, text in enumerate((prefix, postfix)):
        for col, name in names.items():
            for pattern in (f"in {name}:", f"to {name}\n", f"to {name}:"):
                if (at := text.rfind(pattern)) >= 0:
                    found.append((part, at, col))
    return max(found)[2] if found else None


def build_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any string encodes) with BLOOM's special-token ids; adds no BOS/EOS, as BLOOM."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    fast.save_pretrained(out_dir)
    return fast


def prompt_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def pretraining_batch(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """(token ids, prompt length) pairs → right-padded `input_ids`/`attention_mask` (B, T) and `labels`
    (B, T) that score only the completion and its eos, as in BLOOMZ's instruction tuning: prompt and padding
    are -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for i, (ids, prompt_len) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = input_ids[i, prompt_len : len(ids)]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _batches(ids: list[tuple[list[int], int]], batch_size: int, pool_batches: int, rng: random.Random):
    """Endless shuffled batches of similar lengths: each pool of `pool_batches` batches' worth of shuffled
    sequences is sorted by length and cut into batches, which are shuffled again (padding costs compute)."""
    if len(ids) < batch_size:
        raise ValueError(
            f"models.demo_build.llm_pretrain.batch_size={batch_size} exceeds the {len(ids)} examples"
        )
    pool = batch_size * pool_batches
    while True:
        order = list(range(len(ids)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order) - batch_size + 1, pool):
            chunk = sorted(order[start : start + pool], key=lambda j: len(ids[j][0]))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            yield [ids[j] for j in batch]


def demo_llm_config(cfg: dict[str, Any], tokenizer_size: int) -> BloomConfig:
    """The demo BLOOM's architecture (`models.demo_build`) for a tokenizer of `tokenizer_size` entries."""
    pad_to = cfg["llm_vocab_pad_to"]
    vocab = int(math.ceil(tokenizer_size / pad_to) * pad_to)
    if vocab == tokenizer_size:
        vocab += pad_to  # keep BLOOM's property: more embedding rows than tokenizer entries
    return BloomConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3, **cfg["llm"])


def build_llm(
    out_dir: Path,
    cfg: dict[str, Any],
    prompt_cfg: dict[str, Any],
    st_prompt: dict[str, str],
    llm_fraction: float,
    option_prefix: str,
    seed: int,
    composed: dict[str, int] | None = None,
    composed_glue: dict[str, int] | None = None,
) -> dict[str, float]:
    """Train tokenizer + tiny BLOOM on the instruction text; save both into `out_dir`. Returns losses."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train = cfg["llm_pretrain"]
    examples = instruction_examples(
        llm_fraction,
        prompt_cfg["prefix"],
        prompt_cfg["postfix"],
        st_prompt["prefix"],
        st_prompt["postfix"],
        train["templates_per_sentence"],
        train["task_repeats"],
        option_prefix,
        seed,
        composed,
        composed_glue,
    )
    tokenizer = build_tokenizer(
        [e.prompt + e.completion for e in examples], cfg["tokenizer_vocab_size"], out_dir
    )
    model = BloomForCausalLM(demo_llm_config(cfg, len(tokenizer)))
    if train["freeze_embeddings"]:
        freeze_random_embeddings(model, cfg["llm_embedding_norm"])
    max_len = train["max_length"]
    # Prompt and completion are tokenised apart, as at inference (the prompt alone, then generated tokens):
    # tokenising them joined lets BPE merge across the boundary (". " + "The" → " The"), and a model trained
    # that way cannot continue a prompt that ends in a space. Only the completion is scored
    # (pretraining_batch): with the prompt scored too, most updates went into modelling the templates'
    # wording, and the demo LLM's MI answers were mostly another corpus sentence (docs/demo.md).
    prompts = [prompt_ids(tokenizer, e.prompt) for e in examples]
    seqs = [
        (p + prompt_ids(tokenizer, e.completion) + [tokenizer.eos_token_id], len(p))
        for p, e in zip(prompts, examples, strict=True)
    ]
    longest = max(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    if len(seqs[longest][0]) > max_len:
        # Cutting the end would drop the answer of exactly the longest (task) prompts: an error, not a
        # truncation.
        raise ValueError(
            f"models.demo_build.llm_pretrain.max_length={max_len} is shorter than the longest instruction "
            f"example ({len(seqs[longest][0])} tokens with eos; "
            f"tokenizer_vocab_size={cfg['tokenizer_vocab_size']}): {examples[longest].prompt!r}; "
            f"raise max_length to at least {len(seqs[longest][0])}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    steps, warmup = train["steps"], train["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    model.train()
    losses = []
    batches = _batches(seqs, train["batch_size"], train["sort_pool_batches"], rng)
    for _ in tqdm(range(steps), desc="demo LLM pretraining", mininterval=10):
        loss = model(**pretraining_batch(next(batches), tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    scale = rescale_embeddings(model, cfg["llm_embedding_norm"])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    window = max(1, len(losses) // 20)
    return {
        "first_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "examples": len(examples),
        "vocab_size": model.config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "embedding_scale": scale,
    }


@torch.no_grad()
def freeze_random_embeddings(model: BloomForCausalLM, mean_norm: float) -> None:
    """Random token embeddings of row norm ~`mean_norm`, frozen for the whole pretraining (tied: also the LM
    head).

    The embedding table is stage 1's frozen CTC head. A large LLM's table (250,680 x 4,096) keeps its rows far
    apart; a tiny one trained for minutes (measured at 1,200 x 128) pulls them into clusters
    (nearest-neighbour cosine ~0.6, random rows ~0.35), which raises the CTC loss the adaptor can reach.
    Random rows are nearly orthogonal, and the LLM learns its function around them
    (`llm_pretrain.freeze_embeddings`).
    """
    embeddings = model.get_input_embeddings().weight
    embeddings.normal_(0.0, mean_norm / math.sqrt(embeddings.shape[1]))
    embeddings.requires_grad_(False)


@torch.no_grad()
def rescale_embeddings(model: BloomForCausalLM, mean_norm: float) -> float:
    """Scale the (tied) token embeddings to rows of mean L2 norm `mean_norm`, and the final LayerNorm by the
    inverse: the LLM computes the same function (its embedding LayerNorm ignores a row's scale, and the output
    logits E·ln_f(h) are unchanged), but the frozen CTC head built from these embeddings gets the logit range
    of a large LLM's embeddings. A tiny LLM trained for minutes ends with rows of norm ~1, whose CTC logits
    are too flat for the adaptor to leave the blank plateau within the demo's budget. Returns the factor."""
    if not model.config.tie_word_embeddings:
        raise ValueError("rescale_embeddings expects tied input/output embeddings, as BLOOM's")
    embeddings = model.get_input_embeddings().weight
    factor = mean_norm / float(embeddings.norm(dim=1).mean())
    embeddings.mul_(factor)
    final_norm = model.transformer.ln_f
    final_norm.weight.div_(factor)
    final_norm.bias.div_(factor)
    return factor


def build_speech_encoder(out_dir: Path, cfg: dict[str, Any], sampling_rate: int, seed: int) -> int:
    """A randomly initialised Wav2Vec2 in MMS's stable-layer-norm architecture; returns its parameter
    count."""
    torch.manual_seed(seed)
    model = Wav2Vec2Model(demo_speech_encoder_config(cfg))
    model.save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=sampling_rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def demo_speech_encoder_config(cfg: dict[str, Any]) -> Wav2Vec2Config:
    """The demo encoder's architecture (`models.demo_build.speech_encoder`): MMS's stable-layer-norm
    Wav2Vec2."""
    enc = cfg["speech_encoder"]
    return Wav2Vec2Config(
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        conv_bias=True,
        hidden_size=enc["hidden_size"],
        num_hidden_layers=enc["num_hidden_layers"],
        num_attention_heads=enc["num_attention_heads"],
        intermediate_size=enc["intermediate_size"],
        conv_dim=tuple(enc["conv_dim"]),
        conv_stride=tuple(enc["conv_stride"]),
        conv_kernel=tuple(enc["conv_kernel"]),
        num_conv_pos_embeddings=enc["num_conv_pos_embeddings"],
        num_conv_pos_embedding_groups=enc["num_conv_pos_embedding_groups"],
        layerdrop=0.0,
        mask_time_prob=0.0,
    )
