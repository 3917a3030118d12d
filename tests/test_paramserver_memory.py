"""The shard's heap tuning: freed message buffers are reused instead of being mapped afresh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.paramserver.memory import keep_freed_memory

REPO = Path(__file__).resolve().parent.parent

# Frames a streamed answer 8 times, as a shard does (16 messages of 4 MiB alive together, then all freed), and
# reports the page faults of the last 6, first with glibc's defaults, then after keep_freed_memory: in a
# child process, so that the tuning stays there.
CHILD = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from services.paramserver.memory import keep_freed_memory
payload = bytearray(4 << 20)
def faults():
    for i in range(8):
        if i == 2:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        messages = [b"".join([b"head", payload]) for _ in range(16)]  # new 4 MiB bytes objects, written in full
        del messages
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
kept = keep_freed_memory(256)
print(json.dumps({{"before": before, "kept": kept, "after": faults()}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is tuned")
def test_freed_message_buffers_are_reused_after_tuning() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=str(REPO))], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout)
    assert result["kept"] is True
    pages = 6 * 16 * 1024  # 6 answers of 16 messages of 1,024 pages of 4 KiB
    assert result["before"] >= pages // 2  # glibc returned the freed 64 MiB to the OS: fresh pages, each faulted
    assert result["after"] < pages // 50  # the same heap memory again: next to no faults


def test_nothing_is_tuned_when_disabled() -> None:
    assert keep_freed_memory(0) is False
