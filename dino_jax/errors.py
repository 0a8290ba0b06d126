"""The one base class of the errors a user sees as a single `error: ...` line.

Every error that stops a command because of something the user can fix (a config field, a data
source, a weights file, a checkpoint that does not fit, a diverged or collapsed run) subclasses
DinoJaxError as well as the built-in type it always had (ValueError, OSError ...), so the
command-line entry points catch it once and print one line, and older `except ValueError`
clauses keep working.
"""


class DinoJaxError(Exception):
  """A user-facing problem reported in one line: the message names what is wrong (a field, a
  file, a step) and, where there is one, what to do about it; no traceback is shown."""


def error_line(e: BaseException, limit: int = 200) -> str:
  """`TypeName: first line of the message` (at most `limit` characters of it), or the type's
  name alone for an empty message: how another library's error is quoted inside ours."""
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:limit]}' if text else type(e).__name__
