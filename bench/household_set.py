"""A household-aware evaluation set for patient matching: members, their relatives, strangers.

Synthetic and seeded (``random.Random(seed)``): the same seed gives the same
set, byte for byte. No real person's data: family names are invented from
syllables (``synthetic_people``), given names are common US given names of
the 1930s-1950s birth cohorts and the formal names of
``mappings/nicknames.csv``, streets, towns and ZIPs are invented.

A roster of ACO members (Medicare ages) who live in households: spouses
(often both on the roster), twins, adult children and elderly parents
(namesakes among them: Jr/Sr with one given name), siblings. Queries are FHIR
R4 Patients without identifiers (demographic matching only):

- ``member``: a roster member as a hospital registered them, with 0-3
  registration errors (:data:`ERROR_WEIGHTS`);
- ``spouse``, ``twin``, ``parent_child``, ``jr_sr``, ``sibling``: a relative
  of a member, on the roster or not, as registered (with the same kind of
  noise); ``related_member`` names the member they are related to;
- ``stranger``: someone on no roster and related to nobody on it (some with
  a common family name, some in a member's ZIP).

Every rate below says where it comes from, or that it was chosen. The query
mix is stratified (rare classes are over-sampled so that each class has
enough queries to be measured); the household shapes of the roster follow
the published figures.

    .venv/bin/python bench/household_set.py --seed 2                  # a summary
    .venv/bin/python bench/household_set.py --seed 2 --out /tmp/hh   # roster.csv + queries.jsonl
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_people import (  # noqa: E402
    FAMILY_HEADS,
    FAMILY_TAILS,
    GIVEN,
    STATES,
    STREET_KINDS,
    STREETS,
    TOWNS,
    mbi,
)

from gateway.conversion.datatypes import npi_check_digit  # noqa: E402
from gateway.records import MEMBER_COLUMNS  # noqa: E402


def _npi(drawn: str) -> str:
    """A drawn 10-digit number made an NPI: its last digit replaced by the check digit."""
    return drawn[:9] + npi_check_digit(drawn[:9])


NICKNAMES_CSV = Path(__file__).resolve().parent.parent / "mappings" / "nicknames.csv"

#: The roster's columns, in the order of Herald's CSV layout (``herald roster import``).
ROSTER_KEYS = MEMBER_COLUMNS

#: Query classes, in report order.
CLASSES = ("member", "spouse", "twin", "parent_child", "jr_sr", "sibling", "stranger")

#: Ages are computed at this date, not today's, so that a seed always gives the same set.
AS_OF = date(2026, 7, 1)
ACO_ID = "HH-ACO"
EFFECTIVE_START = "2026-01-01"

# -- who the members are -------------------------------------------------------

#: Members under 65 (entitled by disability or ESRD). KFF, "Medicare's Role for People
#: Under Age 65 with Disabilities" (2016): 9.1 million, 16 % of the Medicare population.
UNDER_65_SHARE = 0.16
#: Age groups of the 65+ members. ACL/AoA, "A Profile of Older Americans: 2015": in 2014,
#: 26.4 M aged 65-74, 13.7 M aged 75-84, 6.2 M aged 85+ (of 46.2 M): 57 %, 30 %, 13 %.
AGE_GROUPS_65_PLUS = ((65, 74, 0.57), (75, 84, 0.30), (85, 99, 0.13))
#: Share of women. ACL/AoA, "A Profile of Older Americans: 2015": 127.2 women per 100 men
#: aged 65+ (25.9 M women, 20.4 M men): 56 %.
FEMALE_SHARE = 0.56

# -- households ----------------------------------------------------------------

#: Living with a spouse, by sex. ACL/AoA, "A Profile of Older Americans: 2013": 71 % of
#: men and 45 % of women aged 65+ lived with their spouse (57 % of all; 59 % with a
#: spouse or partner in the 2023 Profile, ACL).
WITH_SPOUSE = {"M": 0.71, "F": 0.45}
#: Same-sex couples. U.S. Census Bureau, American Community Survey 2021: about 710,000
#: married same-sex couple households, about 1 % of married couples (rounded; chosen 1 %).
SAME_SEX_COUPLE = 0.01
#: Husband's age minus wife's. Pew Research Center, "A growing share of U.S. husbands and
#: wives are roughly the same age" (2024, ACS 2022): 51 % within 2 years, 40 % husband 3+
#: years older, 10 % wife 3+ years older. The spread inside each band is chosen.
AGE_GAP_BANDS = ((0.51, -2, 2), (0.40, 3, 10), (0.09, -8, -3))
#: A wife's family name. Pew Research Center (2023 survey of 2,437 adults in opposite-sex
#: marriages): 79 % took the husband's name, 14 % kept theirs, 5 % hyphenated; of wives aged
#: 50+, 9 % kept theirs. Here (Medicare ages): took 86 %, kept 9 %, hyphenated 5 %.
WIFE_SURNAME = (("took", 0.86), ("kept", 0.09), ("hyphenated", 0.05))
#: A relative of Medicare age who lives with a member is on the same ACO's roster
#: (attributed to the same practice). No published figure found: chosen.
HOME_RELATIVE_ON_ROSTER = 0.6
#: The same for a relative of Medicare age living elsewhere. Chosen.
AWAY_RELATIVE_ON_ROSTER = 0.35
#: A relative under 65 is on the roster (on Medicare through disability, and attributed to
#: this ACO). Chosen: far below UNDER_65_SHARE, which is a share of beneficiaries, not of adults.
YOUNG_RELATIVE_ON_ROSTER = 0.03
#: A relative living elsewhere lives in the member's ZIP (else anywhere in the area). Chosen.
RELATIVE_SAME_ZIP = 0.5
#: Members of one household on the roster with the same PCP. Chosen.
SAME_PCP = 0.7
#: A relative living at the member's address also gives the home phone (else their own
#: mobile number). Chosen.
SHARES_HOME_PHONE = 0.6

#: Being a twin. NCHS Data Brief 80, "Three Decades of Twin Births in the United States,
#: 1980-2009" (Martin, Hamilton, Osterman, 2012): multiple births were stable at about 2 %
#: of all births from 1915 through the 1970s (the members' birth years); 33.3 per 1,000
#: births in 2009, 32.6 in 2018 (NCHS Data Brief 351, 2019).
TWIN_SHARE = 0.02
#: Same-sex twin pairs: one third of twins are identical (always the same sex), half of
#: fraternal twins are boy-girl (Mid-Atlantic Twin Registry, VCU, "Zygosity facts"), so
#: 1/3 + 2/3 * 1/2 = 2/3 are the same sex.
TWIN_SAME_SEX = 2 / 3
#: A twin who lives at the member's address. No figure found: chosen (high, since this is
#: the case the set exists to test; twins living elsewhere are in it too).
TWIN_AT_HOME = 0.35
#: Twins given names with the same first letter (SSA's lists of popular twin names are
#: mostly such pairs: Daniel and David, Madison and Morgan, Taylor and Tyler). Chosen.
TWIN_SAME_INITIAL = 0.3

#: A member living with an adult child (or an elderly parent). Harvard JCHS, "The Continued
#: Growth of Multigenerational Living" (2017, ACS 2015): 20.3 % of adults 65+ live in a
#: multigenerational household, two thirds of them in two adult generations.
LIVES_WITH_CHILD = 0.15
#: A member under 75 living with an elderly parent (part of the same 20.3 %). Chosen.
LIVES_WITH_PARENT = 0.05
#: How many adult children a member has (one of them at home: LIVES_WITH_CHILD). Chosen: the
#: members' cohorts (mothers of the baby boom) had two to three children on average.
ADULT_CHILDREN = ((0, 0.15), (1, 0.20), (2, 0.35), (3, 0.30))
#: A son named for his father (Jr). State vital statistics quoted by the Sun-Sentinel
#: ("Juniors maintain their niche", 1994): about 3 % of boys in Illinois, 2 % in Colorado,
#: 5 % in Missouri, 1.5-2.3 % in New York (1980-1992). Chosen 4 %: the members' sons were
#: born in the 1950s-1990s, when the custom was no rarer.
JUNIOR_SHARE = 0.04
#: A Jr or Sr whose suffix the roster file carries. Chosen: rosters (CMS CCLF8 among them)
#: often have no suffix column, and registrars often leave it out.
ROSTER_HAS_SUFFIX = 0.6
#: A registration that leaves out a Jr/Sr suffix (recorded as the error ``suffix_missing``).
#: Chosen: "Jr/Sr attached to their last names" is among the causes of misidentification
#: ECRI lists (Relias Media, "Registration mistakes can harm patients clinically").
QUERY_DROPS_SUFFIX = 0.5
#: A daughter (or sister) who still has the family name (never married, or kept it). Chosen
#: from the Pew figures above (9-14 % kept) and the never-married share.
DAUGHTER_KEEPS_SURNAME = 0.25
#: A sibling (not a twin) in the set as a possible query, and living at the member's address.
#: Chosen.
SIBLING = 0.3
SIBLING_AT_HOME = 0.15

#: Middle names: a person has one; the roster gives an initial (CMS files carry a middle
#: initial) or the whole name; a registration the whole name or an initial. Chosen.
HAS_MIDDLE = 0.8
ROSTER_MIDDLE_INITIAL = 0.6
QUERY_MIDDLE_INITIAL = 0.4

# -- names ----------------------------------------------------------------------

#: Common US given names of the members' birth cohorts, most common first. The first 44
#: male names are SSA's top names of the 1940s in order (James 795,767 births, Robert
#: 758,115, John 711,600 ... Ralph 64,980; howmanyofme.org's tabulation of SSA data); the
#: first five female names are SSA's 1940s top five (Mary ~640,000, Linda 531,609, Barbara
#: 425,226, Patricia, Carol); the rest are other common names of the period, order approximate.
MALE_COMMON = (
    "James Robert John William Richard David Charles Thomas Michael Ronald Larry Donald Joseph Gary "
    "George Kenneth Paul Edward Jerry Dennis Frank Daniel Raymond Roger Stephen Gerald Walter Harold "
    "Steven Douglas Lawrence Terry Wayne Arthur Jack Carl Henry Willie Bruce Joe Peter Billy Roy Ralph "
    "Anthony Jimmy Albert Bobby Eugene Johnny"
).split()
FEMALE_COMMON = (
    "Mary Linda Barbara Patricia Carol Sandra Nancy Sharon Judith Susan Betty Carolyn Margaret Shirley "
    "Judy Karen Donna Kathleen Joyce Dorothy Janet Diane Janice Joan Elizabeth Brenda Gloria Virginia "
    "Marilyn Martha Beverly Helen Bonnie Ruth Frances Jean Ann Peggy Kathryn Rebecca Catherine Phyllis "
    "Alice Rose Elaine Jane Wanda Connie Anna Theresa"
).split()
#: Less common names (formal names of mappings/nicknames.csv among them), and the invented
#: names of synthetic_people for both sexes.
MALE_RARE = (
    "Alan Alfred Andrew Bernard Benjamin Clifford Edwin Ernest Francis Franklin Frederick Gregory "
    "Herbert Howard Leonard Louis Martin Patrick Philip Samuel Theodore Timothy Vincent Edmund Isaac "
    "Nathan Matthew Christopher Geoffrey Terence Abraham Nicholas Oliver Bradley Jonathan Zachary"
).split()
FEMALE_RARE = (
    "Abigail Alexandra Allison Amanda Angela Anne Beatrice Caroline Charlotte Christina Constance "
    "Cynthia Deborah Eleanor Emily Emma Geraldine Harriet Josephine Louise Matilda Michelle Pamela "
    "Roberta Rosemary Sarah Stephanie Valerie Victoria Winifred Lois Evelyn Norma Marie Doris Jacqueline"
).split()
#: The share of people given one of the common names (the rest: a rarer or invented one).
#: SSA's 1940s top-50 lists hold 9.46 M boys and 7.70 M girls, about half of each sex's
#: births: chosen 55 %.
COMMON_GIVEN_SHARE = 0.55
#: Family names: the rank-r name's weight is (r + 3) ** -0.75 over 20,000 invented names, which
#: gives the most common name 0.84 % of people, the top 25 8.9 %, the top 239 24.5 %. U.S.
#: Census Bureau, "Frequently Occurring Surnames in the 2010 Census" (Comenetz, 2016):
#: Smith 2.44 M of 295 M (0.83 %), the top 25 names 8.7 % of the population, the top 239 25 %.
SURNAME_COUNT = 20_000
SURNAME_EXPONENT = 0.75
SURNAME_OFFSET = 3

# -- registration errors ----------------------------------------------------------

#: How many registration errors a query carries. Chosen: drawn per query rather than per
#: field because identifier errors cluster (by hospital, age, ethnicity: Harron et al.,
#: "Utilising identifier error variation in linkage of large administrative data sources",
#: BMC Med Res Methodol 17:23, 2017), and so that each count has enough queries.
ERROR_COUNTS = ((0, 0.45), (1, 0.33), (2, 0.15), (3, 0.07))
#: Relative frequency of each kind of error (a query's errors are drawn without replacement
#: among the kinds that apply to it). Chosen, ordered by Just et al., "Why Patient Matching
#: Is a Challenge: Research on MPI Data Discrepancies in Key Identifying Fields" (Perspectives
#: in Health Information Management, AHIMA, 2016; 398,939 records with confirmed duplicates):
#: the middle name is the field most often mismatched (58.3 % of pairs); most first- and
#: last-name mismatches are misspellings (53.1 % and 33.6 %) or swapped first/last/middle
#: names, first/last swaps ten times as frequent as in 2007, nicknames prevalent; date-of-birth
#: mismatches less frequent than before. A move: U.S. Census Bureau, "Domestic Migration of
#: Older Americans: 2015-2019" (2022): 6.2 % of adults 65+ moved in the prior year, 58 % of
#: them within the county; with these weights about 6 % of member queries carry a move.
ERROR_WEIGHTS = {
    "typo_given": 9,
    "typo_family": 9,
    "nickname": 10,
    "middle_missing": 9,
    "middle_changed": 3,
    "hyphenated_surname": 2,
    "changed_surname": 2,
    "swapped_names": 2,
    "day_month_swap": 2,
    "year_off": 3,
    "day_off": 3,
    "move": 5,
    "missing_phone": 8,
    "missing_address": 4,
}
#: The order errors are applied in (a nickname before a typo in it, a swap after both) and reported in.
APPLY_ORDER = (
    "nickname",
    "changed_surname",
    "hyphenated_surname",
    "typo_given",
    "typo_family",
    "middle_missing",
    "middle_changed",
    "swapped_names",
    "day_month_swap",
    "year_off",
    "day_off",
    "move",
    "missing_phone",
    "missing_address",
)
#: Every error kind a query may carry (``suffix_missing`` is drawn apart: QUERY_DROPS_SUFFIX).
ERROR_KINDS = (*APPLY_ORDER, "suffix_missing")
#: A move stays in the ZIP (Census: 58 % of older movers stayed in the county). Chosen 40 %.
MOVE_SAME_ZIP = 0.4

#: The query mix (stratified: rare classes over-sampled; see the module docstring). A
#: relative class with fewer candidates than its share gets them all, members the rest.
QUERY_MIX = (
    ("member", 0.55),
    ("spouse", 0.10),
    ("twin", 0.06),
    ("parent_child", 0.08),
    ("jr_sr", 0.04),
    ("sibling", 0.05),
    ("stranger", 0.12),
)
#: Strangers: a namesake (a member's family name, in the member's ZIP), someone in a
#: member's ZIP, or anyone. Chosen: a third each.
STRANGER_KINDS = ("namesake", "same_zip", "anyone")

ZIP_COUNT = 150
PCP_COUNT = 80


@dataclass(frozen=True, slots=True)
class HouseholdQuery:
    """One patient as a hospital registered them, and who they really are.

    ``errors``: the registration errors applied (:data:`ERROR_KINDS`);
    ``true_member``: their own member id when they are on the roster, else None;
    ``related_member``: for a relative, the roster member they are related to.
    """

    patient: dict
    cls: str
    errors: tuple[str, ...]
    true_member: str | None
    related_member: str | None


@dataclass(frozen=True, slots=True)
class HouseholdSet:
    """A roster (one dict per member, :data:`ROSTER_KEYS`) and the queries to match against it."""

    seed: int
    roster: list[dict]
    queries: list[HouseholdQuery]


@dataclass(slots=True)
class _Person:
    """Who someone really is (before any registration error)."""

    given: str
    middle: str
    family: str
    birth_family: str
    suffix: str
    birth: date
    sex: str
    street: str
    zip: str
    phone: str
    household: int
    member_id: str | None = None
    row: dict | None = None
    relatives: list[tuple[str, _Person]] = field(default_factory=list)


class _Names:
    """Zipf-like draws of family and given names, from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        mids = ("a", "e", "i", "o", "en", "er", "in", "ow", "ar", "el")
        invented = {h + t for h in FAMILY_HEADS for t in FAMILY_TAILS}
        invented |= {h + m + t for h in FAMILY_HEADS for m in mids for t in FAMILY_TAILS}
        surnames = sorted(invented)
        rng.shuffle(surnames)
        self.surnames = surnames[:SURNAME_COUNT]
        self.surname_cum = list(
            itertools.accumulate((r + SURNAME_OFFSET) ** -SURNAME_EXPONENT for r in range(1, SURNAME_COUNT + 1))
        )
        invented_given = sorted(set(GIVEN))
        self.given = {}
        for sex, common, rare in (("M", MALE_COMMON, MALE_RARE), ("F", FEMALE_COMMON, FEMALE_RARE)):
            tail = [n for n in (*rare, *invented_given) if n not in common]
            self.given[sex] = (
                common,
                list(itertools.accumulate(1 / (r + 3) for r in range(1, len(common) + 1))),
                tail,
                list(itertools.accumulate(1 / (r + 10) for r in range(1, len(tail) + 1))),
            )

    def family(self, rng: random.Random) -> str:
        return rng.choices(self.surnames, cum_weights=self.surname_cum)[0]

    def given_name(self, rng: random.Random, sex: str, unlike: str = "") -> str:
        common, common_cum, tail, tail_cum = self.given[sex]
        while True:
            if rng.random() < COMMON_GIVEN_SHARE:
                name = rng.choices(common, cum_weights=common_cum)[0]
            else:
                name = rng.choices(tail, cum_weights=tail_cum)[0]
            if not unlike or not one_name(name, unlike):
                return name


def _nicknames() -> dict[str, list[str]]:
    """Formal name -> its variants (mappings/nicknames.csv), upper case, in file order."""
    found: dict[str, list[str]] = {}
    with NICKNAMES_CSV.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            found.setdefault(row["name"].strip().upper(), []).append(row["variant"].strip().upper())
    return found


def _pick(rng: random.Random, weighted) -> object:
    r = rng.random()
    for value, weight in weighted:
        r -= weight
        if r < 0:
            return value
    return weighted[-1][0]


def _years_before(day: date, years: int, rng: random.Random) -> date:
    """A random day in the year ending ``years`` years before ``day`` (an age of ``years``)."""
    end = _shift_year(day, -years)
    return end - timedelta(days=rng.randrange(365))


def _shift_year(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def _age(birth: date) -> int:
    return AS_OF.year - birth.year - ((AS_OF.month, AS_OF.day) < (birth.month, birth.day))


def _member_age(rng: random.Random) -> int:
    if rng.random() < UNDER_65_SHARE:
        # Disability beneficiaries are mostly in their fifties and early sixties: chosen 70 % aged 50-64.
        return rng.randint(30, 64) if rng.random() < 0.3 else rng.randint(50, 64)
    low, high = _pick(rng, [((lo, hi), w) for lo, hi, w in AGE_GROUPS_65_PLUS])
    return rng.randint(low, high)


def _street(rng: random.Random) -> str:
    return f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}"


def _phone(rng: random.Random, zip_code: str) -> str:
    return f"{200 + int(zip_code) % 700}555{rng.randint(0, 9999):04d}"


def _city_state(zip_code: str) -> tuple[str, str]:
    return TOWNS[int(zip_code) % len(TOWNS)], STATES[int(zip_code) % len(STATES)]


class _Builder:
    """Generates households until the roster is full, then the queries."""

    def __init__(self, seed: int, members: int) -> None:
        self.rng = random.Random(seed)
        self.names = _Names(self.rng)
        self.nicknames = _nicknames()
        self.target = members
        self.zips = [f"{z:05d}" for z in sorted(self.rng.sample(range(46000, 63000), ZIP_COUNT))]
        self.pcps = [
            (
                _npi(f"1{self.rng.randrange(10**8, 10**9)}"),
                f"Dr. {self.rng.choice(GIVEN)} {self.names.family(self.rng)}",
            )
            for _ in range(PCP_COUNT)
        ]
        self.roster: list[dict] = []
        self.primaries: list[_Person] = []
        self.households = 0
        self.used_mbis: set[str] = set()

    # -- people -------------------------------------------------------------------

    def person(self, sex: str, birth: date, family: str, home: _Person | None, at_home: bool) -> _Person:
        rng = self.rng
        if at_home and home is not None:
            street, zip_code, household = home.street, home.zip, home.household
            phone = home.phone if rng.random() < SHARES_HOME_PHONE else _phone(rng, zip_code)
        else:
            zip_code = home.zip if home is not None and rng.random() < RELATIVE_SAME_ZIP else rng.choice(self.zips)
            street, phone = _street(rng), _phone(rng, zip_code)
            self.households += 1
            household = self.households
        middle = self.names.given_name(rng, sex) if rng.random() < HAS_MIDDLE else ""
        return _Person(
            given=self.names.given_name(rng, sex),
            middle=middle,
            family=family,
            birth_family=family,
            suffix="",
            birth=birth,
            sex=sex,
            street=street,
            zip=zip_code,
            phone=phone,
            household=household,
        )

    def enrol(self, p: _Person, pcp: tuple[str, str] | None = None) -> None:
        """Put ``p`` on the roster."""
        rng = self.rng
        n = len(self.roster) + 1
        while True:
            value = mbi(rng)
            if value not in self.used_mbis:
                self.used_mbis.add(value)
                break
        npi, pcp_name = pcp or rng.choice(self.pcps)
        middle = p.middle[0] if p.middle and rng.random() < ROSTER_MIDDLE_INITIAL else p.middle
        city, state = _city_state(p.zip)
        row = {
            "aco_id": ACO_ID,
            "member_id": f"HH{n:06d}",
            "mbi": value,
            "mrn": f"{rng.randrange(10**7, 10**8)}",
            "mrn_authority": "MERCY GENERAL",
            "last_name": p.family.upper(),
            "first_name": p.given.upper(),
            "middle_name": middle.upper(),
            "name_suffix": p.suffix if p.suffix and rng.random() < ROSTER_HAS_SUFFIX else "",
            "birth_date": p.birth.isoformat(),
            "sex": p.sex,
            "address_line": p.street.upper(),
            "city": city.upper(),
            "state": state,
            "zip": p.zip,
            "phone": p.phone,
            "pcp_npi": npi,
            "pcp_name": pcp_name,
            "care_manager": f"care-team-{int(npi) % 7 + 1}@hh-aco.example",
            "effective_start": EFFECTIVE_START,
            "effective_end": "",
            "opted_out": 0,
        }
        self.roster.append(row)
        p.member_id, p.row = row["member_id"], row

    def maybe_enrol(self, relative: _Person, primary: _Person, at_home: bool) -> None:
        if len(self.roster) >= self.target:
            return
        if _age(relative.birth) < 65:
            share = YOUNG_RELATIVE_ON_ROSTER
        else:
            share = HOME_RELATIVE_ON_ROSTER if at_home else AWAY_RELATIVE_ON_ROSTER
        if self.rng.random() < share:
            same = primary.row is not None and self.rng.random() < SAME_PCP
            self.enrol(relative, (primary.row["pcp_npi"], primary.row["pcp_name"]) if same else None)

    def married_name(self, wife_birth_family: str, husband_family: str) -> str:
        how = _pick(self.rng, WIFE_SURNAME)
        if how == "took":
            return husband_family
        if how == "kept":
            return wife_birth_family
        return f"{wife_birth_family}-{husband_family}"

    # -- households ---------------------------------------------------------------

    def household(self) -> None:
        rng = self.rng
        sex = "F" if rng.random() < FEMALE_SHARE else "M"
        age = _member_age(rng)
        birth = _years_before(AS_OF, age, rng)
        self.households += 1
        zip_code = rng.choice(self.zips)
        home_family = self.names.family(rng)
        p = _Person(
            given=self.names.given_name(rng, sex),
            middle=self.names.given_name(rng, sex) if rng.random() < HAS_MIDDLE else "",
            family=home_family,
            birth_family=home_family,
            suffix="",
            birth=birth,
            sex=sex,
            street=_street(rng),
            zip=zip_code,
            phone=_phone(rng, zip_code),
            household=self.households,
        )
        spouse = None
        if rng.random() < WITH_SPOUSE[sex]:
            spouse_sex = sex if rng.random() < SAME_SEX_COUPLE else ("M" if sex == "F" else "F")
            gap = rng.randint(*(_pick(rng, [((lo, hi), w) for w, lo, hi in AGE_GAP_BANDS])))
            # gap = husband's age - wife's, in whole years; the day of the year is the spouse's own.
            spouse_birth = _shift_year(birth, gap if sex == "F" else -gap) + timedelta(days=rng.randrange(-182, 183))
            if spouse_birth == birth:
                spouse_birth += timedelta(days=1)
            spouse = self.person(spouse_sex, spouse_birth, home_family, p, at_home=True)
            if one_name(spouse.given, p.given):
                spouse.given = self.names.given_name(rng, spouse_sex, unlike=p.given)
            if spouse_sex != sex:
                wife = p if sex == "F" else spouse
                wife.birth_family = self.names.family(rng)
                wife.family = self.married_name(wife.birth_family, home_family)
            p.relatives.append(("spouse", spouse))
        self.enrol(p)
        self.primaries.append(p)
        if spouse is not None:
            self.maybe_enrol(spouse, p, at_home=True)
        if rng.random() < TWIN_SHARE:
            self.twin(p)
        self.children(p, spouse)
        if age < 75 and rng.random() < LIVES_WITH_PARENT:
            self.parent(p)
        if rng.random() < SIBLING:
            self.sibling(p)

    def family_of_woman(self, birth_family: str) -> str:
        """A woman's family name now: her birth name, or a married name."""
        if self.rng.random() < DAUGHTER_KEEPS_SURNAME:
            return birth_family
        return self.married_name(birth_family, self.names.family(self.rng))

    def twin(self, p: _Person) -> None:
        rng = self.rng
        sex = p.sex if rng.random() < TWIN_SAME_SEX else ("M" if p.sex == "F" else "F")
        at_home = rng.random() < TWIN_AT_HOME
        t = self.person(sex, p.birth, p.birth_family, p, at_home)
        t.birth_family = p.birth_family
        if sex == "F":
            t.family = self.family_of_woman(p.birth_family)
        # Twins often get names with the same initial (Daniel and David); never the same name.
        for _ in range(20):
            name = self.names.given_name(rng, sex, unlike=p.given)
            if rng.random() >= TWIN_SAME_INITIAL or name[0] == p.given[0]:
                break
        t.given = name
        p.relatives.append(("twin", t))
        self.maybe_enrol(t, p, at_home)

    def children(self, p: _Person, spouse: _Person | None) -> None:
        rng = self.rng
        count = _pick(rng, ADULT_CHILDREN)
        home = rng.randrange(count) if count and rng.random() < LIVES_WITH_CHILD else -1
        age = _age(p.birth)
        low, high = max(30, age - 45), min(65, age - 18)  # adult children 30-65, born 18-45 years after
        if low > high:
            return
        fathers = [x for x in (p, spouse) if x is not None and x.sex == "M"]
        father_family = fathers[0].family if fathers else p.family
        for i in range(count):
            at_home = i == home
            sex = rng.choice("MF")
            c = self.person(sex, _years_before(AS_OF, rng.randint(low, high), rng), father_family, p, at_home)
            if sex == "F":
                keeps = at_home and rng.random() < 0.6
                c.family = father_family if keeps else self.family_of_woman(father_family)
            while any(one_name(c.given, x.given) for x in (p, *(x for _, x in p.relatives))):
                c.given = self.names.given_name(rng, sex, unlike=p.given)
            relation = "parent_child"
            if sex == "M" and p.sex == "M" and not p.suffix and rng.random() < JUNIOR_SHARE:
                self.namesake(senior=p, junior=c, primary=p)
                relation = "jr_sr"
            p.relatives.append((relation, c))
            self.maybe_enrol(c, p, at_home)

    def parent(self, p: _Person) -> None:
        rng = self.rng
        age = _age(p.birth)
        if age + 18 > 102:
            return
        sex = "F" if rng.random() < 0.7 else "M"  # women outlive men (chosen)
        birth = _years_before(AS_OF, rng.randint(age + 18, min(age + 45, 102)), rng)
        parent = self.person(sex, birth, p.birth_family, p, at_home=True)
        if sex == "F":
            parent.birth_family = self.names.family(rng)
            parent.family = self.married_name(parent.birth_family, p.birth_family)
        relation = "parent_child"
        if sex == "M" and p.sex == "M" and not p.suffix and rng.random() < JUNIOR_SHARE:
            self.namesake(senior=parent, junior=p, primary=p)
            relation = "jr_sr"
        p.relatives.append((relation, parent))
        self.maybe_enrol(parent, p, at_home=True)

    def namesake(self, senior: _Person, junior: _Person, primary: _Person) -> None:
        """Father and son with one name (JR and SR): the member's names go to his relative,
        usually with the middle name too; the roster carries the member's suffix or not."""
        other = junior if primary is senior else senior
        other.given, other.family = primary.given, primary.family
        if self.rng.random() < 0.85:
            other.middle = primary.middle
        senior.suffix, junior.suffix = "SR", "JR"
        if primary.row is not None and self.rng.random() < ROSTER_HAS_SUFFIX:
            primary.row["name_suffix"] = primary.suffix

    def sibling(self, p: _Person) -> None:
        rng = self.rng
        at_home = rng.random() < SIBLING_AT_HOME
        gap = rng.choice([y for y in range(-10, 11) if y])
        birth = _shift_year(p.birth, gap) + timedelta(days=rng.randrange(-150, 150))
        if _age(birth) > 102:
            return
        sex = rng.choice("MF")
        s = self.person(sex, birth, p.birth_family, p, at_home)
        if sex == "F":
            s.family = self.family_of_woman(p.birth_family)
        if one_name(s.given, p.given):
            s.given = self.names.given_name(rng, sex, unlike=p.given)
        p.relatives.append(("sibling", s))
        self.maybe_enrol(s, p, at_home)

    # -- queries --------------------------------------------------------------------

    def stranger(self, kind: str) -> _Person:
        rng = self.rng
        sex = "F" if rng.random() < FEMALE_SHARE else "M"
        birth = _years_before(AS_OF, _member_age(rng), rng)
        if kind == "anyone":
            zip_code, family = rng.choice(self.zips), self.names.family(rng)
        else:
            model = rng.choice(self.primaries)
            zip_code = model.zip
            family = model.family if kind == "namesake" else self.names.family(rng)
        self.households += 1
        middle = self.names.given_name(rng, sex) if rng.random() < HAS_MIDDLE else ""
        return _Person(
            given=self.names.given_name(rng, sex),
            middle=middle,
            family=family,
            birth_family=family,
            suffix="",
            birth=birth,
            sex=sex,
            street=_street(rng),
            zip=zip_code,
            phone=_phone(rng, zip_code),
            household=self.households,
        )

    def register(self, p: _Person) -> tuple[dict, tuple[str, ...]]:
        """``p`` as a registrar typed them: a FHIR Patient and the errors made."""
        rng = self.rng
        given, middle, family, suffix = p.given, p.middle, p.family, p.suffix
        birth, street, zip_code, phone = p.birth, p.street, p.zip, p.phone
        has_address = has_phone = True
        if middle and rng.random() < QUERY_MIDDLE_INITIAL:
            middle = middle[0]
        applicable = {
            "typo_given": len(given) >= 3,
            "typo_family": len(family) >= 3,
            "nickname": given.upper() in self.nicknames,
            "middle_missing": bool(middle),
            "middle_changed": len(middle) >= 3,
            "hyphenated_surname": p.sex == "F" and "-" not in family,
            "changed_surname": p.sex == "F",
            "swapped_names": True,
            "day_month_swap": birth.day <= 12 and birth.day != birth.month,
            "year_off": True,
            "day_off": True,
            "move": True,
            "missing_phone": True,
            "missing_address": True,
        }
        count = _pick(rng, ERROR_COUNTS)
        kinds = [k for k in ERROR_WEIGHTS if applicable[k]]
        chosen: list[str] = []
        while len(chosen) < count and kinds:
            kind = rng.choices(kinds, weights=[ERROR_WEIGHTS[k] for k in kinds])[0]
            kinds.remove(kind)
            if kind == "move" and "missing_address" in chosen or kind == "missing_address" and "move" in chosen:
                continue
            if {kind, *chosen} >= {"middle_missing", "middle_changed"}:
                continue
            chosen.append(kind)
        chosen.sort(key=APPLY_ORDER.index)
        for kind in chosen:
            if kind == "typo_given":
                given = _changed(rng, given)
            elif kind == "typo_family":
                family = _changed(rng, family)
            elif kind == "nickname":
                given = rng.choice(self.nicknames[given.upper()]).title()
            elif kind == "middle_missing":
                middle = ""
            elif kind == "middle_changed":
                # A keying error, or another middle name typed (the registrar's guess, the member's
                # confirmation name): Just et al. find the middle name the most mismatched field.
                middle = _changed(rng, middle) if rng.random() < 0.5 else self.names.given_name(rng, p.sex)
            elif kind == "hyphenated_surname":
                other = p.birth_family if p.birth_family != p.family else self.names.family(rng)
                family = f"{other}-{family}" if rng.random() < 0.5 else f"{family}-{other}"
            elif kind == "changed_surname":
                family = self.names.family(rng)
            elif kind == "swapped_names":
                given, family = family, given
            elif kind == "day_month_swap":
                birth = birth.replace(month=birth.day, day=birth.month)
            elif kind == "year_off":
                birth = _shift_year(birth, rng.choice((-1, 1)))
            elif kind == "day_off":
                birth = birth + timedelta(days=rng.choice((-1, 1)))
            elif kind == "move":
                zip_code = zip_code if rng.random() < MOVE_SAME_ZIP else rng.choice(self.zips)
                street, phone = _street(rng), _phone(rng, zip_code)
            elif kind == "missing_phone":
                has_phone = False
            elif kind == "missing_address":
                has_address = False
        if suffix and rng.random() < QUERY_DROPS_SUFFIX:
            suffix = ""
            chosen.append("suffix_missing")
        name: dict = {"family": family, "given": [given, middle] if middle else [given]}
        if suffix:
            name["suffix"] = [suffix]
        patient: dict = {
            "resourceType": "Patient",
            "name": [name],
            "birthDate": birth.isoformat(),
            "gender": "male" if p.sex == "M" else "female",
        }
        if has_address:
            city, state = _city_state(zip_code)
            # Registration writes the street kind in full or abbreviated (not an error: normalised).
            line = _abbreviate(street) if rng.random() < 0.3 else street
            patient["address"] = [{"use": "home", "line": [line], "city": city, "state": state, "postalCode": zip_code}]
        if has_phone:
            patient["telecom"] = [
                {"system": "phone", "value": f"({phone[:3]}) {phone[3:6]}-{phone[6:]}", "use": "home"}
            ]
        return patient, tuple(chosen)

    def queries(self, count: int) -> list[HouseholdQuery]:
        rng = self.rng
        pools: dict[str, list[tuple[_Person, _Person]]] = {c: [] for c in CLASSES}
        for p in self.primaries:
            for relation, r in p.relatives:
                pools[relation].append((r, p))
        wanted = {c: round(count * share) for c, share in QUERY_MIX}
        for c in ("spouse", "twin", "parent_child", "jr_sr", "sibling"):
            wanted[c] = min(wanted[c], len(pools[c]))
        wanted["member"] = count - sum(v for c, v in wanted.items() if c != "member")
        plan: list[tuple[str, _Person, _Person | None]] = []
        on_roster = [p for p in self._everyone() if p.member_id]
        for p in rng.sample(on_roster, min(wanted["member"], len(on_roster))):
            plan.append(("member", p, None))
        for c in ("spouse", "twin", "parent_child", "jr_sr", "sibling"):
            for r, p in rng.sample(pools[c], wanted[c]):
                plan.append((c, r, p))
        taken = {(row["first_name"], row["last_name"], row["birth_date"]) for row in self.roster}
        for i in range(wanted["stranger"]):
            while True:
                s = self.stranger(STRANGER_KINDS[i % len(STRANGER_KINDS)])
                if (s.given.upper(), s.family.upper(), s.birth.isoformat()) not in taken:
                    break
            plan.append(("stranger", s, None))
        rng.shuffle(plan)
        out = []
        for cls, person, related in plan:
            patient, errors = self.register(person)
            out.append(
                HouseholdQuery(
                    patient=patient,
                    cls=cls,
                    errors=errors,
                    true_member=person.member_id,
                    related_member=related.member_id if related is not None else None,
                )
            )
        return out

    def _everyone(self) -> list[_Person]:
        people = []
        for p in self.primaries:
            people.append(p)
            people.extend(r for _, r in p.relatives)
        return people


#: Share of keying errors in a name that hit its first letter. Chosen: "few errors are made in
#: the first character of a word" (Yannakoudakis and Fawthrop, "The rules of spelling errors",
#: Information Processing & Management 19(2), 1983); 7 % is our reading of "few", not a figure
#: from that paper.
FIRST_LETTER_TYPO = 0.07


def _changed(rng: random.Random, value: str) -> str:
    """One keying error that changes ``value``: a swapped pair, a dropped or a changed letter,
    at the first letter :data:`FIRST_LETTER_TYPO` of the time, elsewhere uniformly."""
    if len(value) < 3:
        return value[:-1] if len(value) > 1 else value
    for _ in range(10):
        i = 0 if rng.random() < FIRST_LETTER_TYPO else rng.randrange(1, len(value) - 1)
        kind = rng.randrange(3)
        if kind == 0:
            out = value[:i] + value[i + 1] + value[i] + value[i + 2 :]
        elif kind == 1:
            out = value[:i] + value[i + 1 :]
        else:
            out = value[:i] + rng.choice("aeiourstln" if i else "AEIOURSTLN") + value[i + 1 :]
        if out != value:
            return out
    return value[:-1]


@functools.cache
def _formals() -> dict[str, frozenset[str]]:
    """Upper-case given name -> the formal names it is (itself) or may stand for (nicknames.csv)."""
    found: dict[str, set[str]] = {}
    for formal, variants in _nicknames().items():
        found.setdefault(formal, set()).add(formal)
        for v in variants:
            found.setdefault(v, set()).add(formal)
    return {name: frozenset(f) for name, f in found.items()}


def one_name(a: str, b: str) -> bool:
    """Whether two given names are one name (equal, or forms of one formal name: William and
    Willie). Parents do not give two of their children one name, so relatives never share one."""
    a, b = a.upper(), b.upper()
    return a == b or bool(_formals().get(a, frozenset()) & _formals().get(b, frozenset()))


_KIND_ABBREVIATIONS = {"Street": "St", "Avenue": "Ave", "Road": "Rd", "Lane": "Ln", "Drive": "Dr", "Court": "Ct"}


def _abbreviate(street: str) -> str:
    head, _, kind = street.rpartition(" ")
    return f"{head} {_KIND_ABBREVIATIONS.get(kind, kind)}"


def make_household_set(seed: int, members: int = 20000, queries: int = 3000) -> HouseholdSet:
    """A roster of ``members`` members living in households, and ``queries`` queries against it.

    Deterministic for a seed. Seed 1 is for fitting the matching model, seed 2 for evaluating it.
    """
    builder = _Builder(seed, members)
    while len(builder.roster) < members:
        builder.household()
    return HouseholdSet(seed=seed, roster=builder.roster, queries=builder.queries(queries))


def relative_registrations(seed: int, members: int = 20000) -> list[HouseholdQuery]:
    """Every relative of every household of the set of ``seed`` registered once, as they live
    (not the stratified query mix): the population of people related to a member.

    ``cls`` is the relation, ``related_member`` the member they are related to, ``true_member``
    their own member id when they are on the roster. For fitting (bench/fit_household.py).
    """
    builder = _Builder(seed, members)
    while len(builder.roster) < members:
        builder.household()
    out = []
    for p in builder.primaries:
        for relation, r in p.relatives:
            patient, errors = builder.register(r)
            out.append(HouseholdQuery(patient, relation, errors, r.member_id, p.member_id))
    return out


def summary(hs: HouseholdSet) -> dict:
    """Counts that describe a set: households, relatives on the roster, the query mix, the errors."""
    homes = Counter((r["address_line"], r["zip"]) for r in hs.roster)
    suffixes = Counter(r["name_suffix"] for r in hs.roster if r["name_suffix"])
    family = Counter(r["last_name"] for r in hs.roster)
    first = Counter((r["sex"], r["first_name"]) for r in hs.roster)
    members = [q for q in hs.queries if q.cls == "member"]
    return {
        "seed": hs.seed,
        "members": len(hs.roster),
        "members_sharing_a_home_with_another_member": sum(n for n in homes.values() if n > 1),
        "roster_suffixes": dict(sorted(suffixes.items())),
        "most_common_family_names": family.most_common(3),
        "most_common_given_names": [(f"{n} ({s})", c) for (s, n), c in first.most_common(3)],
        "queries": len(hs.queries),
        "by_class": {c: sum(q.cls == c for q in hs.queries) for c in CLASSES},
        "relatives_on_roster": {
            c: sum(q.cls == c and q.true_member is not None for q in hs.queries) for c in CLASSES[1:-1]
        },
        "member_error_counts": dict(sorted(Counter(len(q.errors) for q in members).items())),
        "member_error_kinds": {k: sum(k in q.errors for q in members) for k in ERROR_KINDS},
    }


def write(hs: HouseholdSet, out: Path) -> None:
    """``out``/roster.csv (Herald's roster CSV layout) and ``out``/queries.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "roster.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ROSTER_KEYS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(hs.roster)
    with (out / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in hs.queries:
            record = {
                "patient": q.patient,
                "cls": q.cls,
                "errors": list(q.errors),
                "true_member": q.true_member,
                "related_member": q.related_member,
            }
            f.write(json.dumps(record, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2, help="2 (default) to evaluate; 1 is reserved for fitting")
    parser.add_argument("--members", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None, help="write DIR/roster.csv and DIR/queries.jsonl")
    args = parser.parse_args(argv)
    hs = make_household_set(args.seed, args.members, args.queries)
    if args.out is not None:
        write(hs, args.out)
        print(f"wrote {args.out / 'roster.csv'} ({len(hs.roster)} members), {args.out / 'queries.jsonl'}")
    print(json.dumps(summary(hs), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
