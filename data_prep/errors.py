"""The one exception type for mistakes in the user's data or options, and warnings."""
import sys


class DataError(Exception):
  """A user-facing problem; the message is a single line naming the culprit.

  The CLI prints it as ``error: <message>`` and exits with status 2.
  """


def warn(message: str) -> None:
  """A one-line warning on stderr (something skipped or replaced that the user should know)."""
  print(f'warning: {message}', file=sys.stderr, flush=True)
