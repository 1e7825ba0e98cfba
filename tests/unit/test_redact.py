"""`redact` (gateway/config/settings.py): no credential in a URL (a store password, a token as
the user name, an upstream `?api_key=`) reaches `check-config`, the startup summary, config error
messages or logs, whatever its characters and wherever the URL carries it."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.loader import ConfigError, load_config_text
from gateway.config.store_url import redact
from gateway.config.summary import summarize

# Around every generated password: neither may survive redaction (nor anything between them).
HEAD, TAIL = "QZX", "XZQ"
HOSTS = ["127.0.0.1:6379", "redis.internal", "h1:26379,h2:26379", "[::1]:6380"]
PASSWORD_PARAMETERS = ["password", "sentinel_password", "sentinel%5Fpassword", "PASSWORD", "Sentinel_Password"]
# Printable ASCII but space: what a password in a YAML string can hold, `@ / ? # & = % :` included.
RAW = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=16)


def _secret(middle: str, encode: bool) -> str:
    password = HEAD + middle + TAIL
    return quote(password, safe="") if encode else password


@given(
    scheme=st.sampled_from(["redis", "rediss", "redis+sentinel", "redis+cluster"]),
    user=st.sampled_from(["", "default", "gw"]),
    host=st.sampled_from(HOSTS),
    # Known limit: a raw `?x=` or `&x=` inside a userinfo password reads as the query's start.
    middle=RAW.filter(lambda text: not re.search(r"[?&][^?&=]*=", text)),
    encode=st.booleans(),
    query=st.sampled_from(["", "?db=1", "?sentinel_username=ops@corp&db=2"]),
)
def test_the_userinfo_password_is_masked_up_to_its_last_at(
    scheme: str, user: str, host: str, middle: str, encode: bool, query: str
) -> None:
    url = f"{scheme}://{user}:{_secret(middle, encode)}@{host}/0{query}"
    shown = redact(url)
    assert HEAD not in shown and TAIL not in shown, shown
    assert shown == f"{scheme}://{user}:***@{host}/0{query}"


@given(
    name=st.sampled_from(PASSWORD_PARAMETERS),
    # Known limit: a raw `&x=` inside a query password reads as the next parameter.
    middle=RAW.filter(lambda text: not re.search(r"&[^&=]*=", text)),
    encode=st.booleans(),
    before=st.sampled_from(["", "db=1&"]),
    after=st.sampled_from(["", "&db=1", "&service_name=mymaster"]),
    userinfo=st.sampled_from(["", ":QZXuserinfoXZQ@", "gw:QZX@XZQ@"]),
)
def test_every_password_parameter_is_masked(
    name: str, middle: str, encode: bool, before: str, after: str, userinfo: str
) -> None:
    url = f"redis+sentinel://{userinfo}h1:26379/mymaster?{before}{name}={_secret(middle, encode)}{after}"
    shown = redact(url)
    assert HEAD not in shown and TAIL not in shown, shown
    assert f"{name}=***{after}" in shown and "h1:26379/mymaster" in shown


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:p@ssw0rdSecret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),  # masked only to the first @
    ("redis+sentinel://:pw@h:26379/m?sentinel_password=SentSecret", "redis+sentinel://:***@h:26379/m?sentinel_password=***"),
    ("redis://:pa/ss@host/0", "redis://:***@host/0"),  # unparsable: printed in the error message
    ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("unix:///run/a@b.sock?password=pw", "unix:///run/a@b.sock?password=***"),  # an @ in a path is no userinfo
    ("redis://gw@host:6379", "redis://***@host:6379"),  # a userinfo without `:` may be a token: masked
    ("https://ghp_T0KEN@api.example.com/v1", "https://***@api.example.com/v1"),
    ("https://api.example.com/v1/a@b", "https://api.example.com/v1/a@b"),  # an @ in a path is no userinfo
    ("https://h/?api_key=K&page=2&Token=T&X-Amz-Signature=S&sig=G", "https://h/?api_key=***&page=2&Token=***&X-Amz-Signature=***&sig=***"),
    ("https://h/?apikey=K&auth=A&secret=S&pwd=P&pass=P&key=K", "https://h/?apikey=***&auth=***&secret=***&pwd=***&pass=***&key=***"),
    ("https://h/#access_token=T", "https://h/#access_token=***"),  # a fragment's parameters too
    ("redis+sentinel://h/m?service_name=m&db=2&client_name=gw", "redis+sentinel://h/m?service_name=m&db=2&client_name=gw"),
    ("redis:pw@host", "redis:***@host"),  # no `//`: still a userinfo
    ("memory://", "memory://"),
])  # fmt: skip
def test_shapes(url: str, shown: str) -> None:
    assert redact(url) == shown


# Parameter names whose values are secrets, in any case, anywhere in the name.
SECRET_WORDS = ["password", "pass", "pwd", "token", "key", "apikey", "api_key", "secret", "auth", "signature", "sig"]


@given(
    word=st.sampled_from(SECRET_WORDS),
    case=st.sampled_from([str.lower, str.upper, str.title]),
    prefix=st.sampled_from(["", "x_", "access_", "X-Amz-"]),
    middle=RAW.filter(lambda text: not re.search(r"&[^&=]*=", text)),
    encode=st.booleans(),
    after=st.sampled_from(["", "&page=2"]),
)
def test_every_secret_looking_parameter_is_masked(
    word: str, case: object, prefix: str, middle: str, encode: bool, after: str
) -> None:
    name = prefix + case(word)  # type: ignore[operator]
    url = f"https://api.example.com/v1?page=1&{name}={_secret(middle, encode)}{after}"
    shown = redact(url)
    assert HEAD not in shown and TAIL not in shown, shown
    assert shown == f"https://api.example.com/v1?page=1&{name}=***{after}"


@given(user=RAW.filter(lambda text: not re.search(r"[?&][^?&=]*=|[:/]", text)), encode=st.booleans())
def test_a_userinfo_without_a_colon_is_masked_whole(user: str, encode: bool) -> None:
    url = f"https://{_secret(user, encode)}@api.example.com/v1"
    assert redact(url) == "https://***@api.example.com/v1"


MINIMAL = """\
upstream: {url: "http://127.0.0.1:9000"}
keys: [{id: k, sha256: "%s", plan: p}]
plans: {p: {limits: {rpm: {rate: 10/1m}}}}
routes: [{path: "/**", limits: [rpm]}]
""" % ("0" * 64)


def test_the_summary_and_error_messages_show_no_password() -> None:
    config = load_config_text(MINIMAL + "store: {url: 'redis+sentinel://:p@ss1@h:26379/m?sentinel_password=s3nt'}\n",
                              "t.yaml")
    line = next(line for line in summarize(config).splitlines() if line.startswith("store "))
    assert "ss1" not in line and "s3nt" not in line and "h:26379/m" in line, line
    for url in ("rediss+sentinel://:p@ss1@h:26379/m?sentinel_password=s3nt", "redis://:p@ss1 s3nt@h/0"):
        with pytest.raises(ConfigError) as refused:
            load_config_text(MINIMAL + f"store: {{url: '{url}'}}\n", "t.yaml")
        message = str(refused.value)
        assert "store.url" in message and "ss1" not in message and "s3nt" not in message, message


UPSTREAM_SECRETS = {
    "https://apiuser:UPSECRET-4@api.example.com": "must not carry credentials",
    "https://UPSECRET-4@api.example.com": "must not carry credentials",
    "http://apiuser:UPSECRET-3@127.0.0.1:notaport": "is not a URL",
    "https://api.example.com/?api_key=UPSECRET-5": "must not have a query or fragment",
    "https://api.example.com/v1?page=UPSECRET-5": "must not have a query or fragment",  # no value is echoed
    "https://api.example.com/v1#UPSECRET-5": "must not have a query or fragment",
    "ftp://u:UPSECRET-6@files.example.com": "must start with http:// or https://",
}


@pytest.mark.parametrize(("url", "problem"), UPSTREAM_SECRETS.items(), ids=list(UPSTREAM_SECRETS))
def test_upstream_url_refusals_show_no_credential(url: str, problem: str) -> None:
    text = MINIMAL.replace("http://127.0.0.1:9000", url)
    with pytest.raises(ConfigError) as refused:
        load_config_text(text, "t.yaml")
    message = str(refused.value)
    assert message.startswith("t.yaml:1: upstream.url: ") and problem in message, message
    assert "UPSECRET" not in message, message


def test_a_refused_memory_url_shows_no_password() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config_text(MINIMAL + "store: {url: 'memory://:REDISPW-2@redis:6379/0'}\n", "t.yaml")
    assert "REDISPW-2" not in str(refused.value) and "memory:// takes nothing" in str(refused.value)
