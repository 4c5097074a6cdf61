"""Object pulls that notice an object as soon as its upload finishes (Flower 1.42's backoff shortened).

Flower 1.42 moves every message as a tree of objects (the message, its records, every array and
its chunks: about 170 objects for the demo model). The sender first registers the tree, then
uploads the objects one by one; a receiver that asks for an object whose upload has not finished
gets "unavailable" and waits before asking again: 1 s, then 2, 4 and 8 s (``PULL_INITIAL_BACKOFF``
= 1 s doubling up to ``PULL_BACKOFF_CAP`` = 10 s; ``flwr.supercore.inflatable.inflatable_utils
.pull_objects``). Each hop of a round meets that race: the SuperNode pulls a train message that
the ServerApp is still uploading, the resident runtime pulls it from the SuperNode the moment the
task exists (before the SuperNode has stored its objects), and the ServerApp, polling for replies
every 0.05 s, pulls a reply that the SuperNode is still uploading. An upload that takes 50 ms on
loopback then costs 1 + 2 + 4 + 8 = 15 s of waiting (measured: "served train in 16.8 s" for
1.8 s of training).

:func:`fast_object_pulls` makes the first retry come after ``INITIAL_BACKOFF_S`` (doubling up to
``BACKOFF_CAP_S``) in the calling process, keeping Flower's overall patience (``max_time``, and as
many seconds of retries per object: more tries of shorter waits). Called by the resident site
runtime, the tuned SuperNode, the ServerApp and the resident runtime's fallback ``flwr-clientapp``
(:mod:`umeml.flower.clientapp_main`); Flower's own ``flwr-clientapp`` of a site started with
``--runtime per-message`` keeps Flower's backoff, and so does every process whose environment has
``UMEML_PULL_BACKOFF=flower`` (the benchmark's stock-Flower baseline). Relies on the keyword
defaults of two Flower 1.42 functions (:func:`umeml.flower.pins.pull_problems`;
tests/test_flower_pins.py fails when they move).
"""

from __future__ import annotations

import os

ENV = "UMEML_PULL_BACKOFF"  # "flower": keep Flower's own backoff in this process
INITIAL_BACKOFF_S = 0.01
BACKOFF_CAP_S = 0.1
FLOWER_BACKOFF_CAP_S = 10  # PULL_BACKOFF_CAP in Flower 1.42
FLOWER_TRIES = 500  # PULL_MAX_TRIES_PER_OBJECT in Flower 1.42
# as many seconds of retries per object as Flower allows (500 tries at its 10 s cap), in shorter waits
TRIES = int(FLOWER_TRIES * FLOWER_BACKOFF_CAP_S / BACKOFF_CAP_S)
KEYS = ("initial_backoff", "backoff_cap", "max_tries_per_object")


def pulling_functions() -> list:
    """Flower's two object-pull functions whose keyword defaults every pull of a message uses:
    ``pull_objects`` (the SuperNode, the ServerApp's grid) and ``pull_and_inflate_object_from_tree``
    (a ClientApp pulling its message), which passes its own defaults on to ``pull_objects``."""
    from flwr.supercore.inflatable import inflatable_utils

    return [inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree]


def fast_object_pulls(message_max_time: float | None = None, *, version_checked: bool = False) -> list[str]:
    """Shorten the pull backoff in this process; returns why it was not done (empty: done).
    ``message_max_time``: give up pulling a ClientApp's message after that many seconds (the
    resident runtime, which serves one message at a time: a message whose objects never reach
    the SuperNode, its SuperLink having died mid-pull, blocked every later message; Flower's own
    process per message waits up to 2 h, blocking nothing else). ``version_checked``: the caller
    has just found the installed Flower to be the pinned minor version (the resident runtime's
    :func:`umeml.flower.pins.contract_problems`); only the pull details are checked then."""
    from umeml.flower.pins import problems as pin_problems
    from umeml.flower.pins import pull_problems

    if os.environ.get(ENV) == "flower":
        return [f"{ENV}=flower asks for Flower's own backoff"]
    problems = pull_problems() if version_checked else pin_problems(pull_problems)
    if problems:
        return problems
    pull, pull_tree = pulling_functions()
    for fn in (pull, pull_tree):
        fn.__kwdefaults__.update(initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S,
                                 max_tries_per_object=TRIES)
    if message_max_time is not None:
        pull_tree.__kwdefaults__["max_time"] = message_max_time
    return []
