"""Error types shared by every sglp-edge package (standard library only: runs on the board too).

Raise :class:`UserError` for anything the user can fix in their input (bad path, unsupported
option, missing package): the CLI prints it as one line ``error: <message>`` and exits 2. Raise
:class:`EnvironmentFault` for what the input did not cause (out of disk, a board that stopped
answering, a device that is not there): one line, exit 4. The message names the fix either way.
"""

import errno

#: exit status: 0 done, 1 a constraint not met, 2 the user's input, 3 finish on the board,
#: 4 the environment (disk full, board gone, device missing), 5 an internal error, 130 interrupted
EXIT_USER = 2
EXIT_ENVIRONMENT = 4
EXIT_INTERNAL = 5

#: OSError numbers that mean "the environment", not "your input"
ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class EnvironmentFault(UserError):
    """A problem of the machine, the disk or a board, not of the input; exit status 4."""


def exit_code(e: BaseException) -> int:
    return EXIT_ENVIRONMENT if isinstance(e, EnvironmentFault) else EXIT_USER


def describe_os_error(e: OSError) -> "tuple[str, int] | None":
    """One line and an exit status for an OSError a user can act on, None for anything else."""
    where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"out of disk space{where}; free space there or choose another --out (nothing half-written "
                "was kept)", EXIT_ENVIRONMENT)
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; choose a writable --out", EXIT_ENVIRONMENT
    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO):
        return f"{e.strerror or type(e).__name__}{where}; the machine ran out of a resource: retry with fewer " \
               "--threads or after other jobs end", EXIT_ENVIRONMENT
    if e.errno == errno.ENAMETOOLONG:
        return f"file name too long: {e.filename}; choose a shorter path", EXIT_USER
    if e.errno == errno.ELOOP:
        return f"symbolic link loop at {e.filename}; choose a real folder", EXIT_USER
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {e.filename}; choose a path you can write to", EXIT_USER
    if e.errno == errno.EISDIR:
        return f"{e.filename} is a folder; give a file path", EXIT_USER
    if e.errno == errno.ENOTDIR:
        return f"{e.filename}: a part of this path is a file, not a folder; fix the path", EXIT_USER
    return None
