"""Generate the committed test assets: the bundled dataset and two small tokenizers.

    python scripts/make_test_assets.py [--out_dir tests/assets]

Writes, deterministically (same bytes on every run):
  bundled/part-0000N.jsonl   ~2.5 MB of English-like documents ({"text": ...} per line)
  test_tiktoken.model        byte-level BPE ranks in Llama 3's tiktoken format (~2000 tokens)
  test_tokenizer.json        a Hugging Face byte-level BPE tokenizer trained on the same text
  tokenizer/                 the same tokenizer as a Hugging Face assets folder (tokenizer.json +
                             tokenizer_config.json), what TorchTitan's model.hf_assets_path names

The text comes from a template grammar with a small vocabulary (stories, arithmetic
tables, lists, dialogues, animal facts, recipes), so it is low in entropy and has real
regularities a tiny model can learn in a few dozen steps. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import regex

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SEED = 1234
NUM_DOCUMENTS = 5600
DOCS_PER_FILE = 2800
NUM_BASE_TOKENS = 2000  # 256 bytes + 1744 merges; the 256 Llama 3 specials come on top

# ---------------------------------------------------------------- vocabulary

NAMES = (
    "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam Tina "
    "Umar Vera Will Xena Yuki Zoe Adam Bella Chris Dora Eli Fiona Gus Hana Ivan Jade Kai Lily Max Nina "
    "Oscar Pia Quinn Ruby Seth Tara Ugo Vince Wendy Yara Zack Alice Bruno Clara Dan Ella Finn Gina Hank "
    "Ida Jonas Kira Lars Maya Nils Otto Penny Rita Simon Theo Una Victor Wanda Zara José Zoë Chloé "
    "Amélie Søren Björn Mateo Lucía Ömer Aiko"
).split()
# animal -> (plural, sound, legs, food, home, kind)
ANIMALS = {
    "cat": ("cats", "meow", 4, "fish", "house", "mammal"),
    "dog": ("dogs", "woof", 4, "meat", "kennel", "mammal"),
    "cow": ("cows", "moo", 4, "grass", "barn", "mammal"),
    "duck": ("ducks", "quack", 2, "seeds", "pond", "bird"),
    "owl": ("owls", "hoot", 2, "mice", "tree", "bird"),
    "frog": ("frogs", "ribbit", 4, "flies", "pond", "amphibian"),
    "horse": ("horses", "neigh", 4, "hay", "stable", "mammal"),
    "sheep": ("sheep", "baa", 4, "grass", "field", "mammal"),
    "pig": ("pigs", "oink", 4, "apples", "sty", "mammal"),
    "lion": ("lions", "roar", 4, "meat", "savanna", "mammal"),
    "mouse": ("mice", "squeak", 4, "cheese", "hole", "mammal"),
    "bee": ("bees", "buzz", 6, "nectar", "hive", "insect"),
    "snake": ("snakes", "hiss", 0, "eggs", "grass", "reptile"),
    "goat": ("goats", "bleat", 4, "leaves", "hill", "mammal"),
    "hen": ("hens", "cluck", 2, "corn", "coop", "bird"),
    "wolf": ("wolves", "howl", 4, "deer", "forest", "mammal"),
    "bear": ("bears", "growl", 4, "honey", "cave", "mammal"),
    "fox": ("foxes", "yip", 4, "berries", "den", "mammal"),
    "crow": ("crows", "caw", 2, "worms", "nest", "bird"),
    "spider": ("spiders", "nothing", 8, "bugs", "web", "arachnid"),
    "rabbit": ("rabbits", "nothing", 4, "carrots", "burrow", "mammal"),
    "turtle": ("turtles", "nothing", 4, "lettuce", "river", "reptile"),
    "elephant": ("elephants", "trumpet", 4, "bananas", "jungle", "mammal"),
    "monkey": ("monkeys", "chatter", 2, "bananas", "jungle", "mammal"),
    "parrot": ("parrots", "squawk", 2, "nuts", "jungle", "bird"),
    "dolphin": ("dolphins", "click", 0, "fish", "sea", "mammal"),
    "penguin": ("penguins", "honk", 2, "fish", "ice", "bird"),
    "squirrel": ("squirrels", "chirp", 4, "acorns", "tree", "mammal"),
}
COLORS = "red blue green yellow orange purple pink brown black white gray golden".split()
ADJECTIVES = (
    "little big happy sleepy brave clever shy curious kind funny quiet noisy gentle tiny friendly "
    "lazy busy proud silly young old fast slow careful"
).split()
PLACES = (
    "village town forest garden farm castle city island valley meadow cottage school library "
    "harbor market park mountain desert"
).split()
LANDMARKS = ["river", "lake", "bridge", "hill", "old tree", "big rock", "well", "fence", "gate", "tower", "beach"]
OBJECTS = (
    "ball kite hat box book key cup shoe map bell drum lamp coin ring stone feather shell "
    "basket blanket umbrella ladder bucket flute clock mirror candle whistle scarf"
).split()
FEELINGS = "happy sad excited surprised tired hungry scared proud calm glad".split()
FAMILY = "mother father sister brother grandmother grandfather aunt uncle cousin".split()
ACTIVITIES = (
    "play in the park|read a book|climb the hill|swim in the lake|sing a song|draw a picture|"
    "bake a cake|plant some flowers|fly a kite|build a sandcastle|ride a bike|go fishing|"
    "look at the stars|play hide and seek|pick some berries|walk by the river"
).split("|")
ROUTINES = (
    "woke up early|ate breakfast|brushed {p} teeth|went for a walk|fed the chickens|"
    "watered the plants|looked out of the window|tidied {p} room|said hello to the neighbors"
).split("|")
FOODS = (
    "apples bread milk eggs cheese rice beans carrots tomatoes potatoes onions butter sugar "
    "flour honey lemons oranges bananas grapes pears peas corn soup tea juice cookies"
).split()
ROOMS = "kitchen bedroom garden garage classroom bathroom attic cellar".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
DISHES = {
    "pancakes": ["flour", "milk", "eggs", "sugar", "butter"],
    "soup": ["carrots", "onions", "potatoes", "beans", "water"],
    "bread": ["flour", "water", "salt", "yeast"],
    "salad": ["tomatoes", "lettuce", "onions", "lemons", "oil"],
    "lemonade": ["lemons", "sugar", "water", "ice"],
    "fruit salad": ["apples", "bananas", "grapes", "pears", "oranges"],
    "rice pudding": ["rice", "milk", "sugar", "honey"],
    "tomato sauce": ["tomatoes", "onions", "oil", "salt"],
}
COOKING_STEPS = [
    "wash your hands",
    "put all the {ings} on the table",
    "mix the {a} and the {b} in a big bowl",
    "stir it slowly for {n} minutes",
    "let it rest for {n} minutes",
    "cook it on a low heat",
    "taste it and add a little {c}",
    "share it with your family",
]


def _pronouns(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice([("he", "him", "his"), ("she", "her", "her")])


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# ---------------------------------------------------------------- document kinds


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, animal2 = rng.sample(sorted(ANIMALS), 2)
    he, him, his = _pronouns(rng)
    adj, color, obj = rng.choice(ADJECTIVES), rng.choice(COLORS), rng.choice(OBJECTS)
    place, landmark = rng.choice(PLACES), rng.choice(LANDMARKS)
    activity, feeling = rng.choice(ACTIVITIES), rng.choice(FEELINGS)
    lines = [
        f"Once upon a time, there was {_a(adj)} {animal} named {name}.",
        f"{name} lived in a {place} near the {landmark} with {his} {rng.choice(FAMILY)}.",
    ]
    for routine in rng.sample(ROUTINES, rng.randint(1, 3)):
        lines.append(f"Every morning, {name} {routine.format(p=his)}.")
    lines += [
        f"One day, {name} found a {color} {obj} near the {landmark}.",
        f'"What a beautiful {obj}!" said {name}.',
        f"{name} showed the {color} {obj} to {friend}, the {animal2}.",
        f"{friend} was very {feeling}.",
        f'"Let us {activity} together," said {friend}.',
        f"So {name} and {friend} went to {activity} together.",
    ]
    if rng.random() < 0.5:
        lines.append(f"When the sun went down, {name} went home and told {his} {rng.choice(FAMILY)} about the {obj}.")
    lines.append(f"From that day on, {name} and {friend} were best friends. The end.")
    return " ".join(lines)


def arithmetic(rng: random.Random) -> str:
    op = rng.choice(["+", "-", "x", "words"])
    a = rng.randint(1, 12)
    count = rng.randint(6, 12)
    if op == "words":
        rows = [
            f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
            for b in range(0, min(count, 20 - a) + 1)
        ]
        return f"Adding with {NUMBER_WORDS[a]}.\n" + "\n".join(rows)
    if op == "+":
        rows = [f"{a} + {b} = {a + b}" for b in range(1, count + 1)]
        return f"Addition table for {a}:\n" + "\n".join(rows)
    if op == "-":
        rows = [f"{a + b} - {a} = {b}" for b in range(1, count + 1)]
        return f"Subtraction table for {a}:\n" + "\n".join(rows)
    rows = [f"{a} x {b} = {a * b}" for b in range(1, count + 1)]
    return f"Multiplication table for {a}:\n" + "\n".join(rows)


def counting(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        start = rng.randrange(len(DAYS))
        seq = [DAYS[(start + i) % 7] for i in range(rng.randint(5, 10))]
        return f"The days after {DAYS[start - 1]} are " + ", ".join(seq) + "."
    if kind < 0.4:
        start = rng.randrange(12)
        seq = [MONTHS[(start + i) % 12] for i in range(rng.randint(5, 12))]
        return f"Counting months from {MONTHS[start]}: " + ", ".join(seq) + "."
    step = rng.choice([1, 1, 2, 5, 10])
    start = rng.randrange(0, 900)
    seq = [str(start + step * i) for i in range(rng.randint(8, 20))]
    return f"Counting by {step} from {start}: " + ", ".join(seq) + "."


def shopping_list(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    items = rng.sample(FOODS, rng.randint(3, 7))
    lines = [f"{name} made a shopping list for {rng.choice(DAYS)}."]
    lines += [f"{i}. {rng.randint(1, 6)} {item}" for i, item in enumerate(items, 1)]
    lines.append(f"{name} went to the market and bought everything on the list.")
    return "\n".join(lines)


def room_list(rng: random.Random) -> str:
    room = rng.choice(ROOMS)
    things = rng.sample(OBJECTS, rng.randint(3, 6))
    colored = [f"{_a(rng.choice(COLORS))} {t}" for t in things]
    return f"In the {room} there is " + ", ".join(colored[:-1]) + f" and {colored[-1]}. " + (
        f"There are {NUMBER_WORDS[len(things)]} things in the {room}."
    )


def dialogue(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    feeling, activity = rng.choice(FEELINGS), rng.choice(ACTIVITIES)
    time = rng.choice(["morning", "afternoon", "evening"])
    lines = [
        f"{a}: Good {time}, {b}!",
        f"{b}: Good {time}, {a}! How are you?",
        f"{a}: I am {feeling}, thank you. And you?",
        f"{b}: I am {rng.choice(FEELINGS)} too. What do you want to do today?",
        f"{a}: I want to {activity}. Do you want to come?",
    ]
    if rng.random() < 0.7:
        lines += [f"{b}: Yes! I would love to {activity}.", f"{a}: Great, let us go now."]
    else:
        lines += [
            f"{b}: Sorry, I have to help my {rng.choice(FAMILY)} today.",
            f"{a}: That is fine. Maybe on {rng.choice(DAYS)}.",
        ]
    lines.append(f"{b}: See you later, {a}!")
    return "\n".join(lines)


def animal_facts(rng: random.Random) -> str:
    chosen = rng.sample(sorted(ANIMALS), rng.randint(1, 3))
    parts = []
    for animal in chosen:
        plural, sound, legs, food, home, kind = ANIMALS[animal]
        says = "does not make much noise" if sound == "nothing" else f'says "{sound}"'
        parts.append(
            f"The {animal} is {_a(kind)}. The {animal} {says}. "
            f"{_a(animal).capitalize()} has {NUMBER_WORDS[legs]} legs. "
            f"{plural.capitalize()} like to eat {food} and live in the {home}."
        )
    return " ".join(parts)


def recipe(rng: random.Random) -> str:
    dish = rng.choice(sorted(DISHES))
    ings = DISHES[dish]
    a, b, c = ings[0], ings[1], ings[-1]
    steps = [s.format(ings=dish + " things", a=a, b=b, c=c, n=rng.randint(2, 10)) for s in COOKING_STEPS]
    keep = sorted(rng.sample(range(len(steps)), rng.randint(4, len(steps))))
    lines = [f"How to make {dish}.", "You will need: " + ", ".join(ings) + "."]
    lines += [f"Step {i}: {steps[k].capitalize()}." for i, k in enumerate(keep, 1)]
    lines.append(f"Now your {dish} is ready. Enjoy!")
    return "\n".join(lines)


def letter(rng: random.Random) -> str:
    writer, reader = rng.sample(NAMES, 2)
    place, month = rng.choice(PLACES), rng.choice(MONTHS)
    activity, feeling = rng.choice(ACTIVITIES), rng.choice(FEELINGS)
    return "\n".join(
        [
            f"Dear {reader},",
            f"I hope you are well. It is {month} and I am in the {place}.",
            f"Yesterday I went to {activity} with my {rng.choice(FAMILY)}. I was very {feeling}.",
            f"Tomorrow I will {rng.choice(ACTIVITIES)}. Please write back soon.",
            f"Love, {writer}",
        ]
    )


KINDS = [
    (story, 30),
    (arithmetic, 15),
    (counting, 10),
    (shopping_list, 8),
    (room_list, 7),
    (dialogue, 15),
    (animal_facts, 7),
    (recipe, 4),
    (letter, 4),
]


def document(rng: random.Random) -> str:
    """One to three short pieces of one kind, so documents vary in length."""
    make = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    return "\n\n".join(make(rng) for _ in range(rng.choice([1, 1, 2, 3])))


def make_documents(n: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]


# ---------------------------------------------------------------- byte-level BPE


def train_bpe(texts: list[str], num_tokens: int) -> list[bytes]:
    """Byte-level BPE on Llama 3 pre-tokens; returns the tokens in rank order.

    Pair counts are updated incrementally: only the words holding the merged pair change.
    Ties go to the lexicographically smallest pair of byte strings, so the result is stable.
    """
    pat = regex.compile(LLAMA3_PATTERN)
    word_counts: Counter[bytes] = Counter()
    for text in texts:
        word_counts.update(m.encode("utf-8") for m in pat.findall(text))
    words = [[bytes([b]) for b in w] for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: Counter[tuple[bytes, bytes]] = Counter()
    where: defaultdict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)

    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < num_tokens and pair_counts:
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < 2:
            break
        merged = best[0] + best[1]
        vocab.append(merged)
        for i in sorted(where.pop(best)):
            word, f = words[i], freqs[i]
            for pair in zip(word, word[1:]):  # remove this word's old pairs
                pair_counts[pair] -= f
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            new, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    new.append(merged)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            words[i] = new
            for pair in zip(new, new[1:]):  # and add its new ones
                pair_counts[pair] += f
                where[pair].add(i)
        pair_counts.pop(best, None)
    return vocab


def write_tiktoken(vocab: list[bytes], path: Path) -> None:
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(vocab)]
    path.write_text("".join(lines))


def write_hf_tokenizer(texts: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.write_text(tok.to_str(pretty=False) + "\n")


def write_hf_assets_folder(tokenizer_json: Path, folder: Path) -> None:
    """``model.hf_assets_path``'s layout: tokenizer.json and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_bundled(texts: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.jsonl"):
        old.unlink()
    for part, start in enumerate(range(0, len(texts), DOCS_PER_FILE)):
        chunk = texts[start : start + DOCS_PER_FILE]
        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk]
        (out / f"part-{part:05d}.jsonl").write_text("".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "assets"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    texts = make_documents(NUM_DOCUMENTS)
    write_bundled(texts, out / "bundled")
    vocab = train_bpe(texts, NUM_BASE_TOKENS)
    write_tiktoken(vocab, out / "test_tiktoken.model")
    write_hf_tokenizer(texts, NUM_BASE_TOKENS + 2, out / "test_tokenizer.json")
    write_hf_assets_folder(out / "test_tokenizer.json", out / "tokenizer")
    size = sum(len(t.encode()) for t in texts)
    print(f"{len(texts)} documents ({size / 1e6:.2f} MB) in {out / 'bundled'}; {len(vocab)} BPE tokens")


if __name__ == "__main__":
    main()
