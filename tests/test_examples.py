"""Every example and every Python block of the README and docs/ runs as
written, as a user would run it: a script in a subprocess, configured only by
``TRANSPORT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._examples import (
    DOCUMENTS,
    DONE,
    EXAMPLES,
    DocBlock,
    doc_blocks,
    run_doc_blocks,
    run_example,
)

ALL_BLOCKS = [block for doc in DOCUMENTS for block in doc_blocks(doc)]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("url", [None, "memory://"])
def test_example_runs(example: Path, url: str | None, tmp_path: Path) -> None:
    result = run_example(example, tmp_path, **({"url": url} if url else {}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert DONE in result.stdout


def test_the_documents_have_python_blocks() -> None:
    # The extraction itself can fail: an empty list would pass everything below.
    assert len(ALL_BLOCKS) >= 6, [b.id for b in ALL_BLOCKS]
    assert any(b.background for b in ALL_BLOCKS), "the two-process Ensemble form is missing"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_every_block_is_a_script(block: DocBlock) -> None:
    # A top-level `await` is a SyntaxError in a script; so is a fragment.
    compile(block.code, block.id, "exec")
    assert (
        block.compile_only
        or block.broker
        or "asyncio.run(" in block.code
        or ("await" not in block.code)
    ), f"{block.id}: async code without asyncio.run(...) cannot run as a script"


@pytest.mark.parametrize(
    "doc",
    [d for d in DOCUMENTS if any(not (b.broker or b.compile_only) for b in doc_blocks(d))],
    ids=lambda d: d.name,
)
def test_blocks_run_as_written_on_the_embedded_default(doc: Path, tmp_path: Path) -> None:
    blocks = [b for b in doc_blocks(doc) if not (b.broker or b.compile_only)]
    outputs = run_doc_blocks(blocks, tmp_path)
    if doc.name == "README.md":
        joined = "".join(outputs)
        assert "completed {'served': 'soup'}" in joined, joined
        assert "{'dish': 'soup', 'price': 4.5}" in joined, joined
