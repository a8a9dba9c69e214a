"""The public API: exported names, interfaces implemented, secrets kept out of reprs."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

import relayer
import relayer.testing
from relayer import HTTPTransport, IStore, ITransport, SQLiteStore, TargetConfig
from relayer.store.schema import SCHEMA_VERSION
from relayer.testing import FakeTransport, InlineDatabasePool

SECRET = "s3cr3t-t0ken-VALUE"


@pytest.mark.parametrize("module", [relayer, relayer.testing], ids=lambda m: m.__name__)
def test_every_exported_name_exists(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert names, "__all__ is empty"
    assert len(set(names)) == len(names), "__all__ lists a name twice"
    missing = [name for name in names if not hasattr(module, name)]
    assert missing == []


def test_from_relayer_import_star_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from relayer import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == sorted(relayer.__all__)


def test_version_is_a_string() -> None:
    assert isinstance(relayer.__version__, str)
    assert relayer.__version__


def test_sqlite_store_provides_istore(tmp_path: Path) -> None:
    store = SQLiteStore.open_path(Clock(), tmp_path / "relayer.db", pool=InlineDatabasePool())  # type: ignore[arg-type]
    assert IStore.providedBy(store)
    assert verifyObject(IStore, store)
    assert store.schema_version == SCHEMA_VERSION


def test_fake_transport_provides_itransport() -> None:
    transport = FakeTransport()
    assert ITransport.providedBy(transport)
    assert verifyObject(ITransport, transport)


def test_http_transport_provides_itransport() -> None:
    transport = HTTPTransport(MemoryReactorClock())
    assert verifyObject(ITransport, transport)


def test_target_config_repr_hides_the_token() -> None:
    config = TargetConfig("bridge", "https://bridge.example", SECRET)
    assert config.token == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    # The other fields are shown, so the repr is still useful.
    assert "bridge" in repr(config)
    assert "https://bridge.example" in repr(config)


def test_the_wire_format_names_are_exported() -> None:
    # The wire formats and the request transport interface are public, from relayer itself.
    for name in (
        "IRequestTransport",
        "IWireFormat",
        "InvalidSignature",
        "MATRIX",
        "MatrixFormat",
        "STANDARD_WEBHOOKS",
        "StandardWebhooksFormat",
        "WireRequest",
    ):
        assert name in relayer.__all__
    assert "ReceivedWebhook" in relayer.testing.__all__
    assert relayer.MATRIX.name == "matrix"
    assert relayer.STANDARD_WEBHOOKS.name == "standard-webhooks"


def test_http_and_fake_transports_provide_irequesttransport() -> None:
    assert verifyObject(relayer.IRequestTransport, HTTPTransport(MemoryReactorClock()))
    assert verifyObject(relayer.IRequestTransport, FakeTransport())


def test_target_config_repr_hides_the_webhook_secrets() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    config = TargetConfig(
        "hook", "https://h.example/in", format="standard-webhooks", secrets=secret
    )
    assert config.secrets == (secret,)
    assert secret not in repr(config)
    assert secret[len("whsec_") :] not in repr(config)
    assert "standard-webhooks" in repr(config)
