"""The atproto identifier syntaxes, from the spec texts, and the calls that use them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from anisota_agent import Agent
from anisota_agent.syntax import is_did, is_handle, is_nsid, is_record_key, is_record_uri

GOOD_DIDS = [
    "did:plc:z72i7hdynmk6r22z27h6tvur",
    "did:web:blueskyweb.xyz",
    "did:web:localhost%3A1234",  # a port, percent-encoded
    "did:method:val:two",  # colons inside the identifier
    "did:m:v",
    "did:method:-:_:.",
    "did:key:zQ3shZc2QzApp2oymGvQbzP8eKheVshBHbU4ZYjeXqwSKEn6N",
    "did:plc:" + "a" * (2048 - 8),  # the 2 KB limit
]
BAD_DIDS = [
    "did:method:val:",  # ends in ':'
    "did:method:val%",  # a '%' must start an escape
    "did:method:val%3",  # ... of two hex digits
    "did:method:val%zz",
    "did:m123:val",  # the method is lowercase letters only
    "did:METHOD:val",
    "DID:method:val",
    "did:method:val/two",  # a path is a DID URL's, not a DID's
    "did:method:val?two",  # so are a query
    "did:method:val#two",  # and a fragment
    "did:method:",
    "did::val",
    "did:method",
    "did:method:v al",
    "did:method:vél",  # ASCII only
    "plc:z72i7hdynmk6r22z27h6tvur",
    "did:plc:" + "a" * (2049 - 8),
]

GOOD_HANDLES = [
    "alice.bsky.social",
    "jay.bsky.team",
    "xn--ls8h.test",  # punycode
    "a.co",
    "8.cn",  # only the TLD may not start with a digit
    "ALICE.Example.COM",
    "sub-domain.example-1.org",
    ("a" * 63 + ".") * 3 + "b" * 61,  # 253 characters
]
BAD_HANDLES = [
    "name",  # one label
    "alice.bsky.social.",
    ".alice.bsky.social",
    "alice..social",
    "-alice.example.com",
    "alice-.example.com",
    "alice.example.1com",  # a TLD starting with a digit
    "al ice.example.com",
    "al_ice.example.com",
    "alíce.example.com",
    "a" * 64 + ".com",  # a label over 63
    ("a" * 63 + ".") * 3 + "b" * 62,  # 254 characters
]

GOOD_NSIDS = [
    "net.anisota.beta.game.session",
    "com.atproto.repo.createRecord",
    "app.bsky.feed.post",
    "com.example.fooBar",
    "com.example.f00",
    "net.users.bob.ping",
    "a-0.b-1.c",
    "cn.8.lex.stuff",
]
BAD_NSIDS = [
    "com.example",  # two segments
    "com.example.3",  # the name starts with a letter
    "com.example.foo-bar",  # the name has no hyphen
    "com.example.foo.",
    ".com.example.foo",
    "com..foo",
    "com.-example.foo",
    "1com.example.foo",  # the TLD
    "com.example.foo bar",
    "com.exa💩ple.thing",
    "com.example.foo#main",
    "com." + "a" * 64 + ".foo",
]

GOOD_RKEYS = [
    "3jui7kd54zh2y",
    "self",
    "example.com",
    "~1.2-3_",
    "dHJ1ZQ",
    ":",
    "pre:fix",
    "a" * 512,
]
BAD_RKEYS = [
    ".",
    "..",
    "",
    "alpha/beta",
    "@handle",
    "any space",
    "any+space",
    "number[3]",
    "#extra",
]
BAD_RKEYS += ["a" * 513, "é"]

DID = "did:plc:z72i7hdynmk6r22z27h6tvur"
LOG = "net.anisota.beta.game.log"
GOOD_URIS = [
    f"at://{DID}/{LOG}/3jui7kd54zh2y",
    f"at://alice.bsky.social/{LOG}/3jui7kd54zh2y",
    f"at://{DID}/net.anisota.beta.game.progress/self",
    "at://did:web:localhost%3A2583/app.bsky.feed.post/a:b",
]
BAD_URIS = [
    "at://name",  # not a handle, and no record
    f"at:///{DID}/{LOG}/3k",  # an empty authority
    "at://did:plc:/" + LOG + "/3k",  # an unfinished DID
    f"at://{DID}",  # a repository, not a record
    f"at://{DID}/{LOG}",  # a collection, not a record
    f"at://{DID}/{LOG}/",
    f"at://{DID}/{LOG}/3k#frag",  # no fragment
    f"at://{DID}/{LOG}/3k?x=1",  # no query
    f"at://{DID}//{LOG}/3k",  # '//' in the path
    f"at://{DID}/{LOG}/3k/extra",
    f"at://{DID}/{LOG}/.",  # rkeys '.' and '..'
    f"at://{DID}/{LOG}/..",
    f"at://{DID}/not-an-nsid/3k",
    f"at://{DID}/{LOG}/with space",
    f"AT://{DID}/{LOG}/3k",
    f"https://bsky.app/{LOG}/3k",
]


@pytest.mark.parametrize("did", GOOD_DIDS)
def test_valid_dids(did: str) -> None:
    assert is_did(did)


@pytest.mark.parametrize("did", BAD_DIDS)
def test_invalid_dids(did: str) -> None:
    assert not is_did(did)


@pytest.mark.parametrize("handle", GOOD_HANDLES)
def test_valid_handles(handle: str) -> None:
    assert is_handle(handle)


@pytest.mark.parametrize("handle", BAD_HANDLES)
def test_invalid_handles(handle: str) -> None:
    assert not is_handle(handle)


@pytest.mark.parametrize("nsid", GOOD_NSIDS)
def test_valid_nsids(nsid: str) -> None:
    assert is_nsid(nsid)


@pytest.mark.parametrize("nsid", BAD_NSIDS)
def test_invalid_nsids(nsid: str) -> None:
    assert not is_nsid(nsid)


@pytest.mark.parametrize("rkey", GOOD_RKEYS)
def test_valid_record_keys(rkey: str) -> None:
    assert is_record_key(rkey)


@pytest.mark.parametrize("rkey", BAD_RKEYS)
def test_invalid_record_keys(rkey: str) -> None:
    assert not is_record_key(rkey)


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_valid_record_uris(uri: str) -> None:
    assert is_record_uri(uri)


@pytest.mark.parametrize("uri", BAD_URIS)
def test_invalid_record_uris(uri: str) -> None:
    assert not is_record_uri(uri)


def test_the_calls_take_the_valid_ones_and_refuse_the_others(tmp_path: Path) -> None:
    """link_log/link_progress and use_auth check to the same syntax, at the call."""
    agent = Agent("1.0", data_dir=tmp_path).start()
    agent.start_session()
    for uri in GOOD_URIS:
        agent.link_log(uri)
        agent.link_progress(uri)
    for uri in BAD_URIS:
        with pytest.raises(ValueError, match="uri must be a record's at-uri"):
            agent.link_log(uri)
        with pytest.raises(ValueError, match="uri must be a record's at-uri"):
            agent.link_progress(uri)
    for did in BAD_DIDS:
        with pytest.raises(ValueError, match="did"):
            agent.use_auth(httpx.Auth(), did=did, pds_url="http://127.0.0.1:9")
    assert agent.status().dropped["refused_calls"] == 2 * len(BAD_URIS) + len(BAD_DIDS)
    agent.use_auth(httpx.Auth(), did=GOOD_DIDS[0], pds_url="http://127.0.0.1:9")
    agent.close()
