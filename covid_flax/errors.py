"""The base of the errors that are the user's input at fault (a config field, a dataset file, a
checkpoint, a diverging run): entry points print them as one line, without a traceback."""


class UserError(Exception):
  """Its message names the thing at fault: file, field or value."""


class DatasetError(UserError, ValueError):
  """Bad or missing input data; the message names the file or field at fault."""
