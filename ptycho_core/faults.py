"""Fault-injection pause points, for the reliability tests.

``PTYFLOW_FAULT_PAUSE=stage:seconds`` makes every ``pause_point(stage)`` announce itself on stderr
and sleep, so a test can kill the process inside that stage (``checkpoint_write``, ``preprocess``,
``export``). Unset (always, outside those tests) it costs one environment lookup.
"""

from __future__ import annotations

import os
import sys
import time


def pause_point(stage: str) -> None:
    setting = os.environ.get("PTYFLOW_FAULT_PAUSE")
    if not setting:
        return
    name, _, seconds = setting.partition(":")
    if name == stage:
        print(f"fault-pause: {stage}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 0.5))
