"""`speechllm data` subcommands: build and prepare manifests"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechllm.cliutils import EXAMPLES, add_command, add_download_timeout, example, parse_settings

log = logging.getLogger("speechllm")


def cmd_data_demo(args: argparse.Namespace) -> None:
    from speechllm.data.settings import DemoSettings
    from speechllm.data.tts import make_tts, voice_for
    from speechllm.demo import corpus as demo

    s = DemoSettings.from_settings(parse_settings(args.settings))
    tts = make_tts(s.tts.backend, s.sampling_rate, s.tts.words_per_minute)
    out = Path(args.out_dir)
    counts = demo.build_corpus(
        out, s.languages, s.tts.voices, tts, s.sampling_rate, args.threads, s.demo.composed
    )
    glue = demo.build_speechglue(
        out,
        s.speechglue.tasks,
        voice_for(s.tts.voices, "en_us"),
        tts,
        s.sampling_rate,
        s.demo.llm_train_fraction,
        args.threads,
        s.demo.composed_glue,
    )
    xnli = demo.build_speechxnli(
        out,
        s.speechxnli.languages,
        s.tts.voices,
        tts,
        s.sampling_rate,
        s.demo.llm_train_fraction,
        args.threads,
    )
    log.info("demo corpus %s; speechglue %s; speechxnli %d examples", counts, glue, xnli)


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def cmd_data_fleurs(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_fleurs
    from speechllm.data.settings import FleursSettings

    s = FleursSettings.from_settings(parse_settings(args.settings))
    counts = build_fleurs(
        Path(args.out_dir), s.languages, s.fleurs.dataset, s.fleurs.revision, s.on_bad_audio, args.cache_dir
    )
    log.info("FLEURS: %s", counts)


def cmd_data_common_voice(args: argparse.Namespace) -> None:
    from speechllm.data.common_voice import build_common_voice
    from speechllm.data.settings import CommonVoiceSettings

    s = CommonVoiceSettings.from_settings(parse_settings(args.settings))
    cv = s.common_voice
    if not cv.release_dir:
        raise SystemExit(
            "config key data.common_voice.release_dir is not set: point it at the extracted "
            "cv-corpus-12.0-2022-12-07 directory"
        )
    report = build_common_voice(
        Path(args.out_dir),
        Path(cv.release_dir),
        cv.max_hours_per_language,
        cv.seed,
        _optional_path(cv.utterance_list),
        _optional_path(cv.durations),
        s.on_bad_audio,
        args.threads,
    )
    log.info(
        "Common Voice (%s): %d utterances in %d languages, %d skipped",
        report["mode"],
        report["utterances"],
        len(report["languages"]),
        len(report["skipped"]),
    )


def cmd_data_combine(args: argparse.Namespace) -> None:
    from speechllm.data.common_voice import combine_manifests

    n = combine_manifests([Path(m) for m in args.manifests], Path(args.out))
    log.info("%s: %d utterances from %d manifests", args.out, n, len(args.manifests))


def cmd_data_librispeech(args: argparse.Namespace) -> None:
    from speechllm.data.librispeech import build_librispeech
    from speechllm.data.settings import LibriSpeechSettings

    s = LibriSpeechSettings.from_settings(parse_settings(args.settings))
    ls = s.librispeech
    report = build_librispeech(
        Path(args.out_dir),
        ls.dataset,
        ls.revision,
        ls.config,
        ls.splits,
        ls.max_duration,
        s.on_bad_audio,
        args.cache_dir,
    )
    log.info("LibriSpeech: %s", report["subsets"])


def cmd_data_articles(args: argparse.Namespace) -> None:
    from speechllm.data import articles
    from speechllm.data.settings import ArticlesSettings
    from speechllm.data.tts import make_tts, voice_for

    s = ArticlesSettings.from_settings(parse_settings(args.settings))
    a = s.articles
    if a.source == "demo":
        from speechllm.demo.corpus import demo_articles

        items = demo_articles()
    else:
        items = articles.hub_articles(
            a.dataset, a.config, a.split, a.revision, a.max_chars, a.max_articles, args.cache_dir
        )
    tts = make_tts(s.tts.backend, s.sampling_rate, s.tts.words_per_minute)
    n = articles.build_articles(
        Path(args.out_dir),
        items,
        tts,
        voice_for(s.tts.voices, a.voice),
        s.sampling_rate,
        a.segmentation,
        a.pause_seconds,
        args.threads,
    )
    log.info("spoken articles (%s): %d", a.source, n)


def cmd_data_speechglue(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_speechglue_released, build_speechglue_tts
    from speechllm.data.settings import SpeechGlueSettings
    from speechllm.data.tts import make_tts, voice_for

    s = SpeechGlueSettings.from_settings(parse_settings(args.settings))
    glue = s.speechglue
    if glue.source == "released":
        if not glue.release_dir:
            raise SystemExit(
                "config key data.speechglue.release_dir is not set (data.speechglue.source: released)"
            )
        counts = build_speechglue_released(
            Path(args.out_dir), Path(glue.release_dir), glue.tasks, s.sampling_rate
        )
        log.info("SpeechGLUE (released audio): %s", counts)
        return
    if glue.dataset is None:
        raise ValueError("settings key data.speechglue.dataset: missing (data.speechglue.source: tts)")
    tts = make_tts(s.tts.backend, s.sampling_rate, s.tts.words_per_minute)
    counts = build_speechglue_tts(
        Path(args.out_dir),
        glue.tasks,
        tts,
        voice_for(s.tts.voices, "en_us"),
        s.sampling_rate,
        glue.dataset,
        args.threads,
        glue.revision,
    )
    log.info("SpeechGLUE (TTS): %s", counts)


def cmd_data_speechxnli(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_speechxnli_released, build_speechxnli_tts, extract_archive
    from speechllm.data.settings import SpeechXnliSettings
    from speechllm.data.tts import make_tts

    s = SpeechXnliSettings.from_settings(parse_settings(args.settings))
    xnli = s.speechxnli
    if xnli.source == "released":
        if xnli.release_dir:
            release = Path(xnli.release_dir)
        elif args.archive:
            release = extract_archive(Path(args.archive), Path(args.out_dir) / "audio" / "speechxnli_release")
        else:
            raise SystemExit(
                "data.speechxnli.source is released but neither data.speechxnli.release_dir nor "
                "--archive (the zenodo speech_xnli.tar.gz) is given"
            )
        n = build_speechxnli_released(
            Path(args.out_dir),
            release,
            xnli.languages,
            xnli.dataset,
            s.sampling_rate,
            xnli.revision,
            args.cache_dir,
        )
        log.info("SpeechXNLI (released audio): %d examples", n)
        return
    tts = make_tts(s.tts.backend, s.sampling_rate, s.tts.words_per_minute)
    n = build_speechxnli_tts(
        Path(args.out_dir),
        xnli.languages,
        tts,
        s.tts.voices,
        s.sampling_rate,
        xnli.dataset,
        args.threads,
        xnli.revision,
    )
    log.info("SpeechXNLI (TTS): %d examples", n)


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from speechllm.data.hub import fetch_url

    n = fetch_url(args.url, Path(args.out), args.timeout)
    log.info("%s: %d bytes from %s", args.out, n, args.url)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from speechllm.data.prepare import prepare_split
    from speechllm.data.settings import PrepareSettings

    s = PrepareSettings.from_settings(parse_settings(args.settings))
    report = prepare_split(
        Path(args.manifest),
        Path(args.out),
        Path(args.report),
        s.sampling_rate,
        s.min_duration,
        s.max_duration,
        s.speed_perturb,
        s.on_bad_audio,
        filter_durations=s.filter_durations,
    )
    log.info("%s: %s", args.out, report["counts"])


def cmd_data_language_ids(args: argparse.Namespace) -> None:
    from speechllm.data.prepare import language_ids

    log.info("language ids: %s", language_ids([Path(m) for m in args.manifests], Path(args.out)))


def register(sub: argparse._SubParsersAction) -> None:
    data = add_command(sub, "data", "build and prepare manifests", epilog=EXAMPLES["data"])
    dsub = data.add_subparsers(dest="action", required=True)
    d = add_command(
        dsub,
        "demo",
        "speak the embedded demo corpus and task sets with TTS",
        cmd_data_demo,
        epilog=example(
            'speechllm data demo --settings "$(cat settings.json)" --out-dir resources/demo --threads 2'
        ),
    )
    d.add_argument("--settings", required=True)
    d.add_argument("--out-dir", required=True)
    d.add_argument("--threads", type=int, default=1)
    sources = (  # name, function, help, whether it has workers (TTS, audio conversion) to spread over threads
        (
            "fleurs",
            cmd_data_fleurs,
            "FLEURS from the hub's parquet conversion (or a local copy of it)",
            False,
        ),
        (
            "common-voice",
            cmd_data_common_voice,
            "Common Voice 12 subsample from a local release directory",
            True,
        ),
        (
            "librispeech",
            cmd_data_librispeech,
            "LibriSpeech 960 h (summarization experiment), long clips dropped",
            False,
        ),
        (
            "articles",
            cmd_data_articles,
            "spoken articles + reference summaries (summarization evaluation)",
            True,
        ),
        (
            "speechglue",
            cmd_data_speechglue,
            "SpeechGLUE sets: released speechGLUE audio or voiced with TTS",
            True,
        ),
        ("speechxnli", cmd_data_speechxnli, "SpeechXNLI set: released zenodo audio or voiced with TTS", True),
    )
    for name, func, text, threaded in sources:
        out_dir = (
            "resources"
            if name in ("speechglue", "speechxnli", "articles")
            else f"resources/{name.replace('-', '_')}"
        )
        d = add_command(
            dsub,
            name,
            text,
            func,
            epilog=example(
                f'speechllm data {name} --settings "$(cat settings.json)" --out-dir {out_dir}'
                + (" --threads 4" if threaded else "")
            ),
        )
        d.add_argument("--settings", required=True)
        d.add_argument("--out-dir", required=True)
        if threaded:
            d.add_argument("--threads", type=int, default=1, help="worker threads")
        d.add_argument("--cache-dir", default=None, help="datasets cache (default: the HF_DATASETS_CACHE)")
        if name == "speechxnli":
            d.add_argument("--archive", default=None, help="speech_xnli.tar.gz to unpack (source: released)")
    d = add_command(
        dsub,
        "combine",
        "concatenate utterance manifests (ids must be unique)",
        cmd_data_combine,
        epilog=example(
            "speechllm data combine --manifests resources/fleurs/train.jsonl "
            "resources/common_voice/train.jsonl --out resources/hub/train.jsonl"
        ),
    )
    d.add_argument("--manifests", nargs="+", required=True)
    d.add_argument("--out", required=True)
    d = add_command(
        dsub,
        "fetch",
        "download a released file (e.g. from zenodo) atomically",
        cmd_data_fetch,
        epilog=example(
            "speechllm data fetch --url 'https://zenodo.org/records/10900287/files/"
            "speech_xnli.tar.gz?download=1' "
            "--out resources/zenodo/speech_xnli.tar.gz --timeout 60"
        ),
    )
    d.add_argument("--url", required=True)
    d.add_argument("--out", required=True)
    add_download_timeout(d)
    d = add_command(
        dsub,
        "prepare",
        "check audio, normalise text, filter durations, speed-perturb",
        cmd_data_prepare,
        epilog=EXAMPLES["data"],
    )
    d.add_argument("--settings", required=True)
    d.add_argument("--manifest", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--report", required=True)
    d = add_command(
        dsub,
        "language-ids",
        "language-ID labels (1..N, 0 = blank) from the training and dev manifests",
        cmd_data_language_ids,
        epilog=example(
            "speechllm data language-ids --manifests results/data/train.jsonl "
            "results/data/dev.jsonl --out results/data/language_ids.json"
        ),
    )
    d.add_argument("--manifests", nargs="+", required=True)
    d.add_argument("--out", required=True)
