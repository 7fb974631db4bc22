"""Invented people for the benchmarks: names from syllables, streets, towns, ZIPs, MBIs.

Seeded, so a run writes the same people every time; no real person's data.
Shared by ``roster_scale.py`` (a million-member roster) and
``pipeline_throughput.py`` (a roster and the ADT messages about it).
"""

from __future__ import annotations

import random
from datetime import date, timedelta

# Syllables for invented names: combinations give tens of thousands of family names.
FAMILY_HEADS = [
    "Ash",
    "Bel",
    "Brack",
    "Cal",
    "Carr",
    "Dal",
    "Dun",
    "Ell",
    "Fair",
    "Fen",
    "Gal",
    "Gar",
    "Hal",
    "Hart",
    "Hol",
    "Kel",
    "Kin",
    "Lang",
    "Lind",
    "Mar",
    "Mel",
    "Mor",
    "Nor",
    "Oak",
    "Pem",
    "Pen",
    "Quill",
    "Ral",
    "Red",
    "Ros",
    "Sal",
    "Sel",
    "Stan",
    "Tal",
    "Thorn",
    "Tre",
    "Ul",
    "Van",
    "Wal",
    "Wen",
    "Whit",
    "Wil",
    "Win",
    "Yar",
    "Zel",
    "Abe",
    "Bran",
    "Cor",
    "Dra",
    "Esk",
    "Fal",
    "Grim",
    "Hask",
    "Ivor",
    "Jass",
    "Kess",
    "Lor",
    "Mab",
    "Nev",
]
FAMILY_TAILS = [
    "berg",
    "bright",
    "brook",
    "burn",
    "by",
    "dale",
    "den",
    "ford",
    "gate",
    "ham",
    "hill",
    "holt",
    "ington",
    "ley",
    "low",
    "mere",
    "more",
    "ner",
    "orth",
    "ridge",
    "ros",
    "sen",
    "shaw",
    "stead",
    "ston",
    "ter",
    "ton",
    "vale",
    "wick",
    "win",
    "wood",
    "worth",
    "ard",
    "ett",
    "ick",
    "is",
    "kin",
    "man",
    "nett",
    "ow",
]
GIVEN = [
    "Ada",
    "Alden",
    "Alma",
    "Amos",
    "Anika",
    "Ansel",
    "Aria",
    "Arlo",
    "Astrid",
    "Beatrix",
    "Bennett",
    "Bram",
    "Calla",
    "Cassius",
    "Celeste",
    "Cyrus",
    "Dalia",
    "Darius",
    "Delphine",
    "Desmond",
    "Edith",
    "Elias",
    "Elowen",
    "Emrys",
    "Esme",
    "Ezra",
    "Fenna",
    "Florian",
    "Freya",
    "Gideon",
    "Greta",
    "Hale",
    "Hazel",
    "Ida",
    "Imogen",
    "Ines",
    "Ivo",
    "Jasper",
    "Juno",
    "Kai",
    "Kira",
    "Lars",
    "Leona",
    "Linus",
    "Lyra",
    "Mabel",
    "Magnus",
    "Maren",
    "Milo",
    "Mira",
    "Nell",
    "Nico",
    "Noor",
    "Odile",
    "Orla",
    "Otto",
    "Pella",
    "Quentin",
    "Rhea",
    "Rowan",
    "Sabine",
    "Silas",
    "Soren",
    "Tamsin",
    "Teodor",
    "Thea",
    "Tobias",
    "Una",
    "Vera",
    "Viggo",
    "Wren",
    "Xander",
    "Yara",
    "Yusuf",
    "Zara",
    "Zeno",
    "Agnes",
    "Bruno",
    "Clara",
    "Dorian",
    "Elsa",
    "Felix",
    "Gemma",
    "Hugo",
    "Iris",
    "Jonas",
    "Katya",
    "Leo",
    "Maeve",
    "Nils",
    "Olive",
    "Pavel",
    "Rosa",
    "Stellan",
    "Tova",
    "Ulric",
    "Vita",
]
STREETS = [
    "Orchard",
    "Birch",
    "Maple",
    "Harbor",
    "Quarry",
    "Willow",
    "Meadow",
    "Lantern",
    "Copper",
    "Juniper",
    "Falcon",
    "Heron",
    "Granite",
    "Saddle",
    "Thistle",
    "Clover",
    "Ember",
    "Hollow",
    "Summit",
    "Cedar",
    "Alder",
    "Bramble",
]
STREET_KINDS = ["Street", "Avenue", "Road", "Lane", "Drive", "Court", "Way", "Place"]
TOWNS = [
    "Ashford Springs",
    "Belmere",
    "Copperton",
    "Dunmore Falls",
    "Eastwick Hollow",
    "Fairhaven Flats",
    "Glenrock",
    "Harrowgate",
    "Ironvale",
    "Juniper Bend",
    "Kestrel Point",
    "Larkspur",
    "Millbrook Crossing",
    "Northmere",
    "Oakridge Junction",
    "Pinecrest",
    "Quarry Hill",
    "Ravenholt",
    "Stonebridge",
    "Thornwick",
    "Umberfield",
]
STATES = ["IL", "IN", "WI", "IA", "MO", "OH", "MI", "KY", "MN", "NE"]
MBI_LETTERS = "ACDEFGHJKMNPQRTUVWXY"
MBI_ALNUM = MBI_LETTERS + "0123456789"


def mbi(rng: random.Random) -> str:
    """A random identifier in the CMS MBI format (C A AN N A AN N A A N N)."""
    return (
        str(rng.randint(1, 9))
        + rng.choice(MBI_LETTERS)
        + rng.choice(MBI_ALNUM)
        + str(rng.randint(0, 9))
        + rng.choice(MBI_LETTERS)
        + rng.choice(MBI_ALNUM)
        + str(rng.randint(0, 9))
        + rng.choice(MBI_LETTERS)
        + rng.choice(MBI_LETTERS)
        + f"{rng.randint(0, 99):02d}"
    )


def person(rng: random.Random, zips: list[str]) -> dict:
    """One invented person with a plausible address."""
    birth = date(1925, 1, 1) + timedelta(days=rng.randint(0, 80 * 365))
    zip_code = rng.choice(zips)
    return {
        "last_name": rng.choice(FAMILY_HEADS) + rng.choice(FAMILY_TAILS),
        "first_name": rng.choice(GIVEN),
        "middle_name": rng.choice(GIVEN)[0] if rng.random() < 0.6 else "",
        "birth_date": birth.isoformat(),
        "sex": rng.choice("MF"),
        "address_line": f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}",
        "city": TOWNS[int(zip_code) % len(TOWNS)],
        "state": STATES[int(zip_code) % len(STATES)],
        "zip": zip_code,
        "phone": f"{rng.randint(201, 989)}555{rng.randint(0, 9999):04d}",
    }


def typo(rng: random.Random, value: str) -> str:
    """One keying error: a swapped pair, a dropped or a changed letter."""
    if len(value) < 3:
        return value
    i = rng.randrange(len(value) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return value[:i] + value[i + 1] + value[i] + value[i + 2 :]
    if kind == 1:
        return value[:i] + value[i + 1 :]
    return value[:i] + rng.choice("AEIOURSTLN") + value[i + 1 :]
