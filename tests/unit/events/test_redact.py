"""Redaction of command lines: a corpus of real tools' command lines, and generated ones."""

from __future__ import annotations

import base64
import os
import shlex
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imdsguard.events.redact import REDACTED, redact_args

EXAMPLES = int(os.environ.get("IMDSGUARD_FUZZ_EXAMPLES", "300"))

# Shaped like the real thing (AWS documentation's example key, a simulator-like token).
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # noqa: S105 - fakes, all of them
ACCESS_KEY_ID = "ASIAIOSFODNN7EXAMPLE"
IMDS_TOKEN = "AQAEAGGZ2MR0CD8t-JCgQjuSq4VBtH0hX1P0dS3sgQ1l3yrBxW-Ifg=="  # noqa: S105
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr" + base64.b64encode(bytes(range(200))).decode()
PASSWORD = "hunter2"  # noqa: S105
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
SECRETS = (SECRET_KEY, ACCESS_KEY_ID, IMDS_TOKEN, SESSION_TOKEN, PASSWORD, JWT)
IMDS = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"

#: Real command lines, as the tools are used (argv as the kernel has it).
CORPUS: list[list[str]] = [
    ["curl", "-s", "-H", f"X-aws-ec2-metadata-token: {IMDS_TOKEN}", IMDS],
    ["curl", "-sf", "--header", f"X-aws-ec2-metadata-token:{IMDS_TOKEN}", IMDS],
    ["curl", f"-HX-aws-ec2-metadata-token: {IMDS_TOKEN}", IMDS],
    ["curl", "-H", f"Authorization: Bearer {JWT}", "https://api.example.com/"],
    ["curl", "-u", f"admin:{PASSWORD}", "https://example.com/"],
    ["curl", f"https://admin:{PASSWORD}@example.com/x"],
    ["wget", "-q", "-O", "-", f"--header=X-aws-ec2-metadata-token: {IMDS_TOKEN}", IMDS],
    ["wget", "--header", f"X-aws-ec2-metadata-token: {IMDS_TOKEN}", IMDS],
    ["aws", "configure", "set", "aws_secret_access_key", SECRET_KEY],
    ["aws", "configure", "set", "aws_session_token", SESSION_TOKEN, "--profile", "x"],
    ["aws", "configure", "set", "default.aws_secret_access_key", SECRET_KEY],
    ["aws", "configure", "set", "aws_access_key_id", ACCESS_KEY_ID],
    ["env", f"AWS_SECRET_ACCESS_KEY={SECRET_KEY}", f"AWS_SESSION_TOKEN={SESSION_TOKEN}", "aws"],
    [
        "sh",
        "-c",
        f"curl -s -H 'X-aws-ec2-metadata-token: {IMDS_TOKEN}' {IMDS} > /tmp/creds",
    ],
    ["sh", "-c", f'curl -H "X-aws-ec2-metadata-token: {IMDS_TOKEN}" {IMDS}'],
    ["bash", "-c", f"export AWS_SECRET_ACCESS_KEY={SECRET_KEY}; aws s3 ls"],
    ["bash", "-lc", f"echo token: {IMDS_TOKEN} | tee /dev/null"],
    ["sh", "-c", f"mysql -uroot -p{PASSWORD} -h db app < dump.sql"],
    ["sh", "-c", f"sshpass -p '{PASSWORD}' ssh deploy@host uptime"],
    ["mysql", "-u", "root", f"-p{PASSWORD}", "-h", "db.internal", "app"],
    ["mysql", f"--password={PASSWORD}", "app"],
    ["mysql", "--password", PASSWORD, "app"],
    ["mysqldump", "-p", PASSWORD, "app"],
    ["sshpass", "-p", PASSWORD, "ssh", "host"],
    ["vault", "login", "-t", IMDS_TOKEN],
    ["psql", f"postgresql://app:{PASSWORD}@db/app"],
    [
        "python3",
        "-c",
        f"import boto3; boto3.client('s3', aws_access_key_id='{ACCESS_KEY_ID}', "
        f"aws_secret_access_key='{SECRET_KEY}')",
    ],
    ["echo", f'{{"AccessKeyId":"{ACCESS_KEY_ID}","SecretAccessKey":"{SECRET_KEY}"}}'],
    ["printf", "%s", f'{{"Token": "{SESSION_TOKEN}"}}'],
    ["myapp", "--db-password", PASSWORD, "--api-key", IMDS_TOKEN, "--verbose"],
    ["myapp", f"--client-secret={PASSWORD}", f"-password={PASSWORD}"],
    ["java", f"-Djavax.net.ssl.trustStorePassword={PASSWORD}", "-jar", "app.jar"],
    ["app", "--session-token", SESSION_TOKEN],
    ["app", SESSION_TOKEN],  # shape alone
    ["app", f"key={SECRET_KEY}"],
    ["app", f"--url=http://x/?id=1&token={IMDS_TOKEN}&y=2"],
]

#: Command lines that hold no secret: nothing changes.
HARMLESS: list[list[str]] = [
    [
        "curl",
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 21600",
        "http://169.254.169.254/latest/api/token",
    ],
    ["curl", "-s", "http://169.254.169.254/latest/meta-data/instance-id"],
    ["python3", "-c", "import socket; socket.create_connection(('169.254.169.254', 80))"],
    ["git", "checkout", "3f2a9c1e0b7d4e5f6a8b9c0d1e2f3a4b5c6d7e8f"],
    ["/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "-Xmx512m", "-jar", "/opt/app/app.jar"],
    ["aws", "s3", "cp", "s3://my-bucket/some/key.tar.gz", "/var/tmp/", "--region", "eu-west-1"],
    ["ssh", "-o", "StrictHostKeyChecking=no", "deploy@10.0.0.5", "uptime"],
    ["sh", "-c", "sleep 1; exec /usr/bin/env python3 /opt/app/run.py --workers 4"],
    ["wget", "--tries=3", "--timeout=5", "http://169.254.169.254/latest/dynamic/"],
    ["node", "/srv/app/node_modules/some-package-name-with-many-words/index.js"],
]


def _leaks(argv: list[str]) -> list[str]:
    joined = "\0".join(redact_args(argv))
    return [s for s in SECRETS if s in joined]


@pytest.mark.parametrize("argv", CORPUS, ids=lambda a: shlex.join(a)[:60])
def test_no_secret_of_the_corpus_survives(argv: list[str]) -> None:
    out = redact_args(argv)
    assert not _leaks(argv), out
    assert out[0] == argv[0]  # the program stays
    for before, after in zip(argv, out):
        if before.startswith("-") and "=" not in before and before[:2] not in ("-p", "-H"):
            assert after == before, (before, after)  # and so do its flags
    assert REDACTED in "\0".join(out)


@pytest.mark.parametrize("argv", HARMLESS, ids=lambda a: shlex.join(a)[:60])
def test_harmless_command_lines_are_left_alone(argv: list[str]) -> None:
    assert list(redact_args(argv)) == argv


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["mysql", "-phunter2", "db"], ["mysql", "-p[redacted]", "db"]),
        (["mysql", "-p", "-h", "db"], ["mysql", "-p", "-h", "db"]),  # -p alone: a prompt
        (["curl", "-u", "bob:pw", "x"], ["curl", "-u", "bob:[redacted]", "x"]),
        (["curl", "-u", "bob", "x"], ["curl", "-u", "bob", "x"]),
        (
            ["wget", "--header=X-aws-ec2-metadata-token: AQAE"],
            ["wget", "--header=X-aws-ec2-metadata-token: [redacted]"],
        ),
        (
            ["sh", "-c", "curl -H 'X-aws-ec2-metadata-token: abc' http://x/"],
            ["sh", "-c", "curl -H 'X-aws-ec2-metadata-token: [redacted]' http://x/"],
        ),
        (
            ["sh", "-c", "curl -H Authorization:Bearer\\ x http://x/ && echo ok"],
            None,  # checked for the secret only (quoting forces a re-join)
        ),
        (
            ["aws", "configure", "set", "aws_secret_access_key", "abc"],
            ["aws", "configure", "set", "aws_secret_access_key", "[redacted]"],
        ),
    ],
)
def test_spellings(argv: list[str], expected: list[str] | None) -> None:
    out = list(redact_args(argv))
    if expected is not None:
        assert out == expected
    assert "abc" not in "".join(out[1:]) or expected is None


# --- generated command lines --------------------------------------------------------

_B64 = string.ascii_letters + string.digits + "+/"


def _mixed(s: str) -> bool:
    return (
        any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)
    )


secret_keys = st.text(_B64, min_size=40, max_size=40).filter(_mixed)
key_ids = st.builds(
    lambda p, rest: p + rest,
    st.sampled_from(["AKIA", "ASIA", "AROA", "AIDA"]),
    st.text(string.ascii_uppercase + string.digits, min_size=16, max_size=16),
)
tokens = st.builds(
    lambda raw: base64.b64encode(raw).decode(),
    st.binary(min_size=40, max_size=600),
).filter(_mixed)
passwords = st.text(string.ascii_letters + string.digits + "!#%^*_+,.~", min_size=8, max_size=24)
any_secret = st.one_of(secret_keys, key_ids, tokens, passwords)
shaped_secret = st.one_of(secret_keys, key_ids, tokens)

harmless_words = st.sampled_from(
    [
        "-s",
        "-v",
        "--verbose",
        "-X",
        "GET",
        "--retry",
        "3",
        "http://169.254.169.254/latest/meta-data/",
        "/tmp/out.json",
        "--region",
        "us-east-1",
        "s3",
        "ls",
        "--output",
        "json",
    ]
)
programs = st.sampled_from(["curl", "wget", "aws", "/usr/bin/python3", "mysql", "myapp"])


def _keyed_forms(name: str, value: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from(
        [
            ["-H", f"{name}: {value}"],
            ["--header", f"{name}:{value}"],
            [f"--header={name}: {value}"],
            [f"{name}={value}"],
            ["sh", "-c", f"curl -H '{name}: {value}' http://x/"],
            ["bash", "-c", f'curl -H "{name}: {value}" http://x/ | jq .'],
            ["sh", "-c", f"export {name.replace('-', '_')}={value}; run"],
        ]
    )


header_names = st.sampled_from(
    [
        "X-aws-ec2-metadata-token",
        "x-aws-ec2-metadata-token",
        "Authorization",
        "X-Api-Key",
        "Cookie",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "SecretAccessKey",
    ]
)
option_forms = st.sampled_from(
    [
        lambda v: ["--password", v],
        lambda v: [f"--password={v}"],
        lambda v: ["-p", v],
        lambda v: [f"-p{v}"],
        lambda v: ["-t", v],
        lambda v: ["--aws-secret-access-key", v],
        lambda v: ["--token", v],
        lambda v: [f"--db-passwd={v}"],
        lambda v: ["configure", "set", "aws_secret_access_key", v],
        lambda v: ["configure", "set", "aws_session_token", v],
        lambda v: ["-u", f"user:{v}"],
        lambda v: [f"https://user:{v}@example.com/"],
        lambda v: ["sh", "-c", f"mysql -p{v} db"],
        lambda v: ["sh", "-c", f"app --password '{v}' && true"],
    ]
)


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], str, list[str]]:
    secret = draw(any_secret)
    kind = draw(st.sampled_from(["keyed", "option", "shape"]))
    if kind == "keyed":
        part = draw(_keyed_forms(draw(header_names), secret))
    elif kind == "option":
        part = draw(option_forms)(secret)
    else:
        secret = draw(shaped_secret)
        part = [draw(st.sampled_from(["{}", "x={}", "'{}'", "cred:{}", "{},rest"])).format(secret)]
    before = draw(st.lists(harmless_words, max_size=4))
    after = draw(st.lists(harmless_words, max_size=4))
    program = draw(programs)
    return [program, *before, *part, *after], secret, [program, *before]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_generated_secrets_never_survive(case: tuple[list[str], str, list[str]]) -> None:
    argv, secret, kept = case
    assume(secret not in REDACTED and not any(secret in w for w in kept))
    out = redact_args(argv)
    assert secret not in "\0".join(out), (argv, out)
    assert list(out[: len(kept)]) == kept  # program and the flags before it stay


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.text(max_size=200), max_size=12))
def test_any_input_gives_as_many_args_and_never_raises(argv: list[str]) -> None:
    out = redact_args(argv)
    assert len(out) == len(argv) and all(isinstance(a, str) for a in out)


@settings(max_examples=EXAMPLES, deadline=None)
@given(programs, st.lists(harmless_words, max_size=10))
def test_generated_harmless_command_lines_are_unchanged(program: str, words: list[str]) -> None:
    argv = [program, *words]
    assert list(redact_args(argv)) == argv
