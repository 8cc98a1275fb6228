"""Embedded, deterministic, offline demo instruction-tuning dataset with known label noise.

``make_demo_dataset`` builds Alpaca-style rows (``instruction``, ``input``, ``output``)
from twelve simple, rule-based task families. Every task uses one fixed template and a
small built-in vocabulary (about 300 distinct non-numeric words), so a tiny GPT-2
trained for a minute on CPU can learn the clean mapping. Responses range from one word
to a long tail of about 60 words.

Tasks (``task`` column; "(input)" marks tasks that use the ``input`` field):

* ``add``       "What is 17 plus 25?" -> "17 plus 25 is 42."   (operands 0-99)
* ``subtract``  "What is 40 minus 13?" -> "40 minus 13 is 27." (never negative)
* ``reverse``   (input) reverse 4-24 words: "red sun tree" -> "tree sun red"
* ``sort``      (input) sort 4-24 numbers (0-99) ascending
* ``count``     (input) count 2-15 words -> "There are 7 words."
* ``range``     "List the numbers from 12 to 20." -> "12 13 ... 20"; 1-60 numbers, long tail
* ``spell``     "Spell the word garden letter by letter." -> "g a r d e n"
* ``antonym``   "What is the opposite of hot?" -> "cold" (40 built-in pairs, both directions)
* ``plural``    (input) pluralise 2-10 nouns, some irregular: "box mouse" -> "boxes mice"
* ``repeat``    (input) "Repeat the input 3 times." with a 1-4 word phrase, 2-10 times
* ``largest``   (input) pick the largest of 3-10 numbers -> "88"
* ``describe``  "Describe the zorb." -> "The zorb is small, blue and round. It lives in the
  lake and eats bread." (built-in table of 16 fictional objects)

Tasks are assigned round-robin and then shuffled, so they are balanced. All randomness
comes from ``random.Random(seed)``: the same ``(num_rows, corruption_rate, seed)`` always
gives the same dataset. Clean rows are drawn first, so they depend only on
``(num_rows, seed)``; ``corruption_rate`` only changes which rows are then corrupted.

Corruption procedure: exactly ``round(num_rows * corruption_rate)`` rows are corrupted
(``is_corrupted`` True, ``corruption`` names the kind; clean rows have ``"none"``). The
count is split as evenly as possible between the three kinds (any remainder goes to
randomly chosen kinds). Rows are visited in a seeded random order and each kind takes
eligible rows not already taken:

* ``truncated``: output cut to its first 3 words; only rows whose clean output has >= 6 words.
* ``shuffled``:  output words put in a random order different from the original; only
  rows whose clean output has >= 4 distinct words.
* ``swapped``:   output replaced by the clean output of a random row of a *different*
  task (with a different text). Any row is eligible, so if truncated/shuffled run out of
  eligible rows, the shortfall becomes swapped rows and the total stays exact.

Instruction and input are never modified: a corrupted row pairs a valid prompt with a
wrong response.
"""

from __future__ import annotations

import math
import random

import datasets

CORRUPTIONS = ("swapped", "truncated", "shuffled")

WORDS = (
    "red blue green small big old new happy sad fast slow warm cold soft hard bright dark "
    "cat dog bird fish tree sun moon star rain snow road hill lake river stone house door "
    "book lamp chair table cup bread milk apple boat train car bike shoe hat coat "
    "run jump walk sing read write play sleep eat drink look find keep open close"
).split()
SPELL_WORDS = (
    "garden window purple planet yellow silver basket candle dragon forest orange "
    "pencil rocket summer winter bridge castle flower island monkey guitar jacket"
).split()
ANTONYMS = [p.split(":") for p in (
    "hot:cold big:small fast:slow happy:sad up:down left:right open:closed light:dark "
    "old:young high:low early:late full:empty hard:soft long:short wet:dry loud:quiet "
    "rich:poor strong:weak thick:thin wide:narrow clean:dirty sweet:sour day:night in:out "
    "win:lose buy:sell push:pull first:last near:far good:bad true:false begin:end "
    "give:take above:below before:after inside:outside always:never friend:enemy "
    "laugh:cry north:south"
).split()]
ANTONYM_OF = {**dict(ANTONYMS), **{b: a for a, b in ANTONYMS}}  # both directions
PLURALS = [p.split(":") for p in (
    "cat:cats dog:dogs box:boxes city:cities child:children mouse:mice foot:feet "
    "tooth:teeth man:men woman:women bus:buses baby:babies leaf:leaves knife:knives "
    "wolf:wolves sheep:sheep fish:fish glass:glasses dish:dishes toy:toys key:keys "
    "party:parties goose:geese person:people tree:trees star:stars church:churches "
    "potato:potatoes hero:heroes day:days"
).split()]
FACTS = {  # fictional object -> (size, color, shape, home, food)
    row.split()[0]: tuple(row.split()[1:]) for row in (
        "zorb small blue round lake bread", "blick big red square forest apples",
        "frindle tiny green flat river milk", "gloop huge yellow soft cave stones",
        "wug small purple round hill leaves", "snark big black sharp sea fish",
        "tove tiny white long desert sand", "quib huge orange square forest bread",
        "mimble small pink flat lake apples", "drax big gray round cave milk",
        "plonk tiny brown sharp hill stones", "yurt huge silver long sea leaves",
        "fizzle small gold soft river fish", "grommet big blue flat desert sand",
        "snib tiny red round forest milk", "vorp huge green sharp lake leaves",
    )
}


def _join(items) -> str:
    return " ".join(str(x) for x in items)


def _nums(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(lo, hi))]


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."


def _subtract(rng):
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}."


def _reverse(rng):
    words = rng.sample(WORDS, rng.randint(4, 24))
    return "Reverse the order of the words in the input.", _join(words), _join(words[::-1])


def _sort(rng):
    nums = _nums(rng, 4, 24)
    return "Sort the numbers in the input from smallest to largest.", _join(nums), _join(sorted(nums))


def _count(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 15))]
    return "Count the words in the input.", _join(words), f"There are {len(words)} words."


def _range(rng):
    start, length = rng.randint(0, 99), min(60, 1 + int(rng.expovariate(1 / 16)))
    end = start + length - 1
    return f"List the numbers from {start} to {end}.", "", _join(range(start, end + 1))


def _spell(rng):
    word = rng.choice(SPELL_WORDS)
    return f"Spell the word {word} letter by letter.", "", _join(word)


def _antonym(rng):
    word = rng.choice(sorted(ANTONYM_OF))
    return f"What is the opposite of {word}?", "", ANTONYM_OF[word]


def _plural(rng):
    pairs = rng.sample(PLURALS, rng.randint(2, 10))
    return "Write the plural of each noun in the input.", _join(p[0] for p in pairs), _join(p[1] for p in pairs)


def _repeat(rng):
    phrase, times = _join(rng.sample(WORDS, rng.randint(1, 4))), rng.randint(2, 10)
    return f"Repeat the input {times} times.", phrase, _join([phrase] * times)


def _largest(rng):
    nums = _nums(rng, 3, 10)
    return "Which number in the input is the largest?", _join(nums), str(max(nums))


def _describe(rng):
    name = rng.choice(sorted(FACTS))
    size, color, shape, home, food = FACTS[name]
    out = f"The {name} is {size}, {color} and {shape}. It lives in the {home} and eats {food}."
    return f"Describe the {name}.", "", out


TASKS = {
    "add": _add, "subtract": _subtract, "reverse": _reverse, "sort": _sort, "count": _count,
    "range": _range, "spell": _spell, "antonym": _antonym, "plural": _plural,
    "repeat": _repeat, "largest": _largest, "describe": _describe,
}


def _check_args(num_rows, corruption_rate) -> None:
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"num_rows must be an integer >= 1, got {num_rows!r}")
    is_num = isinstance(corruption_rate, (int, float)) and not isinstance(corruption_rate, bool)
    if not (is_num and math.isfinite(corruption_rate) and 0 <= corruption_rate < 1):
        raise ValueError(f"corruption_rate must be a number with 0 <= corruption_rate < 1, got {corruption_rate!r}")


def _swap_donor(rng, by_task, row) -> str:
    """Clean output of a random row of another task (or a fresh example if none exists)."""
    others = [t for t in TASKS if t != row["task"]]
    for _ in range(50):
        pool = by_task.get(rng.choice(others))
        donor = rng.choice(pool) if pool else None
        if donor is not None and donor != row["clean"]:
            return donor
    while True:  # only for tiny datasets with no suitable row of another task
        donor = TASKS[rng.choice(others)](rng)[2]
        if donor != row["clean"]:
            return donor


def make_demo_dataset(num_rows: int = 3000, corruption_rate: float = 0.2, seed: int = 0) -> datasets.Dataset:
    """Build the demo dataset; see the module docstring for the tasks and corruptions."""
    _check_args(num_rows, corruption_rate)
    rng = random.Random(seed)
    names = list(TASKS)
    tasks = [names[i % len(names)] for i in range(num_rows)]
    rng.shuffle(tasks)
    rows = []
    for task in tasks:
        instruction, inp, out = TASKS[task](rng)
        rows.append({"instruction": instruction, "input": inp, "output": out, "clean": out,
                     "task": task, "corruption": "none", "is_corrupted": False})

    n_bad = round(num_rows * corruption_rate)
    quota = dict.fromkeys(CORRUPTIONS, n_bad // 3)
    for kind in rng.sample(CORRUPTIONS, n_bad % 3):
        quota[kind] += 1
    order = list(range(num_rows))
    rng.shuffle(order)
    eligible = {
        "truncated": lambda r: len(r["clean"].split()) >= 6,
        "shuffled": lambda r: len(set(r["clean"].split())) >= 4,
        "swapped": lambda r: True,
    }
    chosen = {}
    for kind in ("truncated", "shuffled", "swapped"):  # most restrictive first
        picked = [i for i in order if i not in chosen and eligible[kind](rows[i])][: quota[kind]]
        chosen.update(dict.fromkeys(picked, kind))
        if kind != "swapped":
            quota["swapped"] += quota[kind] - len(picked)  # shortfall -> swapped

    by_task = {}  # task -> clean outputs, the donors for swapped rows
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["clean"])
    for i in sorted(chosen):
        kind, words = chosen[i], rows[i]["clean"].split()
        if kind == "truncated":
            out = _join(words[:3])
        elif kind == "shuffled":
            shuffled = list(words)
            while shuffled == words:
                rng.shuffle(shuffled)
            out = _join(shuffled)
        else:
            out = _swap_donor(rng, by_task, rows[i])
        rows[i].update(output=out, corruption=kind, is_corrupted=True)

    columns = ("instruction", "input", "output", "task", "corruption", "is_corrupted")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
