"""Senders: per sender (MSH-3, MSH-4) its messages, refusals, error rate and last message; volume per hour.

No patient data: counts and header fields. The chart is SVG drawn here, on
the server, so the page needs no charting library.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.app.console.exchange import PageError, Visit
from gateway.app.console.html import choice, esc, href, page, section, table
from gateway.store.console import messages_per_hour, sender_stats

__all__ = ["hourly_chart", "senders_page"]

WINDOWS = {"1d": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}
CHART_HOURS = 48


def hourly_chart(hours: list[tuple[str, int, int]], end: datetime, span: int = CHART_HOURS) -> str:
    """An SVG bar chart of messages per hour over the ``span`` hours before ``end``; refusals stacked in red."""
    by_hour = {h: (n, bad) for h, n, bad in hours}
    first = (end - timedelta(hours=span - 1)).replace(minute=0, second=0, microsecond=0)
    slots = [first + timedelta(hours=i) for i in range(span)]
    values = [by_hour.get(s.strftime("%Y-%m-%dT%H"), (0, 0)) for s in slots]
    top = max([n for n, _ in values] + [1])
    width, height, left, bottom = 960, 220, 48, 28
    bar = (width - left - 8) / span
    plot = height - bottom - 10
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="Messages per hour, last {span} hours">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 4}" y2="{height - bottom}" stroke="#888"/>',
        f'<text x="{left - 6}" y="16" text-anchor="end" font-size="11" fill="#555">{top}</text>',
        f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end" font-size="11" fill="#555">0</text>',
    ]
    for i, (slot, (n, bad)) in enumerate(zip(slots, values, strict=True)):
        x = left + i * bar
        h_all = plot * n / top
        h_bad = plot * bad / top
        label = f"{slot.strftime('%Y-%m-%d %H:00')} UTC: {n} messages, {bad} refused or failed"
        parts.append(
            f"<g><title>{esc(label)}</title>"
            f'<rect x="{x + 1:.1f}" y="{height - bottom - h_all:.1f}" width="{bar - 2:.1f}" height="{h_all:.1f}" '
            'fill="#4a7fb5"/>'
            f'<rect x="{x + 1:.1f}" y="{height - bottom - h_bad:.1f}" width="{bar - 2:.1f}" height="{h_bad:.1f}" '
            'fill="#c0392b"/></g>'
        )
        if slot.hour % 6 == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - 10}" text-anchor="middle" font-size="11" fill="#555">'
                f"{slot.strftime('%d %H:00')}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def senders_page(visit: Visit):
    """``GET /senders?window=7d``: the table per sender over the window, and the last 48 hours by the hour."""
    window = visit.request.arg("window", "7d")
    if window not in WINDOWS:
        raise PageError(400, f"window: {window!r} is not one of {', '.join(WINDOWS)}")
    now = datetime.fromtimestamp(visit.now(), UTC)
    since = (now - WINDOWS[window]).isoformat(timespec="milliseconds")
    rows = []
    for s in sender_stats(visit.conn, since):
        sender = f"{s['sending_application']}|{s['sending_facility']}"
        bad = (s["rejected"] or 0) + (s["failed"] or 0)
        rate = bad / s["messages"] if s["messages"] else 0.0
        rows.append(
            [
                f'<a href="{href("/messages", sender=sender)}">{esc(sender)}</a>',
                f'<span class="num">{s["messages"]:,}</span>',
                f'<span class="num">{s["rejected"] or 0:,}</span>',
                f'<span class="num">{s["failed"] or 0:,}</span>',
                f'<span class="num{" bad" if rate >= 0.05 else ""}">{rate:.1%}</span>',
                f'<a href="/messages/{s["last_id"]}">{esc(s["last_at"][:19].replace("T", " "))}</a>',
            ]
        )
    windows = " ".join(choice(href("/senders", window=w), w, w == window) for w in WINDOWS)
    chart_since = (now - timedelta(hours=CHART_HOURS)).isoformat(timespec="milliseconds")
    body = (
        f'<p class="filters">Window: {windows}</p>'
        + table(
            ["Sender (MSH-3|MSH-4)", "Messages", "Refused", "Failed", "Error rate", "Last message (UTC)"],
            rows,
            f"no messages in the last {window}",
        )
        + section(
            f"Messages per hour, last {CHART_HOURS} hours (UTC; refused or failed in red)",
            hourly_chart(messages_per_hour(visit.conn, chart_since), now),
            "volume",
        )
    )
    return page("Senders", body, visit, "/senders")
