"""What every SCPI instrument says the same way, for the real-I/O drivers.

``SYST:ERR?`` answers one entry of the instrument's error queue as
``<code>,"<message>"`` (IEEE 488.2 / SCPI-99: code 0 is "No error", negative
codes are the standard classes -1xx command, -2xx execution, -3xx device,
-4xx query; positive codes are the instrument's own), with a double quote
inside the message doubled.  Each driver maps a bad entry to its own typed
error naming device and command.
"""

from __future__ import annotations

import re

# ASCII digits, at most 18: int() takes other scripts' digits and refuses over 4300 digits
# with a message that names neither the answer nor the field.
_ENTRY = re.compile(r'([+-]?[0-9]{1,18}),"(.*)"')


def parse_error_entry(text: str) -> tuple[int, str]:
    """``(code, message)`` of a ``SYST:ERR?`` answer; :class:`ValueError` if it is none."""
    match = _ENTRY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'{text[:60]!r} is not <code>,"<message>"')
    return int(match.group(1)), match.group(2).replace('""', '"')
