"""The documented subject namespace (``transport.subjects``): every helper
builds the documented subject and refuses tokens that would change routing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from transport import InvalidNameError, subject_matches, subjects, validate_subject

UNSAFE = ["*", ">", ".", "a.b", "a b", " ", "", "a*", "x>", "__internal", "a/b", "é"]


def _events_kind(kind: str) -> str:
    return subjects.events("kitchen", kind)


def _outbound_instance(instance: str) -> str:
    return subjects.plugin_outbound("slack", instance)


HELPERS: list[tuple[str, Callable[[str], str], str]] = [
    ("events", subjects.events, "agent.events.{}"),
    ("events-kind", _events_kind, "agent.events.kitchen.{}"),
    ("route", subjects.route, "agent.route.{}"),
    ("plugin_inbound", subjects.plugin_inbound, "plugin.inbound.{}"),
    ("plugin_health", subjects.plugin_health, "plugin.health.{}"),
    ("plugin_outbound", subjects.plugin_outbound, "plugin.outbound.{}"),
    ("plugin_outbound-instance", _outbound_instance, "plugin.outbound.slack.{}"),
]


@pytest.mark.parametrize(("label", "helper", "template"), HELPERS, ids=[h[0] for h in HELPERS])
def test_helper_builds_the_documented_subject(
    label: str, helper: Callable[[str], str], template: str
) -> None:
    subject = helper("chef-01_A")
    assert subject == template.format("chef-01_A")
    assert validate_subject(subject) == subject  # publishable: no wildcards


def test_events_without_a_kind_and_the_wildcards() -> None:
    assert subjects.events("kitchen") == "agent.events.kitchen"
    assert subject_matches(subjects.ALL_EVENTS, subjects.events("kitchen"))
    assert subject_matches(subjects.ALL_EVENTS, subjects.events("kitchen", "opened"))
    assert not subject_matches(subjects.ALL_EVENTS, subjects.route("kitchen"))
    assert subject_matches(subjects.ALL_PLUGIN_HEALTH, subjects.plugin_health("search"))
    assert not subject_matches(subjects.ALL_PLUGIN_HEALTH, subjects.plugin_inbound("search"))
    assert validate_subject(subjects.ALL_EVENTS, pattern=True) == subjects.ALL_EVENTS
    assert validate_subject(subjects.ALL_PLUGIN_HEALTH, pattern=True) == subjects.ALL_PLUGIN_HEALTH


@pytest.mark.parametrize("token", UNSAFE)
@pytest.mark.parametrize(("label", "helper", "template"), HELPERS, ids=[h[0] for h in HELPERS])
def test_helper_refuses_unsafe_tokens(
    label: str, helper: Callable[[str], str], template: str, token: str
) -> None:
    with pytest.raises(InvalidNameError):
        helper(token)


@pytest.mark.parametrize("token", UNSAFE)
def test_events_refuses_an_unsafe_ensemble_with_a_kind(token: str) -> None:
    with pytest.raises(InvalidNameError):
        subjects.events(token, "opened")


@pytest.mark.parametrize("value", [None, 3, b"kitchen"])
def test_helpers_refuse_non_strings(value: object) -> None:
    for label, helper, _ in HELPERS:
        if label in ("events-kind", "plugin_outbound-instance") and value is None:
            continue  # optional last token: the base subject (tested above)
        with pytest.raises(InvalidNameError):
            helper(value)  # type: ignore[arg-type]


def test_plugin_outbound_channels_and_instances() -> None:
    one = subjects.plugin_outbound("slack", "team-a")
    assert one == "plugin.outbound.slack.team-a"
    assert subject_matches("plugin.outbound.slack.>", one)
    assert subject_matches(subjects.ALL_PLUGIN_OUTBOUND, one)
    assert subject_matches(subjects.ALL_PLUGIN_OUTBOUND, subjects.plugin_outbound("email"))
    assert not subject_matches("plugin.outbound.slack.>", subjects.plugin_outbound("email", "x"))
    assert not subject_matches(subjects.ALL_PLUGIN_OUTBOUND, subjects.plugin_inbound("slack"))
    assert validate_subject(subjects.ALL_PLUGIN_OUTBOUND, pattern=True)


@pytest.mark.parametrize("token", UNSAFE)
def test_plugin_outbound_refuses_an_unsafe_channel_with_an_instance(token: str) -> None:
    with pytest.raises(InvalidNameError):
        subjects.plugin_outbound(token, "x")
