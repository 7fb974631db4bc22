"""The SNF report through the product: a synthetic March of ADT from two SNFs' own feeds and a hospital,
over MLLP, through the pipeline and the transitions service, reported by `herald snf report`.

The month, and every figure worked out by hand (MAPLE and OAK send ADT; PINE sends none):

- M-1: LSR stay H1 1-3 March, discharged to a SNF (03) named MAPLE; MAPLE S1 3-13 March, home (01):
  10 days. Back in LSR (H2) 20-22 March: re-hospitalised 17 days after the SNF admission. H2 ends with a
  discharge to PINE (03): PINE's only stay, inferred from the discharge, open.
- M-3: a MAPLE stay in February (S0, 20-25 Feb: outside the period). MAPLE S2 5-11 March, sent to
  hospital (02): 6 days; LSR H3 11-15 March (re-hospitalised 6 days after admission), discharged to
  OAK (03); OAK S4 15-22 March, home with home health (06): 7 days.
- M-4: MAPLE S3 from 10 March, still there.
- M-2 opted out: a MAPLE stay from 8 March that the ACO's figures must not count.

MAPLE: 3 stays (S1, S2, S3), 1 open; closed lengths 10 and 6, median 8.0; re-hospitalised within 30
days 2 of 3 (S1, S2) = 0.667; home 1 (S1) of 2 closed = 0.500. OAK: 1 stay, 7 days, home 1 of 1.
PINE: 1 stay, open. With --min-stays 2 only MAPLE is ranked; OAK and PINE are listed apart.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime

from click.testing import CliRunner
from transitions_harness import TransitionsTestCase, adt
from twisted.internet import defer

from gateway.app.cli import main


def d(month: int, day: int, hour: int = 12) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=UTC)


def stay(member, visit, facility, start, end=None, disposition="", destination="", klass="I"):
    """The A01 (and A03) of one stay."""
    out = [adt("A01", member, visit, start, facility=facility, klass=klass, admitted=start)]
    if end is not None:
        out.append(
            adt(
                "A03",
                member,
                visit,
                end,
                facility=facility,
                klass=klass,
                admitted=start,
                discharged=end,
                disposition=disposition,
                destination=destination,
            )
        )
    return out


MONTH = [
    *stay("M-3", "S0", "MAPLE", d(2, 20), d(2, 25), "01"),
    *stay("M-1", "H1", "LSR", d(3, 1), d(3, 3, 10), "03", "MAPLE"),
    *stay("M-1", "S1", "MAPLE", d(3, 3, 14), d(3, 13, 14), "01"),
    *stay("M-3", "S2", "MAPLE", d(3, 5, 10), d(3, 11, 10), "02"),
    *stay("M-2", "S9", "MAPLE", d(3, 8)),
    *stay("M-4", "S3", "MAPLE", d(3, 10)),
    *stay("M-3", "H3", "LSR", d(3, 11, 13), d(3, 15, 10), "03", "OAK"),
    *stay("M-3", "S4", "OAK", d(3, 15, 12), d(3, 22, 12), "06"),
    *stay("M-1", "H2", "LSR", d(3, 20), d(3, 22), "03", "PINE"),
]


class SnfReportTests(TransitionsTestCase):
    extra_config = 'snf_facilities = ["MAPLE", "OAK"]'

    @defer.inlineCallbacks
    def test_the_months_report_per_snf(self):
        """herald snf report over March: MAPLE ranked with the figures above, OAK and PINE apart; the CSV too."""
        yield self.send(*MONTH)
        yield self.transition(d(4, 1))
        out = self.data / "snf.csv"
        result = CliRunner().invoke(
            main,
            ["snf", "report", "--from", "2026-03-01", "--to", "2026-03-31", "--min-stays", "2", "--csv", str(out)]
            + ["--data", str(self.data)],
        )
        self.assertEqual(result.exit_code, 0, result.output)
        lines = result.output.splitlines()
        self.assertEqual(lines[0], "SNF stays begun 2026-03-01 to 2026-03-31")
        self.assertEqual(lines[2].split(), ["1", "MAPLE", "3", "1", "8.0", "2", "(67%)", "1", "of", "2", "(50%)"])
        self.assertEqual(lines[3], "fewer than 2 stays, not ranked:")
        self.assertEqual([line.split()[1] for line in lines[4:6]], ["OAK", "PINE"])
        rows = list(csv.reader(out.open()))
        self.assertEqual(rows[1], ["1", "MAPLE", "3", "1", "8.0", "2", "0.667", "1", "0.500"])
        self.assertEqual(rows[2], ["too few stays", "OAK", "1", "0", "7.0", "0", "0.000", "1", "1.000"])
        self.assertEqual(rows[3], ["too few stays", "PINE", "1", "1", "", "0", "0.000", "0", "0.000"])
        # Each SNF admission of a member is recorded (S0-S4; not M-2's), and each hospital discharge to a SNF
        # (H1, H3, H2) made the SNF coordination task.
        self.assertEqual(self.kinds().count("snf-admission"), 5)
        coordination = [t for t in self.tasks(None) if t["code"] == "snf-coordination"]
        self.assertEqual(
            sorted(t["resource"]["encounter"]["identifier"]["value"] for t in coordination), ["H1", "H2", "H3"]
        )

    @defer.inlineCallbacks
    def test_february_alone_has_one_maple_stay_listed_apart(self):
        """The period decides: February holds only M-3's S0 (5 days, home), re-hospitalised (H3, 19 days after)."""
        yield self.send(*MONTH)
        yield self.transition(d(4, 1))
        result = CliRunner().invoke(
            main, ["snf", "report", "--from", "2026-02-01", "--to", "2026-02-28", "--data", str(self.data)]
        )
        self.assertEqual(result.exit_code, 0, result.output)
        lines = result.output.splitlines()
        self.assertIn("(no SNF has 5 or more stays in the period)", lines)
        self.assertEqual(lines[-2].split()[:6], ["-", "MAPLE", "1", "0", "5.0", "1"])
