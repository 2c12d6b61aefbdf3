"""A deterministic synthetic English-like corpus and the word-level tokenizer that covers it.

Why: the package ships a small Switch model that has *learned* something, so that compressing
it visibly costs loss, and tests and demos need data for it without any download. The text is
generated here from invented vocabularies and grammars: nine topics (cooking, astronomy, sports,
arithmetic, weather, inventory, family, animals, travel), each with its own words and sentence
templates, so MoE experts have something to specialise on; and rules a small encoder-decoder can
pick up under T5 span corruption: singular/plural agreement ("1 onion" / "3 onions", "there is"
/ "there are", "a fox eats" / "foxes eat"), "a" / "an", names introduced and then repeated,
numbers that follow rules (sums, tables, counting, score tallies, dates), fixed world facts.

Determinism: the same `CorpusSpec` gives byte-identical text on every machine and Python version.
Randomness comes from `_Rng` (splitmix64 on plain Python integers, never `random` or numpy),
each document's seed is derived by sha256 from (seed, stream, index), and nothing iterates over
a set or relies on any order other than that of tuples and dict insertion.

The tokenizer's vocabulary is enumerated from the template literals and word lists below (not by
scanning generated text), sorted, and laid out the T5 way: `<pad>`=0, `</s>`=1, `<unk>`=2, the
words, then `<extra_id_99>` ... `<extra_id_0>` so that `<extra_id_0>` is the highest id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

_T = TypeVar("_T")

STREAMS: tuple[str, ...] = ("train", "calibration", "validation")
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: the T5 layout
NUM_SENTINELS = 100
MAX_SENTENCE_WORDS = 40  # every template fills to at most this many words; the composer relies on it
_MIN_PARAGRAPH_WORDS = 20
_MASK64 = (1 << 64) - 1


def sentinel(i: int) -> str:
    """The i-th T5 span-corruption sentinel, `<extra_id_i>`; its id is vocab_size - 1 - i."""
    return f"<extra_id_{i}>"


class _Rng:
    """splitmix64 (Vigna) on Python integers: tiny, fast enough, identical everywhere.

    A library PRNG could change its algorithm between versions and silently change the corpus;
    this one is fixed by the test vector in tests/test_corpus.py.
    """

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK64

    def next_u64(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform in [0, n). Rejection keeps it exactly uniform (plain modulo favours small values)."""
        if n <= 0:
            raise ValueError(f"below(n) needs n >= 1, got {n}")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self.next_u64()
            if x < limit:
                return x % n

    def between(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi], both ends included."""
        return lo + self.below(hi - lo + 1)

    def chance(self, permille: int) -> bool:
        """True with probability permille / 1000 (integers, so no float rounding can differ)."""
        return self.below(1000) < permille

    def choice(self, items: Sequence[_T]) -> _T:
        return items[self.below(len(items))]

    def sample(self, items: Iterable[_T], k: int) -> list[_T]:
        """k distinct items in random order: a partial Fisher-Yates shuffle."""
        pool = list(items)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def shuffled(self, items: Iterable[_T]) -> list[_T]:
        pool = list(items)
        return self.sample(pool, len(pool))


# ------------------------------------------------------------------------------ grammar helpers

Noun = tuple[str, str]  # (singular, plural)
Verb = tuple[str, str]  # (base form, third person singular)


def _nouns(spec: str) -> tuple[Noun, ...]:
    """'potato:potatoes egg' -> (('potato', 'potatoes'), ('egg', 'eggs')): regular plurals add s."""
    pairs = []
    for item in spec.split():
        singular, _, plural = item.partition(":")
        if not plural and (singular.endswith(("s", "x", "z", "ch", "sh")) or
                           (singular.endswith("y") and singular[-2] not in "aeiou")):
            # "wrenchs", "cherrys": such words must spell their plural out.
            raise ValueError(f"irregular plural of {singular!r} must be given as {singular}:PLURAL")
        pairs.append((singular, plural or singular + "s"))
    return tuple(pairs)


_verbs = _nouns  # same notation: 'fly:flies run' -> (base, third person singular)


def _flat(*groups: Iterable[str | tuple[str, ...]]) -> tuple[str, ...]:
    """Flatten word lists and (singular, plural) pairs into one lexicon tuple."""
    out: list[str] = []
    for group in groups:
        for item in group:
            out.extend(item if isinstance(item, tuple) else (item,))
    return tuple(out)


def _form(n: int, noun: Noun) -> str:
    """The noun form agreeing with n: singular only for exactly one."""
    return noun[0] if n == 1 else noun[1]


def _count(n: int, noun: Noun) -> str:
    """'no eggs', '1 egg', '3 eggs'."""
    return f"no {noun[1]}" if n == 0 else f"{n} {_form(n, noun)}"


def _a(phrase: str) -> str:
    """Indefinite article by spelling; the word lists avoid 'u' words that sound like 'you'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(items: Sequence[str]) -> str:
    """'x', 'x and y', 'x , y and z' (spaced punctuation; attached when rendered)."""
    if len(items) == 1:
        return items[0]
    return " , ".join(items[:-1]) + " and " + items[-1]


def _say(templates: Mapping[str, str], key: str, **slots: object) -> str:
    """Fill one template; unused slots are ignored so callers can pass a shared slot dict."""
    return templates[key].format(**slots)


# Words shared by all topics: the fillers the helpers above insert, and the people and places.
_GLUE = ("a", "an", "no", "and", ",", ".")
_FEMALE = tuple("ada alma anna bea cora dina edna ella fay gina hana ida iris jana kira lena lila "
                "mara mila nina nora olga pia rosa sara tara una vera wanda zara".split())
_MALE = tuple("abel amos ben bram carl dario eli emil finn gus hugo ivan jonas karl leon luca milo "
              "nils otto pablo rafe sven teo timo ugo vito walt yuri zeno oskar".split())
_NAMES = _FEMALE + _MALE
_TOWNS = tuple("amberly brenmoor calder dunmere elford fenwick glenby holbrook irwell jarrow kelby "
               "larkin morrow norby pendle redcliff".split())
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SHARED_LEXICON = _flat(_GLUE, _NAMES, _TOWNS, _WEEKDAYS, ("she", "he"))


def _pronoun(name: str) -> str:
    return "she" if name in _FEMALE else "he"


# ------------------------------------------------------------------------------------- cooking

_COOKING_T = {
    "intro": "to make {dish} you need {items} .",
    "serves": "this recipe serves {people} .",
    "prep": "{step} , {verb} the {thing} .",
    "add": "{step} , add the {mass} .",
    "mix": "{step} , mix the {mass} with the {other} .",
    "oven": "{step} , heat the oven to {degrees} degrees .",
    "bake": "{step} , bake the {dish} for {minutes} .",
    "cook": "{step} , {verb} the {thing} for {minutes} .",
    "serve": "serve the {dish} {temp} .",
    "taste": "the {dish} tastes {adj} .",
    "keeps": "the {dish} keeps for {days} .",
}
_VEG = _nouns("onion carrot potato:potatoes tomato:tomatoes pepper bean mushroom leek pumpkin "
              "cucumber olive turnip")
_FRUIT = _nouns("apple lemon pear plum banana cherry:cherries peach:peaches orange apricot "
                "strawberry:strawberries")
_SAVORY_DISHES = ("soup", "stew", "curry", "salad", "omelette", "risotto", "sauce", "casserole")
_SWEET_DISHES = ("cake", "tart", "pudding", "jam", "crumble", "pie")
# Each mass ingredient has one fixed measure, so "grams of flour" but "cups of milk" is learnable.
_MASS_UNIT = {"flour": "grams", "sugar": "grams", "butter": "grams", "rice": "grams",
              "cheese": "grams", "oats": "grams", "milk": "cups", "cream": "cups",
              "water": "cups", "yogurt": "cups", "oil": "spoons", "honey": "spoons",
              "vinegar": "spoons", "salt": "pinch", "cinnamon": "pinch", "ginger": "pinch"}
_SAVORY_MASS = ("rice", "cheese", "butter", "water", "oil", "vinegar", "salt", "ginger")
_SWEET_MASS = ("flour", "sugar", "butter", "oats", "milk", "cream", "yogurt", "honey", "cinnamon")
_CUP, _SPOON, _MINUTE, _DAY, _PERSON = _nouns("cup spoon minute day person:people")
_PREP = ("chop", "slice", "peel", "wash", "dice", "grate", "mash")
_COOK = ("fry", "boil", "roast", "steam", "grill", "simmer")
_THEN = ("then", "next", "after that")
_SERVE_TEMPS = ("warm", "hot", "cold")
_TASTES = ("sweet", "rich", "fresh", "spicy", "soft", "creamy", "crisp", "light")
_COOKING_LEXICON = _flat(_VEG, _FRUIT, _SAVORY_DISHES, _SWEET_DISHES, _MASS_UNIT,
                         ("grams", "of", "pinch", "first", "finally"),
                         (_CUP, _SPOON, _MINUTE, _DAY, _PERSON), _PREP, _COOK, _THEN,
                         _SERVE_TEMPS, _TASTES)


def _measure(rng: _Rng, mass: str) -> str:
    """'200 grams of flour', '1 cup of milk', 'a pinch of salt': the unit is fixed per mass."""
    unit = _MASS_UNIT[mass]
    if unit == "grams":
        return f"{50 * rng.between(1, 10)} grams of {mass}"
    if unit == "cups":
        return f"{_count(rng.between(1, 3), _CUP)} of {mass}"
    if unit == "spoons":
        return f"{_count(rng.between(1, 4), _SPOON)} of {mass}"
    return f"a pinch of {mass}"


def _recipe(rng: _Rng) -> Iterator[str]:
    """One recipe: ingredient list, then steps that repeat those ingredients and counts."""
    sweet = rng.chance(500)
    produce = rng.sample(_FRUIT if sweet else _VEG, rng.between(1, 3))
    counts = [rng.between(1, 6) for _ in produce]
    masses = rng.sample(_SWEET_MASS if sweet else _SAVORY_MASS, rng.between(1, 3))
    dish = f"{produce[0][0]} {rng.choice(_SWEET_DISHES if sweet else _SAVORY_DISHES)}"
    items = [_count(n, noun) for n, noun in zip(counts, produce)] + [_measure(rng, m) for m in masses]
    yield _say(_COOKING_T, "intro", dish=_a(dish), items=_listing(items))
    if rng.chance(400):
        yield _say(_COOKING_T, "serves", people=_count(rng.between(1, 8), _PERSON))
    steps: list[tuple[str, dict[str, object]]] = [
        ("prep", {"verb": rng.choice(_PREP), "thing": _form(n, noun)}) for n, noun in zip(counts, produce)]
    if len(masses) >= 2:
        steps.append(("mix", {"mass": masses[0], "other": masses[1]}))
    rest = masses[2:] if len(masses) >= 2 else masses  # two masses are mixed, any others added
    steps += [("add", {"mass": m}) for m in rest]
    if sweet:
        steps.append(("oven", {"degrees": 10 * rng.between(16, 22)}))
        steps.append(("bake", {"dish": dish, "minutes": _count(5 * rng.between(4, 12), _MINUTE)}))
    else:
        steps.append(("cook", {"verb": rng.choice(_COOK), "thing": _form(counts[0], produce[0]),
                               "minutes": _count(rng.between(1, 30), _MINUTE)}))
    for i, (key, slots) in enumerate(steps):
        step = "first" if i == 0 else "finally" if i == len(steps) - 1 else rng.choice(_THEN)
        yield _say(_COOKING_T, key, step=step, **slots)
    for key in rng.sample(("serve", "taste", "keeps"), rng.between(1, 2)):
        yield _say(_COOKING_T, key, dish=dish, temp=rng.choice(_SERVE_TEMPS),
                   adj=rng.choice(_TASTES), days=_count(rng.between(1, 5), _DAY))


def _cooking(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _recipe(rng)


# ----------------------------------------------------------------------------------- astronomy

_ASTRONOMY_T = {
    "star": "{star} is {kind} star .",
    "count": "{star} has {planets} .",
    "names": "the planets of {star} are {names} .",
    "only": "the only planet of {star} is {planet} .",
    "type": "{planet} is {kind} planet .",
    "distance": "{planet} is {d} units from {star} .",
    "year": "{planet} takes {days} days to go around {star} .",
    "moons": "{planet} has {moons} .",
    "moon_name": "the largest moon of {planet} is called {moon} .",
    "surface": "the surface of {planet} is {temp} .",
    "closer": "{near} is closer to {star} than {far} , so {near} has a shorter year .",
    "farther": "{far} is farther from {star} than {near} , so {far} is colder .",
    "closest": "{near} is the closest planet to {star} .",
    "farthest": "{far} is the farthest planet from {star} .",
    "sky": "from {planet} , {star} looks {color} .",
    "comet": "a comet passes {star} every {years} years .",
}
_STARS = tuple("altor belan corvo dessa elnar fenri galen hyra istra jorun kelda lumis morva nerin "
               "orsa pellan".split())
_PLANETS = tuple("arvo bex calda dorn emra fyl gorra hesk imra jull kest lorn mibu nox opal pry "
                 "quen rask sull tev ulm vosk wren yarl".split())
_MOON_NAMES = tuple("ilo tama ves keru anik sorra dulo femi runa lito".split())
_STAR_COLORS = ("red", "blue", "white", "yellow", "orange")
_STAR_SIZES = ("small", "large", "bright", "dim", "young", "old")
_PLANET_KINDS = ("rocky", "icy", "gas", "ocean", "desert")
_PLANET, _MOON = _nouns("planet moon")
_ASTRONOMY_LEXICON = _flat(_STARS, _PLANETS, _MOON_NAMES, _STAR_COLORS, _STAR_SIZES, _PLANET_KINDS,
                           (_PLANET, _MOON), ("hot", "mild", "frozen"))


def _planet_facts(rng: _Rng, star: str, planet: str, d: int, moons: Sequence[str]) -> Iterator[str]:
    """Two to five facts about one planet; the year is 30 days per unit of distance (a rule)."""
    slots = {"star": star, "planet": planet, "d": d, "days": 30 * d,
             "kind": _a(rng.choice(_PLANET_KINDS)), "moons": _count(len(moons), _MOON),
             "temp": "hot" if d <= 4 else "mild" if d <= 10 else "frozen"}
    keys = ["type", "distance", "year", "moons", "surface"]
    for key in sorted(rng.sample(keys, rng.between(2, 5)), key=keys.index):
        yield _say(_ASTRONOMY_T, key, **slots)
        if key == "moons" and moons:
            yield _say(_ASTRONOMY_T, "moon_name", planet=planet, moon=moons[0])


def _star_system(rng: _Rng) -> Iterator[str]:
    star, color = rng.choice(_STARS), rng.choice(_STAR_COLORS)
    n = rng.between(1, 5)
    planets = rng.sample(_PLANETS, n)
    dists = sorted(rng.sample(range(1, 21), n))  # listed from the star outwards
    yield _say(_ASTRONOMY_T, "star", star=star, kind=_a(f"{rng.choice(_STAR_SIZES)} {color}"))
    yield _say(_ASTRONOMY_T, "count", star=star, planets=_count(n, _PLANET))
    if n == 1:
        yield _say(_ASTRONOMY_T, "only", star=star, planet=planets[0])
    else:
        yield _say(_ASTRONOMY_T, "names", star=star, names=_listing(planets))
    for planet, d in zip(planets, dists):
        yield from _planet_facts(rng, star, planet, d, rng.sample(_MOON_NAMES, rng.between(0, 4)))
    if n >= 2:
        i, j = sorted(rng.sample(range(n), 2))
        for key in rng.sample(("closer", "farther"), rng.between(1, 2)):
            yield _say(_ASTRONOMY_T, key, star=star, near=planets[i], far=planets[j])
        ends = {"star": star, "near": planets[0], "far": planets[-1]}
        yield _say(_ASTRONOMY_T, rng.choice(("closest", "farthest")), **ends)
    if rng.chance(500):
        yield _say(_ASTRONOMY_T, "sky", planet=rng.choice(planets), star=star, color=color)
    if rng.chance(300):
        yield _say(_ASTRONOMY_T, "comet", star=star, years=rng.between(3, 90))


def _astronomy(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _star_system(rng)


# -------------------------------------------------------------------------------------- sports

_SPORTS_T = {
    "league": "{n} teams play in the {league} league this season .",
    "teams": "the teams are {teams} .",
    "roster": "{players} play for the {team} .",
    "week": "in week {week} , the {home} played the {away} .",
    "win": "the {winner} beat the {loser} {a} to {b} .",
    "draw": "the {home} and the {away} drew {a} to {a} .",
    "goal": "{player} scored {goals} for the {team} .",
    "points": "the {team} now have {points} .",
    "tally": "{player} has scored {goals} this season .",
    "lead": "after week {week} , the {team} lead the league with {points} .",
    "share": "after week {week} , {teams} share the lead with {points} .",
}
_CLUB_PLACES = tuple("harbor river hill lake stone pine oak iron bay cedar frost sand".split())
_MASCOTS = tuple("hawks bears wolves foxes lions tigers eagles sharks bulls owls falcons rams "
                 "otters badgers comets rockets".split())
_LEAGUES = ("valley", "coast", "county", "city", "island", "mountain")
_GOAL, _POINT = _nouns("goal point")
_SPORTS_LEXICON = _flat(_CLUB_PLACES, _MASCOTS, _LEAGUES, (_GOAL, _POINT), ("the",))


def _game(rng: _Rng, week: int, home: str, away: str, rosters: Mapping[str, Sequence[str]],
          points: dict[str, int], goals: dict[str, int]) -> Iterator[str]:
    """One game: result, the scorers (their goals add up to the score), updated points."""
    score = {home: rng.between(0, 5), away: rng.between(0, 5)}
    yield _say(_SPORTS_T, "week", week=week, home=home, away=away)
    if score[home] == score[away]:
        yield _say(_SPORTS_T, "draw", home=home, away=away, a=score[home])
        points[home] += 1
        points[away] += 1
    else:
        winner, loser = (home, away) if score[home] > score[away] else (away, home)
        yield _say(_SPORTS_T, "win", winner=winner, loser=loser, a=score[winner], b=score[loser])
        points[winner] += 3
    for team in (home, away):
        scored = Counter(rng.choice(rosters[team]) for _ in range(score[team]))
        for player in rosters[team]:
            if scored[player]:
                goals[player] += scored[player]
                yield _say(_SPORTS_T, "goal", player=player, team=team, goals=_count(scored[player], _GOAL))
        if rng.chance(500):
            yield _say(_SPORTS_T, "points", team=team, points=_count(points[team], _POINT))
    if rng.chance(200):
        player = rng.choice(rosters[rng.choice((home, away))])
        yield _say(_SPORTS_T, "tally", player=player, goals=_count(goals[player], _GOAL))


def _sports(rng: _Rng) -> Iterator[str]:
    teams = [f"{p} {m}" for p, m in zip(rng.sample(_CLUB_PLACES, 4), rng.sample(_MASCOTS, 4))]
    players = rng.sample(_NAMES, 12)
    rosters = {team: players[3 * i:3 * i + 3] for i, team in enumerate(teams)}
    points = {team: 0 for team in teams}
    goals = {player: 0 for player in players}
    yield _say(_SPORTS_T, "league", n=4, league=rng.choice(_LEAGUES))
    yield _say(_SPORTS_T, "teams", teams=_listing([f"the {t}" for t in teams]))
    for team in teams:
        if rng.chance(300):
            yield _say(_SPORTS_T, "roster", team=team, players=_listing(rosters[team]))
    week = 0
    while True:
        week += 1
        order = rng.shuffled(teams)
        for home, away in ((order[0], order[1]), (order[2], order[3])):
            yield from _game(rng, week, home, away, rosters, points, goals)
        best = max(points.values())
        leaders = [t for t in teams if points[t] == best]
        key = "lead" if len(leaders) == 1 else "share"
        yield _say(_SPORTS_T, key, week=week, team=leaders[0], points=_count(best, _POINT),
                   teams=_listing([f"the {t}" for t in leaders]))


# ---------------------------------------------------------------------------------- arithmetic

_ARITHMETIC_T = {
    "sums": "here are some sums .",
    "plus": "{a} plus {b} is {c} .",
    "minus": "{a} minus {b} is {c} .",
    "sum3": "the sum of {a} , {b} and {c} is {d} .",
    "table": "this is the table of {k} .",
    "times": "{a} times {b} is {c} .",
    "divided": "{a} divided by {b} is {c} .",
    "up": "counting up by {k} from {a} gives {seq} .",
    "down": "counting down by {k} from {a} gives {seq} .",
    "even": "{a} is an even number .",
    "odd": "{a} is an odd number .",
    "more": "{a} is more than {b} .",
    "less": "{a} is less than {b} .",
    "equal": "{a} is equal to {b} .",
    "after": "the number after {a} is {c} .",
    "before": "the number before {a} is {c} .",
    "double": "double {a} is {c} .",
    "half": "half of {a} is {c} .",
    "square": "{a} times {a} is {c} , so {c} is a square number .",
    "has": "{name} has {things} .",
    "gets": "{pron} gets {k} more , so now {name} has {things} .",
    "gives": "then {name} gives {k} away and has {things} left .",
}
_THINGS = _nouns("marble coin stamp shell sticker card button bead")
_ARITHMETIC_LEXICON = _flat(_THINGS)


def _lesson_sums(rng: _Rng) -> Iterator[str]:
    if rng.chance(300):
        yield _say(_ARITHMETIC_T, "sums")
    for _ in range(rng.between(2, 5)):
        a, b, c = rng.between(0, 50), rng.between(0, 50), rng.between(0, 20)
        key = rng.choice(("plus", "minus", "sum3"))
        if key == "plus":
            yield _say(_ARITHMETIC_T, key, a=a, b=b, c=a + b)
        elif key == "minus":
            yield _say(_ARITHMETIC_T, key, a=max(a, b), b=min(a, b), c=abs(a - b))
        else:
            yield _say(_ARITHMETIC_T, key, a=a, b=b, c=c, d=a + b + c)


def _lesson_table(rng: _Rng) -> Iterator[str]:
    k, start = rng.between(2, 12), rng.between(1, 8)
    if rng.chance(500):
        yield _say(_ARITHMETIC_T, "table", k=k)
    for i in range(start, start + rng.between(3, 5)):
        yield _say(_ARITHMETIC_T, "times", a=k, b=i, c=k * i)
    if rng.chance(500):
        yield _say(_ARITHMETIC_T, "divided", a=k * start, b=k, c=start)


def _lesson_counting(rng: _Rng) -> Iterator[str]:
    k, length = rng.between(1, 10), rng.between(5, 8)
    if rng.chance(500):
        a = rng.between(0, 60)
        seq = [a + k * i for i in range(length)]
        yield _say(_ARITHMETIC_T, "up", k=k, a=a, seq=" , ".join(map(str, seq)))
    else:
        a = rng.between(k * (length - 1), k * (length - 1) + 40)
        seq = [a - k * i for i in range(length)]
        yield _say(_ARITHMETIC_T, "down", k=k, a=a, seq=" , ".join(map(str, seq)))
    for a in rng.sample(seq, rng.between(1, 2)):
        yield _say(_ARITHMETIC_T, "even" if a % 2 == 0 else "odd", a=a)


def _lesson_compare(rng: _Rng) -> Iterator[str]:
    for _ in range(rng.between(2, 4)):
        a, b = rng.between(0, 99), rng.between(0, 99)
        key = rng.choice(("compare", "after", "before", "parity"))
        if key == "compare":
            key = "more" if a > b else "less" if a < b else "equal"
            yield _say(_ARITHMETIC_T, key, a=a, b=b)
        elif key == "after":
            yield _say(_ARITHMETIC_T, key, a=a, c=a + 1)
        elif key == "before":
            yield _say(_ARITHMETIC_T, key, a=a + 1, c=a)
        else:
            yield _say(_ARITHMETIC_T, "even" if a % 2 == 0 else "odd", a=a)


def _lesson_halves(rng: _Rng) -> Iterator[str]:
    for _ in range(rng.between(2, 4)):
        a = rng.between(1, 12)
        key = rng.choice(("double", "half", "square", "divided"))
        if key == "double":
            yield _say(_ARITHMETIC_T, key, a=4 * a, c=8 * a)
        elif key == "half":
            yield _say(_ARITHMETIC_T, key, a=4 * a, c=2 * a)
        elif key == "square":
            yield _say(_ARITHMETIC_T, key, a=a, c=a * a)
        else:
            b = rng.between(2, 9)
            yield _say(_ARITHMETIC_T, key, a=a * b, b=b, c=a)


def _lesson_story(rng: _Rng) -> Iterator[str]:
    """A word problem: the name and the thing are repeated, the count follows the arithmetic."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    have, more = rng.between(1, 20), rng.between(1, 9)
    yield _say(_ARITHMETIC_T, "has", name=name, things=_count(have, thing))
    yield _say(_ARITHMETIC_T, "gets", pron=_pronoun(name), name=name, k=more,
               things=_count(have + more, thing))
    if rng.chance(600):
        less = rng.between(1, have + more)
        yield _say(_ARITHMETIC_T, "gives", name=name, k=less, things=_count(have + more - less, thing))


_LESSONS: tuple[Callable[[_Rng], Iterator[str]], ...] = (
    _lesson_sums, _lesson_table, _lesson_counting, _lesson_compare, _lesson_halves, _lesson_story)


def _arithmetic(rng: _Rng) -> Iterator[str]:
    while True:
        yield from rng.choice(_LESSONS)(rng)


# ------------------------------------------------------------------------------------- weather

_WEATHER_T = {
    "intro": "here is the weather for {town} this week .",
    "season": "it is {season} in {town} .",
    "day": "on {day} it will be {cond} with a high of {high} and a low of {low} .",
    "chance": "the chance of {fall} on {day} is {p} percent .",  # no "a 8 percent" trap
    "wind": "on {day} the wind will blow from the {dir} at {speed} kilometers per hour .",
    "umbrella": "take an umbrella on {day} .",
    "icy": "the roads may be icy on {day} .",
    "water": "drink plenty of water on {day} .",
    "hat": "hold on to your hat on {day} .",
    "warmer": "{day} will be warmer than {prev} .",
    "colder": "{day} will be colder than {prev} .",
    "same": "{day} will be as warm as {prev} .",
    "warmest": "the warmest day will be {day} with {high} .",
    "coldest": "the coldest night will be {day} with {low} .",
}
_SEASON_HIGHS = {"winter": (-6, 6), "spring": (8, 18), "summer": (20, 34), "autumn": (6, 16)}
# Percent chance of rain (or snow) by condition: the number follows the word.
_CONDITION_CHANCE = {"sunny": (0, 10), "cloudy": (10, 40), "rainy": (60, 90), "windy": (10, 40),
                     "foggy": (10, 30), "stormy": (70, 100), "snowy": (20, 50)}
_DIRECTIONS = ("north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest")
_DEGREE = ("degree", "degrees")
_WEATHER_LEXICON = _flat(_SEASON_HIGHS, _CONDITION_CHANCE, _DIRECTIONS, _DEGREE,
                         ("minus", "rain", "snow"))


def _degrees(t: int) -> str:
    """'minus 3 degrees', '0 degrees', '1 degree', '21 degrees'."""
    if t < 0:
        return f"minus {_count(-t, _DEGREE)}"
    return f"{t} {_form(t, _DEGREE)}"


def _weather_day(rng: _Rng, day: str, prev: tuple[str, int] | None, high: int,
                 low: int) -> Iterator[str]:
    """One day's forecast plus optional remarks that follow from it."""
    cond = rng.choice(("snowy", "cloudy", "foggy", "sunny", "windy") if high <= 2 else
                      ("sunny", "cloudy", "rainy", "windy", "foggy", "stormy"))
    yield _say(_WEATHER_T, "day", day=day, cond=cond, high=_degrees(high), low=_degrees(low))
    if rng.chance(500):
        yield _say(_WEATHER_T, "chance", day=day, p=rng.between(*_CONDITION_CHANCE[cond]),
                   fall="snow" if cond == "snowy" else "rain")
    if rng.chance(300):
        yield _say(_WEATHER_T, "wind", day=day, dir=rng.choice(_DIRECTIONS),
                   speed=rng.between(30, 80) if cond in ("windy", "stormy") else rng.between(2, 25))
    advice = ("umbrella" if cond in ("rainy", "stormy") else "icy" if cond == "snowy" or low < 0
              else "water" if high >= 28 else "hat" if cond == "windy" else None)
    if advice is not None and rng.chance(600):
        yield _say(_WEATHER_T, advice, day=day)
    if prev is not None and rng.chance(400):
        key = "warmer" if high > prev[1] else "colder" if high < prev[1] else "same"
        yield _say(_WEATHER_T, key, day=day, prev=prev[0])


def _weather_week(rng: _Rng) -> Iterator[str]:
    town, season = rng.choice(_TOWNS), rng.choice(tuple(_SEASON_HIGHS))
    for key in rng.sample(("intro", "season"), rng.between(1, 2)):
        yield _say(_WEATHER_T, key, town=town, season=season)
    start, n_days = rng.below(7), rng.between(3, 7)
    days = [_WEEKDAYS[(start + i) % 7] for i in range(n_days)]
    highs = [rng.between(*_SEASON_HIGHS[season]) for _ in days]
    lows = [h - rng.between(2, 9) for h in highs]
    for i, day in enumerate(days):
        prev = (days[i - 1], highs[i - 1]) if i else None
        yield from _weather_day(rng, day, prev, highs[i], lows[i])
    if highs.count(max(highs)) == 1 and rng.chance(500):
        i = highs.index(max(highs))
        yield _say(_WEATHER_T, "warmest", day=days[i], high=_degrees(highs[i]))
    if lows.count(min(lows)) == 1 and rng.chance(400):
        i = lows.index(min(lows))
        yield _say(_WEATHER_T, "coldest", day=days[i], low=_degrees(lows[i]))


def _weather(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _weather_week(rng)


# ----------------------------------------------------------------------------------- inventory

_INVENTORY_T = {
    "runs": "{owner} runs the {shop} on {street} street .",
    "stock": "today the {shop} has {items} .",
    "total": "in total there are {total} .",
    "buy": "a customer buys {bought} , so there {be} {left} left .",
    "order": "{owner} orders {k} more {noun} , so now there {be} {stock} .",
    "price": "each {item} costs {p} coins , so {bought} {cost} {total} coins .",
    "more": "the shop has more {a} than {b} .",
    "fewer": "the shop has fewer {a} than {b} .",
    "same": "the shop has as many {a} as {b} .",
    "close": "{owner} closes the {shop} at {hour} .",
}
_SHOPS: tuple[tuple[str, tuple[Noun, ...]], ...] = (
    ("hardware shop", _nouns("hammer saw drill ladder wrench:wrenches shovel rake bucket brush:brushes")),
    ("fruit stall", _nouns("apple pear plum melon lemon orange peach:peaches cherry:cherries")),
    ("clothing shop", _nouns("shirt coat hat sock scarf:scarves glove boot sweater jacket belt")),
    ("paper shop", _nouns("pen pencil notebook ruler eraser folder envelope marker crayon")),
    ("toy shop", _nouns("ball doll kite puzzle robot drum whistle block")),
)
_STREETS = ("mill", "church", "market", "station", "bridge", "garden", "castle", "harbor")
_ITEM = ("item", "items")
_INVENTORY_LEXICON = _flat([shop for shop, _ in _SHOPS], *(nouns for _, nouns in _SHOPS), _STREETS,
                           _ITEM, ("is", "are", "cost", "costs"))


def _there(n: int, noun: Noun) -> dict[str, str]:
    """'there is 1 hammer', 'there are 3 hammers', 'there are no hammers'."""
    return {"be": "is" if n == 1 else "are", "left": _count(n, noun), "stock": _count(n, noun)}


def _shop_event(rng: _Rng, owner: str, stock: dict[Noun, int]) -> str:
    """One change to, or remark about, the stock; counts carry over to later sentences."""
    noun = rng.choice(list(stock))
    key = rng.choice(("buy", "order", "price", "compare"))
    if key == "buy" and stock[noun] > 0:
        k = rng.between(1, stock[noun])
        stock[noun] -= k
        return _say(_INVENTORY_T, "buy", bought=_count(k, noun), **_there(stock[noun], noun))
    if key in ("buy", "order"):
        k = rng.between(1, 12)
        stock[noun] += k
        return _say(_INVENTORY_T, "order", owner=owner, k=k, noun=_form(k, noun),
                    **_there(stock[noun], noun))
    if key == "price":
        p, k = rng.between(2, 20), rng.between(1, 6)
        return _say(_INVENTORY_T, "price", item=noun[0], p=p, bought=_count(k, noun),
                    cost="costs" if k == 1 else "cost", total=p * k)
    a, b = rng.sample(list(stock), 2)
    key = "more" if stock[a] > stock[b] else "fewer" if stock[a] < stock[b] else "same"
    return _say(_INVENTORY_T, key, a=a[1], b=b[1])


def _shop_day(rng: _Rng) -> Iterator[str]:
    owner, street = rng.choice(_NAMES), rng.choice(_STREETS)
    shop, goods = rng.choice(_SHOPS)
    stock = {noun: rng.between(1, 20) for noun in rng.sample(goods, rng.between(2, 5))}
    yield _say(_INVENTORY_T, "runs", owner=owner, shop=shop, street=street)
    items = _listing([_count(n, noun) for noun, n in stock.items()])
    yield _say(_INVENTORY_T, "stock", shop=shop, items=items)
    yield _say(_INVENTORY_T, "total", total=_count(sum(stock.values()), _ITEM))
    for _ in range(rng.between(2, 6)):
        yield _shop_event(rng, owner, stock)
    if rng.chance(500):
        yield _say(_INVENTORY_T, "total", total=_count(sum(stock.values()), _ITEM))
    if rng.chance(300):
        yield _say(_INVENTORY_T, "close", owner=owner, shop=shop, hour=rng.between(16, 21))


def _inventory(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _shop_day(rng)


# -------------------------------------------------------------------------------------- family

_FAMILY_T = {
    "family": "this is the {surname} family .",
    "married": "{a} and {b} are married .",
    "children": "{a} and {b} have {n} , {names} .",
    "relation": "{a} is the {rel} of {b} .",
    "cousins": "{a} and {b} are cousins .",
    "twins": "{a} and {b} are twins .",
    "age": "{a} is {age} years old .",
    "older": "{a} is older than {b} .",
    "younger": "{a} is younger than {b} .",
    "job": "{a} is {age} years old and {pron} works as {job} in {town} .",
    "school": "{a} goes to school in {town} .",
    "young": "{a} is too young for school .",
}
_SURNAMES = tuple("brandt castell dorsey ellery forde garrow hollis ivers jessop lowell marsh nolan "
                  "orwin".split())
_JOBS = ("baker", "teacher", "doctor", "farmer", "nurse", "painter", "pilot", "carpenter",
         "engineer", "artist", "editor", "gardener", "librarian", "tailor", "cook")
# relation -> (word for a woman, word for a man)
_RELATIONS = {"parent": ("mother", "father"), "child": ("daughter", "son"),
              "sibling": ("sister", "brother"), "grandparent": ("grandmother", "grandfather"),
              "grandchild": ("granddaughter", "grandson"), "auncle": ("aunt", "uncle"),
              "nibling": ("niece", "nephew"), "spouse": ("wife", "husband")}
_CHILD = ("child", "children")
_FAMILY_LEXICON = _flat(_SURNAMES, _JOBS, *_RELATIONS.values(), _CHILD)


@dataclass(frozen=True)
class _Person:
    name: str
    female: bool
    age: int


def _rel(kind: str, person: _Person) -> str:
    return _RELATIONS[kind][0 if person.female else 1]


def _family_tree(rng: _Rng) -> list[tuple[_Person, _Person, list[_Person]]]:
    """Grandparents, their 2-3 children, spouses and grandchildren, all with distinct names.

    Each couple is (woman, man, their children); the grandparents' couple comes first and its
    children are the middle generation, of whom some stay single and childless.
    """
    names = {True: iter(rng.shuffled(_FEMALE)), False: iter(rng.shuffled(_MALE))}

    def person(female: bool, lo: int, hi: int) -> _Person:
        return _Person(next(names[female]), female, rng.between(lo, hi))

    grandma, grandpa = person(True, 62, 85), person(False, 62, 85)
    middle = [person(rng.chance(500), 30, 45) for _ in range(rng.between(2, 3))]
    couples = [(grandma, grandpa, middle)]
    for adult in middle:
        if not rng.chance(700):
            continue
        spouse = person(not adult.female, 30, 45)
        kids = [person(rng.chance(500), 1, 15) for _ in range(rng.between(1, 3))]
        couples.append((adult, spouse, kids) if adult.female else (spouse, adult, kids))
    return couples


def _both_ways(kind: str, x: _Person, inverse: str, y: _Person) -> list[str]:
    """'x is the <kind> of y' and 'y is the <inverse> of x', each word matching its subject's sex."""
    return [_say(_FAMILY_T, "relation", a=x.name, rel=_rel(kind, x), b=y.name),
            _say(_FAMILY_T, "relation", a=y.name, rel=_rel(inverse, y), b=x.name)]


def _family_facts(rng: _Rng, couples: Sequence[tuple[_Person, _Person, list[_Person]]]) -> list[str]:
    """Every relation, age and job the tree implies, in random order."""
    facts: list[str] = []
    grandma, grandpa, middle = couples[0]
    for woman, man, kids in couples:
        facts += _both_ways("spouse", woman, "spouse", man)
        facts += [f for kid in kids for parent in (woman, man) for f in _both_ways("child", kid, "parent", parent)]
        for x, y in ((x, y) for i, x in enumerate(kids) for y in kids[i + 1:]):
            facts += _both_ways("sibling", x, "sibling", y)
            key = "twins" if x.age == y.age else "older" if x.age > y.age else "younger"
            facts.append(_say(_FAMILY_T, key, a=x.name, b=y.name))
    grandkids = [(adult, kid) for w, m, kids in couples[1:] for adult in (w, m) if adult in middle
                 for kid in kids]
    for parent, kid in grandkids:
        facts += [f for grand in (grandma, grandpa) for f in _both_ways("grandparent", grand, "grandchild", kid)]
        facts += [f for other in middle if other is not parent for f in _both_ways("auncle", other, "nibling", kid)]
    for (p1, x), (p2, y) in ((a, b) for i, a in enumerate(grandkids) for b in grandkids[i + 1:]):
        if p1 is not p2:
            facts.append(_say(_FAMILY_T, "cousins", a=x.name, b=y.name))
    facts += [_person_fact(rng, p) for w, m, kids in couples for p in (w, m, *kids)]
    return rng.shuffled(dict.fromkeys(facts))  # dedupe, keeping first-seen order before shuffling


def _person_fact(rng: _Rng, person: _Person) -> str:
    town = rng.choice(_TOWNS)
    if 18 <= person.age <= 65 and rng.chance(600):
        return _say(_FAMILY_T, "job", a=person.name, age=person.age, pron=_pronoun(person.name),
                    job=_a(rng.choice(_JOBS)), town=town)
    if 5 <= person.age < 18 and rng.chance(500):
        return _say(_FAMILY_T, "school", a=person.name, town=town)
    if person.age < 5 and rng.chance(500):
        return _say(_FAMILY_T, "young", a=person.name)
    return _say(_FAMILY_T, "age", a=person.name, age=person.age)


def _one_family(rng: _Rng) -> Iterator[str]:
    couples = _family_tree(rng)
    grandma, grandpa, middle = couples[0]
    yield _say(_FAMILY_T, "family", surname=rng.choice(_SURNAMES))
    yield _say(_FAMILY_T, "married", a=grandpa.name, b=grandma.name)
    yield _say(_FAMILY_T, "children", a=grandpa.name, b=grandma.name, n=_count(len(middle), _CHILD),
               names=_listing([p.name for p in middle]))
    yield from _family_facts(rng, couples)


def _family(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _one_family(rng)


# ------------------------------------------------------------------------------------- animals

_ANIMALS_T = {
    "about": "let us learn about {animals} .",
    "live": "{subj} {live} {prep} the {habitat} .",
    "eat": "{subj} {eat} {food} .",
    "move": "{subj} {move} very well .",
    "can": "{subj} can {move_base} .",
    "cover": "{subj} {have} {covering} .",
    "class": "{subj} {be} {klass} .",
    "night": "{subj} {sleep} during the day and {hunt} at night .",
    "day": "{subj} {sleep} at night and {look} for food during the day .",
    "young": "a young {animal} is called {young} .",
    "group": "a group of {animals} is called {group} .",
    "bigger": "{subj} {be} bigger than {other} .",
    "smaller": "{subj} {be} smaller than {other} .",
    "saw": "yesterday {name} saw {count} {prep} the {habitat} .",
    "doing": "the {animal} {was} {activity} .",
}


@dataclass(frozen=True)
class _Animal:
    """Fixed facts: the same animal always eats the same food, so facts are learnable."""

    noun: Noun
    klass: Noun
    habitat: str
    food: str
    move: Verb
    covering: str
    young: str
    group: str
    night: bool
    size: int  # rough rank; comparisons only between ranks at least 3 apart


_MAMMAL, _BIRD, _FISH, _REPTILE, _AMPHIBIAN, _INSECT = _nouns(
    "mammal bird fish:fish reptile amphibian insect")
_RUN, _FLY, _SWIM, _HOP, _CLIMB, _WALK, _SLITHER = _verbs("run fly:flies swim hop climb walk slither")


def _animal(spec: str, klass: Noun, move: Verb, night: bool = False) -> _Animal:
    noun, habitat, food, covering, young, group, size = spec.split()
    return _Animal(_nouns(noun)[0], klass, habitat, food, move, covering, young, group, night, int(size))


_ANIMALS = (
    _animal("fox:foxes forest mice fur cub skulk 10", _MAMMAL, _RUN, night=True),
    _animal("wolf:wolves forest deer fur pup pack 14", _MAMMAL, _RUN),
    _animal("owl forest mice feathers owlet parliament 7", _BIRD, _FLY, night=True),
    _animal("duck pond seeds feathers duckling flock 7", _BIRD, _SWIM),
    _animal("goose:geese lake grass feathers gosling gaggle 9", _BIRD, _FLY),
    _animal("deer:deer meadow grass fur fawn herd 17", _MAMMAL, _RUN),
    _animal("rabbit meadow grass fur kit colony 6", _MAMMAL, _HOP),
    _animal("mouse:mice field seeds fur pup mischief 2", _MAMMAL, _RUN, night=True),
    _animal("bear mountains berries fur cub sloth 20", _MAMMAL, _WALK),
    _animal("frog pond insects skin tadpole army 3", _AMPHIBIAN, _HOP),
    _animal("eagle mountains fish feathers eaglet convocation 10", _BIRD, _FLY),
    _animal("bat cave insects fur pup colony 3", _MAMMAL, _FLY, night=True),
    _animal("otter river fish fur pup romp 9", _MAMMAL, _SWIM),
    _animal("beaver river bark fur kit colony 10", _MAMMAL, _SWIM),
    _animal("squirrel forest nuts fur kit dray 5", _MAMMAL, _CLIMB),
    _animal("hedgehog garden worms spines hoglet array 5", _MAMMAL, _WALK, night=True),
    _animal("snake desert mice scales hatchling nest 8", _REPTILE, _SLITHER),
    _animal("whale sea krill skin calf pod 30", _MAMMAL, _SWIM),
    _animal("seal coast fish fur pup colony 16", _MAMMAL, _SWIM),
    _animal("goat mountains grass hair kid herd 13", _MAMMAL, _CLIMB),
    _animal("sheep:sheep field grass wool lamb flock 14", _MAMMAL, _WALK),
    _animal("horse farm hay hair foal herd 21", _MAMMAL, _RUN),
    _animal("cow farm grass hair calf herd 21", _MAMMAL, _WALK),
    _animal("bee meadow nectar hair larva swarm 1", _INSECT, _FLY),
    _animal("lizard desert insects scales hatchling lounge 4", _REPTILE, _RUN),
    _animal("camel desert leaves fur calf caravan 21", _MAMMAL, _WALK),
    _animal("penguin ice fish feathers chick colony 12", _BIRD, _SWIM),
    _animal("salmon:salmon river insects scales fry school 9", _FISH, _SWIM),
    _animal("dolphin sea fish skin calf pod 18", _MAMMAL, _SWIM),
    _animal("turtle beach plants shell hatchling bale 11", _REPTILE, _SWIM),
)
_ON_HABITATS = ("farm", "coast", "ice", "beach")  # "on the farm", but "in the forest"
_SINGULAR_DETS = ("a", "the", "every")
_PLURAL_DETS = ("", "the ", "most ", "many ", "all ")
_ACTIVITIES = ("sleeping", "eating", "playing", "resting", "hiding")
_ANIMALS_LEXICON = _flat(
    *([a.noun, a.klass, a.move, (a.habitat, a.food, a.covering, a.young, a.group)] for a in _ANIMALS),
    _SINGULAR_DETS, ("most", "many", "all", "in", "on"), _ACTIVITIES,
    _verbs("live eat have:has sleep hunt look"), ("is", "are", "was", "were", "the"))


def _agree(rng: _Rng, animal: _Animal) -> dict[str, str]:
    """A singular or plural subject and every verb form that must agree with it."""
    if rng.chance(500):
        det = rng.choice(_SINGULAR_DETS)
        subj = _a(animal.noun[0]) if det == "a" else f"{det} {animal.noun[0]}"
        return {"subj": subj, "live": "lives", "eat": "eats", "move": animal.move[1], "have": "has",
                "be": "is", "sleep": "sleeps", "hunt": "hunts", "look": "looks",
                "klass": _a(animal.klass[0]), "n": "1"}
    subj = f"{rng.choice(_PLURAL_DETS)}{animal.noun[1]}"
    return {"subj": subj, "live": "live", "eat": "eat", "move": animal.move[0], "have": "have",
            "be": "are", "sleep": "sleep", "hunt": "hunt", "look": "look", "klass": animal.klass[1], "n": "2"}


def _animal_fact(rng: _Rng, animal: _Animal, key: str) -> Iterator[str]:
    slots = {**_agree(rng, animal), "habitat": animal.habitat, "food": animal.food,
             "prep": "on" if animal.habitat in _ON_HABITATS else "in",
             "move_base": animal.move[0], "covering": animal.covering, "animal": animal.noun[0],
             "animals": animal.noun[1], "young": _a(animal.young), "group": _a(animal.group)}
    if key == "habits":
        key = "night" if animal.night else "day"
    if key in ("bigger", "smaller"):
        others = [o for o in _ANIMALS if abs(o.size - animal.size) >= 3]
        other = rng.choice(others)
        key = "bigger" if animal.size > other.size else "smaller"
        slots["other"] = _a(other.noun[0]) if slots["n"] == "1" else other.noun[1]
    if key == "saw":
        n = rng.between(1, 6)
        yield _say(_ANIMALS_T, "saw", name=rng.choice(_NAMES), count=_count(n, animal.noun),
                   prep=slots["prep"], habitat=animal.habitat)
        yield _say(_ANIMALS_T, "doing", animal=_form(n, animal.noun), was="was" if n == 1 else "were",
                   activity=rng.choice(_ACTIVITIES))
        return
    yield _say(_ANIMALS_T, key, **slots)


_ANIMAL_FACT_KEYS = ("live", "eat", "move", "can", "cover", "class", "habits", "young", "group",
                     "bigger", "saw")


def _animal_lesson(rng: _Rng) -> Iterator[str]:
    """One to three animals, their facts in random order, each animal named again and again."""
    focus = rng.sample(_ANIMALS, rng.between(1, 3))
    if rng.chance(400):
        yield _say(_ANIMALS_T, "about", animals=_listing([a.noun[1] for a in focus]))
    facts = [(a, key) for a in focus for key in rng.sample(_ANIMAL_FACT_KEYS, rng.between(3, 6))]
    for animal, key in rng.shuffled(facts):
        yield from _animal_fact(rng, animal, key)


def _animals(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _animal_lesson(rng)


# -------------------------------------------------------------------------------------- travel

_TRAVEL_T = {
    "plan": "{name} wants to travel from {a} to {b} .",
    "leaves": "the {mode} to {b} leaves at {dep} and arrives at {arr} , so the trip takes {dur} .",
    "late": "today the {mode} is {late} late , so it arrives at {arr} .",
    "stops": "the {mode} stops at {stops} on the way , so it makes {n} .",
    "ticket": "a ticket costs {p} coins and a return ticket costs {q} coins .",
    "dates": "{name} leaves on {month} {day} and stays for {nights} .",
    "return": "{pron} comes back on {month} {day} .",
    "distance": "the distance from {a} to {b} is {k} kilometers .",
    "pack": "{name} packs {items} .",
    "weekday": "the trip starts on a {weekday} .",
}
_MODES = ("train", "bus", "ferry", "plane", "boat")
_MONTHS = (("january", 31), ("february", 28), ("march", 31), ("april", 30), ("may", 31),
           ("june", 30), ("july", 31), ("august", 31), ("september", 30), ("october", 31),
           ("november", 30), ("december", 31))
_PACKING = ("bag", "map", "camera", "coat", "book", "hat", "umbrella", "scarf", "sandwich", "torch")
_HOUR, _STOP, _NIGHT = _nouns("hour stop night")
_TRAVEL_LEXICON = _flat(_MODES, [m for m, _ in _MONTHS], _PACKING, (_HOUR, _STOP, _NIGHT))


def _add_days(month: int, day: int, n: int) -> tuple[int, int]:
    """(month index, day) n days later, with the month lengths of a common year: a learnable rule."""
    day += n
    while day > _MONTHS[month][1]:
        day -= _MONTHS[month][1]
        month = (month + 1) % 12
    return month, day


def _trip(rng: _Rng) -> Iterator[str]:
    name = rng.choice(_NAMES)
    a, b, *stops = rng.sample(_TOWNS, 2 + rng.between(1, 4))
    mode = rng.choice(_MODES)
    dep, dur = rng.between(5, 15), rng.between(1, 6)  # arrival, even 2 hours late, stays <= 23
    yield _say(_TRAVEL_T, "plan", name=name, a=a, b=b)
    yield _say(_TRAVEL_T, "leaves", mode=mode, b=b, dep=dep, arr=dep + dur, dur=_count(dur, _HOUR))
    month, day, nights = rng.below(12), rng.between(1, 28), rng.between(1, 14)
    back_month, back_day = _add_days(month, day, nights)
    price = rng.between(3, 40)
    late = rng.between(1, 2)
    optional = {
        "late": {"mode": mode, "late": _count(late, _HOUR), "arr": dep + dur + late},
        "stops": {"mode": mode, "stops": _listing(stops), "n": _count(len(stops), _STOP)},
        "ticket": {"p": price, "q": 2 * price},
        "dates": {"name": name, "month": _MONTHS[month][0], "day": day, "nights": _count(nights, _NIGHT)},
        "distance": {"a": a, "b": b, "k": 10 * rng.between(2, 60)},
        "pack": {"name": name, "items": _listing([_a(x) for x in rng.sample(_PACKING, rng.between(2, 4))])},
        "weekday": {"weekday": rng.choice(_WEEKDAYS)},
    }
    for key in rng.sample(tuple(optional), rng.between(2, 5)):
        yield _say(_TRAVEL_T, key, **optional[key])
        if key == "dates":
            yield _say(_TRAVEL_T, "return", pron=_pronoun(name), month=_MONTHS[back_month][0], day=back_day)


def _travel(rng: _Rng) -> Iterator[str]:
    while True:
        yield from _trip(rng)


# ------------------------------------------------------------------------------ topic registry

@dataclass(frozen=True)
class _Topic:
    """A topic's grammar: its templates, the words its slots can take, and its sentence source."""

    name: str
    templates: Mapping[str, str]
    lexicon: tuple[str, ...]
    sentences: Callable[[_Rng], Iterator[str]]  # infinite stream of spaced sentences


_TOPICS: tuple[_Topic, ...] = (
    _Topic("cooking", _COOKING_T, _COOKING_LEXICON, _cooking),
    _Topic("astronomy", _ASTRONOMY_T, _ASTRONOMY_LEXICON, _astronomy),
    _Topic("sports", _SPORTS_T, _SPORTS_LEXICON, _sports),
    _Topic("arithmetic", _ARITHMETIC_T, _ARITHMETIC_LEXICON, _arithmetic),
    _Topic("weather", _WEATHER_T, _WEATHER_LEXICON, _weather),
    _Topic("inventory", _INVENTORY_T, _INVENTORY_LEXICON, _inventory),
    _Topic("family", _FAMILY_T, _FAMILY_LEXICON, _family),
    _Topic("animals", _ANIMALS_T, _ANIMALS_LEXICON, _animals),
    _Topic("travel", _TRAVEL_T, _TRAVEL_LEXICON, _travel),
)
TOPICS: tuple[str, ...] = tuple(t.name for t in _TOPICS)
_TOPIC_BY_NAME = {t.name: t for t in _TOPICS}


# --------------------------------------------------------------------------------- documents

@dataclass(frozen=True)
class CorpusSpec:
    """What to generate. The vocabulary, and so the tokenizer, does not depend on any field."""

    seed: int = 0  # any 64-bit unsigned value; each stream and document derives its own seed
    min_words: int = 40  # whitespace-separated words per document, inclusive bounds
    max_words: int = 150
    max_paragraphs: int = 4
    mixed_permille: int = 50  # chance (per mille) that a multi-paragraph document switches topic
    topics: tuple[str, ...] = TOPICS

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MASK64:
            raise ValueError(f"CorpusSpec.seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not 10 <= self.min_words:
            raise ValueError(f"CorpusSpec.min_words must be >= 10, got {self.min_words}")
        if self.max_words < self.min_words + MAX_SENTENCE_WORDS:
            raise ValueError(
                f"CorpusSpec.max_words must be >= min_words + {MAX_SENTENCE_WORDS} (the longest "
                f"sentence) so every document can end on a whole sentence inside the bounds, got "
                f"min_words={self.min_words}, max_words={self.max_words}")
        if not 1 <= self.max_paragraphs <= 16:
            raise ValueError(f"CorpusSpec.max_paragraphs must be in [1, 16], got {self.max_paragraphs}")
        if not 0 <= self.mixed_permille <= 1000:
            raise ValueError(f"CorpusSpec.mixed_permille must be in [0, 1000], got {self.mixed_permille}")
        unknown = [t for t in self.topics if t not in _TOPIC_BY_NAME]
        if not self.topics or unknown or len(set(self.topics)) != len(self.topics):
            raise ValueError(f"CorpusSpec.topics must be a non-empty tuple of distinct names from "
                             f"{TOPICS}, got {self.topics!r}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, for manifests that record where training data came from."""
        return {"seed": self.seed, "min_words": self.min_words, "max_words": self.max_words,
                "max_paragraphs": self.max_paragraphs, "mixed_permille": self.mixed_permille,
                "topics": list(self.topics)}


@dataclass(frozen=True)
class Document:
    """One generated document and the topics it was drawn from (one, or two when mixed)."""

    stream: str
    index: int
    topics: tuple[str, ...]
    text: str  # paragraphs separated by "\n", sentences by " ", lowercase ASCII


def _document_seed(seed: int, stream: str, index: int) -> int:
    """Independent 64-bit seed per (seed, stream, index): distinct streams never share a sequence."""
    digest = hashlib.sha256(f"qmoe-corpus/v1/{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _render(sentence: str) -> str:
    """Attach punctuation to the preceding word: 'tom , 3 .' -> 'tom, 3.'."""
    return sentence.replace(" ,", ",").replace(" .", ".")


def _compose(rng: _Rng, spec: CorpusSpec, topics: Sequence[_Topic], n_par: int,
             target: int) -> tuple[str, int]:
    """Pull whole sentences until the word target; paragraph breaks at even shares of it.

    Returns the text and how many of `topics` made it in (a second topic takes over from
    paragraph n_par // 2 + 1, if the text gets that far). Stops early rather than overshoot
    max_words; spec validation (max - min >= longest sentence) guarantees that stopping early
    still leaves at least min_words.
    """
    split = n_par // 2 if len(topics) == 2 else n_par
    sources = [t.sentences(rng) for t in topics]
    paragraphs: list[list[str]] = [[]]
    total = 0
    while total < target:
        source = sources[0] if len(paragraphs) <= split else sources[-1]
        sentence = _render(next(source))
        words = len(sentence.split())
        if words > MAX_SENTENCE_WORDS:
            raise RuntimeError(
                f"internal: a sentence of {words} words exceeds {MAX_SENTENCE_WORDS}: {sentence!r}")
        if total + words > spec.max_words:
            break
        paragraphs[-1].append(sentence)
        total += words
        if total < target and len(paragraphs) < n_par and total * n_par >= target * len(paragraphs):
            paragraphs.append([])
    paragraphs = [p for p in paragraphs if p]
    return "\n".join(" ".join(p) for p in paragraphs), 1 if len(paragraphs) <= split else 2


def generate_document(stream: str, index: int, spec: CorpusSpec = CorpusSpec()) -> Document:
    """Document `index` of `stream`: random access, independent of every other document."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    if index < 0:
        raise ValueError(f"document index must be >= 0, got {index}")
    rng = _Rng(_document_seed(spec.seed, stream, index))
    target = rng.between(spec.min_words, spec.max_words)
    n_par = rng.between(1, max(1, min(spec.max_paragraphs, target // _MIN_PARAGRAPH_WORDS)))
    names = [rng.choice(spec.topics)]
    if n_par >= 2 and len(spec.topics) >= 2 and rng.chance(spec.mixed_permille):
        names.append(rng.choice([t for t in spec.topics if t != names[0]]))
    text, used = _compose(rng, spec, [_TOPIC_BY_NAME[n] for n in names], n_par, target)
    return Document(stream, index, tuple(names[:used]), text)


def generate_records(stream: str, count: int, spec: CorpusSpec = CorpusSpec(), *,
                     start: int = 0) -> Iterator[Document]:
    """Documents start .. start+count-1 of `stream`, with their topics."""
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    return (generate_document(stream, i, spec) for i in range(start, start + count))


def generate_documents(stream: str, count: int, spec: CorpusSpec = CorpusSpec(), *,
                       start: int = 0) -> Iterator[str]:
    """The texts of `generate_records`: "train", "calibration" and "validation" never overlap."""
    return (doc.text for doc in generate_records(stream, count, spec, start=start))


def write_jsonl(path: str | os.PathLike[str], stream: str, count: int,
                spec: CorpusSpec = CorpusSpec()) -> Path:
    """Write `count` documents as `{"text": ...}` lines; atomic (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for text in generate_documents(stream, count, spec):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------- tokenizer

def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Whitespace, then each punctuation mark and each digit on its own: '200,' -> 2 0 0 ,."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation("isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every word the grammars can produce, sorted: template literals, word lists, digits.

    Enumerated from the grammar definitions, not from sampled text, so a rare word is never
    missed; the test that generated text never maps to `<unk>` keeps the two in step.
    """
    pre = _pre_tokenizer()
    words: set[str] = set("0123456789")
    pieces = [literal for t in _TOPICS for template in t.templates.values()
              for literal, *_ in string.Formatter().parse(template)]
    pieces += [w for t in _TOPICS for w in t.lexicon] + list(_SHARED_LEXICON)
    for piece in pieces:
        words.update(word for word, _ in pre.pre_tokenize_str(piece.lower()))
    return tuple(sorted(words))


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer over `vocabulary()`, laid out and behaving like T5's.

    Ids: `<pad>`=0, `</s>`=1, `<unk>`=2, the words, then `<extra_id_99>` .. `<extra_id_0>` with
    `<extra_id_0>` = vocab_size - 1. Encoding appends `</s>` as T5's tokenizer does (pass
    add_special_tokens=False to skip it). Decoding joins words with spaces and re-attaches
    punctuation; numbers come back digit by digit ("2 0 0").
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    for i in reversed(range(NUM_SENTINELS)):
        vocab[sentinel(i)] = len(vocab)
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    # WordPiece's cleanup re-attaches " ." and " ,"; no token starts with its "##" prefix.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Registered as special so "<extra_id_7>" is one token, never split by the pre-tokenizer.
    specials = [t for t in vocab if t in SPECIAL_TOKENS or t.startswith("<extra_id_")]  # id order
    tokenizer.add_special_tokens(specials)
    return tokenizer


def save_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """Write `tokenizer.json` (loadable by `tokenizers.Tokenizer.from_file`) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tmp = directory / "tokenizer.json.tmp"
    build_tokenizer().save(str(tmp), pretty=True)
    os.replace(tmp, path)
    return path


def unigram_entropy_bits(token_ids: Iterable[int]) -> float:
    """Entropy in bits per token of the empirical unigram distribution of token_ids.

    The loss (in bits) a model that ignores context could reach at best; a trained model's
    cross-entropy / ln 2 must come out below it.
    """
    counts = Counter(token_ids)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("unigram_entropy_bits needs at least one token id, got none")
    # Sorted so the float sum is the same whatever order the ids arrived in.
    return -sum(c / total * math.log2(c / total) for _, c in sorted(counts.items()))
