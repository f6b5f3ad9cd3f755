"""The one exception type for mistakes in the user's data or options."""


class DataError(Exception):
  """A user-facing problem; the message is a single line naming the culprit.

  The CLI prints it as ``error: <message>`` and exits with status 2.
  """
