"""The AgentEnsemble codec against a real Jackson: every record our encoder
writes (Java requests decoded and written back, a Python caller's request,
strings Jackson must escape, responses) is read by a Java process into
records with the Java project's wire shape and written again by a plain
``ObjectMapper``; the bytes must come back unchanged. Needs ``javac`` and
Debian's ``libjackson2-databind-java`` (.ci/run installs it); skipped with
the reason where either is missing."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from tests.test_agentensemble_codec import JAVA_FULL, JAVA_MINIMAL, NOW, TRACEPARENT
from transport import WorkRequest, WorkResponse
from transport.interop import agentensemble as ae

HERE = Path(__file__).resolve().parent / "java"
JARS = [
    Path("/usr/share/java") / name
    for name in ("jackson-databind.jar", "jackson-core.jar", "jackson-annotations.jar")
]


def _cases() -> list[tuple[str, bytes]]:
    python_caller = WorkRequest(
        request_id="3f9a1c2e-7b4d-4e8f-9a6b-1c2d3e4f5a6b",
        task="prepare-meal",
        payload='Make pasta, "al dente"\n\u00e9\u4e2d\x01',
        priority=0,
        enqueued_at=NOW,
        deadline=NOW + timedelta(minutes=5, microseconds=250),
        headers={
            **ae.java_headers(
                "front-desk",
                delivery=("TOPIC", "agentensemble.replies"),
                cache_policy="FORCE_FRESH",
                cache_key="pasta",
                max_age=timedelta(seconds=1.5),
            ),
            "traceparent": TRACEPARENT,
        },
    )
    escapes = WorkRequest(
        request_id="r1",
        task="t",
        payload="\b\t\n\f\r\x1f\x7f/\u2028\U0001f345\\",
        headers=ae.java_headers("py"),
    )
    low = WorkRequest(request_id="r2", task="t", priority=9, headers=ae.java_headers("py"))
    return [
        ("request", ae.encode_request(ae.decode_request(JAVA_FULL, now=NOW))),
        ("request", ae.encode_request(ae.decode_request(JAVA_MINIMAL, now=NOW))),
        ("request", ae.encode_request(python_caller)),
        ("request", ae.encode_request(escapes)),
        ("request", ae.encode_request(low)),
        ("response", ae.encode_response(WorkResponse(request_id="q", result="ok", duration_ms=25))),
        (
            "response",
            ae.encode_response(WorkResponse(request_id="q2", status="failed", error="x\u00e9\n")),
        ),
        ("response", ae.encode_response(WorkResponse(request_id="q3", result={"n": [1, 2]}))),
    ]


@pytest.fixture(scope="module")
def jackson(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        pytest.skip("no JDK (javac) on this machine")
    missing = [str(jar) for jar in JARS if not jar.exists()]
    if missing:
        pytest.skip(f"Jackson not installed (apt-get install libjackson2-databind-java): {missing}")
    out = tmp_path_factory.mktemp("jackson")
    classpath = ":".join(str(jar) for jar in JARS)
    subprocess.run(
        [javac, "-d", str(out), "-cp", classpath, str(HERE / "JacksonRoundTrip.java")],
        check=True,
        timeout=120,
    )
    return [java, "-cp", f"{out}:{classpath}", "JacksonRoundTrip"]


def test_jackson_writes_back_exactly_what_the_codec_wrote(jackson: list[str]) -> None:
    cases = _cases()
    stdin = b"".join(kind.encode() + b"\t" + body + b"\n" for kind, body in cases)
    result = subprocess.run(jackson, input=stdin, capture_output=True, timeout=120, check=True)
    written = result.stdout.splitlines()
    assert len(written) == len(cases), result.stderr.decode(errors="replace")
    for (kind, ours), theirs in zip(cases, written, strict=True):
        assert theirs == ours, f"{kind}: Jackson wrote\n{theirs!r}\nthe codec wrote\n{ours!r}"
