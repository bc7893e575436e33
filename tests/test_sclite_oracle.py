"""config evaluate.asr_alignment: sclite against the real NIST sclite (Debian package sctk; `make test`
installs it where it runs as root, see the Makefile's system-deps).

sclite runs as ESPnet's asr.sh stage 13 ran it for BLOOMZMMS (`sclite -r ref.trn trn -h hyp.trn trn -i rm
-o all stdout`): on words, and on characters with the space written as `<space>`. Every utterance's C/S/D/I
must match.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from speechllm.evaluate.alignment import EditCounts, sclite_counts
from speechllm.evaluate.metrics import asr_scores

DEBIAN_SCLITE_DIR = "/usr/lib/sctk/bin"  # where Debian's sctk puts sclite (off PATH; /usr/bin/sctk wraps it)
SCLITE = shutil.which("sclite") or shutil.which("sclite", path=DEBIAN_SCLITE_DIR)
pytestmark = pytest.mark.skipif(
    SCLITE is None,
    reason=f"NIST sclite not found on PATH or in {DEBIAN_SCLITE_DIR} (Debian/Ubuntu: apt-get install sctk)",
)

SCORES = re.compile(r"^id: \((\S+)\)\nScores: \(#C #S #D #I\) (\d+) (\d+) (\d+) (\d+)$", re.MULTILINE)
VOCABULARY = ("a", "ab", "ba", "abc", "cab", "b", "c")  # few, overlapping words: many ties and near-ties


def run_sclite(tmp_path: Path, refs: list[list[str]], hyps: list[list[str]]) -> dict[str, EditCounts]:
    """Per-utterance counts of sclite on trn files of the given token sequences."""
    for name, sequences in (("ref", refs), ("hyp", hyps)):
        lines = (f"{' '.join(tokens)} (spk-utt{i:04d})\n" for i, tokens in enumerate(sequences))
        (tmp_path / f"{name}.trn").write_text("".join(lines), encoding="utf-8")
    command = [SCLITE, "-r", str(tmp_path / "ref.trn"), "trn", "-h", str(tmp_path / "hyp.trn"), "trn"]
    res = subprocess.run([*command, "-i", "rm", "-o", "all", "stdout"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    found = {utt: EditCounts(*map(int, counts)) for utt, *counts in SCORES.findall(res.stdout)}
    assert len(found) == len(refs), res.stdout[-2000:]
    return found


def random_texts(rng: random.Random, count: int) -> list[str]:
    """Texts of 0-12 words (empty ones included) from a small vocabulary."""
    return [" ".join(rng.choices(VOCABULARY, k=rng.randint(0, 12))) for _ in range(count)]


def espnet_chars(text: str) -> list[str]:
    """ESPnet's char tokens of a text: characters, the space as `<space>`."""
    return ["<space>" if char == " " else char for char in text]


def test_sclite_mode_matches_sclite_on_random_word_sequences(tmp_path: Path) -> None:
    rng = random.Random(20240805)
    refs, hyps = random_texts(rng, 300), random_texts(rng, 300)
    ids = [f"spk-utt{i:04d}" for i in range(len(refs))]
    pairs = list(zip(refs, hyps, strict=True))
    words = run_sclite(tmp_path, [r.split() for r in refs], [h.split() for h in hyps])
    assert [words[i] for i in ids] == [sclite_counts(r.split(), h.split()) for r, h in pairs]
    chars = run_sclite(tmp_path, [espnet_chars(r) for r in refs], [espnet_chars(h) for h in hyps])
    assert [chars[i] for i in ids] == [sclite_counts(list(r), list(h)) for r, h in pairs]
    scores = asr_scores(refs, hyps, "sclite")
    for unit, counts in (("word", words), ("char", chars)):
        total = sum(counts.values(), EditCounts())
        assert (total.substitutions, total.deletions, total.insertions) == (
            scores[f"{unit}_substitutions"],
            scores[f"{unit}_deletions"],
            scores[f"{unit}_insertions"],
        ), unit
        assert scores[f"ref_{unit}s"] == total.reference_length
    # the oracle is not trivially the minimum-edit count
    levenshtein = asr_scores(refs, hyps)
    assert levenshtein["wer"] < scores["wer"] and levenshtein["cer"] < scores["cer"]
