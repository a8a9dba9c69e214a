"""Validation of TargetConfig and BackoffPolicy, and the backoff schedule."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

from relayer import BackoffPolicy, ConfigurationError, FailurePolicy, InvalidTarget, TargetConfig

SECRET = "s3cr3t-t0ken-VALUE"
NAN = float("nan")
INF = float("inf")
WEEK = 7 * 24 * 3600


def make(**fields: Any) -> TargetConfig:
    fields.setdefault("target_id", "bridge")
    fields.setdefault("base_url", "https://bridge.example")
    fields.setdefault("token", SECRET)
    return TargetConfig(**fields)


def refused(field: str, **fields: Any) -> InvalidTarget:
    """Construct a TargetConfig that must be refused; return the exception, checked."""
    with pytest.raises(InvalidTarget) as excinfo:
        make(**fields)
    message = str(excinfo.value)
    assert field in message, f"the message does not name {field}: {message!r}"
    assert SECRET not in message
    assert SECRET not in repr(excinfo.value)
    return excinfo.value


# -- target_id --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 256,
        "a\x00b",
        "a\nb",
        "a\rb",
        "a\tb",
        "\x1b[31m",
        "a\x7fb",
        "a\x85b",
        "a\x9b[31m",
        "a\ud800b",
        5,
        None,
        b"bridge",
        ["bridge"],
    ],
    ids=repr,
)
def test_bad_target_ids_are_refused(value: Any) -> None:
    refused("target_id", target_id=value)


@pytest.mark.parametrize("value", ["a", "x" * 255, "bridge.example:1", "café", "with space"])
def test_good_target_ids_are_accepted(value: str) -> None:
    assert make(target_id=value).target_id == value


# -- base_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bridge.example",
        "//bridge.example",
        "ftp://bridge.example",
        "file:///etc/passwd",
        "file://host/etc/passwd",
        "javascript:alert(1)",
        "gopher://bridge.example",
        "http://",
        "https:///path",
        "http://:8080",
        "https://user@bridge.example",
        "https://user:password@bridge.example",
        "https://:password@bridge.example",
        "https://bridge.example/?a=1",
        "https://bridge.example/path?access_token=x",
        "https://bridge.example/#frag",
        "https://bridge.example/?",
        "https://bridge.example/#",
        "https://bridge.example?",
        "https://bridge.example:99999",
        "https://bridge.example:port",
        "http://[::1",
        "https://bridge.example/a b",
        "https://bridge .example",
        "https://bridge.example/\n",
        "https://bridge.example/a\r\nX-Injected: 1",
        "https://bridge.example/\tx",
        "https://bridge.example/\x00",
        "https://bridge.example/\x7f",
        " https://bridge.example",
        b"https://bridge.example",
        None,
        42,
    ],
    ids=repr,
)
def test_bad_base_urls_are_refused(value: Any) -> None:
    refused("base_url", base_url=value)


@pytest.mark.parametrize(
    "value",
    [
        "https://alice:hunter2@bridge.example",
        "https://:hunter2@bridge.example",
        # The URL has another fault too: the password must not be echoed either way.
        "https://alice:hunter2@bridge.example/?x=1",
        "https://alice:hunter2@bridge.example/#top",
        "ftp://alice:hunter2@bridge.example",
        "https://alice:hunter2@",
        "https://alice:hunter2@bridge.example:99999",
        "https://alice:hunter2@bridge.example/a b",
    ],
)
def test_credentials_in_the_url_are_not_echoed(value: str) -> None:
    error = refused("base_url", base_url=value)
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(
    "value",
    [
        "http://bridge.example",
        "https://bridge.example",
        "https://bridge.example/",
        "https://bridge.example:8448/prefix/path",
        "http://127.0.0.1:8080",
        "http://[::1]:8080",
        "HTTPS://Bridge.Example",
    ],
)
def test_good_base_urls_are_accepted(value: str) -> None:
    assert make(base_url=value).base_url == value


# -- token ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        SECRET + " ",
        " " + SECRET,
        SECRET + "\n",
        SECRET + "\r\nX-Injected: yes",
        SECRET + "\t",
        SECRET + "\x00",
        SECRET + "\x7f",
        SECRET + "é",
        SECRET + "\u2028",
        SECRET + "\ud800",
    ],
    ids=repr,
)
def test_bad_tokens_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(InvalidTarget) as excinfo:
        make(token=value)
    message = str(excinfo.value)
    assert "token" in message
    assert SECRET not in message
    assert SECRET not in repr(excinfo.value)
    if value.strip():
        assert value not in message


@pytest.mark.parametrize("value", [None, 42, SECRET.encode(), [SECRET]], ids=repr)
def test_tokens_of_the_wrong_type_are_refused(value: Any) -> None:
    refused("token", token=value)


@pytest.mark.parametrize("value", ["t", "syt_abc-DEF.123~_+/=", "x" * 4096])
def test_good_tokens_are_accepted(value: str) -> None:
    assert make(token=value).token == value


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [0, -1, 100_001, 10**18, True, False, 1.0, 10.5, NAN, INF, "100", None], ids=repr
)
def test_bad_max_events_are_refused(value: Any) -> None:
    refused("max_events", max_events=value)


@pytest.mark.parametrize("value", [1, 100, 100_000])
def test_good_max_events_are_accepted(value: int) -> None:
    assert make(max_events=value).max_events == value


@pytest.mark.parametrize(
    "value",
    [0, -1, 63, 1024**3 + 1, 2**63, True, 1024.0, NAN, INF, "1048576", None],
    ids=repr,
)
def test_bad_max_bytes_are_refused(value: Any) -> None:
    refused("max_bytes", max_bytes=value)


@pytest.mark.parametrize("value", [64, 1024 * 1024, 1024**3])
def test_good_max_bytes_are_accepted(value: int) -> None:
    assert make(max_bytes=value).max_bytes == value


@pytest.mark.parametrize(
    "value", [0, 0.0, -1, -0.5, NAN, INF, -INF, WEEK + 1, 1e300, True, "30", None], ids=repr
)
def test_bad_request_timeouts_are_refused(value: Any) -> None:
    refused("request_timeout", request_timeout=value)


@pytest.mark.parametrize("value", [0.001, 1, 30.0, WEEK])
def test_good_request_timeouts_are_accepted(value: float) -> None:
    assert make(request_timeout=value).request_timeout == value


@pytest.mark.parametrize("value", [None, {"initial": 2}, 2.0, BackoffPolicy], ids=repr)
def test_a_backoff_that_is_not_a_policy_is_refused(value: Any) -> None:
    refused("backoff", backoff=value)


# -- failure policy ---------------------------------------------------------------------------


def test_failure_policy_defaults_to_dead_letter() -> None:
    assert make().failure_policy is FailurePolicy.DEAD_LETTER


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("block", FailurePolicy.BLOCK),
        ("dead_letter", FailurePolicy.DEAD_LETTER),
        (FailurePolicy.BLOCK, FailurePolicy.BLOCK),
        (FailurePolicy.DEAD_LETTER, FailurePolicy.DEAD_LETTER),
    ],
)
def test_failure_policy_accepts_members_and_their_values(
    value: Any, expected: FailurePolicy
) -> None:
    assert make(failure_policy=value).failure_policy is expected


@pytest.mark.parametrize("value", ["", "BLOCK", "drop", "retry", None, 1, True], ids=repr)
def test_bad_failure_policies_are_refused(value: Any) -> None:
    error = refused("failure_policy", failure_policy=value)
    # The message lists the choices.
    assert "'block'" in str(error) and "'dead_letter'" in str(error)


# -- the config as a whole --------------------------------------------------------------------


def test_invalid_target_is_a_configuration_error_and_a_value_error() -> None:
    error = refused("max_events", max_events=0)
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, ValueError)


def test_evolve_validates_too() -> None:
    config = make()
    with pytest.raises(InvalidTarget, match="token"):
        attrs.evolve(config, token="")
    with pytest.raises(InvalidTarget, match="max_bytes"):
        attrs.evolve(config, max_bytes=1)
    assert attrs.evolve(config, max_events=5).max_events == 5


def test_config_is_frozen() -> None:
    config = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.token = "other"  # type: ignore[misc]
    assert config.token == SECRET


def test_defaults() -> None:
    config = make()
    assert config.max_events == 100
    assert config.max_bytes == 1024 * 1024
    assert config.request_timeout == 30.0
    assert config.backoff == BackoffPolicy()


# -- BackoffPolicy validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial", 0),
        ("initial", 0.0),
        ("initial", -1),
        ("initial", NAN),
        ("initial", INF),
        ("initial", WEEK + 1),
        ("initial", True),
        ("initial", "2"),
        ("initial", None),
        ("multiplier", 0),
        ("multiplier", 0.5),
        ("multiplier", 0.999),
        ("multiplier", -2),
        ("multiplier", NAN),
        ("multiplier", INF),
        ("multiplier", 1e300),
        ("multiplier", True),
        ("multiplier", "2"),
        ("maximum", 0),
        ("maximum", -512),
        ("maximum", NAN),
        ("maximum", INF),
        ("maximum", WEEK + 1),
        ("maximum", False),
        ("maximum", "512"),
        ("jitter", -0.1),
        ("jitter", 1),
        ("jitter", 1.0),
        ("jitter", 1.5),
        ("jitter", NAN),
        ("jitter", INF),
        ("jitter", True),
        ("jitter", "0.2"),
        ("jitter", None),
    ],
    ids=repr,
)
def test_bad_backoff_values_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        BackoffPolicy(**{field: value})
    assert type(excinfo.value) is ConfigurationError
    assert field in str(excinfo.value)
    assert "backoff" in str(excinfo.value)


def test_a_maximum_below_initial_is_refused() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        BackoffPolicy(initial=10, maximum=5)
    assert "maximum" in str(excinfo.value) and "initial" in str(excinfo.value)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"initial": 0.001},
        {"initial": WEEK, "maximum": WEEK},
        {"multiplier": 1},
        {"multiplier": 10},
        {"maximum": 2},
        {"jitter": 0},
        {"jitter": 0.99},
        {"initial": 5, "maximum": 5},
    ],
    ids=repr,
)
def test_good_backoff_values_are_accepted(fields: dict[str, float]) -> None:
    policy = BackoffPolicy(**fields)
    for name, value in fields.items():
        assert getattr(policy, name) == value


# -- the backoff schedule ---------------------------------------------------------------------


def test_default_schedule_without_jitter_is_2_4_8_up_to_512() -> None:
    policy = BackoffPolicy()
    delays = [policy.delay(n, lambda: 0.0) for n in range(1, 13)]
    assert delays == [2, 4, 8, 16, 32, 64, 128, 256, 512, 512, 512, 512]
    assert [policy.base_delay(n) for n in range(1, 13)] == delays


def test_no_failures_means_no_delay() -> None:
    policy = BackoffPolicy()
    assert policy.base_delay(0) == 0.0
    assert policy.base_delay(-3) == 0.0


@pytest.mark.parametrize("failures", range(1, 14))
def test_jitter_stays_within_its_bounds(failures: int) -> None:
    policy = BackoffPolicy()
    base = policy.base_delay(failures)
    r_max = math.nextafter(1.0, 0.0)  # the largest value random.random() can return
    low = policy.delay(failures, lambda: r_max)
    high = policy.delay(failures, lambda: 0.0)
    assert high == base
    assert base * (1 - policy.jitter) <= low < base
    assert low == pytest.approx(base * 0.8)
    middle = policy.delay(failures, lambda: 0.5)
    assert middle == pytest.approx(base * 0.9)


@pytest.mark.parametrize("r", [-1.0, -1e-9, 1.0, 1.5, 1e300])
def test_a_jitter_source_out_of_range_is_clamped(r: float) -> None:
    policy = BackoffPolicy()
    delay = policy.delay(3, lambda: r)
    assert 8 * 0.8 <= delay <= 8


@pytest.mark.parametrize("failures", [64, 1_000, 10**6, 2**63, 10**100])
def test_huge_failure_counts_do_not_overflow(failures: int) -> None:
    policy = BackoffPolicy()
    assert policy.base_delay(failures) == 512
    assert policy.delay(failures, lambda: 0.0) == 512
    assert 512 * 0.8 <= policy.delay(failures, lambda: 0.999) <= 512
    steep = BackoffPolicy(initial=1, multiplier=1000, maximum=WEEK, jitter=0)
    assert steep.delay(failures, lambda: 0.0) == WEEK
    flat = BackoffPolicy(initial=3, multiplier=1, maximum=10, jitter=0)
    assert flat.delay(failures, lambda: 0.0) == 3


def test_constant_policy() -> None:
    policy = BackoffPolicy.constant(7)
    assert [policy.delay(n, lambda: 0.9) for n in (1, 2, 50, 10**9)] == [7, 7, 7, 7]
    with pytest.raises(ConfigurationError, match="initial"):
        BackoffPolicy.constant(0)
