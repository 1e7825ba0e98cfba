"""A store URL is parsed once, the same way at config load and when the store opens it
(`parse_redis_url`, used by the loader's `store.url` check, by `redis_client.connect` and by
`Endpoint.from_url`): a URL `check-config` accepts is one the store opens as it was read, and one
it refuses is refused at load with a located line, before `serve` says "listening"."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from gateway.config.loader import ConfigError, load_config_text
from gateway.config.store_url import StoreUrlError, parse_redis_url
from gateway.store.pipelined import Endpoint
from gateway.store.redis_client import RedisConnection, connect

MINIMAL = """\
upstream: {url: "http://127.0.0.1:9000"}
keys: [{id: k, sha256: "%s", plan: p}]
plans: {p: {limits: {rpm: {rate: 10/1m}}}}
routes: [{path: "/**", limits: [rpm]}]
""" % ("0" * 64)

# Each accepted by check-config before, each a traceback in the worker (or db 0, silently).
REFUSED = {
    "redis://127.0.0.1:6379/10?foo=1": "has an option redis:// does not take: 'foo'",
    "redis://127.0.0.1:notaport/10": "has a port that is not a number from 1 to 65535",
    "redis://127.0.0.1:99999/10": "has a port that is not a number from 1 to 65535",
    "redis://127.0.0.1:0/10": "has a port that is not a number from 1 to 65535",
    "unix:///tmp/x.sock?db=abc": "has a db that is not a number",
    "redis+sentinel://127.0.0.1:26379": "needs a service name",
    "redis://127.0.0.1:6379/10?socket_timeout=abc": "does not take: 'socket_timeout'",
    "redis://127.0.0.1:6379/10?ssl_cert_reqs=none": "does not take: 'ssl_cert_reqs'",
    "rediss://127.0.0.1:6379/10?ssl_cert_reqs=never": "gives ?ssl_cert_reqs= a value that is not none",
    "redis://127.0.0.1:6379/abc": "has a db that is not a number",
    "redis://127.0.0.1:6379/1?db=2": "gives two different dbs",
    "redis://h1:6379,h2:6379/0": "names several hosts",
    "redis+sentinel://h:26379/m/x": "has a db that is not a number",
    "redis+sentinel://h:26379/m?foo=1": "does not take: 'foo'",
    "redis+cluster://h:7000/3": "Redis Cluster has only db 0",
    "redis+cluster://h:7000,h2:notaport": "has a port that is not a number",
    "redis+cluster://h:7000?password=x": "does not take: 'password'",
    "redis://::1/0": "IPv6 host without [brackets]",
    "redis://h/0?db=1&db=1": "gives ?db= twice",
    "redis://h/0#frag": "must not have a #fragment",
}


def load_store_url(url: str) -> str:
    return load_config_text(MINIMAL + f"store: {{url: '{url}'}}\n", "t.yaml").store.url


@pytest.mark.parametrize(("url", "problem"), REFUSED.items(), ids=list(REFUSED))
def test_the_loader_refuses_what_the_store_could_not_open(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_store_url(url)
    assert len(refused.value.problems) == 1
    line = refused.value.problems[0]
    assert line.startswith("t.yaml:5: store.url: ") and problem in line, line
    with pytest.raises(StoreUrlError, match=problem.replace("?", r"\?").replace("[", r"\[")):
        connect(url, timeout=0.1, max_connections=4)
    assert Endpoint.from_url(url) is None


@pytest.mark.parametrize("url", [
    "redis://:REDISPW-1@h:6379/0?foo=1",
    "redis://h:6379/0?password=REDISPW-1&foo=1",
    "redis+sentinel://h:26379?sentinel_password=REDISPW-1",
    "redis://gw:REDISPW-1@h:notaport/0",
])  # fmt: skip
def test_a_refused_url_is_shown_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_store_url(url)
    assert "REDISPW-1" not in str(refused.value) and "***" in str(refused.value), refused.value


@pytest.mark.anyio
async def test_connect_builds_the_client_the_loader_read() -> None:
    cases: list[tuple[str, dict[str, object]]] = [
        ("redis://u%40x:p%3Aw@h:6380/3", {"host": "h", "port": 6380, "db": 3, "username": "u@x", "password": "p:w"}),
        ("redis://h?db=4&password=pw&client_name=gw", {"db": 4, "password": "pw", "client_name": "gw"}),
        ("unix:///run/r.sock?db=2", {"path": "/run/r.sock", "db": 2}),
        ("rediss://[::1]:6390/1?ssl_cert_reqs=none&ssl_check_hostname=false",
         {"host": "::1", "port": 6390, "db": 1, "ssl_cert_reqs": "none", "ssl_check_hostname": False}),
    ]
    for url, expected in cases:
        connection = connect(url, timeout=0.1, max_connections=4)
        try:
            pool = connection.client.connection_pool
            assert {key: pool.connection_kwargs.get(key) for key in expected} == expected, url
            assert pool.connection_kwargs["socket_timeout"] == 0.1
            wanted = {"unix": UnixDomainSocketConnection, "rediss": SSLConnection}.get(url.split(":")[0])
            if wanted is not None:
                assert pool.connection_class is wanted
        finally:
            await connection.aclose()


@pytest.mark.anyio
async def test_sentinel_and_cluster_take_the_parsed_nodes_service_and_db() -> None:
    sentinel = connect("redis+sentinel://:pw@h1,[::1]:26380/mymaster/5?sentinel_password=sp",
                       timeout=0.1, max_connections=4)
    try:
        pool = sentinel.client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (
            "mymaster", 5, "pw")
    finally:
        await sentinel.aclose()
    cluster = connect("redis+cluster://h1:7000,h2/0", timeout=0.1, max_connections=4)
    try:
        assert isinstance(cluster.client, RedisCluster)
        startup = cluster.client.nodes_manager.startup_nodes.values()
        assert sorted((node.host, node.port) for node in startup) == [("h1", 7000), ("h2", 6379)]
    finally:
        await cluster.aclose()


def test_the_pipelined_transport_takes_the_same_parse() -> None:
    assert Endpoint.from_url("redis://:pw@h:1/0?password=pw2") == Endpoint("h", 1, None, 0, None, "pw2")
    assert Endpoint.from_url("redis://h/0?client_name=x") is None  # an option only redis-py honours
    assert Endpoint.from_url("unix://:pw@/run/r.sock?db=3") == Endpoint(None, 0, "/run/r.sock", 3, None, "pw")


def test_the_target_never_shows_its_passwords() -> None:
    target = parse_redis_url("redis+sentinel://:PW-1@h/m?sentinel_password=PW-2")
    assert "PW-1" not in repr(target) and "PW-2" not in repr(target)
    assert (target.password, target.sentinel_password) == ("PW-1", "PW-2")


# -- the loader and the store never disagree ---------------------------------------------------

SCHEMES = ["redis", "rediss", "unix", "redis+sentinel", "redis+cluster"]
HOSTS = ["h", "h:6379", "h:0", "h:65536", "h:x", "[::1]:7000", "h1,h2:7001", "", "::1"]
PATHS = ["", "/", "/0", "/15", "/abc", "/m", "/m/2", "/m/x", "/1/2", "/-1"]
QUERY = ["db=3", "db=x", "db=", "password=p", "username=u", "client_name=gw", "foo=1", "socket_timeout=1",
         "service_name=m", "sentinel_password=s", "ssl_cert_reqs=none", "ssl_cert_reqs=maybe",
         "ssl_check_hostname=yes", "ssl_check_hostname=2", "protocol=3", "x"]


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), userinfo=st.sampled_from(["", ":pw@", "u:pw@", "u@"]),
       host=st.sampled_from(HOSTS), path=st.sampled_from(PATHS),
       query=st.lists(st.sampled_from(QUERY), max_size=3))
def test_a_url_the_loader_accepts_is_one_connect_opens(
    scheme: str, userinfo: str, host: str, path: str, query: list[str]
) -> None:
    if scheme == "unix":
        host, path = "", "/run/redis.sock"
    url = f"{scheme}://{userinfo}{host}{path}" + ("?" + "&".join(query) if query else "")
    try:
        accepted = load_store_url(url) == url
    except ConfigError:
        accepted = False
    try:
        connection = connect(url, timeout=0.1, max_connections=4)
    except StoreUrlError:
        assert not accepted, url
        return
    assert accepted, url
    assert isinstance(connection, RedisConnection)
    client = connection.client
    if isinstance(client, Redis):  # the db the loader read is the one the client selects
        assert client.connection_pool.connection_kwargs["db"] == parse_redis_url(url).db
