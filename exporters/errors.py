"""Error type shared by every sglp-edge package (standard library only: runs on the board too).

Raise :class:`UserError` for anything the user can fix (bad path, unsupported option, missing
package). The CLI prints it as one line ``error: <message>`` and exits non-zero; the message
should name the fix.
"""


class UserError(Exception):
    """A problem the user can fix; the message says how."""
