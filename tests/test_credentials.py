"""fedrec certs / keys: the certificate really works for TLS, the keys load the way flwr 1.41 loads them."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.credentials import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    make_certificates,
    make_supernode_keys,
)
from simulations.cli import main

HOSTS = ["localhost", "127.0.0.1", "::1", "superlink.example.org", "10.1.2.3"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs") / "new-dir", HOSTS, days=30)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("other"), ["localhost", "127.0.0.1"])[CA_CERT]


# ---------------------------------------------------------------- certificate contents


def test_writes_the_file_names_flower_uses(certs):
    assert sorted(certs) == sorted([CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT])
    assert (CA_CERT, SERVER_CERT, SERVER_KEY) == ("ca.crt", "server.pem", "server.key")
    assert all(path.is_file() and path.parent.name == "new-dir" for path in certs.values())


def test_server_certificate_is_issued_by_the_ca(certs, other_ca):
    ca, server = _cert(certs[CA_CERT]), _cert(certs[SERVER_CERT])
    server.verify_directly_issued_by(ca)  # raises on a bad signature or issuer
    ca.verify_directly_issued_by(ca)  # self-signed
    with pytest.raises((ValueError, InvalidSignature)):  # another issuer name, or a signature that does not verify
        server.verify_directly_issued_by(_cert(other_ca))


def test_server_certificate_extensions(certs):
    server = _cert(certs[SERVER_CERT])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.1.2.3"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    validity = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 * 86400 <= validity.total_seconds() <= 30 * 86400 + 3600
    key = serialization.load_pem_private_key(certs[SERVER_KEY].read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_ca_certificate_extensions(certs):
    ca = _cert(certs[CA_CERT])
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    key = serialization.load_pem_private_key(certs[CA_KEY].read_bytes(), None)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()


def test_default_hosts_are_the_loopback_names(tmp_path):
    server = _cert(make_certificates(tmp_path)[SERVER_CERT])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def test_private_keys_are_owner_only(certs):
    assert _mode(certs[CA_KEY]) == 0o600
    assert _mode(certs[SERVER_KEY]) == 0o600
    assert _mode(certs[CA_CERT]) & 0o077 != 0  # the certificates are public


# ---------------------------------------------------------------- overwriting


def test_refuses_to_overwrite_then_overwrites_with_force(tmp_path):
    paths = make_certificates(tmp_path, ["localhost"])
    before = {name: path.read_bytes() for name, path in paths.items()}
    with pytest.raises(FileExistsError) as err:
        make_certificates(tmp_path, ["localhost"])
    assert err.value.filename == str(paths[CA_KEY])
    assert {name: path.read_bytes() for name, path in paths.items()} == before

    make_certificates(tmp_path, ["localhost"], force=True)
    assert paths[SERVER_KEY].read_bytes() != before[SERVER_KEY]
    assert paths[CA_KEY].read_bytes() != before[CA_KEY]
    assert _mode(paths[SERVER_KEY]) == _mode(paths[CA_KEY]) == 0o600
    _cert(paths[SERVER_CERT]).verify_directly_issued_by(_cert(paths[CA_CERT]))
    assert not list(tmp_path.glob(".*.tmp"))


def test_one_existing_file_blocks_the_whole_set(tmp_path):
    (tmp_path / SERVER_CERT).write_text("mine")
    with pytest.raises(FileExistsError, match="server.pem"):
        make_certificates(tmp_path, ["localhost"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [SERVER_CERT]
    assert (tmp_path / SERVER_CERT).read_text() == "mine"


# ---------------------------------------------------------------- real TLS handshakes


def _python_tls_handshake(certs: dict[str, Path], cafile: Path, server_hostname: str) -> None:
    """Handshake like flwr 1.41's HTTPS clients (Python ssl, hostname check, strict X.509)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs[SERVER_CERT], certs[SERVER_KEY])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cafile))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with client_ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
                assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    finally:
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "superlink.example.org"])
def test_python_tls_client_accepts_the_server_for_each_host(certs, name):
    _python_tls_handshake(certs, certs[CA_CERT], name)


def test_python_tls_client_rejects_other_ca_and_unlisted_host(certs, other_ca):
    with pytest.raises(ssl.SSLCertVerificationError):
        _python_tls_handshake(certs, other_ca, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _python_tls_handshake(certs, certs[CA_CERT], "elsewhere.example.org")


@pytest.fixture(scope="module")
def grpc_port(certs):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials(
        [(certs[SERVER_KEY].read_bytes(), certs[SERVER_CERT].read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(grace=None)


def _grpc_ready(port: int, ca: bytes | None, target_host: str, timeout: float) -> bool:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [] if target_host == "127.0.0.1" else [("grpc.ssl_target_name_override", target_host)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False


def test_grpc_channel_with_the_ca_becomes_ready(certs, grpc_port):
    ca = certs[CA_CERT].read_bytes()
    assert _grpc_ready(grpc_port, ca, "127.0.0.1", timeout=5)  # iPAddress SAN
    assert _grpc_ready(grpc_port, ca, "localhost", timeout=5)  # dNSName SAN


def test_grpc_channel_without_the_ca_never_becomes_ready(grpc_port, other_ca):
    assert not _grpc_ready(grpc_port, other_ca.read_bytes(), "127.0.0.1", timeout=1.5)
    assert not _grpc_ready(grpc_port, None, "127.0.0.1", timeout=1.5)  # system roots only


# ---------------------------------------------------------------- SuperNode keys


def test_supernode_keys_load_the_way_flwr_loads_them(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = make_supernode_keys(tmp_path / "keys", 3)
    assert list(paths) == [f"supernode-{i}.{ext}" for i in (1, 2, 3) for ext in ("key", "pub")]
    registered = set()
    for index in (1, 2, 3):
        key_path, pub_path = paths[f"supernode-{index}.key"], paths[f"supernode-{index}.pub"]
        assert _mode(key_path) == 0o600
        assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
        # What flower-supernode --auth-supernode-private-key does ...
        args = argparse.Namespace(auth_supernode_private_key=str(key_path), auth_supernode_public_key=None)
        private_key, public_key = _try_setup_client_authentication(args)
        assert isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name == "secp384r1"
        assert uses_nist_ec_curve(public_key)
        # ... and `flwr supernode register` must yield the same bytes the SuperNode sends.
        assert try_load_public_key(pub_path) == public_key_to_bytes(public_key)
        registered.add(try_load_public_key(pub_path))
    assert len(registered) == 3


def test_supernode_keys_refuse_to_overwrite_then_overwrite_with_force(tmp_path):
    paths = make_supernode_keys(tmp_path, 2)
    before = paths["supernode-2.key"].read_bytes()
    with pytest.raises(FileExistsError) as err:
        make_supernode_keys(tmp_path, 2)
    assert err.value.filename == str(paths["supernode-1.key"])
    assert paths["supernode-2.key"].read_bytes() == before
    make_supernode_keys(tmp_path, 2, force=True)
    assert paths["supernode-2.key"].read_bytes() != before
    assert _mode(paths["supernode-2.key"]) == 0o600
    with pytest.raises(ValueError):
        make_supernode_keys(tmp_path / "none", 0)


# ---------------------------------------------------------------- CLI


def test_cli_certs_refuses_existing_files_with_exit_2(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "10.0.0.7", "--host", "localhost"]) == 0
    printed = capsys.readouterr().out
    san = _cert(out / SERVER_CERT).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]  # loopback kept for the SuperLink's own runtime
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1", "10.0.0.7"]
    assert "--superlink 10.0.0.7:8000" in printed
    assert f"--ssl-certfile {(out / SERVER_CERT).resolve()}" in printed
    assert f"--root-certificates {(out / CA_CERT).resolve()}" in printed
    key_before = (out / SERVER_KEY).read_bytes()

    assert main(["certs", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedrec: error: {out / CA_KEY} exists; pass --force to overwrite"]
    assert (out / SERVER_KEY).read_bytes() == key_before

    assert main(["certs", "--out", str(out), "--force"]) == 0
    assert (out / SERVER_KEY).read_bytes() != key_before


def test_cli_keys_refuses_existing_files_and_bad_counts(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keys", "--out", str(out), "--count", "2"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["keys", "--out", str(out), "--count", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"fedrec: error: {out / 'supernode-1.key'} exists; pass --force to overwrite"
    assert main(["keys", "--out", str(out), "--count", "1", "--force"]) == 0
    assert main(["keys", "--out", str(tmp_path / "zero"), "--count", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()
