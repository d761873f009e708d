"""The spec's scaling parts (EAS `autoscaler`, `cronscaler`) and service group files."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from bootstrap import cron
from bootstrap.group import DEFAULT_WEIGHT, load_group_file, parse_group
from bootstrap.spec import REDACTED, SpecError, parse_spec
from tests.test_spec import errors_of, with_changes

EAS_AUTOSCALER = {
    "min": 1, "max": 4,
    "scaleStrategies": [{"metricName": "concurrency", "threshold": 12}],
    "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0},
                 "scaleDown": {"stabilizationWindowSeconds": 300},
                 "onZero": {"scaleDownGracePeriodSeconds": 600, "scaleUpActivationReplicas": 1}},
}


def test_eas_autoscaler_is_read_as_eas_writes_it():
    spec = parse_spec(with_changes(autoscaler=EAS_AUTOSCALER)).spec
    scaler = spec.autoscaler
    assert (scaler.min, scaler.max) == (1, 4)
    assert [(s.metric_name, s.threshold) for s in scaler.scale_strategies] == [("concurrency", 12)]
    assert scaler.behavior.scale_down.stabilization_window_seconds == 300
    assert scaler.behavior.on_zero.scale_down_grace_period_seconds == 600
    # the normalized form reparses to the same model, in EAS's names
    again = parse_spec(json.loads(spec.to_json())).spec
    assert again.autoscaler == scaler
    assert "scaleStrategies" in spec.to_json_dict()["autoscaler"]


def test_older_strategies_form_and_synonyms_become_the_same_strategies():
    scaler = parse_spec(with_changes(autoscaler={"min": 0, "max": 3, "strategies": {"qps": 10, "cpu": 80}})).spec.autoscaler
    assert sorted((s.metric_name, s.threshold) for s in scaler.scale_strategies) == [("cpu", 80), ("qps", 10)]
    assert "strategies" not in parse_spec(with_changes(autoscaler={"max": 2, "strategies": {"qps": 1}})).spec.to_json_dict()["autoscaler"]
    seed_name = parse_spec(with_changes(autoscaler={"max": 2, "scaleStrategies": [{"metricName": "concurrent_requests", "threshold": 4}]}))
    assert seed_name.spec.autoscaler.scale_strategies[0].metric_name == "concurrency"
    custom = parse_spec(with_changes(autoscaler={"max": 2, "scaleStrategies": [
        {"metricName": "custom[queue_depth]", "threshold": 5}, {"metricName": "gpu[util]", "threshold": 70}]})).spec.autoscaler
    assert custom.scale_strategies[0].custom_gauge == "queue_depth"
    assert custom.scale_strategies[1].custom_gauge is None
    # defaults as EAS: up at once, down after 300 s, zero after 600 s
    behavior = custom.behavior
    assert (behavior.scale_up.stabilization_window_seconds, behavior.scale_down.stabilization_window_seconds) == (0, 300)


@pytest.mark.parametrize(
    "autoscaler, expected",
    [
        ({"min": 1}, "autoscaler.max: required field is missing"),
        ({"min": 5, "max": 2, "strategies": {"qps": 1}}, "autoscaler: min (5) is above max (2)"),
        ({"max": 2}, "autoscaler: give at least one strategy"),
        ({"max": 2, "scaleStrategies": [{"metricName": "concurency", "threshold": 1}]},
         "autoscaler.scaleStrategies[0].metricName: unknown metric 'concurency'; did you mean 'concurrency'?"),
        ({"max": 2, "scaleStrategies": [{"metricName": "qps", "threshold": 0}]}, "autoscaler.scaleStrategies[0].threshold"),
        ({"max": 2, "scaleStrategies": [{"metricName": "qps", "threshold": 1}, {"metricName": "qps", "threshold": 2}]},
         "autoscaler: each metric may appear once"),
        ({"max": 2, "strategies": {"qps": 1}, "behavior": {"scaleDown": {"stabilizationWindowSeconds": -1}}},
         "autoscaler.behavior.scaleDown.stabilizationWindowSeconds"),
        ({"max": 2, "strategies": {"qps": 1}, "behaviour": {}}, "autoscaler.behaviour: unknown field; did you mean 'behavior'?"),
    ],
)
def test_autoscaler_errors_name_the_json_path(autoscaler, expected):
    errors = errors_of(with_changes(autoscaler=autoscaler))
    assert any(error.startswith(expected) for error in errors), errors


def test_cronscaler_in_cronhpa_shape():
    raw = with_changes(cronscaler={
        "ScaleJobs": [{"Name": "business-hours", "Schedule": "0 9 * * 1-5", "TargetSize": 3, "TimeZone": "Asia/Shanghai"},
                      {"Name": "night", "Schedule": "0 0 20 * * *", "TargetSize": 1}],
        "ExcludeDates": ["0 0 1 1 *"],
    })
    jobs = parse_spec(raw).spec.cronscaler.scale_jobs
    assert [(j.name, j.target_size, j.time_zone) for j in jobs] == [("business-hours", 3, "Asia/Shanghai"), ("night", 1, None)]


@pytest.mark.parametrize(
    "job, expected",
    [
        ({"Name": "a", "Schedule": "0 9 * *", "TargetSize": 1}, "cronscaler.ScaleJobs[0].Schedule: '0 9 * *' has 4 fields"),
        ({"Name": "a", "Schedule": "0 25 * * *", "TargetSize": 1}, "cronscaler.ScaleJobs[0].Schedule: '0 25 * * *' is not a valid cron schedule"),
        ({"Name": "a", "Schedule": "0 9 * * *", "TargetSize": 1, "TimeZone": "Mars/Olympus"},
         "cronscaler.ScaleJobs[0].TimeZone: 'Mars/Olympus' is not a known time zone"),
        ({"Name": "a", "Schedule": "0 9 * * *", "TargetSize": -1}, "cronscaler.ScaleJobs[0].TargetSize"),
    ],
)
def test_cronscaler_errors_name_the_json_path(job, expected):
    errors = errors_of(with_changes(cronscaler={"ScaleJobs": [job]}))
    assert any(error.startswith(expected) for error in errors), errors


def test_cron_schedules_fire_in_their_zone_with_or_without_seconds():
    monday_0030_utc = datetime(2026, 12, 7, 0, 30, tzinfo=timezone.utc)  # 08:30 in Shanghai
    fire = cron.next_fire("0 9 * * 1-5", monday_0030_utc, "Asia/Shanghai")
    assert fire.astimezone(timezone.utc) == datetime(2026, 12, 7, 1, 0, tzinfo=timezone.utc)
    assert cron.next_fire("30 0 9 * * *", monday_0030_utc).astimezone(timezone.utc) == datetime(2026, 12, 7, 9, 0, 30, tzinfo=timezone.utc)
    assert cron.last_fire("0 9 * * 1-5", monday_0030_utc, "Asia/Shanghai").astimezone(timezone.utc) == datetime(2026, 12, 4, 1, 0, tzinfo=timezone.utc)
    assert cron.matches("0 0 1 1 *", datetime(2027, 1, 1, 0, 0, tzinfo=timezone.utc))
    assert cron.five_fields("30 0 9 * * *") == "0 9 * * *"


def test_metadata_group_names_a_group():
    assert parse_spec(with_changes(**{"metadata.group": "qwen-chat"})).spec.metadata.group == "qwen-chat"
    assert errors_of(with_changes(**{"metadata.group": "Qwen Chat"}))[0].startswith("metadata.group: 'Qwen Chat' is not a valid group name")


GROUP = {"name": "qwen-chat", "token": "group-secret", "routes": [
    {"service": "qwen-v23", "weight": 90},
    {"service": "qwen-v24", "weight": 10, "mirror_weight": 5},
    {"service": "qwen-v24", "match": {"headers": {"User-Agent": "~^CherryStudio"}}},
]}


def test_group_file_is_read_and_its_token_never_shown(tmp_path):
    path = tmp_path / "qwen-chat.group.json"
    path.write_text(json.dumps(GROUP))
    group, warnings = load_group_file(path)
    assert warnings == []
    assert [route.share for route in group.routes] == [90, 10, 0]
    assert group.routes[1].mirror_weight == 5
    assert group.routes[2].match.matches({"User-Agent": "CherryStudio/1.2"})
    assert not group.routes[2].match.matches({"User-Agent": "curl/8"})
    assert not group.routes[2].match.matches({})
    assert group.to_json_dict()["token"] == REDACTED
    assert group.to_json_dict(reveal_secrets=True)["token"] == "group-secret"
    assert parse_group({"name": "g", "routes": [{"service": "a"}]})[0].routes[0].share == DEFAULT_WEIGHT


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"routes": [{"service": "a", "weight": 1001}]}, "routes[0].weight"),
        ({"routes": [{"service": "a", "weight": 10, "mirror_weight": 101}]}, "routes[0].mirror_weight"),
        ({"routes": [{"service": "a", "weight": 0}]}, "every route has weight 0"),
        ({"routes": []}, "routes:"),
        ({"routes": [{"service": "a", "match": {"headers": {"User-Agent": "~(unclosed"}}}]}, "routes[0].match.headers: User-Agent:"),
        ({"routes": [{"service": "a", "weight": 5, "match": {"headers": {"X-A": "b"}}}]}, "routes[0]: a route with match takes every request"),
        ({"routes": [{"service": "a", "wieght": 5}]}, "routes[0].wieght: unknown field; did you mean 'weight'?"),
        ({"name": "Bad Name"}, "name: 'Bad Name' is not a valid group name"),
    ],
)
def test_group_file_errors_name_the_field(change, expected):
    raw = {**GROUP, **change}
    with pytest.raises(SpecError) as caught:
        parse_group(raw, source="g.json")
    messages = [str(issue) for issue in caught.value.issues]
    assert any(message.startswith(expected) for message in messages), messages
    assert "group-secret" not in str(caught.value)
