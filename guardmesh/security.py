"""Transport security and authorization, the same for every service and client.

Transport (``[security] mode``): ``plain`` (loopback default), ``tls`` (clients verify the server against the
mesh CA) or ``mtls`` (servers also require a client certificate signed by that CA). Certificates live in
``security.certs_dir`` (``guardmesh certs`` / ``make certs`` creates a local CA and every certificate).

Authorization (``[security] authorization = true``): a caller is identified by a role token in the
``authorization: Bearer <token>`` metadata, or else by its client certificate's common name; both map to a
role (trainer, app, admin) through ``roles.toml`` in the certs folder, which stores only SHA-256 digests of
tokens. Each service declares which roles may call each method (``ServiceDefinition.roles``); admin may call
everything, health checks need no credentials. Missing or unknown credentials: UNAUTHENTICATED; a role not
allowed: PERMISSION_DENIED. Tokens are never logged nor put on spans: only the principal's name and role are.
The principal of the current call is available to servicers through :func:`current_principal` (the
scheduler uses it so that a trainer renews and releases only its own jobs' leases).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from guardmesh.config import ConfigError, MeshConfig
from guardmesh.handlers import Behaviour, BehaviourInterceptor, CallRefused, within

log = logging.getLogger(__name__)

ROLES = ("trainer", "app", "admin")
#: Methods anyone may call, without credentials (discovery and load balancers check health).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
#: Services any authenticated role may call.
ANY_ROLE_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
METADATA_KEY = "authorization"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name (token principal or certificate common name) and a role."""

    name: str
    role: str
    via: str  # "token", "certificate" or "none"


ANONYMOUS = Principal("", "", "none")
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("guardmesh_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the call being served (ANONYMOUS when authorization is off)."""
    return _current.get()


def token_digest(token: str) -> str:
    """SHA-256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def _certs_path(config: MeshConfig, value: str, default: str) -> Path:
    base = config.state_path(config.security.certs_dir)
    if value:
        p = Path(value)
        return p if p.is_absolute() else base / p
    return base / default


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror}); run `make certs`") from None


def server_credentials(config: MeshConfig, service: str) -> grpc.ServerCredentials | None:
    """The server's TLS credentials (None in plain mode): its certificate, and the CA for mTLS."""
    sec = config.security
    if sec.mode == "plain":
        return None
    cert = _read(_certs_path(config, sec.cert_file, f"{service}.pem"), "security.cert_file")
    key = _read(_certs_path(config, sec.key_file, f"{service}-key.pem"), "security.key_file")
    ca = _read(_certs_path(config, sec.ca_file, "ca.pem"), "security.ca_file") if sec.mode == "mtls" else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=sec.mode == "mtls")


def channel_credentials(config: MeshConfig) -> grpc.ChannelCredentials | None:
    """A client's TLS credentials (None in plain mode): the CA, and its certificate for mTLS."""
    sec = config.security
    if sec.mode == "plain":
        return None
    ca = _read(_certs_path(config, sec.ca_file, "ca.pem"), "security.ca_file")
    if sec.mode == "tls":
        return grpc.ssl_channel_credentials(root_certificates=ca)
    cert = _read(
        _certs_path(config, sec.client_cert_file, f"client-{sec.client_role}.pem"), "security.client_cert_file"
    )
    key = _read(
        _certs_path(config, sec.client_key_file, f"client-{sec.client_role}-key.pem"), "security.client_key_file"
    )
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = (METADATA_KEY, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or []), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        """Add the token."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        """Add the token."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        """Add the token."""
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        """Add the token."""
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self, method: str, timeout: float | None, metadata: Any, credentials: Any, wait_for_ready: Any, compression: Any
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def client_token(config: MeshConfig) -> str:
    """The role token this process presents: ``security.token``, else the ``token_file``'s content."""
    sec = config.security
    if sec.token:
        return sec.token
    if sec.token_file:
        path = _certs_path(config, sec.token_file, "")
        return _read(path, "security.token_file").decode().strip()
    return ""


def token_interceptor(config: MeshConfig) -> grpc.UnaryUnaryClientInterceptor | None:
    """Client interceptor presenting the configured role token, or None when there is none."""
    token = client_token(config)
    return _TokenInterceptor(token) if token else None


@dataclass(frozen=True)
class RoleBook:
    """Token digests and certificate common names, each mapped to (principal, role)."""

    tokens: Mapping[str, tuple[str, str]]
    certificates: Mapping[str, str]

    @classmethod
    def load(cls, config: MeshConfig) -> RoleBook:
        """Read ``roles.toml`` (``security.roles_file``) from the certs folder."""
        path = _certs_path(config, config.security.roles_file, "roles.toml")
        try:
            data = tomllib.loads(_read(path, "security.roles_file").decode())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"security.roles_file: {path} is not valid TOML ({exc})") from None
        tokens = {}
        for digest, entry in data.get("tokens", {}).items():
            role = entry.get("role", "")
            if role not in ROLES:
                raise ConfigError(f"security.roles_file: token {digest[:8]}...: unknown role '{role}'")
            tokens[digest] = (entry.get("principal", role), role)
        certificates = {}
        for cn, role in data.get("certificates", {}).items():
            if role not in ROLES:
                raise ConfigError(f"security.roles_file: certificate '{cn}': unknown role '{role}'")
            certificates[cn] = role
        return cls(tokens, certificates)

    def by_token(self, token: str) -> Principal | None:
        """The principal holding ``token`` (constant-time digest comparison)."""
        digest = token_digest(token)
        for known, (name, role) in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return Principal(name, role, "token")
        return None


def allow(service: str, roles: Iterable[str], *methods: str) -> dict[str, frozenset[str]]:
    """Policy entries: ``roles`` may call each of ``methods`` of ``service`` ("package.Service")."""
    return {f"{service}/{m}": frozenset(roles) for m in methods}


class Unauthenticated(Exception):
    """No valid credentials."""


class PermissionDenied(Exception):
    """Valid credentials, role not allowed."""


class Authorizer:
    """Decides who may call which method; used by :class:`AuthorizationInterceptor`."""

    def __init__(self, book: RoleBook, policy: Mapping[str, frozenset[str]]) -> None:
        self.book = book
        self.policy = policy

    def principal(self, metadata: Any, context: grpc.ServicerContext) -> Principal:
        """Identify the caller: a token first, else the client certificate; Unauthenticated otherwise."""
        token = ""
        for key, value in metadata or ():
            if key == METADATA_KEY:
                token = value.removeprefix("Bearer ").strip() if isinstance(value, str) else ""
        if token:
            found = self.book.by_token(token)
            if found is None:
                raise Unauthenticated("the role token is not valid")
            return found
        names = (context.auth_context() or {}).get("x509_common_name", [])
        if names:
            cn = names[0].decode(errors="replace")
            role = self.book.certificates.get(cn)
            if role is None:
                raise Unauthenticated(f"client certificate '{cn}' is not mapped to a role")
            return Principal(cn, role, "certificate")
        raise Unauthenticated(
            "missing credentials: present a role token (metadata 'authorization: Bearer <token>') or a client "
            "certificate"
        )

    def check(self, method: str, metadata: Any, context: grpc.ServicerContext) -> Principal:
        """The caller's principal if it may call ``method``; Unauthenticated / PermissionDenied otherwise."""
        if method in OPEN_METHODS:
            return ANONYMOUS
        who = self.principal(metadata, context)
        if who.role == "admin":
            return who
        service = method.lstrip("/").split("/")[0]
        if service in ANY_ROLE_SERVICES:
            return who
        allowed = self.policy.get(method.lstrip("/"), frozenset())
        if who.role not in allowed:
            roles = ", ".join(sorted(allowed | {"admin"}))
            raise PermissionDenied(f"role '{who.role}' may not call {method.lstrip('/')} (allowed: {roles})")
        return who


def _guard(
    authorizer: Authorizer, method: str, fn: Callable[[Any, grpc.ServicerContext], Any], streaming: bool
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def enter(context: grpc.ServicerContext) -> contextvars.Token[Principal]:
        try:
            return _current.set(authorizer.check(method, context.invocation_metadata(), context))
        except Unauthenticated as exc:
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        except PermissionDenied as exc:
            raise CallRefused(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None

    return within(fn, streaming, enter, _current.reset)


class AuthorizationInterceptor(BehaviourInterceptor):
    """Check every call against the :class:`Authorizer` before the servicer runs."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """Wrap the resolved handler's behaviour with the check."""
        return _guard(self.authorizer, method, behaviour, streaming)
