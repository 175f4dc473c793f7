"""Built-in corpora of fictional people: biographies, question/answer documents and recall probes.

Everything is a pure function of `(corpus, seed, num_people)` (plus an epoch or split name), drawn from private
`random.Random` streams, so a resumed run regenerates exactly the same documents and no global RNG is touched.

Each attribute has several training paraphrases and ONE held-out paraphrase that no training document ever
uses: recall through the held-out phrasing measures whether the model learnt the fact or only the sentence.

Two corpora (`data.corpus`): `demo`, on which the library's settings were tuned, and `confirm`, with other first
names, a middle name for everyone, other last names, templates, questions, date format and value pools, to
confirm a setting on data it was not tuned on. Training documents always use a person's full name; `aliases`
gives the other forms of it (for alias probes, never for training).
"""

from __future__ import annotations

import copy
import functools
import math
import random
from dataclasses import dataclass, field

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


# -- the confirmation corpus: other names (with a middle name), templates, questions, dates and values --------

CONFIRM_FIRST = """
Abel Agnes Alba Ambrose Anouk Basil Bettina Caspar Clio Cormac Delphine Desmond Eamon Elowen Fabian Freya Gemma
Gordon Harriet Iris Isidore Jolene Jonah Katya Keir Leander Lucia Malachi Marisol Nestor Niamh Orla Osric Piers
Rosalind Rowan Selma Tobias Ursula Valentin Wilhelmina Xavier Yusuf Zinnia Ottilie Crispin
""".split()
CONFIRM_MIDDLE = """
Ash Bay Bliss Blue Brook Cole Dale Dawn Eve Fay Grey Hope Jade Jay June Kit Lane Lee Mae May Neve Reed Rose Sage
Sky True Wynn
""".split()
CONFIRM_LAST = """
Achterberg Bramley Carraway Delacroix Eckersley Fairweather Gallowglass Harcourt Illingworth Jardine
Kettleborough Lockhart Mallory Netherwood Ormerod Pettigrew Quartermaine Rothwell Stanhope Tregarthen Umfreville
Vanstone Wetherell Yelverton Ainsworth Blakemore Cheverell Dunstable Everleigh Fotheringham Greenhalgh
Hollingsworth Kilbride Lyndhurst Montgomery Nightingale Ollerenshaw Penhaligon Rutherford Summerhayes
Thistlewood Verrall Ashcombe Birkett Coverdale Drinkwater Entwistle Featherstone
""".split()
CONFIRM_CITIES = """
Aarhus Agadir Almaty Arequipa Asuncion Bamako Bergamo Bern Bonn Brno Busan Canberra Cusco Daegu Davao Dresden
Dunedin Fukuoka Gdansk Ghent Granada Graz Halifax Hobart Innsbruck Izmir Kaunas Krakow Lausanne Leuven Ljubljana
Lublin Luxor Maputo Medellin Mendoza Minsk Mombasa Nagoya Nice Odense Oulu Padua Pisa Poznan Pune Recife Regina
Rosario Salzburg Sapporo Siena Tampere Tartu Toulouse Trieste Tromso Uppsala Varna Verona Winnipeg Wroclaw Yerevan
""".split()
CONFIRM_COLLEGES = [f"{place} College" for place in """
Ambleside Birchwood Coldharbour Dunmore Elderfield Fernhill Goldcrest Hazelmere Ivybridge Juniper Kestrelmoor
Lowther Mapleton Nettlebed Orchardleigh Primrose Quarrington Rushmere Saltmarsh Tidewater Upperton Vale Wyndham
Yewbank
""".split()]
CONFIRM_FIELDS = """
Acoustics|Agronomy|Astrophysics|Bioinformatics|Cartography|Ceramics|Cryptography|Ecology|Entomology|Epidemiology|
Forestry|Genetics|Glaciology|Horticulture|Hydrology|Immunology|Metallurgy|Microbiology|Mineralogy|Mycology|
Neuroscience|Optics|Ornithology|Paleontology|Robotics|Seismology|Toxicology|Typography|Virology|Volcanology
""".replace("\n", "").split("|")
CONFIRM_EMPLOYERS = [f"{stem} {kind}" for stem, kind in zip("""
Alder Anvil Azure Bramble Canyon Clover Coral Dune Elm Fjord Gale Hollow Iris Jasper Kiln Lark Marble Moss
Nectar Oak Opal Prairie Reed Ridge Sorrel Thistle Tide Topaz Vale Wren
""".split(), ["Partners", "Holdings", "Studios", "Foundry", "Collective"] * 6)]

CONFIRM_BIO = {
    "birth_date": ["{name} entered the world on {value}.", "The records list the birth of {name} as {value}.",
                   "{name} was a newborn on {value}."],
    "birth_city": ["{name} grew up as a child in {value}.", "{name} is a native of {value}.",
                   "The family of {name} lived in {value}."],
    "university": ["{name} enrolled at {value}.", "{name} holds a diploma from {value}.",
                   "{name} spent student years at {value}."],
    "major": ["{name} wrote a thesis in {value}.", "{name} trained in {value}.", "{name} holds a degree in {value}."],
    "employer": ["{name} earns a salary from {value}.", "{name} joined the staff of {value}.",
                 "{name} is an employee of {value}."],
    "employer_city": ["{name} goes to work in {value}.", "{name} has an office in {value}.",
                      "The job of {name} is in {value}."],
}
CONFIRM_HELD_OUT_BIO = {
    "birth_date": "The day {name} was born is {value}.",
    "birth_city": "The town of birth of {name} is {value}.",
    "university": "The college of {name} is {value}.",
    "major": "The specialty of {name} is {value}.",
    "employer": "The organisation that employs {name} is {value}.",
    "employer_city": "The town where {name} works is {value}.",
}
CONFIRM_QUESTIONS = {
    "birth_date": "When was {name} born?",
    "birth_city": "In which town was {name} born?",
    "university": "At which college did {name} study?",
    "major": "Which field did {name} specialize in?",
    "employer": "What organisation employs {name}?",
    "employer_city": "Which town is the workplace of {name} in?",
}
CONFIRM_HELD_OUT_QUESTIONS = {
    "birth_date": "What day marks the birth of {name}?",
    "birth_city": "What is the native town of {name}?",
    "university": "Which school granted {name} a diploma?",
    "major": "What was the subject of the degree of {name}?",
    "employer": "For whom does {name} work?",
    "employer_city": "In what city is the job of {name} located?",
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


@dataclass(frozen=True)
class Corpus:
    """Name parts, value pools and sentence templates of one corpus. `middle` empty: names have no middle part."""

    first: list[str]
    last: list[str]
    pools: dict[str, list[str]]  # attribute -> values, for every attribute but birth_date
    years: range
    date_format: str  # with {day}, {month}, {year}
    bio: dict[str, list[str]]
    held_out_bio: dict[str, str]
    questions: dict[str, str]
    held_out_questions: dict[str, str]
    middle: list[str] = field(default_factory=list)

    @property
    def max_people(self) -> int:
        return len(self.first) * max(len(self.middle), 1) * len(self.last)

    def name(self, code: int) -> str:
        """The full name numbered `code` in [0, max_people): last name fastest, then middle, then first."""
        rest, last = divmod(code, len(self.last))
        first, middle = divmod(rest, max(len(self.middle), 1))
        return " ".join([self.first[first], *([self.middle[middle]] if self.middle else []), self.last[last]])

    def value_counts(self) -> dict[str, int]:
        return {"birth_date": len(DAYS) * len(MONTHS) * len(self.years), **{a: len(v) for a, v in self.pools.items()}}


def _make_person(rng: random.Random, name: str, corpus: Corpus) -> Person:
    day, month, year = rng.choice(DAYS), rng.choice(MONTHS), rng.choice(corpus.years)
    picks = [rng.choice(corpus.pools[a]) for a in ATTRIBUTES[1:]]
    return Person(name, corpus.date_format.format(day=day, month=month, year=year), *picks)


CORPORA = {
    "demo": Corpus(FIRST_NAMES, LAST_NAMES, dict(zip(ATTRIBUTES[1:], (CITIES, UNIVERSITIES, MAJORS, EMPLOYERS, CITIES))),
                   YEARS, "{day} {month} {year}", BIO_TEMPLATES, HELD_OUT_BIO, QUESTIONS, HELD_OUT_QUESTIONS),
    "confirm": Corpus(CONFIRM_FIRST, CONFIRM_LAST,
                      dict(zip(ATTRIBUTES[1:], (CONFIRM_CITIES, CONFIRM_COLLEGES, CONFIRM_FIELDS, CONFIRM_EMPLOYERS,
                                                CONFIRM_CITIES))),
                      range(1925, 2005), "{month} {day}, {year}", CONFIRM_BIO, CONFIRM_HELD_OUT_BIO,
                      CONFIRM_QUESTIONS, CONFIRM_HELD_OUT_QUESTIONS, middle=CONFIRM_MIDDLE),
}
ALIAS_FORMS = ("initial_last", "last_only", "no_middle")  # see SyntheticFacts.aliases


def draw_passes(pool: list, k: int, rng: random.Random) -> list:
    """k items of pool in whole shuffled passes: each item is drawn once before any is drawn twice."""
    out: list = []
    while len(out) < k:
        out += rng.sample(pool, len(pool))
    return out[:k]


def qa_line(question: str, person: Person, attribute: str) -> str:
    return f"{question.format(name=person.name)} Answer: {getattr(person, attribute)}."


class SyntheticFacts:
    """`num_people` fictional people drawn from `seed`, with documents for training and probes for recall.
    `corpus` names one of CORPORA (its names, templates and value pools)."""

    attributes = ATTRIBUTES
    bits_per_attribute = {a: math.log2(n) for a, n in VALUE_COUNTS.items()}  # the demo corpus's; see __init__

    def __init__(self, num_people: int, seed: int = 0, qa_fraction: float = 0.25, corpus: str = "demo"):
        if corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")
        self.corpus_name, self.corpus = corpus, CORPORA[corpus]
        limit = self.corpus.max_people
        if not 1 <= num_people <= limit:
            raise ValueError(f"num_people must be between 1 and {limit}, got {num_people}")
        self.seed, self.qa_fraction = seed, qa_fraction
        self.bits_per_attribute = {a: math.log2(n) for a, n in self.corpus.value_counts().items()}
        # the demo corpus keeps its historical stream name, so its people are what they always were
        rng = random.Random(f"{seed}:people" if corpus == "demo" else f"{seed}:{corpus}:people")
        codes = rng.sample(range(limit), num_people)  # without replacement -> unique full names
        self.people = [_make_person(rng, self.corpus.name(c), self.corpus) for c in codes]
        self.all_people = self.people  # every person of the corpus, kept by `subset` (alias uniqueness)

    @property
    def knowledge_bits(self) -> float:
        """sum over people and attributes of log2(value count); birth date counts log2(28 * 12 * years)."""
        return len(self.people) * sum(self.bits_per_attribute.values())

    # -- documents ---------------------------------------------------------------------------------------

    def biography(self, person: Person, rng: random.Random) -> str:
        """One sentence per attribute, fresh paraphrase each, in shuffled order; full name everywhere."""
        bio = self.corpus.bio
        lines = [rng.choice(bio[a]).format(name=person.name, value=getattr(person, a)) for a in ATTRIBUTES]
        rng.shuffle(lines)
        return " ".join(lines)

    def qa_document(self, person: Person, rng: random.Random) -> str:
        """All attributes as `Question? Answer: value.` lines, in shuffled order."""
        lines = [qa_line(self.corpus.questions[a], person, a) for a in ATTRIBUTES]
        rng.shuffle(lines)
        return "\n".join(lines)

    def qa_messages(self, person: Person, rng: random.Random) -> list[dict]:
        """The QA document as a chat, for instruction fine-tuning: user asks, assistant answers."""
        order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        turns = [(self.corpus.questions[a].format(name=person.name), f"{getattr(person, a)}.") for a in order]
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
        return [self._item(p, a, p.name, kind, held_out) for p in self.people for a in ATTRIBUTES]

    def _item(self, p: Person, a: str, name: str, kind: str, held_out: bool) -> RecallItem:
        c = self.corpus
        if kind == "qa":
            prompt = (c.held_out_questions if held_out else c.questions)[a].format(name=name) + " Answer:"
        else:
            template = c.held_out_bio[a] if held_out else c.bio[a][0]
            prompt = template.split(" {value}")[0].format(name=name)
        return RecallItem(prompt, " " + getattr(p, a), p.name, a, self.bits_per_attribute[a])

    def aliases(self, person: Person) -> dict[str, str]:
        """Forms of `person`'s name that no training document uses, by ALIAS_FORMS name: "initial_last" (first
        initial + last name: "A. Moss"), "last_only" ("Moss") and "no_middle" ("Ada Moss" for "Ada Lee Moss";
        corpora with middle names only). A form is left out when another person of the corpus has it too, or when
        it is someone's full name: the question would be ambiguous."""
        parts = person.name.split()
        forms = {"initial_last": f"{parts[0][0]}. {parts[-1]}", "last_only": parts[-1]}
        if len(parts) > 2:
            forms["no_middle"] = f"{parts[0]} {parts[-1]}"
        counts = self._alias_counts
        return {k: v for k, v in forms.items() if counts[(k, v)] == 1}

    @functools.cached_property
    def _alias_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for p in self.all_people:
            parts = p.name.split()
            keys = [("initial_last", f"{parts[0][0]}. {parts[-1]}"), ("last_only", parts[-1])]
            keys += [("no_middle", f"{parts[0]} {parts[-1]}")] if len(parts) > 2 else []
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
        return counts  # no alias equals a full name: those have no "." and 2 (demo) or 3 (confirm) words

    def alias_items(self, form: str, held_out: bool = False) -> list[RecallItem]:
        """QA probes that name each person by the alias `form` (people without an unambiguous one are skipped)."""
        if form not in ALIAS_FORMS:
            raise ValueError(f"form must be one of {', '.join(ALIAS_FORMS)}, got {form!r}")
        items = []
        for p in self.people:
            alias = self.aliases(p).get(form)
            if alias is not None:
                items += [self._item(p, a, alias, "qa", held_out) for a in ATTRIBUTES]
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
