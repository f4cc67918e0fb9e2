"""Errors: interrupts deferred to the end of a critical section, and where a raised
exception would be lost."""

from __future__ import annotations

import os
import signal

import pytest

from metatrain.cli import _signals_raise
from metatrain.errors import critical_section, raised_here_is_lost


def test_an_interrupt_inside_a_critical_section_is_raised_at_its_end():
    previous = _signals_raise()
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with critical_section():
                steps.append("first")
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between these bytecodes, and defers
                    pass
                steps.append("second")
        assert steps == ["first", "second"]
        with critical_section():  # nothing is left over for the next one
            steps.append("third")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_raise_inside_a_destructor_or_a_gc_callback_counts_as_lost():
    seen = []

    class Probe:
        def __del__(self):
            seen.append(raised_here_is_lost(__import__("sys")._getframe()))

    Probe()
    assert seen == [True]
    assert not raised_here_is_lost(__import__("sys")._getframe())
