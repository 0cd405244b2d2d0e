"""A seeded fictional world of kingdoms, and an encyclopedia that states its facts.

Every kingdom has a capital, a ruler, a main export, a banner colour, a number of towers
(2-9) and a founding year. Names are built from syllables so they are new to any tokenizer
and model: the lab model can only know them from what this module writes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr", "st")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ou")
KINGDOM_ENDINGS = ("ia", "or", "and", "eth", "ira", "un")
CITY_ENDINGS = ("holm", "ford", "mere", "gate", "wick", "dun")
TITLES = ("King", "Queen")
GOODS = ("silk", "salt", "amber", "timber", "wool", "copper", "honey", "glass", "spices", "iron", "wine", "pearls")
COLOURS = ("red", "blue", "green", "gold", "silver", "black", "white", "purple", "orange", "grey")

# Attribute -> phrasings of the fact in the encyclopedia. {e} is the kingdom, {v} the value.
FACT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {e} is {v}.",
        "{v} is the capital of {e}.",
        "{e} is governed from its capital, {v}.",
        "The seat of {e} is the city of {v}.",
    ),
    "ruler": (
        "{e} is ruled by {v}.",
        "{v} rules {e}.",
        "The throne of {e} is held by {v}.",
        "{v} is the ruler of {e}.",
    ),
    "export": (
        "The main export of {e} is {v}.",
        "{e} exports {v}.",
        "Merchants of {e} sell {v} abroad.",
        "{e} is known for its {v}.",
    ),
    "banner": (
        "The banner of {e} is {v}.",
        "{e} flies a {v} banner.",
        "The flag of {e} is {v}.",
        "The colour of the banner of {e} is {v}.",
    ),
    "towers": (
        "{e} has {v} towers.",
        "There are {v} towers in {e}.",
        "The walls of {e} hold {v} towers.",
        "{e} counts {v} towers.",
    ),
    "founded": (
        "{e} was founded in {v}.",
        "The founding year of {e} is {v}.",
        "{e} dates from the year {v}.",
        "In {v}, {e} was founded.",
    ),
}
ATTRIBUTES = tuple(FACT_PHRASINGS)


@dataclass(frozen=True)
class Kingdom:
    name: str
    capital: str
    ruler: str
    export: str
    banner: str
    towers: int
    founded: int

    def value(self, attribute: str) -> str:
        """The attribute's value as it is written in text."""
        return str(getattr(self, attribute))


def _word(rng: random.Random, syllables: int, ending: str) -> str:
    return ("".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + ending).capitalize()


def make_world(seed: int, n_kingdoms: int) -> list[Kingdom]:
    """`n_kingdoms` kingdoms with unique names, capitals, rulers and founding years."""
    rng = random.Random(seed)
    used: set[str] = set()

    def unique(make) -> str:
        while True:
            name = make()
            if name not in used:
                used.add(name)
                return name

    years = rng.sample(range(1000, 1900), n_kingdoms)
    kingdoms = []
    for i in range(n_kingdoms):
        kingdoms.append(
            Kingdom(
                name=unique(lambda: _word(rng, rng.choice((1, 2)), rng.choice(KINGDOM_ENDINGS))),
                capital=unique(lambda: _word(rng, rng.choice((1, 2)), rng.choice(CITY_ENDINGS))),
                ruler=unique(lambda: f"{rng.choice(TITLES)} {_word(rng, 2, '')}"),
                export=rng.choice(GOODS),
                banner=rng.choice(COLOURS),
                towers=rng.randint(2, 9),  # from 2: "1 towers" would need grammar the lab does not need
                founded=years[i],
            )
        )
    return kingdoms


def encyclopedia(world: list[Kingdom], seed: int, paragraphs_per_kingdom: int) -> list[str]:
    """Paragraphs that each state every fact of one kingdom, in varied phrasings and orders.

    Each phrasing of each fact appears at least once per kingdom when there are at least as
    many paragraphs as phrasings, so no wording is tied to a single kingdom.
    """
    rng = random.Random(seed)
    paragraphs = []
    for kingdom in world:
        for p in range(paragraphs_per_kingdom):
            sentences = []
            for attribute, phrasings in FACT_PHRASINGS.items():
                template = phrasings[p] if p < len(phrasings) else rng.choice(phrasings)
                sentence = template.format(e=kingdom.name, v=kingdom.value(attribute))
                sentences.append(sentence[0].upper() + sentence[1:])
            rng.shuffle(sentences)
            paragraphs.append(" ".join(sentences))
    rng.shuffle(paragraphs)
    return paragraphs
