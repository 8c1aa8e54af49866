"""The one exception hierarchy: the tree in ``imdsguard.errors``'s docstring is the real one."""

from __future__ import annotations

import inspect
import re

from imdsguard import errors
from imdsguard.imds import ImdsRequestError


def _drawn() -> dict[str, str]:
    """Each class in the docstring's tree, with the class it is drawn under."""
    doc = errors.__doc__ or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        found = re.match(r"^(\s*(?:[│ ]   )*)(?:[├└]── )?([A-Z]\w+Error)\b", line)
        if not found or not line.startswith("    "):
            continue
        depth = found.start(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[found.group(2)] = stack[-1][1]
        stack.append((depth, found.group(2)))
    return parents


def test_docstring_draws_every_class_under_its_real_parent() -> None:
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.ImdsGuardError)
    }
    classes[ImdsRequestError.__name__] = ImdsRequestError
    drawn = _drawn()
    assert set(drawn) | {"ImdsGuardError"} == set(classes)
    for name, parent in drawn.items():
        assert classes[name].__bases__[0] is classes[parent], name


def test_old_import_places_still_work() -> None:
    from imdsguard.broker._http import HttpError
    from imdsguard.events.log import EventLogError
    from imdsguard.events.nfqueue import CaptureError, QueueBusyError
    from imdsguard.events.packet import PacketError
    from imdsguard.firewall._xt_blob import BlobError

    for cls in (HttpError, EventLogError, CaptureError, QueueBusyError, PacketError, BlobError):
        assert cls is getattr(errors, cls.__name__)
        assert issubclass(cls, errors.ImdsGuardError)
    # What callers catch them as, beside the hierarchy.
    assert issubclass(BlobError, OSError) and issubclass(EventLogError, OSError)
    assert issubclass(PacketError, ValueError)
    assert BlobError(11, "x").errno == 11
