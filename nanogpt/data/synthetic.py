"""Seeded text in several scripts, for tests and benchmarks of the data pipeline (no download needed).

Each language has a lexicon of made-up words built from its own syllables, drawn with Zipf-like
frequencies into sentences and paragraphs: Latin with diacritics, Cyrillic, Greek, Chinese (no spaces
between words), Japanese kana, and emoji. Not language, but with the statistics a tokenizer cares about:
many distinct multi-byte characters, repeated words, punctuation, numbers and newlines.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

SYLLABLES = {
    "latin": "ka lo mé ré sü ßa ło żu ña çi pa to vi dé an er ch qu äl øn".split(),
    "cyrillic": "ка ло ми ре сы жа щу ён да ти по ва не ру хо бь эт юг".split(),
    "greek": "κα λο μή ρε σύ ζα ξι ψω δα τι πο βα νε ρυ χο θέ γι ες".split(),
    "chinese": list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"),
    "kana": list("あいうえおかきくけこさしすせそたちつてとなにぬねのアイウエオカキ"),
    "emoji": ["😀", "🎉", "👍🏽", "🇫🇷", "❤️", "🚀", "👩‍💻", "🌍"],
}
SPACED = {"latin", "cyrillic", "greek", "emoji"}  # words separated by spaces; the others run together
STOP = {"latin": ".", "cyrillic": ".", "greek": ";", "chinese": "。", "kana": "。", "emoji": "!"}


def _lexicon(language: str, rng: random.Random, size: int = 2000) -> list[str]:
    syllables = SYLLABLES[language]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(size)]


def paragraph(language: str, rng: random.Random, words: list[str], cum_weights: list[float]) -> str:
    """A few sentences of `language`: words by Zipf weight (cumulated), a number now and then, a stop at the end."""
    join = " " if language in SPACED else ""
    sentences = []
    for _ in range(rng.randint(1, 5)):
        sentence = rng.choices(words, cum_weights=cum_weights, k=rng.randint(3, 15))
        if rng.random() < 0.2:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 99_999)))
        sentences.append(join.join(sentence).capitalize() + STOP[language])
    return join.join(sentences) + "\n"


def documents(seed: int, languages: tuple[str, ...] = tuple(SYLLABLES)) -> Iterator[tuple[str, str]]:
    """An endless stream of (language, document) of 1 to 20 paragraphs each, the languages in turn
    (paragraphs drawn from 1000 made per language: fast enough for hundreds of MB)."""
    rng = random.Random(seed)
    cum_weights = list(
        itertools.accumulate(1 / (rank + 1) for rank in range(2000))
    )  # summed once, not per draw
    made = {}
    for lang in languages:
        lexicon = _lexicon(lang, rng)
        made[lang] = [paragraph(lang, rng, lexicon, cum_weights) for _ in range(1000)]
    while True:
        for lang in languages:
            yield lang, "".join(rng.choices(made[lang], k=rng.randint(1, 20)))


def write_corpus(folder: str | Path, total_bytes: int, seed: int = 0, docs_per_file: int = 50) -> list[Path]:
    """Files of `docs_per_file` documents each under `folder`, about `total_bytes` of UTF-8 in all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stream, written, paths = documents(seed), 0, []
    while written < total_bytes:
        text = "\n".join(doc for _, (_, doc) in zip(range(docs_per_file), stream, strict=False))
        path = folder / f"doc{len(paths):05d}.txt"
        path.write_text(text, encoding="utf-8")
        written += path.stat().st_size
        paths.append(path)
    return paths
