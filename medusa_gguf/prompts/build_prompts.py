#!/usr/bin/env python3
"""Build the prompt set for Medusa self-distillation (train.jsonl) and held-out evaluation (heldout.jsonl).

Every prompt is composed by this script from templates and topic/entity lists that were written by hand for
this project; nothing is taken from an existing prompt data set. The output is fully deterministic (fixed
seed, standard library only), so re-running the script reproduces the committed files byte for byte:

    python medusa_gguf/prompts/build_prompts.py            # writes next to this file
    python medusa_gguf/prompts/build_prompts.py OUT_DIR    # writes into OUT_DIR instead

Held-out prompts are made from topics and entities reserved for held-out use only: each topic list (and the
shared lists of first names, towns and cities) is split once, by a fixed seed, into a training part and a
held-out part, and the two files are generated from their own parts. On top of that, the builder refuses to
write a held-out prompt whose text also appears in the training file, and it never writes a duplicate.

Each output line is a JSON object: {"prompt": "...", "category": "..."}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

SEED = 1729

# Prompts per category. Held-out has at least 20 of every category.
TRAIN_COUNTS = {
    "writing": 330,
    "reasoning": 300,
    "math": 300,
    "code": 300,
    "extraction": 270,
    "stem": 300,
    "humanities": 300,
    "summarization": 270,
    "rewriting": 270,
    "roleplay": 180,
    "advice": 180,
}
HELDOUT_COUNTS = {
    "writing": 22,
    "reasoning": 22,
    "math": 22,
    "code": 22,
    "extraction": 22,
    "stem": 22,
    "humanities": 22,
    "summarization": 22,
    "rewriting": 22,
    "roleplay": 21,
    "advice": 21,
}
CATEGORIES = tuple(TRAIN_COUNTS)
SPLITS = ("train", "heldout")

# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def an(phrase: str) -> str:
    """Prefix `phrase` with the right indefinite article."""
    word = phrase.split()[0].lower().strip("`'\"")
    if word.startswith(("uni", "use", "usb", "one", "eu")):
        return "a " + phrase
    if word.startswith(("hour", "honest", "heir")):
        return "an " + phrase
    return ("an " if word[:1] in "aeiou" else "a ") + phrase


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def num(x: float) -> str:
    """2.0 -> '2', 2.5 -> '2.5'."""
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def money(x: float) -> str:
    if abs(x - round(x)) < 1e-9:
        return f"${int(round(x)):,}"
    return f"${x:,.2f}"


def join_and(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def quote_list(keys: Sequence[str]) -> str:
    return join_and([f'"{k}"' for k in keys])


NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
ORDINALS = ["second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def fmt_date(d: datetime.date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def dates(r: random.Random, k: int, first_year: int = 2021, last_year: int = 2025) -> list[str]:
    """k increasing dates, at least a few days apart."""
    d = datetime.date(r.randint(first_year, last_year - 1), r.randint(1, 12), r.randint(1, 28))
    out = []
    for _ in range(k):
        out.append(fmt_date(d))
        d = d + datetime.timedelta(days=r.randint(3, 60))
    return out


def clock(r: random.Random, lo: int = 7, hi: int = 19) -> str:
    h = r.randint(lo, hi)
    m = r.choice([0, 15, 30, 45])
    suffix = "a.m." if h < 12 else "p.m."
    h12 = h if h <= 12 else h - 12
    return f"{h12}:{m:02d} {suffix}"


class Pool:
    """Hands out items in shuffled rounds, so every item is used once before any repeats."""

    def __init__(self, items: Sequence, rng: random.Random):
        if not items:
            raise ValueError("empty pool")
        self.items = list(items)
        self.rng = rng
        self.queue: list = []

    def __call__(self):
        if not self.queue:
            self.queue = self.items[:]
            self.rng.shuffle(self.queue)
        return self.queue.pop()

    def several(self, k: int) -> list:
        out: list = []
        for _ in range(100 * k):
            x = self()
            if x not in out:
                out.append(x)
                if len(out) == k:
                    return out
        raise ValueError("pool too small")


def split(items: Sequence, n_heldout: int | None, tag: str) -> dict[str, list]:
    """Reserve n_heldout items (about a fifth by default) for held-out use; the rest are for training."""
    items = list(items)
    if len(set(items)) != len(items):
        raise ValueError(f"duplicate entries in list {tag!r}")
    if n_heldout is None:
        n_heldout = max(2, round(len(items) * 0.2))
    order = list(range(len(items)))
    random.Random(f"{SEED}:split:{tag}").shuffle(order)
    held = set(order[:n_heldout])
    return {
        "train": [x for i, x in enumerate(items) if i not in held],
        "heldout": [x for i, x in enumerate(items) if i in held],
    }


def weighted(r: random.Random, options: Sequence[tuple[float, Callable[[], str]]]) -> str:
    weights = [w for w, _ in options]
    fn = r.choices([f for _, f in options], weights=weights)[0]
    return fn()


def compose(r: random.Random, must: Sequence[tuple[str, Sequence[str]]],
            extras: Sequence[tuple[str, Sequence[str]]], lo: int = 1, hi: int = 3) -> tuple[str, list[str]]:
    """A passage: all `must` sentences, then lo..hi of the `extras` in their original order.

    Each sentence comes with the kinds of information it holds; the sorted union is returned with the text."""
    k = r.randint(lo, min(hi, len(extras)))
    picked = sorted(r.sample(range(len(extras)), k))
    chosen = list(must) + [extras[i] for i in picked]
    kinds = sorted({kind for _, ks in chosen for kind in ks})
    return " ".join(text for text, _ in chosen), kinds


# ----------------------------------------------------------------------------------------------------------
# Shared entity lists (names, surnames, places), written for this project. Towns are invented.
# ----------------------------------------------------------------------------------------------------------

FIRST_NAMES = [
    "Amara", "Ben", "Chloe", "Daniel", "Elif", "Farah", "George", "Hana", "Ivan", "Jade", "Kofi", "Lena",
    "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Ximena",
    "Yusuf", "Zoe", "Aisha", "Bruno", "Carmen", "Dev", "Emma", "Felix", "Gita", "Hugo", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Nikhil", "Olga", "Pablo", "Ravi", "Sofia", "Tomas", "Uma", "Victor", "Wanjiru",
    "Yara", "Zain", "Anya", "Leo", "Mei", "Noah", "Omar", "Petra", "Rhea", "Sven", "Thandiwe", "Ulla",
    "Valentina", "Arjun", "Beatriz", "Caleb", "Dalia", "Emil", "Fatima", "Gabriel", "Hiroshi", "Isla",
    "Jamal", "Kira", "Lucas", "Mira", "Nora", "Oliver", "Paloma", "Rafael", "Selin", "Tobias",
]
SURNAMES = [
    "Adeyemi", "Bauer", "Castillo", "Dubois", "Eriksen", "Fischer", "Gupta", "Haddad", "Ito", "Jansen",
    "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Rossi", "Santos", "Tanaka",
    "Usman", "Varga", "Walsh", "Xu", "Yilmaz", "Zhang", "Abbott", "Brennan", "Costa", "Delgado", "Evans",
    "Fernandes", "Greene", "Horvat", "Iqbal", "Jovanovic", "Kim", "Lopez", "Mensah", "Novak",
]
TOWNS = [
    "Millbrook", "Pinecrest", "Oakhaven", "Fernley", "Willowmere", "Stonebridge", "Brightwater", "Ravensby",
    "Elmstead", "Kestrel Bay", "Larkfield", "Thornwick", "Harbourne", "Glenmoor", "Redcliff", "Ambervale",
    "Foxley", "Westmarch", "Copperton", "Silverdale", "Hollowell", "Bramblewood", "Northwick", "Seabrook",
    "Dunmore", "Ivybridge", "Maplewick", "Ashcombe", "Rosehill", "Kingsmere", "Lowfield", "Bellhaven",
    "Sunmere", "Greystone", "Clearwater", "Birchmoor", "Eastwold", "Tidewater", "Heathcote", "Winterbourne",
]
CITIES = [
    "Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Krakow", "Hanoi", "Cape Town", "Oslo", "Melbourne",
    "Marrakesh", "Seoul", "Dublin", "Bogota", "Istanbul", "Vancouver", "Edinburgh", "Mumbai", "Santiago",
    "Helsinki", "Accra", "Prague", "Auckland", "Montreal", "Vienna", "Bangkok", "Buenos Aires", "Copenhagen",
    "Cairo", "Manila", "Porto", "Kyoto", "Athens", "Reykjavik", "Singapore", "Zurich", "Lagos", "Seville",
    "Tallinn", "Quito",
]
COMPANIES = [
    "Bluebell Foods", "Northwind Tools", "Cobalt Design", "Greenleaf Energy", "Harbourline Shipping",
    "Maple & Stone Architects", "Silverline Software", "Sunrise Textiles", "Redkite Media", "Orchard Health",
    "Lumen Labs", "Kestrel Logistics", "Pebble Toys", "Tidewell Water", "Brightpath Education",
    "Copperleaf Furniture", "Fieldstone Farms", "Quayside Books",
]
STREETS = [
    "Harbour Street", "Elm Road", "Mill Lane", "Station Road", "Church Street", "Market Square", "River Walk",
    "Orchard Avenue", "Bridge Street", "Chapel Lane", "Queen's Road", "Willow Close",
]

NAME_SPLIT = split(FIRST_NAMES, 16, "first-names")
TOWN_SPLIT = split(TOWNS, 8, "towns")
CITY_SPLIT = split(CITIES, 8, "cities")


class Entities:
    """Name and place pools for one split."""

    def __init__(self, split_name: str, r: random.Random):
        self.first = Pool(NAME_SPLIT[split_name], r)
        self.last = Pool(SURNAMES, r)
        self.town = Pool(TOWN_SPLIT[split_name], r)
        self.city = Pool(CITY_SPLIT[split_name], r)
        self.company = Pool(COMPANIES, r)

    def person(self) -> str:
        return f"{self.first()} {self.last()}"

    def people(self, k: int) -> list[str]:
        firsts = self.first.several(k)
        lasts = self.last.several(k)
        return [f"{f} {l}" for f, l in zip(firsts, lasts)]


def first_name(full: str) -> str:
    return full.split()[0]


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------

WRITING_FORMS = [
    "poem", "short story", "haiku", "limerick", "diary entry", "fable", "song verse", "descriptive paragraph",
    "letter to a friend", "short speech", "bedtime story", "news report", "dialogue between two friends",
    "postcard message", "riddle", "opening paragraph of a novel", "short play scene", "travel journal entry",
    "free-verse poem", "children's rhyme",
]
WRITING_TONES = [
    "cheerful", "gentle", "funny", "wistful", "hopeful", "mysterious", "nostalgic", "calm", "playful",
    "dramatic", "uplifting", "thoughtful",
]
WRITING_AUDIENCES = [
    "young children", "teenagers", "a school newsletter", "a local newspaper", "a class of ten-year-olds",
    "a community magazine", "a greeting card", "a school assembly",
]
WRITING_TOPICS = [
    "a lighthouse keeper on a stormy night", "the first snowfall of winter", "a lost umbrella",
    "a robot learning to paint", "a rooftop garden in a big city", "an old bicycle", "the smell of rain",
    "a cat who thinks it is a dog", "a friendship between a fox and a crow", "the last day of summer",
    "a train journey through the mountains", "a baker who wakes before dawn", "a forgotten library book",
    "the moon watching over a small town", "a child's first day at school", "a ship lost in the fog",
    "a dragon who is afraid of the dark", "a market on a busy Saturday morning", "a grandmother's kitchen",
    "a tree that has stood for five hundred years", "a letter found in a bottle",
    "an astronaut looking back at Earth", "a quiet morning by a lake", "a musician playing in the subway",
    "a village during a power cut", "a snowman who wants to see the spring", "the sound of a thunderstorm",
    "two strangers sharing an umbrella", "a clock that runs backwards", "a garden in autumn",
    "a street dog finding a home", "the view from a mountain top", "a firefly on a summer evening",
    "a lonely satellite", "a forest growing back after a fire", "a kite caught in a tree",
    "a fisherman at sunrise", "an abandoned amusement park", "a map to a hidden island",
    "the first day of spring", "a bee visiting a sunflower", "a broken violin", "a desert at night",
    "a penguin who wants to fly", "a teacher's last day before retirement", "a paper boat in a puddle",
    "a small bookshop on a rainy day", "geese flying south for the winter", "a city at midnight",
    "a message from the future", "a pair of old boots", "an owl that cannot sleep", "a festival of lanterns",
    "a winter cabin in the woods", "a beekeeper and her hives", "a lost glove on a park bench",
    "the tide coming in", "a mouse living in a museum", "a volcano waking up", "a cup of tea on a cold morning",
    "an old family photograph", "a rainbow after a storm", "a homesick student abroad",
    "a clockmaker's workshop", "a whale singing in the deep ocean", "the silence after snowfall",
    "a sandcastle before the waves arrive", "a hot-air balloon ride", "a noisy rooster next door",
    "an orchard at harvest time", "a runner finishing her first marathon", "a bus stop in the rain",
    "a seed that refuses to grow", "a cloud that wants to be a mountain", "the last bus home",
]
WRITING_TASKS = [
    "a thank-you note to a teacher who helped you prepare for an exam",
    "an email to a neighbour asking them to water your plants while you are away",
    "a short message congratulating a colleague on a promotion",
    "an invitation to a picnic in the park next Saturday",
    "a polite complaint to a restaurant about a cold meal",
    "a notice asking residents to keep the building's hallway clear",
    "a short apology to a friend for missing their birthday party",
    "a product description for a reusable water bottle",
    "a product description for a wooden chess set",
    "a job advertisement for a part-time bakery assistant",
    "a welcome message for new members of a hiking club",
    "a short review of an imaginary seaside cafe",
    "a poster about a lost grey cat",
    "a toast for a friend's wedding",
    "a short bio for a freelance photographer's website",
    "a reminder email about a team meeting on Monday morning",
    "a letter to the town council asking for more bike lanes",
    "the opening paragraph of a cover letter for a library assistant job",
    "an out-of-office reply for a week-long holiday",
    "a farewell message for a coworker who is moving abroad",
    "a short advertisement for a neighbourhood yard sale",
    "a note to a landlord reporting a leaking tap",
    "instructions for a houseguest on how to feed the cat",
    "a short announcement that the school play has been postponed",
    "a message inviting classmates to form a study group",
    "a thank-you email to a host after a dinner party",
    "a short description of a walking tour of an old town",
    "a menu description for a roasted vegetable soup",
    "a request to a manager for a day off next Friday",
    "a get-well-soon card for a classmate",
    "a short newsletter update for a community garden",
    "a friendly reminder to return borrowed library books",
    "a short speech to open a school science fair",
    "a message to a group chat planning a weekend camping trip",
    "a review of a made-up board game about space pirates",
    "a short post celebrating a team's finished project",
    "a text message cancelling a dentist appointment",
    "a short sales pitch for a lemonade stand",
    "the opening of a recommendation letter for a hard-working student",
    "a sign asking park visitors not to feed the ducks bread",
    "a birthday message for a grandfather turning eighty",
    "a rental listing for a small seaside cottage",
    "a short note of sympathy to a colleague whose pet died",
    "a short welcome speech for a new employee",
    "a note to parents about an upcoming class trip to a museum",
]
WRITING_OPENINGS = [
    "The key was not where I had left it.",
    "Nobody in the village had ever seen a blue apple before.",
    "The last train of the night stopped at a station that was not on the map.",
    "My grandmother kept one locked drawer in her kitchen.",
    "The robot at the front desk smiled for the first time on a Tuesday.",
    "When the snow finally melted, the statue in the square was gone.",
    "The letter arrived forty years late.",
    "Every evening at six, the old man fed the pigeons exactly seven crumbs.",
    "The map had a small red cross drawn in pencil.",
    "I heard the piano playing, but there was no one in the house.",
    "On the first day of the holidays, the river turned silver.",
    "The shop sold only one thing: umbrellas that worked in the sun.",
    "The new girl in class could talk to birds.",
    "Our lighthouse went dark for the first time in a hundred years.",
    "The bakery on the corner opened at midnight, and only for one night.",
    "Someone had planted sunflowers in the middle of the car park.",
    "The parcel was addressed to me, in my own handwriting.",
    "It was the quietest football match anyone could remember.",
    "The elevator had a thirteenth floor button that nobody had noticed before.",
    "Grandpa's old radio started playing tomorrow's news.",
    "The cat came home wearing a tiny silver bell that was not ours.",
    "At the end of the garden, behind the shed, there was a door.",
    "The museum guard swore the painting had changed overnight.",
    "We had been walking for three hours when the path simply ended.",
    "The fog rolled in just as the ferry left the harbour.",
]

WRITING_LISTS = {
    "topics": split(WRITING_TOPICS, None, "writing-topics"),
    "tasks": split(WRITING_TASKS, None, "writing-tasks"),
    "openings": split(WRITING_OPENINGS, None, "writing-openings"),
}


def build_writing(s: str, r: random.Random) -> Callable[[], str]:
    topic = Pool(WRITING_LISTS["topics"][s], r)
    task = Pool(WRITING_LISTS["tasks"][s], r)
    opening = Pool(WRITING_LISTS["openings"][s], r)
    form = Pool(WRITING_FORMS, r)

    def creative() -> str:
        f, t = form(), topic()
        return r.choice([
            lambda: f"Write a short {f} about {t}.",
            lambda: f"Compose {an(f)} about {t}. Keep it under 150 words.",
            lambda: f"Write {an(r.choice(WRITING_TONES) + ' ' + f)} about {t}.",
            lambda: f"Please write {an(f)} about {t} for {r.choice(WRITING_AUDIENCES)}.",
            lambda: f"I need {an(f)} inspired by {t}. Can you write one?",
            lambda: f"Write {an(f)} about {t}, using vivid but simple language.",
        ])()

    def practical() -> str:
        t = task()
        return r.choice([
            f"Write {t}.",
            f"Please draft {t}.",
            f"Help me write {t}. Keep it short.",
            f"Could you write {t}? About 100 words is enough.",
            f"Write {t} in a friendly tone.",
        ])

    def story_start() -> str:
        o = opening()
        return r.choice([
            f'Write a short story that begins with the sentence: "{o}"',
            f'Continue this story in about 150 words: "{o}"',
            f'Use this first line to write a very short story: "{o}"',
            f'Start a story with "{o}" and finish it in two paragraphs.',
        ])

    return lambda: weighted(r, [(0.55, creative), (0.3, practical), (0.15, story_start)])


# ----------------------------------------------------------------------------------------------------------
# reasoning
# ----------------------------------------------------------------------------------------------------------

ORDER_ATTRS = [
    ("is taller than", "Who is the tallest?", "Who is the shortest?", "from tallest to shortest"),
    ("is older than", "Who is the oldest?", "Who is the youngest?", "from oldest to youngest"),
    ("runs faster than", "Who is the fastest runner?", "Who is the slowest runner?", "from fastest to slowest"),
    ("arrived earlier than", "Who arrived first?", "Who arrived last?", "in the order they arrived"),
    ("has more books than", "Who has the most books?", "Who has the fewest books?",
     "from most books to fewest"),
    ("lives closer to the school than", "Who lives closest to the school?",
     "Who lives farthest from the school?", "from closest to the school to farthest"),
    ("scored higher than", "Who got the highest score?", "Who got the lowest score?",
     "from highest score to lowest"),
    ("woke up earlier than", "Who woke up first?", "Who woke up last?", "in the order they woke up"),
    ("read more pages than", "Who read the most pages?", "Who read the fewest pages?",
     "from most pages read to fewest"),
    ("finished the puzzle before", "Who finished the puzzle first?", "Who finished the puzzle last?",
     "in the order they finished the puzzle"),
]
SYLLOGISM_TERMS = [
    ("sparrows", "birds", "animals", "brown"), ("tulips", "flowers", "plants", "red"),
    ("violins", "string instruments", "musical instruments", "very old"), ("hammers", "tools", "objects", "heavy"),
    ("oak trees", "trees", "living things", "hollow"), ("salmon", "fish", "animals", "silver"),
    ("poodles", "dogs", "mammals", "small"), ("novels", "books", "objects", "long"),
    ("squares", "rectangles", "shapes", "blue"), ("cars", "vehicles", "machines", "electric"),
    ("sonnets", "poems", "texts", "sad"), ("rubies", "gemstones", "minerals", "expensive"),
    ("apples", "fruits", "foods", "sour"), ("trumpets", "brass instruments", "musical instruments", "loud"),
    ("beetles", "insects", "animals", "shiny"), ("laptops", "computers", "machines", "slow"),
    ("carrots", "vegetables", "plants", "orange"), ("owls", "birds", "animals", "awake at night"),
    ("bicycles", "vehicles", "objects", "red"), ("lemons", "citrus fruits", "fruits", "sour"),
    ("ferries", "boats", "vehicles", "crowded"), ("mushrooms", "fungi", "living things", "poisonous"),
]
# (if-part, then-part, fact denying the then-part, conclusion denying the if-part, fact affirming the
# then-part, conclusion affirming the if-part)
CONDITIONALS = [
    ("it rains on Saturday", "the picnic will be moved indoors", "The picnic was not moved indoors.",
     "it did not rain on Saturday", "The picnic was moved indoors.", "it rained on Saturday"),
    ("the shop sells out of bread", "the baker puts a sign in the window", "There is no sign in the window.",
     "the shop has not sold out of bread", "There is a sign in the window.", "the shop has sold out of bread"),
    ("a number is divisible by 6", "it is divisible by 3", "The number 25 is not divisible by 3.",
     "25 is not divisible by 6", "The number 21 is divisible by 3.", "21 is divisible by 6"),
    ("the alarm is switched on", "the light on the panel is red", "The light on the panel is green.",
     "the alarm is switched off", "The light on the panel is red.", "the alarm is switched on"),
    ("a plant gets no water for a month", "it wilts", "The fern on the windowsill has not wilted.",
     "the fern has had some water this month", "The fern on the windowsill has wilted.",
     "the fern got no water for a month"),
    ("the train is more than ten minutes late", "passengers get a free coffee",
     "Nobody got a free coffee this morning.", "the morning train was not more than ten minutes late",
     "Passengers got a free coffee this morning.", "the morning train was more than ten minutes late"),
    ("the museum is open", "the flag on its roof is raised", "The flag on the roof is not raised today.",
     "the museum is closed today", "The flag on the roof is raised today.", "the museum is open today"),
    ("an animal is a mammal", "it has a backbone", "A jellyfish has no backbone.", "a jellyfish is not a mammal",
     "A frog has a backbone.", "a frog is a mammal"),
    ("the road is icy", "the school bus drives slowly", "The school bus is not driving slowly today.",
     "the road is not icy today", "The school bus is driving slowly today.", "the road is icy today"),
    ("an object is made of iron", "a magnet attracts it", "The magnet does not attract this key.",
     "the key is not made of iron", "The magnet attracts this key.", "the key is made of iron"),
    ("the team wins on Sunday", "it reaches the final", "The team did not reach the final.",
     "the team did not win on Sunday", "The team reached the final.", "the team won on Sunday"),
    ("the oven is hot", "the small light on its front is on", "The small light is off.",
     "the oven is not hot", "The small light is on.", "the oven is hot"),
    ("a shape is a square", "it has four sides", "This shape has five sides.", "the shape is not a square",
     "This shape has four sides.", "the shape is a square"),
    ("the meeting is cancelled", "an email is sent to all staff", "No email was sent to staff today.",
     "today's meeting was not cancelled", "An email was sent to all staff today.",
     "today's meeting was cancelled"),
    ("it is below freezing overnight", "the pond freezes", "The pond did not freeze last night.",
     "it was not below freezing last night", "The pond froze last night.", "it was below freezing last night"),
    ("a customer spends over $50", "they get free delivery", "Marta did not get free delivery.",
     "Marta did not spend over $50", "Marta got free delivery.", "Marta spent over $50"),
    ("the password is correct", "the door unlocks", "The door did not unlock.",
     "the password typed in was wrong", "The door unlocked.", "the password typed in was correct"),
    ("a fruit is a citrus fruit", "it contains vitamin C", "This fruit has no vitamin C.",
     "this fruit is not a citrus fruit", "This fruit contains vitamin C.", "this fruit is a citrus fruit"),
    ("the concert is sold out", "the box office closes early", "The box office stayed open late.",
     "the concert is not sold out", "The box office closed early.", "the concert is sold out"),
    ("the printer runs out of paper", "it beeps three times", "The printer has not beeped.",
     "the printer still has paper", "The printer beeped three times.", "the printer is out of paper"),
    ("the bridge is closed", "buses take the long route", "The buses took the short route today.",
     "the bridge was open today", "The buses took the long route today.", "the bridge was closed today"),
    ("a student scores over 90", "they receive a certificate", "Bilal did not receive a certificate.",
     "Bilal did not score over 90", "Bilal received a certificate.", "Bilal scored over 90"),
]
COMPARISON_PAIRS = [
    ("a bicycle", "a car", "getting around a busy city centre"),
    ("email", "a handwritten letter", "thanking someone for a gift"),
    ("a library", "a bookshop", "a student on a tight budget"),
    ("a laptop", "a desktop computer", "someone who travels often"),
    ("a dog", "a cat", "a family living in a small flat"),
    ("a train", "a plane", "a 500-kilometre journey"),
    ("a tent", "a hotel", "a weekend in the countryside"),
    ("paper books", "e-readers", "reading on a long holiday"),
    ("studying alone", "studying in a group", "preparing for a maths exam"),
    ("a microwave", "an oven", "reheating leftovers"),
    ("solar power", "wind power", "a sunny region with little wind"),
    ("walking", "swimming", "exercise for someone with sore knees"),
    ("a debit card", "cash", "buying coffee at a small market stall"),
    ("a phone call", "a text message", "telling a friend you will be late"),
    ("a paper notebook", "a note-taking app", "taking notes in lectures"),
    ("renting a flat", "buying a house", "someone who may move to another city in two years"),
    ("a museum visit", "a documentary film", "learning about ancient Egypt"),
    ("tap water", "bottled water", "everyday drinking at home"),
    ("a city holiday", "a beach holiday", "a family with young children"),
    ("wool", "cotton", "a winter jumper"),
    ("a whiteboard", "a paper flip chart", "a team brainstorming session"),
    ("a bus", "a tram", "a growing city"),
    ("honey", "sugar", "sweetening tea"),
    ("a podcast", "a radio show", "learning something during a daily commute"),
    ("a spreadsheet", "a paper notebook", "tracking a monthly budget"),
    ("a paper map", "a GPS app", "hiking in a remote area"),
    ("glass bottles", "plastic bottles", "a school trip lunch"),
    ("morning exercise", "evening exercise", "someone who works long days"),
    ("video lessons", "in-person classes", "learning to play the piano"),
    ("an electric kettle", "a stovetop kettle", "a small student kitchen"),
    ("a shared wiki", "an email thread", "sharing project notes with a team"),
    ("a desk lamp", "ceiling lights", "reading at night"),
    ("a digital camera", "a smartphone camera", "photographing wildlife"),
    ("LED bulbs", "old incandescent bulbs", "lighting a home cheaply"),
    ("a fountain pen", "a ballpoint pen", "writing a long exam"),
    ("board games", "video games", "a family evening"),
    ("a farmers' market", "a supermarket", "buying fresh vegetables"),
    ("washing dishes by hand", "using a dishwasher", "a household of two people"),
    ("a sofa bed", "a guest bed", "a small apartment with occasional visitors"),
    ("an external hard drive", "cloud storage", "backing up family photos"),
    ("a private diary", "a public blog", "recording daily thoughts"),
    ("a running track", "a forest trail", "training for a first 5 km race"),
    ("a ceramic mug", "a paper cup", "an office kitchen"),
    ("a scooter", "a bicycle", "a 3-kilometre commute"),
]
CAUSE_SCENARIOS = [
    "a town's only bridge closed for a month", "a school started lessons one hour later in the morning",
    "the price of coffee doubled overnight", "bees disappeared from a farming region",
    "a city made all public buses free", "a small island lost its internet connection for a week",
    "every home in a street installed solar panels", "a popular park banned cars from its roads",
    "a supermarket stopped giving out plastic bags", "a company let all its staff work from home",
    "a village got its first train station", "a heatwave lasted for three weeks",
    "a large factory closed in a small town", "a library started lending tools as well as books",
    "a country switched to a four-day school week",
    "all restaurants in a city had to show calorie counts on their menus",
    "a polluted river was cleaned and reopened for swimming", "a town planted a tree on every street",
    "a popular online game was shut down", "a city banned fireworks on New Year's Eve",
    "a company doubled the pay of its lowest-paid workers", "a school stopped giving homework to younger pupils",
    "a mobile phone network went down for a whole day", "the only supermarket in a village closed",
    "a new motorway was built next to a quiet town", "a city put a tax on sugary drinks",
    "a college made all its textbooks free online", "a sports stadium was built in a residential area",
    "a country had a much colder winter than usual", "a fishing village saw its fish stocks fall sharply",
    "a city put bike-sharing stations on every corner", "a hospital made parking free for visitors",
    "a music festival tripled the number of tickets it sold",
    "a town replaced all its street lights with dimmer LED lamps",
]
OBSERVATIONS = [
    "a houseplant's leaves turn yellow", "a bakery sell out of bread by nine every morning",
    "a student's grades drop suddenly in the middle of the year", "a shop's sales fall every February",
    "a car use more fuel in winter", "a quiet street become busy on Sunday mornings",
    "a dog start barking at night", "a popular restaurant close even though it always looked full",
    "a town's population grow quickly", "a lake's water turn green in summer",
    "a runner get slower despite training more", "a phone battery drain faster than it used to",
    "people queue outside a museum on the first day of every month",
    "a football team lose more often at away games", "a bus be late on the same route every day",
    "the price of strawberries rise in winter", "a company's website get slower at lunchtime",
    "birds stop visiting a garden feeder", "a cake sink in the middle after baking",
    "a bicycle tyre go flat overnight", "a cinema be empty on a sunny Saturday",
    "a child suddenly refuse to eat vegetables", "a river flood more often than it did fifty years ago",
    "a library become busier during exam season", "a coffee shop offer free refills",
    "a tomato plant grow tall but produce few tomatoes", "tickets for a concert sell out in minutes",
    "a new cafe be busier than the older one next door", "a town's shops close early on Wednesdays",
    "a student remember songs more easily than history dates",
]
ODD_ONE_OUT = [
    ("apple", "banana", "cherry", "carrot"), ("violin", "cello", "harp", "trumpet"),
    ("Mars", "Venus", "Jupiter", "the Moon"), ("eagle", "sparrow", "owl", "bat"),
    ("whale", "dolphin", "seal", "shark"), ("copper", "iron", "gold", "glass"),
    ("square", "triangle", "circle", "cube"), ("oak", "pine", "maple", "rose"),
    ("hammer", "saw", "screwdriver", "spoon"), ("red", "blue", "yellow", "square"),
    ("January", "March", "July", "Monday"), ("4", "16", "36", "20"), ("salmon", "trout", "tuna", "frog"),
    ("kilogram", "gram", "tonne", "metre"), ("nose", "ear", "eye", "elbow"),
    ("bicycle", "car", "bus", "canoe"), ("tulip", "daisy", "sunflower", "fern"),
    ("penguin", "ostrich", "emu", "pigeon"), ("sonnet", "haiku", "limerick", "novel"),
    ("ice", "steam", "water", "salt"), ("lion", "tiger", "leopard", "wolf"),
    ("pen", "pencil", "crayon", "eraser"), ("oxygen", "nitrogen", "helium", "water"),
    ("Mercury", "Venus", "Earth", "Pluto"), ("piano", "guitar", "drum", "microphone"),
    ("bread", "rice", "pasta", "cheese"), ("spring", "summer", "autumn", "Tuesday"),
    ("3", "5", "7", "9"), ("Nile", "Amazon", "Danube", "Sahara"), ("thermometer", "ruler", "scale", "spoon"),
    ("keyboard", "mouse", "monitor", "sofa"), ("breakfast", "lunch", "dinner", "kitchen"),
]

REASONING_LISTS = {
    "syllogisms": split(SYLLOGISM_TERMS, None, "syllogisms"),
    "conditionals": split(CONDITIONALS, None, "conditionals"),
    "comparisons": split(COMPARISON_PAIRS, None, "comparisons"),
    "causes": split(CAUSE_SCENARIOS, None, "causes"),
    "observations": split(OBSERVATIONS, None, "observations"),
    "odd": split(ODD_ONE_OUT, None, "odd-one-out"),
}
# Number sequences: the step sizes and ratios are reserved per split.
SEQUENCE_STEPS = {"train": [2, 3, 4, 5, 6, 10, 11, 15, 20, 25], "heldout": [7, 8, 9, 12]}
SEQUENCE_RATIOS = {"train": [2, 3], "heldout": [4]}


def build_reasoning(s: str, r: random.Random) -> Callable[[], str]:
    E = Entities(s, r)
    L = {k: Pool(v[s], r) for k, v in REASONING_LISTS.items()}
    attr = Pool(ORDER_ATTRS, r)

    def ordering() -> str:
        k = r.choice([3, 3, 4])
        people = E.first.several(k)  # from first (highest) to last
        comp, q_high, q_low, order = attr()
        clues = [f"{people[i]} {comp} {people[i + 1]}." for i in range(k - 1)]
        r.shuffle(clues)
        text = " ".join(clues)
        question = r.choice([q_high, q_low])
        return r.choice([
            f"{text} {question} Explain your reasoning.",
            f"Here are some facts: {text} {question}",
            f"{text} Put the {NUMBER_WORDS[k]} people in order {order}.",
            f"Logic puzzle: {text} {question} Show how you worked it out.",
        ])

    def syllogism() -> str:
        a, b, c, d = L["syllogisms"]()
        return r.choice([
            f"All {a} are {b}, and all {b} are {c}. Does it follow that all {a} are {c}? Explain.",
            f"All {a} are {b}. Some {b} are {d}. Can we conclude that some {a} are {d}? Explain your answer.",
            f"All {a} are {b}. Does that mean all {b} are {a}? Explain why or why not.",
        ])

    def conditional() -> str:
        p, q, not_q, not_p, q_true, p_true = L["conditionals"]()
        return r.choice([
            f"If {p}, {q}. {not_q} Can we conclude that {not_p}? Explain your reasoning.",
            f"Rule: if {p}, then {q}. Fact: {not_q} What, if anything, follows? Explain.",
            f"If {p}, {q}. {q_true} Does that prove that {p_true}? Explain.",
            f"Rule: if {p}, then {q}. Fact: {q_true} Can we be certain that {p_true}? Why or why not?",
        ])

    def comparison() -> str:
        a, b, purpose = L["comparisons"]()
        return r.choice([
            f"Compare {a} and {b}. Give two similarities and two differences.",
            f"What are the main differences between {a} and {b}?",
            f"Which is better for {purpose}: {a} or {b}? Explain your reasoning.",
            f"Weigh up {a} and {b} for {purpose}. Which would you choose, and why?",
            f"List the pros and cons of {a} compared with {b}.",
        ])

    def cause() -> str:
        c = L["causes"]()
        return r.choice([
            f"What might happen if {c}? Give three possible consequences.",
            f"Imagine that {c}. What would be the likely effects, both good and bad?",
            f"If {c}, who would be affected and how?",
            f"Think through the chain of effects if {c}. Explain step by step.",
        ])

    def explanation() -> str:
        o = L["observations"]()
        return r.choice([
            f"Why might {o}? Give two possible explanations.",
            f"Why might {o}? Suggest a few likely reasons.",
            f"Why might {o}? Explain your reasoning briefly.",
            f"Come up with two reasonable explanations: why might {o}?",
        ])

    def sequence() -> str:
        if r.random() < 0.7:
            step = r.choice(SEQUENCE_STEPS[s])
            if r.random() < 0.7:
                start = r.randint(1, 30)
            else:
                step, start = -step, r.randint(6 * step, 6 * step + 40)
            seq = [start + i * step for i in range(5)]
        else:
            ratio = r.choice(SEQUENCE_RATIOS[s])
            start = r.randint(1, 5)
            seq = [start * ratio ** i for i in range(5)]
        text = ", ".join(str(x) for x in seq)
        return r.choice([
            f"What number comes next in the sequence {text}? Explain the pattern.",
            f"Find the next two numbers in the sequence {text}, and describe the rule you used.",
            f"Continue this pattern and explain it: {text}, ...",
        ])

    def odd_one_out() -> str:
        items = list(L["odd"]())
        r.shuffle(items)
        text = join_and(items)
        listed = ", ".join(items)
        return r.choice([
            f"Which one does not belong: {text}? Explain why.",
            f"Find the odd one out in this list and give your reason: {listed}.",
            f"Here are four words: {listed}. Which is the odd one out, and why?",
        ])

    return lambda: weighted(r, [
        (18, ordering), (10, syllogism), (12, conditional), (16, comparison), (14, cause), (12, explanation),
        (8, sequence), (10, odd_one_out),
    ])


# ----------------------------------------------------------------------------------------------------------
# math (every problem names a person, and first names are reserved per split)
# ----------------------------------------------------------------------------------------------------------

SHOP_ITEMS = [
    ("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("museum ticket", "museum tickets"),
    ("postcard", "postcards"), ("cupcake", "cupcakes"), ("bus ticket", "bus tickets"),
    ("flower pot", "flower pots"), ("packet of seeds", "packets of seeds"), ("bottle of juice", "bottles of juice"),
    ("sandwich", "sandwiches"), ("comic book", "comic books"), ("pair of socks", "pairs of socks"),
    ("candle", "candles"), ("bag of rice", "bags of rice"), ("light bulb", "light bulbs"),
    ("jar of jam", "jars of jam"), ("tennis ball", "tennis balls"), ("loaf of bread", "loaves of bread"),
    ("paintbrush", "paintbrushes"), ("mango", "mangoes"), ("box of tea", "boxes of tea"),
    ("greeting card", "greeting cards"), ("USB cable", "USB cables"), ("ice cream cone", "ice cream cones"),
]
SHARE_THINGS = [
    "marbles", "stickers", "sweets", "strawberries", "biscuits", "trading cards", "beads", "crayons",
    "seashells", "chocolates", "grapes", "balloons",
]
SALE_PRODUCTS = [
    "jacket", "lamp", "pair of headphones", "backpack", "board game", "blender", "desk chair", "bicycle helmet",
    "tent", "watch", "rug", "pair of boots",
]
SAVING_GOALS = ["bicycle", "guitar", "tablet", "pair of trainers", "camera", "telescope", "skateboard", "keyboard"]
SUFFIXES = ["", "", " Show your working.", " Explain each step.", " Answer step by step.",
            " Give the final answer at the end."]


def build_math(s: str, r: random.Random) -> Callable[[], str]:
    E = Entities(s, r)
    item = Pool(SHOP_ITEMS, r)
    thing = Pool(SHARE_THINGS, r)

    def buy(N: str) -> str:
        n, p = r.randint(3, 12), r.choice([0.5, 0.75, 1.25, 2, 2.5, 3, 4, 5, 6, 8, 12, 15])
        sing, plural = item()
        return r.choice([
            f"{N} buys {n} {plural} at {money(p)} each. How much does {N} spend in total?",
            f"{N} needs {n} {plural}. Each {sing} costs {money(p)}. What is the total cost?",
        ])

    def change(N: str) -> str:
        n, p = r.randint(2, 6), r.choice([1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7.5])
        bill = next(b for b in (10, 20, 50, 100) if b > n * p)
        return f"{N} buys {n} {item()[1]} for {money(p)} each and pays with a {money(bill)} note. " \
               f"How much change should {N} get?"

    def share(N: str) -> str:
        k, each = r.randint(3, 8), r.randint(3, 12)
        total = k * each + r.randint(0, k - 1)
        t = thing()
        return r.choice([
            f"{N} has {total} {t} and shares them equally among {k} friends. How many does each friend get, "
            f"and how many are left over?",
            f"{N} puts {total} {t} into {k} bags, with the same number in each bag. How many go in each bag, "
            f"and how many are left?",
        ])

    def travel(N: str) -> str:
        verb, speed, hours = r.choice([
            ("walks", r.randint(4, 6), r.choice([1, 1.5, 2, 3])),
            ("cycles", r.randint(12, 24), r.choice([1.5, 2, 2.5, 3])),
            ("drives", r.randrange(40, 101, 5), r.choice([1.5, 2, 2.5, 3, 4, 5])),
        ])
        if r.random() < 0.5:
            return f"{N} {verb} at an average speed of {speed} km per hour for {num(hours)} hours. " \
                   f"How far does {N} travel?"
        return f"{N} {verb} {num(speed * hours)} km at a steady {speed} km per hour. How long does the trip take?"

    def discount(N: str) -> str:
        price, pct = r.randrange(20, 201, 10), r.choice([10, 15, 20, 25, 30, 40, 50])
        return f"{cap(an(r.choice(SALE_PRODUCTS)))} costs {money(price)}, but the shop is offering {pct}% off. " \
               f"How much will {N} pay for it?"

    def area(N: str) -> str:
        w = r.randint(3, 15)
        length = r.randint(w + 1, 25)
        return r.choice([
            f"{N}'s rectangular vegetable garden is {w} metres wide and {length} metres long. What is its area, "
            f"and how much fencing is needed to go all the way around it?",
            f"{N} is tiling a rectangular floor that measures {w} m by {length} m. "
            f"How many square metres of tiles are needed?",
        ])

    def clock_time(N: str) -> str:
        start = f"{r.randint(7, 19)}:{r.randrange(0, 60, 5):02d}"
        dur = r.randrange(25, 180, 5)
        return r.choice([
            f"{N}'s train leaves at {start} and the journey takes {dur} minutes. What time does it arrive?",
            f"{N} starts baking at {start}. The bread needs {dur} minutes in total. When will it be ready?",
            f"{N}'s film starts at {start} and lasts {dur} minutes. At what time does it finish?",
        ])

    def ratio(N: str) -> str:
        a, b, k = r.randint(2, 4), r.randint(1, 3), r.randint(2, 5)
        return f"A recipe uses {a} cups of flour for every {b} {'egg' if b == 1 else 'eggs'}. {N} wants to use " \
               f"{a * k} cups of flour. How many eggs are needed?"

    def average(N: str) -> str:
        while True:
            x, y, z = r.randint(55, 100), r.randint(55, 100), r.randint(55, 100)
            if (x + y + z) % 3 == 0:
                break
        return f"{N} scored {x}, {y} and {z} on three tests. What is {N}'s average score?"

    def saving(N: str) -> str:
        per, weeks = r.choice([5, 8, 10, 12, 15, 20, 25]), r.randint(4, 20)
        return f"{N} saves {money(per)} every week. How many weeks will it take to save {money(per * weeks)} " \
               f"for {an(r.choice(SAVING_GOALS))}?"

    def think_number(N: str) -> str:
        x, a, b = r.randint(2, 20), r.randint(2, 9), r.randint(1, 30)
        if r.random() < 0.5:
            return f"{N} thinks of a number, multiplies it by {a} and then adds {b}. The result is {a * x + b}. " \
                   f"What number did {N} think of?"
        while a * x <= b:
            x += 1
        return f"{N} says: \"If you multiply my number by {a} and subtract {b}, you get {a * x - b}.\" " \
               f"What is {N}'s number?"

    def ages(N: str) -> str:
        M = E.first()
        while M == N:
            M = E.first()
        m, x, y = r.randint(5, 30), r.randint(2, 10), r.randint(2, 10)
        return f"{N} is {x} years older than {M}. In {y} years, their ages will add up to {2 * m + x + 2 * y}. " \
               f"How old are {N} and {M} now?"

    def percent(N: str) -> str:
        if r.random() < 0.5:
            while True:
                n, pct = r.choice([20, 24, 25, 30, 40, 50, 60, 80]), r.choice([10, 20, 25, 30, 40, 50, 60, 75])
                if n * pct % 100 == 0:
                    break
            return f"In {N}'s class of {n} students, {pct}% cycle to school. How many students cycle?"
        n = r.choice([20, 25, 40, 50])
        k = r.randrange(n // 5, n + 1, n // 10 if n >= 40 else 1)
        return f"{N} answered {k} out of {n} quiz questions correctly. What percentage is that?"

    def pages(N: str) -> str:
        b = r.choice([3, 4, 5, 8])
        a = r.randint(1, b - 1)
        total = b * r.randint(20, 60)
        return f"{N} is reading a {total}-page book and has finished {a}/{b} of it. How many pages are left?"

    def laps(N: str) -> str:
        m, k = r.choice([200, 250, 400]), r.randint(3, 12)
        return f"{N} runs {k} laps of a {m}-metre track. How many kilometres is that?"

    def chairs(N: str) -> str:
        rows, per, extra = r.randint(4, 15), r.randint(5, 12), r.randint(3, 20)
        return f"{N} sets out chairs in {rows} rows of {per}. Then {extra} more guests arrive and each needs a " \
               f"chair. How many chairs are needed in total?"

    def probability(N: str) -> str:
        red, blue, green = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
        colour = r.choice(["red", "blue", "green"])
        q = r.choice([f"that it is {colour}", f"that it is not {colour}"])
        return f"A bag contains {red} red, {blue} blue and {green} green marbles. {N} picks one without looking. " \
               f"What is the probability {q}? Give the answer as a fraction."

    def lcm(N: str) -> str:
        if r.random() < 0.5:
            a, b = r.sample(range(2, 10), 2)
            return f"{N} waters the ferns every {a} days and the cactus every {b} days. Both were watered today. " \
                   f"After how many days will both be watered on the same day again?"
        a, b = r.sample([10, 12, 15, 20, 25, 30], 2)
        return f"Two buses leave the station together at 8:00. One comes back every {a} minutes and the other " \
               f"every {b} minutes. {N} wants to know: when will they next leave together?"

    def interest(N: str) -> str:
        p, rate, years = r.randrange(200, 2001, 100), r.choice([2, 3, 4, 5]), r.randint(2, 5)
        return f"{N} puts {money(p)} into a savings account that pays {rate}% simple interest per year. " \
               f"How much interest will {N} earn after {years} years?"

    def value(N: str) -> str:
        s1, s2 = r.choice([300, 400, 500]), r.choice([750, 1000])
        p1 = r.choice([2, 2.5, 3, 3.5])
        p2 = p1 * s2 / s1 + r.choice([-1, -0.5, 0.5, 1])
        return f"{N} can buy a {s1}-gram box of cereal for {money(p1)} or a {s2}-gram box for {money(p2)}. " \
               f"Which box is better value?"

    def paint(N: str) -> str:
        w, h, c = r.randint(3, 9), r.choice([2, 2.5, 3]), r.choice([5, 8, 10, 12])
        return f"{N} is painting a wall that is {w} m wide and {num(h)} m high. One litre of paint covers {c} " \
               f"square metres. How many litres are needed for one coat?"

    def budget(N: str) -> str:
        (_, a), (_, b) = item(), item()
        pa, pb = r.randint(2, 15), r.randint(2, 15)
        start = r.choice([20, 30, 40, 50])
        na, nb = r.randint(1, 2), r.randint(1, 2)
        return f"{N} has {money(start)}. {N} buys {na} {a if na > 1 else 'of the ' + a} at {money(pa)} each " \
               f"and {nb} {b if nb > 1 else 'of the ' + b} at {money(pb)} each. How much money is left?" \
            if na * pa + nb * pb <= start else \
            f"{N} has {money(start)} and wants to buy {na + 2} {a} at {money(pa)} each. Is that enough money? " \
            f"If not, how much more is needed?"

    def pizza(N: str) -> str:
        M = E.first()
        while M == N:
            M = E.first()
        k = r.choice([6, 8, 10, 12])
        a, b = r.randint(1, k // 3), r.randint(1, k // 3)
        return f"{N} and {M} share a pizza cut into {k} equal slices. {N} eats {a} and {M} eats {b}. " \
               f"What fraction of the pizza is left? Simplify the fraction."

    def hours(N: str) -> str:
        start_h, end_h = r.randint(7, 10), r.randint(15, 19)
        sm, em, brk = r.choice([0, 30]), r.choice([0, 30]), r.choice([30, 45, 60])
        return f"{N} works from {start_h}:{sm:02d} to {end_h}:{em:02d} with a {brk}-minute lunch break. " \
               f"How many hours does {N} actually work?"

    problems = [buy, change, share, travel, discount, area, clock_time, ratio, average, saving, think_number,
                ages, percent, pages, laps, chairs, probability, lcm, interest, value, paint, budget, pizza, hours]
    problem = Pool(problems, r)

    return lambda: problem()(E.first()) + r.choice(SUFFIXES)


# ----------------------------------------------------------------------------------------------------------
# code
# ----------------------------------------------------------------------------------------------------------

CODE_TASKS = [
    ("reverse_words", "reverses the order of the words in a sentence"),
    ("is_palindrome", "checks whether a string is a palindrome, ignoring case and spaces"),
    ("count_vowels", "counts the vowels in a string"),
    ("second_largest", "returns the second largest number in a list"),
    ("merge_sorted", "merges two sorted lists into one sorted list"),
    ("word_frequencies", "counts how often each word appears in a text and returns a dictionary"),
    ("celsius_to_fahrenheit", "converts a temperature from Celsius to Fahrenheit"),
    ("is_prime", "checks whether a number is prime"),
    ("flatten", "flattens a list of lists into a single list"),
    ("remove_duplicates", "removes duplicates from a list while keeping the original order"),
    ("factorial", "computes the factorial of a non-negative integer without recursion"),
    ("fibonacci", "returns the first n Fibonacci numbers as a list"),
    ("capitalize_words", "capitalizes the first letter of every word in a sentence"),
    ("is_anagram", "checks whether two words are anagrams of each other"),
    ("gcd", "finds the greatest common divisor of two integers"),
    ("chunk_list", "splits a list into chunks of a given size"),
    ("average", "returns the average of a list of numbers, or None for an empty list"),
    ("longest_word", "returns the longest word in a sentence"),
    ("count_lines", "counts the number of lines in a text file"),
    ("is_leap_year", "checks whether a year is a leap year"),
    ("rotate_list", "rotates a list to the right by k positions"),
    ("sum_digits", "returns the sum of the digits of an integer"),
    ("binary_search", "searches a sorted list with binary search and returns the index of a target, or -1"),
    ("char_histogram", "prints a simple text histogram of how often each letter appears in a string"),
    ("looks_like_email", "does a simple check of whether a string looks like an email address"),
    ("days_between", "returns the number of days between two dates given as strings in YYYY-MM-DD format"),
    ("caesar_cipher", "encrypts a message with a Caesar cipher using a given shift"),
    ("transpose", "transposes a matrix given as a list of lists"),
    ("index_of_max", "returns the index of the largest value in a list"),
    ("pairs_with_sum", "finds all pairs of numbers in a list that add up to a target"),
    ("run_length_encode", "compresses a string with run-length encoding, so 'aaabb' becomes 'a3b2'"),
    ("balanced_brackets", "checks whether the brackets in a string are balanced"),
    ("read_column", "reads a CSV file and returns the values of one column as a list"),
    ("word_count", "counts the number of words in a string"),
    ("invert_dict", "swaps the keys and values of a dictionary"),
    ("letter_grade", "converts a numeric score from 0 to 100 into a letter grade"),
    ("running_total", "returns the running totals of a list of numbers"),
    ("most_common", "returns the most common element in a list"),
    ("seconds_to_hms", "converts a number of seconds into hours, minutes and seconds"),
    ("is_sorted", "checks whether a list is sorted in ascending order"),
    ("mask_card", "hides all but the last four digits of a card number"),
    ("strip_punctuation", "removes punctuation from a string"),
    ("common_elements", "returns the elements that appear in both of two lists"),
    ("random_password", "generates a random password of a given length from letters and digits"),
    ("temperature_stats", "returns the minimum, maximum and average of a list of temperatures"),
    ("snake_to_camel", "converts a snake_case string to camelCase"),
    ("count_uppercase", "counts the uppercase letters in a string"),
    ("sum_even", "returns the sum of all even numbers in a list"),
    ("interleave", "interleaves two lists element by element"),
    ("triangle_type", "says whether three side lengths make an equilateral, isosceles or scalene triangle"),
    ("to_binary", "converts a positive integer to a binary string without using built-in conversion functions"),
    ("to_roman", "converts an integer between 1 and 3999 to a Roman numeral"),
    ("shopping_total", "takes a dictionary of prices and a dictionary of quantities and returns the total cost"),
    ("clamp", "limits a number to a given minimum and maximum"),
    ("group_by_length", "groups a list of words into a dictionary keyed by word length"),
    ("missing_number", "finds the one missing number in a list that should contain 1 to n"),
    ("count_word_in_file", "counts how many times a given word appears in a text file"),
    ("all_unique", "checks whether all characters in a string are different"),
    ("to_pig_latin", "translates a single English word into Pig Latin"),
    ("distance", "calculates the distance between two points on a plane"),
    ("bmi", "calculates body mass index from weight in kilograms and height in metres"),
    ("compound_interest", "computes a savings balance after some years of yearly compound interest"),
    ("list_files", "lists all files with a given extension in a folder"),
    ("pretty_print_json", "loads a JSON file and prints it with indentation"),
    ("median", "returns the median of a list of numbers"),
    ("remove_vowels", "removes all vowels from a string"),
    ("clean_emails", "lowercases a list of email addresses and removes duplicates"),
    ("parse_time", "parses a time string such as '14:35' into hours and minutes"),
    ("next_monday", "returns the date of the next Monday after a given date"),
    ("times_table", "prints the multiplication table for a number from 1 to 10"),
    ("is_power_of_two", "checks whether a positive integer is a power of two"),
    ("reverse_digits", "reverses the digits of an integer"),
    ("initials", "returns the initials of a full name, such as 'A.B.' for 'Ada Byron'"),
    ("count_words_longer_than", "counts the words in a sentence that are longer than a given length"),
]
CODE_LANGUAGES = ["JavaScript", "Go", "Rust", "Java", "C", "TypeScript"]
CODE_CLASSES = [
    "a Stack class with push, pop and peek methods",
    "a BankAccount class with deposit and withdraw methods that refuses to go below zero",
    "a Rectangle class that can compute its area and perimeter",
    "a simple TodoList class that can add, remove and list tasks",
    "a Temperature class that stores Celsius and can return Fahrenheit",
    "a Queue class built from two lists",
    "a Timer context manager that prints how long a block of code took",
    "a Book class with a title, an author and a method that returns a one-line description",
    "a ShoppingCart class that adds items and computes the total price",
    "an Inventory class that tracks how many of each product are in stock",
    "a Point class that supports adding two points together with the + operator",
    "a Counter class that remembers how many times its increment method was called",
    "a Playlist class that can add songs, shuffle them and return the next song",
    "a Library class that lends and returns books and knows which books are out",
]
CODE_CONCEPTS = [
    ("a list", "a tuple", " in Python"), ("`==`", "`is`", " in Python"),
    ("`append`", "`extend`", " for Python lists"), ("a function", "a method", " in Python"),
    ("`break`", "`continue`", " in a loop"), ("a shallow copy", "a deep copy", " in Python"),
    ("`return`", "`print`", " in a Python function"), ("a `for` loop", "a `while` loop", ""),
    ("a set", "a list", " in Python"), ("local variables", "global variables", ""),
    ("a runtime error", "a syntax error", ""), ("`*args`", "`**kwargs`", " in Python"),
    ("a module", "a package", " in Python"), ("a class", "an instance", ""),
    ("`list.sort()`", "`sorted()`", " in Python"), ("mutable objects", "immutable objects", " in Python"),
    ("a generator", "a list comprehension", " in Python"),
    ("`import math`", "`from math import sqrt`", " in Python"), ("`//`", "`/`", " in Python"),
    ("`None`", "`False`", " in Python"), ("a compiled language", "an interpreted language", ""),
    ("a stack", "a queue", ""), ("an array", "a linked list", ""), ("`git commit`", "`git push`", ""),
    ("a GET request", "a POST request", " in HTTP"), ("the frontend", "the backend", " of a web app"),
    ("`WHERE`", "`HAVING`", " in SQL"), ("an `if` check", "a `try`/`except` block", " for handling bad input"),
    ("a dictionary", "a list", " for looking things up by name"),
    ("unit tests", "integration tests", ""),
]
CODE_SNIPPETS = [
    "nums = [3, 8, 1, 6]\nsquares = [n * n for n in nums if n % 2 == 0]\nprint(squares)",
    "def greet(name='friend'):\n    return f'Hello, {name}!'\n\nprint(greet())\nprint(greet('Sam'))",
    "counts = {}\nfor word in 'the cat and the hat'.split():\n    counts[word] = counts.get(word, 0) + 1\n"
    "print(counts)",
    "x = 10\nwhile x > 0:\n    x -= 3\nprint(x)",
    "names = ['Ana', 'Bo', 'Cy']\nfor i, name in enumerate(names, start=1):\n    print(i, name)",
    "data = sorted([('pear', 3), ('fig', 1), ('kiwi', 2)], key=lambda t: t[1])\nprint(data)",
    "def total(*prices):\n    return round(sum(prices) * 1.2, 2)\n\nprint(total(5, 10))",
    "with open('notes.txt') as f:\n    lines = [line.strip() for line in f if line.strip()]\nprint(len(lines))",
    "a = [1, 2, 3]\nb = a\nb.append(4)\nprint(a)",
    "s = 'Medusa'\nprint(s[::-1], s[1:4], s.upper())",
    "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\n\nprint(fact(5))",
    "from collections import Counter\nprint(Counter('banana').most_common(2))",
    "try:\n    value = int('42a')\nexcept ValueError:\n    value = 0\nprint(value)",
    "pairs = list(zip([1, 2, 3], ['a', 'b', 'c']))\nprint(dict(pairs))",
    "evens = list(filter(lambda n: n % 2 == 0, range(10)))\nprint(evens)",
    "def apply_twice(f, x):\n    return f(f(x))\n\nprint(apply_twice(lambda v: v + 3, 1))",
    "matrix = [[1, 2], [3, 4]]\nprint([row[0] for row in matrix])",
    "text = 'one,two,,three'\nparts = [p for p in text.split(',') if p]\nprint(parts)",
    "def gen():\n    for i in range(3):\n        yield i * 10\n\nprint(list(gen()))",
    "prices = {'tea': 2.5, 'cake': 3.0}\nfor item, price in prices.items():\n    print(f'{item}: ${price:.2f}')",
    "total = 0\nfor i in range(1, 11):\n    if i % 3 == 0:\n        continue\n    total += i\nprint(total)",
    "words = ['kiwi', 'fig', 'banana']\nprint(max(words, key=len), min(words))",
]
CODE_BUGS = [
    "def is_even(n):\n    return n % 2 == 1",
    "def last_item(items):\n    return items[len(items)]",
    "def count_a(text):\n    count = 0\n    for ch in text:\n        if ch == 'a':\n            count =+ 1\n"
    "    return count",
    "def add_item(item, basket=[]):\n    basket.append(item)\n    return basket",
    "def total_price(prices):\n    total = 0\n    for p in prices:\n        total = p\n    return total",
    "def greet(name):\n    print('Hello, ' + name)\n\nmessage = greet('Ana')\nprint(message.upper())",
    "def max_value(nums):\n    best = 0\n    for n in nums:\n        if n > best:\n            best = n\n"
    "    return best",
    "for i in range(1, 10):\n    if i % 3 = 0:\n        print(i)",
    "def reverse(s):\n    result = ''\n    for ch in s:\n        result = result + ch\n    return result",
    "numbers = [2, 4, 6, 7]\nfor n in numbers:\n    if n % 2 == 0:\n        numbers.remove(n)\nprint(numbers)",
    "def celsius_to_f(c):\n    return c * 9 / 5 - 32",
    "count = 0\n\ndef increment():\n    count += 1\n\nincrement()",
    "total = 0\nfor i in range(1, 5):\n    total += i\nprint('The sum of 1 to 5 is', total)",
    "def contains(items, target):\n    for item in items:\n        if item == target:\n            return True\n"
    "        else:\n            return False",
    "age = input('Your age? ')\nif age >= 18:\n    print('Adult')",
    "def average(nums):\n    return sum(nums) / len(nums)\n\nprint(average([]))",
    "words = ['b', 'a', 'c']\nsorted_words = words.sort()\nprint(sorted_words[0])",
    "def percent(part, whole):\n    return part / whole * 100\n\nprint(percent('3', 4))",
]
SQL_TABLES = {
    "`orders(id, customer, amount, order_date)`": [
        "returns the total amount spent by each customer", "finds the five largest orders",
        "counts the orders placed in March 2024", "lists customers who placed more than three orders",
    ],
    "`employees(id, name, department, salary, hired)`": [
        "finds the average salary in each department", "lists employees hired after 2020, newest first",
        "finds the highest salary in each department", "counts how many employees work in each department",
    ],
    "`books(id, title, author, year, copies)`": [
        "lists all books published before 1950", "finds authors with more than two books",
        "returns the total number of copies held", "finds the titles that contain the word 'garden'",
    ],
    "`students(id, name, class, score)`": [
        "returns the top three students by score", "finds the average score for each class",
        "lists students who scored below 50, sorted by name",
    ],
}
SQL_TASKS = [(table, task) for table, tasks in SQL_TABLES.items() for task in tasks]
SHELL_TASKS = [
    "counts the lines in every .txt file in a folder", "finds all files larger than 100 MB in your home directory",
    "renames every .jpeg file in a folder to .jpg", "shows the ten largest files in the current directory",
    "searches all Python files for the word TODO", "creates a compressed archive of a folder called photos",
    "prints the last 20 lines of a log file and keeps following it", "lists the processes using the most memory",
    "deletes empty folders under the current directory", "shows how much disk space each subfolder uses",
    "counts how many times each IP address appears in an access log",
    "downloads a file from a URL and saves it under a new name",
    "replaces the word colour with color in every .md file", "prints today's date in YYYY-MM-DD format",
]

CODE_LISTS = {
    "tasks": split(CODE_TASKS, None, "code-tasks"),
    "classes": split(CODE_CLASSES, None, "code-classes"),
    "concepts": split(CODE_CONCEPTS, None, "code-concepts"),
    "snippets": split(CODE_SNIPPETS, None, "code-snippets"),
    "bugs": split(CODE_BUGS, None, "code-bugs"),
    "sql": split(SQL_TASKS, None, "code-sql"),
    "shell": split(SHELL_TASKS, None, "code-shell"),
}


def build_code(s: str, r: random.Random) -> Callable[[], str]:
    L = {k: Pool(v[s], r) for k, v in CODE_LISTS.items()}

    def function() -> str:
        name, desc = L["tasks"]()
        return r.choice([
            lambda: f"Write a Python function that {desc}.",
            lambda: f"Write a Python function called `{name}` that {desc}. Include a short docstring.",
            lambda: f"Show me a Python function that {desc}, and explain how it works in two sentences.",
            lambda: f"Write a {r.choice(CODE_LANGUAGES)} function that {desc}.",
            lambda: f"Write a short Python function that {desc}, with a few example calls.",
            lambda: f"How would I write a Python function that {desc}?",
        ])()

    def klass() -> str:
        c = L["classes"]()
        return r.choice([f"Write {c} in Python.", f"Create {c} in Python and show how to use it.",
                         f"Implement {c} in Python, with short comments."])

    def concept() -> str:
        a, b, ctx = L["concepts"]()
        return r.choice([
            f"What is the difference between {a} and {b}{ctx}? Give a short example.",
            f"Explain {a} versus {b}{ctx} to a beginner.",
            f"When should I use {a} instead of {b}{ctx}?",
        ])

    def explain() -> str:
        c = L["snippets"]()
        return r.choice([
            f"Explain what this Python code does:\n\n```python\n{c}\n```",
            f"What does the following code print, and why?\n\n```python\n{c}\n```",
            f"Walk me through this snippet line by line:\n\n```python\n{c}\n```",
        ])

    def debug() -> str:
        c = L["bugs"]()
        return r.choice([
            f"Find and fix the bug in this Python code:\n\n```python\n{c}\n```",
            f"This code does not work as intended. What is wrong, and how would you fix it?\n\n```python\n{c}\n```",
            f"Debug the following snippet and explain the fix:\n\n```python\n{c}\n```",
        ])

    def sql() -> str:
        table, task = L["sql"]()
        return r.choice([
            f"Given a table {table}, write a SQL query that {task}.",
            f"Write an SQL query for a table {table} that {task}. Explain it briefly.",
            f"Using the table {table}, how would you write a query that {task}?",
        ])

    def shell() -> str:
        t = L["shell"]()
        return r.choice([f"Write a Bash command that {t}.",
                         f"How do I write a shell one-liner that {t}? Explain each part.",
                         f"Give a Linux command that {t}."])

    return lambda: weighted(r, [(40, function), (8, klass), (14, concept), (12, explain), (12, debug), (8, sql),
                                (6, shell)])


# ----------------------------------------------------------------------------------------------------------
# extraction: invented passages built from sentence templates, then an instruction
# ----------------------------------------------------------------------------------------------------------

BUSINESSES = ["bakery", "bicycle repair shop", "bookshop", "flower shop", "tea room", "pottery studio",
              "second-hand clothing store", "vegetable shop", "ice cream parlour", "hardware store"]
BANKS = ["Northbank Credit Union", "Riverside Savings", "the Harbour Cooperative Bank", "Unity Mutual"]
PROJECTS = ["new website", "spring marketing campaign", "warehouse move", "customer survey", "mobile app launch",
            "office renovation", "staff training programme", "autumn product catalogue"]
HOTELS = ["Grand Harbour Hotel", "Linden Guest House", "Blue Door Inn", "Parkview Hotel", "Old Mill Lodge",
          "Seaside Hostel", "Cedar Court Hotel"]
TEAM_SUFFIXES = ["Rovers", "United", "Hawks", "Falcons", "Wanderers", "Lions", "Rangers", "Otters"]
SUBJECTS = ["chemistry", "architecture", "music", "history", "computer science", "marine biology", "economics",
            "mechanical engineering"]
BOOK_TITLES = ["The Quiet Engine", "Salt and Silver", "A Map of Small Things", "Rivers Remember",
               "The Glass Orchard", "Counting Stars in Daylight", "Bread for the Road", "The Long Way Home"]
AWARDS = ["City Prize for Innovation", "National Teaching Award", "Green Business Medal", "Young Inventor Award"]
MARKET_ITEMS = ["a jar of honey", "a loaf of rye bread", "a bunch of tulips", "a wool scarf", "a ceramic mug",
                "a bag of apples", "a wooden spoon", "a block of cheese", "a box of eggs", "a beeswax candle",
                "a linen tote bag", "a pot of basil"]
RECIPES = {
    "pancakes": [("{} grams of flour", 150, 250, 25), ("{} millilitres of milk", 250, 400, 50),
                 ("{} eggs", 2, 3, 1), ("{} tablespoons of sugar", 2, 3, 1)],
    "banana bread": [("{} ripe bananas", 2, 4, 1), ("{} grams of flour", 200, 300, 25),
                     ("{} grams of brown sugar", 80, 150, 10), ("{} eggs", 2, 3, 1),
                     ("{} grams of butter", 60, 120, 10)],
    "vegetable soup": [("{} carrots", 2, 5, 1), ("{} potatoes", 2, 4, 1), ("{} onions", 2, 3, 1),
                       ("{} litres of stock", 1, 2, 1), ("{} grams of lentils", 100, 200, 25)],
    "lemon cake": [("{} grams of flour", 175, 250, 25), ("{} grams of sugar", 150, 200, 25),
                   ("{} eggs", 2, 4, 1), ("{} lemons", 2, 3, 1), ("{} grams of butter", 150, 200, 25)],
    "tomato sauce": [("{} tins of chopped tomatoes", 2, 4, 1), ("{} cloves of garlic", 2, 5, 1),
                     ("{} tablespoons of olive oil", 2, 4, 1), ("{} teaspoons of dried oregano", 2, 3, 1)],
    "oat cookies": [("{} grams of oats", 150, 250, 25), ("{} grams of butter", 100, 150, 10),
                    ("{} grams of sugar", 80, 120, 10), ("{} tablespoons of honey", 2, 3, 1),
                    ("{} grams of raisins", 50, 100, 10)],
    "lentil curry": [("{} grams of red lentils", 200, 300, 50), ("{} millilitres of coconut milk", 200, 400, 50),
                     ("{} onions", 2, 3, 1), ("{} teaspoons of curry powder", 2, 3, 1),
                     ("{} cloves of garlic", 2, 4, 1)],
    "fruit salad": [("{} apples", 2, 3, 1), ("{} oranges", 2, 4, 1), ("{} grams of grapes", 150, 300, 50),
                    ("{} kiwis", 2, 4, 1), ("{} tablespoons of lemon juice", 2, 3, 1)],
}


def phone(r: random.Random) -> str:
    return f"555-01{r.randint(0, 99):02d}"


def email(full_name: str, r: random.Random) -> str:
    first, last = full_name.lower().split()
    return r.choice([f"{first}.{last}@example.com", f"{first[0]}{last}@example.org", f"{first}@example.net"])


def ex_shop(r: random.Random, E: Entities):
    owner, artist, rival = E.people(3)
    d1, d2 = dates(r, 2)
    must = [(f"{owner} opened {an(r.choice(BUSINESSES))} on {r.choice(STREETS)} in {E.city()} on {d1}.",
             ["people", "places", "dates"])]
    extras = [
        (f"The shop employs {r.randint(2, 12)} people and is open {r.randint(4, 7)} days a week.", ["numbers"]),
        (f"{artist}, a local artist, painted the sign above the door.", ["people"]),
        (f"On the first day, about {r.randint(40, 400)} customers came in.", ["numbers"]),
        (f"To buy equipment, {first_name(owner)} borrowed {money(r.randrange(5000, 60001, 500))} from "
         f"{r.choice(BANKS)}.", ["numbers", "organizations"]),
        (f"The nearest competitor, run by {rival}, is only {r.randint(2, 9)} streets away.", ["people", "numbers"]),
        (f"A second branch is planned to open on {d2}.", ["dates"]),
    ]
    return compose(r, must, extras, 2, 4)


def ex_meeting(r: random.Random, E: Entities):
    a, b, c = E.people(3)
    d1, d2, d3 = dates(r, 3)
    must = [(f"On {d1}, {a} and {b} met at the {E.company()} office in {E.city()} to discuss the "
             f"{r.choice(PROJECTS)}.", ["people", "dates", "places", "organizations"])]
    extras = [
        (f"They agreed on a budget of {money(r.randrange(2000, 80001, 500))}.", ["numbers"]),
        (f"The first draft is due on {d2}.", ["dates"]),
        (f"{c} will join the team as project manager.", ["people"]),
        (f"The group plans to hire {r.randint(2, 9)} new staff by the end of the year.", ["numbers"]),
        (f"The next meeting will be at {clock(r, 9, 16)} on {d3}.", ["dates"]),
        (f"{first_name(a)} asked for a weekly progress report by email.", []),
    ]
    return compose(r, must, extras, 2, 4)


def ex_travel(r: random.Random, E: Entities):
    traveller, friend = E.people(2)
    c1, c2, c3 = E.city.several(3)
    d1, d2, d3 = dates(r, 3)
    t = first_name(traveller)
    must = [(f"{traveller} will fly from {c1} to {c2} on {d1}.", ["people", "places", "dates"])]
    extras = [
        (f"The flight leaves at {clock(r)} and lands {r.randint(2, 11)} hours later.", ["numbers"]),
        (f"{t} has booked {r.randint(2, 7)} nights at the {r.choice(HOTELS)}, which costs "
         f"{money(r.randrange(60, 251, 5))} per night.", ["numbers"]),
        (f"On {d2}, {t} will take the train to {c3} to visit {friend}.", ["dates", "places", "people"]),
        (f"The return flight is on {d3}.", ["dates"]),
        (f"The whole trip has a budget of {money(r.randrange(800, 4001, 100))}.", ["numbers"]),
    ]
    return compose(r, must, extras, 2, 4)


def ex_sport(r: random.Random, E: Entities):
    t1, t2, t3 = [f"{town} {r.choice(TEAM_SUFFIXES)}" for town in E.town.several(3)]
    scorer, coach, star = E.people(3)
    d1, d2 = dates(r, 2)
    hi, lo = r.randint(2, 5), r.randint(0, 1)
    must = [(f"The {t1} beat the {t2} {hi}-{lo} in {t1.rsplit(' ', 1)[0]} on {d1}.", ["places", "dates", "numbers"]),
            (f"{scorer} scored {r.randint(1, hi)} of the goals.", ["people", "numbers"])]
    extras = [
        (f"A crowd of {r.randrange(800, 20001, 50):,} people watched the match.", ["numbers"]),
        (f"It was the team's {r.choice(ORDINALS)} win of the season.", []),
        (f"Coach {coach} said the players had trained hard all week.", ["people"]),
        (f"The next match is on {d2} against the {t3}.", ["dates"]),
        (f"{star} was named player of the match.", ["people"]),
    ]
    return compose(r, must, extras, 1, 3)


def ex_bio(r: random.Random, E: Entities):
    person, partner = E.people(2)
    c1, c2, c3 = E.city.several(3)
    born = r.randint(1950, 1992)
    grad = born + r.randint(21, 24)
    founded = grad + r.randint(3, 12)
    book = founded + r.randint(1, 8)
    award = book + r.randint(1, 6)
    f = first_name(person)
    must = [(f"{person} was born in {c1} in {born}.", ["people", "places", "numbers"])]
    extras = [
        (f"{f} studied {r.choice(SUBJECTS)} at the University of {c2}, graduating in {grad}.",
         ["places", "numbers", "organizations"]),
        (f"In {founded}, {f} founded {E.company()}, which now employs {r.randint(12, 900)} people.",
         ["numbers", "organizations"]),
        (f"{f}'s first book, {r.choice(BOOK_TITLES)}, was published in {book}.", ["numbers"]),
        (f"{f} won the {r.choice(AWARDS)} in {award}.", ["numbers"]),
        (f"{f} now lives in {c3} and works with {partner} on a community radio show.", ["places", "people"]),
    ]
    return compose(r, must, extras, 2, 4)


def ex_recipe(r: random.Random, E: Entities):
    dish = r.choice(sorted(RECIPES))
    parts = [tmpl.format(r.randrange(lo, hi + 1, step)) for tmpl, lo, hi, step in RECIPES[dish]]
    cook = E.person()
    must = [(f"{cook} from {E.town()} shared this recipe for {dish} for {r.randint(2, 8)} people.",
             ["people", "places", "numbers"]),
            (f"You need {join_and(parts)}.", ["ingredients", "numbers"])]
    extras = [
        (f"Cook it for about {r.randrange(15, 61, 5)} minutes.", ["numbers"]),
        (f"It keeps in the fridge for up to {r.randint(2, 5)} days.", ["numbers"]),
        (f"Each portion has roughly {r.randrange(180, 651, 10)} calories.", ["numbers"]),
        (f"{first_name(cook)}'s grandmother first made it in {r.randint(1950, 1995)}.", ["numbers"]),
    ]
    return compose(r, must, extras, 1, 2)


def ex_contact(r: random.Random, E: Entities):
    caller, colleague = E.people(2)
    (d1,) = dates(r, 1)
    must = [(f"Hello, this is {caller} from {E.company()}.", ["people", "organizations"]),
            (f"Please call me back on {phone(r)} or email {email(caller, r)} before {d1}.", ["contact", "dates"])]
    extras = [
        (f"Our office is at {r.randint(2, 180)} {r.choice(STREETS)}, {E.city()}.", ["places", "numbers"]),
        (f"We are open from {clock(r, 8, 9)} to {clock(r, 16, 18)}, Monday to Friday.", ["numbers"]),
        (f"My colleague {colleague} can also help on {phone(r)}.", ["people", "contact"]),
        (f"The reference number for your order is ORD-{r.randint(10000, 99999)}.", ["numbers"]),
    ]
    return compose(r, must, extras, 1, 3)


def ex_market(r: random.Random, E: Entities):
    seller = E.person()
    goods = r.sample(MARKET_ITEMS, 3)
    prices = [money(r.randrange(2, 25) + r.choice([0, 0.5, 0.99])) for _ in goods]
    listed = join_and([f"{g} for {p}" for g, p in zip(goods, prices)])
    must = [(f"{seller} runs a stall at the {E.town()} market.", ["people", "places"]),
            (f"The stall sells {listed}.", ["prices", "numbers"])]
    extras = [
        (f"On {r.choice(WEEKDAYS)}s, everything is {r.choice([10, 15, 20, 25])}% off.", ["numbers"]),
        (f"Orders over {money(r.choice([30, 40, 50, 60]))} are delivered free within {r.randint(2, 5)} days.",
         ["numbers"]),
        (f"You can reach {first_name(seller)} at {email(seller, r)}.", ["contact"]),
        (f"The market is open from {clock(r, 7, 9)} to {clock(r, 13, 17)} every weekend.", ["numbers"]),
    ]
    return compose(r, must, extras, 1, 3)


EXTRACTION_PASSAGES = [ex_shop, ex_meeting, ex_travel, ex_sport, ex_bio, ex_recipe, ex_contact, ex_market]
EXTRACTION_INSTRUCTIONS = {
    "people": ["List every person mentioned in the text below.",
               "Extract the names of all the people in this passage as a bulleted list.",
               "Who is mentioned in the following text? Give only their full names, one per line."],
    "places": ["List all the places mentioned in the text below.",
               "Extract every city or town named in this passage."],
    "dates": ["Extract every date from the following text and list them in the order they appear.",
              "List all the dates mentioned in this passage, one per line."],
    "numbers": ["Extract every number from the text below and say what each one refers to.",
                "List all the numbers in this passage, each with a few words explaining what it counts or measures."],
    "organizations": ["Which companies or organizations are named in the text below?",
                      "Extract the names of any businesses or organizations from this passage."],
    "prices": ["Extract each item and its price from the text below. Return a JSON list of objects with the keys "
               "\"item\" and \"price\".",
               "Make a two-column list of the products and prices mentioned in this text."],
    "contact": ["Pull out every phone number and email address from this message and return them as JSON.",
                "Extract the contact details (names, phone numbers, email addresses) from the text below."],
    "ingredients": ["List the ingredients and their quantities from this recipe as a bulleted list.",
                    "Return the ingredients in this text as JSON, mapping each ingredient to its quantity."],
}
JSON_KEYS = ["people", "places", "dates", "organizations"]


def refer_back(instruction: str) -> str:
    """Word an instruction for a passage that comes before it rather than after it."""
    for before, after in (("the text below", "the text above"), ("the following text", "the text above"),
                          ("the following passage", "the passage above")):
        instruction = instruction.replace(before, after)
    return instruction


def build_extraction(s: str, r: random.Random) -> Callable[[], str]:
    E = Entities(s, r)
    passage_type = Pool(EXTRACTION_PASSAGES, r)

    def make() -> str:
        passage, kinds = passage_type()(r, E)
        keys = [k for k in JSON_KEYS if k in kinds]
        if len(keys) >= 2 and r.random() < 0.25:
            chosen = sorted(r.sample(keys, r.randint(2, len(keys))), key=JSON_KEYS.index)
            instruction = r.choice([
                f"Extract the following information from the text and return it as JSON with the keys "
                f"{quote_list(chosen)}.",
                f"Read the passage and fill in a JSON object with the keys {quote_list(chosen)}. "
                f"Use lists for the values.",
            ])
        else:
            instruction = r.choice(EXTRACTION_INSTRUCTIONS[r.choice(kinds)])
        return r.choice([
            lambda: f"{instruction}\n\nText: {passage}",
            lambda: f"{instruction}\n\n\"{passage}\"",
            lambda: f"Read the following passage.\n\n{passage}\n\n{refer_back(instruction)}",
            lambda: f"{passage}\n\n{refer_back(instruction)}",
        ])()

    return make


# ----------------------------------------------------------------------------------------------------------
# short news-style passages (for summarization and rewriting), all about invented towns and people
# ----------------------------------------------------------------------------------------------------------


PARK_FEATURES = ["a playground", "a pond with ducks", "walking paths", "picnic tables", "a skate ramp",
                 "an outdoor gym", "a wildflower meadow"]
PARK_OLD_USES = ["an empty car park", "a disused factory site", "a rubbish tip", "a railway yard"]
EXHIBITIONS = ["old maps of the region", "toys from the last hundred years", "photographs of the harbour",
               "Roman coins found in local fields", "paintings by local schoolchildren"]


def sc_park(r, E):
    return [
        f"The town of {E.town()} opened a new public park beside the "
        f"{r.choice(['river', 'old railway station', 'town hall', 'harbour', 'primary school'])} last "
        f"{r.choice(WEEKDAYS)}.",
        f"The park includes {join_and(r.sample(PARK_FEATURES, 3))}.",
        f"It was built on land that had been {r.choice(PARK_OLD_USES)} for more than {r.randint(10, 40)} years.",
        f"Work on the project took {r.randint(8, 30)} months and cost about "
        f"{money(r.randrange(200, 3001, 50) * 1000)}.",
        f"Volunteers planted {r.randrange(50, 601, 10)} trees during the final weekend of construction.",
        f"Mayor {E.person()} said the park would give families a safe place to meet.",
        "Some residents worry that parking nearby will become difficult.",
    ]


def sc_library(r, E):
    return [
        f"The public library in {E.town()} will stay open until {r.choice([8, 9, 10])} p.m. on weekdays "
        f"starting next month.",
        f"The change follows a survey in which {r.randint(55, 90)} percent of users asked for longer hours.",
        "Students preparing for exams were the group most in favour.",
        f"To cover the extra time, the library will hire {r.randint(2, 6)} part-time staff.",
        f"The cost, about {money(r.randrange(40, 201, 5) * 1000)} a year, will come from the town's education budget.",
        f"Head librarian {E.person()} said quiet study rooms could now be booked online.",
        "Weekend opening hours will not change.",
    ]


def sc_sleep(r, E):
    return [
        f"Researchers at {E.town()} University studied the sleep habits of {r.randrange(100, 901, 10)} "
        f"secondary-school students for {r.randint(4, 12)} weeks.",
        f"They found that students who went to bed before {r.choice([10, 11])} p.m. did better on memory tests.",
        f"Students who used their phones in bed slept about {r.randint(20, 60)} minutes less on average.",
        f"The team, led by Dr {E.person()}, also recorded how often students felt tired in class.",
        "The researchers say the study was small and more work is needed.",
        "They suggest that schools teach pupils more about healthy sleep.",
    ]


def sc_bakery(r, E):
    return [
        f"{E.person()}'s bakery on {r.choice(STREETS)} in {E.town()} will close next month after "
        f"{r.randint(20, 60)} years in business.",
        f"The owner, now {r.randint(64, 82)}, says it is time to retire.",
        f"The bakery was famous for its {r.choice(['cinnamon rolls', 'rye bread', 'apple pies', 'sourdough loaves'])}, "
        f"which sold out most mornings.",
        "Regular customers have left cards and flowers at the door.",
        f"A young couple from {E.town()} has offered to buy the old recipes.",
        f"The building will become {r.choice(['a bicycle shop', 'a small cafe', 'an art gallery', 'a flower shop'])}.",
    ]


def sc_flood(r, E):
    return [
        f"Heavy rain caused the river in {E.town()} to flood on {r.choice(WEEKDAYS)} night.",
        f"About {r.randrange(20, 301, 5)} homes near the water had to be evacuated.",
        f"No one was seriously hurt, but several roads were closed for {r.randint(2, 6)} days.",
        f"Volunteers filled {r.randrange(500, 5001, 100):,} sandbags to protect the school and the health centre.",
        f"Officials say it was the worst flooding since {r.randint(1950, 2010)}.",
        "The council has promised to review the town's flood defences.",
        f"Residents can apply for emergency repair grants of up to {money(r.randrange(1000, 10001, 500))}.",
    ]


def sc_bridge(r, E):
    m = r.randint(0, 8)
    return [
        f"The main bridge in {E.town()} will be closed for repairs from {MONTHS[m]} to "
        f"{MONTHS[m + r.randint(2, 3)]}.",
        "Engineers found cracks in the supports during a routine inspection.",
        f"Drivers will need to use a detour that adds about {r.randint(10, 35)} minutes to the journey.",
        f"A free shuttle bus will run every {r.choice([10, 15, 20])} minutes for people on foot.",
        f"The repairs are expected to cost {money(r.randrange(1, 9) * 1_000_000 + r.choice([0, 500_000]))}.",
        f"Shop owner {E.person()} fears that businesses near the bridge will lose customers during the closure.",
    ]


def sc_garden(r, E):
    return [
        f"Residents of {E.town()} have turned an empty lot on {r.choice(STREETS)} into a community garden.",
        f"The garden now has {r.randint(12, 60)} raised beds, each looked after by a different family.",
        "Volunteers grow tomatoes, beans, herbs and sunflowers.",
        f"Spare vegetables are given to the local food bank every {r.choice(WEEKDAYS)}.",
        f"The project began when {E.person()} wrote to the council asking to use the land.",
        "The garden also runs free workshops for children on composting.",
    ]


def sc_bees(r, E):
    farmer = E.person()
    return [
        f"{farmer}, a farmer near {E.town()}, has doubled the apple harvest after placing beehives in the orchard.",
        f"{first_name(farmer)} installed {r.randint(6, 30)} hives in early spring.",
        "Bees pollinate apple blossoms, which helps more fruit to form.",
        f"The farm also sells about {r.randrange(200, 2001, 50)} jars of honey each year.",
        "Neighbouring farmers are now planning to add hives of their own.",
        "Experts warn that bee numbers are falling in many regions because of habitat loss and pesticides.",
    ]


def sc_museum(r, E):
    return [
        f"The {E.town()} Museum has opened an exhibition of {r.choice(EXHIBITIONS)}.",
        f"The exhibition includes more than {r.randrange(50, 401, 10)} objects, many never shown before.",
        f"Curator {E.person()} spent {r.randint(2, 6)} years collecting items from families in the area.",
        f"Entry is free for children under {r.choice([12, 14, 16])}.",
        f"The exhibition will run until the end of {r.choice(MONTHS)}.",
        f"Visitors can also join guided tours every {r.choice(WEEKDAYS)} afternoon.",
    ]


def sc_buses(r, E):
    m2 = r.choice([20, 30, 40])
    return [
        f"From {r.choice(MONTHS)}, buses in {E.town()} will run every {m2 // 2} minutes instead of every {m2} minutes.",
        "The change is part of a plan to reduce traffic in the town centre.",
        "Two new routes will connect the hospital and the train station.",
        f"A single ticket will still cost {money(r.choice([1.5, 2, 2.2, 2.5, 3]))}.",
        f"Transport officer {E.person()} said passenger numbers had grown by {r.randint(8, 30)} percent in a year.",
        "Some drivers are worried about longer shifts.",
    ]


def sc_solar(r, E):
    return [
        f"{E.town()} Primary School has installed {r.randrange(40, 201, 10)} solar panels on its roof.",
        f"The panels are expected to provide about {r.randint(25, 70)} percent of the school's electricity.",
        f"The project cost {money(r.randrange(30, 151, 5) * 1000)} and was paid for partly by parents' fundraising.",
        "Pupils can see how much power the panels produce on a screen in the hall.",
        f"Head teacher {E.person()} said the panels would also be used in science lessons.",
        "The school hopes to save enough money to buy new books for the library.",
    ]


def sc_cleanup(r, E):
    return [
        f"More than {r.randrange(40, 401, 10)} volunteers took part in a beach clean-up in {E.town()} "
        f"on {r.choice(WEEKDAYS)}.",
        f"They collected {r.randint(60, 400)} bags of rubbish in three hours.",
        "Most of the waste was plastic bottles, food wrappers and fishing line.",
        f"Organiser {E.person()} said there was less litter than last year.",
        "Local cafes gave free drinks to everyone who helped.",
        f"The next clean-up is planned for {r.choice(MONTHS)}.",
    ]


def sc_marathon(r, E):
    winner, second = E.people(2)
    return [
        f"{winner} won the {E.town()} marathon on {r.choice(WEEKDAYS)} in a time of 2 hours and "
        f"{r.randint(10, 45)} minutes.",
        f"About {r.randrange(800, 6001, 100):,} runners took part, the most in the race's history.",
        "The course ran along the river and through the old town.",
        f"Temperatures reached {r.randint(24, 31)} degrees, so extra water stations were added.",
        f"The event raised {money(r.randrange(20, 201, 5) * 1000)} for the local children's hospital.",
        f"{second} finished second, less than a minute behind.",
    ]


def sc_fourday(r, E):
    return [
        f"{E.company()}, a company based in {E.town()}, has started a trial of a four-day working week.",
        f"Its {r.randint(20, 300)} employees will work {r.choice([32, 34, 35])} hours a week with no cut in pay.",
        f"Managers will measure productivity and staff well-being over {r.randint(3, 12)} months.",
        "Early feedback from staff has been very positive.",
        f"Director {E.person()} said the company hoped to attract more job applicants.",
        "Some customers have asked whether replies to their emails will become slower.",
    ]


def sc_species(r, E):
    creature = r.choice(["frog", "beetle", "moth", "snail", "lizard", "spider"])
    return [
        f"Scientists exploring a forest near {E.town()} have found a new species of {creature}.",
        f"The {creature} is about {r.randint(8, 60)} millimetres long and has bright "
        f"{r.choice(['orange', 'blue', 'yellow', 'green'])} markings.",
        f"It was first spotted by {E.person()}, a student on the team.",
        "The team says the species may live only in this forest.",
        "They are asking for the area to be protected from logging.",
        f"Its scientific name will be announced at a conference in {r.choice(MONTHS)}.",
    ]


def sc_phones(r, E):
    return [
        f"{E.town()} High School will ban mobile phones during lessons from next term.",
        "Pupils will keep their phones in lockers during the school day.",
        "Teachers say phones have been distracting students in class.",
        "Some parents worry they will not be able to contact their children.",
        f"Head teacher {E.person()} said students could use the office phone in an emergency.",
        "A similar rule at a nearby school led to fewer discipline problems, according to a report.",
    ]


SCENARIOS = [sc_park, sc_library, sc_sleep, sc_bakery, sc_flood, sc_bridge, sc_garden, sc_bees, sc_museum,
             sc_buses, sc_solar, sc_cleanup, sc_marathon, sc_fourday, sc_species, sc_phones]


def news_passage(r: random.Random, E: Entities, scenario) -> str:
    """The lead sentence plus 2-4 of the scenario's other sentences, in order (3-5 sentences)."""
    sentences = scenario(r, E)
    k = r.randint(2, min(4, len(sentences) - 1))
    picked = sorted(r.sample(range(1, len(sentences)), k))
    return " ".join([sentences[0]] + [sentences[i] for i in picked])


def dialogue(r: random.Random, E: Entities) -> tuple[str, str, str]:
    a, b, c = E.first.several(3)
    lines = r.choice([
        [(a, f"Are we still going to the {r.choice(['lake', 'castle ruins', 'flea market', 'botanical garden'])} "
             f"on Saturday?"),
         (b, "Yes, but the forecast says it will rain in the morning."),
         (a, f"Then let's leave after lunch, around {r.choice(['1', '2', '3'])} o'clock."),
         (b, f"Good idea. I'll bring {r.choice(['sandwiches', 'fruit', 'a flask of tea'])} and you bring "
             f"{r.choice(['the map', 'a blanket', 'the camera'])}."),
         (a, f"Deal. Should we invite {c}?"),
         (b, f"Sure, {c} said last week that they wanted to come.")],
        [(a, f"The {r.choice(PROJECTS)} report is going to be late."),
         (b, f"How late? The client expects it on {r.choice(WEEKDAYS[:3])}."),
         (a, "Probably two extra days. The survey data arrived late."),
         (b, f"OK. I'll tell the client today and ask for a new deadline of {r.choice(WEEKDAYS[3:5])}."),
         (a, "Thanks. I'll send you a draft of the first section tomorrow.")],
        [(a, f"What should we cook for {c}'s birthday dinner?"),
         (b, f"{c} loves {r.choice(['Italian', 'Thai', 'Mexican', 'Greek'])} food."),
         (a, "Then let's make that. I can buy the ingredients after work."),
         (b, "I'll bake a cake. Chocolate or lemon?"),
         (a, f"Lemon, because {c} finds chocolate too rich.")],
        [(a, f"I found a flat near the {r.choice(['station', 'park', 'university', 'harbour'])}. The rent is "
             f"{money(r.randrange(600, 1601, 50))} a month."),
         (b, "That's more than you pay now. Is it bigger?"),
         (a, "Yes, it has a second bedroom and a small balcony."),
         (b, "Then it could be worth it. When could you move in?"),
         (a, f"The landlord says from the first of {r.choice(MONTHS)}.")],
        [(a, "Did you finish the chemistry homework?"),
         (b, "Almost. I'm stuck on the last question about acids."),
         (a, f"Me too. Let's ask {c} at lunch, {c} got full marks last time."),
         (b, "Good plan. Can we also revise together on Thursday?"),
         (a, "Yes, at the library after school.")],
    ])
    return "\n".join(f"{who}: {text}" for who, text in lines), a, b


def build_summarization(s: str, r: random.Random) -> Callable[[], str]:
    E = Entities(s, r)
    scenario = Pool(SCENARIOS, r)

    def news() -> str:
        p = news_passage(r, E, scenario())
        return r.choice([
            f"Summarize the following passage in one sentence.\n\n{p}",
            f"Write a two-sentence summary of this news item:\n\n{p}",
            f"What is the main point of the text below? Answer in one or two sentences.\n\n{p}",
            f"Read the paragraph and give a short headline plus a one-sentence summary.\n\n{p}",
            f"Summarize this for a busy reader in no more than 30 words:\n\n{p}",
            f"{p}\n\nSummarize the text above in your own words.",
            f"Give the three most important facts from this passage as a short summary.\n\n{p}",
        ])

    def chat() -> str:
        text, a, b = dialogue(r, E)
        return r.choice([
            f"Summarize this conversation in one or two sentences:\n\n{text}",
            f"What did {a} and {b} decide? Summarize briefly.\n\n{text}",
            f"Write a short summary of the following chat:\n\n{text}",
        ])

    return lambda: weighted(r, [(0.8, news), (0.2, chat)])


# ----------------------------------------------------------------------------------------------------------
# rewriting
# ----------------------------------------------------------------------------------------------------------

GRAMMAR_ERRORS = [
    "Me and him goes to the market every saturday.", "She don't like when people is late.",
    "Their going to the beach tomorrow, if the weather is good.", "The childrens was playing in the garden all day.",
    "I have went to that museum three times.", "Each of the students have their own locker.",
    "Its a beautiful day, lets go outside.", "He runned to the station but the train already leaved.",
    "There is many reasons to learn a second language.", "Who's book is this on the table?",
    "I seen the new film last night and it were great.", "The team are playing good this season.",
    "Can you borrow me your pen for a minute?", "She is more taller than her brother.",
    "We was waiting for the bus for hours.", "Your welcome to join us for dinner.",
    "I could of finished the report earlier.", "The dog wagged it's tail when it seen me.",
    "Between you and I, the meeting was boring.", "Less people came to the concert than last year.",
    "He don't know nothing about football.", "The informations you sent was very useful.",
    "My sister and me has visited the coast twice.", "If I would have known, I would have came earlier.",
    "The book what I read was really interesting.", "They was very exciting about the trip.",
    "I am agree with your opinion.", "She have been working here since three years.",
    "Please send me the documents until Friday.", "The list of items are on the desk.",
    "Everyone have finished their homework.", "He explained me the problem.",
]
WORDY_SENTENCES = [
    "In my personal opinion, I think that we should probably consider the possibility of starting the meeting earlier.",
    "Due to the fact that it was raining, we made the decision to stay inside the house.",
    "At this point in time, we are currently in the process of reviewing all of the applications.",
    "The reason why I am writing this email is because I wanted to ask you a question.",
    "It is absolutely essential and necessary that everyone arrives on time to the event.",
    "She made a brief summary of the main key points of the long report.",
    "In the event that you have any questions, please do not hesitate to contact me.",
    "We will meet together at 3 p.m. in the afternoon to discuss our plans for the future.",
    "The fact of the matter is that the project was finished completely ahead of schedule.",
    "He is a man who is known for being very kind to everyone he meets.",
    "For the purpose of saving money, we decided to cook our meals at home.",
    "There are many people who believe that exercise is good for mental health.",
    "I would like to take this opportunity to thank each and every one of you.",
    "The new software program is able to perform the task of sorting files automatically.",
    "It goes without saying that safety is a very important priority for our company.",
    "During the course of the summer months, the park is visited by many tourists.",
    "We need to make a plan in advance before the trip begins.",
    "The final outcome of the vote was decided by a small number of votes.",
    "In spite of the fact that he was tired, he continued to keep working late.",
    "Our team has the ability to complete the work in a period of two weeks' time.",
    "She returned back to the office after lunch in order to finish up her tasks.",
    "It is my belief that the new policy will be of benefit to all of the staff.",
    "Please be advised that the library will be closed for the duration of the holiday.",
    "The reason the cake failed is due to the fact that the oven was too hot.",
    "Each and every student must submit their assignment by the deadline date.",
]
BLUNT_SENTENCES = [
    "Send me the report now.", "Your presentation was boring and too long.",
    "I don't have time for your questions today.", "You got my order wrong again.",
    "Stop parking in front of my garage.", "This idea makes no sense.", "Fix the printer, it's broken.",
    "I need you to work this weekend.", "You never answer my emails.", "Turn the music down.",
    "We're not hiring you.", "Your essay needs a lot of work.", "Give me a refund.",
    "Move your bag, I want to sit there.", "Be quiet during the film.", "I'm not coming to your party.",
    "You're late again.", "That's the wrong answer.", "Clean up the kitchen after yourself.",
    "Your dog keeps digging up my garden.", "Why haven't you finished yet?", "Don't touch my things.",
    "The meeting is cancelled, deal with it.", "Your price is too high.", "Reply to the client today.",
]
NEUTRAL_SENTENCES = [
    "The meeting starts at nine tomorrow morning.", "The shop has run out of bread.",
    "It will rain for most of the weekend.", "The cat is sleeping on the windowsill.",
    "Our team won the match by one goal.", "The train to the coast is delayed by twenty minutes.",
    "I finished reading the book last night.", "The garden needs watering every evening in summer.",
    "The new cafe serves excellent soup.", "The museum is closed on Mondays.",
    "My laptop battery is almost empty.", "The children built a snowman in the park.",
    "We are moving to a bigger flat next month.", "The library has a new collection of travel books.",
    "Dinner will be ready in ten minutes.", "The bus was full, so I walked home.",
    "The concert tickets sold out in an hour.", "The river is higher than usual this spring.",
    "Someone left a red umbrella in the office.", "The price of apples has gone up.",
    "I found my lost keys in the fridge.", "The bakery opens at six every morning.",
    "Our neighbours are painting their house yellow.", "The lecture was moved to next week.",
    "The dog refused to go out in the rain.",
]
STYLES = [
    "a pirate", "a medieval knight", "a sports commentator", "a fairy-tale narrator", "a weather forecaster",
    "a detective in an old film", "an excited child", "a Shakespearean actor", "a polite robot",
    "a nature documentary narrator",
]

REWRITING_LISTS = {
    "grammar": split(GRAMMAR_ERRORS, None, "rewrite-grammar"),
    "wordy": split(WORDY_SENTENCES, None, "rewrite-wordy"),
    "blunt": split(BLUNT_SENTENCES, None, "rewrite-blunt"),
    "neutral": split(NEUTRAL_SENTENCES, None, "rewrite-neutral"),
}


def informal_message(r: random.Random, E: Entities) -> str:
    n = E.first()
    d1, d2 = r.sample(WEEKDAYS, 2)
    return r.choice([
        lambda: f"hey {n}, cant make the {r.choice(['meeting', 'dinner', 'practice', 'study session'])} on {d1}, "
                f"{r.choice(['my car broke down', 'got a cold', 'my sister is visiting'])}. "
                f"can we do {d2} instead?? thx",
        lambda: f"hi, the {r.choice(['lamp', 'jacket', 'kettle', 'bookshelf'])} i ordered {r.randint(2, 4)} weeks ago "
                f"still hasnt arrived and nobody answers the phone. pls sort it out asap",
        lambda: f"hey team, the {r.choice(PROJECTS)} is gonna be late, like {r.randint(2, 5)} days. the data came in "
                f"late. sorry!!",
        lambda: f"{n} - the heater in my flat is broken AGAIN. its freezing. when r u fixing it",
        lambda: f"hey all, party at mine on {d1} from {r.choice([7, 8])}, bring snacks if u want, no need to reply lol",
        lambda: f"hi {n}, can i get an extension on the {r.choice(['essay', 'lab report', 'group project'])}? been "
                f"sick all week. will send it by {d2}",
        lambda: f"hey {n}, loved ur talk yesterday! can u send me the slides? also wanna grab coffee sometime?",
        lambda: f"dear {n} ur dog barks every morning at 6 and its driving me crazy. plz do something",
        lambda: f"{n}!! the printer on floor {r.randint(2, 5)} is jammed again and i have a deadline in an hour. help",
    ])()


def build_rewriting(s: str, r: random.Random) -> Callable[[], str]:
    E = Entities(s, r)
    scenario = Pool(SCENARIOS, r)
    L = {k: Pool(v[s], r) for k, v in REWRITING_LISTS.items()}

    def passage() -> str:
        p = news_passage(r, E, scenario())
        return r.choice([
            f"Rewrite the following paragraph in a formal, professional tone.\n\n{p}",
            f"Rewrite this text in simpler words so that a ten-year-old could understand it.\n\n{p}",
            f"Turn the following paragraph into a bulleted list of key points.\n\n{p}",
            f"Rewrite this news text as a short, friendly social media post.\n\n{p}",
            f"Shorten this paragraph to about half its length, keeping the key facts.\n\n{p}",
            f"Rewrite this paragraph from the point of view of a local resident, in the first person.\n\n{p}",
            f"Rewrite the following as a short announcement that could be read out on local radio.\n\n{p}",
        ])

    def message() -> str:
        m = informal_message(r, E)
        return r.choice([
            f"Rewrite this message in a polite, professional tone:\n\n\"{m}\"",
            f"Make this message formal enough to send to a manager:\n\n{m}",
            f"Turn this casual text into a clear, polite email:\n\n{m}",
            f"Rewrite the following message with correct spelling, grammar and punctuation:\n\n{m}",
        ])

    def grammar() -> str:
        x = L["grammar"]()
        return r.choice([f"Correct the grammar in this sentence: \"{x}\"",
                         f"Fix the mistakes in the following sentence and briefly explain each change: \"{x}\"",
                         f"Rewrite this sentence in correct standard English: \"{x}\""])

    def concise() -> str:
        x = L["wordy"]()
        return r.choice([f"Make this sentence more concise: \"{x}\"",
                         f"Rewrite the following sentence using fewer words without changing its meaning: \"{x}\"",
                         f"Edit this sentence so it is short and clear: \"{x}\""])

    def polite() -> str:
        x = L["blunt"]()
        return r.choice([f"Rewrite this sentence so it sounds polite and friendly: \"{x}\"",
                         f"How could I say this more kindly? \"{x}\"",
                         f"Make the following message more tactful: \"{x}\""])

    def style() -> str:
        x, who = L["neutral"](), r.choice(STYLES)
        return r.choice([f"Rewrite this sentence as if it were spoken by {who}: \"{x}\"",
                         f"Say \"{x}\" in the style of {who}.",
                         f"Rewrite the sentence \"{x}\" so it sounds like {who} is saying it."])

    return lambda: weighted(r, [(40, passage), (18, message), (10, grammar), (10, concise), (10, polite),
                                (12, style)])


# ----------------------------------------------------------------------------------------------------------
# stem
# ----------------------------------------------------------------------------------------------------------

STEM_CONCEPTS = [
    "gravity", "friction", "inertia", "Newton's third law of motion", "buoyancy", "static electricity",
    "electric current", "magnetism", "the speed of sound", "the refraction of light", "the Doppler effect",
    "thermal conduction", "the conservation of energy", "momentum", "a lever", "a pulley", "centripetal force",
    "air resistance", "radioactive decay", "nuclear fusion", "the electromagnetic spectrum", "an ion",
    "a chemical bond", "the pH scale", "oxidation", "a catalyst", "the periodic table", "an isotope",
    "combustion", "evaporation", "condensation", "diffusion", "density", "an exothermic reaction",
    "photosynthesis", "cellular respiration", "DNA", "a gene", "natural selection", "the immune system",
    "mitosis", "a food chain", "an ecosystem", "pollination", "homeostasis", "an enzyme", "a virus", "osmosis",
    "the nervous system", "metamorphosis", "symbiosis", "hibernation", "the water cycle", "plate tectonics",
    "erosion", "the greenhouse effect", "a solar eclipse", "a black hole", "a light-year", "the Big Bang theory",
    "the ozone layer", "a weather front", "the rock cycle", "an algorithm", "the binary number system",
    "encryption", "machine learning", "a database", "a prime number", "the Pythagorean theorem", "probability",
    "a function in mathematics", "the number pi", "a percentage", "a negative number", "the median of a data set",
    "exponential growth", "a vector", "recursion in programming", "an electric circuit", "a semiconductor",
    "a lunar phase", "a tsunami", "biodiversity", "an antibody",
]
STEM_QUESTIONS = [
    "Why does ice float on water?", "How do vaccines train the immune system?",
    "What causes the seasons on Earth?", "Why does the Moon seem to change shape during the month?",
    "How does a refrigerator keep food cold?", "Why do we see lightning before we hear thunder?",
    "How do bees make honey?", "What happens to water molecules when water boils?",
    "Why does metal feel colder than wood at the same temperature?",
    "How does water travel from a plant's roots to its leaves?", "Why do leaves change colour in autumn?",
    "How does a compass work?", "Why does bread dough rise?", "How does soap remove grease?",
    "Why do we have day and night?", "How do fish breathe underwater?", "Why does salt melt ice on roads?",
    "How does a microwave oven heat food?", "What causes ocean waves?",
    "Why do astronauts float inside the International Space Station?", "How does a battery store energy?",
    "Why do onions make people cry?", "How do migrating birds find their way?", "Why is the sea salty?",
    "How does GPS work out where you are?", "What causes a fever?",
    "Why do some materials conduct electricity while others do not?", "How does a solar panel make electricity?",
    "How does the heart pump blood around the body?", "What causes thunderstorms?", "Why do stars twinkle?",
    "Why don't antibiotics work against viruses?", "Why does a spoon look bent in a glass of water?",
    "How does a seed grow into a plant?", "Why do we get goosebumps?", "How are mountains formed?",
    "Why does hot air rise?", "Why doesn't a moving bicycle fall over?", "What makes popcorn pop?",
    "Why do humans need sleep?", "Why does the Sun look red at sunset?", "How do noise-cancelling headphones work?",
    "Why is the sky dark at night if there are so many stars?", "How does a thermometer measure temperature?",
    "Why do cut apples turn brown?",
]
STEM_PAIRS = [
    ("weather", "climate"), ("speed", "velocity"), ("mass", "weight"), ("a virus", "a bacterium"),
    ("an element", "a compound"), ("a physical change", "a chemical change"), ("heat", "temperature"),
    ("an asteroid", "a comet"), ("a planet", "a star"), ("mitosis", "meiosis"), ("DNA", "RNA"),
    ("conduction", "convection"), ("a series circuit", "a parallel circuit"),
    ("renewable energy", "non-renewable energy"), ("a herbivore", "a carnivore"), ("a vertebrate", "an invertebrate"),
    ("RAM", "long-term storage"), ("hardware", "software"), ("a compiler", "an interpreter"), ("mean", "median"),
    ("accuracy", "precision"), ("a hypothesis", "a theory"), ("nuclear fission", "nuclear fusion"),
    ("alternating current", "direct current"), ("a rock", "a mineral"), ("evaporation", "boiling"),
    ("an acid", "a base"), ("igneous rock", "sedimentary rock"), ("a meteor", "a meteorite"),
    ("an atom", "a molecule"),
]
STEM_LISTS = {
    "concepts": split(STEM_CONCEPTS, None, "stem-concepts"),
    "questions": split(STEM_QUESTIONS, None, "stem-questions"),
    "pairs": split(STEM_PAIRS, None, "stem-pairs"),
}


def build_stem(s: str, r: random.Random) -> Callable[[], str]:
    L = {k: Pool(v[s], r) for k, v in STEM_LISTS.items()}

    def concept() -> str:
        c = L["concepts"]()
        return r.choice([
            f"Explain {c} in simple terms.",
            f"What is meant by {c}? Give a short explanation and one everyday example.",
            f"How would you explain {c} to a twelve-year-old?",
            f"Describe {c} in three or four sentences.",
            f"Give a beginner-friendly explanation of {c}.",
            f"Write a short explanation of {c} for a school science class.",
        ])

    def question() -> str:
        q = L["questions"]()
        return r.choice([q, f"{q} Answer in a few sentences.", f"{q} Explain it simply.",
                         f"{q} Keep the answer short and clear.", f"Quick science question: {q}"])

    def pair() -> str:
        a, b = L["pairs"]()
        return r.choice([
            f"What is the difference between {a} and {b}?",
            f"Explain the difference between {a} and {b}, with an example of each.",
            f"How is {a} different from {b}?",
            f"People often mix up {a} and {b}. What sets them apart?",
        ])

    return lambda: weighted(r, [(50, concept), (32, question), (18, pair)])


# ----------------------------------------------------------------------------------------------------------
# humanities
# ----------------------------------------------------------------------------------------------------------

HIST_EVENTS = [
    "the French Revolution", "the Industrial Revolution", "the fall of the Western Roman Empire",
    "the invention of the printing press", "the Black Death in medieval Europe",
    "the building of the Great Wall of China", "the Silk Road trade routes", "the Italian Renaissance",
    "the First World War", "the Second World War", "the Cold War", "the fall of the Berlin Wall",
    "the American Civil War", "the abolition of the transatlantic slave trade", "the Meiji Restoration in Japan",
    "the independence of India in 1947", "the Apollo 11 Moon landing", "the Protestant Reformation",
    "the signing of Magna Carta", "the voyages of Zheng He", "the rise of the Mali Empire", "the Russian Revolution",
    "the Great Depression", "the campaign for women's right to vote", "the building of the pyramids of Giza",
    "the Byzantine Empire", "the civil rights movement in the United States", "the end of apartheid in South Africa",
    "the Norman conquest of England", "the Aztec city of Tenochtitlan", "the Inca road network",
    "the Scientific Revolution",
]
HIST_PEOPLE = [
    "Cleopatra", "Ashoka the Great", "Mansa Musa", "Leonardo da Vinci", "Marie Curie", "Nelson Mandela",
    "Genghis Khan", "Joan of Arc", "Galileo Galilei", "Ibn Battuta", "Queen Elizabeth I", "Mahatma Gandhi",
    "Simon Bolivar", "Harriet Tubman", "Confucius", "Julius Caesar", "Napoleon Bonaparte", "Hypatia of Alexandria",
    "Ada Lovelace", "Charles Darwin", "Catherine the Great", "Frederick Douglass", "Wangari Maathai",
    "King Sejong the Great", "Isaac Newton", "Florence Nightingale", "Abraham Lincoln", "the Mughal emperor Akbar",
    "Rosalind Franklin", "Ibn Sina", "Toussaint Louverture", "Alexander the Great", "Martin Luther King Jr.",
    "Hatshepsut", "Ferdinand Magellan",
]
PHIL_IDEAS = [
    "Plato's allegory of the cave", "utilitarianism", "Stoicism", "Descartes' idea \"I think, therefore I am\"",
    "the trolley problem", "the ship of Theseus puzzle", "Kant's categorical imperative", "existentialism",
    "social contract theory", "the Confucian idea of filial piety", "Zeno's paradox of Achilles and the tortoise",
    "Aristotle's idea of the golden mean", "the problem of free will", "the Buddhist idea of impermanence",
    "Epicureanism", "moral relativism", "Rawls's veil of ignorance", "Occam's razor", "the mind-body problem",
    "the Socratic method", "empiricism", "the Taoist idea of wu wei", "Pascal's wager", "the problem of induction",
]
PHIL_QUESTIONS = [
    "Is it ever right to break a promise?", "Can a machine ever truly think?",
    "Is happiness the most important goal in life?", "Do we have a duty to help strangers?",
    "Is it possible to know anything for certain?", "Should people always tell the truth?",
    "What makes a life meaningful?", "Is beauty in the eye of the beholder?", "Are people naturally good?",
    "Does art need to have a purpose?", "Is it fair to judge historical figures by today's values?",
    "What makes someone a good friend?", "Should animals have rights?",
    "Is it better to be respected or to be liked?", "Can money buy happiness?",
]
LIT_WORKS = [
    ("Romeo and Juliet", "William Shakespeare"), ("Hamlet", "William Shakespeare"),
    ("Macbeth", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"), ("Frankenstein", "Mary Shelley"),
    ("Moby-Dick", "Herman Melville"), ("Don Quixote", "Miguel de Cervantes"), ("The Odyssey", "Homer"),
    ("Jane Eyre", "Charlotte Bronte"), ("Great Expectations", "Charles Dickens"),
    ("A Christmas Carol", "Charles Dickens"), ("Crime and Punishment", "Fyodor Dostoevsky"),
    ("War and Peace", "Leo Tolstoy"), ("The Adventures of Huckleberry Finn", "Mark Twain"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Things Fall Apart", "Chinua Achebe"), ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
    ("The Tale of Genji", "Murasaki Shikibu"), ("Little Women", "Louisa May Alcott"),
    ("The Little Prince", "Antoine de Saint-Exupery"), ("Dracula", "Bram Stoker"),
    ("The Metamorphosis", "Franz Kafka"), ("Wuthering Heights", "Emily Bronte"),
    ("Gulliver's Travels", "Jonathan Swift"), ("The Divine Comedy", "Dante Alighieri"),
    ("Animal Farm", "George Orwell"), ("To Kill a Mockingbird", "Harper Lee"), ("The Epic of Gilgamesh", ""),
    ("Journey to the West", "Wu Cheng'en"), ("Treasure Island", "Robert Louis Stevenson"),
    ("The Old Man and the Sea", "Ernest Hemingway"),
]
LIT_DEVICES = [
    "a metaphor", "a simile", "irony", "foreshadowing", "alliteration", "personification", "an unreliable narrator",
    "a flashback", "onomatopoeia", "hyperbole", "symbolism", "a sonnet", "blank verse", "a tragic hero", "satire",
    "an allegory", "dramatic irony", "a cliffhanger", "stream of consciousness", "an epic poem",
]
ART_MOVEMENTS = [
    "Impressionism", "Cubism", "Renaissance painting", "Baroque art", "Surrealism", "Art Nouveau",
    "Japanese ukiyo-e prints", "Pop Art", "Romantic painting", "Gothic architecture", "Abstract Expressionism",
    "the Bauhaus school of design", "Art Deco", "Minimalism", "Chinese ink painting", "Mughal miniature painting",
    "Islamic geometric art", "Byzantine mosaics", "Dutch Golden Age painting", "Post-Impressionism", "Futurism",
    "nineteenth-century Realism",
]
ARTWORKS = [
    "the Mona Lisa", "The Starry Night by Vincent van Gogh", "The Great Wave off Kanagawa by Hokusai",
    "Michelangelo's statue of David", "The Persistence of Memory by Salvador Dali",
    "Girl with a Pearl Earring by Johannes Vermeer", "The Scream by Edvard Munch", "Las Meninas by Diego Velazquez",
    "the ceiling of the Sistine Chapel", "The Birth of Venus by Sandro Botticelli", "Guernica by Pablo Picasso",
    "the Taj Mahal", "the Parthenon in Athens", "The Thinker by Auguste Rodin", "Claude Monet's Water Lilies",
    "the Terracotta Army of Xi'an", "The Night Watch by Rembrandt", "the Bayeux Tapestry",
    "The Kiss by Gustav Klimt", "the Alhambra in Granada", "the Sydney Opera House", "Angkor Wat",
    "the Lascaux cave paintings", "The School of Athens by Raphael",
]
HUMANITIES_LISTS = {
    "events": split(HIST_EVENTS, None, "hum-events"),
    "people": split(HIST_PEOPLE, None, "hum-people"),
    "ideas": split(PHIL_IDEAS, None, "hum-ideas"),
    "questions": split(PHIL_QUESTIONS, None, "hum-questions"),
    "works": split(LIT_WORKS, None, "hum-works"),
    "devices": split(LIT_DEVICES, None, "hum-devices"),
    "movements": split(ART_MOVEMENTS, None, "hum-movements"),
    "artworks": split(ARTWORKS, None, "hum-artworks"),
}


def build_humanities(s: str, r: random.Random) -> Callable[[], str]:
    L = {k: Pool(v[s], r) for k, v in HUMANITIES_LISTS.items()}

    def event() -> str:
        e = L["events"]()
        return r.choice([
            f"Briefly describe {e} and explain why it mattered.", f"Give a short overview of {e}.",
            f"What were the most important effects of {e}?", f"Why do historians consider {e} important?",
            f"Explain {e} to a high-school student in one short paragraph.", f"What are three key facts about {e}?",
        ])

    def person() -> str:
        p = L["people"]()
        return r.choice([
            f"Who was {p}, and why are they remembered today?", f"Write a short biography of {p}.",
            f"What were the main achievements of {p}?", f"Describe the life of {p} in a few sentences.",
            f"Why is {p} an important historical figure?",
        ])

    def idea() -> str:
        i = L["ideas"]()
        return r.choice([
            f"Explain {i} in simple terms.", f"What is the main idea behind {i}?",
            f"Give a short explanation of {i} and an everyday example of it.",
            f"Summarize {i} in a short paragraph.", f"How might {i} apply to everyday life?",
        ])

    def debate() -> str:
        q = L["questions"]()
        return r.choice([f"{q} Give one argument for and one against.", f"{q} Discuss both sides briefly.",
                         f"Philosophy question: {q} Explain your view in a short paragraph."])

    def work() -> str:
        title, author = L["works"]()
        full = f"{title} by {author}" if author else title
        return r.choice([
            f"What is the main theme of {full}?", f"Give a short summary of the plot of {title}.",
            f"Why is {full} still read today?", f"Describe the main character of {title} in a few sentences.",
            f"What lesson might a reader take from {full}?",
        ])

    def device() -> str:
        d = L["devices"]()
        return r.choice([f"What is {d} in literature? Give an example.", f"Explain {d} and show one short example.",
                         f"How do writers use {d}? Give an example."])

    def movement() -> str:
        m = L["movements"]()
        return r.choice([
            f"What are the main features of {m}?",
            f"Describe {m} in a few sentences and name one well-known artist or example.",
            f"How did {m} differ from the art that came before it?", f"Give a short introduction to {m}.",
        ])

    def artwork() -> str:
        a = L["artworks"]()
        return r.choice([f"Why is {a} famous?", f"Describe {a} and what makes it special.",
                         f"What can you tell me about {a}? Keep it brief.",
                         f"What should a visitor notice when looking at {a}?"])

    return lambda: weighted(r, [(18, event), (16, person), (13, idea), (8, debate), (16, work), (9, device),
                                (10, movement), (10, artwork)])


# ----------------------------------------------------------------------------------------------------------
# roleplay / chat
# ----------------------------------------------------------------------------------------------------------

ROLE_SCENES = [
    ("a tour guide in a medieval castle", "Welcome a group of visitors and describe the great hall."),
    ("a ship's captain in the 1700s", "Give your crew a short speech before a long voyage."),
    ("a friendly librarian", "Help me choose a book for a long train journey."),
    ("a park ranger", "Explain to a group of hikers how to stay safe on the mountain trail."),
    ("a chef on a cooking show", "Introduce today's recipe: a simple tomato soup."),
    ("a museum guide", "Tell visitors about the dinosaur skeleton in the main hall."),
    ("a football coach", "Give your team a pep talk at half-time when they are losing by two goals."),
    ("a time traveller from the year 2300", "Describe what a normal morning looks like in your time."),
    ("a wise old owl in a forest", "Give advice to a young rabbit who is afraid of the dark."),
    ("a weather presenter on the evening news", "Give tomorrow's forecast for a stormy day."),
    ("a detective in a mystery story", "Explain to everyone in the room how you worked out who took the necklace."),
    ("a barista at a busy coffee shop", "Take my order and recommend a drink for a cold morning."),
    ("a knight guarding a bridge", "Ask me three questions before letting me cross."),
    ("a robot who has just learned to feel emotions", "Describe how you feel on your first day."),
    ("a travel agent", "Suggest a relaxing three-day trip for someone who loves the sea."),
    ("an astronaut on the International Space Station", "Answer a school student's question about food in space."),
    ("a pirate looking for treasure", "Tell your crew about the map you just found."),
    ("a gardener in a royal garden", "Show a visitor around the rose beds."),
    ("a news reporter at a town fair", "Report live on the giant vegetable competition."),
    ("a kind dragon", "Introduce yourself to a village that is scared of you."),
    ("a fitness instructor", "Lead a five-minute warm-up for beginners."),
    ("a shopkeeper in a magic shop", "Describe three unusual items on your shelves."),
    ("a lighthouse keeper", "Tell a visitor about the worst storm you have seen."),
    ("a history teacher", "Start a lesson about ancient Egypt in an exciting way."),
    ("a zookeeper", "Explain to visitors what the elephants eat in a day."),
    ("a game show host", "Introduce the contestants and explain the rules of the first round."),
    ("a hotel receptionist", "Check in a tired guest who arrived late at night."),
    ("a talking cat", "Explain why you knocked the vase off the table."),
    ("a mountain guide", "Brief a group before they start climbing at sunrise."),
    ("a scientist who has just made a discovery", "Announce your findings at a press conference in simple words."),
    ("an alien visiting Earth for the first time", "Describe your first trip to a supermarket."),
    ("a radio DJ", "Introduce the next song and say hello to the listeners."),
    ("a bookshop owner", "Convince a customer to try reading poetry."),
    ("a sailor in a storm", "Write a short log entry describing the night."),
    ("a fortune teller at a fair", "Give a light-hearted prediction for my week."),
    ("a train conductor", "Make an announcement about a twenty-minute delay."),
    ("a wildlife photographer", "Describe waiting all day to photograph a snow leopard."),
    ("a medieval baker", "Describe your morning before the market opens."),
    ("a teacher on the first day of school", "Welcome a new class of nervous students."),
    ("a tailor", "Help a customer choose fabric for a wedding suit."),
]
CUSTOMER_LINES = [
    ("a bookshop assistant", "Do you have anything like the detective stories my grandfather used to read?"),
    ("a bike repair shop owner", "My front brake squeaks every time I stop."),
    ("a hotel receptionist", "The room next to mine is very noisy."),
    ("a cafe owner", "I ordered oat milk, but I think this is regular milk."),
    ("a pet shop assistant", "What do I need before bringing home a rabbit?"),
    ("a train station attendant", "I missed my connection. What can I do?"),
    ("a gym receptionist", "I want to cancel my membership."),
    ("a florist", "I need flowers for someone who just started a new job."),
    ("a tech support agent", "My laptop will not connect to the Wi-Fi."),
    ("a bakery assistant", "Which of your cakes is best for a child's birthday?"),
    ("a museum ticket seller", "Is the museum good for small children?"),
    ("a garden centre worker", "My tomato plants are wilting."),
    ("a tailor", "These trousers are too long. Can you help?"),
    ("a restaurant waiter", "I am allergic to nuts. What can I eat here?"),
    ("a travel agent", "I have five days and a small budget. Where should I go?"),
    ("a librarian", "How do I get a library card?"),
    ("a shoe shop assistant", "I need shoes for walking all day at a conference."),
    ("a hardware shop assistant", "How do I fix a squeaky door?"),
    ("a car rental agent", "Can I return the car in a different city?"),
    ("a music teacher", "I'm forty. Is it too late to learn the piano?"),
]
INTERVIEWS = [
    ("a medieval blacksmith", "What does a normal working day look like for you?"),
    ("a Roman soldier on the frontier", "What do you miss most about home?"),
    ("a honeybee", "What is the hardest part of your job?"),
    ("an old oak tree in a city park", "What changes have you seen over the years?"),
    ("a deep-sea explorer", "What was the strangest creature you ever met?"),
    ("a Victorian chimney sweep", "What dangers do you face at work?"),
    ("a Viking trader", "What goods do you bring back from your travels?"),
    ("an emperor penguin", "How do you stay warm in the Antarctic winter?"),
    ("a retired circus performer", "What was your favourite act?"),
    ("a mapmaker in the 1500s", "How do you draw places you have never visited?"),
    ("a settler on Mars", "What do you grow in your greenhouse?"),
    ("a scribe in ancient Egypt", "What do you write about every day?"),
    ("a silk merchant on the Silk Road", "What is the most dangerous part of your journey?"),
    ("a lighthouse on a rocky coast", "What do you think about during long winter nights?"),
    ("the first person to reach the top of a mountain", "How did you feel at the summit?"),
]
CHAT_MESSAGES = [
    "Hi! I just adopted a kitten. Can you suggest a few names?",
    "Hello! I'm bored on a rainy afternoon. What could I do indoors?",
    "Hey, can you tell me a fun fact about octopuses?",
    "Good morning! Can you suggest a cheerful way to start the day?",
    "I finally finished my first painting today! Any tips for my next one?",
    "Can you tell me a clean joke about vegetables?",
    "What's a good name for a small bakery by the sea?",
    "I'm planning a picnic with friends. What snacks should we bring?",
    "Can you recommend a kind of board game for four people who like strategy?",
    "Hi there! What is something interesting I could learn in ten minutes?",
    "I just started learning the guitar. What should I practise first?",
    "Tell me something nice about Mondays.",
    "My friend's birthday is tomorrow and I forgot to buy a present. Any quick ideas?",
    "What would be a fun theme for a family dinner night?",
    "Can you give me a riddle to ask my little brother?",
    "I just moved to a new city. How can I meet people?",
    "What's your favourite season, and why?",
    "Can you describe the perfect lazy Sunday?",
    "I'm going camping for the first time this weekend and I'm a bit nervous!",
    "Can you suggest a name for my new houseplant?",
    "I want to surprise my parents with breakfast. What could I make?",
    "Could you make up a short tongue twister for me?",
    "I got a new puppy and he keeps chewing my shoes. Help!",
    "What are some fun things to do at the beach besides swimming?",
    "If you could visit any planet, which one would you pick and why?",
    "Give me three questions to start a conversation at a party.",
    "I'm having a slow day. Can you cheer me up?",
    "Can you invent a new holiday and tell me how people would celebrate it?",
    "What's a fun fact about the Moon that most people don't know?",
    "My class is having a talent show. What are some easy talent ideas?",
    "Can you help me think of a name for our pub quiz team?",
    "Suggest a fun game we can play during a long car ride.",
    "Tell me a short story about a brave snail.",
    "Hi! Can you teach me a new word and use it in a sentence?",
    "What's a good way to spend a sunny Saturday in a small town?",
    "Can you write me a two-line poem to put on a birthday cake?",
]
ROLEPLAY_LISTS = {
    "scenes": split(ROLE_SCENES, None, "rp-scenes"),
    "customers": split(CUSTOMER_LINES, None, "rp-customers"),
    "interviews": split(INTERVIEWS, None, "rp-interviews"),
    "chat": split(CHAT_MESSAGES, None, "rp-chat"),
}


def build_roleplay(s: str, r: random.Random) -> Callable[[], str]:
    L = {k: Pool(v[s], r) for k, v in ROLEPLAY_LISTS.items()}

    def scene() -> str:
        role, task = L["scenes"]()
        return r.choice([f"Pretend you are {role}. {task}", f"You are {role}. {task}",
                         f"Role-play as {role}. {task} Stay in character.",
                         f"Imagine you are {role}. {task} Keep it to a short paragraph."])

    def customer() -> str:
        role, line = L["customers"]()
        return r.choice([f"You are {role}. A customer says: \"{line}\" Write your reply.",
                         f"Act as {role}. Respond helpfully to this customer: \"{line}\"",
                         f"Play the part of {role}. Someone asks: \"{line}\" What do you say?"])

    def interview() -> str:
        role, q = L["interviews"]()
        return r.choice([f"Let's do an interview. You are {role}. My first question: {q}",
                         f"Answer in character as {role}: {q}",
                         f"I'm interviewing {role} for a school project. Please answer as them: {q}"])

    def chat() -> str:
        return L["chat"]()

    return lambda: weighted(r, [(45, scene), (25, customer), (15, interview), (15, chat)])


# ----------------------------------------------------------------------------------------------------------
# everyday advice
# ----------------------------------------------------------------------------------------------------------

ADVICE_GOALS = [
    "sleep better", "save money on groceries", "keep houseplants alive", "stay focused while studying",
    "drink more water during the day", "start running as a complete beginner",
    "make my small apartment feel bigger", "get better at remembering names", "cook healthy meals on a tight budget",
    "reduce my screen time in the evening", "learn a new language on my own", "keep my desk tidy",
    "prepare for a job interview", "make friends after moving to a new town", "stop putting off household chores",
    "feel more confident when speaking in public", "waste less food at home",
    "start a small vegetable garden on a balcony", "get up earlier in the morning", "plan my week",
    "keep in touch with old friends", "stay warm at home without a big heating bill",
    "write a good CV for my first job", "get through a long flight comfortably", "teach a child to ride a bike",
    "make my phone battery last longer", "start reading more books", "take better photos with my phone",
    "keep my bike in good condition", "stay calm before an exam", "plan a birthday party on a small budget",
    "pack lighter for a weekend trip", "make a good first impression at a new job", "look after a new puppy",
    "improve my handwriting", "choose a ripe watermelon", "keep the kitchen clean while cooking",
    "help an elderly neighbour without being intrusive", "start a daily journaling habit",
    "keep kids entertained on a long car journey", "cook rice that isn't sticky", "study for a maths test",
    "give useful feedback to a coworker", "save energy at home", "make my morning routine faster",
    "choose a laptop for school", "stay motivated to exercise in winter", "keep cut flowers fresh for longer",
    "share a fridge fairly with roommates", "clear the clutter out of my wardrobe", "get my garden ready for winter",
    "make my presentations more interesting", "remember more of what I read", "spend less money on takeaway food",
    "stretch after sitting at a desk all day",
]
ADVICE_PROBLEMS = [
    "My neighbour plays loud music late at night.", "My houseplant's leaves are turning brown at the edges.",
    "I keep forgetting to reply to messages from friends.", "My roommate never washes the dishes.",
    "I have three deadlines in the same week.", "My bike chain keeps slipping.",
    "My dog barks whenever someone walks past the window.", "I feel tired every afternoon at work.",
    "A coworker keeps interrupting me in meetings.", "I spent too much money this month.",
    "My homemade bread never rises properly.", "My running shoes smell terrible.",
    "I can't decide between two job offers.", "My kids argue about screen time every evening.",
    "My laptop has become very slow.", "I get nervous when I have to make phone calls.",
    "My garden is full of snails.", "A friend always cancels plans at the last minute.",
    "I lose my keys almost every day.", "I can't fall asleep after using my phone in bed.",
    "My wooden table has a white water stain.", "My cat scratches the sofa.",
    "I forgot my best friend's birthday.", "My partner for a group project is not doing any work.",
    "My shower drains very slowly.", "I want to quit a club but don't want to upset anyone.",
    "My windows are covered in condensation every morning.",
    "I keep buying vegetables that go bad before I use them.", "My new shoes give me blisters.",
    "My email inbox is so full that I feel overwhelmed.", "I have to give a toast at a wedding and I'm nervous.",
    "My teenager doesn't want to talk at dinner.", "My flat gets very hot in summer and I don't have air conditioning.",
]
ADVICE_DECISIONS = [
    "Should I learn the piano or the guitar as my first instrument?",
    "Is it better to study in the morning or at night?", "Should I buy a new phone or repair my old one?",
    "Is it better to cook in bulk on Sundays or cook fresh every day?", "Should I take the bus or cycle to work?",
    "Should I get a cat or a dog if I live in a small flat?",
    "Should I pay off a small debt first or build an emergency fund?", "Should I read paper books or e-books?",
    "Should I join a gym or exercise at home?", "Is it better to plan a holiday in detail or leave room for surprises?",
    "Should I learn Spanish or French first?", "Should I take notes in class on a laptop or by hand?",
    "Is it better to have one big goal or several small ones?",
    "Should I paint my small bedroom a light or a dark colour?",
    "Should I repaint my old furniture or buy new pieces?", "Should I take a gap year before university?",
    "Is it better to go for a walk in the morning or in the evening?", "Should I buy fresh or frozen vegetables?",
]
ADVICE_TRIPS = [
    "a weekend hiking trip in the mountains", "a week at the beach", "a winter city break",
    "a three-day business trip", "a camping trip with young children", "a long train journey", "a music festival",
    "a cycling tour", "a visit to a rainy city in autumn", "a ski trip", "a school field trip", "a wedding abroad",
    "a road trip across a desert", "a sailing weekend", "a summer visit to grandparents in the countryside",
]
ADVICE_LISTS = {
    "goals": split(ADVICE_GOALS, None, "adv-goals"),
    "problems": split(ADVICE_PROBLEMS, None, "adv-problems"),
    "decisions": split(ADVICE_DECISIONS, None, "adv-decisions"),
    "trips": split(ADVICE_TRIPS, None, "adv-trips"),
}


def build_advice(s: str, r: random.Random) -> Callable[[], str]:
    L = {k: Pool(v[s], r) for k, v in ADVICE_LISTS.items()}

    def goal() -> str:
        g = L["goals"]()
        return r.choice([f"How can I {g}? Give me three practical tips.", f"What are some simple ways to {g}?",
                         f"I want to {g}. Where should I start?", f"Any advice on how to {g}?",
                         f"Give me a short step-by-step plan to {g}.",
                         f"What mistakes should I avoid when trying to {g}?"])

    def problem() -> str:
        p = L["problems"]()
        return r.choice([f"{p} What should I do?", f"{p} Any suggestions?",
                         f"I need some advice. {p} How can I fix this?", f"{p} What would you recommend?"])

    def decision() -> str:
        d = L["decisions"]()
        return r.choice([f"{d} Give me the main pros and cons.", f"{d} Help me decide.", f"I'm torn. {d}"])

    def trip() -> str:
        t = L["trips"]()
        return r.choice([f"What should I pack for {t}? Give me a short checklist.",
                         f"Make a simple packing list for {t}.",
                         f"I'm getting ready for {t}. What shouldn't I forget?"])

    return lambda: weighted(r, [(50, goal), (28, problem), (12, decision), (10, trip)])


# ----------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[str, random.Random], Callable[[], str]]] = {
    "writing": build_writing,
    "reasoning": build_reasoning,
    "math": build_math,
    "code": build_code,
    "extraction": build_extraction,
    "stem": build_stem,
    "humanities": build_humanities,
    "summarization": build_summarization,
    "rewriting": build_rewriting,
    "roleplay": build_roleplay,
    "advice": build_advice,
}


def collect(category: str, split_name: str, n: int, seen: set[str]) -> list[dict[str, str]]:
    r = random.Random(f"{SEED}:{category}:{split_name}")
    make = BUILDERS[category](split_name, r)
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not make {n} distinct {split_name} prompts for {category!r}")
        prompt = make().strip()
        if not prompt or prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "category": category})
    return out


def build() -> dict[str, list[dict[str, str]]]:
    seen: set[str] = set()
    result: dict[str, list[dict[str, str]]] = {}
    # Training first: a held-out prompt can then never repeat a training prompt (the shared `seen` set), on top
    # of being built from reserved topics.
    for split_name, counts in (("train", TRAIN_COUNTS), ("heldout", HELDOUT_COUNTS)):
        rows = [row for category in CATEGORIES for row in collect(category, split_name, counts[category], seen)]
        random.Random(f"{SEED}:shuffle:{split_name}").shuffle(rows)
        result[split_name] = rows
    return result


def write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(Path(__file__).resolve().parent),
                        help="folder to write train.jsonl and heldout.jsonl into (default: this script's folder)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = build()
    for split_name in SPLITS:
        path = out / f"{split_name}.jsonl"
        write_jsonl(path, sets[split_name])
        counts = {c: sum(1 for row in sets[split_name] if row["category"] == c) for c in CATEGORIES}
        print(f"{path}: {len(sets[split_name])} prompts " + ", ".join(f"{c}={n}" for c, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
