"""The matching model: field weights, similarity cut-offs and grade thresholds.

The weights, levels' similarity thresholds and grade thresholds are data in
``mappings/matching.toml`` (with how they were obtained); :func:`load_model`
reads it, computes what it does not give outright and checks the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError
from gateway.matching.people import FIELDS, MAPPINGS_DIR

#: Grades from strongest to weakest (FHIR ``$match`` match-grade, plus none).
GRADES = ("certain", "probable", "possible", "none")
#: The agreement levels each comparison can take (besides ``missing``: a side is empty, weight 0).
LEVELS: dict[str, tuple[str, ...]] = {
    "given": ("exact", "nickname", "compound", "close", "similar", "initial", "swapped", "disagree"),
    "family": ("exact", "compound", "close", "similar", "swapped", "disagree"),
    "middle": ("exact", "initial", "close", "disagree"),
    "birth_date": ("exact", "transposed", "one_digit", "partial", "disagree"),
    "sex": ("exact", "disagree"),
    "street": ("exact", "close", "similar", "disagree"),
    "city": ("exact", "close", "disagree"),
    "state": ("exact", "disagree"),
    "zip": ("exact", "one_digit", "disagree"),
    "phone": ("exact", "one_digit", "disagree"),
    # The finest place both agree on, from the parts' levels (see gateway.matching.scoring.address_level).
    "address": ("house", "street", "zip", "town", "street_elsewhere", "state", "disagree"),
}

#: The household test's fields (:mod:`gateway.matching.household`) and the levels each can take
#: (``missing``: a side is empty, weight 0).
HOUSEHOLD_LEVELS: dict[str, tuple[str, ...]] = {
    "given": ("same", "variant", "disagree"),
    "family": ("same", "variant", "disagree"),
    "middle": ("agree", "disagree"),
    "birth_date": ("exact", "near", "apart", "generation"),
    "sex": ("exact", "disagree"),
    "suffix": ("same", "one_side", "differ"),
}

#: The level each field's cheap "near" test in :func:`~gateway.matching.blocking.prefilter` stands for
#: (here, not in blocking: :attr:`MatchModel.agreement_weights` reads it, and blocking imports the model).
_NEAR_LEVEL = {
    "given": "similar",  # same first three letters
    "family": "similar",
    "middle": "initial",  # same first letter
    "birth_date": "partial",  # two of year, month and day the same
    "street": "similar",  # same house number (first word)
    "city": "close",  # same first three letters
    "zip": "one_digit",  # one digit different
    "phone": "one_digit",
}


@dataclass(frozen=True)
class FieldModel:
    """m and u probabilities of each agreement level of one field, and the weight log2(m/u)."""

    name: str
    m: Mapping[str, float]
    u: Mapping[str, float]
    weights: Mapping[str, float]
    source: str = ""


@dataclass(frozen=True)
class HouseholdModel:
    """The household test (:mod:`gateway.matching.household`): how likely each level is for the member
    and for each kind of relative, and the test's cut-offs.

    ``m[field][level]`` is P(level | the query is the member); ``h[relation][field][level]``
    P(level | the query is that kind of relative: spouse, twin, ...), and ``shares[relation]``
    how many of the relatives sharing a member's home are of that kind. A relation's fields
    are taken as independent given the relation (a Jr's given name and his birth date a
    generation apart go together; across relations they do not). ``prior_bits`` is log2
    of the prior odds that a query sharing a member's home is the member. A pair whose
    posterior is below ``possible_posterior`` is graded ``none``, below ``route_posterior``
    at best ``possible``; :func:`~gateway.matching.household.another_person` caps a pair at
    ``another_person_grade``.
    """

    m: Mapping[str, Mapping[str, float]]
    h: Mapping[str, Mapping[str, Mapping[str, float]]]
    shares: Mapping[str, float]
    prior_bits: float
    route_posterior: float
    possible_posterior: float
    another_person_grade: str = "possible"
    source: str = ""
    #: P(phone level | one person whose address is not the roster's): a move changes both, so the
    #: phone's disagreement after the address's is not the independent evidence its own m assumes.
    moved_phone_m: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def log_m(self) -> dict[str, dict[str, float]]:
        """log2 of :attr:`m` (``missing`` 0: an empty side says nothing)."""
        return {f: {"missing": 0.0, **{lv: math.log2(p) for lv, p in levels.items()}} for f, levels in self.m.items()}

    @functools.cached_property
    def log_h(self) -> dict[str, tuple[float, dict[str, dict[str, float]]]]:
        """Per relation: log2 of its share, and log2 of :attr:`h` (``missing`` 0)."""
        return {
            r: (
                math.log2(self.shares[r]),
                {f: {"missing": 0.0, **{lv: math.log2(p) for lv, p in lv_p.items()}} for f, lv_p in fields.items()},
            )
            for r, fields in self.h.items()
        }


@dataclass(frozen=True)
class MatchModel:
    """Field weights, similarity cut-offs and grade thresholds (match weights, log2 units)."""

    fields: Mapping[str, FieldModel]
    certain: float
    probable: float
    possible: float
    ambiguity_margin: float  # two candidates closer than this are ambiguous
    max_candidates: int
    identifier_conflict_grade: str  # best grade for a member whose MBI differs from the message's
    similarity: Mapping[str, float]
    # Telling a member from a relative sharing the home (mappings/household.toml); None: no such test.
    household: HouseholdModel | None = None
    # Best grade when the evidence of given name, family name and birth date together is below
    # ``identity_floor`` bits: the place (or phone) alone never makes a match probable.
    identity_floor: float = -math.inf
    identity_best_grade: str = "possible"
    # Blocking: members scored per query (the prefilter's best), members the prefilter
    # ranks (the best by shared keys), and the largest bucket of one key still used.
    max_compared: int = 16
    max_bucket: int = 500
    max_prefiltered: int = 128
    roster_size: int = 0  # the roster size the thresholds were computed for
    on_roster_share: float = 0.0  # share of patients on the roster assumed in the thresholds
    source: str = ""
    fingerprint: str = ""  # sha256 of the TOML it came from, for the audit

    def weight(self, field_name: str, level: str) -> float:
        """The weight of ``level`` of ``field_name`` (0 for ``missing``)."""
        return self._table[field_name][level]

    @functools.cached_property
    def _table(self) -> dict[str, dict[str, float]]:
        # Every level's weight in one lookup (``missing`` included): scoring asks once per comparison.
        return {name: {"missing": 0.0, **fm.weights} for name, fm in self.fields.items()}

    @functools.cached_property
    def moved_phone_weights(self) -> dict[str, float] | None:
        """The phone's weights when the address says the patient does not live at the member's
        (``log2(m / u)``: m of the household set's moves, u the phone's own), or None."""
        moved = self.household.moved_phone_m if self.household is not None else {}
        if not moved:
            return None
        u = self.fields["phone"].u
        return {"missing": 0.0, **{lv: math.log2(moved[lv] / u[lv]) for lv in LEVELS["phone"]}}

    @functools.cached_property
    def agreement_weights(self) -> tuple[tuple[float, float, float], ...]:
        """(exact, near, disagree) weights of each field in :data:`FIELDS` order, for :func:`prefilter`.

        ``near`` is the weight of the level the prefilter's cheap test stands for
        (see :data:`_NEAR_LEVEL`), or ``disagree`` for a field with none.
        """
        out = []
        for f in FIELDS:
            weights = self.fields[f].weights
            near = _NEAR_LEVEL.get(f)
            out.append((weights["exact"], weights[near] if near else weights["disagree"], weights["disagree"]))
        return tuple(out)


_BLOCKING_DEFAULTS = {"max_compared": 16, "max_bucket": 500, "max_prefiltered": 128}
_SIMILARITY_DEFAULTS = {
    "name_close": 0.92,
    "name_similar": 0.85,
    "street_close": 90.0,
    "street_similar": 70.0,
    "city_close": 0.90,
}


def load_household(path: Path) -> tuple[HouseholdModel, bytes]:
    """Read the household test's model (``mappings/household.toml``) and the bytes it came from."""
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("matching", f"{path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("matching", f"{path}: {e}") from None

    def where(key: str) -> str:
        return f"{path.name}: {key}"

    def probability(key: str) -> float:
        value = data.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1:
            raise ConfigError("matching", where(f"{key}: expected a probability in (0, 1), got {value!r}"))
        return float(value)

    prior_odds = data.get("prior_odds")
    if not isinstance(prior_odds, int | float) or isinstance(prior_odds, bool) or prior_odds <= 0:
        raise ConfigError("matching", where(f"prior_odds: expected a positive number, got {prior_odds!r}"))
    route, possible = probability("route_posterior"), probability("possible_posterior")
    if possible > route:
        raise ConfigError("matching", where("possible_posterior must not be above route_posterior"))
    capped = data.get("another_person_grade", "possible")
    if capped not in GRADES[2:]:
        raise ConfigError("matching", where("another_person_grade: must be possible or none (never routed)"))
    shares = data.get("relations")
    if not isinstance(shares, dict) or not shares:
        raise ConfigError("matching", where("[relations] (each relation's share of a member's housemates) is missing"))
    for relation, share in shares.items():
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 < share <= 1:
            raise ConfigError("matching", where(f"relations.{relation}: expected a share in (0, 1], got {share!r}"))
    table = data.get("fields") or {}
    unknown = set(table) - set(HOUSEHOLD_LEVELS)
    if unknown:
        raise ConfigError("matching", where(f"fields: unknown field(s) {', '.join(sorted(unknown))}"))
    m: dict[str, dict[str, float]] = {}
    h: dict[str, dict[str, dict[str, float]]] = {r: {} for r in shares}
    for name, levels in HOUSEHOLD_LEVELS.items():
        spec = table.get(name)
        if not isinstance(spec, dict):
            raise ConfigError("matching", where(f"[fields.{name}] is missing"))
        extra = set(spec) - {"member", *shares}
        if extra:
            raise ConfigError("matching", where(f"fields.{name}: unknown row(s) {', '.join(sorted(extra))}"))
        for row in ("member", *shares):
            probs = spec.get(row)
            if not isinstance(probs, dict):
                raise ConfigError("matching", where(f"fields.{name}.{row} is missing"))
            bad = set(probs) ^ set(levels)
            if bad:
                raise ConfigError(
                    "matching", where(f"fields.{name}.{row}: needs exactly the levels {', '.join(levels)}")
                )
            if not all(isinstance(v, int | float) and 0 < v <= 1 for v in probs.values()):
                raise ConfigError("matching", where(f"fields.{name}.{row}: probabilities must be in (0, 1]"))
            values = {lv: float(probs[lv]) for lv in levels}
            if row == "member":
                m[name] = values
            else:
                h[row][name] = values
    moved = data.get("moved_phone")
    if not isinstance(moved, dict) or set(moved) != set(LEVELS["phone"]):
        raise ConfigError("matching", where(f"[moved_phone] needs the phone's levels {', '.join(LEVELS['phone'])}"))
    if not all(isinstance(v, int | float) and 0 < v <= 1 for v in moved.values()):
        raise ConfigError("matching", where("moved_phone: probabilities must be in (0, 1]"))
    model = HouseholdModel(
        moved_phone_m={lv: float(v) for lv, v in moved.items()},
        m=m,
        h=h,
        shares={r: float(v) for r, v in shares.items()},
        prior_bits=math.log2(prior_odds),
        route_posterior=route,
        possible_posterior=possible,
        another_person_grade=capped,
        source=str(data.get("source", "")),
    )
    return model, raw


def load_model(path: Path | None = None, *, household: bool = True, **overrides: float) -> MatchModel:
    """Read the matching model (default ``mappings/matching.toml``, and ``household.toml`` beside it).

    The household test's model is read from ``household.toml`` in the same folder
    as ``path`` when there is one there, else from ``mappings/``; ``household=False``
    leaves it out (the fit of that file compares pairs before it exists).

    Thresholds are match weights (bits). Unless the file gives them outright,
    each is computed from the roster size, the share of patients on the roster
    and the posterior probability the grade stands for:
    ``log2(roster_size / on_roster_share) + log2(p / (1 - p))``.

    ``overrides`` replace thresholds: ``certain=``, ``probable=``, ``possible=``,
    ``ambiguity_margin=``, or ``roster_size=`` (the grades then follow it); and
    blocking's ``max_compared=``, ``max_prefiltered=`` and ``max_bucket=``.
    Raises :class:`ConfigError` naming what is wrong.
    """
    path = path or MAPPINGS_DIR / "matching.toml"
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("matching", f"{path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("matching", f"{path}: {e}") from None
    allowed = {"certain", "probable", "possible", "ambiguity_margin", "roster_size"} | set(_BLOCKING_DEFAULTS)
    unknown = set(overrides) - allowed
    if unknown:
        raise ConfigError("matching", f"unknown override(s): {', '.join(sorted(unknown))}")

    def where(key: str) -> str:
        return f"{path.name}: {key}"

    def number(table: Mapping, key: str, low: float, high: float = math.inf) -> float:
        value = overrides.get(key, table.get(key))
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(
                "matching", where(f"thresholds.{key}: expected a number in [{low}, {high}], got {value!r}")
            )
        return float(value)

    thresholds = data.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ConfigError("matching", where("[thresholds] is missing"))
    values: dict[str, float] = {}
    roster_size = number(thresholds, "roster_size", 1)
    on_roster = number(thresholds, "on_roster_share", 1e-6, 1)
    # Prior odds that one given member is the patient: on_roster / roster_size. A total of
    # w bits multiplies them by 2**w, so posterior odds p/(1-p) need w = log2(size/share) + log2(p/(1-p)).
    prior_bits = math.log2(roster_size / on_roster)
    for grade_name in ("certain", "probable", "possible"):
        if grade_name in overrides or grade_name in thresholds:
            values[grade_name] = number(thresholds, grade_name, -math.inf)
        else:
            p = number(thresholds, f"{grade_name}_posterior", 1e-9, 1 - 1e-12)
            values[grade_name] = round(prior_bits + math.log2(p / (1 - p)), 2)
    values["ambiguity_margin"] = number(thresholds, "ambiguity_margin", 0)
    if not values["certain"] >= values["probable"] >= values["possible"]:
        raise ConfigError("matching", where("thresholds: need certain >= probable >= possible"))
    max_candidates = thresholds.get("max_candidates", 5)
    if not isinstance(max_candidates, int) or max_candidates < 1:
        raise ConfigError("matching", where("thresholds.max_candidates: expected a positive integer"))
    conflict = thresholds.get("identifier_conflict_grade", "possible")
    if conflict not in GRADES:
        raise ConfigError("matching", where(f"thresholds.identifier_conflict_grade: not one of {', '.join(GRADES)}"))

    similarity = dict(_SIMILARITY_DEFAULTS)
    for key, value in (data.get("similarity") or {}).items():
        if key not in similarity or not isinstance(value, int | float):
            raise ConfigError("matching", where(f"similarity.{key}: unknown key or not a number"))
        similarity[key] = float(value)

    blocking = data.get("blocking") or {}
    limits: dict[str, int] = {}
    for key, default in _BLOCKING_DEFAULTS.items():
        value = overrides.get(key, blocking.get(key, default))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError("matching", where(f"blocking.{key}: expected a positive integer, got {value!r}"))
        limits[key] = value
    unknown_blocking = set(blocking) - set(limits)
    if unknown_blocking:
        raise ConfigError("matching", where(f"blocking: unknown key(s) {', '.join(sorted(unknown_blocking))}"))

    if "household" in data:
        raise ConfigError("matching", where("[household] moved to household.toml (bench/fit_household.py writes it)"))
    household_model, household_raw = None, b""
    if household:
        household_path = path.with_name("household.toml")
        if not household_path.exists():
            household_path = MAPPINGS_DIR / "household.toml"
        household_model, household_raw = load_household(household_path)
    identity = data.get("identity") or {}
    unknown_identity = set(identity) - {"floor", "best_grade"}
    if unknown_identity:
        raise ConfigError("matching", where(f"identity: unknown key(s) {', '.join(sorted(unknown_identity))}"))
    identity_floor = identity.get("floor", -math.inf)
    if not isinstance(identity_floor, int | float) or isinstance(identity_floor, bool):
        raise ConfigError("matching", where(f"identity.floor: expected a number (bits), got {identity_floor!r}"))
    identity_best = identity.get("best_grade", "possible")
    if identity_best not in GRADES:
        raise ConfigError("matching", where(f"identity.best_grade: not one of {', '.join(GRADES)}"))

    fields: dict[str, FieldModel] = {}
    table = data.get("fields") or {}
    for name in LEVELS:  # the fields, and the address their parts make together
        spec = table.get(name)
        if not isinstance(spec, dict) or not isinstance(spec.get("levels"), dict):
            raise ConfigError("matching", where(f"[fields.{name}.levels] is missing"))
        m: dict[str, float] = {}
        u: dict[str, float] = {}
        weights: dict[str, float] = {}
        for level in LEVELS[name]:
            entry = spec["levels"].get(level)
            if not isinstance(entry, dict):
                raise ConfigError("matching", where(f"fields.{name}.levels.{level} is missing"))
            if "weight" in entry:  # a level whose evidence another field carries (given's "swapped")
                weights[level] = float(entry["weight"])
                m[level] = u[level] = float("nan")
                continue
            mv, uv = entry.get("m"), entry.get("u")
            if not all(isinstance(v, int | float) and 0 < v <= 1 for v in (mv, uv)):
                raise ConfigError("matching", where(f"fields.{name}.levels.{level}: m and u must be in (0, 1]"))
            m[level], u[level] = float(mv), float(uv)
            weights[level] = math.log2(mv / uv)
        extra = set(spec["levels"]) - set(LEVELS[name])
        if extra:
            raise ConfigError("matching", where(f"fields.{name}.levels: unknown level(s) {', '.join(sorted(extra))}"))
        fields[name] = FieldModel(name, m, u, weights, str(spec.get("source", "")))
    return MatchModel(
        fields=fields,
        certain=values["certain"],
        probable=values["probable"],
        possible=values["possible"],
        ambiguity_margin=values["ambiguity_margin"],
        max_candidates=max_candidates,
        identifier_conflict_grade=conflict,
        similarity=similarity,
        household=household_model,
        identity_floor=float(identity_floor),
        identity_best_grade=identity_best,
        max_compared=limits["max_compared"],
        max_bucket=limits["max_bucket"],
        max_prefiltered=limits["max_prefiltered"],
        roster_size=int(roster_size),
        on_roster_share=on_roster,
        source=str(data.get("source", "")),
        fingerprint=hashlib.sha256(raw + household_raw).hexdigest()[:16],
    )
