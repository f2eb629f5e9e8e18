"""What the Cyclone DDS tests share: a loopback-only configuration, a private domain, waiting."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOOPBACK_URI = (
    "<CycloneDDS><Domain><General><Interfaces>"
    '<NetworkInterface name="lo"/>'
    "</Interfaces></General></Domain></CycloneDDS>"
)
# Drawn from OS entropy on purpose: two test sessions on one machine must not share a domain.
DOMAIN = random.SystemRandom().randint(100, 200)


@contextmanager
def loopback_domain(domain: int = DOMAIN) -> Iterator[int]:
    """``CYCLONEDDS_URI`` (loopback only) and ``ROS_DOMAIN_ID`` set for this process (before its
    first participant) and its children; both restored afterwards."""
    keys = ("ROS_DOMAIN_ID", "CYCLONEDDS_URI")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ["CYCLONEDDS_URI"] = LOOPBACK_URI
    try:
        yield domain
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_until(predicate: Callable[[], object], timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
