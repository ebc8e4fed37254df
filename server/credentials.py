"""TLS certificates and SuperNode keys for a Deployment Engine run (``fedrec certs`` / ``fedrec keys``).

Made with the ``cryptography`` package only, so no ``openssl`` or ``ssh-keygen`` has to be
installed. Good for prototypes and research federations; a production federation should
take its certificates from the organisation's own CA.

TLS (``make_certificates``)
    Writes ``ca.key``, ``ca.crt``, ``server.key`` and ``server.pem``, the names Flower's
    TLS guide and examples use::

        flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
        flower-supernode --root-certificates ca.crt ...

    In flwr 1.41 the SuperLink serves the Fleet and Control APIs over HTTPS (uvicorn,
    port 8000, ``flwr/superlink/cli/flower_superlink.py`` ``uvicorn.run(... ssl_keyfile,
    ssl_certfile)``), and its ServerApp/SuperExec side reuses ``--ssl-ca-certfile`` as the
    root for its own loopback connections (``runtime_root_certificates_path=
    config.ssl_ca_certfile``), which is why ``localhost``, ``127.0.0.1`` and ``::1`` are in
    the default SANs. SuperNodes and the ``flwr`` CLI verify the server with Python's
    ``ssl`` (``flwr/supercore/protobuf/client.py``: ``SSLContext(PROTOCOL_TLS_CLIENT)`` /
    httpx ``create_default_context(cafile=...)``), hostname checking included; the legacy
    gRPC servers use ``grpc.ssl_server_credentials``. The certificates carry the extensions
    strict X.509 verification (Python 3.13's default) asks for: critical BasicConstraints
    and KeyUsage, Subject and Authority Key Identifiers.

SuperNode authentication (``make_supernode_keys``), as implemented in flwr 1.41
    * Key type: an elliptic-curve key on a NIST curve. The SuperNode accepts any EC key
      (``flwr/supernode/cli/flower_supernode.py`` ``_try_setup_client_authentication``,
      lines 447-473); ``flwr supernode register`` and the Control API accept NIST curves
      only (``flwr/cli/supernode/register.py`` 156-181, ``uses_nist_ec_curve`` in
      ``flwr/supercore/primitives/asymmetric.py`` 112-117). We use P-384, the curve
      Flower's own ``generate_key_pairs`` (asymmetric.py 25-31) and its docs
      (``ssh-keygen -t ecdsa -b 384``) use.
    * ``--auth-supernode-private-key FILE``: an unencrypted **OpenSSH** private key
      (``-----BEGIN OPENSSH PRIVATE KEY-----``), read with
      ``load_ssh_private_key(data, None)`` (flower_supernode.py 454); a PKCS#8 PEM key is
      rejected with "Unable to parse the private key file". The public key is derived
      from it (``--auth-supernode-public-key`` is deprecated and ignored, 466-473).
    * The public key file is an **OpenSSH** public key line (``ecdsa-sha2-nistp384 AAAA...``),
      read with ``load_ssh_public_key`` (register.py 165) and converted to PEM
      SubjectPublicKeyInfo bytes (``public_key_to_bytes``, asymmetric.py 51-56); the
      SuperNode sends the same PEM bytes in every request, and the SuperLink looks the node
      up by them (``get_node_id_by_public_key``).
    * There is **no allow-list file** in 1.41: ``flower-superlink --auth-list-public-keys``
      exits with "argument is no longer supported" (flower_superlink.py 408-418). Start the
      SuperLink with ``--enable-supernode-auth`` (requires TLS, 373-392) and register each
      public key through the Control API: ``flwr supernode register supernode-1.pub
      <superlink-connection>``. With the flag, the Fleet API refuses self-registration
      (``flwr/superlink/servicer/fleet/fleet_handlers.py`` ``register_node``, line 85), so
      only registered keys can activate; without it any SuperNode may connect and, when no
      key is given, makes up its own (``flwr/supernode/fleet_http_connection.py`` 95-97).
      Every request is signed over a timestamp with the private key (ECDSA/SHA-256) and
      checked by the SuperLink (``flwr/superlink/routers/fleet/node_auth.py`` 45-86;
      gRPC: ``flwr/server/superlink/fleet/grpc_rere/node_auth_server_interceptor.py``).

Private keys are written unencrypted with mode 0o600; nothing is overwritten unless
``force=True`` (``FileExistsError`` naming the file otherwise), and every target is checked
before anything is written, so a refused call leaves the directory untouched.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT", "CA_KEY", "DEFAULT_HOSTS", "SERVER_CERT", "SERVER_KEY",
    "make_certificates", "make_supernode_keys", "supernode_key_names",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
# Accept a SuperLink whose clock runs a little behind the machine that made the cert.
_BACKDATE = dt.timedelta(minutes=5)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Fail before writing anything, so a refused call changes nothing on disk."""
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "file exists", str(path))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` set from the start, so a key is never world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (public files)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _general_name(host: str) -> x509.GeneralName:
    """An IP literal becomes an iPAddress SAN (hostname checks never match it as a DNS name)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _clean_hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for host in hosts:
        host = host.strip()
        if not host:
            raise ValueError("empty host name")
        seen.setdefault(host, None)
    if not seen:
        raise ValueError("at least one host is needed for the server certificate")
    return list(seen)


def make_certificates(
    out_dir: Path, hosts: list[str] | None = None, *, days: int = 365, force: bool = False
) -> dict[str, Path]:
    """Write a self-signed CA and a SuperLink server certificate it signed.

    Keys are EC P-256 with ECDSA/SHA-256 signatures: accepted by gRPC (BoringSSL), by
    Python's ``ssl`` behind uvicorn and httpx (what flwr 1.41 uses for HTTPS), and by
    every TLS 1.2/1.3 client, while being generated in milliseconds and giving smaller
    handshakes than RSA 2048 at a higher security level.

    The server certificate lists every entry of ``hosts`` (default: localhost, 127.0.0.1,
    ::1) as a SubjectAlternativeName: an iPAddress entry for IP literals, a dNSName
    otherwise. Clients check the address they dial against these, so add the name or IP
    the SuperNodes use to reach the SuperLink, and keep the loopback names: with the
    default subprocess isolation the SuperLink's SuperExec dials 127.0.0.1 (or ::1) and
    checks this certificate too (``fedrec certs`` always includes them).
    Returns ``{file name: path}``.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1; got {days}")
    names = _clean_hosts(list(DEFAULT_HOSTS) if hosts is None else hosts)
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT)}
    _refuse_existing(list(paths.values()), force)

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - _BACKDATE, now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec"),
        x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec"),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
        ]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _write(paths[CA_KEY], _private_pem(ca_key), _PRIVATE_MODE)
    _write(paths[CA_CERT], ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
    _write(paths[SERVER_KEY], _private_pem(server_key), _PRIVATE_MODE)
    _write(paths[SERVER_CERT], server_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
    return paths


def supernode_key_names(index: int) -> tuple[str, str]:
    """File names of SuperNode ``index`` (1-based): private key, public key."""
    return f"supernode-{index}.key", f"supernode-{index}.pub"


def make_supernode_keys(out_dir: Path, count: int, *, force: bool = False) -> dict[str, Path]:
    """Write ``count`` SuperNode key pairs in the formats flwr 1.41 reads (see the module doc).

    ``supernode-N.key`` is an unencrypted OpenSSH private key for
    ``flower-supernode --auth-supernode-private-key``; ``supernode-N.pub`` is the OpenSSH
    public key line for ``flwr supernode register``. Curve P-384, as Flower generates.
    Returns ``{file name: path}``, private key before public key for each node.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for index in range(1, count + 1):
        for name in supernode_key_names(index):
            paths[name] = out_dir / name
    _refuse_existing(list(paths.values()), force)

    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(1, count + 1):
        key_name, pub_name = supernode_key_names(index)
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(paths[key_name], private, _PRIVATE_MODE)
        _write(paths[pub_name], public + f" fedrec-supernode-{index}\n".encode(), _PUBLIC_MODE)
    return paths
