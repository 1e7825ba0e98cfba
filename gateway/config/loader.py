"""Load the YAML configuration (SPEC §3) into the frozen model, or explain every problem.

Pipeline: read the file → compose YAML nodes with PyYAML's safe loader (nothing is ever
constructed from tags, so `!!python/...` cannot run code; marks are kept for line numbers) →
apply command-line overrides → walk the nodes against the schema, interpolating variables in
scalar values as they are read, rejecting unknown keys and duplicate keys, parsing units →
cross-checks (plan and limit references, duplicate keys and secrets, unreachable routes) →
frozen `Config`. Every problem is collected, not just the first, and reported sorted by line
as `FILE:LINE: dotted.path: problem` (lists as `routes[2].methods`); an override that is wrong
is reported as `FILE:override: path: problem`.

Interpolation: a value may contain `${VAR}` (an error naming VAR when it is unset) or
`${VAR:-default}` (the default, which cannot contain `}`, when VAR is unset or empty, as in the
shell). `$${` is a literal
`${`; a `$` anywhere else is just a `$`. It applies to values, not to mapping keys, after YAML
parsing: an environment value can never add YAML structure. An unquoted value is read as if the
result had been written there, so `admin_token: ${ADMIN_TOKEN:-}` with nothing set is empty.
Inside a flow collection (`{...}` or `[...]`) YAML reads `{` and `}` as structure, so quote the
value there: `{concurrency: '${SLOTS}'}`.

YAML merge keys (`<<: *defaults`) are honoured; keys written next to them win.

Limits, so that no file can stall or crash the loader: a regular file (not a FIFO or device)
of at most `MAX_CONFIG_BYTES`; aliases and merge keys bounded (`gateway.config.expansion`);
every integer bounded by what its field can mean, read without converting thousands of digits.

Empty values: `admin_token` empty means no token; `identity.api_key_query` empty disables the
query parameter; an `upstream.set_headers` entry whose value is empty is not sent at all (so
`X-Upstream-Token: ${UPSTREAM_TOKEN:-}` adds the header only when the variable is set).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping

import yaml

from gateway.config.admin_access import admin_exposure_problem
from gateway.config.expansion import ExpansionError, check_expansion
from gateway.config.keys import read_keys
from gateway.config.model import Config, Route, Upstream, largest_concurrency
from gateway.config.nodes import (
    MAP,
    NULL,
    NULL_TEXT,
    OVERRIDE_SOURCE,
    STR,
    Entries,
    Node,
    NodeReader,
    describe,
    field,
    get,
)
from gateway.config.plans import PlanIndex, read_plans
from gateway.config.routes import pattern_problem, read_routes
from gateway.config.settings import header_name, read_bans, read_headers, read_identity, read_store, read_upstream
from gateway.config.units import UnitError, parse_host_port, parse_size, quote, split_host
from gateway.config.workspaces import check_workspace_limits

__all__ = ["ConfigError", "load_config", "load_config_text"]

_TOP_KEYS = (
    "listen",
    "admin_listen",
    "admin_token",
    "admin_open",
    "admin_hosts",
    "shutdown_grace",
    "upstream",
    "store",
    "identity",
    "keys",
    "plans",
    "routes",
    "max_request_body",
    "client_timeout",
    "max_request_line",
    "max_request_headers",
    "max_request_header_count",
    "client_keep_alive",
    "max_connections_per_client",
    "max_client_connections",
    "bans",
    "headers",
    "usage_path",
    "cost_response_header",
)


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one line per problem, sorted by line."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_config(
    path: str | os.PathLike[str],
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read, validate and freeze the config at `path`; raise ConfigError listing every problem.

    `overrides` maps dotted paths (`listen`, `store.url`) to values as if written in the file
    (applied before validation); `env` defaults to `os.environ`.
    """
    source = os.fspath(path)
    data = _read_file(source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: the file is not UTF-8 text"]) from None
    return load_config_text(text, source, overrides=overrides, env=env)


# A config with 20,000 keys is about 2 MiB; a file far past that is a mistake or an attack,
# and reading it whole would hold the memory and the parse time it asks for.
MAX_CONFIG_BYTES = 8 * 1024 * 1024


def _read_file(source: str) -> bytes:
    """The file's bytes: a regular file of at most MAX_CONFIG_BYTES, or a one-line ConfigError.

    Opened non-blocking, so a FIFO with no writer is refused instead of waiting for one;
    `/dev/zero` and other devices are refused before a byte is read.
    """
    too_big = f"{source}: the file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB, the most a config may be"
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{source}: not a regular file ({_file_kind(info.st_mode)}); give the path of a YAML file"])
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([too_big])
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_CONFIG_BYTES + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the file: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([too_big])
    return data


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a file"


def load_config_text(
    text: str,
    source: str = "<memory>",
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """As `load_config`, from text; `source` names it in messages."""
    root = _compose(text, source)
    if root is None:
        raise ConfigError([f"{source}:1: the file is empty; expected a mapping of settings"])
    if overrides:
        _apply_overrides(root, overrides)
    reader = NodeReader(source, os.environ if env is None else env)
    config = _config(reader, root)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


# libyaml's loader builds the same nodes and line marks several times faster (20,000 keys:
# 0.7 s instead of 4.6 s to compose), at start and on every reload.
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def _compose(text: str, source: str) -> Node | None:
    root = _compose_nodes(text, source)
    if root is not None:
        try:
            check_expansion(root)
        except ExpansionError as exc:
            raise ConfigError([f"{source}:{exc.line}: {exc}"]) from None
    return root


def _compose_nodes(text: str, source: str) -> Node | None:
    if _FAST_LOADER is not None:
        try:
            fast: Node | None = yaml.compose(text, Loader=_FAST_LOADER)
            return fast
        except (yaml.YAMLError, RecursionError):
            pass  # the pure-Python loader below names the problem the way our messages expect
    try:
        node: Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        return node
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and exc.context_mark is not None:
            what = f"{exc.context} at line {exc.context_mark.line + 1}, {exc.problem}"
        raise ConfigError([f"{source}:{line}: invalid YAML: {what}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            [f"{source}:{line}: invalid YAML: {exc.reason} (character #x{exc.character:04x})"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}:1: invalid YAML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}:1: invalid YAML: nested too deeply"]) from None


def _apply_overrides(root: Node, overrides: Mapping[str, str]) -> None:
    """Set each dotted path to its value, creating mappings on the way, before validation."""
    if not isinstance(root, yaml.MappingNode):
        return
    mark = yaml.Mark(OVERRIDE_SOURCE, 0, -1, 0, None, 0)
    for dotted, value in overrides.items():
        node: yaml.MappingNode = root
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            index = next(
                (
                    i
                    for i, (k, _) in enumerate(node.value)
                    if isinstance(k, yaml.ScalarNode) and k.value == part
                ),
                None,
            )
            current = node.value[index][1] if index is not None else None
            new: Node
            if last:
                tag = NULL if NULL_TEXT.fullmatch(value) else STR
                new = yaml.ScalarNode(tag, value, mark, mark)
            elif isinstance(current, yaml.MappingNode):
                node = current
                continue
            else:
                new = yaml.MappingNode(MAP, [], mark, mark)
            pair = (yaml.ScalarNode(STR, part, mark, mark), new)
            if index is None:
                node.value.append(pair)
            else:
                node.value[index] = pair
            if isinstance(new, yaml.MappingNode):
                node = new


# -- the document --------------------------------------------------------------------------------


def _config(r: NodeReader, root: Node) -> Config:
    if not isinstance(root, yaml.MappingNode):
        r.problem(root, "", f"the top level must be a mapping of settings, got {describe(root)}")
        raise ConfigError(r.problems)
    top = r.mapping(root, "", _TOP_KEYS, required=("upstream", "keys", "plans", "routes"))
    defaults = Config(upstream=Upstream(url="http://localhost"), keys=(), plans={}, routes=())

    plans_node = get(top, "plans")
    index = read_plans(r, plans_node) if plans_node is not None else PlanIndex(readable=False)
    keys_node = get(top, "keys")
    keys = read_keys(r, keys_node, index) if keys_node is not None else ()
    if keys_node is not None:
        check_workspace_limits(r, keys_node, keys, index.plans)
    routes_node = get(top, "routes")
    routes = read_routes(r, routes_node, index, keys) if routes_node is not None else ()
    upstream_node = get(top, "upstream")
    upstream = (read_upstream(r, upstream_node) if upstream_node is not None else None) or defaults.upstream

    before = r.problem_count
    listen = field(top, "listen", lambda n: _listen(r, n, "listen"), defaults.listen)
    admin_listen = field(top, "admin_listen", lambda n: _listen(r, n, "admin_listen"), defaults.admin_listen)
    if r.problem_count == before:  # both valid (or defaults): compare them
        _check_listen_apart(r, root, top, listen, admin_listen)
    admin_token = _admin_token(r, get(top, "admin_token"))
    admin_open = field(top, "admin_open", lambda n: r.boolean(n, "admin_open"), defaults.admin_open)
    if r.problem_count == before:
        exposed = admin_exposure_problem(admin_listen, parse_host_port(admin_listen)[0], admin_token, admin_open)
        if exposed is not None:
            r.problem(get(top, "admin_listen") or root, "admin_listen", exposed)

    config = Config(
        upstream=upstream,
        keys=keys,
        plans=index.plans,
        routes=routes,
        listen=listen,
        admin_listen=admin_listen,
        admin_token=admin_token,
        admin_open=admin_open,
        admin_hosts=field(top, "admin_hosts", lambda n: _admin_hosts(r, n), defaults.admin_hosts),
        shutdown_grace=field(
            top,
            "shutdown_grace",
            lambda n: r.duration(n, "shutdown_grace", allow_zero=True),
            defaults.shutdown_grace,
        ),
        store=field(top, "store", lambda n: read_store(r, n), defaults.store),
        identity=field(top, "identity", lambda n: read_identity(r, n), defaults.identity),
        max_request_body=field(
            top,
            "max_request_body",
            lambda n: r.unit(n, "max_request_body", parse_size),
            defaults.max_request_body,
        ),
        client_timeout=field(
            top, "client_timeout", lambda n: r.duration(n, "client_timeout"), defaults.client_timeout
        ),
        max_request_line=field(
            top, "max_request_line", lambda n: r.unit(n, "max_request_line", _head_size), defaults.max_request_line
        ),
        max_request_headers=field(
            top,
            "max_request_headers",
            lambda n: r.unit(n, "max_request_headers", _head_size),
            defaults.max_request_headers,
        ),
        max_request_header_count=field(
            top,
            "max_request_header_count",
            lambda n: r.integer(n, "max_request_header_count", 1, 10_000),
            defaults.max_request_header_count,
        ),
        client_keep_alive=field(
            top, "client_keep_alive", lambda n: r.duration(n, "client_keep_alive"), defaults.client_keep_alive
        ),
        max_connections_per_client=field(
            top, "max_connections_per_client",
            lambda n: r.integer(n, "max_connections_per_client", 1, MAX_CONNECTIONS),
            defaults.max_connections_per_client,
        ),
        max_client_connections=field(
            top, "max_client_connections",
            lambda n: r.integer(n, "max_client_connections", 1, MAX_CONNECTIONS), defaults.max_client_connections,
        ),
        bans=field(top, "bans", lambda n: read_bans(r, n), None),
        headers=field(top, "headers", lambda n: read_headers(r, n), defaults.headers),
        cost_response_header=field(
            top, "cost_response_header", lambda n: header_name(r, n, "cost_response_header"),
            defaults.cost_response_header,
        ),
        usage_path=_usage_path(r, get(top, "usage_path"), routes),
        source=r.source,
    )
    _check_connections_per_client(r, get(top, "max_connections_per_client"), config)
    return config


def _check_connections_per_client(r: NodeReader, node: Node | None, config: Config) -> None:
    """A per-client connection bound below a key's concurrency limit would refuse a client the
    connections for slots its headers offer it."""
    bound = config.max_connections_per_client
    if node is None or bound is None:
        return
    largest, where = largest_concurrency(config)
    if bound < largest:
        r.problem(node, "max_connections_per_client",
                  f"{bound} is below {where} ({largest}): a client using the slots its headers offer "
                  "would be refused connections; leave it unset, or make it at least that")


# The request parser's work on a head grows faster than its size (gateway/head_limits.py:
# httptools concatenates every fragment of a header: a 16 MiB header sent in 1 KiB reads took
# 114 s of CPU; 1 MiB in 100-byte reads about 0.5 s, other clients never waiting 10 ms), so a
# head limit is at most this: 16 times the 64 KiB headers default, far past nginx's 32 KiB and
# Envoy's 60 KiB.
MAX_HEAD_SIZE = 1024 * 1024


def _head_size(text: str) -> int:
    """`max_request_line` / `max_request_headers`: a size of at most MAX_HEAD_SIZE."""
    size = parse_size(text)
    if size > MAX_HEAD_SIZE:
        raise UnitError(f"{quote(text)} is too large (at most 1MiB)")
    return size


MAX_USAGE_PATH = 1024
MAX_CONNECTIONS = 10_000_000  # above any open-file limit a kernel allows one process


def _usage_path(r: NodeReader, node: Node | None, routes: tuple[Route, ...]) -> str | None:
    """`usage_path`: one exact absolute path, answered (GET) before routing. A route written as
    exactly that path would never see a GET, so that is refused; a pattern that covers it
    (`/v1/**`) just loses that one path."""
    if node is None or r.is_null(node, "usage_path"):
        return None
    text = r.string(node, "usage_path")
    if text is None:
        return None
    problem = pattern_problem(text)
    if problem is None and ("{" in text or text.endswith("/**")):
        problem = "it is one exact path, without {name} or /**"
    elif problem is None and len(text) > MAX_USAGE_PATH:
        problem = f"it is longer than {MAX_USAGE_PATH} characters"
    if problem is not None:
        r.problem(node, "usage_path", f"{quote(text)} is not a usage path: {problem}")
        return None
    if any(route.path == text and (route.methods is None or "GET" in route.methods) for route in routes):
        r.problem(node, "usage_path", f"{quote(text)} is also a route's path; the gateway answers GET there "
                  "itself, so that route would never see one")  # fmt: skip
        return None
    return text


def _listen(r: NodeReader, node: Node, path: str) -> str | None:
    text = r.string(node, path)
    if text is None:
        return None
    try:
        parse_host_port(text)
    except UnitError as exc:
        r.problem(node, path, str(exc))
        return None
    return text.strip()


def _check_listen_apart(
    r: NodeReader, root: Node, top: Entries | None, listen: str, admin_listen: str
) -> None:
    public_host, public_port = parse_host_port(listen)
    admin_host, admin_port = parse_host_port(admin_listen)
    wildcard = {"0.0.0.0", "::", "*"}
    same_host = public_host == admin_host or public_host in wildcard or admin_host in wildcard
    if public_port == admin_port and public_port != 0 and same_host:
        node = get(top, "admin_listen") or get(top, "listen") or root
        r.problem(
            node,
            "admin_listen",
            f"{quote(admin_listen)} clashes with listen {quote(listen)}; they must differ",
        )


def _admin_hosts(r: NodeReader, node: Node) -> tuple[str, ...] | None:
    def host(item: Node, path: str) -> str | None:
        text = r.string(item, path)
        if text is not None and split_host(text) is None:
            r.problem(item, path, f"{quote(text)} is not a host name, HOST:PORT or [IPv6]:PORT")
            return None
        return text.strip().lower() if text is not None else None

    hosts = r.list_of(node, "admin_hosts", host)
    return tuple(hosts) if hosts is not None else None


def _admin_token(r: NodeReader, node: Node | None) -> str | None:
    if node is None or r.is_null(node, "admin_token"):
        return None
    token = r.scalar(node, "admin_token")
    if token is None or token.text == "":
        return None
    if not re.fullmatch(r"[\x21-\x7e]+", token.text):
        r.problem(node, "admin_token", "must be printable ASCII without spaces")
    return token.text
