"""The event encoder built once encodes exactly as json.JSONEncoder does, errors included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relayer import InvalidEvent, _encoding

VALUES: list[Any] = [
    {"type": "m.room.message", "content": {"body": "hello", "msgtype": "m.text"}},
    {"n": [0, -1, 2**70, 1.5, -0.0, 1e300, 5e-324], "b": [True, False, None]},
    {"s": 'é ü \u2028 \u2029 \x00 \x1f "quoted" back\\slash\nnew line\ttab 😀'},
    {7: "int key", 2.5: "float key", False: "bool key", None: "none key"},
    {"deep": [[[[{"a": [{}]}]]]], "empty": {}, "list": []},
    "a string",
    12345,
    [1, "two", {"three": 3}],
]

BAD: list[Any] = [
    {"x": object()},
    {"nan": float("nan")},
    {"inf": [float("inf")]},
    {(1, 2): "tuple key"},
    {"bytes": b"x"},
    {1, 2},
]


def test_the_encoder_is_built_once() -> None:
    # On CPython, the C encoder is built once rather than for every event.
    assert _encoding._encode is not _encoding._encoder.encode


@pytest.mark.parametrize("value", VALUES)
def test_values_encode_as_json_encoder_does(value: Any) -> None:
    assert _encoding._encode(value) == _encoding._encoder.encode(value)
    if _carried(value):
        assert json.loads(_encoding.encode_event(value, 1 << 20)) == json.loads(
            _encoding._encoder.encode(value)
        )
    else:
        # The encoder writes it, but it is not an event the wire carries.
        with pytest.raises(InvalidEvent):
            _encoding.encode_event(value, 1 << 20)


def _carried(value: Any, top: bool = True) -> bool:
    """A JSON object whose keys are strings and whose ints are within +-(2**53 - 1)."""
    if top and not isinstance(value, dict):
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _carried(v, False) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_carried(v, False) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= 2**53 - 1
    return True


@pytest.mark.parametrize("value", BAD)
def test_values_fail_as_json_encoder_fails(value: Any) -> None:
    with pytest.raises(Exception) as expected:
        _encoding._encoder.encode(value)
    with pytest.raises(type(expected.value)) as got:
        _encoding._encode(value)
    assert str(got.value) == str(expected.value)


def test_an_encoder_that_cannot_be_reused_is_used_as_it_is() -> None:
    checking = json.JSONEncoder(check_circular=True)
    assert _encoding._reused_encoder(checking) == checking.encode
    indented = json.JSONEncoder(check_circular=False, indent=2)
    assert _encoding._reused_encoder(indented) == indented.encode


@pytest.mark.parametrize("flipped", [-1, -2], ids=["allow_nan", "skipkeys"])
def test_a_built_encoder_that_differs_on_bad_input_is_not_used(flipped: int) -> None:
    # As if another Python took c_make_encoder's arguments in another order: one setting
    # ends up the other way round. Good values encode alike; NaN, or a tuple key, does not.
    real = json.encoder.c_make_encoder  # type: ignore[attr-defined]

    def swapped(*args: Any) -> Any:
        args_ = list(args)
        args_[flipped] = not args_[flipped]
        return real(*args_)

    strict = json.JSONEncoder(check_circular=False, allow_nan=False)
    assert _encoding._reused_encoder(strict, swapped) == strict.encode
    # Built as it should be, the same encoder is used.
    assert _encoding._reused_encoder(strict, real) != strict.encode
