"""Realistic, reproducible sample traffic: the calls Customer.io's client libraries send.

Used by ``cio-sync demo``, the benchmarks and the tests. The mix has what real traffic has and what breaks naive
writers: unicode, nested objects and arrays, optional fields left out, a trait whose type changes between calls, and
timestamps in several offsets.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

_FIRST: Final = ("Ana", "Bjørn", "Chloé", "Dmitri", "Eun-ji", "Fatima", "Gustavo", "Hana", "Ío", "Jürgen", "Kwame",
                 "Léa", "Mateus", "Nadia", "Oğuz", "Priya", "Quentin", "Rūta", "Søren", "Tomás", "李", "さくら")
_LAST: Final = ("Silva", "Øvergaard", "Dubois", "Ivanov", "Kim", "Haddad", "Pereira", "Sato", "García", "Müller",
                "Mensah", "Nguyen", "Çelik", "Rao", "O'Brien", "王", "山田")
_PLANS: Final = ("free", "starter", "pro", "enterprise")
_EVENTS: Final = ("Order Completed", "Product Viewed", "Cart Updated", "Signed Up", "Email Link Clicked",
                  "Subscription Renewed", "Checkout Started", "Coupon Applied")
_PAGES: Final = (("Home", "Marketing"), ("Pricing", "Marketing"), ("Docs", "Product"), ("Checkout", "Store"),
                 ("Blog: Überraschung", "Content"))
_SCREENS: Final = (("Feed", "App"), ("Settings", "App"), ("Cart", "Store"), ("Profile", "Account"))
_LIBRARIES: Final = (("analytics-python", "2.2.2"), ("analytics-node", "2.1.0"), ("analytics.js", "3.7.0"),
                     ("customerio-ios", "3.1.0"), ("customerio-android", "4.0.0"))
_OFFSETS: Final = (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5)),
                   timezone(timedelta(hours=5, minutes=30)))
_WEIGHTS: Final = (("track", 50), ("identify", 15), ("page", 15), ("screen", 8), ("group", 7), ("alias", 5))


def _iso(moment: datetime, rng: random.Random) -> str:
    local = moment.astimezone(rng.choice(_OFFSETS))
    text = local.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if rng.random() < 0.7 else text


def sample_calls(count: int, *, seed: int = 0, people: int = 1000,
                 start: datetime | None = None) -> Iterator[dict[str, Any]]:
    """``count`` calls of all six types for ``people`` people, the same ones for the same ``seed``."""
    rng = random.Random(seed)
    types = [t for t, _ in _WEIGHTS]
    weights = [w for _, w in _WEIGHTS]
    moment = start or datetime(2026, 11, 1, tzinfo=UTC)
    for _ in range(count):
        moment += timedelta(milliseconds=rng.randint(1, 2000))
        person = rng.randrange(people)
        user_id = f"user-{person}"
        call_type = rng.choices(types, weights)[0]
        library, version = rng.choice(_LIBRARIES)
        call: dict[str, Any] = {"type": call_type}
        if rng.random() < 0.9:
            call["messageId"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if call_type == "alias":
            call["userId"] = user_id
            call["previousId"] = f"anon-{person}"
        elif rng.random() < 0.8:
            call["userId"] = user_id
        else:
            call["anonymousId"] = f"anon-{person}"
        call["timestamp"] = _iso(moment, rng)
        if rng.random() < 0.5:
            call["sentAt"] = _iso(moment + timedelta(milliseconds=rng.randint(0, 900)), rng)
        call["context"] = {
            "library": {"name": library, "version": version},
            "ip": f"203.0.113.{rng.randrange(1, 255)}",
            "locale": rng.choice(("en-US", "de-DE", "pt-BR", "ja-JP")),
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
        }
        if rng.random() < 0.3:
            call["integrations"] = {"All": True, "Salesforce": False}
        if call_type == "identify":
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            traits: dict[str, Any] = {
                "email": f"person{person}@example.com",
                "name": f"{first} {last}",
                "plan": rng.choice(_PLANS),
                "logins": rng.randint(0, 500),
                # Type drift: the same trait is sometimes a number, sometimes a string.
                "age": rng.randint(18, 90) if rng.random() < 0.8 else str(rng.randint(18, 90)),
                "address": {"city": rng.choice(("Lisboa", "München", "東京", "São Paulo")), "zip": "1000-001"},
                "tags": rng.sample(["vip", "beta", "newsletter", "churn-risk"], k=rng.randint(0, 3)),
            }
            if rng.random() < 0.1:
                traits["plan"] = None
            call["traits"] = traits
        elif call_type == "track":
            call["event"] = rng.choice(_EVENTS)
            call["properties"] = {
                "revenue": round(rng.uniform(1, 500), 2),
                "currency": "EUR",
                "items": [{"sku": f"SKU-{rng.randrange(1000)}", "qty": rng.randint(1, 4)}
                          for _ in range(rng.randint(0, 3))],
                "coupon": rng.choice((None, "WELCOME10", "ÉTÉ25")),
            }
        elif call_type in ("page", "screen"):
            name, category = rng.choice(_PAGES if call_type == "page" else _SCREENS)
            call["name"] = name
            call["category"] = category
            call["properties"] = {"path": "/" + name.lower().replace(" ", "-"), "referrer": "https://example.com/"}
        elif call_type == "group":
            call["groupId"] = f"account-{person % 97}"
            call["traits"] = {"name": f"Account {person % 97}", "employees": rng.randint(1, 5000),
                              "industry": rng.choice(("Retail", "SaaS", "Média"))}
        yield call


def sample_records(people: list[str], *, seed: int = 0,
                   start: datetime | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Campaign, journey and message records for ``people`` (external ids): two campaigns with their email actions,
    a newsletter, a journey per person, the emails sent, their content, and what happened to them (delivered,
    opened, clicked, sometimes bounced or unsubscribed). Yields ``(table, row)`` for ``StandardSink.record``."""
    rng = random.Random(seed)
    moment = start or datetime(2026, 11, 1, tzinfo=UTC)
    campaigns = [(1, "Onboarding", "segment"), (2, "Win-back", "event")]
    for campaign_id, name, _ in campaigns:
        yield "campaigns", {"campaign_id": campaign_id, "name": name, "topic_names": ["product"]}
        yield "actions", {"action_id": campaign_id * 10, "campaign_id": campaign_id, "action_type": "email",
                          "name": f"{name} email"}
        yield "actions", {"action_id": campaign_id * 10 + 1, "campaign_id": campaign_id, "action_type": "delay",
                          "name": "Wait a day"}
    yield "broadcasts", {"broadcast_id": 7, "name": "November newsletter", "topic_names": ["newsletter"]}
    yield "campaigns", {"campaign_id": 2, "name": "Win-back", "topic_names": ["product", "offers"]}  # version 2
    for n, person in enumerate(people):
        campaign_id, name, trigger = campaigns[n % 2]
        moment += timedelta(seconds=rng.randint(1, 120))
        subject = f"subject-{campaign_id}-{person}"
        delivery = f"delivery-{campaign_id}-{person}"
        yield "subjects", {"subject_name": subject, "customer_id": person, "campaign_id": campaign_id,
                           "campaign_type": trigger, "started_campaign_at": moment}
        yield "outputs", {"output_id": f"output-{delivery}", "subject_name": subject, "output_type": "email",
                          "action_id": campaign_id * 10, "delivery_id": delivery, "draft": False,
                          "link_tracked": True}
        yield "deliveries", {"delivery_id": delivery, "customer_id": person, "subject_id": subject,
                             "delivery_type": "email", "campaign_id": campaign_id, "action_id": campaign_id * 10}
        yield "delivery_contents", {"delivery_id": delivery, "type": "email", "campaign_id": campaign_id,
                                    "action_id": campaign_id * 10, "from": "team@example.com",
                                    "recipient": f"{person}@example.com", "subject": f"{name}: hello",
                                    "body_plain": "Hi!", "headers": {"X-Campaign": str(campaign_id)}}
        events = ["sent", "delivered"]
        roll = rng.random()
        if roll < 0.05:
            events = ["sent", "bounced"]
        elif roll < 0.6:
            events += ["opened"] + (["clicked"] if rng.random() < 0.4 else [])
            if rng.random() < 0.05:
                events.append("unsubscribed")
        for k, metric in enumerate(events):
            row: dict[str, Any] = {"event_id": f"event-{delivery}-{k}", "delivery_id": delivery, "metric": metric}
            if metric == "clicked":
                row |= {"link_id": 1, "link_url": "https://example.com/start"}
            if metric == "bounced":
                row["reason"] = "mailbox unavailable"
            yield "metrics", row
