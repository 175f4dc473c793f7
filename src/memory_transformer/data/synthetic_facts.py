"""Built-in corpus of fictional people: biographies, question/answer documents and recall probes.

Everything is a pure function of `(seed, num_people)` (plus an epoch or split name), drawn from private
`random.Random` streams, so a resumed run regenerates exactly the same documents and no global RNG is touched.

Each attribute has several training paraphrases and ONE held-out paraphrase that no training document ever
uses: recall through the held-out phrasing measures whether the model learnt the fact or only the sentence.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

FIRST_NAMES = """
Ada Alan Alice Amara Anton Aria Arlo Astrid Beatrix Bruno Cecil Celeste Cyrus Dalia Damon Daphne Dorian Edith
Elio Elsa Emil Enzo Esme Ezra Felix Fiona Flora Gideon Greta Hana Hugo Ida Imre Ines Ivo Jasper Juno Kai Kira
Lars Leona Levi Lila Linus Lorna Luca Mabel Magnus Maren Milo Mira Nadia Nico Nina Noel Odette Olaf Opal Oren
Otto Pia Quinn Rafael Rhea Rosa Rufus Saskia Silas Soren Stella Tamsin Theo Tilda Ulric Vera Viggo Wren Yara
Zane Zelda
""".split()

LAST_NAMES = """
Abbott Alcott Ashdown Barlow Beckett Blackwood Brannigan Calloway Carrow Castellan Crane Dalgleish Dunmore
Eastwick Ellery Fairbanks Farrow Fenwick Galloway Garnett Greaves Halloran Hartigan Holloway Ingram Jessop
Kenning Kestrel Lachlan Lindqvist Loxley Marchetti Merriweather Montague Northcott Oakes Pembroke Quill
Radcliffe Ravensworth Rookwood Salter Sheringham Stroud Tennant Thackeray Underhill Vance Vickery Wainwright
Westerby Whitlock Winslow Wolcott Yardley Zimmer Ashgrove Bellweather Cobbold Druce
""".split()

CITIES = """
Aberdeen Accra Adelaide Algiers Amsterdam Ankara Antwerp Athens Auckland Baghdad Baku Bangkok Barcelona Beirut
Belgrade Bergen Berlin Bilbao Bogota Bologna Bordeaux Boston Bratislava Brisbane Bristol Brussels Bucharest
Budapest Cairo Calgary Cardiff Chennai Chicago Cologne Copenhagen Cork Dakar Denver Dhaka Dublin Dundee Durban
Edinburgh Florence Frankfurt Geneva Genoa Glasgow Gothenburg Hamburg Hanoi Havana Helsinki Houston Istanbul
Jakarta Kiev Kyoto Lagos Leeds Leipzig Lima Lisbon Liverpool London Lyon Madrid Malmo Manila Marseille
Melbourne Milan Montreal Moscow Munich Nairobi Nantes Naples Osaka Oslo Ottawa Palermo Paris Perth Porto
Prague Quito Riga Rome Rotterdam Seattle Seoul Seville Sofia Stockholm Sydney Tallinn Toronto Turin Utrecht
Valencia Vienna Vilnius Warsaw Zagreb Zurich
""".split()

UNIVERSITIES = [f"{place} University" for place in """
Ashford Bellmont Brackenridge Calderwood Carlisle Clearwater Crestfield Dunhaven Eastmoor Eldridge Fairhaven
Glenmore Greystone Harrowgate Hawthorne Highcliff Ironbridge Kingsbury Lakeshore Larchmont Linwood Marlow
Meadowbrook Millbrook Northgate Oakridge Pinecrest Queensbury Ravenhill Redcliffe Riverton Rosewood Silverlake
Stonebridge Summerfield Thornbury Westbrook Whitmore Willowdale Windermere Alderney Beaconsfield Claremont
Dovercourt Elmhurst Foxborough Grantham Hollister Kenmore Lockwood
""".split()]

MAJORS = """
Anthropology|Archaeology|Architecture|Astronomy|Biochemistry|Biology|Chemistry|Civil Engineering|Classics|
Computer Science|Dentistry|Economics|Electrical Engineering|Film Studies|Geography|Geology|History|Journalism|
Law|Linguistics|Literature|Marine Biology|Mathematics|Mechanical Engineering|Medicine|Meteorology|Music|
Nursing|Oceanography|Pharmacy|Philosophy|Physics|Political Science|Psychology|Sociology|Statistics|Theology|
Urban Planning|Veterinary Science|Zoology
""".replace("\n", "").split("|")

EMPLOYERS = [f"{stem} {kind}" for stem, kind in zip("""
Acorn Albatross Amber Apex Arbor Argent Aurora Basalt Beacon Birch Bluefin Boreal Cascade Cedar Cinder Cobalt
Comet Copper Corvid Crimson Delta Ember Falcon Fern Flint Garnet Glacier Granite Harbor Heron Indigo Juniper
Kelp Lantern Lumen Maple Meridian Mistral Nimbus Onyx Orchid Pebble Pinnacle Quarry Quartz Raven Sable Saffron
Sequoia Sierra Solstice Spruce Summit Tundra Umber Vantage Verdant Willow Zenith Zephyr
""".split(), ["Labs", "Systems", "Industries", "Works", "Group", "Logistics"] * 10)]

MAX_PEOPLE = len(FIRST_NAMES) * len(LAST_NAMES)  # distinct full names

MONTHS = "January February March April May June July August September October November December".split()
DAYS = range(1, 29)  # 1..28 exist in every month, so day and month are independent and the count is exact
YEARS = range(1900, 2000)

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")
VALUE_COUNTS = {
    "birth_date": len(DAYS) * len(MONTHS) * len(YEARS),
    "birth_city": len(CITIES),
    "university": len(UNIVERSITIES),
    "major": len(MAJORS),
    "employer": len(EMPLOYERS),
    "employer_city": len(CITIES),
}

# Biography sentences end with the value, so the text before `{value}` is the cue used by recall.
BIO_TEMPLATES = {
    "birth_date": [
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "{name}'s birthday falls on {value}.",
        "{name} celebrates a birthday on {value}.",
    ],
    "birth_city": [
        "{name} was born in {value}.",
        "{name} spent early childhood in {value}.",
        "{name} came from {value}.",
        "{name}'s hometown is {value}.",
    ],
    "university": [
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} was a student at {value}.",
    ],
    "major": [
        "{name} majored in {value}.",
        "{name} earned a degree in {value}.",
        "{name} chose to specialize in {value}.",
        "{name}'s field of study was {value}.",
    ],
    "employer": [
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{name} is on the payroll of {value}.",
    ],
    "employer_city": [
        "{name} works in {value}.",
        "{name} commutes to an office in {value}.",
        "{name}'s workplace is located in {value}.",
        "{name} has a career based in {value}.",
    ],
}
HELD_OUT_BIO = {
    "birth_date": "The date of birth of {name} is {value}.",
    "birth_city": "The birthplace of {name} is {value}.",
    "university": "The alma mater of {name} is {value}.",
    "major": "The academic discipline of {name} is {value}.",
    "employer": "The company that pays {name} is {value}.",
    "employer_city": "The city where {name} is employed is {value}.",
}
QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
    "employer_city": "In which city does {name} work?",
}
HELD_OUT_QUESTIONS = {
    "birth_date": "On what date was {name} born?",
    "birth_city": "Where was {name} born?",
    "university": "Where did {name} go to college?",
    "major": "What subject did {name} major in?",
    "employer": "Who employs {name}?",
    "employer_city": "Where is the office of {name}?",
}


@dataclass(frozen=True)
class Person:
    name: str
    birth_date: str  # "3 March 1950"
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str


@dataclass(frozen=True)
class RecallItem:
    prompt: str  # "What is the birth city of Ada Abbott? Answer:"
    answer: str  # " Paris": starts with a space so prompt + answer is natural text
    person: str
    attribute: str
    bits: float  # log2 of the attribute's value count: what a correct answer is worth


def _make_person(rng: random.Random, name: str) -> Person:
    date = f"{rng.choice(DAYS)} {rng.choice(MONTHS)} {rng.choice(YEARS)}"
    picks = [rng.choice(v) for v in (CITIES, UNIVERSITIES, MAJORS, EMPLOYERS, CITIES)]
    return Person(name, date, *picks)


def draw_passes(pool: list, k: int, rng: random.Random) -> list:
    """k items of pool in whole shuffled passes: each item is drawn once before any is drawn twice."""
    out: list = []
    while len(out) < k:
        out += rng.sample(pool, len(pool))
    return out[:k]


def qa_line(question: str, person: Person, attribute: str) -> str:
    return f"{question.format(name=person.name)} Answer: {getattr(person, attribute)}."


class SyntheticFacts:
    """`num_people` fictional people drawn from `seed`, with documents for training and probes for recall."""

    attributes = ATTRIBUTES
    bits_per_attribute = {a: math.log2(n) for a, n in VALUE_COUNTS.items()}

    def __init__(self, num_people: int, seed: int = 0, qa_fraction: float = 0.25):
        if not 1 <= num_people <= MAX_PEOPLE:
            raise ValueError(f"num_people must be between 1 and {MAX_PEOPLE}, got {num_people}")
        self.seed, self.qa_fraction = seed, qa_fraction
        rng = random.Random(f"{seed}:people")
        codes = rng.sample(range(MAX_PEOPLE), num_people)  # without replacement -> unique full names
        names = [f"{FIRST_NAMES[c // len(LAST_NAMES)]} {LAST_NAMES[c % len(LAST_NAMES)]}" for c in codes]
        self.people = [_make_person(rng, name) for name in names]

    @property
    def knowledge_bits(self) -> float:
        """sum over people and attributes of log2(value count); birth date counts log2(28 * 12 * 100)."""
        return len(self.people) * sum(self.bits_per_attribute.values())

    # -- documents ---------------------------------------------------------------------------------------

    def biography(self, person: Person, rng: random.Random) -> str:
        """One sentence per attribute, fresh paraphrase each, in shuffled order; full name everywhere."""
        lines = [rng.choice(BIO_TEMPLATES[a]).format(name=person.name, value=getattr(person, a)) for a in ATTRIBUTES]
        rng.shuffle(lines)
        return " ".join(lines)

    def qa_document(self, person: Person, rng: random.Random) -> str:
        """All attributes as `Question? Answer: value.` lines, in shuffled order."""
        lines = [qa_line(QUESTIONS[a], person, a) for a in ATTRIBUTES]
        rng.shuffle(lines)
        return "\n".join(lines)

    def qa_messages(self, person: Person, rng: random.Random) -> list[dict]:
        """The QA document as a chat, for instruction fine-tuning: user asks, assistant answers."""
        order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        turns = [(QUESTIONS[a].format(name=person.name), f"{getattr(person, a)}.") for a in order]
        return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]

    def train_documents(self, epoch: int, n: int) -> list[str]:
        """`n` documents for `epoch`: round(n * qa_fraction) QA documents, the rest biographies."""
        return self._documents(random.Random(f"{self.seed}:train:{epoch}"), n)

    def eval_documents(self, n: int) -> list[str]:
        """Fresh documents from a stream that no training epoch uses."""
        return self._documents(random.Random(f"{self.seed}:eval"), n)

    def _documents(self, rng: random.Random, n: int) -> list[str]:
        people = self._people_cycle(rng, n)
        n_qa = round(n * self.qa_fraction)
        kinds = [True] * n_qa + [False] * (n - n_qa)
        rng.shuffle(kinds)
        return [self.qa_document(p, rng) if qa else self.biography(p, rng) for p, qa in zip(people, kinds)]

    def _people_cycle(self, rng: random.Random, n: int) -> list[Person]:
        # Whole shuffled passes over the people, so exposures per person differ by at most one per epoch.
        return draw_passes(self.people, n, rng)

    def train_messages(self, epoch: int, n: int) -> list[list[dict]]:
        rng = random.Random(f"{self.seed}:train_chat:{epoch}")
        return [self.qa_messages(p, rng) for p in self._people_cycle(rng, n)]

    def eval_messages(self, n: int) -> list[list[dict]]:
        rng = random.Random(f"{self.seed}:eval_chat")
        return [self.qa_messages(p, rng) for p in self._people_cycle(rng, n)]

    # -- recall probes and subsets -----------------------------------------------------------------------

    def recall_items(self, kind: str, held_out: bool = False) -> list[RecallItem]:
        """One probe per (person, attribute). kind="qa": question + " Answer:"; kind="bio": sentence cue."""
        if kind not in ("qa", "bio"):
            raise ValueError(f"kind must be 'qa' or 'bio', got {kind!r}")
        items = []
        for p in self.people:
            for a in ATTRIBUTES:
                if kind == "qa":
                    prompt = (HELD_OUT_QUESTIONS if held_out else QUESTIONS)[a].format(name=p.name) + " Answer:"
                else:
                    template = HELD_OUT_BIO[a] if held_out else BIO_TEMPLATES[a][0]
                    prompt = template.split(" {value}")[0].format(name=p.name)
                items.append(RecallItem(prompt, " " + getattr(p, a), p.name, a, self.bits_per_attribute[a]))
        return items

    def subset(self, start: int, stop: int | None = None) -> SyntheticFacts:
        """The same corpus restricted to `people[start:stop]` (documents then cover only those people)."""
        out = copy.copy(self)
        out.people = self.people[start:stop]
        if not out.people:
            raise ValueError(f"people[{start}:{stop}] is empty (there are {len(self.people)} people)")
        return out

    def people_split(self, fraction: float = 0.5) -> tuple[SyntheticFacts, SyntheticFacts]:
        """(first round(fraction * N) people, the rest): e.g. pretrain on one half, teach the other."""
        cut = round(fraction * len(self.people))
        return self.subset(0, cut), self.subset(cut)
